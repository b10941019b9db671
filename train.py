"""Train a VAE/GAN: `python train.py [options]`, or `torchrun --nproc_per_node=N train.py [options]`.

The same options as `vaegan train`; `python train.py --help` lists them.
"""
import sys

from vaegan.cli import train_command

if __name__ == "__main__":
    sys.exit(train_command(sys.argv[1:], prog="train.py"))
