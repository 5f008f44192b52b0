"""Who wrote the response tokens: ``data_source`` (off-policy data, or the policy's samples)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_unified.rules import enforce
from lightning_unified.specs.environment import Environment
from lightning_unified.specs.importance import Importance
from lightning_unified.specs.sampling import Sampling
from lightning_unified.typecheck import check_fields


@dataclass
class OffPolicy:
    """Responses come from the dataset (or a teacher that wrote it): no sampling, no ratio."""

    samples = False
    updates_per_batch = 1


@dataclass
class OnPolicy:
    """Responses are sampled from the policy being trained.

    ``probability`` < 1 mixes: each batch is sampled with that probability and otherwise
    keeps the dataset's responses (GKD's lambda), decided identically on every rank.
    """

    sampling: Sampling = field(default_factory=Sampling)
    importance: Importance = field(default_factory=Importance)
    probability: float = 1.0
    # draws the per-batch on/off-policy choice of a mixed source, with the epoch and the batch
    seed: int = 0
    # optimizer steps per sampled batch: the rollout is split into ``minibatches`` parts and
    # replayed ``updates_per_rollout`` times (PPO's epochs, GRPO's num_iterations, verl's
    # ppo_epochs), so later updates see a policy that has moved from the sampler's
    updates_per_rollout: int = 1
    minibatches: int = 1
    # multi-turn episodes against an environment (cls: None keeps single-turn sampling)
    environment: Environment = field(default_factory=Environment)

    samples = True

    def __post_init__(self) -> None:
        check_fields(self, "data_source")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"data_source.probability must be in [0, 1], got {self.probability}")
        if self.updates_per_rollout < 1:
            raise ValueError(f"data_source.updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
        if self.minibatches < 1:
            raise ValueError(f"data_source.minibatches must be >= 1, got {self.minibatches}")
        if isinstance(self.environment, dict):  # from Python without Hydra
            self.environment = Environment(**self.environment)
        enforce("on_policy", self)

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps each sampled batch makes."""
        return self.updates_per_rollout * self.minibatches
