"""The three networks' optimizers: the authors' RMSprop (or Adam) with DeepPy's weight decay, the
learning rate as the schedule sets it, and the masked step that keeps or discards an update by a
decision made on the device (torch's optimizers through copies of everything they hold; the fused
RMSprop in its kernel, which reads nothing but the decision when it is False)."""
import torch

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


def masked_step(optimizer, update):
    """optimizer.step(), kept only where `update` (a 0-d bool tensor) is True: otherwise every
    parameter and every state tensor is left exactly as it was (RMSprop's running average does not
    decay; Adam's step count does not advance). Decided on the device: no synchronisation. State the
    optimizer creates on its first step counts as zeros before it (as torch's optimizers start).
    An optimizer that keeps state of its own in param_groups (an integer 'step', for one) cannot be
    masked so: refused with an error rather than silently advanced (options.APEX_REFUSED names one). An optimizer with a
    masked_step of its own (FusedMaskedRMSprop) takes the step itself, without the copies."""
    if hasattr(optimizer, "masked_step"):
        return optimizer.masked_step(update)
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
