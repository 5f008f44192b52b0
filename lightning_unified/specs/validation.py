"""Validation beyond greedy: ``validation`` (k sampled answers per held-out prompt)."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_unified.typecheck import check_fields


@dataclass
class Validation:
    """k answers (or episodes) sampled per held-out prompt, beside the greedy ones:
    ``val/pass@k`` (the share of prompts with at least one correct answer among k, Chen et
    al.'s unbiased estimator) and ``val/mean@n`` (each prompt's share of correct answers,
    averaged over prompts). None in ``num_samples``: greedy validation alone."""

    # n answers sampled per prompt; None: greedy only
    num_samples: int | None = None
    # the k of each val/pass@k, each <= num_samples; None: num_samples alone
    pass_at: list[int] | None = None
    # the sampling distribution; None takes the run's sampler's (data_source.sampling), else
    # temperature 1.0, top_p 1.0 (off) and top_k 0 (off)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    # the validation score that says an answer is right (a validation reward, or an episode's
    # reward, turns or info number), and the value from which it is: score >= threshold
    correct: str = "exact_match"
    threshold: float = 1.0
    # the draws depend on it, the batch and the rank: the same at every validation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pass_at is not None:  # a Hydra ListConfig, or a tuple from Python
            self.pass_at = list(self.pass_at)
        for name in ("temperature", "top_p", "threshold"):  # `temperature=1` on the command line is an int
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
        check_fields(self, "validation")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"validation.num_samples must be >= 1 or null, got {self.num_samples}")
        if self.pass_at is not None:
            if self.num_samples is None:
                raise ValueError("validation.pass_at needs validation.num_samples (the answers sampled per prompt)")
            bad = [k for k in self.pass_at if not isinstance(k, int) or isinstance(k, bool) or not
                   1 <= k <= self.num_samples]
            if bad or not self.pass_at:
                raise ValueError(f"validation.pass_at must be a non-empty list of whole numbers from 1 to "
                                 f"validation.num_samples={self.num_samples}, got {self.pass_at}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"validation.temperature must be > 0 or null (greedy validation is always logged), "
                             f"got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"validation.top_p must be in (0, 1] or null, got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"validation.top_k must be >= 0 or null, got {self.top_k}")
        if not self.correct:
            raise ValueError("validation.correct must name a validation score, e.g. exact_match")

    @property
    def enabled(self) -> bool:
        return self.num_samples is not None

    @property
    def ks(self) -> list[int]:
        """The k of each ``val/pass@k``, in order, once each."""
        return sorted(set(self.pass_at or [self.num_samples]))
