"""The names a config may give, each to one function: divergences, advantage estimators,
importance ratios and the weightings of data tokens. A new one is a function and one
registration, from anywhere (your own module, imported before the run is built)::

    from lightning_unified.registry import register_divergence

    @register_divergence("tv_squared", needs="distribution")
    def tv_squared(student_logp, targets, teacher_logp):   # [c, V], [c], [c, V] -> TokenWeights
        ...

Import the module that registers it before the run is built: in your own entry point, or
from a run's config through any ``_target_`` in that module (a reward, a stage).

Each registry says what the rest of the run needs to know of its entries: a divergence, what
it needs from the teacher (``distribution``: the whole of it; ``token_logp``: the sampled
token's log-prob), and whether it can run from the teacher's top-k; an advantage estimator,
whether it compares a prompt's samples with each other. The teacher stage then asks the
teacher for exactly that, and the weighting builds the weights from the registered
function, never from a list of names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_unified.losses import advantages as estimators
from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import all_reduce_sum

# what a divergence needs from the teacher
TEACHER_NEEDS = ("distribution", "token_logp")


@dataclass(frozen=True)
class Divergence:
    """``builder(student_logp [c, V], targets [c], <teacher field>, **settings) ->
    TokenWeights``; ``settings``: the ``signal`` fields it takes as keyword arguments
    (``beta``); ``from_top_k``: the builder that runs from the teacher's top-k instead
    (``signal.top_k``, a served teacher, an offline cache), None when it cannot.
    ``across``: the builder that runs with a teacher of another tokenizer
    (``signal.teacher_tokenizer=auto``), from the span fields, None when it cannot;
    ``only_across``: it has no same-tokenizer form (ULD); ``batch_settings``: batch-wide
    fields it takes as keyword arguments (the shared vocabulary)."""

    name: str
    builder: Callable
    needs: str
    settings: tuple[str, ...] = ()
    from_top_k: Callable | None = None
    across: Callable | None = None
    only_across: bool = False
    batch_settings: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdvantageEstimator:
    """``fn(rewards [B], *, group_size, eps) -> [B]`` advantages over the global batch
    (every rank's rows); ``grouped``: it compares a prompt's samples, so it needs 2 or more.
    ``takes_valid``: ``fn`` also takes ``valid`` ([B] bool, the rows that did not fail) and
    leaves the others out of every statistic (their advantage 0); one that does not is
    given only whole groups without a failed row
    (:func:`~lightning_unified.stages.advantages.estimate_advantages`)."""

    name: str
    fn: Callable
    grouped: bool = True
    takes_valid: bool = False


@dataclass(frozen=True)
class Ratio:
    """``weights(importance) -> (weight builder, its settings)`` for sampled tokens
    (``importance`` is the run's :class:`~lightning_unified.specs.Importance`); ``sequence``:
    it acts on each sequence's ratio, which the importance stage computes before every update;
    ``proximal``: it reads the trainer's own log-probs at the batch's start beside the
    sampler's (``proximal_logp``, one no-grad forward per batch)."""

    name: str
    weights: Callable
    sequence: bool = False
    proximal: bool = False


@dataclass(frozen=True)
class Weighting:
    """``builder(student_logp [c, V], targets [c]) -> TokenWeights`` for data tokens."""

    name: str
    builder: Callable


@dataclass
class Registry:
    """Entries by name; ``what`` names the config key in errors."""

    what: str
    entries: dict = field(default_factory=dict)

    def add(self, entry) -> None:
        if not isinstance(entry.name, str) or not entry.name:
            raise ValueError(f"a {self.what} needs a name, got {entry.name!r}")
        self.entries[entry.name] = entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test's own entry, say)."""
        self.entries.pop(name, None)

    def __getitem__(self, name: str):
        if name not in self.entries:
            raise ValueError(f"{self.what} must be one of {self.names}, got {name!r}")
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)


DIVERGENCES = Registry("signal.divergence")
ADVANTAGES = Registry("signal.advantage")
RATIOS = Registry("importance.ratio")
WEIGHTINGS = Registry("signal.weighting")


def register_divergence(name: str, *, needs: str, settings: tuple[str, ...] = (), from_top_k: Callable | None = None,
                        across: Callable | None = None, only_across: bool = False,
                        batch_settings: tuple[str, ...] = ()):
    """Register the decorated weight builder as ``signal.divergence=name``."""
    if needs not in TEACHER_NEEDS:
        raise ValueError(f"divergence {name!r} needs one of {TEACHER_NEEDS} from the teacher, got {needs!r}")

    def add(builder: Callable) -> Callable:
        DIVERGENCES.add(Divergence(name, builder, needs, tuple(settings), from_top_k,
                                   builder if only_across else across, only_across, tuple(batch_settings)))
        return builder

    return add


def register_advantage(name: str, *, grouped: bool = True):
    """Register the decorated ``fn(rewards, *, group_size, eps)`` as ``signal.advantage=name``
    (with a ``valid`` argument too, when it can leave failed rows out of its statistics)."""

    def add(fn: Callable) -> Callable:
        ADVANTAGES.add(AdvantageEstimator(name, fn, grouped, _takes(fn, "valid")))
        return fn

    return add


def register_ratio(name: str, *, sequence: bool = False, proximal: bool = False):
    """Register the decorated ``weights(importance) -> builder`` as ``importance.ratio=name``."""

    def add(fn: Callable) -> Callable:
        RATIOS.add(Ratio(name, fn, sequence, proximal))
        return fn

    return add


def register_weighting(name: str):
    """Register the decorated builder ``(student_logp, targets) -> TokenWeights`` of data
    tokens as ``signal.weighting=name``."""

    def add(builder: Callable) -> Callable:
        WEIGHTINGS.add(Weighting(name, builder))
        return builder

    return add


# --- the built-in ones ------------------------------------------------------------------------

register_divergence("forward_kl", needs="distribution", from_top_k=weight_builders.forward_kl_topk)(weight_builders.forward_kl)
register_divergence("reverse_kl", needs="distribution")(weight_builders.reverse_kl)
register_divergence("jsd", needs="distribution", settings=("beta",))(weight_builders.jsd)
register_divergence("sampled_reverse_kl", needs="token_logp",
                    across=weight_builders.span_sampled_reverse_kl)(weight_builders.sampled_reverse_kl)
# across tokenizers only: distributions over two vocabularies (losses/uld.py)
register_divergence("uld", needs="distribution", only_across=True)(weight_builders.uld)
register_divergence("uld_hybrid", needs="distribution", only_across=True, settings=("beta",),
                    batch_settings=("vocabulary_match",))(weight_builders.uld_hybrid)

register_weighting("indicator")(weight_builders.indicator)
register_weighting("dft")(weight_builders.dft)


def _takes(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no inspectable signature: it takes what it was registered with
        return False


def _global_valid(rewards: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(the rewards with failed rows at 0 as float64, the valid rows as float64), for sums over ranks."""
    ok = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    return rewards.double().masked_fill(~ok, 0.0), ok.double()


@register_advantage("reinforce", grouped=False)
def _reinforce(rewards: Tensor, *, group_size: int, eps: float, valid: Tensor | None = None) -> Tensor:
    # the mean over the whole global batch's valid rows, not this rank's share of it
    r, ok = _global_valid(rewards, valid)
    total = all_reduce_sum(torch.stack([r.sum(), ok.sum()]))
    return estimators.reinforce_advantages(rewards, baseline=(total[0] / total[1].clamp_min(1.0)).to(rewards.dtype),
                                           valid=valid)


@register_advantage("rloo")
def _rloo(rewards: Tensor, *, group_size: int, eps: float, valid: Tensor | None = None) -> Tensor:
    return estimators.rloo_advantages(rewards, group_size=group_size, valid=valid)


@register_advantage("grpo")
def _grpo(rewards: Tensor, *, group_size: int, eps: float, valid: Tensor | None = None) -> Tensor:
    return estimators.grpo_advantages(rewards, group_size=group_size, eps=eps, valid=valid)


@register_advantage("grpo_batch_std")
def _grpo_batch_std(rewards: Tensor, *, group_size: int, eps: float, valid: Tensor | None = None) -> Tensor:
    # the standard deviation of the whole global batch's valid rewards, not this rank's share
    r, ok = _global_valid(rewards, valid)
    n, total, squares = all_reduce_sum(torch.stack([ok.sum(), r.sum(), r.square().sum()]))
    std = ((squares - total * total / n.clamp_min(1.0)).clamp_min(0.0) / (n - 1).clamp_min(1.0)).sqrt()
    return estimators.grpo_batch_std_advantages(rewards, group_size=group_size, batch_std=std.to(rewards.dtype),
                                                eps=eps, valid=valid)


@register_advantage("dr_grpo")
def _dr_grpo(rewards: Tensor, *, group_size: int, eps: float, valid: Tensor | None = None) -> Tensor:
    return estimators.dr_grpo_advantages(rewards, group_size=group_size, valid=valid)


def _band(importance) -> dict:
    return {"mask_low": importance.mask_low, "mask_high": importance.mask_high} if importance.masks else {}


@register_ratio("none")
def _no_ratio(importance):
    return weight_builders.advantage_indicator, {}


@register_ratio("token")
def _token_ratio(importance):
    return weight_builders.importance_weighted_advantage, _band(importance)


@register_ratio("truncated")
def _truncated_ratio(importance):
    return weight_builders.importance_weighted_advantage, {"truncate": importance.truncate, **_band(importance)}


@register_ratio("ppo_clip")
def _ppo_clip(importance):
    return weight_builders.ppo_clip, {"eps_low": importance.eps_low, "eps_high": importance.eps_high, **_band(importance)}


@register_ratio("sequence_clip", sequence=True)
def _sequence_clip(importance):
    # GSPO: PPO's clip on the sequence's ratio (the importance stage's log_ratio field)
    return _ppo_clip(importance)


@register_ratio("decoupled_ppo_clip", proximal=True)
def _decoupled_ppo_clip(importance):
    # AReaL's decoupled PPO: the clip against the trainer's policy at the batch's start, the
    # sampler's staleness and mismatch in a truncated (TIS), optionally masked (MIS) weight
    return weight_builders.decoupled_ppo_clip, {"eps_low": importance.eps_low, "eps_high": importance.eps_high,
                                        "truncate": importance.truncate, **_band(importance)}
