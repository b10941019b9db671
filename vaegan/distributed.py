"""Data-parallel training across processes started by torchrun (NCCL on GPUs, gloo on CPU).

Gradients are averaged by our own reducer rather than by wrapping each network in
DistributedDataParallel: the split update calls the decoder and the discriminator several
times per backward pass (and once with detached parameters), which DDP's reducer does not
model. OverlappedGradientReducer starts bucketed all-reduces during the backward pass (or,
without it, average_step does one flat all-reduce after it); a small all-reduce after the
backward carries the equilibrium costs (so every rank takes the same skip decisions), the stop
request of a rank that received SIGTERM, and the BatchNorm running statistics.

BatchNorm: by default each rank normalises with the statistics of its own batch (as the
paper's single-GPU batch of 64 did) and the running statistics are averaged across ranks
every step, so that replicas stay identical, buffers included. `--sync-bn` replaces every
BatchNorm with GlobalBatchNorm, whose batch statistics are those of the global batch: then
N processes compute exactly what one process computes on the concatenated batch.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup(device_type):
    """Join the process group torchrun describes in the environment; a no-op without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank)


def teardown(ctx):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_state(module, ctx):
    """Make every rank start from rank 0's parameters and buffers."""
    if ctx.distributed:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def running_stat_buffers(module):
    return [b for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))]


class OverlappedGradientReducer:
    """Averages gradients across ranks while the backward pass is still running.

    Parameters are grouped, in reverse order of registration (roughly the order in which the
    backward pass finishes them), into buckets of about `bucket_bytes`; a hook after each
    parameter's gradient is accumulated copies it into its bucket, and a full bucket starts an
    asynchronous all-reduce at once. `finish()` waits for them and writes the averages back.
    Each hook fires once per backward pass, after every use of the parameter has contributed
    (the routed step uses the decoder and the discriminator several times), so what is reduced
    is the complete gradient. Under torch.compile the backward is one compiled region and the
    hooks fire when it ends: the buckets then go out back to back instead of overlapping.
    """

    def __init__(self, module, ctx, bucket_bytes=25 * 2 ** 20):
        self.ctx = ctx
        params = [p for p in module.parameters() if p.requires_grad][::-1]
        self.buckets, self.bucket_of, bucket, size = [], {}, [], 0
        for p in params:
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(bucket)
                bucket, size = [], 0
        if bucket:
            self.buckets.append(bucket)
        self.flat = [torch.zeros(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device) for b in self.buckets]
        self.offsets = {}
        for i, b in enumerate(self.buckets):
            offset = 0
            for p in b:
                self.bucket_of[p], self.offsets[p] = i, offset
                offset += p.numel()
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self.active = True
        self.reset()

    def reset(self):
        self.pending = [len(b) for b in self.buckets]
        self.works = [None] * len(self.buckets)
        self.launched = 0  # buckets go out in index order on every rank, as collectives must

    def _launch_ready(self):
        while self.launched < len(self.buckets) and self.pending[self.launched] == 0:
            self.works[self.launched] = dist.all_reduce(self.flat[self.launched], async_op=True)
            self.launched += 1

    def _ready(self, p):
        if not self.active:  # the compile trial: no collectives
            return
        i, offset = self.bucket_of[p], self.offsets[p]
        self.flat[i][offset:offset + p.numel()].copy_(p.grad.reshape(-1))
        self.pending[i] -= 1
        self._launch_ready()

    def finish(self):
        """Wait for every bucket (zeros for parameters that got no gradient) and leave the averaged
        gradients in `.grad`."""
        for i, b in enumerate(self.buckets):
            if self.pending[i]:
                for p in b:
                    if p.grad is None:
                        self.flat[i][self.offsets[p]:self.offsets[p] + p.numel()].zero_()
                self.pending[i] = 0
        self._launch_ready()
        for i, b in enumerate(self.buckets):
            self.works[i].wait()
            self.flat[i].div_(self.ctx.world_size)
            for p in b:
                if p.grad is not None:
                    p.grad.copy_(self.flat[i][self.offsets[p]:self.offsets[p] + p.numel()].view_as(p.grad))
        self.reset()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def average_step(module, scalars, ctx, reducer=None):
    """Average gradients (unless `reducer`, an OverlappedGradientReducer, has them on the way), BatchNorm
    running statistics and `scalars` (a dict of 0-d tensors) across ranks.

    Returns the averaged scalars as 0-d tensors on their device (no synchronisation).
    """
    names = sorted(scalars)
    dtype = next(module.parameters()).dtype  # float32, or float64 with --precision fp64
    values = torch.stack([scalars[n].to(dtype).reshape(()) for n in names]) if names else None
    if ctx.distributed and reducer is not None:
        reducer.finish()
    if ctx.distributed:
        params = [p for p in module.parameters() if p.grad is not None] if reducer is None else []
        buffers = running_stat_buffers(module)
        tensors = [p.grad for p in params] + buffers + ([values] if values is not None else [])
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat)
        flat /= ctx.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    return dict(zip(names, values.unbind())) if names else {}


class StepAverage:
    """The step's multi-process hook (TrainStep's `reduce`): the stop request travels with the stats, so
    that every process stops after the same step, and gradients (in buckets during the backward pass
    when `overlap`), BatchNorm statistics and the stats are averaged."""

    def __init__(self, model, ctx, overlap, stop=None):
        self.model, self.ctx, self.stop = model, ctx, stop
        self.reducer = OverlappedGradientReducer(model, ctx) if overlap else None

    def __call__(self, stats):
        requested = float(self.stop is not None and self.stop.requested)
        stats["stop"] = torch.full((), requested, device=next(self.model.parameters()).device)
        return average_step(self.model, stats, self.ctx, self.reducer)

    def local(self, stats):
        """What __call__ returns, in the same form, without collectives (the compile trial: processes compile on
        their own); the gradients stay this process's."""
        stats["stop"] = torch.zeros((), device=next(self.model.parameters()).device)
        return average_step(self.model, stats, Context())


def any_rank(flag, ctx, device):
    """The same decision on every rank: any rank's True (one small all-reduce)."""
    if not ctx.distributed:
        return flag
    flags = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.item() > 0


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch across all ranks.

    Works on any backend (torch.nn.SyncBatchNorm is CUDA-only); the statistics travel through
    a differentiable all-reduce, so the backward pass is that of the global batch too.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2-D or 4-D input, got {x.dim()}-D")

    def forward(self, x):
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = xf.new_full((1,), x.numel() // channels)
        totals = dist_nn.all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = totals[channels:2 * channels] / n - mean * mean
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
                self.num_batches_tracked.add_(1)
        return y.to(x.dtype)


def convert_to_global_batchnorm(module):
    """Replace every BatchNorm1d/2d in `module` by a GlobalBatchNorm with the same state."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            convert_to_global_batchnorm(child)
    return module


def check_replicas(module, ctx):
    """Raise if any rank's parameters or buffers differ from rank 0's (compared by per-tensor checksums)."""
    if not ctx.distributed:
        return
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    local = torch.stack([torch.stack([t.double().sum(), t.double().pow(2).sum()]) for t in tensors]).flatten()
    reference = local.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([float(not torch.equal(local.cpu(), reference.cpu()))], device=local.device)
    dist.all_reduce(mismatch)
    if mismatch.item() > 0:
        raise RuntimeError(f"replicas diverged: {int(mismatch.item())} rank(s) hold parameters or buffers "
                           "that differ from rank 0's")
