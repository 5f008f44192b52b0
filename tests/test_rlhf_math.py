"""Classic RLHF's math as pure functions: the reward model's Bradley-Terry loss, GAE,
whitening and the critic's clipped value loss, each against a hand computation or autograd."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_unified.losses.advantages import gae_advantages, masked_moments, whiten
from lightning_unified.losses.bradley_terry import bradley_terry_loss, pair_statistics
from lightning_unified.losses.value import clipped_value_loss


# --- Bradley-Terry --------------------------------------------------------------------------


def test_bradley_terry_matches_a_hand_computation_with_margin_and_centring():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.25, 0.5])
    margin, c = torch.tensor([0.5, 0.0]), 0.01
    loss = bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=c)
    # pair 0: -log sigmoid(1 - 0.25 - 0.5) + 0.01 * 1.25^2; pair 1: -log sigmoid(-1) + 0.01 * 0^2
    expected = [math.log1p(math.exp(-0.25)) + 0.01 * 1.25 ** 2, math.log1p(math.exp(1.0))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    # no margin, no centring: TRL's plain loss
    plain = bradley_terry_loss(chosen, rejected)
    assert plain.tolist() == pytest.approx([math.log1p(math.exp(-0.75)), math.log1p(math.exp(1.0))], rel=1e-6)


def test_bradley_terry_gradient_is_the_closed_form_and_autograd():
    torch.manual_seed(0)
    chosen = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(6, dtype=torch.float64, requires_grad=True)
    margin, c = torch.rand(6, dtype=torch.float64), 0.05
    bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=c).mean().backward()
    s = torch.sigmoid(-(chosen - rejected - margin)).detach()
    centre = 2 * c * (chosen + rejected).detach()
    torch.testing.assert_close(chosen.grad, (-s + centre) / 6)
    torch.testing.assert_close(rejected.grad, (s + centre) / 6)
    # and against autograd of the textbook formula written independently
    a, b = chosen.detach().requires_grad_(), rejected.detach().requires_grad_()
    (-(torch.sigmoid(a - b - margin)).log() + c * (a + b) ** 2).mean().backward()
    torch.testing.assert_close(a.grad, chosen.grad)
    torch.testing.assert_close(b.grad, rejected.grad)


def test_pair_statistics_and_bad_shapes():
    stats = pair_statistics(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert stats["accuracy"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    assert stats["margin"].tolist() == [1.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="margin must be"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))


# --- GAE --------------------------------------------------------------------------------------


def _closed_form(rewards, values, gamma, lam):
    """sum_l (gamma lam)^l delta_{t+l} over one episode's chosen tokens, in plain Python."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) for t in range(n)]


def test_gae_equals_its_closed_form_and_returns_are_advantage_plus_value():
    torch.manual_seed(1)
    rewards, values = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)):
        advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
        for row in range(3):
            expected = _closed_form(rewards[row].tolist(), values[row].tolist(), gamma, lam)
            assert advantages[row].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(returns, advantages + values)
    # lam = 1, gamma = 1: the advantage is the reward-to-go minus the value (Monte Carlo)
    advantages, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, rewards.flip(-1).cumsum(-1).flip(-1) - values)


def test_gae_skips_padding_and_observations_and_stops_at_episode_ends():
    # one row: chosen tokens at 0, 1, [2 is an observation], 3, 4 (episode ends), 5, [6, 7 padding]
    r = torch.tensor([[0.1, 0.0, 9.0, 0.5, 1.0, 2.0, 7.0, 7.0]])
    v = torch.tensor([[0.2, 0.4, 8.0, 0.3, 0.6, 0.5, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0]])
    ends = torch.zeros(1, 8, dtype=torch.bool)
    ends[0, 4] = True
    gamma, lam = 0.9, 0.8
    advantages, returns = gae_advantages(r, v, mask, gamma=gamma, lam=lam, episode_ends=ends)
    # the reverse recursion by hand: episode 2 is token 5 alone, episode 1 is tokens 0, 1, 3, 4
    a5 = 2.0 - 0.5
    a4 = 1.0 + gamma * 0.0 - 0.6  # its episode ends: no bootstrap, no advantage from token 5
    a3 = 0.5 + gamma * 0.6 - 0.3 + gamma * lam * a4
    a1 = 0.0 + gamma * 0.3 - 0.4 + gamma * lam * a3  # the observation at 2 is skipped
    a0 = 0.1 + gamma * 0.4 - 0.2 + gamma * lam * a1
    expected = [a0, a1, 0.0, a3, a4, a5, 0.0, 0.0]
    assert advantages[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert returns[0].tolist() == pytest.approx([a + (val if m else 0.0) for a, val, m in
                                                 zip(expected, v[0].tolist(), mask[0].tolist())], rel=1e-6)
    # the closed form over each episode's chosen tokens agrees
    assert [a0, a1, a3, a4] == pytest.approx(_closed_form([0.1, 0.0, 0.5, 1.0], [0.2, 0.4, 0.3, 0.6], gamma, lam))
    # an episode end on an unchosen token (an environment's last observation) cuts the chain too
    ends_on_observation = torch.zeros(1, 8, dtype=torch.bool)
    ends_on_observation[0, 2] = True
    cut, _ = gae_advantages(r, v, mask, gamma=gamma, lam=lam, episode_ends=ends_on_observation)
    assert cut[0, 1].item() == pytest.approx(0.0 + gamma * 0.0 - 0.4)


def test_gae_rows_are_independent_and_right_padding_changes_nothing():
    torch.manual_seed(2)
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded, _ = gae_advantages(r, v, mask, gamma=0.95, lam=0.9)
    alone, _ = gae_advantages(r[:1, :3], v[:1, :3], mask[:1, :3], gamma=0.95, lam=0.9)
    torch.testing.assert_close(padded[0, :3], alone[0])
    assert padded[0, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="gamma and lam"):
        gae_advantages(r, v, mask, gamma=1.5, lam=0.9)


def test_whitening_is_masked_and_takes_global_moments():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = whiten(x, mask)
    expected = (kept - kept.mean()) / (kept.var(unbiased=True) + 1e-8).sqrt()
    torch.testing.assert_close(out[mask.bool()], expected)
    assert out[~mask.bool()].abs().sum() == 0  # the 100 on a masked token neither counts nor leaks
    unshifted = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(unshifted[mask.bool()], expected + kept.mean())
    # two ranks' moments summed give the whole batch's whitening on each share
    halves = masked_moments(x[:1], mask[:1]) + masked_moments(x[1:], mask[1:])
    torch.testing.assert_close(whiten(x[1:], mask[1:], halves)[mask[1:].bool()], expected[3:])


# --- the critic's clipped value loss ----------------------------------------------------------


def test_clipped_value_loss_by_hand_and_its_gradient_against_autograd():
    returns = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0, 0.9, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.5, 1.3, 1.5]], dtype=torch.float64, requires_grad=True)
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    # token 0: inside the band, both errors equal: 0.5 * 0.81
    # token 1: v moved 0.5 > 0.2 towards R: clipped value 0.2 errs more (0.64 > 0.25): 0.5 * 0.64, no gradient
    # token 2: v moved past R by 0.4 > 0.2; clipped 1.1 errs 0.01 < 0.09: the unclipped 0.5 * 0.09
    # token 3: v moved 0.5 towards R from 2.0; clipped 1.8 errs 0.64 > 0.25: 0.5 * 0.64, no gradient
    assert loss[0].tolist() == pytest.approx([0.405, 0.32, 0.045, 0.32])
    assert clipped[0].tolist() == [False, True, False, True]
    loss.sum().backward()
    hand = torch.tensor([[0.1 - 1.0, 0.0, 1.3 - 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, hand)
    # random values: autograd of the function against autograd of verl's written-out form
    torch.manual_seed(3)
    v = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    o, R = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    clipped_value_loss(v, o, R, clip=0.3)[0].sum().backward()
    w = v.detach().requires_grad_()
    (0.5 * torch.max((w - R) ** 2, (torch.clamp(w, o - 0.3, o + 0.3) - R) ** 2)).sum().backward()
    torch.testing.assert_close(v.grad, w.grad)
    # no clip: half the squared error
    plain, _ = clipped_value_loss(values.detach(), old, returns, clip=None)
    torch.testing.assert_close(plain, 0.5 * (values.detach() - returns) ** 2)
