"""Visual attribute vectors: the arithmetic, the grid, and data without attributes."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, SMALL, run_train
from datagen import make_celeba, make_folder
from vaegan.data import DataError, build_dataset
from vaegan.eval.attributes import attribute_vectors


def test_attribute_vectors_on_a_toy_latent():
    codes = torch.tensor([[3.0, 1.0], [3.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    attributes = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float32)
    vectors = attribute_vectors(codes, attributes, ["A", "B"])
    assert torch.equal(vectors["A"], torch.tensor([2.0, 0.0]))  # A moves dimension 0 by 2
    assert torch.equal(vectors["B"], torch.tensor([0.0, 1.0]))  # B moves dimension 1 by 1
    with pytest.raises(DataError, match="attribute A: the 2 encoded images are all with it"):
        attribute_vectors(codes[:2], attributes[:2], ["A", "B"])


@pytest.mark.slow
def test_attribute_grid_end_to_end_on_celeba_layout(tmp_path):
    make_celeba(tmp_path / "celeba", n=24)
    out = tmp_path / "run"
    done = run_train(SMALL + ["--data", str(tmp_path / "celeba"), "--steps", "2", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    png = tmp_path / "attributes.png"
    done = subprocess.run([sys.executable, "-m", "vaegan", "attributes", str(out), "--out", str(png),
                           "--num-test", "3"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "original, reconstruction, Male, Smiling, Young" in done.stdout  # the authors' names the data has
    width, height = Image.open(png).size
    assert (width, height) == (5 * 34 + 2, 3 * 34 + 2)  # 3 rows; original, reconstruction, 3 attributes
    done = subprocess.run([sys.executable, "-m", "vaegan", "attributes", str(out), "--out", str(png),
                           "--attributes", "Smiling,Wings"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "attributes Wings are not in the attribute file" in done.stderr


@pytest.mark.slow
def test_a_folder_with_an_attribute_file_has_attributes_and_without_is_a_clear_error(tmp_path):
    paths = make_folder(tmp_path, n=6, nested=False)
    with open(tmp_path / "list_attr_celeba.txt", "w") as f:
        f.write(f"{len(paths)}\nSmiling Male\n")
        for i, p in enumerate(paths):
            f.write(f"{os.path.basename(p)} {1 if i % 2 else -1} 1\n")
    dataset = build_dataset(str(tmp_path), "train", 32, 3)
    assert dataset.attribute_names == ["Smiling", "Male"]
    assert dataset.attributes[:, 0].tolist() == [-1, 1, -1, 1, -1, 1]

    os.remove(tmp_path / "list_attr_celeba.txt")
    out = tmp_path / "run"
    assert run_train(SMALL + ["--data", str(tmp_path), "--batch-size", "4", "--steps", "1",
                              "--out", str(out)]).returncode == 0
    done = subprocess.run([sys.executable, "-m", "vaegan", "attributes", str(out), "--out", str(tmp_path / "a.png")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "no attribute file" in done.stderr and "Traceback" not in done.stderr
