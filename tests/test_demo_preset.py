"""The built-in faces demo: its committed result file (bench/demo_picture.py --seeds) is the preset's, and
its grids look like faces."""
import json
import os
import sys

import pytest
from PIL import Image

from conftest import ROOT
from vaegan.config import BUILTIN_PRESET, TrainConfig

sys.path.insert(0, os.path.join(ROOT, "bench"))
import demo_picture  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "demo-faces")


@pytest.fixture(scope="module")
def results():
    with open(os.path.join(RESULTS, "results.json")) as f:
        return json.load(f)


def test_the_result_file_was_made_with_todays_preset(results):
    preset = TrainConfig().resolved()
    compared = set(BUILTIN_PRESET) | {"lr", "optimizer", "decoder_gan_loss"}
    assert compared <= set(demo_picture.PRESET_FIELDS)
    for row in results["rows"]:
        assert {k: row["preset"][k] for k in compared} == {k: getattr(preset, k) for k in compared}, row["seed"]


def test_every_seed_has_its_final_grids(results):
    for row in results["rows"]:
        for name, columns in (("samples", 8), ("reconstructions", 8)):
            with Image.open(os.path.join(RESULTS, f"{name}-seed{row['seed']}.png")) as grid:
                assert grid.width == columns * (BUILTIN_PRESET["image_size"] + 2) + 2


def test_the_reconstructions_pixel_error_is_below_the_earlier_demos(results):
    for row in results["rows"]:
        assert row["pixel_mse"] < demo_picture.MAX_PIXEL_MSE, row["seed"]



def test_share_ratios_flag_a_grid():
    flat = {"p2": 0.001, "p4": 0.01}
    row = {"real": flat, "samples": flat, "recon": {"p2": 0.001, "p4": 0.04}, "pixel_mse": 0.05}
    assert demo_picture.share_ratios(row)[("recon", "p4")] == pytest.approx(4.0)
    assert not demo_picture.passes(row)
    row["recon"] = flat
    assert demo_picture.passes(row)
