"""How the policy is corrected for sampling from another distribution: ``data_source.importance``."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_unified.registry import RATIOS
from lightning_unified.rules import enforce
from lightning_unified.specs.checks import one_of
from lightning_unified.typecheck import check_fields


@dataclass
class Importance:
    """How the policy is corrected for sampling from mu instead of pi_theta.

    ``none``: the on-policy gradient A * grad log pi (exact when one update follows each
    sampling at temperature 1); ``token``: rho_t = pi_theta(y_t) / mu(y_t); ``truncated``:
    min(rho_t, truncate); ``ppo_clip``: PPO's clipped surrogate with eps_low/eps_high
    (DAPO's clip-higher when eps_high > eps_low); ``sequence_clip``: the same clip on GSPO's
    sequence-level ratio. ``mask_low`` / ``mask_high`` (None: off) drop the tokens whose ratio
    lies outside that band (masked importance sampling, IcePop): the guard against a
    sampler, such as an inference engine, that disagrees with the trainer. ``level``: the
    ratio these act on, each token's own (``token``) or its sequence's geometric mean
    (``sequence``, as GSPO's): sequence-level truncation (TIS) and masking (MIS) keep or cut
    a whole response at once.
    """

    ratio: str = "truncated"
    truncate: float = 2.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    mask_low: float | None = None
    mask_high: float | None = None
    level: str = "token"

    @property
    def masks(self) -> bool:
        return self.mask_low is not None or self.mask_high is not None

    @property
    def sequence_level(self) -> bool:
        """The ratio of each sequence (GSPO's geometric mean), not of each token."""
        return RATIOS[self.ratio].sequence or (self.level == "sequence" and self.ratio != "none")

    def __post_init__(self) -> None:
        check_fields(self, "data_source.importance")
        RATIOS[self.ratio]  # a registered name (lightning_unified.registry)
        one_of("importance", "level", self.level, ("token", "sequence"))
        if (self.mask_low is not None and self.mask_low < 0) or (self.mask_high is not None and self.mask_high <= 0):
            raise ValueError(f"importance needs mask_low >= 0 and mask_high > 0, got {self.mask_low}, {self.mask_high}")
        if self.truncate <= 0:
            raise ValueError(f"importance.truncate must be > 0, got {self.truncate}")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"importance needs 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        enforce("importance", self)
