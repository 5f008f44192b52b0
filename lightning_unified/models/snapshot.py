"""A lagging copy of the policy's trainable weights, swapped into the policy while it scores.

Self-distillation's teacher is the policy shown privileged context. When that teacher is
the policy as it is now (``live``), every update moves the target with the student, and
nothing anchors either to where they started. A snapshot keeps the teacher's weights apart:
the starting policy (``frozen``), an exponential moving average (``ema``), or a copy
refreshed every N optimizer steps with the teacher frozen in between (``refresh``, the
"isolation periods" that self on-policy distillation needs to stay stable, arXiv
2606.03532). Only the trainable weights are kept (with LoRA, the adapters), and the teacher
is scored by swapping them into the policy for one no-grad forward, so no second model
exists. The snapshot is part of the checkpoint, so a resumed run has the same teacher.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

SCHEDULES = ("live", "frozen", "ema", "refresh")


def _trainable(policy: nn.Module) -> list[nn.Parameter]:
    # not for a sharded (FSDP2) policy, whose parameters' storage FSDP manages: the teacher
    # callback refuses one
    return [p for p in policy.parameters() if p.requires_grad]


class WeightSnapshot:
    """The teacher's copy of the policy's trainable weights, updated by ``schedule``:
    ``frozen`` never, ``ema`` after every optimizer step (``decay`` of the old copy kept),
    ``refresh`` to the policy's weights every ``every`` optimizer steps."""

    def __init__(self, schedule: str, decay: float = 0.99, every: int = 50):
        if schedule not in SCHEDULES[1:]:
            raise ValueError(f"a weight snapshot's schedule is one of {SCHEDULES[1:]}, got {schedule!r}")
        self.schedule, self.decay, self.every = schedule, decay, every
        self.weights: list[Tensor] | None = None
        self.steps = 0  # optimizer steps the snapshot has followed

    def take(self, policy: nn.Module) -> None:
        """The policy's weights now, once; a snapshot restored from a checkpoint is kept, and
        moved to where the policy's weights are."""
        params = _trainable(policy)
        if self.weights is None:
            self.weights = [p.detach().clone() for p in params]
        else:
            if len(self.weights) != len(params):
                raise ValueError(f"the checkpoint's self-teacher holds {len(self.weights)} weights; this policy trains "
                                 f"{len(params)}")
            self.weights = [w.to(p.device, p.dtype) for w, p in zip(self.weights, params)]

    @torch.no_grad()
    def follow(self, policy: nn.Module, steps: int) -> None:
        """The policy has made ``steps`` optimizer steps in all: update the copy for each new one."""
        new, self.steps = steps - self.steps, steps
        if new <= 0 or self.schedule == "frozen":
            return
        current = [p.detach() for p in _trainable(policy)]
        if self.schedule == "ema":
            # ``new`` steps at once (several updates per batch): the old copy's share is decay^new
            torch._foreach_lerp_(self.weights, current, 1.0 - self.decay ** new)
        elif steps // self.every > (steps - new) // self.every:  # a multiple of ``every`` was passed
            torch._foreach_copy_(self.weights, current)

    @contextlib.contextmanager
    def swapped_in(self, policy: nn.Module) -> Iterator[None]:
        """The policy's parameters hold the snapshot's tensors for the duration, then their
        own again: the storage is exchanged, nothing is copied."""
        params = _trainable(policy)
        own = [p.data for p in params]
        for p, weights in zip(params, self.weights):
            p.data = weights
        try:
            yield
        finally:
            for p, weights in zip(params, own):
                p.data = weights

    def state_dict(self) -> dict:
        return {"schedule": self.schedule, "steps": self.steps,
                "weights": None if self.weights is None else [w.cpu() for w in self.weights]}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's snapshot (on the CPU until :meth:`take` moves it)."""
        if state.get("schedule") != self.schedule:
            raise ValueError(f"the checkpoint's self-teacher follows the schedule {state.get('schedule')!r}, this run "
                             f"signal.self_teacher={self.schedule!r}")
        self.steps = state["steps"]
        self.weights = state["weights"]
