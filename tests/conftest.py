"""Shared fixtures: a small random problem in float64, so gradients compare to 1e-5."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass
class Problem:
    """A batch of B sequences of T tokens for a student and a teacher sharing a vocabulary."""

    hidden: torch.Tensor  # [B, T, H] student final hidden states (leaf, requires grad)
    head: torch.Tensor  # [V, H] student output projection (leaf, requires grad)
    teacher_hidden: torch.Tensor  # [B, T, H_t]
    teacher_head: torch.Tensor  # [V, H_t]
    targets: torch.Tensor  # [B, T] token ids; -100 on padding
    mask: torch.Tensor  # [B, T] float64 {0, 1}
    advantages: torch.Tensor  # [B, T] per-token advantage (sequence advantage broadcast)
    behaviour_logp: torch.Tensor  # [B, T] log mu(y_t): current policy plus noise
    reference_logp: torch.Tensor  # [B, T] log pi_ref(y_t)

    @property
    def vocab(self) -> int:
        return self.head.shape[0]

    def student_logits(self) -> torch.Tensor:
        return self.hidden @ self.head.T  # [B, T, V]

    def teacher_logits(self) -> torch.Tensor:
        return self.teacher_hidden @ self.teacher_head.T  # [B, T, V]

    def safe_targets(self) -> torch.Tensor:
        return self.targets.clamp_min(0)

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden, self.head


def make_problem(seed: int = 0, batch: int = 4, time: int = 6, width: int = 8, vocab: int = 13) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    hidden = torch.randn(batch, time, width, generator=gen, **f64).requires_grad_()
    head = torch.randn(vocab, width, generator=gen, **f64).requires_grad_()
    teacher_hidden = torch.randn(batch, time, width + 2, generator=gen, **f64)
    teacher_head = torch.randn(vocab, width + 2, generator=gen, **f64)
    targets = torch.randint(0, vocab, (batch, time), generator=gen)
    # responses of different lengths; the last positions of some rows are padding
    lengths = torch.tensor([time, time - 2, time - 1, 2][:batch] + [time] * max(0, batch - 4))
    mask = (torch.arange(time)[None, :] < lengths[:, None]).to(torch.float64)
    targets = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    advantages = torch.randn(batch, 1, generator=gen, **f64).expand(batch, time) * mask
    with torch.no_grad():
        current = torch.log_softmax(hidden @ head.T, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    behaviour_logp = current + 0.4 * torch.randn(batch, time, generator=gen, **f64)
    reference_logp = current + 0.3 * torch.randn(batch, time, generator=gen, **f64)
    return Problem(
        hidden, head, teacher_hidden, teacher_head, targets, mask, advantages, behaviour_logp, reference_logp
    )


@pytest.fixture
def problem() -> Problem:
    return make_problem()


def require_vllm() -> None:
    """Skip a module's tests where vLLM is not installed, except under CI (``CI`` set), whose
    set-up installs the extra (scripts/setup.sh): there a missing engine fails the run
    instead of hiding its tests."""
    import importlib
    import os

    if os.environ.get("CI"):
        importlib.import_module("vllm")
    else:
        pytest.importorskip("vllm", reason="the vllm extra: scripts/setup.sh installs it")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    """A tiny Llama and its ChatML tokenizer, saved as save_pretrained writes them."""
    from tests.lightning_helpers import save_chat_model

    return save_chat_model(tmp_path_factory.mktemp("chat_model"))


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory) -> str:
    """Another tiny chat model (other weights, the same tokenizer), as a teacher."""
    from tests.lightning_helpers import save_chat_model

    return save_chat_model(tmp_path_factory.mktemp("chat_teacher"), seed=7)
