"""The three networks' optimizers: the authors' RMSprop (or Adam) with DeepPy's weight decay, the
learning rate as the schedule sets it, and the masked step that keeps or discards an update by a
decision made on the device (torch's optimizers through copies of everything they hold; the fused
RMSprop in its kernel, which reads nothing but the decision when it is False)."""
import torch
from torch.optim.adam import adam as adam_functional
from torch.optim.rmsprop import rmsprop as rmsprop_functional

from .schedule import learning_rate


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


class FusedMaskedRMSprop(torch.optim.RMSprop):
    """torch's RMSprop (centered=False, momentum=0, coupled weight decay) as one Triton kernel per
    parameter (kernels/rmsprop.py). masked_step(update) keeps the update where the 0-d bool `update`
    is True; where it is False the kernel reads the flag and nothing else, so a skipped network's
    parameters, gradients and state stay where they are, unread. Its state is torch's (`step`, a
    float32 tensor on the parameter's device, and `square_avg`) and its param_groups are torch's: state
    dicts load into torch.optim.RMSprop and back. Float32 parameters only (the kernel's)."""

    def __init__(self, params, lr, alpha=0.9, eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, foreach=False)
        self._counts_on_device()

    def _counts_on_device(self):
        # torch's RMSprop keeps a step count on the parameter's device only when capturable (else on the
        # CPU); the masked step adds the device's flag to it
        for group in self.param_groups:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            group.update(implementation_flags("rmsprop", "fused", device))

    @torch.no_grad()
    def masked_step(self, update):
        """One step, kept only where `update` (a 0-d bool tensor on the parameters' device) is True; no
        synchronisation. State is created as zeros before any kernel, by torch's RMSprop._init_group
        (which torch.compile runs before its graph, so the state is never a compiled graph's output)."""
        from kernels.rmsprop import masked_rmsprop_
        for group in self.param_groups:
            if group["momentum"] or group["centered"] or group["maximize"]:
                raise ValueError("FusedMaskedRMSprop has no momentum, centered or maximize form")
            params, grads, square_avgs, momentum_buffers, grad_avgs, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, square_avgs, momentum_buffers, grad_avgs, steps)
            lr = group["lr"]
            if params and not isinstance(lr, torch.Tensor):
                lr = torch.full((), lr, dtype=torch.float32, device=params[0].device)  # once per group, no copy
            for p, grad, square_avg, step in zip(params, grads, square_avgs, steps):
                # the kernel's checks first: an update it refuses leaves the count as it was
                masked_rmsprop_(p, grad, square_avg, update, lr, group["weight_decay"], group["alpha"], group["eps"])
                step.add_(update)

    def load_state_dict(self, state_dict):
        """torch's, then each state in the kernel's terms: the step count on the parameter's device and
        square_avg in the parameter's memory format (a state saved by torch's RMSprop, or in another one)."""
        super().load_state_dict(state_dict)
        self._counts_on_device()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    state["step"] = state["step"].to(p.device)
                    state["square_avg"] = torch.empty_like(p).copy_(state["square_avg"])

    def step(self, closure=None):
        """One step, kept."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"FusedMaskedRMSprop steps parameters on one device, not {sorted(map(str, devices))}")
        if devices:
            self.masked_step(torch.ones((), dtype=torch.bool, device=devices.pop()))
        return loss


def make_optimizer(kind, impl, groups, lr, tensor_lr):
    """RMSprop (alpha 0.9, eps 1e-8) or Adam (betas 0.5, 0.999) with coupled L2 decay, in `impl`
    (fused: torch's fused Adam, or our FusedMaskedRMSprop).

    tensor_lr: the learning rate as a tensor on the parameters' device, so that a compiled step
    neither recompiles when it changes nor holds a CPU constant. On CUDA the for-loop and foreach
    forms are capturable (their step counts live on the GPU: masked_step and CUDA graphs need no
    host value); the fused RMSprop keeps its counts on the parameters' device everywhere."""
    first = next(p for g in groups for p in (g["params"] if isinstance(g, dict) else [g]))
    lr_value = torch.tensor(lr, device=first.device) if tensor_lr else lr
    if kind == "rmsprop" and impl == "fused":
        return FusedMaskedRMSprop(groups, lr=lr_value, alpha=0.9, eps=1e-8)
    flags = implementation_flags(kind, impl, first.device, tensor_lr)
    if kind == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr_value, alpha=0.9, eps=1e-8, **flags)
    return torch.optim.Adam(groups, lr=lr_value, betas=(0.5, 0.999), **flags)


def implementation_flags(kind, impl, device, tensor_lr=False):
    """The param-group entries that choose how `kind` steps in `impl` for parameters on `device` (foreach,
    fused, capturable), as make_optimizer builds it: every one, torch's defaults too, since a loaded state
    dict replaces them all with the saved run's."""
    if kind == "rmsprop" and impl == "fused":  # FusedMaskedRMSprop: its counts on the parameters' device
        return {"foreach": False, "capturable": device.type != "cpu"}
    flags = {"foreach": {"for-loop": False, "foreach": True}.get(impl),
             "capturable": device.type == "cuda" and impl in ("for-loop", "foreach")}
    if kind == "adam":
        flags["fused"] = True if impl == "fused" else None
        if tensor_lr and impl == "foreach":
            flags["capturable"] = True  # torch's foreach Adam takes a tensor learning rate only when capturable
    return flags


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


def reset_implementation(optimizers, kind, impl, tensor_lr):
    """After loading a state dict (whose param groups hold the saved run's foreach, fused and capturable):
    the flags of `impl`, as make_optimizer would set them, and each step count where they keep it (as
    torch's load_state_dict places it: on the parameter's device, in float32, when capturable or fused)."""
    for opt in optimizers.values():
        for group in opt.param_groups:
            if not group["params"]:
                continue
            group.update(implementation_flags(kind, impl, group["params"][0].device, tensor_lr))
            for p in group["params"]:
                state = opt.state.get(p)
                if state and torch.is_tensor(state.get("step")) and (group["capturable"] or group.get("fused")):
                    state["step"] = state["step"].to(dtype=torch.float32, device=p.device)


def create_state(optimizer):
    """Create, as torch's optimizers do on their first step (zeros, by their own `_init_group`), the state of
    every parameter that has a gradient and no state yet. Run eagerly before a compiled masked step: the
    graph then only ever sees the state it updates, never creates it (one variant, before and after a
    resume alike)."""
    for group in optimizer.param_groups:
        if any(p.grad is not None and not optimizer.state.get(p) for p in group["params"]):
            optimizer._init_group(group, *([] for _ in range(6)))
            mark_state_static(optimizer)


def mark_state_static(optimizer):
    """Mark the optimizer's state tensors as dynamo marks those of an optimizer.step it compiles: CUDA graphs
    then update them in place instead of copying them in and out on every replay. Before the first compiled
    call (the mark is guarded: marking later would recompile)."""
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                torch._dynamo.mark_static_address(value, guard=True)


def _rmsprop_update(group, params, grads, states, optimizer):
    rmsprop_functional(
        params, grads, [s["square_avg"] for s in states], [s["grad_avg"] for s in states if "grad_avg" in s],
        [s["momentum_buffer"] for s in states if "momentum_buffer" in s], [s["step"] for s in states],
        lr=group["lr"], alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
        momentum=group["momentum"], centered=group["centered"], foreach=group["foreach"],
        maximize=group["maximize"], differentiable=group["differentiable"], capturable=group["capturable"])


def _adam_update(group, params, grads, states, optimizer):
    beta1, beta2 = group["betas"]
    adam_functional(
        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states if "max_exp_avg_sq" in s], [s["step"] for s in states],
        amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
        eps=group["eps"], maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
        differentiable=group["differentiable"], fused=group["fused"], grad_scale=getattr(optimizer, "grad_scale", None),
        found_inf=getattr(optimizer, "found_inf", None), decoupled_weight_decay=group["decoupled_weight_decay"])


def _fused_adam_update(group, params, grads, states, optimizer):
    # torch's fused Adam as its _fused_adam calls it (which dynamo does not trace), for one device and dtype: the
    # counts advance, then the kernel
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        raise ValueError("a masked fused Adam step takes no gradient scaler")
    if len({(p.device, p.dtype) for p in params}) > 1:
        raise ValueError("a masked fused Adam step takes parameters on one device in one dtype")
    beta1, beta2 = group["betas"]
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    # the kernel's out-of-place form (its in-place one declares the gradients written, which AOTAutograd's
    # functionalization refuses for graph inputs)
    kernel = torch.ops.aten._fused_adamw if group["decoupled_weight_decay"] else torch.ops.aten._fused_adam
    moments = [[s[key] for s in states if key in s] for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    new_params, _, *new_moments = kernel(
        params, grads, *moments, steps, amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1, beta2=beta2,
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"], grad_scale=None,
        found_inf=None)
    for old, new in zip(params + sum(moments, []), new_params + sum(new_moments, [])):
        old.copy_(new)


# torch's functional form of each optimizer's step, as its step() calls it (exact types only: a subclass may step
# otherwise, and takes masked_step_reference)
FUNCTIONAL_UPDATES = {torch.optim.RMSprop: _rmsprop_update, torch.optim.Adam: _adam_update}


def masked_step(optimizer, update):
    """optimizer.step(), kept only where `update` (a 0-d bool tensor) is True: otherwise every
    parameter and every state tensor is left exactly as it was (RMSprop's running average does not
    decay; Adam's step count does not advance). Decided on the device: no synchronisation. State the
    optimizer creates on its first step counts as zeros before it (as torch's optimizers start).
    torch's RMSprop and Adam step through masked_update (one graph when compiled); an optimizer with a
    masked_step of its own (FusedMaskedRMSprop) takes the step itself; any other through
    masked_step_reference."""
    if hasattr(optimizer, "masked_step"):
        return optimizer.masked_step(update)
    if type(optimizer) not in FUNCTIONAL_UPDATES:
        return masked_step_reference(optimizer, update)
    create_state(optimizer)
    masked_update(optimizer, update)


def masked_update(optimizer, update):
    """The step of torch's RMSprop or Adam (their functional form, on copies of the parameters and the state
    create_state made), then each kept where `update` is True: no host value and nothing created, so
    torch.compile takes it as one graph (fullgraph=True), in which inductor fuses each copy into its update."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            _masked_group_update(optimizer, group, update)


def _masked_group_update(optimizer, group, update):
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    functional = _fused_adam_update if group.get("fused") else FUNCTIONAL_UPDATES[type(optimizer)]
    states = [optimizer.state[p] for p in params]
    stepped = [p.detach().clone() for p in params]
    stepped_states = [{key: value.clone() for key, value in state.items()} for state in states]
    functional(group, stepped, [p.grad for p in params], stepped_states, optimizer)
    for p, new in zip(params, stepped):
        p.copy_(torch.where(update, new, p))
    for state, new_state in zip(states, stepped_states):
        for key, value in new_state.items():
            state[key].copy_(torch.where(update, value, state[key]))


def masked_step_reference(optimizer, update):
    """The slow reference of masked_step, for any optimizer: copies of every parameter and state tensor,
    optimizer.step(), then the copies put back where `update` is False (compiled, dynamo splits it into
    several graphs). An optimizer that keeps state of its own in param_groups (apex's FusedAdam: an integer
    'step') cannot be masked so: refused with an error rather than silently advanced."""
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


def follow_schedule(optimizers, cfg, step):
    """Set the rate of step `step` when the schedule changes it (a tensor rate is filled in place: no recompile)."""
    lr, previous = (learning_rate(cfg.lr_schedule, cfg.lr, s, cfg.lr_schedule_steps) for s in (step, step - 1))
    if lr != previous:
        set_learning_rate(optimizers, lr)
