"""Visual attribute vectors (the paper's attribute-vector experiment): mean code with an attribute minus mean code without,
added to the codes of test images and decoded."""
import torch

from .. import load
from ..data import DataError, build_dataset
from ..images import save_grid
from .evaluate import evaluation_split, real_batches

# The 18 attributes of the authors' code.
AUTHORS_ATTRIBUTES = ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Bushy_Eyebrows", "Eyeglasses", "Gray_Hair",
                      "Heavy_Makeup", "High_Cheekbones", "Male", "Mustache", "Pale_Skin", "Rosy_Cheeks", "Smiling",
                      "Straight_Hair", "Wavy_Hair", "Wearing_Lipstick", "Young")


def attribute_vectors(codes, attributes, names):
    """codes (N, latent), attributes (N, A) of +-1 -> {name: mean code with it - mean code without}."""
    vectors = {}
    for column, name in enumerate(names):
        has = attributes[:, column] > 0
        if has.all() or not has.any():
            raise DataError(f"attribute {name}: the {len(codes)} encoded images are all "
                            f"{'with' if has.all() else 'without'} it; encode more images (--num-train)")
        vectors[name] = codes[has].mean(0) - codes[~has].mean(0)
    return vectors


@torch.no_grad()
def encode_all(model, dataset, n, batch_size, device):
    return torch.cat([model.encode(images.to(device))[0].cpu() for images in real_batches(dataset, n, batch_size)])


def attribute_grid(run, out_png, data=None, names=None, num_train=2000, num_test=8, batch_size=100, device="cpu"):
    """Rows: test images; columns: original, reconstruction, then one column per attribute added."""
    model = load(run, device)
    if model.encoder is None:
        raise DataError(f"a {model.kind!r} run has no encoder: attribute vectors need one")
    if model.conditional:
        raise DataError(f"a {model.kind!r} run takes its attributes as input: generate with them "
                        "(vaegan.load(run).sample(n, attributes=...)); attribute vectors are for unconditional runs")
    cfg = model.run_config
    data = data or cfg["data"]
    train = build_dataset(data, "train", cfg["image_size"], cfg["channels"])
    test = build_dataset(data, evaluation_split(data), cfg["image_size"], cfg["channels"])
    if not train.attribute_names:
        raise DataError(f"{data}: no attribute file (list_attr_celeba.txt in CelebA's format) beside the images")
    names = list(names) if names else [a for a in AUTHORS_ATTRIBUTES if a in train.attribute_names] \
        or train.attribute_names
    unknown = [a for a in names if a not in train.attribute_names]
    if unknown:
        raise DataError(f"attributes {', '.join(unknown)} are not in the attribute file "
                        f"(it has {', '.join(train.attribute_names)})")
    columns = [train.attribute_names.index(a) for a in names]
    n_train = min(num_train, len(train))
    codes = encode_all(model, train, n_train, batch_size, device)
    vectors = attribute_vectors(codes, train.attributes[:n_train, columns], names)
    originals = next(real_batches(test, min(num_test, len(test)), num_test)).to(device)
    test_codes = model.encode(originals)[0]
    rows = []
    for i in range(len(originals)):
        shifted = torch.stack([test_codes[i] + vectors[a].to(device) for a in names])
        rows.append(torch.cat([originals[i:i + 1], model.decode(test_codes[i:i + 1]), model.decode(shifted)]))
    save_grid(out_png, torch.cat(rows), columns=len(names) + 2)
    return names
