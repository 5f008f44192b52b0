"""Several updates per rollout: the sampled batch is replayed, so the ratio to the stored
behaviour log-probs drifts from 1 and PPO's clip acts, and the gradient is still exact."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.models.forward import response_hidden
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import Importance, OnPolicy, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import digit_match
from lightning_unified.models.loading import build_policy
from tests.lightning_helpers import TINY, quiet_trainer, tiny_datamodule, tiny_module


class StepSpy(L.Callback):
    """Before every optimizer step (after the module has normalised the gradient): the
    gradient and the parameters it was taken at; at the batch's end, the batch."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning runs the closure (forward, backward, normalisation) inside optimizer.step,
        # so the pre-hook sees the parameters and the post-hook the gradient of one step
        def before(optimizer, args, kwargs):
            self._params = {name: p.detach().clone() for name, p in pl_module.policy.named_parameters()}

        def after(optimizer, args, kwargs):
            self.steps.append({name: (self._params[name], p.grad.detach().clone())
                               for name, p in pl_module.policy.named_parameters() if p.grad is not None})
        trainer.optimizers[0].register_step_pre_hook(before)
        trainer.optimizers[0].register_step_post_hook(after)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch, self.outputs = dict(batch), outputs


def response_logp_at(module: UnifiedModule, params: dict, batch: dict) -> torch.Tensor:
    """[B, R] log-probs of the batch's responses under ``module``'s policy set to ``params``
    (a StepSpy step's), with a fresh graph and no gradient left from before."""
    policy = module.policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name in params:
                p.copy_(params[name][0])
    policy.zero_grad()
    hidden = response_hidden(policy, batch[F.PROMPT_IDS], batch[F.PROMPT_MASK], batch[F.RESPONSE_IDS],
                             batch[F.RESPONSE_MASK])
    logits = torch.nn.functional.linear(hidden, policy.lm_head.weight) / module.temperature
    return torch.log_softmax(logits, -1).gather(-1, batch[F.RESPONSE_IDS][..., None])[..., 0]


def clipped_surrogate_gradient(module: UnifiedModule, params: dict, batch: dict, eps: float) -> tuple[dict, float]:
    """Autograd of PPO's clipped surrogate, token-mean, against the stored behaviour
    log-probs, at ``params``; and the share of tokens where the clip is active."""
    policy = module.policy
    mask = batch[F.RESPONSE_MASK].bool()
    logp = response_logp_at(module, params, batch)
    rho = (logp - batch[F.BEHAVIOUR_LOGP]).exp()
    adv = batch[F.ADVANTAGES]
    surrogate = torch.minimum(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)
    loss = -(surrogate * mask).sum() / mask.sum()
    loss.backward()
    clipped = ((rho.detach() * adv) != surrogate.detach()) & mask
    return ({name: p.grad.detach().clone() for name, p in policy.named_parameters() if name in params},
            float(clipped.sum() / mask.sum()))


def replayed_batch(spec: OnPolicy) -> tuple[UnifiedModule, L.Trainer, StepSpy]:
    """One sampled batch of 8 prompts trained with ``spec``'s updates, watched by a StepSpy.
    The step is large, so a later update sees a policy far enough from the sampler's to clip."""
    module = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
    module.optimizer_factory = functools.partial(torch.optim.SGD, lr=20.0)
    spy = StepSpy()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[spy])
    trainer.fit(module, datamodule=tiny_datamodule(batch_size=8))
    return module, trainer, spy


def test_second_update_matches_the_clipped_surrogate_and_clips() -> None:
    eps = 0.2
    spec = OnPolicy(sampling=Sampling(num_generations=4), importance=Importance(ratio="ppo_clip", eps_low=eps,
                                                                                  eps_high=eps),
                    updates_per_rollout=2)
    module, trainer, spy = replayed_batch(spec)

    assert len(spy.steps) == 2, "one sampled batch, two optimizer steps"
    assert trainer.global_step == 1, "global_step counts sampled batches"
    assert module.progress["optimizer_steps"] == 2
    checker = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
    for step, expected_clip in ((0, "none"), (1, "some")):
        grads, clip_fraction = clipped_surrogate_gradient(checker, spy.steps[step], spy.batch, eps)
        for name, (_, grad) in spy.steps[step].items():
            torch.testing.assert_close(grad, grads[name], atol=1e-5, rtol=1e-4, msg=f"update {step + 1}, {name}")
        if expected_clip == "none":
            assert clip_fraction == 0.0, "before any update the ratio is 1: nothing is clipped"
        else:
            assert clip_fraction > 0.0, "the second update must see clipped tokens"
            # the logged diagnostic is the last pass's, and agrees
            logged = float(trainer.callback_metrics["importance/clip_fraction"])
            assert logged == pytest.approx(clip_fraction, abs=1e-6)


def test_minibatches_split_whole_prompts_and_cover_the_batch() -> None:
    """2 mini-batches x 2 updates: four steps, each on half of the prompts' groups, in order;
    the callbacks see the final pass's log-probs for every row."""
    spec = OnPolicy(sampling=Sampling(num_generations=3), importance=Importance(ratio="truncated"),
                    updates_per_rollout=2, minibatches=2)
    module = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
    rows_seen = []
    original = module.updates.select

    def spy_rows(batch):
        out = original(batch)
        rows_seen.append((module.updates.update, out[F.RESPONSE_IDS].shape[0], out[F.ADVANTAGES].shape[0]))
        return out

    module.updates.select = spy_rows
    spy = StepSpy()
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[spy]).fit(module, datamodule=tiny_datamodule(batch_size=4))
    # 4 prompts x 3 samples = 12 rows; each mini-batch is 2 whole prompts = 6 rows
    assert rows_seen == [(i, 6, 6) for i in range(4)] * 2
    assert len(spy.steps) == 8 and module.progress["optimizer_steps"] == 8
    logp = spy.outputs["target_logp"]
    assert logp.shape == spy.batch[F.RESPONSE_IDS].shape
    assert (logp[spy.batch[F.RESPONSE_MASK].bool()] < 0).all(), "every row's log-prob was filled in"


def test_sequence_clip_ratio_is_refreshed_before_every_update() -> None:
    spec = OnPolicy(sampling=Sampling(num_generations=2), importance=Importance(ratio="sequence_clip"),
                    updates_per_rollout=2)
    module = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
    ratios = []
    original = module.updates.select

    def spy_rows(batch):
        out = original(batch)
        ratios.append(out)  # the importance callback writes log_ratio into this dict
        return out

    module.updates.select = spy_rows
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=tiny_datamodule(batch_size=4))
    first, second = (r[F.LOG_RATIO] for r in ratios)
    mask = ratios[0][F.RESPONSE_MASK].bool()
    torch.testing.assert_close(first[mask], torch.zeros_like(first[mask]), atol=1e-5, rtol=0)
    assert second[mask].abs().max() > 1e-4, "the second update's sequence ratio sees the moved policy"


def test_replay_without_a_ratio_is_refused() -> None:
    spec = OnPolicy(importance=Importance(ratio="none"), updates_per_rollout=2)
    with pytest.raises(ValueError, match="importance.ratio=none ignores"):
        tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))


def test_replay_with_accumulation_is_refused() -> None:
    spec = OnPolicy(sampling=Sampling(num_generations=2), updates_per_rollout=2)
    module = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        quiet_trainer(max_steps=1, limit_val_batches=0, accumulate_grad_batches=2).fit(
            module, datamodule=tiny_datamodule(batch_size=4))


@pytest.mark.parametrize("field,value", [("updates_per_rollout", 0), ("minibatches", 0)])
def test_bad_replay_settings(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"data_source.{field} must be >= 1"):
        OnPolicy(**{field: value})


def test_stages_and_callbacks_added_by_hand_get_the_per_update_hook() -> None:
    """``on_update`` (a stage's) and ``on_update_start`` (a Lightning callback's) are public
    hooks: a stage a user adds to the module (here an exported ImportanceStage asking for
    GSPO's sequence ratio, placed after the method's own importance stage) runs before
    every update, and then a callback handed to the Trainer directly."""
    import lightning as L

    from lightning_unified.stages import ImportanceStage
    from lightning_unified.stages.host import PolicyHost

    class SequenceRatio(ImportanceStage):
        name = "sequence_ratio"

        def __init__(self) -> None:
            super().__init__(Importance(ratio="sequence_clip"))
            self.after = "importance"

    spec = OnPolicy(sampling=Sampling(num_generations=2), importance=Importance(ratio="truncated"),
                    updates_per_rollout=2)
    data = tiny_datamodule()
    module = UnifiedModule(build_policy(data.tokenizer, config=TINY), data.tokenizer, spec,
                           Sparse(rewards=[Reward(digit_match)]), stages=[SequenceRatio()])
    assert module.pipeline.names == ["sample", "rewards", "advantages", "importance", "sequence_ratio"]

    class Counter(L.Callback):
        def __init__(self) -> None:
            self.seen = []

        def on_update_start(self, trainer, pl_module, batch) -> None:
            self.seen.append((trainer.global_step, F.LOG_RATIO in batch))

    counter = Counter()
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[counter]).fit(
        module, datamodule=tiny_datamodule(batch_size=4))
    # two batches x two updates each; the added stage ran first and wrote the sequence
    # ratio into every update's rows
    assert counter.seen == [(0, True), (0, True), (1, True), (1, True)]
    assert isinstance(module, PolicyHost), "the module offers what its stages read"


def test_decoupled_ppo_clips_against_the_batchs_starting_policy_and_weighs_the_sampler() -> None:
    """AReaL's decoupled PPO over two updates: the proximal log-probs are the trainer's at the
    batch's start; each update's gradient is autograd's of -min(pi_prox / mu, c) min(rho A,
    clip(rho) A) with rho = pi / pi_prox; the second update clips, the first cannot."""
    eps, truncate = 0.2, 2.0
    spec = OnPolicy(sampling=Sampling(num_generations=4),
                    importance=Importance(ratio="decoupled_ppo_clip", eps_low=eps, eps_high=eps, truncate=truncate),
                    updates_per_rollout=2)
    module, trainer, spy = replayed_batch(spec)
    assert len(spy.steps) == 2
    checker = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
    batch, mask = spy.batch, spy.batch[F.RESPONSE_MASK].bool()

    with torch.no_grad():
        start = response_logp_at(checker, spy.steps[0], batch)
    torch.testing.assert_close(batch[F.PROXIMAL_LOGP][mask], start[mask], atol=1e-5, rtol=0)
    u = (batch[F.PROXIMAL_LOGP] - batch[F.BEHAVIOUR_LOGP]).exp().clamp(max=truncate)
    clipped_share = []
    for step in range(2):
        logp = response_logp_at(checker, spy.steps[step], batch)
        rho = (logp - batch[F.PROXIMAL_LOGP]).exp()
        adv = batch[F.ADVANTAGES]
        surrogate = torch.minimum(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)
        (-(u * surrogate * mask).sum() / mask.sum()).backward()
        for name, (_, grad) in spy.steps[step].items():
            torch.testing.assert_close(grad, dict(checker.policy.named_parameters())[name].grad, atol=1e-5, rtol=1e-4,
                                       msg=f"update {step + 1}, {name}")
        clipped_share.append(float((((rho.detach() * adv) != surrogate.detach()) & mask).sum()))
    assert clipped_share[0] == 0 and clipped_share[1] > 0
    for name in ("behaviour_kl", "proximal_kl", "clip_fraction", "truncated_fraction"):
        assert f"importance/{name}" in trainer.callback_metrics, name
    assert float(trainer.callback_metrics["importance/proximal_kl"]) > 0


def test_the_weights_follow_the_fields_a_per_update_hook_adds() -> None:
    """The weight builders are chosen for each update after its per-update hooks: a callback
    that gives an SFT batch advantages of 0 in ``on_update_start`` makes the update a zero
    gradient (advantage-weighted tokens), not plain SFT (chosen before the hook, they moved
    every parameter). Plain SGD, so weight decay moves nothing either."""
    import lightning as L

    from lightning_unified.specs import OffPolicy

    class ZeroAdvantages(L.Callback):
        def on_update_start(self, trainer, pl_module, batch) -> None:
            batch[F.ADVANTAGES] = torch.zeros(batch[F.RESPONSE_MASK].shape)

    module = tiny_module(OffPolicy(), Sparse())
    module.optimizer_factory = functools.partial(torch.optim.SGD, lr=1.0)
    before = [p.detach().clone() for p in module.policy.parameters()]
    quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[ZeroAdvantages()]).fit(
        module, datamodule=tiny_datamodule())
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(module.policy.parameters(), before))
    assert moved == 0.0, f"the update trained on the data's tokens as SFT instead of their advantages: moved {moved}"
