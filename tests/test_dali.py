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


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("layout", ["celeba", "folder"])
def test_dali_and_pil_loaders_give_the_same_batches(tmp_path, layout, augment):
    # both loaders hand uint8 decoded images to device_preprocess.preprocess_batch with the same
    # (seed, step, slot) draws; the decoders (DALI's CPU decoder, PIL's libjpeg) agreed to the bit on
    # these JPEGs and PNGs. A folder's squares are cut and resized in DALI (cubic convolution) where
    # ImageFiles.decode uses the order-3 spline: measured at most 4 levels, 0.06 to 0.21 on average
    if layout == "celeba":
        make_celeba(tmp_path, n=16)
        dataset = build_dataset(str(tmp_path), "train", 64, 3)  # crop 40..188 x 15..163, blur, resize
    else:
        make_folder(tmp_path, n=16)  # sizes from 40x50 to 85x50: centred squares, some enlarged
        dataset = build_dataset(str(tmp_path), "train", 32, 1)
    dataset.augment = augment
    dali = batches(DaliLoader(dataset, 4, 0, 1, seed=5, start_step=1, end_step=4))
    pil = batches(make_loader(dataset, StepBatchSampler(len(dataset), 4, 0, 1, 5, 1, 4), 0))
    assert len(dali) == len(pil) == 3
    for (a, attrs_a), (b, attrs_b) in zip(dali, pil):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert torch.equal(attrs_a, attrs_b)  # same images, same order
        if layout == "celeba":
            assert torch.equal(a, b)
        else:
            difference = (a - b).abs()
            assert difference.mean() < 0.3 * LEVEL and difference.max() <= 4.01 * LEVEL
    # flips are the same ones: un-flipping one side would break the match
    assert (dali[0][0].flip(3) - pil[0][0]).abs().mean() > 5 * LEVEL
    if augment:  # the augmentation changed the images: the match is not trivial
        dataset.augment = False
        plain = batches(make_loader(dataset, StepBatchSampler(len(dataset), 4, 0, 1, 5, 1, 4), 0))
        assert (dali[0][0] - plain[0][0]).abs().mean() > 5 * LEVEL


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


@pytest.mark.parametrize("augment", [False, True])
def test_dali_loader_resumes_mid_epoch_exactly(tmp_path, augment):
    make_celeba(tmp_path, n=24)  # 12 train images: 4 steps of 3 per epoch; step 4 starts the second
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    dataset.augment = augment
    whole = batches(DaliLoader(dataset, 3, 0, 1, seed=2, start_step=0, end_step=7))
    resumed = batches(DaliLoader(dataset, 3, 0, 1, seed=2, start_step=5, end_step=7))
    assert len(resumed) == 2
    for (a, attrs_a), (b, attrs_b) in zip(whole[5:], resumed):
        assert torch.equal(a, b) and torch.equal(attrs_a, attrs_b)


@pytest.mark.parametrize("layout", ["folder", "celeba"])
def test_corrupt_jpeg_is_a_clear_error_naming_the_file(tmp_path, layout):
    if layout == "folder":
        paths = make_folder(tmp_path, n=8, nested=False)
    else:
        paths = [str(tmp_path / "img_align_celeba" / n) for n in make_celeba(tmp_path, n=16)]
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    corrupt = sorted(dataset.paths)[2]  # not the first: build_dataset reads it
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a JPEG")
    loader = DaliLoader(dataset, 4, 0, 1, seed=0, start_step=0, end_step=len(dataset) // 4)
    with pytest.raises(DataError, match="cannot be decoded") as e:
        batches(loader)
    assert corrupt in str(e.value) and "--loader pil" in str(e.value) and corrupt in paths
    assert loader.pipe is None  # shut down, workers included


def test_a_celeba_image_of_another_size_is_a_clear_error_naming_it(tmp_path):
    names = make_celeba(tmp_path, n=16)
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    wrong = dataset.paths[3]
    Image.new("RGB", (180, 218)).save(wrong, format="JPEG")
    with pytest.raises(DataError, match="is 180x218, not the 178x218 of aligned CelebA") as e:
        batches(DaliLoader(dataset, 4, 0, 1, seed=0, start_step=0, end_step=3))
    assert wrong in str(e.value) and len(names) == 16


def test_the_python_workers_start_by_spawn_and_end_with_the_iteration(tmp_path):
    # spawn is the start method on CUDA: the callback must pickle and the workers import vaegan
    import multiprocessing
    make_celeba(tmp_path, n=16)
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    dataset.augment = True
    before = set(multiprocessing.active_children())
    loader = DaliLoader(dataset, 4, 0, 1, seed=4, start_step=1, end_step=4, py_start_method="spawn")
    workers = set(multiprocessing.active_children()) - before
    assert workers and all(w.is_alive() for w in workers)
    got = batches(loader)
    for worker in workers:
        worker.join(timeout=30)
    assert not any(w.is_alive() for w in workers) and loader.pipe is None
    want = batches(make_loader(dataset, StepBatchSampler(len(dataset), 4, 0, 1, 4, 1, 4), 0))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, want)) and len(got) == 3


def test_nothing_is_drawn_or_read_on_the_launching_thread(tmp_path, monkeypatch):
    # the files are read in DALI's worker processes; here no file is read and nothing is drawn per image
    # (augment.draw): the step's augmentations are one batched draw per batch
    import vaegan.data.augment as augment
    import vaegan.data.dali as dali
    make_celeba(tmp_path, n=16)
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    dataset.augment = True
    loader = DaliLoader(dataset, 4, 0, 1, seed=4, start_step=0, end_step=3)  # workers forked before the patch

    def forbidden(*args, **kwargs):
        raise AssertionError("called on the launching thread")
    batched = []
    draw_fields = augment.draw_fields
    monkeypatch.setattr(augment, "draw", forbidden)
    monkeypatch.setattr(augment, "draw_fields", lambda *a: batched.append(a) or draw_fields(*a))
    monkeypatch.setattr(dali.np, "fromfile", forbidden)
    assert len(batches(loader)) == 3 and len(batched) == 3


def test_builtin_faces_with_dali_are_a_clear_error():
    with pytest.raises(DataError, match="--loader dali decodes image files"):
        DaliLoader(build_dataset("builtin:faces", "train", 32, 1), 4, 0, 1, 0, 0, 1)


@pytest.mark.slow
def test_training_with_the_dali_loader_on_cpu(tmp_path):
    make_celeba(tmp_path / "data", n=20)
    out = tmp_path / "run"
    args = SMALL + ["--data", str(tmp_path / "data"), "--steps", "2", "--log-every", "1", "--out", str(out)]
    done = run_train(args + ["--loader", "dali"])
    assert done.returncode == 0, done.stderr
    assert "loader dali (CPU operators)" in done.stderr and "augment authors" in done.stderr  # the default on real data
    assert json.load(open(out / "config.json"))["run"]["augment"] == "authors"
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
    # the same (seed, step, slot) draws the same augmentation in both loaders, applied by the same
    # function to the decoded images: a folder's square at datasets.decoded_side in both (resized in
    # DALI with cubic convolution, with the order-3 spline in ImageFiles.decode)
    if layout == "photographs":
        make_celeba_from_photographs(tmp_path)
        dataset = build_dataset(str(tmp_path), "train", 64, 3)
    else:
        make_folder(tmp_path, n=12)  # grey, centred squares, some enlarged
        dataset = build_dataset(str(tmp_path), "train", 32, 1)
    dataset.augment = True
    batch = min(len(dataset), 8)
    dali = batches(DaliLoader(dataset, batch, 0, 1, seed=3, start_step=4, end_step=6))
    pil = batches(make_loader(dataset, StepBatchSampler(len(dataset), batch, 0, 1, 3, 4, 6), 0))
    dataset.augment = False
    plain = batches(make_loader(dataset, StepBatchSampler(len(dataset), batch, 0, 1, 3, 4, 6), 0))
    for (a, _), (b, _), (c, _) in zip(dali, pil, plain):
        difference = (a - b).abs()
        if layout == "photographs":
            assert torch.equal(a, b)
        else:
            assert difference.mean() < 0.3 * LEVEL and difference.max() <= 4.01 * LEVEL
        assert (b - c).abs().mean() > 10 * max(difference.mean(), LEVEL / 10)  # the augmentation changed the images
