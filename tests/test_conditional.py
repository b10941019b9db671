"""The conditional models (cvaegan, cvae, cgan), the attribute regressor and Table 1."""
import json
import os
import subprocess
import sys

import pytest
import torch

import vaegan
from conftest import ROOT, SMALL, run_train
from datagen import make_attribute_folder, make_folder
from vaegan.data import DataError, build_dataset
from vaegan.eval.evaluate import reconstruction_errors
from vaegan.eval.regressor import attribute_scores, format_regressor_summary, train_regressor

GRAY = SMALL + ["--channels", "1", "--batch-size", "16", "--steps", "3", "--log-every", "1", "--sample-every", "3"]


@pytest.fixture(scope="module")
def attribute_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribute-data")
    make_attribute_folder(root / "faces", n=300)
    return root


@pytest.fixture(scope="module")
def regressor(attribute_data):
    path = attribute_data / "regressor.pt"
    summary = train_regressor(str(attribute_data / "faces"), str(path), image_size=32, channels=1, epochs=3,
                              batch_size=32, workers=0, log=lambda *_: None)
    return path, summary


def test_the_regressor_reads_one_value_per_attribute_and_scores_signs_and_directions(tmp_path):
    # the fast tier's check of vaegan/eval/regressor.py (training it, and Table 1, are the slow tests below)
    from vaegan import checkpoint
    from vaegan.eval.regressor import AttributeRegressor, accuracies, load_regressor, similarity_scores
    for size in (32, 64):
        assert AttributeRegressor(size, 3, 5)(torch.rand(2, 3, size, size)).shape == (2, 5)
    targets = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    predictions = torch.tensor([[0.5, -2.0], [0.3, -0.1], [2.0, -1.0], [-0.2, 0.4]])
    assert accuracies(predictions, targets).tolist() == [0.75, 0.75]
    cosine, mse = similarity_scores(targets * 3, targets)
    assert cosine == pytest.approx(1.0) and mse == pytest.approx(4.0)
    assert similarity_scores(-targets, targets)[0] == pytest.approx(-1.0)
    checkpoint.save(str(tmp_path / "model.pt"), {"kind": "vaegan", "step": 0})
    with pytest.raises(DataError, match="model.pt: not an attribute regressor"):
        load_regressor(str(tmp_path / "model.pt"))


def vaegan_cli(*args):
    return subprocess.run([sys.executable, "-m", "vaegan", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_regressor_learns_an_attribute_that_is_easy_to_see(regressor):
    path, summary = regressor
    assert summary["num_held_out"] == 30 and summary["num_train"] == 270  # every 10th image held out
    assert summary["per_attribute_accuracy"]["Bright"] >= 0.9
    assert summary["per_attribute_accuracy"]["Lucky"] < 0.85  # a coin flip: nothing to learn from the image
    assert "held-out accuracy" in format_regressor_summary(summary) and os.path.getsize(path) > 0


@pytest.mark.slow
def test_regressor_command_prints_held_out_accuracy_and_refuses_data_without_attributes(tmp_path, attribute_data):
    out = tmp_path / "r.pt"
    done = vaegan_cli("regressor", "--data", attribute_data / "faces", "--out", out, "--image-size", "32",
                      "--channels", "1", "--epochs", "1", "--workers", "0", "--attributes", "Bright")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out}: held-out accuracy" in done.stdout and "(n=30;" in done.stdout
    make_folder(tmp_path / "plain", n=12, nested=False)
    done = vaegan_cli("regressor", "--data", tmp_path / "plain", "--out", tmp_path / "p.pt", "--workers", "0")
    assert done.returncode == 2 and "no attribute file" in done.stderr and "Traceback" not in done.stderr
    done = vaegan_cli("regressor", "--data", attribute_data / "faces", "--out", tmp_path / "x.pt", "--attributes",
                      "Bright,Wings")
    assert done.returncode == 2 and "attributes Wings are not in the attribute file" in done.stderr
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "p.pt").exists()


@pytest.fixture(scope="module")
def conditional_runs(attribute_data):
    runs = {}
    for kind in ("cvae", "cgan", "cvaegan"):
        out = attribute_data / kind
        done = run_train(GRAY + ["--model", kind, "--data", str(attribute_data / "faces"), "--out", str(out)])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "conditioned on 2 attributes (Bright, Lucky); the encoder sees them too" in done.stderr
        runs[kind] = out
    return runs


@pytest.mark.slow
def test_conditional_runs_train_save_and_generate_from_attributes(conditional_runs, attribute_data):
    assert json.loads((conditional_runs["cvaegan"] / "config.json").read_text())["run"]["attributes"] == "Bright,Lucky"
    assert (conditional_runs["cvaegan"] / "samples-0000003.png").stat().st_size > 0
    model = vaegan.load(str(conditional_runs["cvaegan"]))
    assert model.conditional and model.attribute_names == ["Bright", "Lucky"]
    light, dark = model.sample(4, seed=3, attributes=[1.0, 1.0]), model.sample(4, seed=3, attributes=[-1.0, 1.0])
    assert light.shape == (4, 1, 32, 32) and not torch.allclose(light, dark)
    with pytest.raises(ValueError, match="conditional: pass attributes"):
        model.sample(2)
    data = build_dataset(str(attribute_data / "faces"), "train", 32, 1)
    pixel, feature = reconstruction_errors(model, data, 8, 4, "cpu")
    assert pixel > 0 and feature > 0


@pytest.mark.slow
def test_table_1_scores_real_and_generated_images(conditional_runs, regressor, tmp_path):
    path, summary = regressor
    runs = [conditional_runs[k] for k in ("cvae", "cgan", "cvaegan")]
    table = attribute_scores([str(r) for r in runs], str(path), str(tmp_path), num_samples=30, log=lambda *_: None)
    assert [row["images"] for row in table] == ["real held-out images", "cvae (cvae)", "cgan (cgan)",
                                                "cvaegan (cvaegan)"]
    real = table[0]
    # The regressor reads Bright right and Lucky not at all: cosine about 1/sqrt(2), error about 1/2.
    assert real["cosine_similarity"] > 0.5 and real["mean_squared_error"] < 1.0 and real["num_samples"] == 30
    assert all(-1 <= row["cosine_similarity"] <= 1 and row["mean_squared_error"] >= 0 for row in table)
    text = (tmp_path / "attribute_scores.md").read_text()
    assert "| real held-out images | - | 30 |" in text
    assert "| LFW test set | 0.9193 | 14.20 |" in text and "paper's own numbers" in text
    saved = json.loads((tmp_path / "attribute_scores.json").read_text())
    assert saved["attributes"] == ["Bright", "Lucky"] and len(saved["rows"]) == 4


@pytest.mark.slow
def test_table_1_refuses_unconditional_runs_and_other_image_sizes(conditional_runs, regressor, attribute_data,
                                                                   tmp_path):
    path, _ = regressor
    plain = tmp_path / "plain"
    assert run_train(GRAY + ["--data", str(attribute_data / "faces"), "--steps", "1", "--out",
                             str(plain)]).returncode == 0
    with pytest.raises(DataError, match="'vaegan' run is not conditional"):
        attribute_scores([str(plain)], str(path), str(tmp_path / "t"))
    big = tmp_path / "big.pt"
    train_regressor(str(attribute_data / "faces"), str(big), image_size=64, channels=1, epochs=1, workers=0,
                    log=lambda *_: None)
    with pytest.raises(DataError, match="makes 32x32x1 images, the regressor reads 64x64x1"):
        attribute_scores([str(conditional_runs["cgan"])], str(big), str(tmp_path / "t"))
    done = vaegan_cli("attribute-scores", conditional_runs["cgan"], "--regressor", conditional_runs["cgan"] / "checkpoint.pt",
                      "--out", tmp_path / "t")
    assert done.returncode == 2 and "not an attribute regressor" in done.stderr


@pytest.mark.slow
def test_conditional_model_needs_attributes_in_the_data(tmp_path):
    done = run_train(GRAY + ["--model", "cgan", "--out", str(tmp_path / "run")])  # the built-in faces: none
    assert done.returncode == 2 and "--model cgan conditions on attributes" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_train(GRAY + ["--model", "vae", "--attributes", "Bright", "--out", str(tmp_path / "run")])
    assert done.returncode == 2 and "--attributes applies to the conditional models" in done.stderr
