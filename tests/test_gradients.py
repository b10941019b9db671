"""The routing proof: one backward pass gives each network the gradient of its own loss."""
import copy

import pytest
import torch

from kernels import philox
from kernels import reference as losses
from vaegan.models import VAEGAN, pad_thin_convolutions
from vaegan.decisions import equilibrium_decisions
from vaegan.gradients import UpdateConfig, compute_gradients, compute_gradients_reference, network_losses

VARIANTS = [
    dict(kind="vaegan"),
    dict(kind="vaegan", saturating=False),
    dict(kind="vaegan", dis_sees_recon=True),
    dict(kind="vaegan", dis_sees_recon=True, saturating=False),
    dict(kind="vaegan", gan_loss_form="eps"),
    dict(kind="vae"),
    dict(kind="gan"),
    dict(kind="gan", saturating=False),
    dict(kind="vae-disl"),
    dict(kind="vaegan", decoder_call="joint"),
    dict(kind="vaegan", decoder_call="joint", saturating=False, dis_sees_recon=True),
]


NOISE_SEED = 1234


def make(kind, size=32, channels=3, seed=0, dtype=torch.float64, batch=4, latent=12, attribute_names=(),
         up_conv="transposed"):
    """A model and inputs; eps is the Philox noise that compute_gradients draws from NOISE_SEED."""
    torch.manual_seed(seed)
    model = VAEGAN(kind, size, channels, latent_size=latent, fc_width=40, attribute_names=attribute_names,
                   up_conv=up_conv).to(dtype)
    x = torch.rand(batch, channels, size, size, dtype=dtype) * 2 - 1
    eps = philox.rows_randn(NOISE_SEED, batch, latent).to(dtype)
    z_prior = torch.randn(batch, latent, dtype=dtype)
    return model, x, eps, z_prior


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def relative_error(got, want):
    """The largest difference over the largest magnitude of `want`, in float64."""
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_same_grads(got, want, rtol):
    for name in want:
        err = relative_error(got[name], want[name])
        assert err < rtol, f"{name}: relative error {err:.2e}"


def assert_routes_as_the_reference(changed, plain, x, eps, z_prior, cfg, rtol, buffers_rtol, buffers_atol):
    """`changed` (a copy of `plain` with a lever applied) against the reference routing of `plain`: the fast
    step's gradients and stats, and its running statistics against `plain`'s fast step's (each one updated)."""
    start = {n: b.clone() for n, b in plain.named_buffers()}
    fast_stats = compute_gradients(changed, x, z_prior, cfg, NOISE_SEED)
    compute_gradients(plain, x, z_prior, cfg, NOISE_SEED)  # the unchanged step's running statistics
    for (name, b), c in zip(plain.named_buffers(), changed.buffers()):
        assert torch.allclose(c, b, rtol=buffers_rtol, atol=buffers_atol), name
        assert not torch.equal(c, start[name]), f"{name} was not updated"
    with torch.no_grad():
        for n, b in plain.named_buffers():
            b.copy_(start[n])
    ref_stats = compute_gradients_reference(plain, x, eps, z_prior, cfg)
    assert_same_grads(grads(changed), grads(plain), rtol=rtol)
    for name in ref_stats:
        assert torch.allclose(fast_stats[name], ref_stats[name], rtol=rtol), name


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_one_backward_equals_each_networks_own_gradient(variant):
    model, x, eps, z_prior = make(variant["kind"], seed=len(str(variant)))
    cfg = UpdateConfig(gamma=1e-3, **variant)
    fast_stats = compute_gradients(model, x, z_prior, cfg, NOISE_SEED)
    fast = grads(model)
    ref_stats = compute_gradients_reference(model, x, eps, z_prior, cfg)
    assert_same_grads(fast, grads(model), rtol=1e-9)
    for name in ref_stats:
        assert torch.allclose(fast_stats[name], ref_stats[name], rtol=1e-10), name
    assert all(g.abs().sum() > 0 for n, g in fast.items() if n.endswith("weight")), "a network got no gradient"


@pytest.mark.parametrize("variant", [dict(kind="vaegan"), dict(kind="vaegan", saturating=False, dis_sees_recon=True),
                                     dict(kind="vae"), dict(kind="gan", saturating=False)],
                         ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_fused_kernels_give_the_reference_gradients(variant):
    # The kernels compute in float32 whatever the input dtype: float32 tolerances.
    model, x, eps, z_prior = make(variant["kind"], seed=11)
    if torch.cuda.is_available():  # compiled kernels on the GPU (the interpreter runs them on a CPU)
        model, x, eps, z_prior = model.cuda(), x.cuda(), eps.cuda(), z_prior.cuda()
    cfg = UpdateConfig(gamma=1e-3, kernels="triton", **variant)
    fast_stats = compute_gradients(model, x, z_prior, cfg, NOISE_SEED)
    fast = grads(model)
    ref_stats = compute_gradients_reference(model, x, eps, z_prior, cfg)
    assert_same_grads(fast, grads(model), rtol=1e-4)
    for name in ref_stats:
        assert torch.allclose(fast_stats[name].double(), ref_stats[name].double(), rtol=1e-5, atol=1e-6), name


CONDITIONAL_VARIANTS = [dict(kind="vaegan"), dict(kind="vaegan", saturating=False, dis_sees_recon=True),
                        dict(kind="vae"), dict(kind="gan")]


@pytest.mark.parametrize("variant", CONDITIONAL_VARIANTS, ids=lambda v: "c-" + "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("kernel_set", ["torch", "triton"])
def test_conditional_models_route_exactly_too(variant, kernel_set):
    kind = "c" + variant["kind"]
    model, x, eps, z_prior = make(kind, seed=17, attribute_names=["A", "B", "C"])
    attributes = (torch.rand(x.shape[0], 3) < 0.5).double() * 2 - 1
    if kernel_set == "triton" and torch.cuda.is_available():  # compiled kernels take GPU tensors
        model, x, eps, z_prior, attributes = (t.cuda() for t in (model, x, eps, z_prior, attributes))
    cfg = UpdateConfig(gamma=1e-3, kernels=kernel_set, **variant)
    compute_gradients(model, x, z_prior, cfg, NOISE_SEED, attributes=attributes)
    fast = grads(model)
    compute_gradients_reference(model, x, eps, z_prior, cfg, attributes=attributes)
    want = grads(model)
    assert_same_grads(fast, want, rtol=1e-9 if kernel_set == "torch" else 1e-4)
    # the attributes matter: other attributes, other gradients
    compute_gradients_reference(model, x, eps, z_prior, cfg, attributes=-attributes)
    first = next(iter(want))
    assert not torch.allclose(grads(model)[first], want[first])


@pytest.mark.parametrize("dtype,padded,up_conv", [(torch.float64, False, "transposed"), (torch.float32, False, "transposed"),
                                                  (torch.float64, True, "transposed"), (torch.float64, True, "resize")])
def test_the_joint_decoder_call_computes_what_two_calls_compute(dtype, padded, up_conv):
    # gradients, stats and every BatchNorm's running statistics (from the reconstructions' half only);
    # with --pad-channels the decoder's last convolution is padded in the joint call too; the demo's resizing
    # decoder (an Upsample before each stage's convolution) too
    model, x, _, z_prior = make("vaegan", seed=8, dtype=dtype, up_conv=up_conv)
    if padded:
        assert f"decoder.body.{len(model.decoder.body) - 2}" in pad_thin_convolutions(model)
    start = {n: b.clone() for n, b in model.named_buffers()}
    results = []
    for decoder_call in ("separate", "joint"):
        for n, b in model.named_buffers():
            b.copy_(start[n])
        stats = compute_gradients(model, x, z_prior, UpdateConfig(gamma=1e-3, decoder_call=decoder_call), NOISE_SEED)
        results.append((grads(model), stats, {n: b.clone() for n, b in model.named_buffers()}))
    (separate, separate_stats, separate_buffers), (joint, joint_stats, joint_buffers) = results
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    if dtype == torch.float64:
        assert_same_grads(joint, separate, rtol)
    else:  # fp32 gradients of these small-batch networks sit up to ~5e-3 from fp64's on some inputs, either call:
        # the joint call must be as close to the fp64 gradients as the separate calls are
        exact = copy.deepcopy(model).double()
        for n, b in exact.named_buffers():
            b.copy_(start[n])
        compute_gradients(exact, x.double(), z_prior.double(), UpdateConfig(gamma=1e-3), NOISE_SEED)
        truth = grads(exact)
        for name, want in truth.items():
            joint_err, separate_err = relative_error(joint[name], want), relative_error(separate[name], want)
            assert joint_err <= max(3 * separate_err, rtol), f"{name}: joint {joint_err:.2e}, separate {separate_err:.2e}"
    for name in separate_stats:
        assert torch.allclose(joint_stats[name], separate_stats[name], rtol=rtol), name
    for name, value in separate_buffers.items():
        assert not torch.equal(value, start[name]), f"{name} was not updated"
        assert torch.allclose(joint_buffers[name].double(), value.double(), rtol=rtol, atol=1e-7), name


@pytest.mark.parametrize("variant", [dict(kind="vaegan"),
                                     dict(kind="vaegan", decoder_call="joint", saturating=False, dis_sees_recon=True)],
                         ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_the_padded_thin_convolutions_route_as_the_reference(variant):
    # --pad-channels: the convolutions with 3 image channels computed with 8 (zeros) give each network the
    # reference routing's gradients of the unpadded networks, at the paper's gamma, and the same running statistics
    plain, x, eps, z_prior = make(variant["kind"], seed=9)
    padded = copy.deepcopy(plain)
    assert pad_thin_convolutions(padded) == ["encoder.body.0", "decoder.body.10", "discriminator.features.0"]
    assert {n for n, _ in padded.named_parameters()} == {n for n, _ in plain.named_parameters()}  # no new parameters
    assert_routes_as_the_reference(padded, plain, x, eps, z_prior, UpdateConfig(gamma=1e-6, **variant), rtol=1e-9,
                                   buffers_rtol=1e-12, buffers_atol=1e-15)


def test_the_joint_decoder_call_takes_halves_of_equal_size():
    model, x, _, z_prior = make("vaegan")
    with pytest.raises(ValueError, match="halves of equal size, not 4 and 3 rows"):
        model.decoder.forward_joint(z_prior, z_prior[:3])


def own_gradient(model, network, loss):
    params = list(getattr(model, network).parameters())
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def test_discriminator_gradient_holds_nothing_of_llike_and_encoder_nothing_of_gan():
    model, x, eps, z_prior = make("vaegan", seed=3)
    cfg = UpdateConfig(gamma=1e-2)
    compute_gradients(model, x, z_prior, cfg, NOISE_SEED)
    got = [p.grad.clone() for p in model.discriminator.parameters()]
    own, _ = network_losses(model, x, eps, z_prior, cfg)
    # llike written without detaching the discriminator: what the discriminator must NOT receive
    mu, logvar = model.encoder(x)
    x_rec = model.decoder(mu + torch.exp(0.5 * logvar) * eps)
    features_rec, features_real = model.discriminator(torch.cat([x_rec, x]), features_only=True).chunk(2)
    llike = losses.feature_nll(features_rec, features_real.detach()).mean()
    want = own_gradient(model, "discriminator", own["discriminator"])
    leak = own_gradient(model, "discriminator", llike)
    leak_norm = sum(g.abs().sum() for g in leak if g is not None)
    assert leak_norm > 0  # llike does depend on the discriminator: the test could fail
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-14)
    # and the encoder's gradient is that of KL + llike, nothing of the GAN loss
    compute_gradients(model, x, z_prior, cfg, NOISE_SEED)
    enc_grads = [p.grad for p in model.encoder.parameters()]
    own, _ = network_losses(model, x, eps, z_prior, cfg)
    want_enc = own_gradient(model, "encoder", own["encoder"])
    for g, w in zip(enc_grads, want_enc):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("saturating", [True, False])
def test_the_decoder_descends_gamma_llike_plus_one_minus_gamma_unweighted_cross_entropy(saturating):
    # The authors' code (model/aegan.py): the decoder's parameters weigh L_llike by gamma and the GAN
    # term by 1 - gamma, and the 0.5/0.5 real/fake weights are undone for the decoder.
    model, x, eps, z_prior = make("vaegan", seed=23)
    gamma = 0.01  # both terms matter at this weight (the feature error is a per-image sum)
    compute_gradients(model, x, z_prior, UpdateConfig(gamma=gamma, saturating=saturating), NOISE_SEED)
    got = [p.grad.clone() for p in model.decoder.parameters()]
    enc, dec, dis = model.encoder, model.decoder, model.discriminator
    mu, logvar = enc(x)
    features_rec, features_real = dis(torch.cat([dec(mu + torch.exp(0.5 * logvar) * eps), x]),
                                      features_only=True).chunk(2)
    llike = losses.feature_nll(features_rec, features_real.detach()).mean()
    logits_real, logits_fake = dis(torch.cat([x, dec(z_prior)])).chunk(2)
    if saturating:  # minimax: minus the discriminator's cross-entropy, reals and fakes alike
        gan = -(losses.real_log_loss(logits_real).mean() + losses.fake_log_loss(logits_fake).mean())
    else:
        gan = losses.real_log_loss(logits_fake).mean()
    params = list(dec.parameters())
    want = torch.autograd.grad(gamma * llike + (1 - gamma) * gan, params, retain_graph=True)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-14)
    # the 0.5-weighted GAN term (the effective gamma doubled) is a different gradient
    halved = torch.autograd.grad(gamma * llike + 0.5 * (1 - gamma) * gan, params)
    assert max(((g - h).abs().max() / g.abs().max()).item() for g, h in zip(got, halved)) > 0.2


def test_gradients_come_from_the_parameters_at_the_start_of_the_step():
    model, x, eps, z_prior = make("vaegan", seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compute_gradients(model, x, z_prior, UpdateConfig(), NOISE_SEED)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bf16_autocast_step_is_close_to_fp32():
    model, x, eps, z_prior = make("vaegan", seed=7, dtype=torch.float32, batch=8)
    cfg = UpdateConfig(gamma=1e-3)
    fp32 = compute_gradients(model, x, z_prior, cfg, NOISE_SEED)
    bf16 = compute_gradients(model, x, z_prior, cfg, NOISE_SEED, autocast_dtype=torch.bfloat16)
    for name in ("kl", "llike", "dis_loss"):
        assert bf16[name].dtype == torch.float32
        assert abs(bf16[name] - fp32[name]) <= 0.05 * abs(fp32[name]) + 1e-3, name
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("real,fake,expected", [
    (0.68, 0.68, (True, True)),   # balanced: both learn
    (0.20, 0.68, (True, False)),  # discriminator winning on reals: it rests
    (0.68, 0.20, (True, False)),
    (1.20, 0.68, (False, True)),  # decoder losing: it rests
    (0.68, 1.10, (False, True)),
    (0.20, 1.20, (True, True)),   # both would rest: both learn
])
def test_equilibrium_rule(real, fake, expected):
    assert equilibrium_decisions(UpdateConfig(), real, fake) == expected


def test_equilibrium_rule_can_be_switched_off_and_paces_only_the_discriminator_without_gan_gradient():
    assert equilibrium_decisions(UpdateConfig(equilibrium=False), 0.1, 2.0) == (True, True)
    assert equilibrium_decisions(UpdateConfig(kind="vae-disl"), 0.1, 2.0) == (True, False)


@pytest.mark.parametrize("kind,variant", [("vaegan", {}), ("vaegan", dict(saturating=False, dis_sees_recon=True)),
                                          ("gan", {}), ("vae-disl", {}), ("vae", {})],
                         ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v) or "default")
def test_one_step_updates_each_batchnorm_once_from_the_pass_it_belongs_to(kind, variant):
    # The authors keep a copy of a network per extra use: the statistics the test-time model uses come
    # from the encoder's pass, the decoder's reconstructions (its prior samples, for a GAN) and the
    # discriminator's GAN pass; Dis_l, the non-saturating pass and the extra decoder passes leave none.
    import copy
    model, x, eps, z_prior = make(kind, seed=29)
    start = copy.deepcopy(model)
    compute_gradients(model, x, z_prior, UpdateConfig(kind=kind, gamma=1e-3, **variant), NOISE_SEED)
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = dict(start.named_modules())
    assert norms and all(m.num_batches_tracked == before[name].num_batches_tracked + 1 for name, m in norms)
    with torch.no_grad():  # the passes the statistics belong to, alone, on `start` (a scratch copy makes the fakes)
        scratch = copy.deepcopy(start)
        fakes = scratch.decoder(z_prior)
        if start.encoder is not None:
            mu, logvar = start.encoder(x)
            z = mu + torch.exp(0.5 * logvar) * eps
            start.decoder(z)
            if variant.get("dis_sees_recon"):
                fakes = torch.cat([fakes, scratch.decoder(z)])
        else:
            start.decoder(z_prior)
        if start.discriminator is not None:
            start.discriminator(torch.cat([x, fakes]))
    for (name, got), (_, want) in zip(model.named_buffers(), start.named_buffers()):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15), name


def narrow(size, seed, batch=4, latent=12):
    """make()'s inputs for a VAE/GAN at 1/8 of the paper's widths, float32: the 64 px networks' layer
    sequence (where a fused convolution's sums feed the next BatchNorm) at a cost Triton's interpreter takes."""
    torch.manual_seed(seed)
    model = VAEGAN("vaegan", size, 3, latent_size=latent, fc_width=40, width=0.125)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    return model, x, philox.rows_randn(NOISE_SEED, batch, latent), torch.randn(batch, latent)


@pytest.mark.parametrize("size,variant", [pytest.param(64, dict(kind="vaegan"), marks=pytest.mark.slow),
                                          (32, dict(kind="vaegan", decoder_call="joint", dis_sees_recon=True))],
                         ids=lambda v: str(v) if isinstance(v, int) else "-".join(f"{k}={v[k]}" for k in v))
def test_the_fused_bn_relu_convolutions_route_as_the_reference(size, variant):
    # --fuse-bn-relu (Triton, under the interpreter on a CPU): the fused step's gradients and running
    # statistics against the reference routing of the same networks unfused, in float32, at gamma 1e-6
    from vaegan.fused_layers import fuse_bn_relu
    plain, x, eps, z_prior = narrow(size, seed=11)
    fused = copy.deepcopy(plain)
    joint = variant.get("decoder_call") == "joint"
    names = fuse_bn_relu(fused, skip=("decoder",) if joint else ())
    assert names == (["encoder.body.3", "encoder.body.6", "decoder.body.13", "discriminator.features.5",
                      "discriminator.features.8"] if size == 64 else ["encoder.body.3", "discriminator.features.5"])
    assert_routes_as_the_reference(fused, plain, x, eps, z_prior, UpdateConfig(gamma=1e-6, **variant), rtol=1e-4,
                                   buffers_rtol=1e-5, buffers_atol=1e-6)
