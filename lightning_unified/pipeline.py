"""The callbacks a (data_source, signal) pair needs, in the order a step's data flows:
sample, then score (teacher) or reward, then reweight."""

from __future__ import annotations

import lightning as L

from lightning_unified.callbacks import (
    ImportanceCallback,
    RewardCallback,
    SamplingCallback,
    TeacherCallback,
)
from lightning_unified.specs import Dense, OffPolicy, OnPolicy, Sparse


def build_pipeline(data_source: OffPolicy | OnPolicy, signal: Sparse | Dense) -> list[L.Callback]:
    stages: list[L.Callback] = []
    if data_source.samples:
        stages.append(SamplingCallback(data_source))
    if isinstance(signal, Dense):
        stages.append(TeacherCallback(signal))
    elif signal.rewards and (data_source.samples or signal.reward_data):
        stages.append(RewardCallback(signal))
    elif data_source.samples:
        raise ValueError(
            "a sparse signal on sampled responses is RL and needs signal.rewards (e.g. the task's "
            "exact_match); without them every sampled token would be pushed up"
        )
    if data_source.samples:
        stages.append(ImportanceCallback(data_source.importance))
    return stages
