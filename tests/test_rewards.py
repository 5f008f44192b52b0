"""Built-in rewards do what their docstring examples say; a reward model scores prompt +
completion as a direct forward does, in batches, loaded once; a reward function that
raises, returns NaN or the wrong shape is named."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from lightning_unified.rewards.scoring import compute_rewards
from lightning_unified.rewards import RewardModel, length_penalty, numeric_answer, regex_format, text
from lightning_unified.specs import Reward
from tests.lightning_helpers import chat_tokenizer


def test_docstring_examples() -> None:
    result = doctest.testmod(text)
    assert result.attempted >= 7 and result.failed == 0, result


def test_numeric_answer_cases() -> None:
    completions = ["The answer is \\boxed{1,024}.", "-48", "49-97 = -48", "3.50", "no idea", "12 then 13"]
    references = ["1024", "-48", "-48", "3.5", "3", "12"]
    assert numeric_answer(completions, references).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="reward numeric_answer compares with references"):
        numeric_answer(["1"], [None])
    with pytest.raises(ValueError, match="holds no number"):
        numeric_answer(["1"], ["one"])


def test_format_and_length_rewards() -> None:
    assert regex_format(["<answer>4</answer>", "4"], pattern=r"<answer>\d+</answer>").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        length_penalty(torch.ones(1, 3), max_tokens=0)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("reward_model")
    tokenizer = chat_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_reward_model_scores_like_a_direct_forward(reward_model_dir: str) -> None:
    prompts = ["What is 2+2? ", "Say hi. ", "Count: "]
    completions = ["4", "hi there", "1 2 3"]
    model = RewardModel(reward_model_dir, batch_size=2)
    scores = model(completions=completions, prompts=prompts)
    loaded = model._model
    assert scores.shape == (3,)
    assert torch.equal(model(completions=completions, prompts=prompts), scores) and model._model is loaded, \
        "loaded once, deterministic"
    direct = LlamaForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = chat_tokenizer()
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([tokenizer(p + c).input_ids])
            torch.testing.assert_close(scores[i], direct(input_ids=ids).logits[0, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="over its max_length=3"):
        RewardModel(reward_model_dir, max_length=3)(completions=completions, prompts=prompts)


def test_reward_model_path_is_checked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="reward model: no Hugging Face checkpoint"):
        RewardModel(str(tmp_path))(completions=["x"])


def test_a_reward_that_raises_on_some_rows_fails_only_those_rows() -> None:
    """The batch call raises; called again row by row, the function scores the rows it can
    and only the others fail, each named with its row; a NaN is a failed row too. A wrong
    shape is the function's own error, raised at once."""
    calls = []

    def fails_on_sevens(completions, **_):
        calls.append(len(completions))
        if any("7" in c for c in completions):
            raise KeyError("no score for a 7")
        return torch.tensor([float(len(c)) for c in completions])

    def gives_nan(completions, **_):
        return torch.tensor([1.0, float("nan"), 1.0])

    scores = compute_rewards([Reward(fails_on_sevens), Reward(gives_nan, weight=0.5)], completions=["12", "3", "47"])
    assert calls == [3, 1, 1, 1], "the batch, then each row"
    assert [f.row for f in scores.failed] == [1, 2]
    assert "reward gives_nan on row 1: returned nan" in scores.failed[0].what
    assert "reward fails_on_sevens on row 2: KeyError: 'no score for a 7'" in scores.failed[1].what
    assert "raise KeyError" in scores.failed[1].details  # the traceback, for the log
    assert scores.total.tolist() == [2.0 + 0.5, 0.0, 0.0]
    assert scores.parts["fails_on_sevens"].item() == 1.5 and scores.parts["gives_nan"].item() == 1.0

    def wrong_shape(completions, **_):
        return torch.zeros(len(completions), 2)

    with pytest.raises(ValueError, match=r"reward wrong_shape returned shape \(3, 2\); it must return one float"):
        compute_rewards([Reward(wrong_shape)], completions=["a", "b", "c"])


def test_a_bare_reward_function_counts_with_weight_one(tmp_path: Path) -> None:
    """``signal.rewards=[{_target_: fn, _partial_: true}]`` (TRL's ``reward_funcs=[fn]``) trains;
    it used to stop with "'_DeferredTarget' object has no attribute 'fn'"."""
    from lightning_unified.config import train
    from tests.lightning_helpers import FAST_TASK, compose_config
    from tests.test_runs import read_metrics

    bare = "{_target_: lightning_unified.rewards.text.exact_match, _partial_: true}"
    weighted = "{_target_: lightning_unified.specs.Reward, weight: 0.5, fn: {_target_: " \
               "lightning_unified.tasks.addition.digit_match, _partial_: true}}"
    cfg = compose_config(["experiment=rl", f"signal.rewards=[{bare},{weighted}]", "trainer.max_steps=2",
                          "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "save_policy=null",
                          "data_source.sampling.num_generations=2", *FAST_TASK])
    train(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert any(r.get("reward/exact_match") for r in rows) and any(r.get("reward/digit_match") for r in rows)


def test_a_reward_that_is_not_a_function_is_named() -> None:
    from lightning_unified.specs import Sparse

    with pytest.raises(TypeError, match=r"signal.rewards\[1\] must be a reward function or a Reward .* got str"):
        Sparse(rewards=[Reward(fn=text.exact_match), "exact_match"])


def test_math_verify_compares_expressions() -> None:
    """Equivalent forms of one half score 1, a wrong answer and a completion without one 0."""
    from lightning_unified.rewards import expressions, math_verify

    result = doctest.testmod(expressions)
    assert result.attempted >= 2 and result.failed == 0, result
    completions = ["0.5", "1/2", r"\frac{1}{2}", r"The answer is $\boxed{\frac{1}{2}}$.", "0.25", "I am not sure"]
    assert math_verify(completions, ["1/2"] * 6).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert math_verify(completions[:3], [r"\frac{1}{2}"] * 3).tolist() == [1.0, 1.0, 1.0]
    # where numeric_answer reads one number, the expression is compared
    assert numeric_answer([r"\boxed{\frac{1}{2}}"], ["0.5"]).tolist() == [0.0]
    with pytest.raises(ValueError, match="reward math_verify: the reference '' holds no expression"):
        math_verify(["1"], [""])
    with pytest.raises(ValueError, match="reward math_verify compares with references"):
        math_verify(["1"], [None])


def test_math_verify_from_the_command_line_config() -> None:
    """signal.rewards names it as a bare function, as a user's override would."""
    from hydra.utils import instantiate

    from tests.lightning_helpers import compose_config

    cfg = compose_config(["experiment=rl", "signal.rewards=[{_target_: lightning_unified.rewards.math_verify, "
                          "_partial_: true}]"])
    signal = instantiate(cfg.signal, _convert_="all")
    scores = compute_rewards(signal.rewards, completions=["052", "52.0", "53"], references=["052"] * 3,
                             completion_ids=torch.ones(3, 2, dtype=torch.long),
                             completion_mask=torch.ones(3, 2, dtype=torch.long))
    assert scores.total.tolist() == [1.0, 1.0, 0.0] and list(scores.parts) == list(scores.values) == ["math_verify"]


def test_a_reward_service_that_times_out_is_not_called_once_per_row(monkeypatch) -> None:
    """A batch call that raises after its timeout is retried row by row only within a budget
    (twice the batch call's time, 10 s at least): a service that is down fails the rows not
    tried, instead of being called once more per row while the other ranks wait."""
    import time

    from lightning_unified.rewards import scoring
    from lightning_unified.specs import Reward

    monkeypatch.setattr(scoring, "RETRY_SECONDS", 0.3)
    calls = []

    def down(completions, **_):
        calls.append(len(completions))
        time.sleep(0.2)
        raise TimeoutError("the reward service did not answer")

    scores = scoring.compute_rewards([Reward(down)], completions=["a"] * 16, references=[None] * 16,
                                     completion_ids=None, completion_mask=None)
    assert calls[0] == 16 and len(calls) <= 4, calls  # the batch, then ~2 rows in the 0.4 s budget
    assert [f.row for f in scores.failed] == list(range(16))
    assert "not retried" in scores.failed[-1].what and "TimeoutError" in scores.failed[-1].what
