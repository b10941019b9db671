"""Two gloo processes under torchrun (on one node, and as two nodes) against one process on the same
global batch."""
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SMALL
from vaegan.config import BUILTIN_PRESET
from vaegan.models import VAEGAN

WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")
STEPS = ["--steps", "3", "--log-every", "1", "--sample-every", "3", "--checkpoint-every", "3"]


def launch(nproc, args, out, **settings):
    """Train with `nproc` processes; `settings`: the worker's test settings (tests/ddp_worker.py), by name."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               WORKER, *args, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **settings)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def initial_state():
    """The parameters every run of SMALL starts from (seed 0): to show that training moved them."""
    torch.manual_seed(0)
    return VAEGAN("vaegan", 32, 1, latent_size=16, fc_width=64, up_conv=BUILTIN_PRESET["up_conv"]).state_dict()


def assert_trained(state):
    start = initial_state()
    assert any(not torch.equal(state[n].float(), start[n]) for n in start if start[n].is_floating_point())


def small(batch):
    args = list(SMALL)
    args[args.index("--batch-size") + 1] = str(batch)
    return args


def worst_difference(state, reference, start):
    """Max over tensors of ||state - reference|| / ||reference - start||: 0 when identical, about 1 when
    the runs took different paths. (RMSProp's first steps are nearly sign(gradient) * lr, so an element
    whose gradient is almost zero can flip even when the math agrees: compare whole tensors to how far
    training moved them.)"""
    worst = 0.0
    for name, value in reference.items():
        if value.is_floating_point() and "running" not in name:
            moved = (value.double() - start[name].double()).norm().item()
            worst = max(worst, (state[name].double() - value.double()).norm().item() / (moved + 1e-12))
    return worst


# With --sync-bn BatchNorm normalises over the global batch: 2 x 4 images is then the math of 1 x 8.
# In float64, so that summation order cannot flip the sign of a near-zero gradient (which
# RMSProp's first steps would turn into a full step the other way).
GLOBAL_BN = STEPS + ["--sync-bn", "--precision", "fp64"]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The parameters one process trains on the global batch of 8 (GLOBAL_BN)."""
    out = tmp_path_factory.mktemp("one")
    launch(1, small(8) + GLOBAL_BN, out)
    return torch.load(out / "rank0.pt")


@pytest.mark.slow
def test_two_processes_equal_one_process_and_replicas_stay_identical(tmp_path, one):
    start = initial_state()
    launch(2, small(4) + GLOBAL_BN, tmp_path / "two")
    two = torch.load(tmp_path / "two" / "rank0.pt")
    assert_trained(one)
    assert worst_difference(two, one, start) < 1e-6

    # Per-process BatchNorm statistics are other math, so other parameters: the comparison can fail.
    launch(2, small(4) + STEPS + ["--precision", "fp64"], tmp_path / "local-bn")
    assert worst_difference(torch.load(tmp_path / "local-bn" / "rank0.pt"), one, start) > 0.01

    # The default configuration: replicas identical to the bit, buffers included, after training.
    done = launch(2, small(4) + STEPS, tmp_path / "default")
    assert "2 process(es)" in done.stderr
    rank0 = torch.load(tmp_path / "default" / "rank0.pt")
    rank1 = torch.load(tmp_path / "default" / "rank1.pt")
    assert_trained(rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


@pytest.mark.slow
def test_fast_mode_on_two_processes_gives_the_eager_parameters(tmp_path):
    # The fast step (compiled forward and optimizer steps, channels-last, foreach optimizers, gradients
    # averaged in buckets during the backward) against the plain eager step with one all-reduce after it.
    start = initial_state()
    common = small(4) + STEPS + ["--precision", "fp64"]
    eager = launch(2, common + ["--memory-format", "contiguous", "--optimizer-impl", "for-loop",
                                "--no-overlap-allreduce"], tmp_path / "eager")
    assert "step eager, contiguous (default on CPUs: eager (compiling takes longer than a short CPU run)), optimizers for-loop" in eager.stderr
    assert "gradients averaged after the backward pass" in eager.stderr
    fast = launch(2, common + ["--compile", "--compile-backend", "aot_eager", "--memory-format", "channels-last",
                               "--optimizer-impl", "foreach"], tmp_path / "fast")
    assert re.search(r"step torch.compile \(aot_eager\), channels-last \(requested\), [1-9][0-9]* compiled graphs a "
                     r"step, optimizers foreach", fast.stderr)
    assert "gradients averaged in buckets during the backward pass" in fast.stderr
    reference = torch.load(tmp_path / "eager" / "rank0.pt")
    assert_trained(reference)
    for rank in (0, 1):
        # 1e-6 of the movement: the compiled optimizers hold the learning rate as a float32 tensor
        assert worst_difference(torch.load(tmp_path / "fast" / f"rank{rank}.pt"), reference, start) < 1e-6


@pytest.mark.slow
def test_a_compile_failure_on_one_process_makes_every_process_run_eager(tmp_path):
    # compiling by default (as on CUDA), with the masked optimizer steps (the CUDA path); rank 1's masked steps
    # cannot compile: its trial fails there, the ranks agree, both run eager, each saying why, and train what
    # two eager processes train
    masked = dict(VAEGAN_TEST_MASKED="1")
    common = small(4) + STEPS + ["--precision", "fp64", "--compile-backend", "aot_eager"]
    eager = launch(2, common + ["--no-compile"], tmp_path / "eager", **masked)
    fell_back = launch(2, common, tmp_path / "fell-back", VAEGAN_TEST_COMPILE_BY_DEFAULT="1",
                       VAEGAN_TEST_MASKED_COMPILE_FAILS_ON_RANK="1", **masked)
    assert re.search(r"process 1: compiling the step failed here \(Unsupported: .*\); every process runs eager",
                     fell_back.stderr)
    assert "process 0: compiling the step failed on another process; every process runs eager" in fell_back.stderr
    assert "step eager, channels-last (default with CUDA, but compiling failed (on another process), so eager)" \
        in fell_back.stderr
    reference = torch.load(tmp_path / "eager" / "rank0.pt")
    assert_trained(reference)
    for rank in (0, 1):
        state = torch.load(tmp_path / "fell-back" / f"rank{rank}.pt")
        for name in reference:
            assert torch.equal(state[name], reference[name]), (rank, name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path, one):
    # Two torchrun launchers of one process each, joined by c10d rendezvous on this machine: what
    # `torchrun --nnodes=2 --rdzv_backend=c10d` does across two machines.
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "nodes"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=test-two-nodes",
               WORKER, *small(4), *GLOBAL_BN, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = []
    try:
        for log in logs:  # to files, not pipes: neither launcher can block on a full pipe
            with open(log, "w") as f:
                nodes.append(subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                              start_new_session=True))
        for node in nodes:
            node.wait(timeout=600)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # the launcher and its worker
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log.read_text()[-3000:]
    assert "2 process(es) x batch 4" in "".join(log.read_text() for log in logs)
    rank0, rank1 = (torch.load(out / f"rank{rank}.pt") for rank in (0, 1))
    assert_trained(rank0)
    assert worst_difference(rank0, one, initial_state()) < 1e-6
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
