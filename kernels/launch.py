"""How the ops launch their kernels: through `wrap_triton`, so that torch.compile traces the launch
into its graph; under Triton's interpreter (CPU tests), the kernel itself, since nothing is traced
there and torch 2.11's `wrap_triton` rejects the interpreter's functions."""
from torch.library import wrap_triton

from . import interpreter_enabled


def launcher(kernel):
    return kernel if interpreter_enabled() else wrap_triton(kernel)
