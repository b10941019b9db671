"""The authors' augmentation (vaegan/data/augment.py): its distributions, its algorithm, its wiring."""
import math

import numpy as np
import pytest
import torch
from skimage import color, data, transform

from conftest import SMALL, run_train
from datagen import make_celeba, make_celeba_from_photographs
from vaegan.data import StepBatchSampler, build_dataset, make_loader
from vaegan.data.augment import Augmentation, apply, draw


def test_drawn_parameters_follow_the_authors_distributions_and_depend_only_on_seed_step_and_slot():
    draws = [draw(0, step, slot) for step in range(100) for slot in range(40)]
    translation = np.array([d.translation for d in draws])
    assert np.abs(translation.mean(0)).max() < 0.1 and np.abs(translation.std(0) - 2.0).max() < 0.1
    for name, centre, sigma in (("scale", 1.0, 0.01), ("rotation", 0.0, 0.01), ("hue", 0.0, 0.01)):
        values = np.array([getattr(d, name) for d in draws])
        assert abs(values.mean() - centre) < 0.05 * sigma * 10 and abs(values.std() / sigma - 1) < 0.05, name
    for name in ("gamma", "contrast"):  # exp(N(sigma^2, sigma) / ln 2), sigma 0.05
        values = np.log(np.array([getattr(d, name) for d in draws])) * math.log(2)
        assert abs(values.mean() - 0.0025) < 0.003 and abs(values.std() / 0.05 - 1) < 0.05, name
    assert draw(3, 7, 5) == draw(3, 7, 5)
    assert len({draw(3, 7, 5), draw(3, 7, 6), draw(3, 8, 5), draw(4, 7, 5)}) == 4


def test_augmentation_is_the_authors_algorithm():
    image = data.astronaut()[:218, 100:278] / 255.0
    identity = Augmentation((0.0, 0.0), 1.0, 0.0, 1.0, 1.0, 0.0)
    assert np.abs(apply(image, identity) - image).max() < 1e-6
    shifted = apply(image, Augmentation((3.0, 0.0), 1.0, 0.0, 1.0, 1.0, 0.0))  # x (columns) by 3: the inverse map
    assert np.abs(shifted[:, :-3] - image[:, 3:]).max() < 1e-6
    a = draw(0, 1, 2)
    # written out from the authors' dataset/augment.py: warp (order 3, nearest border), gamma, HSV contrast, hue
    centre = np.array(image.shape[:2]) / 2.0
    warp = transform.SimilarityTransform(translation=-centre)
    warp += transform.SimilarityTransform(scale=(a.scale, a.scale), rotation=a.rotation)
    warp += transform.SimilarityTransform(translation=centre + np.array(a.translation))
    want = transform.warp(image, warp, order=3, mode="edge").clip(0, 1) ** a.gamma
    hsv = color.rgb2hsv(want)
    hsv[..., 1:] **= a.contrast
    hsv[..., 0] = np.mod(hsv[..., 0] + a.hue, 1.0)
    want = color.hsv2rgb(hsv)
    got = apply(image, a)
    assert np.abs(got - want).max() < 1e-6 and np.abs(got - image).mean() > 1e-3


def test_augmented_images_are_drawn_per_slot_and_again_on_resume(tmp_path):
    make_celeba_from_photographs(tmp_path, per_photograph=1)
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    plain = dataset[(0, False, (0, 0, 0))][0]
    dataset.augment = True
    a, b, c = (dataset[(0, False, key)][0] for key in ((0, 0, 0), (0, 0, 0), (0, 1, 0)))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    assert (a - plain).abs().mean() < 0.2  # the same picture, moved a little
    whole = [x for x, _, _ in make_loader(dataset, StepBatchSampler(len(dataset), 2, 0, 1, 5, 0, 4), 0)]
    resumed = [x for x, _, _ in make_loader(dataset, StepBatchSampler(len(dataset), 2, 0, 1, 5, 2, 4), 2)]
    assert all(torch.equal(x, y) for x, y in zip(whole[2:], resumed))


@pytest.mark.slow
def test_training_with_the_authors_augmentation_and_what_it_refuses(tmp_path):
    make_celeba(tmp_path / "data", n=12)
    args = SMALL + ["--data", str(tmp_path / "data"), "--steps", "2", "--augment", "authors"]
    done = run_train(args + ["--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "augment authors" in done.stderr
    done = run_train(SMALL + ["--steps", "1", "--augment", "authors", "--out", str(tmp_path / "faces")])
    assert done.returncode == 2 and "the built-in faces are held in memory" in done.stderr
    done = run_train(SMALL + ["--steps", "1", "--out", str(tmp_path / "faces")])  # their preset flips
    assert done.returncode == 0 and "augment flip" in done.stderr, done.stderr[-3000:]


def test_a_run_from_before_the_option_resumes_with_flips_only():
    from vaegan.config import TrainConfig
    from vaegan.trainer import merge_resumed_config
    saved = {k: v for k, v in vars(TrainConfig(data="x").resolved()).items() if k != "augment"}
    assert merge_resumed_config(TrainConfig(), saved).augment == "flip"
    assert TrainConfig(data="x").resolved().augment == "authors"
