"""Training: `setup` decides and builds everything a run uses, `loop` trains it.

The options are resolved in vaegan/options.py, the step is vaegan/train_step.py, what the run
reports is vaegan/runlog.py, and when it saves is checkpoint.CheckpointSchedule.
"""
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, fields, replace

import torch

from . import checkpoint, distributed, options
from .collapse import CollapseWatch
from .config import FIXED, MACHINE_CHOICES, RESUMABLE_OVERRIDES, ConfigError, TrainConfig, config_json, resume_kind
from .data import DataError, StepBatchSampler, build_dataset, make_loader
from .data.cache import CachedLoader, DecodedCache
from .data.dali import DaliLoader
from .gradients import STEP_STATS, UpdateConfig
from .images import SampleGrids
from .fused_layers import fuse_bn_relu
from .models import VAEGAN, base_kind, pad_thin_convolutions
from .optimizers import build_optimizers, follow_schedule, reset_implementation, reset_learning_rate
from .runlog import RunLog
from .schedule import learning_rate
from .tally import StepTally
from .train_step import StepMode, TrainStep


def update_config(cfg):
    return UpdateConfig(kind=base_kind(cfg.model), gamma=cfg.gamma, real_weight=cfg.real_weight,
                        fake_weight=cfg.fake_weight, saturating=cfg.decoder_gan_loss == "minimax",
                        gan_loss_form=cfg.gan_loss_form, dis_sees_recon=cfg.dis_sees_recon,
                        equilibrium=cfg.equilibrium, equilibrium_value=cfg.equilibrium_value, margin=cfg.margin,
                        kernels=cfg.kernels, decoder_call=cfg.decoder_call)


def build_model(cfg):
    model = VAEGAN(cfg.model, cfg.image_size, cfg.channels, cfg.latent_size, cfg.fc_width,
                   cfg.attributes.split(",") if cfg.attributes else (), cfg.width, cfg.up_conv)
    if cfg.sync_bn:
        distributed.convert_to_global_batchnorm(model)
    return model


def build_step(cfg, device, ctx=None, attribute_columns=None, stop=None):
    """(model, optimizers, train_step) for a resolved `cfg` on `device`: what the trainer runs and
    the benchmarks time. Across processes the step averages through distributed.StepAverage, which
    carries `stop`'s request."""
    ctx = ctx or distributed.Context()
    model = build_model(cfg).to(device, torch.float64 if cfg.precision == "fp64" else torch.float32)
    if cfg.pad_channels:
        pad_thin_convolutions(model)
    if cfg.fuse_bn_relu:  # the joint decoder call computes its own layers, per half
        model.fused_convolutions = fuse_bn_relu(model, skip=("decoder",) if cfg.decoder_call == "joint" else ())
    optimizers = build_optimizers(model, cfg, cfg.optimizer_impl, tensor_lr=cfg.compile,
                                  global_batch=cfg.batch_size * ctx.world_size)
    mode = StepMode(cfg.compile, cfg.cuda_graphs, cfg.memory_format == "channels-last", cfg.compile_backend,
                    cfg.max_autotune)
    train_step = TrainStep(model, optimizers, update_config(cfg), torch.bfloat16 if cfg.precision == "bf16" else None,
                           mode, cfg.seed, ctx.rank, ctx.world_size, attribute_columns)
    if ctx.distributed:
        train_step.reduce = distributed.StepAverage(model, ctx, cfg.overlap_allreduce, stop)
    return model, optimizers, train_step


def open_loader(cfg, dataset, ctx, device, start_step, reason, may_fall_back):
    """(loader, its sampler, "pil" | "dali", description). A DALI pipeline that cannot be built gives
    way to the PIL loader when `may_fall_back` (--loader auto chose it), with the reason. With
    --data-cache gpu|host the files are decoded here, once (the progress bar on the main process)."""
    flip = cfg.flip and cfg.augment != "none"
    dataset.augment = cfg.augment == "authors"
    if cfg.data_cache in ("gpu", "host"):
        threads = max(1, cfg.workers)
        cache = DecodedCache.decode(dataset, cfg.data_cache, device, threads, progress=ctx.is_main)
        sampler = StepBatchSampler(len(dataset), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed, start_step,
                                   cfg.steps, flip)
        loader = CachedLoader(cache, dataset, sampler, device)
        timing = f": {cache.seconds:.1f} s, {cache.seconds / len(dataset) * 1e3:.2f} ms an image"
        return loader, sampler, "pil", reason.format(workers=threads) + timing
    if cfg.loader == "dali":
        try:
            loader = DaliLoader(dataset, cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed, start_step, cfg.steps,
                                flip, device.type, device.index if device.type == "cuda" else None)
            return loader, loader.sampler, "dali", reason
        except Exception as e:
            if not may_fall_back:
                raise
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = f"default, as the DALI pipeline could not be built ({message}); {{workers}} workers"
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed, start_step,
                               cfg.steps, flip)
    loader = make_loader(dataset, sampler, cfg.workers, pin_memory=device.type == "cuda", device=device)
    return loader, sampler, "pil", reason.format(workers=loader.num_workers)


def merge_resumed_config(cfg, saved):
    """The saved run's facts, with the options that may change taken from `cfg`, and the machine's
    choices as `cfg` gives them (`auto` unless given), to be made again on this machine."""
    values = {name: value for name, value in saved.items() if name not in MACHINE_CHOICES}
    values.setdefault("lr_schedule", "constant")  # runs from before the schedule trained at a constant rate
    values.setdefault("lr_schedule_steps", saved.get("steps"))  # a run from before the option spans its --steps
    values.setdefault("augment", "flip")  # runs from before --augment flipped and did nothing else
    values.setdefault("up_conv", "transposed")  # runs from before --up-conv had the authors' decoder
    explicit = getattr(cfg, "explicit", ())
    for name in explicit:
        if resume_kind(name) != FIXED:
            values[name] = getattr(cfg, name)
        elif name in values and getattr(cfg, name) != values[name]:
            raise ConfigError(f"--{name.replace('_', '-')} cannot change when resuming "
                              f"(the run used {values[name]!r}); only "
                              f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE_OVERRIDES)} may")
    values.update({name: getattr(cfg, name) for name in MACHINE_CHOICES})
    if "out" not in explicit:
        values["out"] = cfg.resume
    values["resume"] = cfg.resume
    defaults = TrainConfig()
    merged = TrainConfig(**{f.name: values.get(f.name, getattr(defaults, f.name)) for f in fields(TrainConfig)})
    merged.kept = {name for name in options.RUN_DECISIONS if name in saved and name not in explicit}
    return merged


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


@dataclass
class RunResult:
    out: str
    step: int
    model: VAEGAN


@dataclass
class Run:
    """Everything a run uses, each choice with the reason for it (`reasons`, by option name)."""
    cfg: TrainConfig          # every value used, no `auto` left: config.json
    kept: dict                # what the checkpoint keeps: the run's facts (options.kept_for_resume)
    reasons: dict
    ctx: distributed.Context
    device: torch.device
    dataset: object
    model: VAEGAN
    optimizers: dict
    train_step: TrainStep
    loader: object
    steps_per_epoch: int
    start_step: int
    resumed: bool
    skips: dict               # steps on which the decoder, the discriminator did not update, since the start
    unreadable: set           # image files skipped as unreadable, since the start
    stop: StopRequest
    tally: StepTally

    def note_unreadable(self, bad_files, log):
        for path in bad_files:
            if path not in self.unreadable:
                self.unreadable.add(path)
                log.line(f"vaegan: skipped unreadable image {path} ({len(self.unreadable)} skipped so far)")
        if len(self.unreadable) > max(1, len(self.dataset) // 10):
            raise DataError(f"{len(self.unreadable)} of {len(self.dataset)} images in {self.dataset.name} are "
                            f"unreadable (first: {sorted(self.unreadable)[0]})")

    def read_tally(self, new_interval=True):
        """(the last step's stats, updated, skips in the interval): one synchronisation; a non-finite step
        stops the run here, naming it."""
        current, updated, interval, total, bad = self.tally.read(new_interval)
        self.skips.update(total)
        if bad is not None:
            step, losses = bad
            raise FloatingPointError(f"step {step}: loss became non-finite "
                                     f"({', '.join(f'{n}={v}' for n, v in losses.items() if n in current)}); "
                                     f"nothing was updated from it on; the last good checkpoint is in {self.cfg.out}")
        return current, updated, interval

    def save_checkpoint(self, step, paths, writer):
        """A snapshot at this step boundary, written on the writer's thread while training goes on."""
        distributed.check_replicas(self.model, self.ctx)
        if not self.ctx.is_main:
            return
        state = checkpoint.snapshot({"step": step, "config": self.kept, "model": self.model.state_dict(),
                                     "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                                     "skips": self.skips, "unreadable": sorted(self.unreadable),
                                     "torch_rng": torch.get_rng_state()})
        writer.submit(lambda: [checkpoint.save(path, state) for path in paths])


def train(cfg):
    """Train as `cfg` says; returns the run directory, the last step and the model."""
    options.check(cfg)
    if cfg.resume:
        saved = checkpoint.load(cfg.resume)
        cfg = merge_resumed_config(cfg, saved["config"])
    else:
        saved = None
        cfg = cfg.resolved()
        if os.path.exists(os.path.join(cfg.out, checkpoint.CHECKPOINT)):
            raise ConfigError(f"{cfg.out} already holds a run: pass --resume {cfg.out} to continue it, "
                              "or choose another --out")
    device = options.resolve_device(cfg.device)
    ctx = distributed.setup(device.type)
    try:
        return loop(setup(cfg, ctx, device, saved))
    finally:
        distributed.teardown(ctx)


def select_device(device, ctx):
    """The device this process trains on, made CUDA's current device before anything is created: the checkpoint
    writer's event, eager Triton launches and torch's own allocations without a device go to it (not to
    device 0). With torchrun it is the process's local rank; DALI and the kernels' check need the index."""
    if device.type != "cuda":
        return device
    if ctx.distributed:
        device = torch.device("cuda", ctx.local_rank)
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def setup(cfg, ctx, device, saved):
    """Resolve the options, build the data, the model, its optimizers, the step and the loader,
    restore a checkpoint, and write config.json (the run's facts and this machine's choices, with the
    reasons) in the run directory."""
    device = select_device(device, ctx)
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg.data, "train", cfg.image_size, cfg.channels)
    requested = cfg
    cfg, reasons = options.resolve(cfg, device, ctx.world_size, dataset, kept=getattr(cfg, "kept", ()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once
    columns = [dataset.attribute_names.index(n) for n in cfg.attributes.split(",")] if cfg.attributes else None
    stop = StopRequest()
    model, optimizers, train_step = build_step(cfg, device, ctx, columns, stop)
    start_step, skips, unreadable = 0, {"decoder": 0, "discriminator": 0}, set()
    if saved is not None:
        model.load_state_dict(saved["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(saved["optimizers"][name])
        start_step, skips, unreadable = saved["step"], dict(saved["skips"]), set(saved["unreadable"])
        torch.set_rng_state(saved["torch_rng"])
    # a resumed optimizer's saved rate may be a float or a tensor on another device, and its implementation
    # flags (foreach, fused, capturable) are the saved run's
    reset_learning_rate(optimizers, learning_rate(cfg.lr_schedule, cfg.lr, start_step, cfg.lr_schedule_steps),
                        tensor_lr=cfg.compile)
    reset_implementation(optimizers, cfg.optimizer, cfg.optimizer_impl, tensor_lr=cfg.compile)
    distributed.broadcast_state(model, ctx)
    if cfg.compile:
        cfg = compile_before_training(cfg, requested, reasons, train_step, optimizers, ctx, device, start_step,
                                      len(dataset.attribute_names))
    loader, sampler, loader_kind, reasons["loader"] = open_loader(cfg, dataset, ctx, device, start_step,
                                                                  reasons["loader"], requested.loader == "auto")
    cfg = replace(cfg, loader=loader_kind)
    if ctx.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        checkpoint.remove_stale_temporaries(cfg.out)
        checkpoint.write_json(os.path.join(cfg.out, "config.json"), config_json(cfg, reasons))
    tally = StepTally(device, STEP_STATS + (("stop",) if ctx.distributed else ()), skips)
    return Run(cfg, options.kept_for_resume(cfg), reasons, ctx, device, dataset, model, optimizers,
               train_step, loader, sampler.steps_per_epoch, start_step, saved is not None, skips, unreadable, stop,
               tally)


def compile_before_training(cfg, requested, reasons, train_step, optimizers, ctx, device, start_step,
                            attribute_count):
    """Compile every variant of the step before the first step (TrainStep.compile_now); the processes agree on
    the outcome (one all-reduce of a failure flag): any failing makes all run eager, each saying why, so that
    their collectives keep matching. Compiling by default, that is the fallback; an explicit --compile that
    fails stops the run. Returns the configuration the run then has."""
    failure = train_step.compile_now(cfg.batch_size, (cfg.channels, cfg.image_size, cfg.image_size), attribute_count)
    if not distributed.any_rank(failure is not None, ctx, device):
        if requested.compile is None:
            reasons["compile"] = "default with CUDA, compiled before the first step"
        return cfg
    why = failure or "on another process"
    if ctx.distributed:
        print(f"vaegan: process {ctx.rank}: compiling the step failed {'here (' + why + ')' if failure else why}; "
              "every process runs eager", file=sys.stderr, flush=True)
    if requested.compile:
        raise RuntimeError(f"--compile was requested, but compiling the step failed ({why}); "
                           "leave --compile out to run eager where compiling fails")
    train_step.run_eager()
    cfg = replace(cfg, compile=False, cuda_graphs=False, max_autotune=False)
    reasons["compile"] = f"default with CUDA, but compiling failed ({why}), so eager"
    # a float rate, as a run that never compiled holds it (a tensor rate rounds differently on CUDA)
    reset_learning_rate(optimizers, learning_rate(cfg.lr_schedule, cfg.lr, start_step, cfg.lr_schedule_steps),
                        tensor_lr=False)
    reset_implementation(optimizers, cfg.optimizer, cfg.optimizer_impl, tensor_lr=False)
    return cfg


def loop(run):
    cfg, ctx = run.cfg, run.ctx
    schedule = checkpoint.CheckpointSchedule(cfg.checkpoint_minutes, cfg.checkpoint_every, cfg.keep_every, cfg.steps,
                                             cfg.log_every, lambda flag: distributed.any_rank(flag, ctx, run.device))
    grids = SampleGrids(run.model, run.dataset, cfg.latent_size, cfg.seed, cfg.out, ctx.is_main,
                        run.train_step.attribute_columns)
    log = RunLog(cfg, ctx.is_main, run.start_step, ctx.world_size)
    log.start(run)
    watch = None
    if cfg.collapse_check_every and run.model.encoder is not None:
        watch = CollapseWatch(run.model, run.dataset, cfg.collapse_check_every, run.train_step.attribute_columns)
    run.model.train()
    step = run.start_step
    # the writer's thread writes checkpoints and grids; leaving this block waits for its last job (after
    # closing the progress bar: an error is then printed on a line of its own)
    with run.stop, contextlib.closing(checkpoint.Writer(run.device)) as writer, contextlib.closing(log):
        if not run.resumed:
            run.save_checkpoint(0, schedule.paths(cfg.out, 0), writer)  # from here on a kill leaves a checkpoint
        for images, attributes, bad_files in run.loader:
            writer.check()  # a failed write (a full disk) stops the run at the next step
            run.note_unreadable(bad_files, log)
            run.tally.add(run.train_step(images, attributes, step))
            step += 1
            log.progress.update(1)
            follow_schedule(run.optimizers, cfg, step)
            # one process stops at once; several stop together, at the log step that reads the request
            stopping = run.stop.requested and not ctx.distributed
            checks = {"recon_check": watch.check(step, log.line)} if watch is not None and watch.due(step) else {}
            if step % cfg.log_every == 0 or step == cfg.steps or stopping:
                losses, updated, skipped = run.read_tally()
                log.step(step, losses, updated, skipped, len(run.unreadable), checks)
                stopping = stopping or losses.get("stop", 0.0) > 0  # any process's request (StepAverage)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                grids.save(step, writer)
            if schedule.due(step, stopping):
                run.read_tally(new_interval=False)  # the skips in all; no checkpoint after a non-finite step
                if watch is not None:  # each checkpoint's reconstructions checked: the last good one is known
                    watch.check(step, log.line)
                run.save_checkpoint(step, schedule.paths(cfg.out, step), writer)
                if watch is not None:
                    watch.saved(step, schedule.paths(cfg.out, step))
            if stopping:
                log.line(f"vaegan: stop requested; saved step {step} to {cfg.out}, resume with --resume {cfg.out}")
                break
    if run.unreadable:
        log.line(f"vaegan: {len(run.unreadable)} unreadable image(s) were skipped (listed in the checkpoint)")
    log.line(f"vaegan: done at step {step}; run directory {cfg.out}")
    return RunResult(cfg.out, step, run.model)
