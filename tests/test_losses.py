"""The reference losses against values computed by hand."""
import math

import torch

from kernels import reference as losses


def test_kl_is_zero_at_the_prior_and_matches_hand_values():
    assert losses.kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)).abs().max() == 0
    mu = torch.tensor([[1.0, -2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    # -1/2 [(1 + 0 - 1 - 1) + (1 + ln 4 - 4 - 4)]
    expected = -0.5 * ((1 + 0 - 1 - 1) + (1 + math.log(4.0) - 4 - 4))
    assert torch.allclose(losses.kl_divergence(mu, logvar), torch.tensor([expected]))


def test_feature_nll_sums_half_squared_error_over_all_feature_dimensions():
    fake = torch.zeros(2, 2, 3, 3)
    real = torch.zeros(2, 2, 3, 3)
    real[0, 0, 0, 0], real[0, 1, 2, 2] = 2.0, -1.0
    real[1] = 0.5
    got = losses.feature_nll(fake, real)
    assert torch.allclose(got, torch.tensor([0.5 * (4 + 1), 0.5 * 18 * 0.25]))


def test_log_losses_from_logits_equal_the_probability_forms():
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    p = torch.sigmoid(logits)
    assert torch.allclose(losses.real_log_loss(logits), -torch.log(p))
    assert torch.allclose(losses.fake_log_loss(logits), -torch.log(1 - p))
    assert torch.allclose(losses.real_log_loss_eps(logits), -torch.log(p + 1e-3))
    assert torch.allclose(losses.fake_log_loss_eps(logits), -torch.log(1 - p + 1e-3))
    assert abs(losses.real_log_loss(torch.tensor([0.0])).item() - math.log(2)) < 1e-7


def test_log_losses_from_logits_stay_finite_where_probabilities_saturate():
    logits = torch.tensor([-200.0, 200.0])
    assert torch.allclose(losses.real_log_loss(logits), torch.tensor([200.0, 0.0]))
    assert torch.allclose(losses.fake_log_loss(logits), torch.tensor([0.0, 200.0]))
    # the authors' form is bounded by -log(1e-3) instead
    assert torch.allclose(losses.real_log_loss_eps(logits), torch.tensor([-math.log(1e-3), -math.log(1 + 1e-3)]), atol=1e-6)


def test_equilibrium_costs_are_batch_means_of_the_authors_forms():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])
    r, f = losses.equilibrium_costs(real, fake)
    assert torch.isclose(r, losses.real_log_loss_eps(real).mean())
    assert torch.isclose(f, losses.fake_log_loss_eps(fake).mean())
