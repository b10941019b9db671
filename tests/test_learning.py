"""bench/learning.py, the learning-curve experiment, at a toy budget: it runs and records what it says."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("sklearn", reason="the experiment's digits ship in scikit-learn (pip install -e '.[learning]')")


@pytest.mark.slow
def test_learning_experiment_records_heldout_curves_scores_and_grids(tmp_path):
    out = tmp_path / "learning"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "learning.py"), "--out", str(out),
                           "--steps", "16", "--kid-samples", "8", "--models", "vae,gan"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["heldout_images"] == 359 and 0 < summary["mean_image_pixel_mse"] < 1
    assert summary["versions"]["torch"] and "--width" in summary["configuration"]
    vae, gan = summary["results"]["vae"], summary["results"]["gan"]
    assert [p["step"] for p in vae] == list(range(2, 17, 2))
    assert all(0 < p["heldout_pixel_mse"] < 2 for p in vae) and all(p["heldout_pixel_mse"] is None for p in gan)
    scored = [p["samples"] for p in gan if "samples" in p]
    assert len(scored) == 4 and all(s["n"] == 8 and s["fid"] > 0 and s["sharpness_vs_heldout"] > 0 for s in scored)
    assert (out / "vae-heldout-reconstructions.png").stat().st_size > 0 and (out / "gan-samples.png").exists()
    assert "| vae | 16 |" in (out / "results.md").read_text()
