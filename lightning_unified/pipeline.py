"""What a (data_source, signal) pair runs: its batch stages, in the order a step's data
flows (sample, then score (reference, teacher) or reward, then advantages and reweighting),
with any stage of the user's placed among them; and the callbacks that cross the loop."""

from __future__ import annotations

import lightning as L

from lightning_unified import batch as fields
from lightning_unified.callbacks import NonFiniteGuard, RankFailureWatch, SampleLog
from lightning_unified.callbacks.stage_hooks import CancelRolloutsOnFailure, StagesAfterBatch
from lightning_unified.specs import Dense, Method, OffPolicy, OnPolicy, Preference, Reference, RewardPairs, Sparse
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



def method_stages(data_source: OffPolicy | OnPolicy, signal: Sparse | Dense | Preference,
                  reference: Reference | None = None, temperature: float | None = None) -> list[Stage]:
    """The stages the method needs, in the order a step's data flows."""
    check_method(data_source, signal, reference, temperature)
    if isinstance(signal, RewardPairs):
        return []  # the data's pairs go straight to the reward model's objective (lightning_unified.objectives)
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
        if isinstance(signal, (Preference, RewardPairs)):
            out |= {fields.PREFERENCE, fields.GROUP_SIZE, fields.PAIR_MARGIN}
    return out


def build_batch_pipeline(data_source: OffPolicy | OnPolicy, signal: Sparse | Dense | Preference,
                         reference: Reference | None = None, stages: list[Stage] | None = None,
                         temperature: float | None = None) -> BatchPipeline:
    """The method's stages with the user's ``stages`` placed among them, checked: every
    stage's reads come from the data or an earlier stage, and the loss finds its responses.
    ``temperature``: the loss's (``module.temperature``; None: the sampler's)."""
    return BatchPipeline.assemble(method_stages(data_source, signal, reference, temperature), stages,
                                  data_fields(data_source, signal),
                                  loss_reads={fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS,
                                              fields.RESPONSE_MASK})


def loop_callbacks(samples_every_n_steps: int | None = None, *, non_finite: str | None = None,
                   max_non_finite_steps: int = 3) -> list[L.Callback]:
    """What crosses the loop: the stages' end-of-batch work (before a checkpoint is written),
    the rollouts a failed run drops, the sample log, the non-finite step guard (``non_finite``: skip, stop or None) and the
    watch that stops every rank when one fails."""
    # a failing rank tells the others first (RankFailureWatch), then drops its rollouts
    callbacks: list[L.Callback] = [StagesAfterBatch(), RankFailureWatch()]
    if samples_every_n_steps:
        callbacks.append(SampleLog(every_n_steps=samples_every_n_steps))
    if non_finite is not None:
        callbacks.append(NonFiniteGuard(non_finite, max_non_finite_steps))
    callbacks.append(CancelRolloutsOnFailure())
    return callbacks


def check_method(data_source: OffPolicy | OnPolicy, signal: Sparse | Dense | Preference,
                 reference: Reference | None = None, temperature: float | None = None) -> None:
    """Refuse a (data_source, signal, reference) combination that can only fail or train
    something else than asked, before any model is loaded: the ``method`` rules of
    :mod:`lightning_unified.rules`."""
    Method(data_source, signal, reference, temperature).check()


def not_yet_held(callbacks: list[L.Callback], trainer: L.Trainer | None) -> list[L.Callback]:
    """The module's callbacks that ``trainer`` does not hold yet. Lightning asks a module
    for its callbacks at every ``validate`` and ``fit``; handing one over twice would
    replace it, and say so on the console at every call."""
    held = trainer.callbacks if trainer is not None else []
    return [c for c in callbacks if not any(c is h for h in held)]
