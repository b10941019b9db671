"""The DALI loader in its CPU mode (device_id=None, CPU operators) against PIL."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL, run_train
from datagen import make_celeba, make_celeba_from_photographs, make_folder
from test_data import authors_preprocessing, laplacian_rms
from vaegan.data import DataError, StepBatchSampler, build_dataset, make_loader
from vaegan.data.dali import DaliLoader

# CI installs DALI (the [test] extra); a GPU node without it skips these, saying so
pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

LEVEL = 1 / 127.5  # one grey level in [-1, 1]


def batches(loader):
    return [(images, attributes) for images, attributes, _ in loader]


def test_dali_decode_equals_pil_decode(tmp_path):
    from nvidia.dali import fn, pipeline_def, types
    paths = make_folder(tmp_path, n=6, nested=False)

    @pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def decode():
        encoded, _ = fn.readers.file(files=paths, random_shuffle=False)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    pipe = decode()
    pipe.build()
    (decoded,) = pipe.run()
    for i, path in enumerate(paths):
        dali = np.array(decoded.at(i)).astype(int)
        pil = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert dali.shape == pil.shape
        assert np.abs(dali - pil).max() <= 2  # JPEG decoders may round the IDCT differently; PNGs are exact
        if path.endswith(".png"):
            assert np.array_equal(dali, pil)


@pytest.mark.parametrize("layout", ["celeba", "folder"])
def test_dali_and_pil_loaders_give_the_same_batches(tmp_path, layout):
    if layout == "celeba":
        make_celeba(tmp_path, n=16)
        dataset = build_dataset(str(tmp_path), "train", 64, 3)  # crop 40..188 x 15..163, blur, resize
    else:
        make_folder(tmp_path, n=16)  # sizes from 40x50 to 85x50: centred squares, some enlarged
        dataset = build_dataset(str(tmp_path), "train", 32, 1)
    dali = batches(DaliLoader(dataset, 4, 0, 1, seed=5, start_step=0, end_step=6))
    pil = batches(make_loader(dataset, StepBatchSampler(len(dataset), 4, 0, 1, 5, 0, 6), 0))
    assert len(dali) == len(pil) == 6
    for (a, attrs_a), (b, attrs_b) in zip(dali, pil):
        assert a.shape == b.shape and a.dtype == torch.float32
        difference = (a - b).abs()
        assert difference.mean() < LEVEL and difference.max() <= 4 * LEVEL  # cubic convolution against a spline
        assert torch.equal(attrs_a, attrs_b)  # same images, same order
    # flips are the same ones: un-flipping one side would break the match
    assert (dali[0][0].flip(3) - pil[0][0]).abs().mean() > 5 * LEVEL


def test_two_shards_are_disjoint_and_cover_the_split(tmp_path):
    make_celeba(tmp_path, n=32)  # 24 train images: 3 steps of 2 x 4 per epoch
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    seen = []
    for rank in range(2):
        loader = DaliLoader(dataset, 4, rank, 2, seed=1, start_step=0, end_step=3)
        seen.append([tuple(row.tolist()) for images, attributes in batches(loader) for row in images.flatten(1)[:, :8]])
    assert not set(seen[0]) & set(seen[1])
    everything = {tuple(dataset[(i, f)][0].flatten()[:8].tolist()) for i in range(len(dataset)) for f in (False, True)}
    assert len(seen[0]) + len(seen[1]) == len(dataset)
    # each image seen matches one of the data set's images (in one of its two orientations)
    for key in seen[0] + seen[1]:
        assert min(max(abs(a - b) for a, b in zip(key, ref)) for ref in everything) <= 3 * LEVEL


def test_dali_loader_resumes_mid_epoch_exactly(tmp_path):
    make_celeba(tmp_path, n=24)
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    whole = batches(DaliLoader(dataset, 3, 0, 1, seed=2, start_step=0, end_step=9))
    resumed = batches(DaliLoader(dataset, 3, 0, 1, seed=2, start_step=4, end_step=9))
    assert len(resumed) == 5
    for (a, _), (b, _) in zip(whole[4:], resumed):
        assert torch.equal(a, b)


def test_corrupt_jpeg_is_a_clear_error_naming_the_file(tmp_path):
    paths = make_folder(tmp_path, n=8, nested=False)
    corrupt = sorted(paths)[2]
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a JPEG")
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    with pytest.raises(DataError, match="cannot be decoded") as e:
        batches(DaliLoader(dataset, 4, 0, 1, seed=0, start_step=0, end_step=2))
    assert corrupt in str(e.value) and "--loader pil" in str(e.value)


def test_builtin_faces_with_dali_are_a_clear_error():
    with pytest.raises(DataError, match="--loader dali decodes image files"):
        DaliLoader(build_dataset("builtin:faces", "train", 32, 1), 4, 0, 1, 0, 0, 1)


def test_training_with_the_dali_loader_on_cpu(tmp_path):
    make_celeba(tmp_path / "data", n=20)
    out = tmp_path / "run"
    args = SMALL + ["--data", str(tmp_path / "data"), "--steps", "2", "--log-every", "1", "--out", str(out)]
    done = run_train(args + ["--loader", "dali"])
    assert done.returncode == 0, done.stderr
    assert "loader dali (CPU operators)" in done.stderr and "augment authors" in done.stderr  # the default on real data
    assert json.load(open(out / "config.json"))["augment"] == "authors"
    done = run_train(SMALL + ["--steps", "1", "--loader", "dali", "--out", str(tmp_path / "faces")])
    assert done.returncode == 2 and "--loader dali: the built-in faces are held in memory" in done.stderr


def test_the_pipeline_is_built_once_across_epochs(tmp_path, monkeypatch):
    import vaegan.data.dali as dali
    builds = []
    build = dali._build_pipeline
    monkeypatch.setattr(dali, "_build_pipeline", lambda *a, **k: builds.append(1) or build(*a, **k))
    make_celeba(tmp_path, n=16)  # 12 train images: 3 steps of 4 per epoch
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    loader = DaliLoader(dataset, 4, 0, 1, seed=3, start_step=2, end_step=11)  # parts of four epochs
    got = batches(loader)
    assert len(got) == 9 and len(builds) == 1
    want = batches(make_loader(dataset, StepBatchSampler(len(dataset), 4, 0, 1, 3, 2, 11), 0))
    for (a, attrs_a), (b, attrs_b) in zip(got, want):
        assert torch.equal(attrs_a, attrs_b) and (a - b).abs().mean() < LEVEL


def test_loader_auto_falls_back_to_pil_when_the_pipeline_cannot_be_built(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import vaegan.trainer as trainer
    from vaegan.config import TrainConfig
    from vaegan.options import resolve_loader

    def broken(*args, **kwargs):
        raise RuntimeError("nvJPEG: no decoder for this device\nsecond line")
    monkeypatch.setattr(trainer, "DaliLoader", broken)
    make_celeba(tmp_path, n=16)
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    ctx = SimpleNamespace(rank=0, world_size=1)
    assert resolve_loader("auto", torch.device("cpu"), dataset.in_memory)[0] == "pil"  # auto off CUDA: PIL, no DALI
    # the GPU case (auto resolved to DALI there), decided without touching a GPU
    cfg = TrainConfig(data=str(tmp_path), batch_size=4, steps=2, workers=0, loader="dali")
    loader, sampler, kind, description = trainer.open_loader(cfg, dataset, ctx, torch.device("cpu"), 0,
                                                             "GPU decoding", may_fall_back=True)
    assert kind == "pil" and len(list(loader)) == 2
    assert description == ("default, as the DALI pipeline could not be built (nvJPEG: no decoder for this device); "
                           "0 workers")
    with pytest.raises(RuntimeError, match="nvJPEG: no decoder"):  # asked for by name: no fallback
        trainer.open_loader(cfg, dataset, ctx, torch.device("cpu"), 0, "requested", may_fall_back=False)


def test_dali_preprocessing_follows_the_authors_on_real_photographs(tmp_path):
    # DALI's cubic resize is a cubic convolution, scikit-image's an order-3 spline: close, not equal
    make_celeba_from_photographs(tmp_path)
    dataset = build_dataset(str(tmp_path), "train", 64, 3)
    loader = DaliLoader(dataset, len(dataset), 0, 1, seed=0, start_step=0, end_step=1, flip=False)
    (images, _), = batches(loader)
    order, _ = loader.sampler.epoch_order(0)
    for image, index in zip(images, order):
        want = authors_preprocessing(dataset.paths[index]).astype(np.float64)
        got = (image.permute(1, 2, 0).numpy() + 1) * 127.5
        difference = np.abs(got - want)
        assert difference.mean() < 1 and np.percentile(difference, 99) <= 6, dataset.paths[index]
        assert abs(laplacian_rms(got) / laplacian_rms(want) - 1) < 0.05, dataset.paths[index]  # as sharp


@pytest.mark.parametrize("layout", ["photographs", "folder"])
def test_the_authors_augmentation_in_dali_follows_the_pil_loader(tmp_path, layout):
    # the same (seed, step, slot) draws the same augmentation in both loaders; DALI warps with
    # linear interpolation where the PIL loader uses scikit-image's order-3 spline
    if layout == "photographs":
        make_celeba_from_photographs(tmp_path)
        dataset = build_dataset(str(tmp_path), "train", 64, 3)
    else:
        make_folder(tmp_path, n=12)  # grey, centred squares, some enlarged
        dataset = build_dataset(str(tmp_path), "train", 32, 1)
    dataset.augment = True
    batch = min(len(dataset), 8)
    dali = batches(DaliLoader(dataset, batch, 0, 1, seed=3, start_step=4, end_step=6))
    sampler = StepBatchSampler(len(dataset), batch, 0, 1, 3, 4, 6)
    if layout == "photographs":
        pil = batches(make_loader(dataset, sampler, 0))
    else:  # DALI warps a folder's whole file, as the per-image path does; the PIL loader warps the decoded
        # square (datasets.decoded_side), where a translation moves the picture less
        pil = [(torch.stack([dataset[item][0] for item in items]), None) for items in sampler]
    dataset.augment = False
    plain = batches(make_loader(dataset, StepBatchSampler(len(dataset), batch, 0, 1, 3, 4, 6), 0))
    for (a, _), (b, _), (c, _) in zip(dali, pil, plain):
        difference = (a - b).abs()
        assert difference.mean() < LEVEL and torch.quantile(difference, 0.99) <= 6 * LEVEL
        assert (b - c).abs().mean() > 10 * difference.mean()  # the augmentation changed the images: the match is not trivial


@pytest.mark.parametrize("channels", [3, 1])
def test_the_dali_colour_changes_are_the_authors_on_fresh_images(channels):
    # far larger changes than the authors draw, so that a wrong sign or sextant could not hide
    from nvidia.dali import fn, pipeline_def

    from vaegan.data import augment
    from vaegan.data.dali import _authors_colour, augmentation_inputs
    rng = np.random.default_rng()
    images = [rng.random((17, 23, channels)).astype(np.float32) for _ in range(4)]
    images[0][:4, :4] = 0.4  # grey pixels (no chroma)
    images[0][4:8, :4, :2] = 0.9  # ties for the largest channel
    images[1][:3] = 0.0  # black
    drawn = [augment.Augmentation((0, 0), 1, 0, rng.uniform(0.6, 1.6), rng.uniform(0.6, 1.6), rng.uniform(-0.5, 0.5))
             for _ in images]
    names = augmentation_inputs(channels)

    def source():
        yield (images, *([np.float32(getattr(a, name)) for a in drawn] for name in names))

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipeline():
        batch, *values = fn.external_source(source=source, num_outputs=1 + len(names), batch=True, layout=["HWC"] + [""] * len(names))
        return _authors_colour(batch, channels=channels, **dict(zip(names, values)))
    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    for i, (image, a) in enumerate(zip(images, drawn)):
        want = augment.colour(image.astype(np.float64), a)
        assert np.abs(np.array(out.at(i)) - want).max() < 1e-5
