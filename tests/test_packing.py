"""Padding-free training: packed forwards give the padded ones' hidden states, log-probs,
loss and gradients, and sequences packed into one row never see each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.models.loading import build_policy
from lightning_unified.models.forward import response_hidden
from lightning_unified.models.packing import Packing, block_causal_mask, first_fit_decreasing, pack, unpack
from tests.lightning_helpers import TINY, chat_tokenizer, save_chat_model
from tests.test_coming_from_trl import BUILT_IN_TASK, RL, RecordingSGD, run_one_batch

PACKED = Packing(enabled=True, max_tokens_per_row=24)


def ragged_batch(seed: int = 0, vocab: int = 40):
    """Four sequences of very different lengths: prompts of 2-9 tokens (left-padded),
    responses of 0-11 (right-padded), as the collator lays them out."""
    g = torch.Generator().manual_seed(seed)
    prompt_len, response_len = [9, 2, 5, 3], [1, 11, 0, 6]
    P, R = max(prompt_len), max(response_len)
    prompt_ids = torch.zeros(4, P, dtype=torch.long)
    prompt_mask = torch.zeros(4, P, dtype=torch.long)
    response_ids = torch.zeros(4, R, dtype=torch.long)
    response_mask = torch.zeros(4, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_len, response_len)):
        prompt_ids[i, P - p:] = torch.randint(1, vocab, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        response_ids[i, :r] = torch.randint(1, vocab, (r,), generator=g)
        response_mask[i, :r] = 1
    return prompt_ids, prompt_mask, response_ids, response_mask


def tiny_llama(seed: int = 0, **config):
    return build_policy(chat_tokenizer(), config={**TINY, **config}, seed=seed).eval()


def test_first_fit_decreasing_fills_rows_and_refuses_what_cannot_fit() -> None:
    assert first_fit_decreasing([5, 9, 3, 6, 1], capacity=10) == [[1, 4], [2, 3], [0]]  # 9+1, 6+3, 5
    with pytest.raises(ValueError, match="a sequence of 12 tokens does not fit module.max_tokens_per_row=10"):
        first_fit_decreasing([12, 3], capacity=10)


def test_packing_lays_real_tokens_end_to_end() -> None:
    batch = ragged_batch()
    packed = pack(*batch, max_tokens_per_row=16)
    assert packed.real_tokens == 10 + 13 + 5 + 9 and packed.padded_tokens == 4 * (9 + 11)
    assert packed.input_ids.shape[1] <= 16 and packed.input_ids.shape[0] == 3
    for row, segment, positions in zip(packed.input_ids, packed.segment, packed.position_ids):
        for s in segment.unique().tolist():
            if s >= 0:  # each sequence's positions restart at 0 and count up
                assert positions[segment == s].tolist() == list(range(int((segment == s).sum())))
    # a padding position attends to itself only; a sequence never to another
    mask = block_causal_mask(packed.segment, torch.float32)[:, 0] == 0
    same = packed.segment[:, :, None] == packed.segment[:, None, :]
    assert not (mask & ~same).any()
    with pytest.raises(ValueError, match="left-padded prompts and right-padded responses"):
        prompt_ids, prompt_mask, response_ids, response_mask = batch
        pack(prompt_ids, prompt_mask.flip(-1), response_ids, response_mask)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", [None, 24])
def test_packed_hidden_states_equal_the_padded_ones(implementation: str, budget) -> None:
    model = tiny_llama(attn_implementation=implementation)
    batch = ragged_batch()
    mask = batch[3].bool()
    with torch.no_grad():
        padded = response_hidden(model, *batch)
        packed = response_hidden(model, *batch, packing=Packing(True, budget))
    torch.testing.assert_close(packed[mask], padded[mask], rtol=1e-5, atol=1e-5)
    assert (packed[~mask] == 0).all()


def test_sequences_in_one_row_never_see_each_other() -> None:
    """Change every token of one sequence: every other sequence's hidden states stay the same."""
    model = tiny_llama()
    prompt_ids, prompt_mask, response_ids, response_mask = ragged_batch()
    assert pack(prompt_ids, prompt_mask, response_ids, response_mask, 24).input_ids.shape[0] < 4, "rows are shared"
    with torch.no_grad():
        before = response_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask, PACKED)
        changed_p, changed_r = prompt_ids.clone(), response_ids.clone()
        changed_p[1] = torch.where(prompt_mask[1].bool(), (changed_p[1] + 7) % 40, changed_p[1])
        changed_r[1] = torch.where(response_mask[1].bool(), (changed_r[1] + 7) % 40, changed_r[1])
        after = response_hidden(model, changed_p, prompt_mask, changed_r, response_mask, PACKED)
    others = [0, 2, 3]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)
    assert (after[1] - before[1]).abs().max() > 1e-3, "the changed sequence itself did change"


def test_a_batch_of_one_length_takes_the_padded_forward() -> None:
    """Nothing to remove: the packed rows would be the padded ones, so no mask is built."""
    ids = torch.randint(1, 40, (3, 5))
    ones = torch.ones_like(ids)
    assert pack(ids, ones, ids, ones, only_if_shorter=True) is None
    assert pack(*ragged_batch(), only_if_shorter=True) is not None


def test_unpack_keeps_gradients_to_every_packed_position() -> None:
    batch = ragged_batch()
    packed = pack(*batch, max_tokens_per_row=24)
    hidden = torch.randn(packed.input_ids.shape[0], packed.input_ids.shape[1], 3, requires_grad=True)
    unpack(hidden, packed).sum().backward()
    used = hidden.grad[..., 0] != 0
    assert int(used.sum()) == int(batch[3].sum()), "one packed position per response token"


def test_a_batch_is_packed_once_for_all_its_forwards(monkeypatch) -> None:
    """The teacher's, the reference's and the policy's forwards of one batch share its
    layout; other tensors, or the same tensor changed in place, are packed anew; the layout
    goes with the batch."""
    from lightning_unified.models import packing

    calls = []
    real_pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda *a, **k: calls.append(1) or real_pack(*a, **k))
    policy, teacher = tiny_llama(0), tiny_llama(1)
    batch = ragged_batch()
    first = response_hidden(teacher, *batch, PACKED)
    second = response_hidden(policy, *batch, PACKED)
    assert len(calls) == 1, "two forwards of one batch, one layout"
    real = batch[3].bool()
    torch.testing.assert_close(second[real], response_hidden(policy, *batch)[real], rtol=1e-5, atol=1e-5)
    assert not torch.equal(first, second), "two models, two sets of hidden states"
    response_hidden(policy, *ragged_batch(seed=1), PACKED)
    assert len(calls) == 2, "another batch's tensors: packed anew"
    response_hidden(policy, *batch, PACKED)
    assert len(calls) == 3, "only the batch now being trained on is remembered"
    batch[3][1, 5:] = 0  # a response shortened in place
    shortened = response_hidden(policy, *batch, PACKED)
    assert len(calls) == 4, "a tensor changed in place: packed anew"
    real = batch[3].bool()
    torch.testing.assert_close(shortened[real], response_hidden(policy, *batch)[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(shortened[1, 5:], torch.zeros_like(shortened[1, 5:])), "the cut tokens are padding now"
    del batch
    import gc

    gc.collect()
    assert "batch" not in packing._current, "the layout is dropped with its batch"


# --- whole steps: every weight-builder family, packed against padded ----------------------
@pytest.fixture(scope="module")
def ragged_files(tmp_path_factory) -> list[str]:
    """A chat model, a teacher, and data whose prompts and responses differ tenfold in length."""
    directory = tmp_path_factory.mktemp("ragged")
    model = save_chat_model(directory / "model")
    teacher = save_chat_model(directory / "teacher", seed=7)
    rows = []
    for i in range(32):
        question = "What is " + "1+" * (1 + (i * 7) % 20) + "1?"
        answer = str(2 + (i * 7) % 20)
        chosen = answer + " (" + "because " * (i % 7) + "so)"
        rows.append({"prompt": question, "response": chosen, "reference": answer, "chosen": chosen,
                     "rejected": answer + "?" * (1 + (i * 5) % 11)})
    for name in ("train", "val"):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"model.path={model}", f"teacher.path={teacher}", "task=files",
            f"task.train={directory / 'train.jsonl'}", f"task.val={directory / 'val.jsonl'}",
            "task.max_response_tokens=64", "task.batch_size=4", "task.shuffle=false"]


# several sequences to a row, so packed rows hold sequences of different lengths side by side
BUDGET = 64
ON_FILES = "ragged_files"
NO_PAIRS = ["task.columns.chosen=null", "task.columns.rejected=null"]
ON_BUILT_IN = "built_in"
FAMILIES = {  # the weight-builder family: (overrides, the task it runs on)
    "indicator (SFT)": (["experiment=sft", *NO_PAIRS], ON_FILES),
    "forward KL": (["experiment=distill", *NO_PAIRS], ON_FILES),
    "reverse KL": (["experiment=on_policy_distill", "task.columns.response=null", *NO_PAIRS,
                    "data_source.sampling.max_new_tokens=12", "data_source.sampling.num_generations=2"], ON_FILES),
    "JSD": (["experiment=gkd", "data_source.probability=1", "task.columns.response=null", *NO_PAIRS,
             "data_source.sampling.max_new_tokens=12", "data_source.sampling.num_generations=2"], ON_FILES),
    "advantage with PPO clip and k3": (["experiment=rl", "data_source.updates_per_rollout=2",
                                        "data_source.importance.ratio=ppo_clip", "reference=k3",
                                        "reference.kl_coef=0.1", *RL], ON_BUILT_IN),
    "GSPO": (["experiment=rl", "data_source.updates_per_rollout=2", "data_source.importance.ratio=sequence_clip",
              *RL], ON_BUILT_IN),
    "DPO": (["experiment=dpo", "task.columns.response=null"], ON_FILES),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_packed_step_gives_the_padded_steps_loss_and_gradient(family: str, tmp_path: Path, request) -> None:
    overrides, task = FAMILIES[family]
    task_overrides = request.getfixturevalue("ragged_files") if task == ON_FILES else BUILT_IN_TASK
    runs = {}
    for packing in ("false", "true"):
        captured = run_one_batch([*overrides, *task_overrides, f"module.packing={packing}",
                                  f"module.max_tokens_per_row={BUDGET}"], tmp_path / packing, equal_prompts=False)
        runs[packing] = (captured, list(RecordingSGD.losses))
    (padded, padded_losses), (packed, packed_losses) = runs["false"], runs["true"]
    b = padded.batch
    lengths = (b[F.PROMPT_MASK].sum(-1) + b[F.RESPONSE_MASK].sum(-1)).float()
    assert lengths.max() - lengths.min() >= 3, f"the batch's sequences must differ in length: {lengths.tolist()}"
    layout = pack(b[F.PROMPT_IDS], b[F.PROMPT_MASK], b[F.RESPONSE_IDS], b[F.RESPONSE_MASK], BUDGET,
                  only_if_shorter=True)
    assert layout is not None and layout.input_ids.shape[0] < len(lengths), "the packed path ran, rows shared"
    assert torch.equal(padded.batch[F.RESPONSE_IDS], packed.batch[F.RESPONSE_IDS]), "the same responses"
    mask = b[F.RESPONSE_MASK].bool()
    if F.REFERENCE_LOGP in b:  # the reference's packed log-probs are its padded ones
        torch.testing.assert_close(packed.batch[F.REFERENCE_LOGP][mask], b[F.REFERENCE_LOGP][mask], rtol=1e-5, atol=1e-5)
    if F.TEACHER in b:  # and so are the teacher's hidden states
        torch.testing.assert_close(packed.batch[F.TEACHER].hidden[mask], b[F.TEACHER].hidden[mask], rtol=1e-5,
                                   atol=1e-5)
    assert (F.REFERENCE_LOGP in b) == (family in ("advantage with PPO clip and k3", "DPO"))
    assert (F.TEACHER in b) == (family in ("forward KL", "reverse KL", "JSD"))
    torch.testing.assert_close(torch.tensor(packed_losses), torch.tensor(padded_losses), rtol=1e-5, atol=1e-6)
    for update, (got, want) in enumerate(zip(packed.grads, padded.grads, strict=True)):
        assert max(w.abs().max() for w in want) > 1e-5, "a step with no gradient compares nothing"
        for g, w in zip(got, want, strict=True):
            assert (g - w).abs().max() <= 1e-5 * w.abs().max() + 1e-7, (family, update, (g - w).abs().max())
