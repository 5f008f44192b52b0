"""Advantage estimators and ratio diagnostics on hand-checkable numbers."""

from __future__ import annotations

import pytest
import torch

from lightning_unified.losses import advantages as adv
from lightning_unified.losses import importance


def test_reinforce_subtracts_the_batch_mean() -> None:
    torch.testing.assert_close(adv.reinforce_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0])), torch.tensor([0.0, -1.0, -1.0, 2.0]))


def test_rloo_leaves_the_sample_out() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    got = adv.rloo_advantages(r, group_size=3)
    want = torch.tensor([1.0 - 0.0, 0.0 - 0.5, 0.0 - 0.5, 2.0 - 3.5, 2.0 - 3.5, 5.0 - 2.0])
    torch.testing.assert_close(got, want)


def test_grpo_normalises_per_group_and_zeroes_uniform_groups() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    got = adv.grpo_advantages(r, group_size=4)
    first = r[:4]
    torch.testing.assert_close(got[:4], (first - first.mean()) / (first.std() + 1e-6))
    torch.testing.assert_close(got[4:], torch.zeros(4))  # no signal in a group that agrees


def test_grpo_batch_std_centres_per_group_and_scales_by_the_batch() -> None:
    """TRL's scale_rewards="batch": (r - group mean) / (std of every reward + eps); the
    callback's global std (sums over ranks) equals torch's on one process."""
    from lightning_unified.stages.advantages import estimate_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.5, 0.0, 3.0])
    want = torch.cat([g - g.mean() for g in r.reshape(3, 4)]) / (r.std() + 1e-4)
    torch.testing.assert_close(adv.grpo_batch_std_advantages(r, group_size=4, eps=1e-4), want)
    torch.testing.assert_close(estimate_advantages(r, "grpo_batch_std", 4, eps=1e-4), want)
    assert (want[4:8] == 0).all() and want[:4].abs().sum() > 0  # an all-equal group still has none
    # unlike grpo, a group's scale is not its own spread
    assert not torch.allclose(want, adv.grpo_advantages(r, group_size=4, eps=1e-4))


def test_dr_grpo_only_centres() -> None:
    r = torch.tensor([1.0, 0.0, 3.0, 5.0])
    torch.testing.assert_close(adv.dr_grpo_advantages(r, group_size=2), torch.tensor([0.5, -0.5, -1.0, 1.0]))


def test_group_size_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="groups of group_size=4"):
        adv.grpo_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="RLOO needs group_size >= 2"):
        adv.rloo_advantages(torch.zeros(6), group_size=1)


def test_to_tokens_and_kl_penalty() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(adv.to_tokens(torch.tensor([2.0, -1.0]), mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    got = adv.kl_penalized_rewards(torch.tensor([1.0, 1.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(got, torch.tensor([1.0 - 0.1 * (0.5 - 1.0), 1.0]))


def test_reverse_kl_returns_sum_future_rewards() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    teacher = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    student = torch.tensor([[-2.0, -2.0, -1.0, -1.0]])
    torch.testing.assert_close(adv.reverse_kl_returns(teacher, student, mask), torch.tensor([[-1.0, -2.0, -2.0, 0.0]]))


def test_sequence_log_ratio_is_the_mean_over_the_sequence() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logp = torch.tensor([[-1.0, -1.0, -5.0], [-2.0, -5.0, -5.0]])
    mu = torch.tensor([[-2.0, -1.5, 0.0], [-1.0, 0.0, 0.0]])
    torch.testing.assert_close(importance.sequence_log_ratio(logp, mu, mask), torch.tensor([[0.75, 0.75, 0.0], [-1.0, 0.0, 0.0]]))


def test_diagnostics() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    on_policy = importance.ratio_diagnostics(torch.zeros(1, 4), mask)
    assert on_policy["ess"].item() == pytest.approx(1.0)
    assert on_policy["mean_ratio"].item() == pytest.approx(1.0)
    log_ratio = torch.log(torch.tensor([[2.0, 0.5, 1.0, 1.0]]))
    a = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    d = importance.ratio_diagnostics(log_ratio, mask, advantages=a, eps_low=0.2, eps_high=0.2, truncate=1.5)
    assert d["ess"].item() == pytest.approx(4.5**2 / (4 * 6.25))
    assert d["clip_fraction"].item() == pytest.approx(0.5)  # 2.0 with A > 0 and 0.5 with A < 0
    assert d["truncated_fraction"].item() == pytest.approx(0.25)
    assert d["max_ratio"].item() == pytest.approx(2.0)


def test_k3_estimates_are_never_negative_when_the_policies_nearly_agree() -> None:
    """The k3 estimator r - 1 - log r is >= 0; with log-ratios of 1e-7 to 1e-4 (an engine
    that agrees with the trainer, a reference one step behind) float32's exp(x) - 1 rounds
    below x, and the estimate came out negative (-2.5e-9 here). It is x^2 / 2 to first order."""
    from lightning_unified.losses import weight_builders

    generator = torch.Generator().manual_seed(0)
    sampler = -3 * torch.rand(4, 64, generator=generator)
    for scale in (1e-7, 1e-6, 1e-5, 1e-4):
        log_r = scale * torch.randn(4, 64, generator=generator)
        kl = importance.mismatch_kl(sampler + log_r, sampler, torch.ones(4, 64))
        assert 0 <= kl.item() <= (log_r.double() ** 2).mean().item(), (scale, kl.item())
        student = torch.log_softmax(torch.randn(4, 64, 8, generator=generator), -1)
        targets = torch.randint(0, 8, (4, 64), generator=generator)
        chosen = student.gather(-1, targets[..., None])[..., 0]
        reference = chosen + log_r
        penalty = weight_builders.k3_reference_penalty(student, targets, reference, kl_coef=1.0)
        assert (penalty.objective >= 0).all(), scale
        exact = (reference.double() - chosen.double()).exp() - 1  # r - 1 in float64
        torch.testing.assert_close(penalty.coef.double(), exact, rtol=1e-4, atol=1e-12)


def test_reward_metrics() -> None:
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    m = adv.reward_metrics(r, group_size=2)
    assert m["reward_mean"].item() == pytest.approx(0.5)
    assert m["reward_std"].item() == pytest.approx(r.std().item())
    assert m["zero_signal_fraction"].item() == pytest.approx(2 / 3)  # groups (1, 1) and (0, 0)


def test_ratios_never_overflow_and_equal_rewards_give_zero_advantages() -> None:
    from lightning_unified.losses import weight_builders
    from lightning_unified.losses.importance import MAX_LOG_RATIO, ratio_diagnostics

    logp = torch.log_softmax(torch.randn(3, 5), -1)
    targets = torch.tensor([0, 1, 2])
    behaviour = torch.tensor([-200.0, -1.0, -300.0])  # a stale sampler: log rho of about 200
    for builder in (weight_builders.importance_weighted_advantage, weight_builders.ppo_clip):
        out = builder(logp, targets, advantages=torch.tensor([-1.0, 1.0, -2.0]), behaviour_logp=behaviour)
        assert torch.isfinite(out.coef).all() and torch.isfinite(out.objective).all(), builder.__name__
    stats = ratio_diagnostics(torch.tensor([[250.0, 0.0]]), torch.ones(1, 2))
    assert all(torch.isfinite(v) for v in stats.values())
    assert float(stats["max_ratio"]) == pytest.approx(float(torch.tensor(MAX_LOG_RATIO).exp()))
    for estimator in (adv.grpo_advantages, adv.rloo_advantages, adv.dr_grpo_advantages):
        assert torch.equal(estimator(torch.full((6,), 0.7), group_size=3), torch.zeros(6)), estimator.__name__


# --- masked importance sampling (IcePop): a band on the ratio -------------------------------
def test_the_mask_band_drops_exactly_the_tokens_outside_it() -> None:
    from lightning_unified.losses.weight_builders import importance_weighted_advantage, ppo_clip

    gen = torch.Generator().manual_seed(0)
    student_logp = torch.log_softmax(torch.randn(6, 5, generator=gen, dtype=torch.float64), -1)  # [c, V]
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    own = student_logp.gather(-1, targets[:, None])[:, 0]
    # ratios 0.3, 0.6, 1.0, 1.5, 2.5, 1.0
    behaviour = own - torch.log(torch.tensor([0.3, 0.6, 1.0, 1.5, 2.5, 1.0], dtype=torch.float64))
    advantages = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    plain = importance_weighted_advantage(student_logp, targets, advantages, behaviour)
    banded = importance_weighted_advantage(student_logp, targets, advantages, behaviour, mask_low=0.5, mask_high=2.0)
    outside = torch.tensor([True, False, False, False, True, False])
    assert (banded.coef[outside] == 0).all()
    torch.testing.assert_close(banded.coef[~outside], plain.coef[~outside])
    clipped = ppo_clip(student_logp, targets, advantages, behaviour, eps_low=0.9, eps_high=10.0,
                       mask_low=0.5, mask_high=2.0)
    assert (clipped.coef[outside] == 0).all() and (clipped.coef[~outside] != 0).any()
    # at the sequence level (importance.level=sequence) the weight, its truncation and the
    # band all act on the sequence's ratio, whatever each token's
    kept_sequence = torch.zeros(6, dtype=torch.float64)  # log ratio 0: ratio 1, inside the band
    whole = importance_weighted_advantage(student_logp, targets, advantages, behaviour, kept_sequence,
                                          mask_low=0.5, mask_high=2.0)
    torch.testing.assert_close(whole.coef, advantages)
    dropped_sequence = torch.full((6,), 3.0, dtype=torch.float64)  # ratio e^3, outside
    assert (importance_weighted_advantage(student_logp, targets, advantages, behaviour, dropped_sequence,
                                          mask_low=0.5, mask_high=2.0).coef == 0).all()
    truncated = importance_weighted_advantage(student_logp, targets, advantages, behaviour, dropped_sequence,
                                              truncate=2.0)
    torch.testing.assert_close(truncated.coef, 2.0 * advantages)  # sequence-level TIS: min(e^3, 2) = 2


def test_a_masked_band_needs_a_ratio_and_an_order() -> None:
    from lightning_unified.specs import Importance

    with pytest.raises(ValueError, match="ratio=none has none"):
        Importance(ratio="none", mask_high=2.0)
    with pytest.raises(ValueError, match="mask_low must be below mask_high"):
        Importance(mask_low=2.0, mask_high=0.5)


def test_sequence_clip_without_its_sequence_ratio_is_refused() -> None:
    from lightning_unified import batch as F
    from lightning_unified.specs import Importance, Reward, Sparse
    from lightning_unified.builder_choice import weight_builders_for

    batch = {F.ADVANTAGES: torch.zeros(2, 3), F.BEHAVIOUR_LOGP: torch.zeros(2, 3)}
    for importance in (Importance(ratio="sequence_clip"), Importance(ratio="truncated", level="sequence")):
        with pytest.raises(KeyError, match="log_ratio"):  # as every update checks its rows
            F.require_each(batch, weight_builders_for(batch, Sparse(rewards=[Reward(len)]), importance).needs)


def test_decoupled_ppo_needs_its_proximal_log_probs_and_token_level_ratios() -> None:
    from lightning_unified import batch as F
    from lightning_unified.specs import Importance, Reward, Sparse
    from lightning_unified.builder_choice import weight_builders_for

    with pytest.raises(ValueError, match="decoupled_ppo_clip weighs each token .* importance.level=sequence is not"):
        Importance(ratio="decoupled_ppo_clip", level="sequence")
    batch = {F.ADVANTAGES: torch.zeros(2, 3), F.BEHAVIOUR_LOGP: torch.zeros(2, 3), F.SAMPLED: True}
    with pytest.raises(KeyError, match="proximal_logp"):
        F.require_each(batch, weight_builders_for(batch, Sparse(rewards=[Reward(len)]),
                                                  Importance(ratio="decoupled_ppo_clip")).needs)
