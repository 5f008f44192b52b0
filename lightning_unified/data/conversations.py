"""Conversations with several assistant turns as one trajectory: the prompt, then every turn
after it, with a loss mask on the assistant's tokens only.

The assistant spans are found without the template's ``{% generation %}`` markers, which most
templates lack. The conversation is rendered prefix by prefix: up to each assistant message
with the generation prompt, and up to the end of it. Each render must extend the whole
conversation's render token for token; where it does not (a template that rewrites earlier
turns, such as one that drops past reasoning, or text that merges with the template's
across a turn's edge) the error names the template and the message. An assistant span runs
from the end of its generation prompt through the template's end-of-turn token, which the
loss trains so that the model learns to stop; what the template writes after that token
(a newline) is context, as user turns and tool output are.

``loss_on="last_assistant"`` trains the last assistant turn alone, with everything before it
as the prompt: the same example as a one-turn data set made of that turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

LOSS_ON = ("all_assistant", "last_assistant")


class ConversationError(ValueError):
    """A conversation that cannot be rendered into assistant spans; says where and why."""


@dataclass
class Trajectory:
    """One conversation as token ids: the prompt (through the first trained turn's
    generation prompt), then the rest, with 1 on the trained assistant tokens."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # one per response token
    prompt_messages: list[dict]  # the messages the prompt renders
    last_reply: str  # the last assistant message's content: the reference answer of a file without one


def template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"the chat template of {name}"


def _ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool,
         tools: list[dict] | None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                         **({"tools": tools} if tools else {}))
    # the template writes the special tokens (BOS, role markers) itself
    return tokenizer(text, add_special_tokens=False).input_ids


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, stop_id: int,
                        loss_on: str = "all_assistant", tools: list[dict] | None = None,
                        where: str = "a conversation") -> Trajectory:
    """``messages`` (checked ``{role, content}`` dicts) as a :class:`Trajectory`. ``stop_id``
    is the template's end-of-turn token; ``where`` names the example in errors."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"task.loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ConversationError(f"{where}: a conversation needs a chat template, and the tokenizer "
                                f"{getattr(tokenizer, 'name_or_path', '')!r} has none")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ConversationError(f"{where}: the conversation has no assistant message to train on")
    if turns[-1] != len(messages) - 1:
        extra = messages[turns[-1] + 1]["role"]
        raise ConversationError(f"{where}: message {turns[-1] + 1} ({extra}) comes after the last assistant message; "
                                f"nothing would train on it. End each conversation with an assistant message")
    if turns[0] == 0:
        raise ConversationError(f"{where}: message 0 is an assistant message; a conversation starts with a system "
                                f"or user message that the first assistant turn answers")
    trained = turns if loss_on == "all_assistant" else turns[-1:]
    template = template_name(tokenizer)
    full = _ids(tokenizer, messages, False, tools)

    def extends(prefix: list[int], turn: int, what: str) -> None:
        if full[:len(prefix)] != prefix:
            at = _first_difference(prefix, full)
            raise ConversationError(
                f"{where}: {template} does not extend the conversation turn by turn at assistant message {turn}: "
                f"{what} renders as {tokenizer.decode(prefix[at:at + 8])!r}... from token {at}, the whole "
                f"conversation as {tokenizer.decode(full[at:at + 8])!r}... (a template that rewrites earlier turns, "
                f"or text that merges with the template's across a turn's edge); train on the last turn alone "
                f"(task.loss_on=last_assistant) or use a template that only appends")

    spans = []
    prompt_length = None
    for i in trained:
        before = _ids(tokenizer, messages[:i], True, tools)
        extends(before, i, "the conversation before it, with the generation prompt,")
        after = _ids(tokenizer, messages[:i + 1], False, tools)
        extends(after, i, "the conversation through it")
        start = len(before)
        stop = next((t for t in range(start, len(after)) if full[t] == stop_id), None)
        if stop is None:
            raise ConversationError(f"{where}: {template} renders assistant message {i} without the end-of-turn "
                                    f"token {tokenizer.convert_ids_to_tokens(stop_id)!r}, so its end cannot be "
                                    f"trained")
        if stop == start:
            raise ConversationError(f"{where}: assistant message {i} renders no tokens before its end-of-turn token")
        spans.append((start, stop + 1))
        if prompt_length is None:
            prompt_length = start
    # what the template writes after the last trained turn's end-of-turn token is not needed
    end = spans[-1][1]
    mask = [0] * (end - prompt_length)
    for start, stop in spans:
        for t in range(start, stop):
            mask[t - prompt_length] = 1
    return Trajectory(full[:prompt_length], full[prompt_length:end], mask, messages[:trained[0]],
                      messages[turns[-1]]["content"])


def check_tools(value, column: str, where: str) -> list[dict] | None:
    """A row's tools: a list of JSON schemas (mappings) as the chat template takes them, or
    None. ``datasets`` gives every row the keys any row has, absent ones as null: those are
    dropped again, so each schema is the one the file wrote."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, Mapping) for t in value):
        raise ConversationError(f"{where}: column {column!r} must be a list of tool schemas (JSON objects), got "
                                f"{type(value).__name__}: {str(value)[:80]}")
    return [_without_nulls(t) for t in value]


def _without_nulls(value):
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_nulls(v) for v in value]
    return value
