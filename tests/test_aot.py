"""Every Triton kernel, forward and backward, compiles ahead of time for sm_80 and sm_90 with fp32,
bf16 and fp16 data (the optimizer's with fp32), on a machine without a GPU (Triton ships ptxas), with no
register spills."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from kernels.aot import KERNELS, TARGETS, kernel_dtypes


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_in_every_precision_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "kernels.aot"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    rows = lines[1:]
    assert {(r["kernel"], r["target"], r["dtype"]) for r in rows} == \
        {(k, f"sm_{t}", d) for k in KERNELS for t in TARGETS for d in kernel_dtypes(k)}
    print(f"\ntriton {lines[0]['triton']}: registers / spill bytes (stores+loads) per kernel and target")
    for r in rows:
        print(f"  {r['kernel']:30s} {r['arch']:7s} {r['dtype']}  {r['registers']:3d} registers, "
              f"{r['spill_stores'] + r['spill_loads']} spilled, {r['cubin_bytes']} cubin bytes")
        assert r["cubin_bytes"] > 0 and 0 < r["registers"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}  # Triton targets Hopper's sm_90a features
