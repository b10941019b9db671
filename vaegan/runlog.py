"""What a run tells its user: the start lines, metrics.jsonl, TensorBoard and the progress bar.

Only the main process writes; the others keep quiet. metrics.jsonl and the TensorBoard events are
appended in the loop's thread, one whole line or record set per log step: a full disk stops the run
there with one line naming the file, and leaves the file and the last checkpoint readable.
"""
import io
import json
import os
import socket
import sys
import time

from tqdm import tqdm

from . import checkpoint
from .config import MACHINE_CHOICES
from .gradients import STEP_STATS
from .models import UP_CONVS
from .schedule import learning_rate

SHOWN_ON_THE_BAR = ("llike", "kl", "dis_loss", "pixel_error")


def trim_metrics(path, last_step):
    """On resume, drop the lines of steps after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    checkpoint.atomic_write(path, lambda f: f.write("".join(kept).encode()))


class ScalarEvents:
    """A TensorBoard event file of the run's scalars (what SummaryWriter writes, without its writer thread,
    whose failures would surface as a traceback from that thread)."""

    def __init__(self, directory, purge_step):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        self.Event, self.Summary = Event, Summary
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                                            f"{os.getpid()}.0")
        start = [Event(wall_time=time.time(), file_version="brain.Event:2")]
        if purge_step:  # TensorBoard hides the events of this step and later from an earlier start
            start += [Event(wall_time=time.time(), step=purge_step, file_version="brain.Event:2"),
                      Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START))]
        self.append(start, "the start of the TensorBoard events")

    def add(self, step, scalars):
        summary = self.Summary(value=[self.Summary.Value(tag=name, simple_value=float(value))
                                      for name, value in scalars.items()])
        self.append([self.Event(wall_time=time.time(), step=step, summary=summary)],
                    f"the TensorBoard events of step {step}")

    def append(self, events, what):
        from tensorboard.summary.writer.record_writer import RecordWriter
        records = io.BytesIO()
        for event in events:
            RecordWriter(records).write(event.SerializeToString())
        checkpoint.append_whole(self.path, records.getvalue(), what)


class RunLog:
    def __init__(self, cfg, is_main, start_step, world_size):
        self.cfg, self.is_main, self.global_batch = cfg, is_main, cfg.batch_size * world_size
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.tensorboard = None
        if is_main:
            trim_metrics(self.metrics_path, start_step)
            self.tensorboard = ScalarEvents(os.path.join(cfg.out, "tensorboard"),
                                            start_step + 1 if start_step else None)
        self.progress = tqdm(total=cfg.steps, initial=start_step, unit="step", disable=not is_main,
                             dynamic_ncols=True, file=sys.stderr)
        self.since = (time.perf_counter(), start_step)

    def line(self, message):
        if self.is_main:
            tqdm.write(message, file=sys.stderr)

    def start(self, run):
        """The lines that say what the run is and every choice it made, with the reason."""
        cfg, ctx, why = run.cfg, run.ctx, run.reasons
        parameters = sum(p.numel() for p in run.model.parameters())
        unused = len(run.dataset) - run.steps_per_epoch * self.global_batch
        conditioned = cfg.attributes.split(",") if cfg.attributes else []
        self.line(f"vaegan: model {cfg.model} ({parameters / 1e6:.1f}M parameters), {cfg.image_size}x{cfg.image_size}x"
                  f"{cfg.channels}, data {run.dataset.name}: {len(run.dataset)} images"
                  + (f", conditioned on {len(conditioned)} attributes ({', '.join(conditioned)}); the encoder "
                     "sees them too" if conditioned else "")
                  + (f", {unused} left over each epoch (a different {unused} each time: only full global batches "
                     "are used)" if unused else ""))
        augment = cfg.augment if cfg.flip or cfg.augment == "none" else cfg.augment + " without flips"
        self.line(f"vaegan: device {cfg.device}, precision {cfg.precision} ({why['precision']}), loader {cfg.loader} "
                  f"({why['loader']}), data cache {cfg.data_cache} ({why['data_cache']}), "
                  f"augment {augment}, kernels {cfg.kernels} ({why['kernels']}), "
                  f"{ctx.world_size} process(es) x batch {cfg.batch_size}, "
                  f"BatchNorm {'global (--sync-bn)' if cfg.sync_bn else 'per process'}")
        graphs = run.train_step.graphs_per_step
        self.line(f"vaegan: step {run.train_step.mode.describe()} ({why['compile']})"
                  + (f", {graphs} compiled graphs a step" if graphs else "")
                  + f", optimizers {cfg.optimizer_impl} "
                  f"({why['optimizer_impl']})"
                  + (", thin convolutions padded to multiples of 8 channels" if cfg.pad_channels else "")
                  + (", the decoder's two passes in one call" if cfg.decoder_call == "joint" else "")
                  + (f", BatchNorm and ReLU fused into the convolutions {', '.join(run.model.fused_convolutions)} "
                     "(Triton)" if cfg.fuse_bn_relu else "")
                  + (f", gradients averaged {'in buckets during the backward pass' if cfg.overlap_allreduce else 'after the backward pass'}"
                     if ctx.distributed else ""))
        lr = learning_rate(cfg.lr_schedule, cfg.lr, run.start_step, cfg.lr_schedule_steps)
        self.line(f"vaegan: {cfg.optimizer} lr {cfg.lr:g} ({cfg.lr_schedule}"
                  f"{f', {lr:.3g} at step {run.start_step}' if lr != cfg.lr else ''}), gamma {cfg.gamma:g}, decoder GAN "
                  f"loss {cfg.decoder_gan_loss}{', equilibrium rule' if cfg.equilibrium else ''}, decoder upsampling by "
                  f"{UP_CONVS[cfg.up_conv]}; every value used is "
                  "in config.json")
        if run.resumed:
            def shown(value):
                return ("on" if value else "off") if isinstance(value, bool) else value
            chosen = [f"{name.replace('_', ' ')} {shown(getattr(cfg, name))} ({why[name]})"
                      for name in MACHINE_CHOICES if name in why and name != "loader"]  # the loader: on the line above
            self.line("vaegan: resumed with the run's facts from its checkpoint; this machine's choices, made again: "
                      + ", ".join(chosen))
        self.line(f"vaegan: {'resuming at' if run.resumed else 'starting at'} step {run.start_step} of {cfg.steps}; "
                  f"run directory {cfg.out}")
        self.since = (time.perf_counter(), run.start_step)

    def step(self, step, losses, updated, skipped, unreadable, checks=None):
        """A log step: one line of metrics.jsonl, the same in TensorBoard, and the progress bar's figures;
        checks: more values of this step to record (the reconstruction check's)."""
        cfg = self.cfg
        start, start_step = self.since
        img_per_s = (step - start_step) * self.global_batch / (time.perf_counter() - start)
        record = {"step": step, **{n: losses[n] for n in STEP_STATS if n in losses},
                  "update_decoder": updated.get("decoder", True),
                  "update_discriminator": updated.get("discriminator", True),
                  "skipped_decoder": skipped["decoder"], "skipped_discriminator": skipped["discriminator"],
                  "lr": learning_rate(cfg.lr_schedule, cfg.lr, step - 1, cfg.lr_schedule_steps),
                  "img_per_s": img_per_s, "unreadable_images": unreadable, **(checks or {})}
        if self.is_main:
            checkpoint.append_whole(self.metrics_path, (json.dumps(record) + "\n").encode(),
                                    f"the metrics of step {step}")
            self.tensorboard.add(step, {name: value for name, value in record.items() if name != "step"})
            shown = {n: f"{losses[n]:.3g}" for n in SHOWN_ON_THE_BAR if n in losses}
            self.progress.set_postfix({**shown, "img/s": f"{img_per_s:.0f}"})
        self.since = (time.perf_counter(), step)

    def close(self):
        self.progress.close()
