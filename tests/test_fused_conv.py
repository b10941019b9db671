"""--fuse-bn-relu: the BatchNorm -> ReLU -> convolution kernel (kernels/fused_conv.py) against its reference,
forward and backward, and the networks computed with it against the modules. On a CPU under Triton's
interpreter (conftest.py), in fp32 and fp16; on a GPU in bf16 too."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from vaegan.fused_layers import fuse_bn_relu
from vaegan.models import VAEGAN, pad_thin_convolutions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
# (batch, channels, (height, width), out channels, kernel, stride, padding, bias): the networks' 5x5 stride-2
# convolution, the decoder's last (stride 1, bias, 3 outputs), channel counts that fill no block, a picture
# that is not square, more output channels than one block (160: two blocks of 128); the first has more output
# pixels than one block (192), the last block partly masked
SHAPES = [(3, 16, (16, 16), 32, 5, 2, 2, False), (3, 12, (9, 9), 3, 5, 1, 2, True), (2, 40, (8, 8), 24, 5, 2, 2, False),
          (1, 8, (7, 7), 16, 3, 1, 1, True), (2, 24, (6, 9), 160, 5, 2, 2, False)]


@pytest.fixture(autouse=True)
def no_tf32():
    # float32 operands multiplied in float32 (TF32 off, which the kernel follows), by the reference on a GPU too
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def op_inputs(shape, dtype, seed, channels_last=True):
    batch, channels, (height, width), out_channels, k, _, _, bias = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g).to(DEVICE, dtype)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale = (torch.rand(channels, generator=g) + 0.5).to(DEVICE)
    shift = (torch.randn(channels, generator=g) * 0.5).to(DEVICE)
    weight = (torch.randn(out_channels, channels, k, k, generator=g) / (channels * k * k) ** 0.5).to(DEVICE, dtype)
    b = torch.randn(out_channels, generator=g).to(DEVICE, dtype) if bias else None
    return [x, scale, shift, weight, b]


def shape_id(shape):
    return "-".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_the_kernel_matches_its_reference_forward_and_backward(shape, dtype):
    check_against_reference(shape, dtype, seed=len(shape_id(shape)))


@pytest.mark.parametrize("case", ["contiguous-input", "without-sums"])
def test_the_kernel_takes_a_contiguous_input_and_can_leave_out_the_sums(case):
    check_against_reference(SHAPES[0], torch.float32, seed=5, channels_last=case != "contiguous-input",
                            with_sums=case != "without-sums")


def check_against_reference(shape, dtype, seed, channels_last=True, with_sums=True):
    stride, padding = shape[5], shape[6]
    inputs = op_inputs(shape, dtype, seed, channels_last)
    fast_in = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
    ref_in = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
    fast = kernels.bn_relu_conv(*fast_in, stride=stride, padding=padding, with_sums=with_sums)
    ref = kernels.bn_relu_conv_reference(*ref_in, stride=stride, padding=padding, with_sums=with_sums)
    if not with_sums:
        assert fast[1].numel() == 0 and fast[2].numel() == 0
    assert fast[0].dtype == dtype and fast[0].is_contiguous(memory_format=torch.channels_last)
    tol = TOL[dtype]
    for name, got, want in zip(("y", "channel_sum", "channel_sumsq"), fast, ref):
        assert got.shape == want.shape
        assert want.numel() == 0 or rel_err(got, want) < tol, f"{name}: {rel_err(got, want):.2e}"
    # a loss that reaches y directly and through both sums, as the next BatchNorm's statistics do
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g).to(DEVICE) for t in ref]
    for outputs, leaves in ((fast, fast_in), (ref, ref_in)):
        sum(((o.float() * w).sum() for o, w in zip(outputs, weights))).backward()
    for name, got, want in zip(("x", "scale", "shift", "weight", "bias"), fast_in, ref_in):
        if want is not None:
            assert rel_err(got.grad, want.grad) < tol, f"grad {name}: {rel_err(got.grad, want.grad):.2e}"


def test_the_padding_is_zero_after_batchnorm_and_relu():
    # a shift that makes every input pixel positive: an implementation that padded before the prologue
    # would add relu(shift) * weight at the borders
    x = torch.zeros(1, 8, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.ones(8, device=DEVICE), torch.full((8,), 2.0, device=DEVICE)
    weight = torch.ones(16, 8, 5, 5, device=DEVICE)
    y, _, _ = kernels.bn_relu_conv(x, scale, shift, weight, None, 1, 2)
    assert y[0, 0, 0, 0].item() == 2.0 * 8 * 9  # 3x3 of the 5x5 taps inside the image at a corner
    assert y[0, 0, 0, 3].item() == 2.0 * 8 * 15  # 3 rows by 5 columns at an edge
    assert y[0, 0, 3, 3].item() == 2.0 * 8 * 25


def test_bad_inputs_are_refused():
    x, scale, shift, weight, _ = op_inputs(SHAPES[0], torch.float32, 0)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(16,\)"):
        kernels.bn_relu_conv(x, scale[:3], shift, weight, None, 2, 2)
    with pytest.raises(ValueError, match="not an \\(N, C, H, W\\) batch"):
        kernels.bn_relu_conv(x[:, :8], scale, shift, weight, None, 2, 2)
    with pytest.raises(ValueError, match="bias \\(5,\\) does not match 32 output channels"):
        kernels.bn_relu_conv(x, scale, shift, weight, torch.zeros(5, device=DEVICE), 2, 2)


def test_fuse_bn_relu_names_each_batchnorm_relu_convolution():
    model = VAEGAN("vaegan", 64)
    assert fuse_bn_relu(model) == ["encoder.body.3", "encoder.body.6", "decoder.body.13",
                                   "discriminator.features.5", "discriminator.features.8"]
    assert fuse_bn_relu(VAEGAN("vaegan", 64), skip=("decoder",))[2] == "discriminator.features.5"
    assert fuse_bn_relu(VAEGAN("vae", 32)) == ["encoder.body.3", "decoder.body.10"]
    padded = VAEGAN("vaegan", 64)
    pad_thin_convolutions(padded)  # --pad-channels asked for the decoder's last convolution padded: not fused
    assert "decoder.body.13" not in fuse_bn_relu(padded) and len(fuse_bn_relu(padded)) == 4


NETWORK_CASES = [(64, True, None), (32, False, None), (32, True, None)] + \
    ([(64, True, torch.bfloat16)] if DEVICE == "cuda" else [])  # autocast bf16: the GPU default


@pytest.mark.parametrize("size,training,autocast", NETWORK_CASES,
                         ids=lambda v: {True: "train", False: "eval", None: "fp32"}.get(v, str(v)))
def test_the_fused_networks_compute_what_the_modules_compute(size, training, autocast):
    # outputs, every parameter's gradient, and the running statistics (train); channels-last as the trainer
    # runs; 64 px at 1/8 of the paper's widths: a fused convolution's sums feed the next BatchNorm there
    torch.manual_seed(0)
    plain = VAEGAN("vaegan", size, width=0.125 if size == 64 else 0.25).to(DEVICE)
    plain = plain.to(memory_format=torch.channels_last)
    for m in plain.modules():  # running statistics away from their start, so eval mode tests their use
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fused = copy.deepcopy(plain)
    assert fuse_bn_relu(fused)
    plain.train(training)
    fused.train(training)
    batch = 2 if size == 64 else 4  # (Triton's interpreter)
    x = torch.randn(batch, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
    z = torch.randn(batch, 128, device=DEVICE)
    tol = {None: (1e-5, 1e-4, 1e-5), torch.bfloat16: (3e-2, 6e-2, 1e-2)}[autocast]  # outputs, gradients, buffers
    for name, arg in (("encoder", x), ("decoder", z), ("discriminator", x)):
        outputs = []
        for model in (plain, fused):
            with torch.autocast(DEVICE, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                out = getattr(model, name)(arg)
            out = out[0] if isinstance(out, tuple) else out
            (out.float() ** 2).sum().backward()
            outputs.append(out)
        assert rel_err(outputs[1], outputs[0]) < tol[0], name
        for (pname, p), q in zip(getattr(plain, name).named_parameters(), getattr(fused, name).parameters()):
            if p.grad is not None:
                assert rel_err(q.grad, p.grad) < tol[1], f"{name}.{pname}: {rel_err(q.grad, p.grad):.2e}"
    for (bname, b), c in zip(plain.named_buffers(), fused.buffers()):
        assert torch.allclose(c.double(), b.double(), rtol=tol[2], atol=tol[2] / 10), bname


class ConvolutionBackwardMasks(TorchDispatchMode):
    """The output_mask (input, weight, bias) of each aten.convolution_backward call."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(args[-1]))
        return func(*args, **(kwargs or {}))


def test_the_backward_takes_only_the_gradients_asked_for():
    # a frozen pass (no weight gradient) and a first layer (no input gradient): aten is asked only for those
    x, scale, shift, weight, bias = op_inputs(SHAPES[1], torch.float32, seed=3)
    g = torch.randn(3, 3, 9, 9, device=DEVICE)
    full = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    (kernels.bn_relu_conv(full[0], scale, shift, full[1], full[2], 1, 2)[0] * g).sum().backward()
    masks = ConvolutionBackwardMasks()
    leaf_x = x.clone().requires_grad_(True)
    with masks:
        (kernels.bn_relu_conv(leaf_x, scale, shift, weight, bias, 1, 2)[0] * g).sum().backward()
    assert masks.masks == [(True, False, False)] and torch.equal(leaf_x.grad, full[0].grad)
    leaf_w = weight.clone().requires_grad_(True)
    masks.masks.clear()
    with masks:
        (kernels.bn_relu_conv(x, scale, shift, leaf_w, bias, 1, 2)[0] * g).sum().backward()
    assert masks.masks == [(False, True, False)] and torch.equal(leaf_w.grad, full[1].grad)
