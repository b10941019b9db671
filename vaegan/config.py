"""Every value a training run uses and its command-line option; vaegan/options.py resolves and checks them."""
import argparse
import os
import time
from dataclasses import asdict, dataclass, fields

from .data.datasets import BUILTIN
from .schedule import AUTHORS_LR, SCHEDULES
from .models import MODEL_KINDS, SUPPORTED_IMAGE_SIZES, UP_CONV_FANS

DEFAULT_STEPS_REAL_DATA = 62_500  # the authors' 250 "epochs" of 250 batches
# The built-in faces are a demonstration that must show faces after a few minutes on two CPU
# cores: 150 steps of 32 images, and a decoder weighted towards reconstruction (gamma 1e-3;
# at the paper's 1e-6 the decoder learns mostly from the GAN term and needs far longer).
# Over 150 steps the authors' annealing leaves too few steps at a useful rate: the preset keeps it constant.
# The transposed convolutions start from their input fan (the authors' use their output fan), which leaves less
# of their checkerboard in the demo's last grids (bench/results/demo-faces/results.md).
BUILTIN_PRESET = {"image_size": 32, "channels": 1, "steps": 150, "batch_size": 32, "gamma": 1e-3,
                  "lr_schedule": "constant", "augment": "flip", "up_conv_fan": "in"}
REAL_DATA_DEFAULTS = {"image_size": 64, "channels": 3, "steps": DEFAULT_STEPS_REAL_DATA, "batch_size": 64,
                      "gamma": 1e-6, "lr_schedule": "authors", "augment": "authors", "up_conv_fan": "out"}


def default_workers():
    """The CPU cores this process may use, shared among the processes torchrun starts on the node (1..16)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@dataclass
class TrainConfig:
    data: str = BUILTIN
    model: str = "vaegan"
    attributes: str = None  # conditional models: comma-separated names (default: all the data has)
    image_size: int = None  # default: 32 for the built-in faces, else 64
    channels: int = None    # default: 1 for the built-in faces, else 3
    latent_size: int = 128
    fc_width: int = 1024    # the authors' code; the paper's table says 2048
    width: float = 1.0      # channel-width multiplier; 1 is the paper's networks
    up_conv_fan: str = None  # the transposed convolutions' init fan: out (the authors'), in on the built-in faces
    batch_size: int = None  # per process; default: 64 (the paper's), 32 on the built-in faces
    steps: int = None       # default: 62,500 on real data, 150 on the built-in faces
    lr: float = AUTHORS_LR   # the start of the schedule: 0.025 / 64, the authors'
    lr_schedule: str = None  # default: authors (constant on the built-in faces)
    lr_schedule_steps: int = None  # the steps the schedule spans; default: --steps at the run's start (kept on resume)
    optimizer: str = "rmsprop"
    weight_decay: float = 1e-5
    gamma: float = None     # default: 1e-6 (the authors'), 1e-3 on the built-in faces
    real_weight: float = 0.5
    fake_weight: float = 0.5
    decoder_gan_loss: str = "minimax"
    gan_loss_form: str = "logits"
    dis_sees_recon: bool = False
    equilibrium: bool = True
    equilibrium_value: float = 0.68
    margin: float = 0.35
    flip: bool = True
    augment: str = None     # default: authors (flip on the built-in faces, which are held already cropped)
    sync_bn: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 on CUDA devices that support it and on CPUs with bf16 instructions
    kernels: str = "auto"   # triton on CUDA, torch elsewhere
    compile: bool = None      # default: on with CUDA (eager if compiling fails), off on CPUs
    cuda_graphs: bool = None  # default: with compile on CUDA (not with --sync-bn across processes)
    compile_backend: str = "inductor"
    memory_format: str = "auto"   # channels-last (on CPUs too: bench/results/cpu-20261126-formats.txt)
    optimizer_impl: str = "auto"  # fused (adam on CUDA) or foreach
    max_autotune: bool = False    # inductor's max-autotune (with CUDA graphs: "max-autotune")
    pad_channels: bool = False    # the 3-channel convolutions padded to 8 channels (tensor cores)
    decoder_call: str = "separate"  # "joint": the decoder on [z, z_p] in one call, per-segment BatchNorm
    fuse_bn_relu: bool = False    # BatchNorm -> ReLU -> convolution as one Triton kernel (vaegan/fused_layers.py)
    overlap_allreduce: bool = True
    loader: str = "auto"    # dali on CUDA for image files, pil elsewhere
    workers: int = None     # default: default_workers()
    data_cache: str = "auto"  # gpu, host or none (auto: on CUDA where the decoded images fit; none on CPUs)
    out: str = None  # default: runs/MODEL-TIMESTAMP
    resume: str = None
    log_every: int = 10
    sample_every: int = 100
    checkpoint_every: int = None  # steps; default: none, --checkpoint-minutes decides
    checkpoint_minutes: float = 10.0
    keep_every: int = 5000

    def resolved(self):
        """A copy with every data-dependent default filled in."""
        values = asdict(self)
        if values["workers"] is None:
            values["workers"] = default_workers()
        defaults = BUILTIN_PRESET if self.data == BUILTIN else REAL_DATA_DEFAULTS
        for name, value in defaults.items():
            if values[name] is None:
                values[name] = value
        if values["lr_schedule_steps"] is None:
            values["lr_schedule_steps"] = values["steps"]
        if values["out"] is None:
            values["out"] = f"runs/{self.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        return TrainConfig(**values)


# Options that may differ when a run is resumed; every other value comes from the checkpoint.
RESUMABLE_OVERRIDES = ("steps", "device", "kernels", "loader", "workers", "data_cache", "out", "resume", "log_every", "sample_every",
                       "checkpoint_every", "checkpoint_minutes", "keep_every", "compile", "cuda_graphs", "compile_backend", "memory_format",
                       "optimizer_impl", "max_autotune", "pad_channels", "decoder_call", "fuse_bn_relu", "overlap_allreduce")


class ConfigError(ValueError):
    pass


def positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a positive integer, not {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} takes a positive integer, not {value}")
        return value
    return parse


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
    return parse


def add_train_arguments(parser):
    """The options of `train.py` and `vaegan train` (one list, so they cannot drift apart)."""
    d = TrainConfig()
    a = parser.add_argument
    a("--data", default=d.data, help=f"CelebA root (holds img_align_celeba/), any folder of JPEG/PNG images "
      f"(recursive), or {BUILTIN}: the 100 LFW face crops shipped in scikit-image (default)")
    a("--model", choices=MODEL_KINDS, default=d.model,
      help="vaegan: the full model; vae: pixel-space VAE; gan: plain GAN; vae-disl: VAE with the learned "
           "metric and no GAN gradient into the decoder; cvaegan, cvae, cgan: the attribute-conditional "
           "models (y appended to z for the decoder, as constant image channels for encoder and "
           "discriminator; the data needs an attribute file) (default: vaegan)")
    a("--attributes", default=None, metavar="NAMES",
      help="conditional models: comma-separated attribute names to condition on (default: every attribute "
           "of the data's list_attr_celeba.txt)")
    a("--image-size", type=int, choices=SUPPORTED_IMAGE_SIZES, default=None,
      help="image side in pixels (default: 32 for the built-in faces, else 64)")
    a("--channels", type=int, choices=(1, 3), default=None, help="1 (grayscale) or 3 (default: 1 built-in, else 3)")
    a("--latent-size", type=positive_int("--latent-size"), default=d.latent_size, help="size of z (default: 128)")
    a("--fc-width", type=positive_int("--fc-width"), default=d.fc_width,
      help="encoder FC width (default: 1024, the authors' code; the paper's table: 2048)")
    a("--width", type=number("--width"), default=d.width,
      help="channel-width multiplier of every convolution and of the discriminator's FC layer (default: 1, the "
           "paper's networks; not the paper's otherwise: bench/learning.py uses 0.25 to learn on a CPU)")
    a("--up-conv-fan", choices=UP_CONV_FANS, default=None,
      help="the fan of the transposed convolutions' initialisation, std 1/(3*sqrt(fan)): out, C_out*k*k (the "
           "authors'), or in, C_in*k*k (default: out; in on the built-in faces)")
    a("--batch-size", type=positive_int("--batch-size"), default=None,
      help="images per process and step (default: 64, the paper's; 32 on the built-in faces)")
    a("--steps", type=positive_int("--steps"), default=None,
      help=f"total training steps (default: {DEFAULT_STEPS_REAL_DATA}, the authors'; {BUILTIN_PRESET['steps']} on the built-in faces)")
    a("--lr", type=number("--lr"), default=d.lr,
      help="learning rate at the start, whatever the global batch (default: 0.025/64 = 3.9e-4, the authors' at "
           "their batch of 64; a global batch of 512 starts at it too: RMSProp divides by the gradients' RMS, so "
           "the rate is the step's size, and the authors' '/ batch size' turned their batch-sum loss into the "
           "per-step size they tuned at 64; taken literally at 512 it would step 8x smaller)")
    a("--lr-schedule", choices=SCHEDULES, default=d.lr_schedule,
      help="authors: annealed as in the authors' code, lr * (1 - (e/250)^0.75 * (1 - 4e-4)) in 250 equal pieces "
           "of --lr-schedule-steps (3.9e-4 to 1.3e-6 at the default lr); constant: lr throughout (default: authors; "
           "constant on the built-in faces)")
    a("--lr-schedule-steps", type=positive_int("--lr-schedule-steps"), default=None,
      help="the steps the schedule spans (default: --steps); fixed for the run's life: a resumed run with more "
           "--steps keeps its schedule and continues at its last rate")
    a("--optimizer", choices=("rmsprop", "adam"), default=d.optimizer,
      help="rmsprop (alpha 0.9, eps 1e-8, the paper's) or adam (betas 0.5, 0.999) (default: rmsprop)")
    a("--weight-decay", type=number("--weight-decay", inclusive=True), default=d.weight_decay,
      help="lambda of DeepPy's weight decay, as in the authors' code: 2 * lambda * w added to the gradient of the "
           "batch-sum loss, i.e. coupled L2 of 2 * lambda / (global batch) on our batch-mean losses; on every "
           "conv/linear weight but the mu/logvar heads' (default: 1e-5, the authors')")
    a("--gamma", type=number("--gamma"), default=None,
      help="weight of L_llike in the decoder's loss, on the per-image feature sum "
           "(default: 1e-6, the authors'; 1e-3 on the built-in faces)")
    a("--real-weight", type=number("--real-weight", inclusive=True), default=d.real_weight,
      help="weight of -log Dis(x) in the discriminator loss (default: 0.5)")
    a("--fake-weight", type=number("--fake-weight", inclusive=True), default=d.fake_weight,
      help="weight of -log(1-Dis(fake)) in the discriminator loss (default: 0.5)")
    a("--decoder-gan-loss", choices=("minimax", "non-saturating"), default=d.decoder_gan_loss,
      help="the decoder's adversarial term: minimax (the authors' reversed gradient) or -log Dis(x_p) (default: minimax)")
    a("--gan-loss-form", choices=("logits", "eps"), default=d.gan_loss_form,
      help="log-losses from logits (stable) or the authors' log(p + 1e-3) (default: logits)")
    a("--dis-sees-recon", action="store_true",
      help="also show reconstructions to the discriminator as fakes (the paper's Algorithm 1; vaegan only)")
    a("--no-equilibrium", dest="equilibrium", action="store_false",
      help="always update decoder and discriminator (default: the authors' equilibrium rule)")
    a("--equilibrium-value", type=number("--equilibrium-value"), default=d.equilibrium_value,
      help="centre of the equilibrium rule (default: 0.68)")
    a("--margin", type=number("--margin", inclusive=True), default=d.margin, help="margin of the equilibrium rule (default: 0.35)")
    a("--augment", choices=("authors", "flip", "none"), default=d.augment,
      help="authors: the authors' augmentation of each image file before the crop (translation sigma 2 px, scale "
           "and rotation sigma 0.01, gamma and contrast sigma 0.05, hue sigma 0.01; drawn from seed, step and slot) "
           "and flips, in either loader; flip: horizontal flips only; none: nothing (default: authors; flip on the "
           "built-in faces)")
    a("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    a("--sync-bn", action="store_true",
      help="BatchNorm statistics over the global batch across processes (default: each process's own batch)")
    a("--seed", type=int, default=d.seed, help="seed of initialisation, data order, flips and noise (default: 0)")
    a("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: auto: cuda if available)")
    a("--precision", choices=("auto", "fp32", "bf16", "fp64"), default=d.precision,
      help="fp32, bf16 autocast, or fp64 (slow; for checking numerics) (default: auto: bf16 on CUDA devices that "
           "support it and on CPUs with bf16 instructions, where it is faster; fp32 elsewhere)")
    a("--kernels", choices=("auto", "torch", "triton"), default=d.kernels,
      help="loss implementation: the fused Triton kernels or the PyTorch reference losses "
           "(default: auto: triton on CUDA, torch elsewhere; on a CPU triton needs TRITON_INTERPRET=1)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the step: the forward with its routed backward, and each optimizer step (default: on "
           "with CUDA, where a step that fails to compile runs eager and the start lines say why; off on CPUs, "
           "where compiling takes longer than the demo's training)")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
      help="with --compile on CUDA: capture the compiled step in CUDA graphs (mode reduce-overhead) (default: on "
           "when the step is compiled on CUDA, except with --sync-bn across processes)")
    a("--compile-backend", choices=("inductor", "aot_eager"), default=d.compile_backend,
      help="torch.compile backend: inductor (generates kernels) or aot_eager (traces only; for debugging) "
           "(default: inductor)")
    a("--memory-format", choices=("auto", "channels-last", "contiguous"), default=d.memory_format,
      help="layout of images and convolution weights (default: auto: channels-last, which was faster on GPUs "
           "and CPUs alike)")
    a("--optimizer-impl", choices=("auto", "for-loop", "foreach", "fused", "apex"), default=d.optimizer_impl,
      help="the optimizers' implementation: torch's for-loop or foreach (multi-tensor) kernels, or fused: torch's "
           "fused Adam, or for rmsprop our Triton kernel (one per parameter, reading nothing but the keep flag of a "
           "skipped step; CUDA, or Triton's interpreter on a CPU) (default: auto: fused for adam on CUDA, else "
           "foreach); apex is refused: its FusedAdam counts steps in a host integer that a skipped step cannot "
           "restore")
    a("--max-autotune", action=argparse.BooleanOptionalAction, default=d.max_autotune,
      help="with --compile (inductor): let inductor time alternative kernels for each matrix product and convolution "
           "(mode max-autotune, or max-autotune-no-cudagraphs with --no-cuda-graphs); compiling takes minutes "
           "longer (default: off)")
    a("--pad-channels", action=argparse.BooleanOptionalAction, default=d.pad_channels,
      help="compute the convolutions whose channel counts are not multiples of 8 (the encoder's and "
           "discriminator's first, with the image's 3 channels and a conditional model's attributes, and the "
           "decoder's last) with channels of zeros up to a multiple of 8, a count tensor cores take; the same "
           "values (default: off)")
    a("--decoder-call", choices=("separate", "joint"), default=d.decoder_call,
      help="the decoder's two passes (on the reconstructions' codes and on the prior codes): separate calls, or "
           "one joint call over both with each BatchNorm normalising each half with its own statistics and each "
           "weight's gradient taken per half, as separate calls do (default: separate)")
    a("--fuse-bn-relu", action=argparse.BooleanOptionalAction, default=d.fuse_bn_relu,
      help="compute each BatchNorm -> ReLU -> convolution (at 64 px the encoder's 2nd and 3rd convolutions, the "
           "discriminator's 3rd and 4th, the decoder's last, unless --pad-channels pads it) as one Triton kernel that applies the BatchNorm and "
           "ReLU as it loads the convolution's input and sums its output for the next BatchNorm; the same maths, "
           "other rounding (CUDA, or Triton's interpreter on a CPU; not the joint decoder call's) (default: off)")
    a("--no-overlap-allreduce", dest="overlap_allreduce", action="store_false",
      help="multi-process: average all gradients in one all-reduce after the backward pass instead of in "
           "buckets that start while it runs")
    a("--loader", choices=("auto", "pil", "dali"), default=d.loader,
      help="image loading: NVIDIA DALI (GPU decoding; on a CPU its CPU operators) or PIL DataLoader workers "
           "(default: auto: dali on CUDA for image files, pil elsewhere)")
    a("--workers", type=int, default=None,
      help="DataLoader worker processes for image files (default: the CPU cores this process may use, divided among the processes on the node, at most 16)")
    a("--data-cache", choices=("auto", "gpu", "host", "none"), default=d.data_cache,
      help="decode every image file once, at the start, into one uint8 tensor on the GPU (gpu) or in host memory "
           "(host), and preprocess each step's batch from it on the device; none: decode each batch in the loader. "
           "auto: on CUDA gpu where the decoded images take at most half the GPU's free memory, else host where "
           "they take at most half the host's available memory, else none; none on CPUs and with an explicit "
           "--loader. An explicit gpu or host that cannot hold them fails, with the sizes (default: auto)")
    a("--out", default=None, help="run directory (default: runs/MODEL-TIMESTAMP)")
    a("--resume", default=None, metavar="DIR", help="continue the run in DIR exactly where its checkpoint stopped")
    a("--log-every", type=positive_int("--log-every"), default=d.log_every, help="steps between metrics lines (default: 10)")
    a("--sample-every", type=positive_int("--sample-every"), default=d.sample_every,
      help="steps between sample/reconstruction grids (default: 100)")
    a("--checkpoint-every", type=positive_int("--checkpoint-every"), default=d.checkpoint_every,
      help="steps between rewrites of checkpoint.pt, besides --checkpoint-minutes (default: none)")
    a("--checkpoint-minutes", type=number("--checkpoint-minutes", inclusive=True), default=d.checkpoint_minutes,
      help="minutes between rewrites of checkpoint.pt, decided at log steps, the same on every process; 0: by "
           "--checkpoint-every only. The run's end, a stop (SIGTERM) and --keep-every also write one; the write "
           "runs on a background thread (default: 10)")
    a("--keep-every", type=positive_int("--keep-every"), default=d.keep_every,
      help="steps between kept checkpoint-STEP.pt files (default: 5000)")
    return parser


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
