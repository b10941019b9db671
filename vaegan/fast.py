"""The fast training step: the optimizers' implementation, channels-last, torch.compile, CUDA graphs.

Every mode computes what the eager step computes (vaegan/step.py: one forward, one routed backward),
and the tests hold each to the slow reference. How the known pitfalls are avoided:
  * one backward pass, no `retain_graph`: nothing for AOTAutograd's donated buffers to trip over;
  * no `requires_grad` toggling between phases: the discriminator is frozen by detaching its
    parameters inside the forward (`step.frozen`), so one graph serves every step;
  * the reparameterisation seed is a device tensor and the learning rate a tensor: a new seed or
    a new learning rate is new data, neither a recompile nor a new CUDA graph;
  * BatchNorm buffers are updated inside the compiled forward and averaged across ranks after the
    backward, in the same all-reduce as the equilibrium costs (vaegan/distributed.py).
Nothing in a step waits for the device: the equilibrium rule and the non-finite guard decide on
the device (`TrainStep.decisions`), and each optimizer steps under a 0-d bool mask that keeps or
discards its update (`masked_step`; compiled on its own, in place, with no host value). The
host-side rule (vaegan/step.py: equilibrium_decisions, optimizers that simply do not run) is the
reference: the tests hold the masked steps bit-identical to it.
"""
import functools
from dataclasses import dataclass

import torch

from kernels import philox

from .config import ConfigError
from .step import equilibrium_masks, routed_losses

OPTIMIZER_IMPLS = ("auto", "for-loop", "foreach", "fused", "apex")  # apex: refused, with the reason


@dataclass
class FastOptions:
    compile: bool = False        # torch.compile the forward (with its routed backward) and each optimizer step
    cuda_graphs: bool = False    # with compile: mode "reduce-overhead" (inductor's CUDA graphs)
    channels_last: bool = False
    backend: str = "inductor"    # the tests use "aot_eager" on CPUs (dynamo + AOTAutograd, no code generation)

    def describe(self):
        if not self.compile:
            mode = "eager"
        else:
            mode = f"torch.compile ({self.backend}{', CUDA graphs' if self.cuda_graphs else ''})"
        return f"{mode}, {'channels-last' if self.channels_last else 'contiguous'}"


APEX_REFUSED = ("--optimizer-impl apex is refused: NVIDIA apex's FusedAdam counts its steps in param_group['step'], "
                "a host integer that a skipped step (every step here may be skipped, by the equilibrium rule or the "
                "non-finite guard, decided on the device) cannot restore without waiting for the device, so skips "
                "would advance its bias correction; torch's fused Adam (--optimizer-impl fused) keeps its step with "
                "its state and is skipped exactly")


def resolve_optimizer_impl(choice, optimizer, device_type):
    """("for-loop" | "foreach" | "fused", why): an explicit choice that cannot run is an error."""
    if choice == "auto":
        if optimizer == "adam" and device_type == "cuda":
            return "fused", "default for adam on CUDA"
        return "foreach", "default" + (" (torch has no fused RMSprop)" if optimizer == "rmsprop" else "")
    if choice == "fused" and optimizer != "adam":
        raise ConfigError(f"--optimizer-impl fused: torch has no fused {optimizer}; use foreach (the default)")
    if choice == "apex":
        raise ConfigError(APEX_REFUSED)
    return choice, "requested"


def make_optimizer(kind, impl, groups, lr, tensor_lr):
    """RMSprop (alpha 0.9, eps 1e-8) or Adam (betas 0.5, 0.999) with coupled L2 decay, in `impl`.

    tensor_lr: the learning rate as a tensor on the parameters' device, so that a compiled step
    neither recompiles when it changes nor holds a CPU constant. On CUDA the for-loop and foreach
    forms are capturable (their step counts live on the GPU: masked_step and CUDA graphs need no
    host value)."""
    first = next(p for g in groups for p in (g["params"] if isinstance(g, dict) else [g]))
    lr_value = torch.tensor(lr, device=first.device) if tensor_lr else lr
    flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}.get(impl, {})
    if first.is_cuda and impl in ("for-loop", "foreach"):
        flags["capturable"] = True
    if kind == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr_value, alpha=0.9, eps=1e-8, **flags)
    if tensor_lr and impl == "foreach":
        flags["capturable"] = True  # torch's foreach Adam takes a tensor learning rate only when capturable
    return torch.optim.Adam(groups, lr=lr_value, betas=(0.5, 0.999), **flags)


def set_learning_rate(optimizers, lr):
    """Change every optimizer's learning rate in place (a tensor learning rate keeps its tensor: no recompile)."""
    for opt in optimizers.values():
        for group in opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


def reset_learning_rate(optimizers, lr, tensor_lr):
    """After loading a state dict (whose saved rate may be a float, or a tensor on another device):
    the rate `lr`, as make_optimizer would hold it."""
    for opt in optimizers.values():
        for group in opt.param_groups:
            device = group["params"][0].device if group["params"] else "cpu"
            group["lr"] = torch.tensor(lr, device=device) if tensor_lr else lr


def masked_step(optimizer, update):
    """optimizer.step(), kept only where `update` (a 0-d bool tensor) is True: otherwise every
    parameter and every state tensor is left exactly as it was (RMSprop's running average does not
    decay; Adam's step count does not advance). Decided on the device: no synchronisation. State the
    optimizer creates on its first step counts as zeros before it (as torch's optimizers start).
    An optimizer that keeps state of its own in param_groups (apex's FusedAdam: an integer 'step')
    cannot be masked so: refused with an error rather than silently advanced."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    group_state = [{k: v for k, v in group.items() if k != "params" and not torch.is_tensor(v)}
                   for group in optimizer.param_groups]
    before = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)})
              for p in params]
    optimizer.step()
    for group, before_step in zip(optimizer.param_groups, group_state):
        changed = [k for k, v in before_step.items() if group.get(k) != v]
        if changed:
            raise RuntimeError(f"{type(optimizer).__name__} changed {', '.join(changed)} in its param_groups during "
                               "a step: a masked step cannot undo that without a device synchronisation")
    with torch.no_grad():
        for p, (old, old_state) in zip(params, before):
            p.copy_(torch.where(update, p, old))
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    was = old_state[key] if key in old_state else torch.zeros_like(value)
                    value.copy_(torch.where(update, value, was))


def check_fast_options(options, device_type, collectives_in_forward=False):
    """collectives_in_forward: --sync-bn across processes (an all-reduce inside every BatchNorm)."""
    if options.cuda_graphs and not options.compile:
        raise ConfigError("--cuda-graphs captures the compiled step: add --compile")
    if options.cuda_graphs and device_type != "cuda":
        raise ConfigError("--cuda-graphs needs CUDA; this run is on the CPU")
    if options.cuda_graphs and collectives_in_forward:
        raise ConfigError("--cuda-graphs with --sync-bn across processes would capture NCCL all-reduces in a CUDA "
                          "graph, which is not supported here: drop one of them (--compile alone works with --sync-bn)")


class TrainStep:
    """gradients(...) then apply(update): the step in the mode `options` chooses."""

    # On a CPU the decisions live in host memory: reading them costs nothing, so the optimizers step
    # or skip plainly there, without masked_step's copies of every parameter and state tensor (0.29 s
    # against 0.08 s per step at the built-in demo's settings on 2 cores).
    read_cpu_decisions = True

    def __init__(self, model, optimizers, scfg, autocast_dtype, options):
        self.model, self.optimizers, self.scfg, self.autocast_dtype = model, optimizers, scfg, autocast_dtype
        self.options = options
        self.forward = routed_losses
        self.optimizer_steps = {name: opt.step for name, opt in optimizers.items()}
        self.masked_steps = {name: functools.partial(masked_step, opt) for name, opt in optimizers.items()}
        self.noise = philox.step_noise  # (seed, step) -> (noise seed, prior codes), on the device
        self.decide = functools.partial(step_decisions, scfg, model)
        if options.channels_last:
            model.to(memory_format=torch.channels_last)
        if options.compile:
            # past dynamo's recompile limit the step would run eager, silently: make that an error
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            mode = "reduce-overhead" if options.cuda_graphs else None
            self.forward = torch.compile(routed_losses, backend=options.backend, mode=mode)
            self.optimizer_steps = {name: torch.compile(opt.step, backend=options.backend, mode=mode)
                                    for name, opt in optimizers.items()}
            self.masked_steps = {name: torch.compile(step, backend=options.backend, mode=mode)
                                 for name, step in self.masked_steps.items()}
            self.decide = torch.compile(self.decide, backend=options.backend)
            self.noise = torch.compile(self.noise, backend=options.backend)

    def gradients(self, x, z_prior, noise_seed, row_offset=0, attributes=None):
        """Each network's own gradient in `.grad`; returns the detached stats (no synchronisation)."""
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.options.compile:
            if not isinstance(noise_seed, torch.Tensor):
                noise_seed = torch.tensor([noise_seed], dtype=torch.int64)
            noise_seed = noise_seed.to(x.device, non_blocking=True)
        if self.options.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are dead
        for p in self.model.parameters():
            p.grad = None
        total, stats = self.forward(self.model, x, z_prior, self.scfg, noise_seed, row_offset, self.autocast_dtype,
                                    attributes)
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
            if isinstance(keep, torch.Tensor):
                self.masked_steps[name](keep)
            elif keep:
                step()


GUARDED_STATS = ("kl", "llike", "dis_loss", "gen_loss", "real_cost", "fake_cost")


def step_decisions(scfg, model, losses, costs):
    """The device side of TrainStep.decisions: losses, a list of 0-d tensors; costs, (real, fake) or None."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = torch.stack([loss.float() for loss in losses]).isfinite().all()
    finite = finite & torch.stack(torch._foreach_norm(grads)).isfinite().all()
    update_dec = update_dis = finite
    if costs is not None:
        dec, dis = equilibrium_masks(scfg, *costs)
        update_dec, update_dis = dec & finite, dis & finite
    return {"encoder": finite, "decoder": update_dec, "discriminator": update_dis}, finite
