"""bench/precision_curves.py, the precision modes' learning curves, at a toy size on the CPU (the fastest
mode's CUDA graphs and Triton compile need a GPU: CPU-possible flags stand in)."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = "--width 0.25 --latent-size 16 --fc-width 64 --workers 0"


@pytest.mark.slow
def test_precision_curves_record_both_modes_heldout_errors_and_kid(tmp_path):
    out = tmp_path / "precision"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "precision_curves.py"), "--device", "cpu",
                           "--out", str(out), "--steps", "2", "--checkpoints", "2", "--image-size", "32",
                           "--batch-size", "4", "--per-photograph", "2", "--test-every", "3", "--kid-samples", "2",
                           "--train-args", TINY, "--mode", "fastest=--model vaegan --precision bf16 --kernels torch",
                           "--mode", "eager-fp32=--model vaegan --precision fp32 --kernels torch"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "precision.json").read_text())
    assert summary["gamma"] == 1e-6 and (summary["train_images"], summary["heldout_images"]) == (8, 4)
    assert summary["kid_missing"] is None and summary["kid_samples"] == 2 and summary["skipped"] == {}
    assert set(summary["results"]) == {"fastest", "eager-fp32"}
    assert "--precision bf16" in summary["results"]["fastest"]["flags"]
    for result in summary["results"].values():
        assert [p["step"] for p in result["curve"]] == [1, 2] and result["train_seconds"] > 0
        for point in result["curve"]:
            assert 0 < point["heldout_pixel_mse"] < 4 and math.isfinite(point["heldout_dis_l_error"])
            assert point["n"] == 4 and math.isfinite(point["samples"]["kid"]) and point["samples"]["n"] == 2
    table = (out / "precision.md").read_text()
    assert "| step | fastest | eager-fp32 |" in table and "KID of samples" in table
