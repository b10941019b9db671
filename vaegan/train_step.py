"""One training step, called as one: `TrainStep(images, attributes, step)`, in the mode `StepMode` says
(eager or torch.compile, CUDA graphs, channels-last).

A step draws its noise from (seed, step), takes each network's gradient of its own loss in one
routed backward pass (vaegan/gradients.py), averages across processes through its `reduce` hook,
decides on the device which optimizers keep their update (vaegan/decisions.py) and steps them
(vaegan/optimizers.py). Every mode computes what the eager step computes, and the tests hold each
to the slow reference. How the known pitfalls are avoided:
  * one backward pass, no `retain_graph`: nothing for AOTAutograd's donated buffers to trip over;
  * no `requires_grad` toggling between phases: the discriminator is frozen by detaching its
    parameters inside the forward (`gradients.frozen`), so one graph serves every step;
  * the reparameterisation seed is a device tensor and the learning rate a tensor: a new seed or
    a new learning rate is new data, neither a recompile nor a new CUDA graph;
  * BatchNorm buffers are updated inside the compiled forward and averaged across ranks after the
    backward, in the same all-reduce as the equilibrium costs (vaegan/distributed.py).
Nothing in a step waits for the device: each optimizer steps under a 0-d bool mask that keeps or
discards its update (`optimizers.masked_step`; compiled on its own, in place, with no host value).
The host-side rule (optimizers that simply do not run) is the reference: the tests hold the masked
steps bit-identical to it.
"""
import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from kernels import philox

from .decisions import GUARDED_STATS, step_decisions
from .gradients import routed_losses
from .optimizers import create_state, mark_state_static, masked_step, masked_update


@dataclass
class StepMode:
    compile: bool = False        # torch.compile the forward (with its routed backward) and each optimizer step
    cuda_graphs: bool = False    # with compile: mode "reduce-overhead" (inductor's CUDA graphs)
    channels_last: bool = False
    backend: str = "inductor"    # the tests use "aot_eager" on CPUs (dynamo + AOTAutograd, no code generation)
    max_autotune: bool = False   # with compile (inductor): kernels chosen by timing alternatives

    def compile_mode(self):
        """torch.compile's `mode`: None (inductor's default), reduce-overhead (CUDA graphs), or max-autotune
        (with CUDA graphs) / max-autotune-no-cudagraphs."""
        if self.max_autotune:
            return "max-autotune" if self.cuda_graphs else "max-autotune-no-cudagraphs"
        return "reduce-overhead" if self.cuda_graphs else None

    def describe(self):
        if not self.compile:
            mode = "eager"
        else:
            mode = (f"torch.compile ({self.backend}{', CUDA graphs' if self.cuda_graphs else ''}"
                    f"{', max-autotune' if self.max_autotune else ''})")
        return f"{mode}, {'channels-last' if self.channels_last else 'contiguous'}"


class StepOutcome(NamedTuple):
    """What a step leaves for the tally: all on the device, nothing read."""
    step: torch.Tensor      # 0-d int64
    stats: dict             # name: 0-d tensor (gradients.STEP_STATS, averaged across processes)
    update: dict            # network: 0-d bool, whether its optimizer's update was kept
    finite: torch.Tensor    # 0-d bool


class TrainStep:
    """train_step(images, attributes, step) -> StepOutcome; its parts (noise, gradients, decisions,
    apply) are there for the tests.

    seed: the run's seed (the step's noise is Philox at (seed, step)); rank, world_size: this
    process's place (its rows of the global batch's noise); attribute_columns: the columns of the
    loader's attribute table a conditional model takes, else None; reduce: stats -> stats, the
    multi-process hook (averages gradients, BatchNorm statistics and the stats), or None."""

    # On a CPU the decisions live in host memory: reading them costs nothing, so the optimizers step
    # or skip plainly there, without masked_step's copies of every parameter and state tensor (0.29 s
    # against 0.08 s per step at the built-in demo's settings on 2 cores).
    read_cpu_decisions = True

    def __init__(self, model, optimizers, update_config, autocast_dtype, mode, seed=0, rank=0, world_size=1,
                 attribute_columns=None, reduce=None):
        self.model, self.optimizers, self.update_config, self.autocast_dtype = model, optimizers, update_config, autocast_dtype
        self.mode, self.seed, self.rank, self.world_size = mode, seed, rank, world_size
        self.attribute_columns, self.reduce = attribute_columns, reduce
        first = next(model.parameters())
        self.device, self.param_dtype = first.device, first.dtype
        # the columns as a device tensor: indexing with a Python list would copy it to the device every step
        self.attribute_index = (None if attribute_columns is None else
                                torch.tensor(attribute_columns, dtype=torch.int64, device=self.device))
        if mode.channels_last:
            model.to(memory_format=torch.channels_last)
        self._build()

    def _build(self):
        """The step's functions, eager or compiled as self.mode says."""
        mode, optimizers = self.mode, self.optimizers
        self.forward = routed_losses
        self.optimizer_steps = {name: opt.step for name, opt in optimizers.items()}
        self.masked_steps = {name: functools.partial(masked_step, opt) for name, opt in optimizers.items()}
        self.noise = philox.step_noise  # (seed, step) -> (noise seed, prior codes), on the device
        self.decide = functools.partial(step_decisions, self.update_config, self.model)
        self.graphs_per_step = None
        if mode.compile:
            # past dynamo's recompile limit the step would run eager, silently: make that an error
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            graphs = mode.compile_mode()
            self.forward = torch.compile(routed_losses, backend=mode.backend, mode=graphs)
            self.optimizer_steps = {name: torch.compile(opt.step, backend=mode.backend, mode=graphs)
                                    for name, opt in optimizers.items()}
            # each masked step one graph (their state is created eagerly before, in apply)
            self.masked_steps = {name: torch.compile(opt.masked_step if hasattr(opt, "masked_step") else
                                                     functools.partial(masked_update, opt),
                                                     backend=mode.backend, mode=graphs, fullgraph=True)
                                 for name, opt in optimizers.items()}
            self.decide = torch.compile(self.decide, backend=mode.backend)
            self.noise = torch.compile(self.noise, backend=mode.backend)

    def run_eager(self):
        self.mode = replace(self.mode, compile=False, cuda_graphs=False, max_autotune=False)
        self._build()

    def compile_now(self, batch, image_shape, attribute_count=0):
        """Compile every variant of the step the run will call before training, by running the step on
        random images twice (CUDA-graph trees record on their second call), each time with every optimizer
        then stepping as the run steps it (masked on a GPU, plainly on a CPU); then put the parameters, the
        BatchNorm statistics and the optimizers' state back exactly as they were (state the trial created
        is zeroed, which is how torch's optimizers start). The multi-process hook runs without collectives
        meanwhile (StepAverage.local), so that processes compile on their own (but for the collectives of a
        --sync-bn forward: a process whose compiling fails runs the rest of the trial eager, keeping pace).

        Returns None, or why compiling failed: the step is then eager. self.graphs_per_step: how many
        graphs dynamo compiled for one step (the backward runs with its forward's)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        existing = [v for opt in self.optimizers.values() for state in opt.state.values() for v in state.values()
                    if torch.is_tensor(v)]
        saved = [t.detach().clone() for t in tensors + existing]
        generator = torch.Generator().manual_seed(0)
        images = torch.rand((batch, *image_shape), generator=generator) * 2 - 1
        attributes = torch.zeros(batch, attribute_count)
        every = {name: torch.ones((), dtype=torch.bool, device=self.device) for name in self.optimizers}
        for opt in self.optimizers.values():
            mark_state_static(opt)  # a resumed run's state, loaded
        reduce = self.reduce
        self.reduce = getattr(reduce, "local", None)  # the stats in the form the run's step gets them
        reducer = getattr(reduce, "reducer", None)
        if reducer is not None:
            reducer.active = False
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        failure = None
        try:
            for trial in range(2):
                for phase in (lambda: self(images, attributes, trial), lambda: self.apply(every)):
                    try:
                        phase()
                    except Exception as e:
                        if failure is not None:
                            raise
                        failure = compile_failure(e)
                        self.run_eager()
                        phase()
        finally:
            self.reduce = reduce
            if reducer is not None:
                reducer.active = True
                reducer.reset()
        if failure is None:
            self.graphs_per_step = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
        with torch.no_grad():
            for t, value in zip(tensors + existing, saved):
                t.copy_(value)
            for opt in self.optimizers.values():
                for state in opt.state.values():
                    for v in state.values():
                        if torch.is_tensor(v) and not any(v is e for e in existing):
                            v.zero_()
            for p in self.model.parameters():
                p.grad = None
        return failure

    def __call__(self, images, attributes, step):
        """The whole step, queued on the device: nothing in it waits for the device."""
        batch = images.shape[0]
        x = images.to(self.device, self.param_dtype, non_blocking=True)
        y = None
        if self.attribute_columns is not None:
            y = attributes.to(self.device, non_blocking=True).index_select(1, self.attribute_index).to(self.param_dtype)
        step_on_device = torch.full((1,), step, dtype=torch.int64, device=self.device)
        noise_seed, z_prior = self.noise(self.seed, step_on_device, batch, self.model.latent_size,
                                         batch * self.world_size, self.rank * batch)
        stats = self.gradients(x, z_prior.to(self.param_dtype), noise_seed, self.rank * batch, y)
        if self.reduce is not None:
            stats = self.reduce(stats)
        update, finite = self.decisions(stats)
        self.apply(update)
        return StepOutcome(step_on_device.reshape(()), stats, update, finite)

    def gradients(self, x, z_prior, noise_seed, row_offset=0, attributes=None):
        """Each network's own gradient in `.grad`; returns the detached stats (no synchronisation)."""
        if self.mode.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mode.compile:
            if not isinstance(noise_seed, torch.Tensor):
                noise_seed = torch.tensor([noise_seed], dtype=torch.int64)
            noise_seed = noise_seed.to(x.device, non_blocking=True)
        if self.mode.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are dead
        for p in self.model.parameters():
            p.grad = None
        total, stats = self.forward(self.model, x, z_prior, self.update_config, noise_seed, row_offset,
                                    self.autocast_dtype, attributes)
        total.backward()
        return stats

    def decisions(self, stats):
        """({network: 0-d bool tensor}, finite): which optimizers step, decided on the device (the
        equilibrium rule and the non-finite guard: a step whose losses or gradients are not all
        finite updates nothing)."""
        names = sorted(name for name in stats if name in GUARDED_STATS)
        costs = (stats["real_cost"], stats["fake_cost"]) if "real_cost" in stats else None
        update, finite = self.decide([stats[n] for n in names], costs)
        return {name: update[name] for name in self.optimizers}, finite

    def apply(self, update):
        """Step the optimizers of the networks `update` names: by a Python bool (the step runs or
        not), or by a 0-d bool tensor (it runs, and is kept only where True: no synchronisation)."""
        for name, step in self.optimizer_steps.items():
            keep = update[name]
            if isinstance(keep, torch.Tensor) and keep.device.type == "cpu" and self.read_cpu_decisions:
                keep = bool(keep)
            if isinstance(keep, torch.Tensor) or keep:
                create_state(self.optimizers[name])  # eagerly: a compiled step only ever updates its state
            if isinstance(keep, torch.Tensor):
                self.masked_steps[name](keep)
            elif keep:
                step()


def compile_failure(error):
    """What the compiler raised, in one line (dynamo wraps it)."""
    while getattr(error, "inner_exception", None) or error.__cause__:
        error = getattr(error, "inner_exception", None) or error.__cause__
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"
