"""The training loop: set-up, the step, logging, samples, checkpoints, resume and signals."""
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
from tqdm import tqdm

from . import checkpoint, distributed
from .config import RESUMABLE_OVERRIDES, ConfigError, TrainConfig
from .data import DataError, StepBatchSampler, build_dataset, make_loader
from .data.dali import DaliLoader
from .images import interleave, save_grid
from .models import CONDITIONAL_KINDS, VAEGAN, base_kind
from .fast import (FastOptions, TrainStep, check_fast_options, make_optimizer, reset_learning_rate, resolve_optimizer_impl,
                   set_learning_rate)
from .schedule import learning_rate
from .step import StepConfig
from .tally import StepTally

GRID_IMAGES = 32
LOSS_NAMES = ("kl", "llike", "dis_loss", "gen_loss", "real_cost", "fake_cost", "pixel_error")


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def step_config(cfg, kernel_set):
    return StepConfig(kind=base_kind(cfg.model), gamma=cfg.gamma, real_weight=cfg.real_weight, fake_weight=cfg.fake_weight,
                      saturating=cfg.decoder_gan_loss == "minimax", gan_loss_form=cfg.gan_loss_form,
                      dis_sees_recon=cfg.dis_sees_recon, equilibrium=cfg.equilibrium,
                      equilibrium_value=cfg.equilibrium_value, margin=cfg.margin, kernels=kernel_set)


def build_model(cfg):
    model = VAEGAN(cfg.model, cfg.image_size, cfg.channels, cfg.latent_size, cfg.fc_width,
                   cfg.attributes.split(",") if cfg.attributes else (), cfg.width)
    if cfg.sync_bn:
        distributed.convert_to_global_batchnorm(model)
    return model


def decayed_weights(model):
    """The weights DeepPy decays in the authors' networks: every conv/linear weight but the mu/logvar heads'."""
    heads = set()
    if model.encoder is not None:
        heads = {id(model.encoder.mu.weight), id(model.encoder.logvar.weight)}
    return {id(p) for p in model.parameters() if p.dim() > 1 and id(p) not in heads}


def build_optimizers(model, cfg, impl="for-loop", tensor_lr=False, global_batch=None):
    """One optimizer per network, with the authors' weight decay: DeepPy adds 2 * lambda * w to the
    gradient of a batch-SUM loss; ours are batch means, so the coupled L2 coefficient is
    2 * lambda / (global batch)."""
    coefficient = 2 * cfg.weight_decay / (global_batch or cfg.batch_size)
    decayed = decayed_weights(model)
    optimizers = {}
    for name, net in model.networks().items():
        decay = [p for p in net.parameters() if id(p) in decayed]
        no_decay = [p for p in net.parameters() if id(p) not in decayed]
        groups = [{"params": decay, "weight_decay": coefficient}, {"params": no_decay, "weight_decay": 0.0}]
        optimizers[name] = make_optimizer(cfg.optimizer, impl, groups, cfg.lr, tensor_lr)
    return optimizers


def conditioning_columns(cfg, dataset):
    """(attribute names, their columns in the data's attribute table) a conditional model conditions on."""
    if cfg.model not in CONDITIONAL_KINDS:
        return [], None
    if not dataset.attribute_names:
        raise ConfigError(f"--model {cfg.model} conditions on attributes, and {dataset.name} has none "
                          "(CelebA's list_attr_celeba.txt, or one in its format beside a folder's images)")
    names = cfg.attributes.split(",") if cfg.attributes else list(dataset.attribute_names)
    unknown = [n for n in names if n not in dataset.attribute_names]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"--attributes {cfg.attributes}: " + (f"{', '.join(unknown)} not in the data's attribute "
                          f"file (it has {', '.join(dataset.attribute_names)})" if unknown else "a name is repeated"))
    return names, [dataset.attribute_names.index(n) for n in names]


def cpu_has_native_bf16():
    """bf16 instructions (AVX512-BF16 or AMX): without them a CPU emulates bf16, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(device):
    """--precision auto -> (precision, why): bf16 autocast on CUDA devices with bf16 (Ampere and
    later) and on CPUs with bf16 instructions (the built-in demo's step ran 1.7x fp32 on one:
    bench/results/cpu-20261202-formats.txt), fp32 elsewhere."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this CUDA device has bf16"
        return "fp32", "auto: this CUDA device has no bf16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16", "auto: this CPU has bf16 instructions"
    return "fp32", "auto: no bf16 instructions on this CPU (bf16 would be emulated, slower than fp32)"


def resolve_loader(choice, device, dataset):
    """("pil" | "dali", a description): --loader dali that cannot run is an error."""
    from .data.dali import dali_unavailable_reason
    if choice == "pil" or (choice == "auto" and (device.type != "cuda" or dataset.in_memory)):
        return "pil", f"{'requested' if choice == 'pil' else 'default'}, {{workers}} workers"
    reason = dali_unavailable_reason()
    if reason or dataset.in_memory:
        if choice == "dali":
            raise ConfigError(f"--loader dali: {reason or 'the built-in faces are held in memory; use --loader pil'}")
        return "pil", f"default, as {reason}; {{workers}} workers"
    return "dali", "GPU decoding" if device.type == "cuda" else "CPU operators"


def open_loader(cfg, dataset, ctx, device, start_step):
    """(loader, its sampler, "pil" | "dali", description). A DALI pipeline that --loader auto chose
    but cannot be built gives way to the PIL loader, with the reason; --loader dali fails instead."""
    flip = cfg.flip and cfg.augment != "none"
    if cfg.augment == "authors":
        if dataset.in_memory:
            raise ConfigError("--augment authors augments image files before the crop; the built-in faces are held "
                              "in memory, already cropped and resized: use --augment flip, or pass --data DIR")
        dataset.augment = True
    kind, description = resolve_loader(cfg.loader, device, dataset)
    if kind == "dali":
        try:
            loader = DaliLoader(dataset, cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed, start_step, cfg.steps,
                                flip, device.type, device.index if device.type == "cuda" else None)
            return loader, loader.sampler, "dali", description
        except Exception as e:
            if cfg.loader == "dali":
                raise
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            kind, description = "pil", f"default, as the DALI pipeline could not be built ({message}); {{workers}} workers"
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed, start_step,
                               cfg.steps, flip)
    loader = make_loader(dataset, sampler, cfg.workers, pin_memory=device.type == "cuda")
    return loader, sampler, "pil", description.format(workers=loader.num_workers)


def resolve_kernels(choice, device, gan_loss_form="logits"):
    """("torch" | "triton", how it was chosen). Before a run relies on the fused kernels they are
    checked against the references on `device` (kernels/selfcheck.py): --kernels auto falls back to
    the references, saying why; --kernels triton that cannot run or disagrees is an error."""
    import kernels
    if choice == "torch":
        return "torch", "requested"
    if choice == "auto" and gan_loss_form == "eps":
        return "torch", "default for --gan-loss-form eps, which has no fused kernel"
    if choice == "auto" and device.type != "cuda":
        return "torch", "default off CUDA"
    reason = kernels.triton_unavailable_reason(device.type)
    if reason is None:
        from kernels.selfcheck import self_check
        reason = self_check(device)
    if choice == "triton":
        if reason:
            raise ConfigError(f"--kernels triton: {reason}")
        how = "interpreter" if device.type != "cuda" else "requested"
        return "triton", f"{how}, checked against the references"
    if reason:
        return "torch", f"default, as {reason}"
    return "triton", "default on CUDA, checked against the references"


def merge_resumed_config(cfg, saved):
    """The saved run's configuration, with the options that may change taken from `cfg`."""
    values = dict(saved)
    values.setdefault("lr_schedule", "constant")  # runs from before the schedule trained at a constant rate
    values.setdefault("lr_schedule_steps", saved.get("steps"))  # a run from before the option spans its --steps
    values.setdefault("augment", "flip")  # runs from before --augment flipped and did nothing else
    for name in getattr(cfg, "explicit", ()):
        if name in RESUMABLE_OVERRIDES:
            values[name] = getattr(cfg, name)
        elif name in values and getattr(cfg, name) != values[name]:
            raise ConfigError(f"--{name.replace('_', '-')} cannot change when resuming "
                              f"(the run used {values[name]!r}); only "
                              f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE_OVERRIDES)} may")
    if "out" not in getattr(cfg, "explicit", ()):
        values["out"] = cfg.resume
    values["resume"] = cfg.resume
    defaults = TrainConfig()
    return TrainConfig(**{f.name: values.get(f.name, getattr(defaults, f.name)) for f in fields(TrainConfig)})


class StopRequest:
    """SIGTERM (and SIGINT) ask the loop to finish its step, save and exit."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def trim_metrics(path, last_step):
    """On resume, drop the lines of steps after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    checkpoint.atomic_write(path, lambda f: f.write("".join(kept).encode()))


def log(ctx, message):
    if ctx.is_main:
        tqdm.write(message, file=sys.stderr)


@dataclass
class RunResult:
    out: str
    step: int
    model: VAEGAN


def train(cfg):
    """Train as `cfg` says; returns the run directory, the last step and the model."""
    if cfg.resume:
        saved = checkpoint.load(cfg.resume)
        cfg = merge_resumed_config(cfg, saved["config"])
    else:
        saved = None
        cfg = cfg.resolved()
        if os.path.exists(os.path.join(cfg.out, checkpoint.CHECKPOINT)):
            raise ConfigError(f"{cfg.out} already holds a run: pass --resume {cfg.out} to continue it, "
                              "or choose another --out")
    device = resolve_device(cfg.device)
    ctx = distributed.setup(device.type)
    try:
        if device.type == "cuda" and ctx.distributed:
            device = torch.device("cuda", ctx.local_rank)
        elif device.type == "cuda" and device.index is None:  # DALI and the checks need the index
            device = torch.device("cuda", torch.cuda.current_device())
        if cfg.precision == "auto":  # decided once: config.json and a resumed run keep the choice
            precision, why = resolve_precision(device)
            cfg = replace(cfg, precision=precision)
            log(ctx, f"vaegan: precision {precision} ({why})")
        return run(cfg, ctx, device, saved)
    finally:
        distributed.teardown(ctx)


def run(cfg, ctx, device, saved):
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg.data, "train", cfg.image_size, cfg.channels)
    attribute_names, attribute_columns = conditioning_columns(cfg, dataset)
    if attribute_names:
        cfg = replace(cfg, attributes=",".join(attribute_names))
    param_dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    channels_last = cfg.memory_format in ("auto", "channels-last")
    fast_options = FastOptions(cfg.compile, cfg.cuda_graphs, channels_last, cfg.compile_backend)
    check_fast_options(fast_options, device.type, cfg.sync_bn and ctx.distributed)
    optimizer_impl, optimizer_reason = resolve_optimizer_impl(cfg.optimizer_impl, cfg.optimizer, device.type)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once
    model = build_model(cfg).to(device, param_dtype)
    optimizers = build_optimizers(model, cfg, optimizer_impl, tensor_lr=cfg.compile,
                                  global_batch=cfg.batch_size * ctx.world_size)
    start_step, skips, unreadable = 0, {"decoder": 0, "discriminator": 0}, set()
    if saved is not None:
        model.load_state_dict(saved["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(saved["optimizers"][name])
        start_step, skips, unreadable = saved["step"], dict(saved["skips"]), set(saved["unreadable"])
        torch.set_rng_state(saved["torch_rng"])
    lr = learning_rate(cfg.lr_schedule, cfg.lr, start_step, cfg.lr_schedule_steps)
    reset_learning_rate(optimizers, lr, tensor_lr=cfg.compile)  # (a resumed optimizer's saved rate may be either)
    distributed.broadcast_state(model, ctx)
    kernel_set, kernel_reason = resolve_kernels(cfg.kernels, device, cfg.gan_loss_form)
    if cfg.compile and kernel_set == "triton" and device.type != "cuda":
        raise ConfigError("--compile with --kernels triton needs CUDA (Triton's interpreter cannot be compiled); "
                          "use --kernels torch on the CPU")
    scfg = step_config(cfg, kernel_set)
    autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    train_step = TrainStep(model, optimizers, scfg, autocast_dtype, fast_options)
    reducer = (distributed.OverlappedGradientReducer(model, ctx)
               if ctx.distributed and cfg.overlap_allreduce else None)
    global_batch = cfg.batch_size * ctx.world_size
    loader, sampler, loader_kind, loader_reason = open_loader(cfg, dataset, ctx, device, start_step)
    unused = len(dataset) - sampler.steps_per_epoch * sampler.global_batch

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    tensorboard = None
    if ctx.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        checkpoint.remove_stale_temporaries(cfg.out)
        checkpoint.write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
        trim_metrics(metrics_path, start_step)
        from torch.utils.tensorboard import SummaryWriter
        tensorboard = SummaryWriter(os.path.join(cfg.out, "tensorboard"), purge_step=start_step + 1)
    parameters = sum(p.numel() for p in model.parameters())
    log(ctx, f"vaegan: model {cfg.model} ({parameters / 1e6:.1f}M parameters), {cfg.image_size}x{cfg.image_size}x"
             f"{cfg.channels}, data {dataset.name}: {len(dataset)} images"
             + (f", conditioned on {len(attribute_names)} attributes ({', '.join(attribute_names)}); the encoder "
                "sees them too" if attribute_names else "")
             + (f", {unused} left over each epoch (a different {unused} each time: only full global batches are used)"
                if unused else ""))
    log(ctx, f"vaegan: device {device}, precision {cfg.precision}, loader {loader_kind} ({loader_reason}), "
             f"augment {cfg.augment if cfg.flip or cfg.augment == 'none' else cfg.augment + ' without flips'}, "
             f"kernels {kernel_set} ({kernel_reason}), {ctx.world_size} process(es) x batch {cfg.batch_size}, "
             f"BatchNorm {'global (--sync-bn)' if cfg.sync_bn else 'per process'}")
    log(ctx, f"vaegan: step {fast_options.describe()}, optimizers {optimizer_impl} ({optimizer_reason})"
             + (f", gradients averaged {'in buckets during the backward pass' if reducer else 'after the backward pass'}"
                if ctx.distributed else ""))
    log(ctx, f"vaegan: {cfg.optimizer} lr {cfg.lr:g} ({cfg.lr_schedule}"
             f"{f', {lr:.3g} at step {start_step}' if lr != cfg.lr else ''}), gamma {cfg.gamma:g}, decoder GAN loss {cfg.decoder_gan_loss}"
             f"{', equilibrium rule' if cfg.equilibrium else ''}; every value used is in config.json")
    log(ctx, f"vaegan: {'resuming at' if saved else 'starting at'} step {start_step} of {cfg.steps}; run directory {cfg.out}")

    def save_checkpoint(step):
        distributed.check_replicas(model, ctx)
        if not ctx.is_main:
            return
        # a snapshot at this step boundary, written on the writer's thread while training goes on
        state = checkpoint.snapshot({"step": step, "config": asdict(cfg), "model": model.state_dict(),
                                     "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                                     "skips": skips, "unreadable": sorted(unreadable),
                                     "torch_rng": torch.get_rng_state()})
        paths = [os.path.join(cfg.out, checkpoint.CHECKPOINT)]
        if step > 0 and step % cfg.keep_every == 0:
            paths.append(os.path.join(cfg.out, f"checkpoint-{step:07d}.pt"))
        writer_thread.submit(lambda: [checkpoint.save(path, state) for path in paths])

    grid_noise = torch.randn(GRID_IMAGES, cfg.latent_size,
                             generator=torch.Generator().manual_seed(cfg.seed)).to(device, param_dtype)
    grid_originals = torch.stack([dataset[(i, False)][0]
                                  for i in range(min(GRID_IMAGES // 2, len(dataset)))]).to(device, param_dtype)
    grid_sample_attributes = grid_original_attributes = None
    if attribute_names:  # samples take the attributes of the first training images, in turn
        table = dataset.attributes[:, attribute_columns].to(device, param_dtype)
        grid_sample_attributes = table[torch.arange(GRID_IMAGES) % len(table)]
        grid_original_attributes = table[:len(grid_originals)]

    def save_grids(step):
        # Every rank computes (GlobalBatchNorm's statistics are collective); rank 0 writes.
        with model.batch_statistics():
            samples = model.decoder(grid_noise, grid_sample_attributes)
            pairs = None
            if model.encoder is not None:
                mu, _ = model.encoder(grid_originals, grid_original_attributes)
                pairs = interleave(grid_originals, model.decoder(mu, grid_original_attributes))
        if ctx.is_main:  # copied and encoded as PNG on the writer's thread
            grids = checkpoint.snapshot({"samples": samples, "reconstructions": pairs})
            writer_thread.submit(lambda: [save_grid(os.path.join(cfg.out, f"{name}-{step:07d}.png"), images)
                                          for name, images in grids.items() if images is not None])

    def train_one_step(images, attributes, step):
        """The step, queued on the device: nothing in it waits for the device."""
        x = images.to(device, param_dtype, non_blocking=True)
        y = attributes.to(device, non_blocking=True)[:, attribute_columns].to(param_dtype) if attribute_names else None
        step_on_device = torch.full((1,), step, dtype=torch.int64, device=device)
        noise_seed, z_prior = train_step.noise(cfg.seed, step_on_device, cfg.batch_size, cfg.latent_size,
                                               global_batch, ctx.rank * cfg.batch_size)
        stats = train_step.gradients(x, z_prior.to(param_dtype), noise_seed, ctx.rank * cfg.batch_size, y)
        if ctx.distributed:  # every rank must stop after the same step: the request travels with the stats
            stats["stop"] = torch.full((), float(stop.requested), device=device)
        stats = distributed.average_step(model, stats, ctx, reducer)
        update, finite = train_step.decisions(stats)
        train_step.apply(update)
        tally.add(step_on_device.reshape(()), update, finite, stats)
        return stats

    def read_tally(stats, new_interval=True):
        """The tally, read (one synchronisation); a non-finite step stops the run here, naming it."""
        current, updated, interval, total, bad = tally.read(stats, new_interval)
        skips.update(total)
        if bad is not None:
            step, losses = bad
            raise FloatingPointError(f"step {step}: loss became non-finite "
                                     f"({', '.join(f'{n}={v}' for n, v in losses.items() if n in stats)}); nothing "
                                     f"was updated from it on; the last good checkpoint is in {cfg.out}")
        return current, updated, interval

    def log_step(step, stats):
        """Read the tally, write metrics.jsonl and TensorBoard; returns whether a process asked to stop."""
        current, updated, interval = read_tally(stats)
        img_per_s = (step - timer["step"]) * global_batch / (time.perf_counter() - timer["start"])
        record = {"step": step, **{n: current[n] for n in LOSS_NAMES if n in current},
                  "update_decoder": updated.get("decoder", True), "update_discriminator": updated.get("discriminator", True),
                  "skipped_decoder": interval["decoder"], "skipped_discriminator": interval["discriminator"],
                  "lr": learning_rate(cfg.lr_schedule, cfg.lr, step - 1, cfg.lr_schedule_steps),
                  "img_per_s": img_per_s, "unreadable_images": len(unreadable)}
        if ctx.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for name, value in record.items():
                if name != "step":
                    tensorboard.add_scalar(name, float(value), step)
            shown = {n: current[n] for n in ("llike", "kl", "dis_loss", "pixel_error") if n in current}
            progress.set_postfix({**{k: f"{v:.3g}" for k, v in shown.items()}, "img/s": f"{img_per_s:.0f}"})
        timer.update(start=time.perf_counter(), step=step)
        return current.get("stop", 0.0) > 0

    def update_learning_rate(step):
        lr, previous = (learning_rate(cfg.lr_schedule, cfg.lr, s, cfg.lr_schedule_steps) for s in (step, step - 1))
        if lr != previous:  # a tensor learning rate is filled in place: no recompile
            set_learning_rate(optimizers, lr)

    def checkpoint_due(step, stopping):
        """Every --checkpoint-minutes (decided at log steps, the same on every rank) or --checkpoint-every
        steps, at the end, on a stop, and at --keep-every."""
        if cfg.checkpoint_minutes > 0 and step % cfg.log_every == 0:
            timer["checkpoint_due"] = agreed(time.monotonic() - timer["checkpoint"] >= 60 * cfg.checkpoint_minutes)
        due = (timer["checkpoint_due"] or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
               or step == cfg.steps or stopping or step % cfg.keep_every == 0)
        if due:
            timer.update(checkpoint=time.monotonic(), checkpoint_due=False)
        return due

    def note_unreadable(bad_files):
        for path in bad_files:
            if path not in unreadable:
                unreadable.add(path)
                log(ctx, f"vaegan: skipped unreadable image {path} ({len(unreadable)} skipped so far)")
        if len(unreadable) > max(1, len(dataset) // 10):
            raise DataError(f"{len(unreadable)} of {len(dataset)} images in {dataset.name} are unreadable "
                            f"(first: {sorted(unreadable)[0]})")

    def agreed(flag):
        """The same decision on every rank: any rank's True (one small all-reduce, at log steps)."""
        if not ctx.distributed:
            return flag
        flags = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags.item() > 0

    tally = StepTally(device, LOSS_NAMES + (("stop",) if ctx.distributed else ()), skips)
    timer = {"start": time.perf_counter(), "step": start_step, "checkpoint": time.monotonic(), "checkpoint_due": False}
    model.train()
    step = start_step
    progress = tqdm(total=cfg.steps, initial=start_step, unit="step", disable=not ctx.is_main, dynamic_ncols=True,
                    file=sys.stderr)
    # the writer's thread writes checkpoints and grids; leaving this block waits for its last job
    # (after closing the progress bar: an error is then printed on a line of its own)
    with StopRequest() as stop, contextlib.closing(checkpoint.Writer()) as writer_thread, progress:
        if saved is None:
            save_checkpoint(0)  # from here on, a kill at any moment leaves a loadable checkpoint
        for images, attributes, bad_files in loader:
            writer_thread.check()  # a failed write (a full disk) stops the run at the next step
            note_unreadable(bad_files)
            stats = train_one_step(images, attributes, step)
            step += 1
            progress.update(1)
            update_learning_rate(step)
            # one process stops at once; several stop together, at the log step that reads the request
            stopping = stop.requested and not ctx.distributed
            if step % cfg.log_every == 0 or step == cfg.steps or stopping:
                stopping = log_step(step, stats) or stopping
            if step % cfg.sample_every == 0 or step == cfg.steps:
                save_grids(step)
            if checkpoint_due(step, stopping):
                read_tally(stats, new_interval=False)  # the skips in all; no checkpoint after a non-finite step
                save_checkpoint(step)
            if stopping:
                log(ctx, f"vaegan: stop requested; saved step {step} to {cfg.out}, resume with --resume {cfg.out}")
                break
    progress.close()
    if tensorboard is not None:
        tensorboard.close()
    if unreadable:
        log(ctx, f"vaegan: {len(unreadable)} unreadable image(s) were skipped (listed in the checkpoint)")
    log(ctx, f"vaegan: done at step {step}; run directory {cfg.out}")
    return RunResult(cfg.out, step, model)
