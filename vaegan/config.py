"""Every option of a training run, declared once: its name, type, default, choices, help, --help group
and what a resume does with it. `train.py --help`, docs/options.md, config.json and vaegan/options.py
(which resolves and checks them) all read these declarations.

Regenerate docs/options.md with `python -m vaegan.config > docs/options.md`.
"""
import argparse
import os
import time
from dataclasses import asdict, dataclass, field, fields

from .data.datasets import BUILTIN
from .schedule import AUTHORS_LR, SCHEDULES
from .models import MODEL_KINDS, SUPPORTED_IMAGE_SIZES, UP_CONVS

DEFAULT_STEPS_REAL_DATA = 62_500  # the authors' 250 "epochs" of 250 batches
# The built-in faces are a demonstration that must show faces after a few minutes on two CPU
# cores: 150 steps of 32 images, and a decoder weighted towards reconstruction (gamma 1e-3;
# at the paper's 1e-6 the decoder learns mostly from the GAN term and needs far longer).
# Over 150 steps the authors' annealing leaves too few steps at a useful rate: the preset keeps it constant.
# The decoder upsamples by resizing, then convolving: after 150 steps, transposed convolutions (the previous
# preset's, drawn with fan C_in*k*k) left a 2 and 4 px grid of 4-75x the faces' own in the demo's last grids
# (bench/results/cpu-20261205-demo-variants.txt, rows `preset`); resizing leaves 0.7-2.5x
# (bench/results/demo-faces/results.md).
BUILTIN_PRESET = {"image_size": 32, "channels": 1, "steps": 150, "batch_size": 32, "gamma": 1e-3,
                  "lr_schedule": "constant", "augment": "flip", "up_conv": "resize"}
REAL_DATA_DEFAULTS = {"image_size": 64, "channels": 3, "steps": DEFAULT_STEPS_REAL_DATA, "batch_size": 64,
                      "lr_schedule": "authors", "augment": "authors", "up_conv": "transposed"}
# gamma by image size, the authors' per script at their commit 24aa0f2: 1e-6 at 64 px (celeba_aegan.py), 1e-5 at
# 32 px (cifar_aegan.py). On the digits at 32 px and batch 16, 1e-6 let the decoder collapse to one image early
# in 2 of 7 seeds and 1e-5 in none (docs/training.md#collapse-at-small-batches).
AUTHORS_GAMMA = {64: 1e-6, 32: 1e-5}

GROUPS = ("data", "model", "training", "run and monitoring", "speed and levers", "distributed")

# What a resume does with an option:
FIXED = "fixed"          # a fact of the run: taken from the checkpoint, an error if given otherwise
KEPT = "kept"            # a fact of the run or of its records: taken from the checkpoint unless given again
MACHINE = "machine"      # decides only the speed on this machine: chosen again on each start, never saved
ON_RESUME = {FIXED: "kept; cannot change", KEPT: "kept unless given again", MACHINE: "chosen again on each start"}


def default_workers():
    """The CPU cores this process may use, shared among the processes torchrun starts on the node (1..16)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


class ConfigError(ValueError):
    pass


def integer(name, minimum):
    """An argparse type: an integer >= minimum, with an error naming the option."""
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes {wanted}, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} takes {wanted}, not {value}")
        return value
    parse.__name__ = wanted.split(" ", 1)[1]
    return parse


def positive_int(name):
    return integer(name, 1)


def non_negative_int(name):
    return integer(name, 0)


def number(name, minimum=0.0, inclusive=False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a number, not {text!r}") from None
        if not (value >= minimum if inclusive else value > minimum) or value != value or value == float("inf"):
            bound = f">= {minimum}" if inclusive else f"> {minimum}"
            raise argparse.ArgumentTypeError(f"{name} takes a finite number {bound}, not {text}")
        return value
    parse.__name__ = f"number {'>=' if inclusive else '>'} {minimum:g}"
    return parse


def option(default, group, help, *, shown_default=None, choices=None, parse=None, flag=None, switch=None,
           metavar=None, resume=FIXED):
    """A TrainConfig field and its command-line option.

    group: its section of --help (GROUPS); help: what it does, without the default, which --help adds
    (`shown_default`, or the default itself); parse: the value's parser (positive_int("--x"), number(...),
    int) when not a string; switch: "on" (--x sets True), "off" (`flag`, e.g. --no-x, sets False) or
    "both" (--x / --no-x); resume: FIXED, KEPT or MACHINE."""
    return field(default=default, metadata={"group": group, "help": help, "shown_default": shown_default,
                                             "choices": choices, "parse": parse, "flag": flag, "switch": switch,
                                             "metavar": metavar, "resume": resume})


@dataclass
class TrainConfig:
    # data
    data: str = option(
        BUILTIN, "data", f"CelebA root (holds img_align_celeba/), any folder of JPEG/PNG images (recursive), or "
        f"{BUILTIN}: the 100 LFW face crops shipped in scikit-image", metavar="DIR")
    image_size: int = option(
        None, "data", "image side in pixels", shown_default="32 for the built-in faces, else 64",
        choices=SUPPORTED_IMAGE_SIZES, parse=int)
    channels: int = option(
        None, "data", "1 (grayscale) or 3", shown_default="1 for the built-in faces, else 3", choices=(1, 3), parse=int)
    augment: str = option(
        None, "data", "authors: the authors' augmentation of each image file before the crop (translation sigma "
        "2 px, scale and rotation sigma 0.01, gamma and contrast sigma 0.05, hue sigma 0.01; drawn from seed, step "
        "and slot) and flips, in either loader; flip: horizontal flips only; none: nothing",
        shown_default="authors; flip on the built-in faces, which are held already cropped",
        choices=("authors", "flip", "none"))
    flip: bool = option(True, "data", "no random horizontal flips", flag="--no-flip", switch="off")
    # model
    model: str = option(
        "vaegan", "model", "vaegan: the full model; vae: pixel-space VAE; gan: plain GAN; vae-disl: VAE with the "
        "learned metric and no GAN gradient into the decoder; cvaegan, cvae, cgan: the attribute-conditional "
        "models (y appended to z for the decoder, as constant image channels for encoder and discriminator; the "
        "data needs an attribute file)", choices=MODEL_KINDS)
    attributes: str = option(
        None, "model", "conditional models: comma-separated attribute names to condition on",
        shown_default="every attribute of the data's list_attr_celeba.txt", metavar="NAMES")
    latent_size: int = option(128, "model", "size of z", parse=positive_int("--latent-size"))
    fc_width: int = option(1024, "model", "encoder FC width", shown_default="1024, the authors' code; the paper's "
                           "table: 2048", parse=positive_int("--fc-width"))
    width: float = option(
        1.0, "model", "channel-width multiplier of every convolution and of the discriminator's FC layer "
        "(bench/learning.py uses 0.25 to learn on a CPU)",
        shown_default="1, the paper's networks", parse=number("--width"))
    up_conv: str = option(
        None, "model", "how each decoder stage doubles the image: transposed, the authors' 5x5 stride-2 transposed "
        "convolution; resize, nearest-neighbour upsampling then a 3x3 convolution (no uneven overlap, so no checkerboard of its own)",
        shown_default="transposed; resize on the built-in faces", choices=tuple(UP_CONVS))
    # training
    batch_size: int = option(
        None, "training", "images per process and step", shown_default="64, the paper's; 32 on the built-in faces",
        parse=positive_int("--batch-size"))
    steps: int = option(
        None, "training", "total training steps; a resumed run may be given more",
        shown_default=f"{DEFAULT_STEPS_REAL_DATA}, the authors'; {BUILTIN_PRESET['steps']} on the built-in faces",
        parse=positive_int("--steps"), resume=KEPT)
    lr: float = option(
        AUTHORS_LR, "training", "learning rate at the start, whatever the global batch (a global batch of 512 "
        "starts at it too: RMSProp divides by the gradients' RMS, so the rate is the step's size, and the authors' "
        "'/ batch size' turned their batch-sum loss into the per-step size they tuned at 64; taken literally at 512 "
        "it would step 8x smaller)", shown_default="0.025/64 = 3.9e-4, the authors' at their batch of 64",
        parse=number("--lr"))
    lr_schedule: str = option(
        None, "training", "authors: annealed as in the authors' code, lr * (1 - (e/250)^0.75 * (1 - 4e-4)) in 250 "
        "equal pieces of --lr-schedule-steps (3.9e-4 to 1.3e-6 at the default lr); constant: lr throughout",
        shown_default="authors; constant on the built-in faces", choices=SCHEDULES)
    lr_schedule_steps: int = option(
        None, "training", "the steps the schedule spans; fixed for the run's life: a resumed run with more --steps "
        "keeps its schedule and continues at its last rate", shown_default="--steps at the run's start",
        parse=positive_int("--lr-schedule-steps"))
    optimizer: str = option("rmsprop", "training", "rmsprop (alpha 0.9, eps 1e-8, the paper's) or adam (betas 0.5, "
                            "0.999)", choices=("rmsprop", "adam"))
    weight_decay: float = option(
        1e-5, "training", "lambda of DeepPy's weight decay, as in the authors' code: 2 * lambda * w added to the "
        "gradient of the batch-sum loss, i.e. coupled L2 of 2 * lambda / (global batch) on our batch-mean losses; "
        "on every conv/linear weight but the mu/logvar heads'", shown_default="1e-5, the authors'",
        parse=number("--weight-decay", inclusive=True))
    gamma: float = option(
        None, "training", "weight of L_llike in the decoder's loss, on the per-image feature sum",
        shown_default="the authors': 1e-6 at 64 px, 1e-5 at 32 px; 1e-3 on the built-in faces", parse=number("--gamma"))
    real_weight: float = option(0.5, "training", "weight of -log Dis(x) in the discriminator loss",
                                parse=number("--real-weight", inclusive=True))
    fake_weight: float = option(0.5, "training", "weight of -log(1-Dis(fake)) in the discriminator loss",
                                parse=number("--fake-weight", inclusive=True))
    decoder_gan_loss: str = option("minimax", "training", "the decoder's adversarial term: minimax (the authors' "
                                   "reversed gradient) or -log Dis(x_p)", choices=("minimax", "non-saturating"))
    gan_loss_form: str = option("logits", "training", "log-losses from logits (stable) or the authors' "
                                "log(p + 1e-3)", choices=("logits", "eps"))
    dis_sees_recon: bool = option(False, "training", "also show reconstructions to the discriminator as fakes (the "
                                  "paper's Algorithm 1; vaegan only)", switch="on")
    equilibrium: bool = option(True, "training", "always update decoder and discriminator (default: the authors' "
                               "equilibrium rule)", flag="--no-equilibrium", switch="off")
    equilibrium_value: float = option(0.68, "training", "centre of the equilibrium rule",
                                      parse=number("--equilibrium-value"))
    margin: float = option(0.35, "training", "margin of the equilibrium rule", parse=number("--margin", inclusive=True))
    seed: int = option(0, "training", "seed of initialisation, data order, augmentation, flips and noise", parse=int)
    precision: str = option(
        "auto", "training", "fp32, bf16 autocast, or fp64 (slow; for checking numerics); decided at the run's start "
        "and kept", shown_default="auto: bf16 on CUDA devices that support it and on CPUs with bf16 instructions "
        "(bench/results/cpu-20261202-formats.txt), fp32 elsewhere", choices=("auto", "fp32", "bf16", "fp64"))
    kernels: str = option(
        "auto", "training", "loss implementation: the fused Triton kernels or the PyTorch reference losses (the same "
        "losses, other rounding); decided at the run's start and kept unless given again",
        shown_default="auto: triton on CUDA, torch elsewhere; on a CPU triton needs TRITON_INTERPRET=1",
        choices=("auto", "torch", "triton"), resume=KEPT)
    # run and monitoring
    device: str = option("auto", "run and monitoring", "auto, cpu, cuda or cuda:N",
                         shown_default="auto: cuda if available", resume=MACHINE)
    out: str = option(None, "run and monitoring", "run directory", shown_default="runs/MODEL-TIMESTAMP; on resume "
                      "the resumed directory", metavar="DIR", resume=KEPT)
    resume: str = option(None, "run and monitoring", "continue the run in DIR exactly where its checkpoint stopped",
                         shown_default="none", metavar="DIR", resume=KEPT)
    log_every: int = option(10, "run and monitoring", "steps between metrics lines", parse=positive_int("--log-every"),
                            resume=KEPT)
    sample_every: int = option(100, "run and monitoring", "steps between sample/reconstruction grids",
                               parse=positive_int("--sample-every"), resume=KEPT)
    checkpoint_every: int = option(None, "run and monitoring", "steps between rewrites of checkpoint.pt, besides "
                                   "--checkpoint-minutes", shown_default="none",
                                   parse=positive_int("--checkpoint-every"), resume=KEPT)
    checkpoint_minutes: float = option(
        10.0, "run and monitoring", "minutes between rewrites of checkpoint.pt, decided at log steps, the same on "
        "every process; 0: by --checkpoint-every only. The run's end, a stop (SIGTERM) and --keep-every also write "
        "one; the write runs on a background thread", shown_default="10",
        parse=number("--checkpoint-minutes", inclusive=True), resume=KEPT)
    keep_every: int = option(5000, "run and monitoring", "steps between kept checkpoint-STEP.pt files",
                             parse=positive_int("--keep-every"), resume=KEPT)
    collapse_check_every: int = option(
        100, "run and monitoring",
        "steps between checks of the reconstructions of a fixed batch of the data (and one before each "
        "checkpoint): their error relative to the mean image's is logged as recon_check, and one that rises "
        "above 1 and twice its best so far is reported as a collapse, with the last good checkpoint; 0: no checks",
        parse=non_negative_int("--collapse-check-every"), resume=KEPT)
    # speed and levers: the same results (to rounding) on any choice
    loader: str = option(
        "auto", "speed and levers", "image loading: NVIDIA DALI (GPU decoding; on a CPU its CPU operators) or PIL "
        "DataLoader workers", shown_default="auto: dali on CUDA for image files, pil elsewhere",
        choices=("auto", "pil", "dali"), resume=MACHINE)
    workers: int = option(
        None, "speed and levers", "DataLoader worker processes (or decoding threads of --data-cache) for image files",
        shown_default="the CPU cores this process may use, divided among the processes on the node, at most 16; "
        "0 for the built-in faces, held in memory", parse=int, resume=MACHINE)
    data_cache: str = option(
        "auto", "speed and levers", "decode every image file once, at the start, into one uint8 tensor on the GPU "
        "(gpu) or in host memory (host), and preprocess each step's batch from it on the device; none: decode each "
        "batch in the loader. An explicit gpu or host that cannot hold them fails, with the sizes",
        shown_default="auto: on CUDA gpu where the decoded images take at most half the GPU's free memory, else "
        "host where they take at most half the host's available memory, else none; none on CPUs and with an "
        "explicit --loader", choices=("auto", "gpu", "host", "none"), resume=MACHINE)
    compile: bool = option(
        None, "speed and levers", "torch.compile the step: the forward with its routed backward, and each optimizer "
        "step", shown_default="on with CUDA, where a step that fails to compile runs eager and the start lines say "
        "why; off on CPUs, where compiling takes longer than the demo's training", switch="both", resume=MACHINE)
    cuda_graphs: bool = option(
        None, "speed and levers", "with --compile on CUDA: capture the compiled step in CUDA graphs (mode "
        "reduce-overhead)", shown_default="on when the step is compiled on CUDA, except with --sync-bn across "
        "processes", switch="both", resume=MACHINE)
    compile_backend: str = option("inductor", "speed and levers", "torch.compile backend: inductor (generates "
                                  "kernels) or aot_eager (traces only; for debugging)",
                                  choices=("inductor", "aot_eager"), resume=MACHINE)
    max_autotune: bool = option(
        False, "speed and levers", "with --compile (inductor): let inductor time alternative kernels for each matrix "
        "product and convolution (mode max-autotune, or max-autotune-no-cudagraphs with --no-cuda-graphs); "
        "compiling takes minutes longer", shown_default="off", switch="both", resume=MACHINE)
    memory_format: str = option(
        "auto", "speed and levers", "layout of images and convolution weights",
        shown_default="auto: channels-last; on a CPU bench/results/cpu-20261202-formats.txt measures its step at "
        "0.85x (the built-in demo in fp32) to 1.26x the contiguous one's", choices=("auto", "channels-last",
                                                                                   "contiguous"), resume=MACHINE)
    optimizer_impl: str = option(
        "auto", "speed and levers", "the optimizers' implementation: torch's for-loop or foreach (multi-tensor) "
        "kernels, or fused: torch's fused Adam, or for rmsprop our Triton kernel (one per parameter, reading nothing "
        "but the keep flag of a skipped step; CUDA, or Triton's interpreter on a CPU); apex: refused, with the reason",
        shown_default="auto: fused for adam on CUDA, else foreach",
        choices=("auto", "for-loop", "foreach", "fused", "apex"), resume=MACHINE)
    pad_channels: bool = option(
        False, "speed and levers", "compute the convolutions whose channel counts are not multiples of 8 (the "
        "encoder's and discriminator's first, with the image's 3 channels and a conditional model's attributes, "
        "and the decoder's last) with channels of zeros up to a multiple of 8, a count tensor cores take; the same "
        "values", shown_default="off", switch="both", resume=MACHINE)
    decoder_call: str = option(
        "separate", "speed and levers", "the decoder's two passes (on the reconstructions' codes and on the prior "
        "codes): separate calls, or one joint call over both with each BatchNorm normalising each half with its "
        "own statistics and each weight's gradient taken per half, as separate calls do",
        choices=("separate", "joint"), resume=MACHINE)
    fuse_bn_relu: bool = option(
        False, "speed and levers", "compute each BatchNorm -> ReLU -> convolution (at 64 px the encoder's 2nd and "
        "3rd convolutions, the discriminator's 3rd and 4th, the decoder's last, unless --pad-channels pads it) as "
        "one Triton kernel that applies the BatchNorm and ReLU as it loads the convolution's input and sums its "
        "output for the next BatchNorm; the same maths, other rounding (CUDA, or Triton's interpreter on a CPU; "
        "not the joint decoder call's)", shown_default="off", switch="both", resume=MACHINE)
    # distributed
    sync_bn: bool = option(False, "distributed", "BatchNorm statistics over the global batch across processes "
                           "(default: each process's own batch)", switch="on")
    overlap_allreduce: bool = option(
        True, "distributed", "multi-process: average all gradients in one all-reduce after the backward pass instead "
        "of in buckets that start while it runs", flag="--no-overlap-allreduce", switch="off", resume=MACHINE)

    def resolved(self):
        """A copy with every data-dependent default filled in (the machine's choices: vaegan/options.py)."""
        values = asdict(self)
        defaults = BUILTIN_PRESET if self.data == BUILTIN else REAL_DATA_DEFAULTS
        for name, value in defaults.items():
            if values[name] is None:
                values[name] = value
        if values["gamma"] is None:
            values["gamma"] = AUTHORS_GAMMA[values["image_size"]]
        if values["lr_schedule_steps"] is None:
            values["lr_schedule_steps"] = values["steps"]
        if values["out"] is None:
            values["out"] = f"runs/{self.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        return TrainConfig(**values)


def resume_kind(name):
    return TrainConfig.__dataclass_fields__[name].metadata["resume"]


# The machine's choices: decided again on each start, never kept in a checkpoint.
MACHINE_CHOICES = tuple(f.name for f in fields(TrainConfig) if f.metadata["resume"] == MACHINE)
# Options that may be given when a run is resumed; every other value comes from the checkpoint.
RESUMABLE_OVERRIDES = tuple(f.name for f in fields(TrainConfig) if f.metadata["resume"] != FIXED)


def run_facts(cfg):
    """The values that decide a run's results and records (no machine choice): what a checkpoint keeps."""
    return {name: value for name, value in asdict(cfg).items() if name not in MACHINE_CHOICES}


def config_json(cfg, reasons):
    """config.json: the run's facts apart from this machine's choices, and why each decided value is what it is."""
    return {"run": run_facts(cfg), "machine": {name: getattr(cfg, name) for name in MACHINE_CHOICES},
            "reasons": dict(sorted(reasons.items()))}


def flag_of(f):
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def help_text(f):
    """The help line: what the option does and its default."""
    meta = f.metadata
    shown = meta["shown_default"]
    if shown is None and meta["switch"] in ("on", "off"):
        return meta["help"]  # a switch's help says what giving it does
    if shown is None:
        shown = {True: "on", False: "off"}.get(f.default, f.default)
    return f"{meta['help']} (default: {shown})"


def add_train_arguments(parser, declarations=None):
    """The options of `train.py` and `vaegan train`, one group of --help each, from the declarations
    (TrainConfig's fields, or another dataclass's declared with `option`)."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(declarations or TrainConfig):
        meta = f.metadata
        kwargs = {"dest": f.name, "default": f.default, "help": help_text(f)}
        if meta["switch"] == "on":
            kwargs["action"] = "store_true"
        elif meta["switch"] == "off":
            kwargs["action"] = "store_false"
        elif meta["switch"] == "both":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            for key, parse_key in (("type", "parse"), ("choices", "choices"), ("metavar", "metavar")):
                if meta[parse_key] is not None:
                    kwargs[key] = meta[parse_key]
        groups[meta["group"]].add_argument(flag_of(f), **kwargs)
    return parser


def options_markdown():
    """docs/options.md: every option of `train.py`, by group."""
    lines = ["# Options of `train.py` and `vaegan train`", "",
             "Generated from the declarations in vaegan/config.py by `python -m vaegan.config > docs/options.md`;",
             "tests/test_options.py fails when this file is out of date. On resume: *kept* options come from the",
             "checkpoint, *chosen again* ones are decided for the machine the run resumes on (config.json holds",
             "them apart, under `machine`).", ""]
    for group in GROUPS:
        lines += [f"## {group[0].upper()}{group[1:]}", "", "| option | values | on resume | what it does |",
                  "|---|---|---|---|"]
        for f in fields(TrainConfig):
            meta = f.metadata
            if meta["group"] != group:
                continue
            if meta["switch"] == "both":
                flag, values = f"`{flag_of(f)}`, `--no-{flag_of(f)[2:]}`", "switch"
            elif meta["switch"]:
                flag, values = f"`{flag_of(f)}`", "switch"
            else:
                flag = f"`{flag_of(f)}`"
                values = (", ".join(str(c) for c in meta["choices"]) if meta["choices"]
                          else meta["metavar"] or getattr(meta["parse"], "__name__", "text"))
            lines.append(f"| {flag} | {values} | {ON_RESUME[meta['resume']]} | {help_text(f).replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def config_from_args(args, explicitly_given):
    """The options as given (vaegan/options.py checks them and decides every `auto`)."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    cfg.explicit = set(explicitly_given)
    return cfg


def explicitly_given(parser, argv):
    """Names of the options present on the command line (not defaulted)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            probe.add_argument(*action.option_strings, **kwargs)
    known, _ = probe.parse_known_args(argv)
    return set(vars(known))


if __name__ == "__main__":
    print(options_markdown(), end="")
