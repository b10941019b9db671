import copy
import math

import pytest
import torch

from vaegan.models import VAEGAN, Decoder, Discriminator, Encoder, pad_thin_convolutions


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(size, channels):
    model = VAEGAN("vaegan", size, channels, latent_size=20, fc_width=48)
    x = torch.rand(3, channels, size, size) * 2 - 1
    mu, logvar = model.encoder(x)
    assert mu.shape == logvar.shape == (3, 20)
    out = model.decoder(mu)
    assert out.shape == x.shape and out.abs().max() <= 1
    assert model.discriminator(x).shape == (3,)
    assert model.discriminator(x, features_only=True).shape == (3, 256, 8, 8)  # Dis_l: 16,384 features


def test_64px_networks_follow_the_papers_table():
    convs = [m for m in Discriminator(64, 3).features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 128, 256, 256]  # Dis_l is the 4th convolution
    assert convs[0].bias is not None and all(c.bias is None for c in convs[1:])
    assert [m.out_channels for m in Encoder(64, 3).body if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256]
    ups = [m.out_channels for m in Decoder(64, 3).body if isinstance(m, torch.nn.ConvTranspose2d)]
    assert ups == [256, 128, 32]
    assert all(c.kernel_size == (5, 5) for c in convs)


def test_32px_discriminator_takes_features_at_the_third_convolution():
    convs = [m for m in Discriminator(32, 3).features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3


def test_initialisation_has_the_authors_std():
    torch.manual_seed(0)
    enc = VAEGAN("vaegan", 64, 3, fc_width=1024).encoder
    fc = enc.body[-3]
    assert isinstance(fc, torch.nn.Linear)
    assert abs(fc.weight.std().item() - 1 / (3 * math.sqrt(fc.in_features))) < 1e-4
    assert enc.mu.bias.abs().max() == 0
    # a transposed convolution's fan is out_channels * k * k (DeepPy's weights are (in, out, k, k))
    dec = VAEGAN("vaegan", 64, 3).decoder
    up = [m for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in up] == [(256, 256), (256, 128), (128, 32)]
    for m in up:
        assert abs(m.weight.std().item() / (1 / (3 * math.sqrt(m.out_channels * 25))) - 1) < 0.02
    last = up[-1]  # 128 -> 32: the two fans differ by 4x, the two stds by 2x
    assert abs(last.weight.std().item() / (1 / (3 * math.sqrt(last.in_channels * 25))) - 2) < 0.05


@pytest.mark.parametrize("image_size", [32, 64])
def test_the_resize_decoder_upsamples_without_a_checkerboard_of_its_own(image_size):
    """up_conv "resize": each stage is nearest-neighbour x2 then a 3x3 convolution, so a constant input gives a
    constant output (away from the zero-padded border) whatever the weights; the authors' 5x5 stride-2 transposed
    convolution sums 9, 6, 6 or 4 taps by output phase, a checkerboard even from a constant input."""
    torch.manual_seed(0)
    resize = VAEGAN("vaegan", image_size, 3, up_conv="resize").decoder
    torch.manual_seed(0)
    authors = VAEGAN("vaegan", image_size, 3).decoder
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in resize.modules())
    convs = [m for m in resize.body if type(m) is torch.nn.Conv2d][:-1]
    ups = [m for m in authors.body if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in convs] == [
        (m.in_channels, m.out_channels, (3, 3)) for m in ups]
    for m in convs:  # the authors' init: fan in_channels*k*k
        assert abs(m.weight.std().item() / (1 / (3 * math.sqrt(m.in_channels * 9))) - 1) < 0.03
    z = torch.randn(4, 128)
    with torch.no_grad():
        assert resize.train()(z).shape == authors.train()(z).shape == (4, 3, image_size, image_size)
        constant = torch.ones(1, ups[0].in_channels, 8, 8)
        stage = resize.body[4:6]
        assert isinstance(stage[0], torch.nn.Upsample)
        inner = stage(constant)[0, :, 2:-2, 2:-2]
        assert inner.shape[-1] == 12
        assert (inner - inner[:, :1, :1]).abs().max() < 1e-5 * inner.abs().max()
        inner = ups[0](constant)[0, :, 2:-2, 2:-2]
        assert (inner - inner[:, :1, :1]).abs().max() > 0.1 * inner.abs().max()
    with pytest.raises(ValueError, match="up_conv 'bilinear' is not one of transposed, resize"):
        VAEGAN("vaegan", 32, 1, up_conv="bilinear")


def test_unsupported_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="image size 48 is not supported"):
        VAEGAN("vaegan", 48)


def test_model_variants_have_the_networks_they_need():
    assert set(VAEGAN("vae", 32).networks()) == {"encoder", "decoder"}
    assert set(VAEGAN("gan", 32).networks()) == {"decoder", "discriminator"}
    assert set(VAEGAN("vae-disl", 32).networks()) == {"encoder", "decoder", "discriminator"}
    with pytest.raises(ValueError, match="not one of"):
        VAEGAN("vqgan", 32)


def test_conditional_models_see_the_attributes_everywhere():
    names = ["Smiling", "Male", "Young"]
    model = VAEGAN("cvaegan", 32, 1, latent_size=10, fc_width=32, attribute_names=names)
    assert set(model.networks()) == {"encoder", "decoder", "discriminator"}
    assert model.decoder.body[0].in_features == 10 + 3          # Dec([z, y])
    assert model.encoder.body[0].in_channels == 1 + 3           # Enc(x, y): y as constant channels
    assert model.discriminator.features[0].in_channels == 1 + 3  # Dis(x, y): likewise
    assert set(VAEGAN("cvae", 32, attribute_names=names).networks()) == {"encoder", "decoder"}
    assert set(VAEGAN("cgan", 32, attribute_names=names).networks()) == {"decoder", "discriminator"}
    model.eval()
    z = torch.randn(2, 10)
    smiling, serious = torch.tensor([1.0, 1, -1]), torch.tensor([-1.0, 1, -1])
    assert not torch.allclose(model.decode(z, smiling), model.decode(z, serious))  # y changes the image
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert not torch.allclose(model.encode(x, smiling)[0], model.encode(x, serious)[0])
    assert model.sample(2, seed=1, attributes=smiling).shape == (2, 1, 32, 32)
    assert torch.equal(model.sample(2, seed=1, attributes=smiling), model.sample(2, seed=1, attributes=smiling))


def test_conditional_attribute_errors_are_clear():
    model = VAEGAN("cgan", 32, 1, latent_size=10, attribute_names=["Smiling", "Male"]).eval()
    with pytest.raises(ValueError, match=r"conditional: pass attributes, \(N, 2\) values of \+-1 for Smiling, Male"):
        model.sample(2)
    with pytest.raises(ValueError, match=r"attributes of shape \(2, 3\) given for 2 images"):
        model.sample(2, attributes=torch.ones(2, 3))
    with pytest.raises(ValueError, match="not conditional"):
        VAEGAN("gan", 32).eval().sample(2, attributes=torch.ones(2, 1))
    with pytest.raises(ValueError, match="needs attribute names"):
        VAEGAN("cvae", 32)


def test_width_multiplier_scales_every_convolution_and_one_is_the_papers():
    paper, narrow = VAEGAN("vaegan", 64, 3), VAEGAN("vaegan", 64, 3, width=0.25)
    assert [type(m) for m in paper.modules()] == [type(m) for m in narrow.modules()]
    for p, n in zip(paper.modules(), narrow.modules()):
        if isinstance(p, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and p.out_channels != 3:
            assert n.out_channels == p.out_channels // 4
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert narrow.discriminator(x, features_only=True).shape == (2, 64, 8, 8)  # Dis_l: 256 / 4 channels
    assert paper.discriminator(x, features_only=True).shape == (2, 256, 8, 8)
    assert sum(p.numel() for p in narrow.parameters()) < 0.2 * sum(p.numel() for p in paper.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_thin_convolutions_compute_the_same_values_and_gradients(channels_last):
    # --pad-channels: the 3-channel convolutions computed with 8 channels (zeros), the same parameters
    torch.manual_seed(4)
    model = VAEGAN("cvaegan", 32, 3, latent_size=8, fc_width=16, attribute_names=["A", "B"]).double()
    padded = copy.deepcopy(model)
    names = pad_thin_convolutions(padded)
    assert names == ["encoder.body.0", "decoder.body.10", "discriminator.features.0"]
    assert padded.state_dict().keys() == model.state_dict().keys()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, padded = model.to(memory_format=fmt), padded.to(memory_format=fmt)
    x = (torch.rand(4, 3, 32, 32, dtype=torch.float64) * 2 - 1).contiguous(memory_format=fmt)
    y = torch.tensor([[1.0, -1.0]] * 4, dtype=torch.float64)
    outputs = []
    for m in (model, padded):
        m.zero_grad()
        mu, _ = m.encoder(x, y)
        images = m.decoder(mu, y)
        loss = m.discriminator(images, y).sum() + images.square().mean()
        loss.backward()
        outputs.append((images.detach(), [p.grad for p in m.parameters() if p.grad is not None]))
    (want, want_grads), (got, got_grads) = outputs
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):  # (the 1e-13: mu's bias, whose gradient a BatchNorm cancels to ~1e-17)
        assert (g - w).abs().max() <= 1e-10 * w.abs().max() + 1e-13
