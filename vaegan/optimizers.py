"""The three networks' optimizers: the authors' RMSprop (or Adam) with DeepPy's weight decay, the
learning rate as the schedule sets it, and the masked step that keeps or discards an update by a
decision made on the device."""
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


def follow_schedule(optimizers, cfg, step):
    """Set the rate of step `step` when the schedule changes it (a tensor rate is filled in place: no recompile)."""
    lr, previous = (learning_rate(cfg.lr_schedule, cfg.lr, s, cfg.lr_schedule_steps) for s in (step, step - 1))
    if lr != previous:
        set_learning_rate(optimizers, lr)
