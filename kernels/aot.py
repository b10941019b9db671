"""Every kernel (the losses' forward and backward, the optimizer's, --fuse-bn-relu's convolution) compiled ahead of time for NVIDIA
targets, on any machine.

Triton ships ptxas, so a CPU can lower each kernel through Triton's whole pipeline to a cubin for
sm_80 (A100) and sm_90 (H100/H200), with fp32, bf16 and fp16 data pointers (the optimizer's: fp32
only), and ptxas reports each cubin's registers and spills. Launches on a GPU may add alignment
hints that these compilations lack (they can only help). Needs Triton without its interpreter (TRITON_INTERPRET unset).

    python -m kernels.aot            one line per (kernel, target, dtype), as JSON
"""
import json
import os
import re
import subprocess
import sys
import tempfile

from .fused_conv import launch_config

TARGETS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
DATA = "*{dtype}"   # a tensor in the step's precision
F32 = "*fp32"       # per-sample losses, partial sums and their gradients are float32 whatever the precision

# label (the kernel's name[@variant]): (module, signature of its runtime arguments, constexpr values as the ops
# launch them, or a function of the dtype giving them)
KERNELS = {
    "_reparam_kl_forward": ("reparam", dict(mu_ptr=DATA, logvar_ptr=DATA, z_ptr=DATA, kl_ptr=F32, seed_ptr="*i64",
                                            row_offset="i32", columns="i32"), dict(BLOCK=128)),
    "_reparam_kl_backward": ("reparam", dict(mu_ptr=DATA, logvar_ptr=DATA, grad_z_ptr=DATA, grad_kl_ptr=F32,
                                             grad_mu_ptr=DATA, grad_logvar_ptr=DATA, seed_ptr="*i64",
                                             row_offset="i32", columns="i32"), dict(BLOCK=128)),
    "_feature_nll_forward": ("likelihood", dict(fake_ptr=DATA, real_ptr=DATA, partial_ptr=F32, features="i32",
                                                chunks="i32"), dict(BLOCK=1024, CHUNK_BLOCKS=4)),
    "_feature_nll_backward": ("likelihood", dict(fake_ptr=DATA, real_ptr=DATA, grad_ptr=F32, grad_fake_ptr=DATA,
                                                 features="i32"), dict(BLOCK=1024)),
    "_gan_loss_forward": ("gan", dict(real_ptr=DATA, fake_ptr=DATA, partial_ptr=F32, n_real="i32", n_fake="i32"),
                          dict(BLOCK=1024, LOG_EPS=1e-3)),
    "_gan_loss_backward": ("gan", dict(real_ptr=DATA, fake_ptr=DATA, grad_ptr=F32, grad_real_ptr=DATA,
                                       grad_fake_ptr=DATA, n_real="i32", n_fake="i32", real_weight="fp32",
                                       fake_weight="fp32"), dict(BLOCK=1024)),
    "_masked_rmsprop": ("rmsprop", dict(param_ptr=F32, grad_ptr=F32, square_avg_ptr=F32, update_ptr="*i1", lr_ptr=F32,
                                        n="i32", weight_decay="fp32", alpha="fp32", one_minus_alpha="fp32",
                                        eps="fp32"), dict(DECAY=True, BLOCK=1024)),
}
OPTIONS = {}  # launch options by label; other kernels: Triton's defaults

# --fuse-bn-relu's convolution, once per configuration the paper's 64 px networks launch, with the block sizes
# and warps the op chooses (fused_conv.launch_config): input -> output channels, with the per-channel sums where
# a BatchNorm reads them (the encoder's 2nd 64 -> 128 and the discriminator's 3rd 128 -> 256), without (the
# encoder's 3rd 128 -> 256 and the discriminator's 4th 256 -> 256, before a flatten or the head), and the
# decoder's last 32 -> 3 with a bias; fp32 compiled with float32 products (IEEE: cuDNN's TF32 off).
# Label: kernel@C-Cout[+sums].
_CONV_SIGNATURE = dict(x_ptr=DATA, scale_ptr=F32, shift_ptr=F32, w_ptr=DATA, bias_ptr=DATA, y_ptr=DATA, sum_ptr=F32,
                       sumsq_ptr=F32, H="i32", W="i32", Ho="i32", Wo="i32", Cout="i32", M="i32", stride="i32",
                       padding="i32")
for _channels, _out_channels, _bias, _sums in ((64, 128, False, True), (128, 256, False, True),
                                               (128, 256, False, False), (256, 256, False, False), (32, 3, True, False)):
    _blocks, _options = launch_config(_channels, _out_channels)
    _label = f"_bn_relu_conv_forward@{_channels}-{_out_channels}" + ("+sums" if _sums else "")
    KERNELS[_label] = ("fused_conv", _CONV_SIGNATURE, lambda dtype, constexprs=dict(
        C=_channels, HAS_BIAS=_bias, KH=5, KW=5, SUMS=_sums, BLOCK_M=64, **_blocks): {**constexprs, "IEEE": dtype == "fp32"})
    OPTIONS[_label] = _options

def kernel_dtypes(name):
    """The data dtypes a kernel is compiled for: each of DTYPES for the losses' kernels, fp32 alone for the
    optimizer's (it updates the fp32 master weights whatever the precision)."""
    return DTYPES if DATA in KERNELS[name][1].values() else ("fp32",)


def ptxas_path():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def resource_usage(ptx, arch):
    """(registers, spill store bytes, spill load bytes) that ptxas reports for the PTX on `arch`."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {done.stderr.strip()}")
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr).groups())
    return registers, stores, loads


def compile_kernel(name, capability, dtype):
    """One kernel lowered to a cubin for sm_`capability`: a dict of what the compilation produced."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, signature, constexprs = KERNELS[name]
    constexprs = constexprs(dtype) if callable(constexprs) else constexprs
    kernel = getattr(importlib.import_module(f"kernels.{module_name}"), name.split("@")[0])  # label: kernel[@variant]
    signature = {arg: kind.format(dtype=dtype) for arg, kind in signature.items()}
    signature.update({arg: "constexpr" for arg in constexprs})
    missing = set(kernel.arg_names) - set(signature)
    if missing:
        raise ValueError(f"{name}: no signature for {sorted(missing)}")
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32), options=OPTIONS.get(name, {}))
    arch = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.MULTILINE).group(1)
    registers, spill_stores, spill_loads = resource_usage(compiled.asm["ptx"], arch)
    return {"kernel": name, "target": f"sm_{capability}", "arch": arch, "dtype": dtype,
            "cubin_bytes": len(compiled.asm["cubin"]), "registers": registers, "spill_stores": spill_stores,
            "spill_loads": spill_loads, "shared_bytes": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps}


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernels.aot compiles the kernels: unset TRITON_INTERPRET")
    import triton
    print(json.dumps({"triton": triton.__version__}))
    for name in KERNELS:
        for capability in TARGETS:
            for dtype in kernel_dtypes(name):
                print(json.dumps(compile_kernel(name, capability, dtype)), flush=True)


if __name__ == "__main__":
    main()
