"""--fuse-bn-relu: the BatchNorm -> ReLU -> convolution kernel (kernels/fused_conv.py) against its reference,
forward and backward, and the networks computed with it against the modules. On a CPU under Triton's
interpreter (conftest.py), in fp32 and fp16; on a GPU in bf16 too."""
import copy

import pytest
import torch

import kernels
from vaegan.fused_layers import fuse_bn_relu
from vaegan.models import VAEGAN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
# (batch, channels, size, out channels, kernel, stride, padding, bias): the networks' 5x5 stride-2 convolution,
# the decoder's last (stride 1, bias, 3 outputs), channel counts that fill no block
SHAPES = [(2, 16, 16, 32, 5, 2, 2, False), (3, 12, 9, 3, 5, 1, 2, True), (2, 40, 8, 24, 5, 2, 2, False),
          (1, 8, 7, 16, 3, 1, 1, True)]


@pytest.fixture(autouse=True)
def no_tf32():
    # the kernel multiplies float32 operands in float32; so must the reference on a GPU
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def op_inputs(shape, dtype, seed):
    batch, channels, size, out_channels, k, _, _, bias = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g).to(DEVICE, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    scale = (torch.rand(channels, generator=g) + 0.5).to(DEVICE)
    shift = (torch.randn(channels, generator=g) * 0.5).to(DEVICE)
    weight = (torch.randn(out_channels, channels, k, k, generator=g) / (channels * k * k) ** 0.5).to(DEVICE, dtype)
    b = torch.randn(out_channels, generator=g).to(DEVICE, dtype) if bias else None
    return [x, scale, shift, weight, b]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_kernel_matches_its_reference_forward_and_backward(shape, dtype):
    stride, padding = shape[5], shape[6]
    inputs = op_inputs(shape, dtype, seed=sum(shape))
    fast_in = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
    ref_in = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
    fast = kernels.bn_relu_conv(*fast_in, stride=stride, padding=padding)
    ref = kernels.bn_relu_conv_reference(*ref_in, stride=stride, padding=padding)
    assert fast[0].dtype == dtype and fast[0].is_contiguous(memory_format=torch.channels_last)
    tol = TOL[dtype]
    for name, got, want in zip(("y", "channel_sum", "channel_sumsq"), fast, ref):
        assert got.shape == want.shape and rel_err(got, want) < tol, f"{name}: {rel_err(got, want):.2e}"
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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_fused_networks_compute_what_the_modules_compute(training):
    # outputs, every parameter's gradient, and the running statistics (train); channels-last as the trainer runs
    torch.manual_seed(0)
    plain = VAEGAN("vaegan", 32, width=0.25).to(DEVICE).to(memory_format=torch.channels_last)
    for m in plain.modules():  # running statistics away from their start, so eval mode tests their use
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fused = copy.deepcopy(plain)
    assert fuse_bn_relu(fused)
    plain.train(training)
    fused.train(training)
    x = torch.randn(4, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    z = torch.randn(4, 128, device=DEVICE)
    for name, arg in (("encoder", x), ("decoder", z), ("discriminator", x)):
        outputs = []
        for model in (plain, fused):
            out = getattr(model, name)(arg)
            out = out[0] if isinstance(out, tuple) else out
            (out.float() ** 2).sum().backward()
            outputs.append(out)
        assert rel_err(outputs[1], outputs[0]) < 1e-5, name
        for (pname, p), q in zip(getattr(plain, name).named_parameters(), getattr(fused, name).parameters()):
            if p.grad is not None:
                assert rel_err(q.grad, p.grad) < 1e-4, f"{name}.{pname}: {rel_err(q.grad, p.grad):.2e}"
    for (bname, b), c in zip(plain.named_buffers(), fused.buffers()):
        assert torch.allclose(c.double(), b.double(), rtol=1e-5, atol=1e-6), bname


def test_the_backward_takes_only_the_gradients_asked_for():
    # a frozen pass: the input's gradient alone (and the same as with the weight's); no input gradient: the weight's
    inputs = op_inputs(SHAPES[1], torch.float32, seed=3)
    x, scale, shift, weight, bias = inputs
    g = torch.randn(3, 3, 9, 9, device=DEVICE)
    leaf_x = x.clone().requires_grad_(True)
    (kernels.bn_relu_conv(leaf_x, scale, shift, weight, bias, 1, 2)[0] * g).sum().backward()
    full = [t.clone().requires_grad_(True) for t in (x, weight)]
    (kernels.bn_relu_conv(full[0], scale, shift, full[1], bias, 1, 2)[0] * g).sum().backward()
    assert torch.equal(leaf_x.grad, full[0].grad)
    leaf_w = weight.clone().requires_grad_(True)
    (kernels.bn_relu_conv(x, scale, shift, leaf_w, bias, 1, 2)[0] * g).sum().backward()
    assert torch.equal(leaf_w.grad, full[1].grad)
