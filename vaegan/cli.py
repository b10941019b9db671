"""The `vaegan` command line; `train.py` is `vaegan train`."""
import argparse
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, add_train_arguments, config_from_args, explicitly_given, positive_int
from .data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FloatingPointError)


def train_parser(prog="vaegan train"):
    parser = argparse.ArgumentParser(prog=prog, description="Train a VAE/GAN (Larsen et al. 2016).")
    return add_train_arguments(parser)


def train_command(argv, prog="vaegan train"):
    parser = train_parser(prog)
    args = parser.parse_args(argv)
    from .trainer import train  # imported late: `--help` and bad options answer without loading torch's tensorboard
    try:
        train(config_from_args(args, explicitly_given(parser, argv)))
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def eval_command(argv, prog="vaegan eval"):
    parser = argparse.ArgumentParser(prog=prog, description="FID, KID, precision/recall and reconstruction "
                                     "errors of a trained run (the standard FID Inception network, offline).")
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--num-samples", type=positive_int("--num-samples"), default=1000,
                        help="real and generated images compared (default: 1000; about 0.2 s each on a CPU)")
    parser.add_argument("--data", default=None, help="data to compare with (default: the run's own)")
    parser.add_argument("--batch-size", type=positive_int("--batch-size"), default=50)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default: 0)")
    args = parser.parse_args(argv)
    from .eval.evaluate import evaluate, format_result
    from .eval.features import FeatureError
    try:
        result = evaluate(args.run, args.num_samples, args.data, args.batch_size, args.device, args.seed,
                          log=lambda message: print(message, file=sys.stderr))
    except USER_ERRORS + (FeatureError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0


COMMANDS = {"train": train_command, "eval": eval_command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: vaegan {{{','.join(COMMANDS)}}} [options]   (vaegan COMMAND --help for its options)")
            return 0
        print(f"usage: vaegan {{{','.join(COMMANDS)}}} [options]\nvaegan: error: "
              f"{'a command is required' if not argv else f'unknown command {argv[0]!r}'}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


def console_main():
    sys.exit(main())
