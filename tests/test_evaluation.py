"""Scoring policies after training (lightning_unified.evaluation, scripts/evaluate.py): the
paired exact test against the binomial test written from its definition, and greedy answers
on tiny real chat models checked against Hugging Face's own generate."""

from __future__ import annotations

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_unified.evaluation import exact_mcnemar, greedy_answers, paired_comparison
from lightning_unified.rewards.text import exact_match
from tests.lightning_helpers import save_chat_model
from tests.test_runs import ROOT
from tests.test_smollm2 import prepare_smollm2

QUESTIONS = [f"What is {a}+{b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]


def binomial_two_sided(k: int, n: int) -> float:
    """The two-sided binomial test at 1/2 by its definition: the probability of every outcome
    no likelier than the one seen."""
    pmf = [comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[k] * (1 + 1e-12)))


@pytest.mark.parametrize("only_first, only_second", [(1, 9), (8, 16), (29, 94), (5, 5), (0, 3), (0, 0), (40, 41)])
def test_exact_mcnemar_is_the_two_sided_binomial_test_on_the_discordant_questions(only_first, only_second) -> None:
    n = only_first + only_second
    expected = binomial_two_sided(only_first, n) if n else 1.0
    assert exact_mcnemar(only_first, only_second) == pytest.approx(expected, rel=1e-9)
    assert exact_mcnemar(only_first, only_second) == exact_mcnemar(only_second, only_first)


def test_exact_mcnemar_known_values() -> None:
    assert exact_mcnemar(1, 9) == pytest.approx(2 * 11 / 1024)
    assert exact_mcnemar(0, 3) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=">= 0"):
        exact_mcnemar(-1, 3)


def test_paired_comparison_counts_each_kind_of_question() -> None:
    before = [1, 1, 0, 0, 0, 1, 0, 0]
    after = [1, 0, 1, 1, 0, 1, 1, 0]
    paired = paired_comparison(before, after)
    assert (paired.only_first, paired.only_second, paired.both, paired.neither) == (1, 3, 2, 2)
    assert paired.questions == 8 and paired.p_value == pytest.approx(exact_mcnemar(1, 3))


def test_paired_comparison_refuses_what_is_not_paired_or_not_right_and_wrong() -> None:
    with pytest.raises(ValueError, match="same questions: got 3 and 2"):
        paired_comparison([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="the second policy has 0.5"):
        paired_comparison([1, 0], [1, 0.5])


def write_prompts(path: Path, references: list[str]) -> Path:
    with path.open("w") as f:
        for question, reference in zip(QUESTIONS, references):
            f.write(json.dumps({"question": [{"role": "user", "content": question}], "answer": reference}) + "\n")
    return path


def hf_greedy(model_dir: str, max_new_tokens: int) -> list[str]:
    """Hugging Face's generate on each prompt alone (no padding): an independent reference."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("models")
    # heads of width 32: vLLM's CPU attention takes head sizes of 32 and up
    return [save_chat_model(root / f"m{seed}", seed=seed, num_attention_heads=2, num_key_value_heads=2)
            for seed in (0, 1)]


def test_greedy_answers_are_hugging_faces_own_and_are_scored_against_the_references(models, tmp_path) -> None:
    expected = hf_greedy(models[0], max_new_tokens=6)
    assert len(set(expected)) > 1, "the check needs answers that differ between prompts"
    # every other reference is the model's own answer: those score 1, the rest 0
    references = [a if i % 2 == 0 else a + " no" for i, a in enumerate(expected)]
    data = write_prompts(tmp_path / "held_out.jsonl", references)
    answers = greedy_answers(models[0], data, {"exact_match": exact_match}, max_new_tokens=6, batch_size=4,
                             columns={"prompt": "question", "reference": "answer"})
    assert answers.completions == expected
    assert answers.scores["exact_match"] == [1.0, 0.0] * 3


def test_a_file_without_references_is_refused_by_name(models, tmp_path) -> None:
    data = tmp_path / "no_answers.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1+2?"}) + "\n")
    with pytest.raises(ValueError, match=r"no_answers.jsonl: \['exact_match'\] compare each answer with a reference, but the file has no 'reference' column"):
        greedy_answers(models[0], data, {"exact_match": exact_match}, max_new_tokens=4)


def test_the_script_prints_each_accuracy_and_the_paired_test(models, tmp_path) -> None:
    first = hf_greedy(models[0], max_new_tokens=5)
    second = hf_greedy(models[1], max_new_tokens=5)
    # the first model is right on every question, the second where it happens to agree
    data = write_prompts(tmp_path / "held_out.jsonl", first)
    out = tmp_path / "answers.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(data), *models, "--max-new-tokens", "5",
         "--columns", "prompt=question", "reference=answer", "--out", str(out)],
        capture_output=True, text=True, check=True)
    agree = sum(a == b for a, b in zip(first, second))
    assert f"{models[0]}: exact_match = 1.0000 on 6 questions" in result.stdout
    assert f"{models[1]}: exact_match = {agree / 6:.4f} on 6 questions" in result.stdout
    assert (f"right only after 0, right only before {6 - agree}, both {agree}, neither 0; exact McNemar "
            f"p = {exact_mcnemar(6 - agree, 0):.2g}") in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r[models[1]]["answer"] for r in rows] == second


def test_the_script_refuses_a_missing_answer_length(models, tmp_path) -> None:
    data = write_prompts(tmp_path / "held_out.jsonl", ["3"] * 6)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(data), models[0]],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--max-new-tokens" in result.stderr


def test_the_vllm_engine_answers_as_hugging_face_does(models, tmp_path) -> None:
    from tests.conftest import require_vllm

    require_vllm()
    expected = hf_greedy(models[1], max_new_tokens=6)
    data = write_prompts(tmp_path / "held_out.jsonl", expected)
    answers = greedy_answers(models[1], data, {"exact_match": exact_match}, max_new_tokens=6, engine="vllm",
                             engine_options={"kv_cache_gib": 0.25}, columns={"prompt": "question",
                                                                             "reference": "answer"})
    assert answers.completions == expected and answers.scores["exact_match"] == [1.0] * 6


def test_prepare_smollm2_refuses_more_questions_than_there_are() -> None:
    with pytest.raises(ValueError, match="1450 distinct questions asked for.*make only 300"):
        prepare_smollm2.questions(seed=0, count=1450, digits=1, operations="+-*")
