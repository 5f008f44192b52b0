"""Validation with samples: the pass@k estimator against a count of every k-subset of fixed
samples, the built-in RL task's ``val/pass@4`` and ``val/mean@4`` beside unchanged greedy
figures, an environment's episodes, and settings that cannot work named."""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import pytest
import torch

from lightning_unified.config import build_run
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import OffPolicy, Sparse, Validation
from lightning_unified.tasks.addition import checkpoint_path
from lightning_unified.tasks.multiply import MultiplyDataModule
from lightning_unified.validation_samples import pass_at_k, sampled_figures
from tests.lightning_helpers import compose_config, quiet_trainer
from tests.test_runs import read_metrics

# each row: one prompt's samples, 1 right, 0 wrong, None not scored (its episode failed)
SAMPLES = [
    [1, 0, 0, 0],
    [0, 0, 0, 0],
    [1, 1, 0, 1],
    [1, 1, 1, 1],
    [0, 1, None, 0],
    [None, None, None, 1],
]


def counted_pass_at_k(row: list, k: int) -> float:
    """The definition, counted by hand: the share of the k-subsets of the scored samples that
    hold a right one (NaN when fewer than k were scored)."""
    scored = [s for s in row if s is not None]
    if len(scored) < k:
        return float("nan")
    subsets = list(itertools.combinations(scored, k))
    return sum(any(s) for s in subsets) / len(subsets)


def as_tensors(rows: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
    correct = torch.tensor([[s == 1 for s in row] for row in rows])
    scored = torch.tensor([[s is not None for s in row] for row in rows])
    return correct, scored


def test_pass_at_k_is_the_share_of_k_subsets_with_a_right_sample() -> None:
    correct, scored = as_tensors(SAMPLES)
    for k in (1, 2, 3, 4):
        expected = torch.tensor([counted_pass_at_k(row, k) for row in SAMPLES], dtype=torch.float64)
        torch.testing.assert_close(pass_at_k(correct, scored, k), expected, equal_nan=True, msg=f"k={k}")
    # n = k: whether any sample is right; k = 1: each prompt's share of right samples
    assert pass_at_k(correct, scored, 4).tolist()[:4] == [1.0, 0.0, 1.0, 1.0]
    assert pass_at_k(correct, scored, 1).tolist()[:4] == [0.25, 0.0, 0.75, 1.0]
    # large n: the product form of C(n - c, k) / C(n, k), where factorials would overflow a float
    many = torch.zeros(1, 400, dtype=torch.bool)
    many[0, :3] = True
    expected = 1 - math.comb(397, 200) / math.comb(400, 200)
    assert pass_at_k(many, torch.ones_like(many), 200).item() == pytest.approx(expected, rel=1e-12)


def test_sampled_figures_per_prompt_from_a_score_and_its_threshold() -> None:
    # 3 prompts x 2 samples of a partial-credit score: right means >= 0.5; NaN is not scored
    score = torch.tensor([0.5, 0.2, 0.0, 0.1, float("nan"), 1.0])
    turns = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0])
    figures = sampled_figures({"partial": score, "turns": turns}, 2, "partial", 0.5, [1, 2])
    assert figures["pass@2"].tolist()[:2] == [1.0, 0.0] and figures["pass@2"][2].isnan()  # one scored of 2
    assert figures["pass@1"].tolist() == [0.5, 0.0, 1.0]
    assert figures["mean@2"].tolist() == [0.5, 0.0, 1.0]
    torch.testing.assert_close(figures["partial/mean@2"], torch.tensor([0.35, 0.05, 1.0], dtype=torch.float64))
    assert figures["turns/mean@2"].tolist() == [1.5, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"validation.correct='reward' is not a validation score; the scores are "
                                         r"\['partial', 'turns'\]"):
        sampled_figures({"partial": score, "turns": turns}, 2, "reward", 1.0, [2])


def validate(overrides: list[str], out: Path) -> dict[str, float]:
    """The built-in RL preset's starting policy validated once, as a run builds it."""
    run = build_run(compose_config(["experiment=rl", "task.num_val=24", "task.val_batch_size=12", *overrides]), out)
    return {k: float(v) for k, v in run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)[0].items()}


def test_the_rl_task_logs_pass_at_4_beside_unchanged_greedy_figures(tmp_path: Path) -> None:
    sampled = validate(["validation.num_samples=4", "validation.pass_at=[1,4]"], tmp_path / "sampled")
    assert 0 < sampled["val/mean@4"] < sampled["val/pass@4"] <= 1  # the start policy is sometimes right
    # pass@1's unbiased estimate is each prompt's share of right samples: mean@4, when every sample is scored
    assert sampled["val/pass@1"] == pytest.approx(sampled["val/mean@4"], abs=1e-6)
    assert sampled["val/exact_match/mean@4"] == pytest.approx(sampled["val/mean@4"], abs=1e-6)
    logged = [r for r in read_metrics(tmp_path / "sampled" / "metrics.csv") if r.get("val/pass@4")]
    assert len(logged) == 1 and float(logged[0]["val/pass@4"]) == pytest.approx(sampled["val/pass@4"])
    # the same seed draws the same samples again; another draws others
    assert validate(["validation.num_samples=4", "validation.pass_at=[1,4]"], tmp_path / "again") == sampled
    other = validate(["validation.num_samples=4", "validation.seed=1"], tmp_path / "other")
    assert other["val/mean@4"] != sampled["val/mean@4"]
    # num_samples unset: the greedy figures alone, the same as beside the samples
    greedy = validate([], tmp_path / "greedy")
    assert greedy == {"val/exact_match": sampled["val/exact_match"]}


def test_an_environments_episodes_give_pass_at_k() -> None:
    data = MultiplyDataModule(num_train=4, num_val=6, val_batch_size=6, max_turns=2)  # its environment: validation's
    # right by the episode's own reward (1 when its last reply is the product, else 0)
    module = UnifiedModule(checkpoint_path("multiply_teacher"), data.tokenizer, OffPolicy(), Sparse(),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.0), samples_every_n_steps=None,
                           validation={"num_samples": 3, "temperature": 1.5, "correct": "reward"})
    figures = quiet_trainer().validate(module, datamodule=data, verbose=False)[0]
    assert {"val/reward", "val/turns", "val/exact_match", "val/pass@3", "val/mean@3", "val/reward/mean@3",
            "val/turns/mean@3", "val/exact_match/mean@3"} <= set(figures)
    assert 0 < figures["val/mean@3"] < figures["val/pass@3"] <= 1
    assert figures["val/mean@3"] == pytest.approx(figures["val/reward/mean@3"], abs=1e-6)
    # the task's exact match of the last reply is right on the same episodes as the reward
    assert figures["val/exact_match/mean@3"] == pytest.approx(figures["val/mean@3"], abs=1e-6)
    assert 1 <= figures["val/turns/mean@3"] <= 2  # the tool call, then the answer


def test_a_correct_score_validation_does_not_have_is_named_before_validating(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=sft", "task.num_val=4", "validation.num_samples=2", "validation.correct=reward"])
    run = build_run(cfg, tmp_path)
    with pytest.raises(ValueError, match=r"validation.correct='reward' is not a validation reward; the validation "
                                         r"rewards are \['exact_match'\]"):
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    assert not (tmp_path / "metrics.csv").exists() or "val/" not in (tmp_path / "metrics.csv").read_text()


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_samples": 0}, "validation.num_samples must be >= 1 or null, got 0"),
    ({"num_samples": "four"}, "validation.num_samples must be a whole number or null, got 'four'"),
    ({"num_samples": 4, "pass_at": [8]}, r"validation.pass_at must be .* from 1 to validation.num_samples=4, got \[8\]"),
    ({"pass_at": [1]}, "validation.pass_at needs validation.num_samples"),
    ({"num_samples": 4, "temperature": 0}, "validation.temperature must be > 0 or null"),
    ({"num_samples": 4, "top_p": 1.5}, r"validation.top_p must be in \(0, 1\] or null, got 1.5"),
])
def test_settings_that_cannot_work_are_named(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Validation(**settings)
