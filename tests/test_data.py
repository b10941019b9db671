"""Data: CelebA's layout, image folders, preprocessing, the batch order, and bad input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from datagen import make_celeba, make_celeba_from_photographs, make_folder
from vaegan.data import BUILTIN, DataError, StepBatchSampler, build_dataset, make_loader


def test_celeba_split_is_train_plus_val_and_test_is_partition_2(tmp_path):
    names = make_celeba(tmp_path, n=24)
    train = build_dataset(str(tmp_path), "train", 64, 3)
    test = build_dataset(str(tmp_path), "test", 64, 3)
    assert [os.path.basename(p) for p in train.paths] == [n for i, n in enumerate(names) if i % 4 != 3]
    assert [os.path.basename(p) for p in test.paths] == [n for i, n in enumerate(names) if i % 4 == 3]
    assert train.attribute_names == ["Smiling", "Male", "Young"]
    image, attributes, unreadable = train[(1, False)]
    assert image.shape == (3, 64, 64) and unreadable == ()
    assert attributes.tolist() == [1, -1, -1]  # image 000002: bit pattern of index 1


def authors_preprocessing(path):
    """The authors' dataset/celeba.py written out with scikit-image: crop, blur, order-3 resize, 0..255."""
    from skimage import filters, transform
    array = np.asarray(Image.open(path).convert("RGB"))[40:188, 15:163]  # rows 40..188, columns 15..163
    blurred = filters.gaussian(array / 255.0, sigma=np.sqrt(148 / 64) / 2, mode="nearest", truncate=4.0,
                               channel_axis=-1)
    return (transform.resize(blurred, (64, 64, 3), order=3, mode="reflect", anti_aliasing=False) * 255).astype(np.uint8)


def laplacian_rms(image):
    a = np.asarray(image, dtype=np.float64)
    return np.sqrt(((4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]) ** 2).mean())


def test_celeba_preprocessing_is_the_authors_crop_blur_and_spline_resize_on_real_photographs(tmp_path):
    make_celeba_from_photographs(tmp_path)
    dataset = build_dataset(str(tmp_path), "train", 64, 3)
    for i, path in enumerate(dataset.paths):
        want = authors_preprocessing(path)
        image, _, _ = dataset[(i, False)]
        got = (image.permute(1, 2, 0).numpy() + 1) * 127.5
        assert np.abs(got - want).max() < 1e-3, path  # the same grey levels
        # the departure this replaced: an anti-aliased bilinear resize after the blur is visibly softer
        crop = Image.fromarray(np.asarray(Image.open(path).convert("RGB"))[40:188, 15:163])
        bilinear = crop.filter(ImageFilter.GaussianBlur(float(np.sqrt(148 / 64) / 2))).resize((64, 64), Image.BILINEAR)
        assert laplacian_rms(bilinear) < 0.8 * laplacian_rms(want)
    flipped, _, _ = dataset[(0, True)]
    assert torch.equal(flipped, dataset[(0, False)][0].flip(2))


def test_folder_is_searched_recursively_in_colour_or_grayscale(tmp_path):
    paths = make_folder(tmp_path, n=9)
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = build_dataset(str(tmp_path), "train", 32, 1)
    assert sorted(dataset.paths) == sorted(paths)
    image, attributes, _ = dataset[(0, False)]
    assert image.shape == (1, 32, 32) and attributes.numel() == 0
    assert -1 <= image.min() and image.max() <= 1


def test_builtin_faces_are_real_images():
    dataset = build_dataset(BUILTIN, "train", 32, 1)
    assert len(dataset) == 100
    images = torch.stack([dataset[(i, False)][0] for i in range(len(dataset))])
    assert images.shape == (100, 1, 32, 32)
    assert images.std() > 0.2  # not blank
    assert (images[0] - images[1]).abs().mean() > 0.05  # different faces
    rgb = build_dataset(BUILTIN, "train", 64, 3)[(0, False)][0]
    assert rgb.shape == (3, 64, 64) and torch.equal(rgb[0], rgb[1])


def test_builtin_faces_are_enlarged_bilinearly_and_say_so():
    from skimage import transform
    from skimage.data import lfw_subset
    dataset = build_dataset(BUILTIN, "train", 32, 1)
    assert "enlarged bilinearly" in dataset.name
    face = transform.resize(lfw_subset()[7], (32, 32), order=1, mode="reflect", anti_aliasing=False)
    expected = torch.from_numpy((face * 255).astype(np.uint8)).float() / 127.5 - 1
    assert torch.equal(dataset[(7, False)][0][0], expected)
    spline = transform.resize(lfw_subset()[7], (32, 32), order=3, mode="reflect", anti_aliasing=False)
    assert not torch.equal(torch.from_numpy((np.clip(spline, 0, 1) * 255).astype(np.uint8)).float() / 127.5 - 1,
                           expected)


def test_batches_are_disjoint_across_ranks_and_together_the_global_batch():
    one = list(StepBatchSampler(50, 8, 0, 1, seed=3, start_step=0, end_step=12))
    ranks = [list(StepBatchSampler(50, 4, r, 2, seed=3, start_step=0, end_step=12)) for r in range(2)]
    for step in range(12):
        a, b = ranks[0][step], ranks[1][step]
        assert not {i for i, *_ in a} & {i for i, *_ in b}
        assert a + b == one[step]  # the same images, flips and augmentation slots
    # within an epoch (6 steps of 8 out of 50 images) no image repeats
    epoch = [i for batch in one[:6] for i, *_ in batch]
    assert len(set(epoch)) == len(epoch) == 48
    assert [i for i, *_ in one[6]] != [i for i, *_ in one[0]]  # a new permutation each epoch
    flips = [f for batch in one for _, f, _ in batch]
    slots = [key for batch in one for _, _, key in batch]
    assert len(set(slots)) == len(slots) and slots[8] == (3, 1, 0)  # (seed, step, slot): one per image of the run
    assert 0.3 < sum(flips) / len(flips) < 0.7


def test_batch_order_resumes_mid_epoch_exactly():
    whole = list(StepBatchSampler(50, 8, 0, 1, seed=1, start_step=0, end_step=20))
    resumed = list(StepBatchSampler(50, 8, 0, 1, seed=1, start_step=9, end_step=20))
    assert resumed == whole[9:]
    other_seed = list(StepBatchSampler(50, 8, 0, 1, seed=2, start_step=0, end_step=20))
    assert other_seed != whole


def test_loader_with_workers_gives_the_same_batches_as_without(tmp_path):
    make_folder(tmp_path, n=12)
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    batches = []
    for workers in (0, 2):
        loader = make_loader(dataset, StepBatchSampler(len(dataset), 4, 0, 1, 0, 0, 3), workers)
        batches.append(torch.cat([images for images, _, _ in loader]))
    assert torch.equal(batches[0], batches[1])


def test_corrupt_and_truncated_images_are_skipped_and_reported(tmp_path):
    paths = make_folder(tmp_path, n=10, nested=False)
    corrupt, truncated = paths[2], paths[4]  # a JPEG and another JPEG
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    index = sorted(paths).index(corrupt)
    image, _, unreadable = dataset[(index, False)]
    assert len(unreadable) == 1 and corrupt in unreadable[0]
    assert torch.equal(image, dataset[(index + 1, False)][0])  # the next image takes its place
    _, _, unreadable = dataset[(sorted(paths).index(truncated), False)]
    assert len(unreadable) == 1 and truncated in unreadable[0]


@pytest.mark.parametrize("make_bad,message", [
    (lambda root: None, "no such directory"),
    (lambda root: os.makedirs(root), "no JPEG or PNG images found"),
    (lambda root: open(root, "w").close(), "not a directory"),
])
def test_missing_empty_or_non_directory_data_is_a_clear_error(tmp_path, make_bad, message):
    root = str(tmp_path / "data")
    make_bad(root)
    with pytest.raises(DataError, match=message) as e:
        build_dataset(root, "train", 64, 3)
    assert root in str(e.value)


def rewrite_line(path, number, text):
    lines = open(path).read().splitlines()
    lines[number - 1] = text
    open(path, "w").write("\n".join(lines) + "\n")


@pytest.mark.parametrize("file,line,text,message", [
    ("list_attr_celeba.txt", 1, "many", "line 1: expected the number of images"),
    ("list_attr_celeba.txt", 4, "000002.jpg 1 -1", "line 4: expected a file name and 3 values, got 3 fields"),
    ("list_attr_celeba.txt", 5, "000003.jpg 1 0 1", "line 5: attribute values must be 1 or -1"),
    ("list_attr_celeba.txt", 1, "99", "announces 99 images"),
    ("list_eval_partition.txt", 2, "000002.jpg train", "line 2: expected 'FILE 0|1|2'"),
])
def test_malformed_celeba_files_are_clear_errors_naming_file_and_line(tmp_path, file, line, text, message):
    make_celeba(tmp_path, n=8)
    rewrite_line(tmp_path / file, line, text)
    with pytest.raises(DataError, match=message) as e:
        build_dataset(str(tmp_path), "train", 64, 3)
    assert file in str(e.value)


def test_celeba_missing_partition_file_or_image_is_a_clear_error(tmp_path):
    make_celeba(tmp_path, n=8)
    os.remove(tmp_path / "img_align_celeba" / "000002.jpg")
    with pytest.raises(DataError, match="000002.jpg: listed in list_eval_partition.txt but missing"):
        build_dataset(str(tmp_path), "train", 64, 3)
    os.remove(tmp_path / "list_eval_partition.txt")
    with pytest.raises(DataError, match="list_eval_partition.txt: missing"):
        build_dataset(str(tmp_path), "train", 64, 3)


def test_celeba_images_of_the_wrong_size_are_a_clear_error(tmp_path):
    make_celeba(tmp_path, n=4, size=(100, 120))
    with pytest.raises(DataError, match="000001.jpg: is 100x120, not the 178x218 of aligned CelebA"):
        build_dataset(str(tmp_path), "train", 64, 3)


def test_unsupported_sizes_and_channels_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="image size 128 is not supported"):
        build_dataset(BUILTIN, "train", 128, 3)
    with pytest.raises(DataError, match="channels must be 1 or 3, not 2"):
        build_dataset(BUILTIN, "train", 32, 2)


def test_fewer_images_than_a_global_batch_is_a_clear_error():
    with pytest.raises(DataError, match="the data has 10 images, fewer than one global batch"):
        StepBatchSampler(10, 8, 0, 2, 0, 0, 5)
