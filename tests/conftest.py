import os
import subprocess
import sys

import pytest
import torch

# The Triton kernels run on a CPU only under the interpreter, which must be chosen before any
# kernel is decorated, i.e. before `kernels.*` is first imported: here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# Float32 comparisons on a GPU are made without TF32: eager and compiled (channels-last) paths may
# choose different TF32 convolutions, whose 10-bit mantissas differ by far more than 1e-4.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# A compiled test that exceeded dynamo's recompile limit would run eager and pass for the wrong
# reason (the routing test once did, for 4 of its 12 compiled cases): an error instead, and each
# test starts with dynamo's caches empty.
torch._dynamo.config.fail_on_recompile_limit_hit = True


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
# A small but complete configuration: the paper's convolutions at 32 px, a narrow FC and latent; on the built-in
# faces unless a test gives --data, so with the demo preset's resizing decoder (--up-conv transposed for the authors').
SMALL = ["--image-size", "32", "--latent-size", "16", "--fc-width", "64", "--batch-size", "8", "--workers", "0"]


def run_train(args, timeout=600, **kwargs):
    """`python train.py ARGS` in a subprocess; returns the CompletedProcess. On the CPU unless ARGS
    name a --device: these tests hold the command line's behaviour, the same on a GPU machine."""
    if "--device" not in args:
        args = [*args, "--device", "cpu"]
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, **kwargs)


@pytest.fixture
def faces_args(tmp_path):
    return SMALL + ["--out", str(tmp_path / "run")]
