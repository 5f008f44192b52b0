"""Prompts through the tokenizer's chat template, and the token that ends a turn.

A chat prompt (a list of ``{role, content}`` messages) is rendered with the template's
generation prompt, so the model answers as the assistant. A chat prompt that ends with an
assistant message is a prefill: the template renders that message open (no end of turn) and
the model continues it, as TRL does for such prompts. A response ends with the
template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...) or, without a template,
with EOS: trained on that, the model learns to stop, and sampling stops there too.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_SENTINEL = "\u2063lu-sentinel\u2063"


def is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple))


def is_prefill(prompt) -> bool:
    """A chat prompt whose last message is the assistant's: the reply continues it."""
    return is_chat(prompt) and bool(prompt) and prompt[-1].get("role") == "assistant"


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt: a plain string as it is, a list of messages through the
    chat template with the generation prompt, or, when the last message is the assistant's,
    with that message left open for the model to continue (a prefill such as
    ``"49 + 97 = "``)."""
    if not is_chat(prompt):
        return tokenizer(prompt, add_special_tokens=False).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"a prompt is a list of chat messages but the tokenizer {tokenizer.name_or_path!r} has no chat "
            f"template; give plain-string prompts or a tokenizer with a template"
        )
    if is_prefill(prompt):
        text = tokenizer.apply_chat_template(list(prompt), continue_final_message=True, tokenize=False)
    else:
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    # the template writes the special tokens (BOS, role markers) itself
    return tokenizer(text, add_special_tokens=False).input_ids


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an assistant turn in the chat template, or EOS without one.

    Found by rendering a one-turn conversation and reading the first token after the
    assistant's text, when that token is a special one (``<|im_end|>``); a template that
    ends turns with plain text, or has no special token there, falls back to EOS.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS token; responses need one to end")
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token_id
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
    except Exception:  # templates that refuse this shape (e.g. need a system turn): fall back
        return tokenizer.eos_token_id
    after = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
    ids = tokenizer(after, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if ids and ids[0] in special:
        return ids[0]
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: EOS and the end-of-turn token (often the same)."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def contextual_prompt(prompt: str | list[dict], template: str, columns: dict[str, str | None]) -> str | list[dict]:
    """The prompt with privileged context, for a teacher that should see more than the
    student (self-distillation): ``template`` formatted with ``{prompt}`` (a plain prompt's
    text, or a chat prompt's last user message) and the example's other ``columns``
    (``{reference}``). A chat prompt keeps its other messages; the template's result
    replaces that last user message."""
    if is_chat(prompt):
        users = [i for i, m in enumerate(prompt) if m.get("role") == "user"]
        if not users:
            raise ValueError("signal.teacher_context: a chat prompt without a user message has nowhere to put the context")
        text = prompt[users[-1]]["content"]
    else:
        text = prompt
    values = {"prompt": text, **columns}
    try:
        rendered = template.format(**values)
    except KeyError as error:
        raise ValueError(f"signal.teacher_context names {{{error.args[0]}}}, but an example has only "
                         f"{sorted(values)}") from None
    missing = [name for name, value in values.items() if value is None and "{" + name + "}" in template]
    if missing:
        raise ValueError(f"signal.teacher_context uses {{{missing[0]}}}, which this example does not have "
                         f"(the data needs a '{missing[0]}' column)")
    if not is_chat(prompt):
        return rendered
    messages = [dict(m) for m in prompt]
    messages[users[-1]]["content"] = rendered
    return messages
