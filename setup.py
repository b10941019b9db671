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
    install_requires=["torch>=2.11", "numpy", "pillow", "tqdm", "tensorboard", "scikit-image"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["vaegan=vaegan.cli:console_main"]},
)
