"""Run by torchrun in the DDP tests: train, then write this rank's parameters and buffers."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vaegan.cli import train_parser  # noqa: E402
from vaegan.config import config_from_args, explicitly_given  # noqa: E402
from vaegan.trainer import train  # noqa: E402

if __name__ == "__main__":
    parser = train_parser()
    argv = sys.argv[1:]
    result = train(config_from_args(parser.parse_args(argv), explicitly_given(parser, argv)))
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result.model.state_dict(), os.path.join(result.out, f"rank{rank}.pt"))
