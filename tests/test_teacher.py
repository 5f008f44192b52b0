"""The teacher's signal lines up with the tokens it scores: hidden states at the position
that predicts each response token, and a chunked top-k equal to the full distribution's."""

from __future__ import annotations

import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.stages.teacher import TeacherStage
from lightning_unified.models.loading import build_policy, load_causal_lm
from lightning_unified.models.forward import response_hidden
from lightning_unified.losses.objective import target_logprobs, topk_logprobs
from lightning_unified.specs import Dense, OffPolicy
from tests.lightning_helpers import (
    TINY,
    save_tiny_teacher,
    tiny_datamodule,
    tiny_module,
)


def full_response_logits(model, batch) -> torch.Tensor:
    """The HF model's own logits [B, R, V] for the response tokens, from one plain forward."""
    ids = torch.cat([batch[F.PROMPT_IDS], batch[F.RESPONSE_IDS]], 1)
    mask = torch.cat([batch[F.PROMPT_MASK], batch[F.RESPONSE_MASK]], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    prompt_len, response_len = batch[F.PROMPT_IDS].shape[1], batch[F.RESPONSE_IDS].shape[1]
    return logits[:, prompt_len - 1 : prompt_len + response_len - 1]


def test_response_hidden_predicts_each_response_token() -> None:
    data = tiny_datamodule(batch_size=8)
    model = build_policy(data.tokenizer, config=TINY).eval()
    batch = next(iter(data.train_dataloader()))
    batch[F.PROMPT_MASK][0, :2] = 0  # left padding in one row
    with torch.no_grad():
        hidden = response_hidden(model, batch[F.PROMPT_IDS], batch[F.PROMPT_MASK], batch[F.RESPONSE_IDS],
                                 batch[F.RESPONSE_MASK])
        torch.testing.assert_close(model.lm_head(hidden), full_response_logits(model, batch))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_topk_and_token_logprobs_match_the_full_distribution(temperature: float) -> None:
    torch.manual_seed(0)
    hidden, head, bias = torch.randn(3, 5, 16), torch.randn(40, 16), torch.randn(40)
    full = torch.log_softmax((hidden @ head.T + bias) / temperature, -1)
    ids, logp = topk_logprobs(hidden, head, 6, head_bias=bias, temperature=temperature, chunk_size=4)
    expected_logp, expected_ids = full.topk(6, dim=-1)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logp, expected_logp)
    targets = torch.randint(0, 40, (3, 5))
    torch.testing.assert_close(
        target_logprobs(hidden, head, targets, head_bias=bias, temperature=temperature, chunk_size=4),
        full.gather(-1, targets[..., None]).squeeze(-1),
    )
    with pytest.raises(ValueError, match="top-k needs"):
        topk_logprobs(hidden, head, 41)


@pytest.mark.parametrize("top_k,divergence", [(0, "forward_kl"), (4, "forward_kl"), (0, "sampled_reverse_kl")])
def test_teacher_callback_hands_the_loss_the_teachers_distribution(tmp_path, top_k: int, divergence: str) -> None:
    path = save_tiny_teacher(tmp_path / "teacher")
    signal = Dense(teacher=path, divergence=divergence, top_k=top_k, temperature=1.5)
    module = tiny_module(OffPolicy(), signal)
    callback = TeacherStage(signal)
    callback.setup(None, module, "fit")
    callback.on_fit_start(None, module)
    batch = next(iter(tiny_datamodule(batch_size=6).train_dataloader()))
    callback.run(None, module, batch, 0)
    with torch.no_grad():
        expected = torch.log_softmax(full_response_logits(load_causal_lm(path), batch) / 1.5, -1)  # [B, R, V]
    if top_k:
        torch.testing.assert_close(batch[F.TEACHER_TOPK_LOGP], expected.topk(top_k, -1).values)
    elif divergence == "sampled_reverse_kl":
        chosen = expected.gather(-1, batch[F.RESPONSE_IDS][..., None]).squeeze(-1)
        torch.testing.assert_close(batch[F.TEACHER_TOKEN_LOGP], chosen)
    else:
        teacher = batch[F.TEACHER].flattened(batch[F.RESPONSE_IDS].shape)
        torch.testing.assert_close(teacher.log_probs(0, expected.shape[0] * expected.shape[1]),
                                   expected.reshape(-1, expected.shape[-1]))
    assert not any(p.requires_grad for p in callback.models["teacher"].parameters()), "the teacher is frozen"
