"""Preference pairs: DPO, IPO and SimPO as sequence-level weights on grad log pi, checked
against autograd of each loss; pairs from data files, from the built-in task and from
rewards on sampled responses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as tF

from lightning_unified import batch as F
from lightning_unified.data.files import DataError
from lightning_unified.losses import weight_builders
from lightning_unified.losses.preference import pairs_from_rewards, preference_terms
from lightning_unified.models.loss_head import response_logprobs
from lightning_unified.specs import OffPolicy, OnPolicy, Preference, Reward, Sampling
from lightning_unified.tasks.addition import AdditionDataModule, corrupted_answer, digit_match
from lightning_unified.tasks.files import FilesDataModule
from tests.lightning_helpers import quiet_trainer, save_chat_model, tiny_module


def closed_form_loss(logp, mask, ref, chosen, rejected, loss, beta, gamma):
    """Each loss written out as its paper states it, summed over the pairs."""
    def score(rows, with_ref, average):
        diff = logp[rows] - (ref[rows] if with_ref else 0)
        total = (diff * mask[rows]).sum(-1)
        return total / mask[rows].sum(-1) if average else total
    if loss == "dpo":
        margin = score(chosen, True, False) - score(rejected, True, False)
        return -tF.logsigmoid(beta * margin).sum()
    if loss == "ipo":
        margin = score(chosen, True, True) - score(rejected, True, True)
        return ((margin - 1 / (2 * beta)) ** 2).sum()
    margin = score(chosen, False, True) - score(rejected, False, True)
    return -tF.logsigmoid(beta * margin - gamma).sum()


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_weights_reproduce_the_gradient_of_each_loss(loss: str) -> None:
    """Rows in groups of 3: (chosen, rejected, unused), (rejected, unused, chosen), and a
    group without a pair, whose rows must get no gradient."""
    gen = torch.Generator().manual_seed(0)
    rows, length, vocab = 9, 5, 11
    logits = torch.randn(rows, length, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.float64)
    mask[1, 3:] = 0
    mask[5, 2:] = 0
    ref = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    preference = torch.tensor([1.0, -1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    beta, gamma = 0.3, 0.4

    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]  # [B, R]
    expected = closed_form_loss(logp, mask, ref, torch.tensor([0, 5]), torch.tensor([1, 3]), loss, beta, gamma)
    (grad_expected,) = torch.autograd.grad(expected, logits)

    terms = preference_terms(logp.detach(), mask, preference, 3, ref, loss=loss, beta=beta, gamma=gamma)
    student_logp = torch.log_softmax(logits, -1)
    built = weight_builders.preference(student_logp.detach().reshape(-1, vocab), targets.reshape(-1),
                               terms.weight.reshape(-1), terms.loss.reshape(-1))
    surrogate = -(built.coef * student_logp.reshape(-1, vocab).gather(-1, targets.reshape(-1, 1))[:, 0]).sum()
    (grad_weighted,) = torch.autograd.grad(surrogate, logits)

    torch.testing.assert_close(grad_weighted, grad_expected, atol=1e-10, rtol=1e-8)
    assert float(built.objective.sum()) == pytest.approx(float(expected), rel=1e-9), "the objective sums to the loss"
    assert (terms.weight[6:] == 0).all() and (terms.weight[[2, 4]] == 0).all(), "unpaired rows get no weight"
    assert terms.margin.shape == (2,)


def test_simpo_needs_no_reference_and_dpo_does() -> None:
    logp, mask = -torch.rand(2, 3), torch.ones(2, 3)
    preference_terms(logp, mask, torch.tensor([1.0, -1.0]), 2, None, loss="simpo", beta=1.0)
    with pytest.raises(ValueError, match="dpo loss needs the reference"):
        preference_terms(logp, mask, torch.tensor([1.0, -1.0]), 2, None, loss="dpo", beta=1.0)


def test_pairs_from_rewards_pick_best_and_worst_and_skip_ties() -> None:
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.5])
    assert pairs_from_rewards(rewards, 4).tolist() == [0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="num_generations >= 2"):
        pairs_from_rewards(rewards, 1)


def test_corrupted_answer_changes_exactly_one_digit() -> None:
    import random

    rng = random.Random(0)
    for answer in ("052", "199", "000", "1"):
        wrong = corrupted_answer(answer, rng)
        assert len(wrong) == len(answer) and sum(a != b for a, b in zip(answer, wrong)) == 1


def test_built_in_pairs_are_right_then_corrupted() -> None:
    datamodule = AdditionDataModule(num_train=16, num_val=4, batch_size=4, pairs=True)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch[F.GROUP_SIZE] == 2 and batch[F.PREFERENCE].tolist() == [1.0, -1.0] * 4
    texts = datamodule.tokenizer.batch_decode(batch[F.RESPONSE_IDS], skip_special_tokens=True)
    for i in range(0, 8, 2):
        assert texts[i] == batch[F.REFERENCES][i], "the chosen answer is the right one"
        assert texts[i + 1] != texts[i]
        assert torch.equal(batch[F.PROMPT_IDS][i], batch[F.PROMPT_IDS][i + 1]), "a pair shares its prompt"


def test_file_pairs_become_two_rows_per_example(tmp_path) -> None:
    model = save_chat_model(tmp_path / "model")
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}], "chosen": str(i + 1), "rejected": str(i + 2)}
            for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datamodule = FilesDataModule(train=str(tmp_path / "pairs.jsonl"), tokenizer=model, batch_size=3, shuffle=False)
    batch = next(iter(datamodule.train_dataloader()))
    texts = datamodule.tokenizer.batch_decode(batch[F.RESPONSE_IDS], skip_special_tokens=True)
    assert texts == ["1", "2", "2", "3", "3", "4"]
    assert batch[F.PREFERENCE].tolist() == [1.0, -1.0] * 3 and batch[F.GROUP_SIZE] == 2
    assert batch[F.PROMPTS][0] == rows[0]["prompt"] and batch[F.PROMPTS][1] == rows[0]["prompt"]


def test_a_chosen_column_without_a_rejected_one_is_named(tmp_path) -> None:
    model = save_chat_model(tmp_path / "model")
    (tmp_path / "half.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(DataError, match=r"half.jsonl: column 'chosen' \(chosen\) needs a rejected column"):
        FilesDataModule(train=str(tmp_path / "half.jsonl"), tokenizer=model)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_offline_training_widens_the_margin(loss: str) -> None:
    """A few steps on the built-in task's pairs move each pair's margin the loss's way."""
    module = tiny_module(OffPolicy(), Preference(loss=loss, beta=0.5))
    datamodule = AdditionDataModule(num_train=16, num_val=4, batch_size=8, pairs=True)
    batch = next(iter(datamodule.train_dataloader()))

    def margin() -> float:
        logp = response_logprobs(module.policy, batch[F.PROMPT_IDS], batch[F.PROMPT_MASK], batch[F.RESPONSE_IDS],
                                 batch[F.RESPONSE_MASK])
        scores = (logp * batch[F.RESPONSE_MASK]).sum(-1)
        return float((scores[0::2] - scores[1::2]).mean())

    before = margin()
    trainer = quiet_trainer(max_steps=6, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert margin() > before + 0.5
    assert float(trainer.callback_metrics["preference/usable_pairs"]) == 8
    assert ("reference" in module.pipeline.names) == (loss != "simpo"), "SimPO has no reference"


def test_online_dpo_pairs_sampled_responses_by_reward() -> None:
    spec = OnPolicy(sampling=Sampling(num_generations=4))
    module = tiny_module(spec, Preference(rewards=[Reward(digit_match)]))

    class Spy(__import__("lightning").Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batch = dict(batch)

    spy = Spy()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[spy])
    trainer.fit(module, datamodule=AdditionDataModule(num_train=16, num_val=4, batch_size=4))
    groups = spy.batch[F.PREFERENCE].reshape(-1, 4)
    rewards = spy.batch[F.REWARDS].reshape(-1, 4)
    for marks, scores in zip(groups, rewards):
        if (marks != 0).any():
            assert scores[marks == 1].item() == scores.max() and scores[marks == -1].item() == scores.min()
        else:
            assert scores.max() == scores.min(), "only tied groups go without a pair"
    assert float(trainer.callback_metrics["preference/usable_pairs"]) == int((groups != 0).any(-1).sum())


def test_preference_without_pairs_or_samples_says_what_to_do() -> None:
    module = tiny_module(OffPolicy(), Preference())
    with pytest.raises(ValueError, match="task.pairs=true"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(
            module, datamodule=AdditionDataModule(num_train=16, num_val=4, batch_size=4))
