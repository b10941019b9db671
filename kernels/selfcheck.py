"""The fused kernels check themselves before a run relies on them (StyleGAN2-ADA's custom ops do
the same): each op, forward and backward, against its PyTorch reference on a small random batch
on the run's device. A kernel that fails to build or run, or disagrees, is reported in one line.

    self_check(device) -> None if every op agrees, else the reason (naming the op)
    rmsprop_self_check(device) -> the same for the masked RMSprop kernel (--optimizer-impl fused)
"""
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

TOLERANCE = 1e-4  # the kernels compute in float32; the check runs in float32


@dataclass
class Op:
    name: str
    module: str                      # kernels.<module> holds `name`; kernels.reference holds `name`_reference
    inputs: Callable                 # (generator, device) -> (differentiable tensors, other arguments)
    fused: Callable = None           # default: kernels.<module>.<name>, looked up at check time

    def functions(self):
        module, reference = importlib.import_module(f"kernels.{self.module}"), importlib.import_module("kernels.reference")
        return self.fused or getattr(module, self.name), getattr(reference, f"{self.name}_reference")


def _randn(generator, device, *shape, scale=1.0):
    # drawn on the CPU, whatever torch's default device is, then moved
    return (scale * torch.randn(shape, generator=generator, device="cpu")).to(device)


def _reparam_inputs(generator, device):
    seed = int(torch.randint(2 ** 31, (1,), generator=generator, device="cpu"))
    return (_randn(generator, device, 4, 37), _randn(generator, device, 4, 37, scale=0.5)), (seed, 3)


def _feature_inputs(generator, device):
    return (_randn(generator, device, 3, 5, 7, 9),), (_randn(generator, device, 3, 5, 7, 9),)


def _gan_inputs(generator, device):
    return (_randn(generator, device, 6, scale=3.0), _randn(generator, device, 9, scale=3.0)), (0.5, 0.5)


OPS = [Op("reparam_kl", "reparam", _reparam_inputs), Op("feature_nll", "likelihood", _feature_inputs),
       Op("gan_loss", "gan", _gan_inputs)]


def _relative_error(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _as_list(outputs):
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _outputs_and_gradients(function, leaves, others, cotangents):
    outputs = _as_list(function(*leaves, *others))
    differentiable = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    gradients = torch.autograd.grad([o.float() for o, _ in differentiable], leaves,
                                    [c for _, c in differentiable], allow_unused=True)
    return [o.detach() for o in outputs], [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gradients)]


def check_op(op, device, generator):
    """The largest relative error of `op`'s outputs and input gradients against its reference."""
    fused, reference = op.functions()
    tensors, others = op.inputs(generator, device)
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    with torch.no_grad():
        shapes = [o.shape for o in _as_list(reference(*tensors, *others))]
    cotangents = [_randn(generator, device, *shape) for shape in shapes]
    want, want_grads = _outputs_and_gradients(reference, leaves, others, cotangents)
    got, got_grads = _outputs_and_gradients(fused, leaves, others, cotangents)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    return max(_relative_error(g, w) for g, w in zip(got + got_grads, want + want_grads))


def self_check(device):
    """None if every fused op matches its reference on `device`, forward and backward; else why not."""
    generator = torch.Generator()
    generator.seed()  # fresh inputs each run; the global random state is left alone
    for op in OPS:
        try:
            error = check_op(op, device, generator)
        except Exception as e:  # a kernel that does not build or launch here
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"the fused {op.name} failed to run on {device} ({type(e).__name__}: {message[:300]})"
        if not error <= TOLERANCE:
            return (f"the fused {op.name} disagrees with its reference on {device} (relative error {error:.1e}, "
                    f"tolerance {TOLERANCE:g})")
    return None


def rmsprop_self_check(device):
    """None if the masked RMSprop kernel (kernels/rmsprop.py) agrees with its reference on `device`: a kept
    step within TOLERANCE, with and without weight decay, and a skipped step leaving every value as it was;
    else why not. The problem makes every term visible: a decay of 0.1 (10% of it off moves the step by
    ~5e-2 of its size), a count that is not a multiple of the block, elements with no history and a tiny
    gradient (where eps is a visible part of the denominator), and a rate of 1e-2, at which one rounding
    of a parameter is under 1e-4 of the step. Fixed inputs: a pass or a failure repeats."""
    generator = torch.Generator()
    generator.manual_seed(0)
    try:
        from kernels.reference import masked_rmsprop_reference_
        from kernels.rmsprop import masked_rmsprop_
        for weight_decay in (0.0, 0.1):
            n = 3 * 1024 + 37
            param, grad = _randn(generator, device, n), _randn(generator, device, n)
            square_avg = _randn(generator, device, n).abs()
            param[:37], square_avg[:37], grad[:37] = 0.0, 0.0, grad[:37] * 1e-6
            lr = torch.full((), 1e-2, device=device)
            for keep in (True, False):
                update = torch.tensor(keep, device=device)
                got = [param.clone(), square_avg.clone()]
                want = [param.clone(), square_avg.clone()]
                masked_rmsprop_(got[0], grad, got[1], update, lr, weight_decay)
                masked_rmsprop_reference_(want[0], grad, want[1], update, lr, weight_decay)
                if not keep and not (torch.equal(got[0], param) and torch.equal(got[1], square_avg)):
                    return f"the fused RMSprop changed a skipped step's values on {device}"
                step_size = (want[0] - param).abs().max().clamp_min(1e-30)
                error = max(((got[0] - want[0]).abs().max() / step_size).item(), _relative_error(got[1], want[1]))
                if not error <= TOLERANCE:
                    return (f"the fused RMSprop disagrees with its reference on {device} (relative error {error:.1e}, "
                            f"tolerance {TOLERANCE:g})")
    except Exception as e:  # a kernel that does not build or launch here
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"the fused RMSprop failed to run on {device} ({type(e).__name__}: {message[:300]})"
    return None
