"""The `vaegan` command line; `train.py` is `vaegan train`."""
import argparse
import os
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, add_train_arguments, config_from_args, explicitly_given, number, positive_int
from .models import SUPPORTED_IMAGE_SIZES
from .data import DataError
from .eval.features import FeatureError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FeatureError, FloatingPointError)


def reporting_errors(prog, action):
    """Run action(); a user's error (bad value, data, checkpoint) is one line on stderr and status 2."""
    try:
        action()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def log_to_stderr(message):
    print(message, file=sys.stderr)


def train_parser(prog="vaegan train"):
    parser = argparse.ArgumentParser(prog=prog, description="Train a VAE/GAN (Larsen et al. 2016).")
    return add_train_arguments(parser)


def train_command(argv, prog="vaegan train"):
    parser = train_parser(prog)
    args = parser.parse_args(argv)
    from .trainer import train  # imported late: `--help` and bad options answer without loading torch's tensorboard
    return reporting_errors(prog, lambda: train(config_from_args(args, explicitly_given(parser, argv))))


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
    return reporting_errors(prog, lambda: print(format_result(evaluate(
        args.run, args.num_samples, args.data, args.batch_size, args.device, args.seed, log=log_to_stderr))))


def attributes_command(argv, prog="vaegan attributes"):
    parser = argparse.ArgumentParser(prog=prog, description="Visual attribute vectors: mean code of training "
                                     "images with an attribute minus mean code of those without, added to test codes.")
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--out", required=True, help="PNG to write (rows: test images; columns: original, "
                        "reconstruction, one per attribute)")
    parser.add_argument("--attributes", default=None,
                        help="comma-separated names (default: the authors' 18 that the data has, else all)")
    parser.add_argument("--data", default=None, help="data with an attribute file (default: the run's own)")
    parser.add_argument("--num-train", type=positive_int("--num-train"), default=2000,
                        help="training images encoded for the vectors (default: 2000)")
    parser.add_argument("--num-test", type=positive_int("--num-test"), default=8, help="test images (rows; default: 8)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from .eval.attributes import attribute_grid

    def run():
        names = attribute_grid(args.run, args.out, args.data, args.attributes.split(",") if args.attributes else None,
                               args.num_train, args.num_test, device=args.device)
        print(f"wrote {args.out}: columns original, reconstruction, {', '.join(names)}")
    return reporting_errors(prog, run)


def compare_command(argv, prog="vaegan compare"):
    parser = argparse.ArgumentParser(prog=prog, description="Samples and reconstructions of several runs side by "
                                     "side (the paper's first CelebA figure) and a markdown table of their metrics.")
    parser.add_argument("runs", nargs="+", help="run directories (e.g. vae, gan, vae-disl, vaegan runs)")
    parser.add_argument("--out", required=True, help="directory for comparison.png and comparison.md")
    parser.add_argument("--num-samples", type=positive_int("--num-samples"), default=1000,
                        help="images per FID/KID/precision/recall (default: 1000)")
    parser.add_argument("--num-images", type=positive_int("--num-images"), default=8, help="columns of the figure")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from .eval.compare import compare

    def run():
        compare(args.runs, args.out, args.num_samples, args.num_images, args.device, log=log_to_stderr)
        print(open(os.path.join(args.out, "comparison.md")).read())
    return reporting_errors(prog, run)


def regressor_command(argv, prog="vaegan regressor"):
    parser = argparse.ArgumentParser(prog=prog, description="Train the attribute regressor that scores conditional "
                                     "generation (a small CNN reading attributes off real images); prints its "
                                     "held-out accuracy.")
    parser.add_argument("--data", required=True, help="CelebA root or a folder with list_attr_celeba.txt (CelebA's "
                        "format); held out: CelebA's test partition, else every 10th image")
    parser.add_argument("--out", required=True, help="file to write (e.g. regressor.pt)")
    parser.add_argument("--attributes", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--image-size", type=int, choices=SUPPORTED_IMAGE_SIZES, default=64,
                        help="as the runs it will score (default: 64)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="as the runs it will score (default: 3)")
    parser.add_argument("--epochs", type=positive_int("--epochs"), default=5, help="default: 5")
    parser.add_argument("--batch-size", type=positive_int("--batch-size"), default=64)
    parser.add_argument("--lr", type=number("--lr"), default=1e-3, help="Adam, cosine-annealed (default: 1e-3)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .eval.regressor import format_regressor_summary, train_regressor

    def run():
        summary = train_regressor(args.data, args.out, args.image_size, args.channels,
                                  args.attributes.split(",") if args.attributes else None, args.epochs,
                                  args.batch_size, args.lr, args.workers, args.device, args.seed, log=log_to_stderr)
        print(f"wrote {args.out}: {format_regressor_summary(summary)}")
    return reporting_errors(prog, run)


def attribute_scores_command(argv, prog="vaegan attribute-scores"):
    parser = argparse.ArgumentParser(prog=prog, description="The paper's Table 1: cosine similarity and mean squared "
                                     "error between the attributes conditional runs generate from and those the "
                                     "regressor reads off their images, beside the real held-out images.")
    parser.add_argument("runs", nargs="+", help="conditional run directories (cvae, cgan, cvaegan)")
    parser.add_argument("--regressor", required=True, help="written by `vaegan regressor`")
    parser.add_argument("--out", required=True, help="directory for attribute_scores.md and attribute_scores.json")
    parser.add_argument("--num-samples", type=positive_int("--num-samples"), default=1000,
                        help="held-out attribute vectors (default: 1000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images' z (default: 0)")
    args = parser.parse_args(argv)
    from .eval.regressor import attribute_scores

    def run():
        attribute_scores(args.runs, args.regressor, args.out, args.num_samples, device=args.device, seed=args.seed,
                         log=log_to_stderr)
        print(open(os.path.join(args.out, "attribute_scores.md")).read())
    return reporting_errors(prog, run)


COMMANDS = {"train": train_command, "eval": eval_command, "attributes": attributes_command,
            "compare": compare_command, "regressor": regressor_command, "attribute-scores": attribute_scores_command}


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
