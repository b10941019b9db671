"""The batched torch preprocessing (vaegan/data/device_preprocess.py) against the per-image CPU path
(vaegan/data/preprocess.py, augment.py, and the loader's flip), on real photographs."""
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data, transform

from datagen import make_celeba_from_photographs
from vaegan.data import augment, build_dataset
from vaegan.data import device_preprocess as dp

PLACES = [(0, 0, 0), (0, 0, 1), (0, 7, 5), (3, 120, 2), (11, 4, 63), (5, 99_999, 17)]


def photograph():
    return data.astronaut()[:218, 100:278] / 255.0  # a face-sized 178x218 crop


def grey_levels(batch):
    """[-1, 1] -> 0..255, exact for images that came from uint8."""
    return (batch.double() + 1.0) * 127.5


@pytest.mark.parametrize("channels, augmented, celeba", [(3, True, True), (3, False, True), (1, True, True),
                                                         (1, False, True), (3, True, False)])
def test_the_batch_is_the_loaders_per_image_output(tmp_path, channels, augmented, celeba):
    """Each item of the DataLoader path (decode, preprocess.preprocess with the drawn augmentation,
    to_tensor with its flip) against preprocess_batch on the same decoded images, in float32.
    Measured at 64 px on these photographs: a value in 25,000 or fewer differs, by one grey level (a
    truncation to uint8 landing on the other side). The mean and 99th-percentile bounds catch gross
    errors (a missed flip, crop or colour step); the bound on the share of differing values catches
    the subtle ones: Keys' a = -0.75 in the warp passes the first two (mean 0.24, 99th percentile 2)
    but changes a fifth of the values."""
    make_celeba_from_photographs(tmp_path, per_photograph=2)
    root = str(tmp_path if celeba else tmp_path / "img_align_celeba")  # a plain folder: the centred square
    dataset = build_dataset(root, "train", 64, channels)
    dataset.augment = augmented
    places = [PLACES[i % len(PLACES)] for i in range(len(dataset))]
    flips = [i % 2 == 1 for i in range(len(dataset))]
    want = torch.stack([dataset[(i, flip, place)][0] for i, (flip, place) in enumerate(zip(flips, places))])
    decoded = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in dataset.paths])
    got = dp.preprocess_batch(decoded, 64, channels, celeba, dp.draw_batch(places) if augmented else None,
                              torch.tensor(flips))
    assert got.shape == want.shape == (len(dataset), channels, 64, 64) and got.dtype == torch.float32
    difference = (grey_levels(got) - grey_levels(want)).abs()
    assert difference.mean() < 0.5 and torch.quantile(difference.flatten(), 0.99) <= 3, \
        (difference.mean(), difference.max())
    assert (difference > 0.5).double().mean() < 1e-3 and difference.max() <= 1
    assert grey_levels(got).sub(grey_levels(got).round()).abs().max() < 1e-3  # whole grey levels, as the loader


def test_uint8_result_is_preprocess_on_each_image():
    """preprocess_uint8 against preprocess.preprocess(PIL image), image by image, in float64 and
    float32: at most one grey level apart, and in at most one value in 1,000 (measured: none in
    float64, about one in 25,000 in float32)."""
    from vaegan.data.preprocess import preprocess
    image = (photograph() * 255).astype(np.uint8)
    images = torch.from_numpy(np.stack([image, image[:, ::-1].copy()]))
    places = PLACES[:2]
    want = np.stack([preprocess(Image.fromarray(im), 64, 3, celeba=True, augmentation=augment.draw(*place))
                     for im, place in zip(images.numpy(), places)])
    for dtype in (torch.float64, torch.float32):
        got = dp.preprocess_uint8(images, 64, 3, True, dp.draw_batch(places), dtype=dtype)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        difference = np.abs(got.numpy().astype(int) - want.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, dtype


def test_warp_is_scikit_images_bicubic_and_not_torchs():
    """scikit-image's warp(order=3, mode="edge") for a SimilarityTransform is its own Catmull-Rom
    bicubic (Keys, a = -0.5), not scipy's spline. Measured on a real photograph in [0, 1]: 2e-14 in
    float64 (rounding), 6e-6 in float32 (the float32 coordinates: 218 * 6e-8 px times the image's
    slope); bounds 1e-12 and 2e-5. Keys' a = -0.75 (grid_sample's bicubic) is off by about 0.04
    (10 grey levels) at edges, so either would fail."""
    image = photograph()
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    for place in PLACES[:3]:
        a = augment.draw(*place)
        want = transform.warp(image, augment.inverse_map(a, image.shape), order=3, mode="edge")
        matrices = dp.inverse_maps(dp.draw_batch([place]), image.shape[:2])
        assert np.abs(matrices[0].numpy() - augment.inverse_map(a, image.shape).params[:2]).max() < 1e-12

        def error(images, **kwargs):
            got = dp.warp(images, matrices, **kwargs)[0].permute(1, 2, 0).double().numpy()
            return np.abs(got - want).max()
        assert error(x) < 1e-12
        assert error(x.float()) < 2e-5
        assert error(x, a=-0.75) > 0.01

        # grid_sample with the same sampling points: its a = -0.75 kernel fails the same bound
        rows, columns = np.mgrid[:image.shape[0], :image.shape[1]]
        points = matrices[0].numpy() @ np.stack([columns.ravel(), rows.ravel(), np.ones(rows.size)])
        grid = torch.from_numpy(np.stack([points[0] / (image.shape[1] - 1), points[1] / (image.shape[0] - 1)], -1))
        grid = (grid * 2 - 1).reshape(1, *image.shape[:2], 2)
        sampled = torch.nn.functional.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=True)
        assert np.abs(sampled[0].permute(1, 2, 0).numpy().clip(image.min(), image.max()) - want).max() > 0.01


def test_colour_is_augment_colour():
    """To rounding (1e-12): a wrong sextant formula, a power on the hue or the RGB path on grey fails."""
    image = np.clip(photograph(), 0, 1)
    for place in PLACES[:3]:
        augmentation = dp.draw_batch([place])
        got = dp.colour(torch.from_numpy(image).permute(2, 0, 1)[None], augmentation)[0].permute(1, 2, 0)
        assert np.abs(got.numpy() - augment.colour(image, augment.draw(*place))).max() < 1e-12
        grey = image[..., :1]
        got = dp.colour(torch.from_numpy(grey).permute(2, 0, 1)[None], augmentation)[0].permute(1, 2, 0)
        assert np.abs(got.numpy() - augment.colour(grey, augment.draw(*place))).max() < 1e-12


def test_drawn_parameters_are_augment_draws_exactly():
    """Resume stays exact: the batch's values are the very doubles augment.draw gives each slot (a
    float32 tensor, or another generator or order of draws, would fail the equality)."""
    places = PLACES + [(0, step, slot) for step in range(3) for slot in range(8)]
    drawn = dp.draw_batch(places)
    for i, place in enumerate(places):
        a = augment.draw(*place)
        assert tuple(drawn["translation"][i].tolist()) == a.translation
        for name in ("scale", "rotation", "gamma", "contrast", "hue"):
            assert drawn[name][i].item() == getattr(a, name), name
    assert not torch.equal(drawn["scale"][:1], dp.draw_batch([(0, 0, 2)])["scale"])


def test_a_loaders_batch_is_drawn_from_its_first_slot_as_each_slot_alone():
    """A loader's batch (one (seed, step), consecutive slots) is drawn on the device from its first slot
    (nothing copied from the host); the values are those of the slots drawn one by one."""
    places = [(9, 41, 12 + j) for j in range(5)]
    whole = dp.draw_batch(places)
    for j, place in enumerate(places):
        alone = dp.draw_batch([place])
        for name in dp.AUGMENTATION_FIELDS:
            assert torch.equal(whole[name][j], alone[name][0]), name
    shuffled = dp.draw_batch(places[::-1])  # not consecutive: drawn slot by slot, the same values
    assert torch.equal(shuffled["scale"], whole["scale"].flip(0))
    meta = dp.draw_batch(places, torch.device("meta"))
    assert all(value.device.type == "meta" for value in meta.values())


def test_the_low_pass_and_resize_matrices_are_built_once_per_shape_and_device():
    first = dp.lowpass_resize_matrices(148, 64, torch.device("cpu"), torch.float32)
    assert dp.lowpass_resize_matrices(148, 64, torch.device("cpu"), torch.float32) is first
    assert first[0].shape == (148, 148) and first[1].shape == (64, 148)
    assert dp.lowpass_resize_matrices(32, 64, torch.device("cpu"), torch.float32)[0] is None  # enlarged: no blur
    image = torch.rand(1, 3, 148, 148)  # lowpass_resize uses these very matrices
    blur, resize = first
    want = torch.floor((resize @ (blur @ image @ blur.T) @ resize.T).clamp(image.amin(), image.amax()) * 255)
    assert torch.equal(dp.lowpass_resize(image, 64), want)
