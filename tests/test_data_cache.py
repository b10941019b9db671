"""The decoded data set held in memory (--data-cache, vaegan/data/cache.py) and the PIL loader's batched
preprocessing (vaegan/data/loader.py): the same batches, the same training, exact resume."""
import json
import os

import pytest
import torch

from datagen import make_celeba_from_photographs, make_folder
from vaegan import checkpoint, options, trainer
from vaegan.config import ConfigError, TrainConfig
from vaegan.data import BUILTIN, StepBatchSampler, build_dataset, cache, make_loader
from vaegan.data import device_preprocess as dp
from vaegan.data.cache import CachedLoader, DecodedCache

# tiny networks in fp32 (the CPU's bf16 would be slower); 12 real photographs, the authors' augmentation
TINY = dict(image_size=32, latent_size=16, fc_width=64, width=0.25, batch_size=4, workers=0, device="cpu",
            precision="fp32", log_every=2, sample_every=1000)


@pytest.fixture
def celeba(tmp_path):
    make_celeba_from_photographs(tmp_path / "data", per_photograph=2)
    return str(tmp_path / "data")


def batches(loader):
    return [(images, attributes, list(unreadable)) for images, attributes, unreadable in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (images_a, attributes_a, unreadable_a), (images_b, attributes_b, unreadable_b) in zip(a, b):
        assert torch.equal(images_a, images_b) and torch.equal(attributes_a, attributes_b)
        assert unreadable_a == unreadable_b


def train(cfg_values, out, explicit=()):
    cfg = TrainConfig(out=str(out), **cfg_values)
    cfg.explicit = set(explicit)
    return trainer.train(cfg)


@pytest.mark.slow
def test_host_cache_and_per_batch_decoding_train_the_same_parameters(celeba, tmp_path):
    """Both paths hand the same uint8 images to the same preprocess_batch, so the parameters after 3
    steps with the authors' augmentation are bit-identical (no tolerance needed)."""
    values = dict(TINY, data=celeba, steps=3, augment="authors")
    models = {}
    for choice in ("host", "none"):
        models[choice] = train(dict(values, data_cache=choice), tmp_path / choice).model
        with open(tmp_path / choice / "config.json") as f:
            assert json.load(f)["machine"]["data_cache"] == choice
    for p, q in zip(models["host"].parameters(), models["none"].parameters()):
        assert torch.equal(p, q)
    train(dict(values, steps=1), tmp_path / "auto")  # auto on a CPU: none, and config.json says so
    with open(tmp_path / "auto" / "config.json") as f:
        assert json.load(f)["machine"]["data_cache"] == "none"


@pytest.mark.slow
def test_resume_with_the_cache_continues_exactly(celeba, tmp_path):
    values = dict(TINY, data=celeba, augment="authors", data_cache="host", lr_schedule_steps=5)
    whole = train(dict(values, steps=5), tmp_path / "whole").model
    train(dict(values, steps=2), tmp_path / "half")
    assert "data_cache" not in checkpoint.load(str(tmp_path / "half"))["config"]  # a choice of the machine's
    resumed = train(dict(steps=5, resume=str(tmp_path / "half"), data_cache="host"), tmp_path / "half",
                    explicit=("steps", "resume", "data_cache")).model
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_the_cache_gives_the_per_batch_loaders_batches_with_an_unreadable_file_substituted(tmp_path):
    """The cache and DataLoader workers (2 processes, so their preprocessing runs apart from the main
    process) give the same batches over two epochs; the corrupt file's next one takes its place and
    its path is reported with each batch that draws it, by both."""
    make_celeba_from_photographs(tmp_path, per_photograph=2)
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    dataset.augment = True
    corrupt = dataset.paths[5]
    with open(corrupt, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not a png")
    sampler = lambda: StepBatchSampler(len(dataset), 4, 0, 1, seed=1, start_step=0, end_step=6)  # noqa: E731
    decoded = DecodedCache.decode(dataset, "host", "cpu", threads=2, progress=False)
    assert decoded.source.tolist() == [i if i != 5 else 6 for i in range(len(dataset))]
    cached = batches(CachedLoader(decoded, dataset, sampler(), "cpu"))
    assert_same_batches(cached, batches(make_loader(dataset, sampler(), 2)))
    reports = [u for _, _, unreadable in cached for u in unreadable]
    assert reports and all(u.startswith(corrupt + " (") for u in reports)
    drawn = sum(index == 5 for batch in sampler() for index, _, _ in batch)
    assert len(reports) == drawn  # once per batch that drew it, as the per-image loader reports


@pytest.mark.parametrize("layout", ["celeba", "folder"])
def test_the_pil_loader_preprocesses_decoded_batches_with_preprocess_batch(tmp_path, layout):
    """The loader's batch is preprocess_batch of the decoded images (CelebA: the whole 178x218 image;
    a folder: its centred square at datasets.decoded_side), with draw_batch of the sampler's places
    and its flips. A folder without augmentation is decoded at the run's size: the per-image path's
    grey levels exactly."""
    if layout == "celeba":
        make_celeba_from_photographs(tmp_path, per_photograph=1)
    else:
        make_folder(tmp_path, n=8)  # 40x50 to 61x50: squares enlarged and shrunk
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    for augment in (True, False):
        dataset.augment = augment
        sampler = StepBatchSampler(len(dataset), 3, 0, 1, seed=4, start_step=0, end_step=2)
        for (images, _, _), batch in zip(make_loader(dataset, sampler, 0), sampler):
            decoded = torch.stack([torch.from_numpy(dataset.decode(index)) for index, _, _ in batch])
            side = 64 if augment else 32
            assert decoded.shape[1:] == ((218, 178, 3) if layout == "celeba" else (side, side, 3))
            flips = torch.tensor([flip for _, flip, _ in batch])
            want = dp.preprocess_batch(decoded, 32, 3, layout == "celeba",
                                       dp.draw_batch([place for _, _, place in batch]) if augment else None, flips)
            assert torch.equal(images, want)
            if layout == "folder" and not augment:
                per_image = torch.stack([dataset[item][0] for item in batch])
                assert torch.equal(images, per_image)


def resolve_cache(monkeypatch, dataset, gpu_free, host_available, choice="auto", loader="auto", augment=True):
    monkeypatch.setattr(cache, "free_device_bytes", lambda device: gpu_free)
    monkeypatch.setattr(cache, "available_host_bytes", lambda: host_available)
    return options.resolve_data_cache(choice, torch.device("cuda", 0), dataset, augment, loader)


def test_auto_takes_the_gpu_then_host_memory_by_their_shares_and_explicit_choices_that_cannot_fit_fail(
        celeba, monkeypatch):
    dataset = build_dataset(celeba, "train", 64, 3)
    needed = len(dataset) * 218 * 178 * 3
    assert cache.decoded_bytes(dataset, True) == needed
    choice, why = resolve_cache(monkeypatch, dataset, 2 * needed, 0)
    assert choice == "gpu" and why.startswith("auto: 12 images of 218x178x3") and "50% of the" in why
    choice, why = resolve_cache(monkeypatch, dataset, 2 * needed - 1, 2 * needed)
    assert choice == "host" and "more than 50% of the" in why and "available in host memory" in why
    choice, why = resolve_cache(monkeypatch, dataset, 2 * needed - 1, 2 * needed - 1)
    assert choice == "none" and why.startswith("auto:")
    assert resolve_cache(monkeypatch, dataset, 2 * needed, 2 * needed, loader="pil")[0] == "none"
    assert resolve_cache(monkeypatch, dataset, needed, 0, choice="gpu")[0] == "gpu"  # explicit: all of it
    with pytest.raises(ConfigError, match=r"--data-cache gpu: 12 images of 218x178x3 take 0\.00 GB"):
        resolve_cache(monkeypatch, dataset, needed - 1, 0, choice="gpu")
    with pytest.raises(ConfigError, match="--data-cache host: .* more than the .* available in host memory"):
        resolve_cache(monkeypatch, dataset, 0, needed - 1, choice="host")
    # a folder's images are decoded at twice the run's size with the authors' augmentation, else at it
    folder = build_dataset(os.path.join(celeba, "img_align_celeba"), "train", 64, 3)
    assert cache.decoded_bytes(folder, True) == 4 * cache.decoded_bytes(folder, False) == 12 * 128 * 128 * 3
    # on a CPU: auto is none; gpu is an error naming the option
    cpu = torch.device("cpu")
    cfg, reasons = options.resolve(TrainConfig(data=celeba, device="cpu"), cpu, 1, dataset)
    assert cfg.data_cache == "none" and reasons["data_cache"].startswith("default on CPUs")
    with pytest.raises(ConfigError, match="--data-cache gpu needs CUDA"):
        options.resolve(TrainConfig(data=celeba, device="cpu", data_cache="gpu"), cpu, 1, dataset)
    with pytest.raises(ConfigError, match="--data-cache host decodes the images once with PIL and --loader dali"):
        options.check(TrainConfig(data=celeba, data_cache="host", loader="dali"))
    # the built-in faces are held in memory already
    faces = build_dataset(BUILTIN, "train", 32, 1)
    cfg, reasons = options.resolve(TrainConfig(device="cpu", data_cache="host"), cpu, 1, faces)
    assert cfg.data_cache == "none" and "held in memory already" in reasons["data_cache"]


def test_the_main_process_branch_of_the_pil_loader_gives_the_workers_batches(celeba):
    """On a device the workers only decode and the main process copies and preprocesses (the branch a
    GPU run takes); here, on the CPU, that branch against the workers' preprocessing: the same batches
    and attributes (taken from the device's copy of the table by each image's row)."""
    from vaegan.data.loader import CollateDecoded, DecodingLoader
    dataset = build_dataset(celeba, "train", 32, 3)
    dataset.augment = True
    dataset.attributes = torch.arange(len(dataset) * 2, dtype=torch.float32).reshape(-1, 2)  # rows told apart
    sampler = lambda: StepBatchSampler(len(dataset), 4, 0, 1, seed=2, start_step=0, end_step=4)  # noqa: E731
    in_workers = batches(DecodingLoader(dataset, sampler(), 0, "cpu"))
    main = DecodingLoader(dataset, sampler(), 0, "cpu")
    main.in_workers, main.loader.collate_fn = False, CollateDecoded(None)
    assert_same_batches(batches(main), in_workers)
    rows = [[index for index, _, _ in batch] for batch in sampler()]
    assert all(torch.equal(attributes, dataset.attributes[r]) for (_, attributes, _), r in zip(in_workers, rows))


class RecordingCudart:
    """torch.cuda.cudart() with its host registration recorded instead of done (no GPU here)."""

    def __init__(self, error=0):
        self.registered, self.unregistered, self.error = [], [], error

    def cudaHostRegister(self, pointer, size, flags):
        self.registered.append((pointer, size, flags))
        return self.error

    def cudaHostUnregister(self, pointer):
        self.unregistered.append(pointer)
        return 0


def test_the_host_cache_for_a_gpu_pins_exactly_its_images_in_one_registration(celeba, monkeypatch):
    # the caching host allocator (pin_memory=True) would round 21.3 GB up to 34.4 GB: one plain allocation,
    # registered with CUDA, takes the images' bytes, and nothing goes through pin_memory
    import gc
    cudart = RecordingCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    real_empty = torch.empty

    def empty(*args, **kwargs):
        assert not kwargs.get("pin_memory"), "pinned through the caching host allocator"
        return real_empty(*args, **kwargs)
    monkeypatch.setattr(torch, "empty", empty)
    dataset = build_dataset(celeba, "train", 32, 3)
    decoded = DecodedCache.decode(dataset, "host", torch.device("cuda", 1), progress=False)
    images = decoded.images
    assert cudart.registered == [(images.data_ptr(), images.numel() * images.element_size(), 0)]
    assert images.numel() == len(dataset) * dataset.decoded_shape()[0] * dataset.decoded_shape()[1] * 3
    pointer = images.data_ptr()
    del decoded, images
    gc.collect()
    assert cudart.unregistered == [pointer]  # freed: unregistered (torch's CPU allocator frees it next)
    with pytest.raises(cache.DataError, match=r"cannot pin 0\.\d+ GB .*cudaHostRegister: error 2"):
        monkeypatch.setattr(torch.cuda, "cudart", lambda: RecordingCudart(error=2))
        DecodedCache.decode(dataset, "host", torch.device("cuda", 1), progress=False)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: pytest.fail("a CPU run pins nothing"))
    DecodedCache.decode(dataset, "host", torch.device("cpu"), progress=False)
