"""The eager step on a CPU in fp32/bf16 x contiguous/channels-last, in images per second (median of
5 steps after 2), for the paper's 64 px networks and for the small test configuration; each
format timed in the same run. `python bench/cpu_formats.py` prints a table; the README quotes it."""
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vaegan import options, trainer  # noqa: E402
from vaegan.config import TrainConfig  # noqa: E402

CONFIGS = {"64 px, paper networks, batch 16": dict(image_size=64, channels=3, width=1.0, latent=128, fc=1024, batch=16),
           "32 px grey, quarter width, batch 16": dict(image_size=32, channels=1, width=0.25, latent=16, fc=64, batch=16),
           "the built-in demo (32 px grey, full width, batch 32)": dict(image_size=32, channels=1, width=1.0, latent=128,
                                                                      fc=1024, batch=32)}
FORMATS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def img_per_s(c, precision, channels_last):
    torch.manual_seed(0)
    cfg = TrainConfig(data="generated", image_size=c["image_size"], channels=c["channels"], width=c["width"],
                      latent_size=c["latent"], fc_width=c["fc"], batch_size=c["batch"], steps=7, gamma=1e-6,
                      lr_schedule="constant", augment="none", device="cpu", out="unused", precision=precision,
                      memory_format="channels-last" if channels_last else "contiguous")
    cfg, _ = options.resolve(cfg, torch.device("cpu"))
    _, _, train_step = trainer.build_step(cfg, torch.device("cpu"))
    x = torch.rand(c["batch"], c["channels"], c["image_size"], c["image_size"]) * 2 - 1
    times = []
    for i in range(7):
        start = time.perf_counter()
        train_step(x, None, i)
        times.append(time.perf_counter() - start)
    return c["batch"] / sorted(times[2:])[2]


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    only = sys.argv[1:]  # names' first words to run, e.g. "the" for the demo; default: all
    for name, c in CONFIGS.items():
        if only and name.split()[0] not in only:
            continue
        rates = {f"{p} {'channels-last' if cl else 'contiguous'}": img_per_s(c, p, cl) for p, cl in FORMATS}
        base = rates["fp32 contiguous"]
        print(name + ": " + ", ".join(f"{k} {v:.1f} img/s ({v / base:.2f}x)" for k, v in rates.items()))
