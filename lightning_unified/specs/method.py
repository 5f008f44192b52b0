"""A method: a data source with a signal (and a reference's KL penalty), as the rules that
relate them read it."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_unified.rules import enforce
from lightning_unified.specs.data_source import OffPolicy, OnPolicy
from lightning_unified.specs.reference import Reference
from lightning_unified.specs.signal import Dense, Preference, Sparse


def loss_temperature(data_source: OffPolicy | OnPolicy, temperature: float | None) -> float:
    """The temperature dividing the policy's logits in the loss: ``temperature`` when set,
    else the sampler's. The policy in the loss is the one the sampler drew from unless set
    apart on purpose: a loss at temperature 1 against samples at 0.7 starts every ratio away
    from 1."""
    if temperature is None:
        temperature = data_source.sampling.temperature if data_source.samples else 1.0
    if temperature <= 0:
        raise ValueError(f"module.temperature must be > 0, got {temperature}")
    return temperature


@dataclass
class Method:
    """``data_source`` x ``signal`` (with ``reference``), and the temperature of the loss's
    log-probs (``module.temperature``, else the sampler's)."""

    data_source: OffPolicy | OnPolicy
    signal: Sparse | Dense | Preference
    reference: Reference | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        self.temperature = loss_temperature(self.data_source, self.temperature)

    def check(self) -> None:
        """Every rule that relates the data source, the signal and the reference
        (:mod:`lightning_unified.rules.method`)."""
        enforce("method", self)
