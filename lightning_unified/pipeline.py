"""What a (data_source, signal) pair runs: its batch stages, in the order a step's data
flows (sample, then score (reference, teacher) or reward, then advantages and reweighting),
with any stage of the user's placed among them; and the callbacks that cross the loop."""

from __future__ import annotations

import logging

import lightning as L

from lightning_unified import batch as fields
from lightning_unified.callbacks import NonFiniteGuard, RankFailureWatch, SampleLog
from lightning_unified.callbacks.stage_hooks import StagesAfterBatch
from lightning_unified.registry import ADVANTAGES
from lightning_unified.specs import Dense, OffPolicy, OnPolicy, Preference, Reference, Sparse
from lightning_unified.stages import (
    AdvantagesStage,
    BatchPipeline,
    ImportanceStage,
    PreferenceStage,
    ReferenceStage,
    RewardsStage,
    SampleStage,
    Stage,
    TeacherStage,
)


log = logging.getLogger(__name__)


def method_stages(data_source: OffPolicy | OnPolicy, signal: Sparse | Dense | Preference,
                  reference: Reference | None = None) -> list[Stage]:
    """The stages the method needs, in the order a step's data flows."""
    check_method(data_source, signal, reference)
    stages: list[Stage] = []
    if data_source.samples:
        stages.append(SampleStage(data_source))
    if reference is not None:
        stages.append(ReferenceStage(reference))
    elif isinstance(signal, Preference) and signal.needs_reference:
        # DPO's margin is measured against a reference; scoring only, no KL penalty
        stages.append(ReferenceStage(Reference(kl_coef=0.0, path=signal.reference_path,
                                               options=signal.reference_options)))
    if isinstance(signal, Dense):
        stages.append(TeacherStage(signal, copy_head=data_source.updates_per_batch > 1))
    elif isinstance(signal, Preference):
        stages.append(PreferenceStage(signal))
    elif data_source.samples or signal.reward_data:
        stages.append(RewardsStage(signal))
        stages.append(AdvantagesStage(signal, reference))
    if data_source.samples:
        stages.append(ImportanceStage(data_source.importance))
    return stages


def data_fields(data_source: OffPolicy | OnPolicy, signal: Sparse | Dense | Preference) -> set[str]:
    """The fields the data gives every batch: prompts, and the responses unless every batch
    is sampled (preference pairs marked, rewards where the data's are used)."""
    out = {fields.PROMPT_IDS, fields.PROMPT_MASK, fields.REFERENCES, fields.PROMPTS, fields.EXAMPLE_INDEX,
           fields.TEACHER_PROMPTS}
    if not data_source.samples or data_source.probability < 1:
        out |= {fields.RESPONSE_IDS, fields.RESPONSE_MASK, fields.LOSS_MASK}
        if isinstance(signal, Preference):
            out |= {fields.PREFERENCE, fields.GROUP_SIZE}
    return out


def build_batch_pipeline(data_source: OffPolicy | OnPolicy, signal: Sparse | Dense | Preference,
                         reference: Reference | None = None, stages: list[Stage] | None = None) -> BatchPipeline:
    """The method's stages with the user's ``stages`` placed among them, checked: every
    stage's reads come from the data or an earlier stage, and the loss finds its responses."""
    return BatchPipeline.assemble(method_stages(data_source, signal, reference), stages,
                                  data_fields(data_source, signal),
                                  loss_reads={fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS,
                                              fields.RESPONSE_MASK})


def loop_callbacks(samples_every_n_steps: int | None = None, *, non_finite: str | None = None,
                   max_non_finite_steps: int = 3) -> list[L.Callback]:
    """What crosses the loop: the stages' end-of-batch work (before a checkpoint is written),
    the sample log, the non-finite step guard (``non_finite``: skip, stop or None) and the
    watch that stops every rank when one fails."""
    callbacks: list[L.Callback] = [StagesAfterBatch()]
    if samples_every_n_steps:
        callbacks.append(SampleLog(every_n_steps=samples_every_n_steps))
    if non_finite is not None:
        callbacks.append(NonFiniteGuard(non_finite, max_non_finite_steps))
    callbacks.append(RankFailureWatch())
    return callbacks


def check_method(data_source: OffPolicy | OnPolicy, signal: Sparse | Dense | Preference,
                 reference: Reference | None = None) -> None:
    """Refuse a (data_source, signal, reference) combination that can only fail or train
    something else than asked, before any model is loaded."""
    if reference is not None and reference.estimator == "k1" and not (data_source.samples and isinstance(signal, Sparse)):
        raise ValueError("reference.estimator=k1 puts the KL penalty in the reward of sampled responses; it "
                         "needs data_source=on_policy with signal=sparse (use k3 elsewhere)")
    if isinstance(signal, Dense) and signal.cache is not None and data_source.samples:
        raise ValueError("signal.cache holds the teacher's scores of the dataset's responses; sampled responses "
                         "need a live teacher (drop signal.cache, or use data_source=off_policy)")
    if data_source.samples and data_source.environment.enabled:
        check_environment(data_source, signal, reference)
    elif data_source.samples and isinstance(signal, Sparse | Preference) and not signal.rewards:
        what = ("RL, which needs rewards: without them every sampled token would be pushed up" if isinstance(signal, Sparse)
                else "online DPO, which needs rewards to pick each prompt's chosen and rejected samples")
        raise ValueError(
            f"signal={type(signal).__name__.lower()} on sampled responses (data_source=on_policy) is {what}. Set "
            f"signal.rewards, e.g. signal.rewards='[{{_target_: lightning_unified.specs.Reward, fn: {{_target_: "
            f"lightning_unified.rewards.numeric_answer, _partial_: true}}}}]' (built-in rewards: "
            f"lightning_unified.rewards); the built-in addition task's rewards apply only with task=addition"
        )
    if isinstance(signal, Dense) and signal.is_self and signal.engine == "vllm" and not (
            data_source.samples and data_source.sampling.engine == "vllm"):
        raise ValueError("signal.teacher=self with teacher.engine=vllm is scored by the run's own vLLM rollout "
                         "engine: it needs data_source=on_policy (or mixed) with data_source.sampling.engine=vllm")
    if data_source.samples and data_source.sampling.num_generations < 2:
        if isinstance(signal, Sparse) and ADVANTAGES[signal.advantage].grouped:
            raise ValueError(
                f"signal.advantage={signal.advantage!r} compares each sample with the others of its prompt, but "
                f"data_source.sampling.num_generations=1: set it to 2 or more, or use signal.advantage=reinforce")
        if isinstance(signal, Preference):
            raise ValueError("online DPO picks a chosen and a rejected sample of each prompt: set "
                             "data_source.sampling.num_generations to 2 or more")
    check_replay(data_source, signal)
    check_lag(data_source, signal)


def check_environment(data_source: OnPolicy, signal, reference: Reference | None) -> None:
    """An environment gives each episode its reward and decides its turns: refuse what
    would score or compare episodes some other way."""
    name = getattr(data_source.environment.cls, "__qualname__", repr(data_source.environment.cls))
    if isinstance(signal, Preference):
        raise ValueError(f"data_source.environment ({name}) with signal=preference: online DPO's pairs of multi-turn "
                         f"episodes are not built; use signal=sparse (RL) or signal=dense (on-policy distillation)")
    if isinstance(signal, Sparse) and signal.rewards:
        raise ValueError(f"data_source.environment ({name}) gives each episode its reward (the sum of its steps' "
                         f"rewards); signal.rewards would score the episodes again. Set signal.rewards=[] and reward "
                         f"in the environment's step")
    if reference is not None and reference.estimator == "k1":
        raise ValueError("reference.estimator=k1 with data_source.environment: the k1 penalty in an episode's reward "
                         "is not built; use reference=k3 (a loss term on the policy's tokens)")


def check_lag(data_source: OffPolicy | OnPolicy, signal) -> None:
    """Rows sampled ``max_lag`` steps ago come from an older policy than the one trained:
    refused where nothing could correct for it; said out loud where the run asks for no
    correction (``importance.ratio=none``: the ablation that shows why it is needed)."""
    lag = data_source.sampling.max_lag if data_source.samples else 0
    if not lag:
        return
    if isinstance(signal, Sparse) and data_source.importance.ratio == "none":
        log.warning("data_source.sampling.max_lag=%d trains on responses sampled %d steps ago and "
                    "importance.ratio=none does not correct for it: the gradient is biased (an ablation; use "
                    "truncated, the default, token, ppo_clip, sequence_clip or decoupled_ppo_clip)", lag, lag)
    if isinstance(signal, Dense) and signal.teacher_gives in ("token_logp", "spans"):
        raise ValueError(
            f"data_source.sampling.max_lag={lag} with signal.divergence={signal.divergence!r}: that divergence reads "
            f"the teacher only at the sampled token, an estimate that needs tokens sampled from the policy being "
            f"trained, and nothing corrects it for a lag yet. Use a divergence over the teacher's distribution or "
            f"top-k (reverse_kl, forward_kl, jsd), or max_lag=0")


def check_replay(data_source: OffPolicy | OnPolicy, signal) -> None:
    """Replayed samples come from an older policy than the one being updated; a policy
    gradient that ignores that is biased, so it is refused rather than run."""
    if (data_source.updates_per_batch > 1 and isinstance(signal, Sparse)
            and data_source.importance.ratio == "none"):
        raise ValueError(
            f"data_source.updates_per_rollout={data_source.updates_per_rollout} with minibatches="
            f"{data_source.minibatches} replays samples after the policy has moved; importance.ratio=none ignores "
            f"that. Use token, truncated, ppo_clip or sequence_clip"
        )


def not_yet_held(callbacks: list[L.Callback], trainer: L.Trainer | None) -> list[L.Callback]:
    """The module's callbacks that ``trainer`` does not hold yet. Lightning asks a module
    for its callbacks at every ``validate`` and ``fit``; handing one over twice would
    replace it, and say so on the console at every call."""
    held = trainer.callbacks if trainer is not None else []
    return [c for c in callbacks if not any(c is h for h in held)]
