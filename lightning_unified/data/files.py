"""Examples from files: JSONL, Parquet, or a Hugging Face ``datasets`` dataset on disk.

``datasets`` does the reading; this module names what is wrong with the input. Every
error says the file and the line (JSONL) or row (other formats), and the column: a
malformed JSON line, a missing column, an empty prompt or response, a chat message without
role or content, an example over the length limit. Nothing is silently skipped or
truncated: overlong examples are an error unless ``overlong="drop"``, and then the count
of what was dropped is said in the log.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lightning_unified.data.chat import is_chat, prompt_token_ids
from lightning_unified.data.conversations import LOSS_ON, ConversationError, check_tools, render_conversation

log = logging.getLogger(__name__)

# the columns a file may have, by their names in the code; task.columns renames them.
# ``messages`` holds whole conversations (several assistant turns), in place of prompt and response
COLUMNS = ("prompt", "messages", "tools", "response", "reference", "reward", "chosen", "rejected", "margin",
           "teacher", "teacher_prompt")
OVERLONG = ("error", "drop")


# the roles chat templates know; a typo such as "usr" would pass a permissive template silently
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad input in a data file; the message names the file and the line, row or column."""


def _format(path: Path) -> str:
    if path.is_dir():
        return "saved" if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")) \
            else "directory"
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    formats = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".parquet": "parquet", ".csv": "csv"}
    if suffix not in formats:
        raise DataError(f"{path}: unknown data format {suffix!r}; give .jsonl, .json, .parquet, .csv, or a directory "
                        f"written by datasets' save_to_disk")
    return formats[suffix]


def _open_text(path: Path):
    """The file as UTF-8 text, decompressed when it ends in .gz."""
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _has_no_content(path: Path) -> bool:
    with _open_text(path) as f:
        return not any(line.strip() for line in f)


def _first_bad_json_line(path: Path) -> str | None:
    """'line N, column C: reason' of the first line that is not a JSON object, if any."""
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number}, column {error.colno}: malformed JSON ({error.msg})"
            if not isinstance(value, dict):
                return f"line {number}: a JSON {type(value).__name__}, not an object with named columns"
    return None


def read_table(path: str | Path):
    """The rows of ``path`` as a ``datasets.Dataset``; the format follows from the path."""
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    kind = _format(path)
    if kind in ("json", "csv") and _has_no_content(path):
        raise DataError(f"{path} is empty: it holds no examples")
    try:
        if kind == "saved":
            table = datasets.load_from_disk(str(path))
        elif kind == "directory":
            table = datasets.load_dataset(str(path), split="train")
        elif kind == "csv":
            # a CSV has no types: every cell is the file's text (a reference written 052 stays
            # 052, an empty cell stays empty), never a guessed number or a missing value
            with open(path, encoding="utf-8-sig", newline="") as f:  # a byte-order mark is not a name
                header = next(csv.reader(f), [])
            text = datasets.Features({name: datasets.Value("string") for name in header})
            table = datasets.load_dataset("csv", data_files=str(path), split="train", features=text,
                                          keep_default_na=False)
        else:
            table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:
        where = _first_bad_json_line(path) if kind == "json" else None
        if where:
            raise DataError(f"{path}: {where}") from error
        raise DataError(f"{path}: could not be read as {kind}: {error}") from error
    if isinstance(table, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits {sorted(table)}; point to one of them ({path}/<split>)")
    return table


@dataclass(frozen=True)
class Limits:
    """Token limits of one example, and what to do with an example over them."""

    max_prompt_tokens: int | None = None
    max_response_tokens: int | None = None
    overlong: str = "error"

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG:
            raise ValueError(f"task.overlong must be one of {OVERLONG}, got {self.overlong!r}")
        for name in ("max_prompt_tokens", "max_response_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"task.{name} must be >= 1, got {value}")


class _Locator:
    """Names a row: 'file, line N' for JSONL (blank lines skipped, as the reader does),
    'file, row N' otherwise."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind, self._lines = path, kind, None

    def __call__(self, row: int) -> str:
        if self.kind != "json":
            return f"{self.path}, row {row}"
        if self._lines is None:
            with _open_text(self.path) as f:
                self._lines = [n for n, line in enumerate(f, start=1) if line.strip()]
        return f"{self.path}, line {self._lines[row]}" if row < len(self._lines) else f"{self.path}, row {row}"


def locate_row(path: str | Path, row: int) -> str:
    """'file, line N' (JSONL) or 'file, row N' of an example's ``row``."""
    path = Path(path)
    return _Locator(path, _format(path) if path.exists() else "")(row)


def resolve_columns(found: list[str], columns: Mapping[str, str] | None, path: Path) -> dict[str, str]:
    """{code name: file column} for the columns this file has. A required column, or one
    the user renamed, that the file lacks is an error naming it and the columns found; a
    column mapped to null is left out."""
    columns = dict(columns or {})
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise DataError(f"task.columns has unknown name(s) {sorted(unknown)}; the names are {list(COLUMNS)}")
    resolved = {}
    for name in COLUMNS:
        if name in columns and columns[name] is None:
            continue  # switched off: e.g. a prompt-only run over a file that also has responses
        column = columns.get(name, name)
        if column in found:
            resolved[name] = column
        elif column != name:  # a column the user named must be there
            raise DataError(f"{path}: missing column {column!r} (task.columns.{name}={column}); the file has "
                            f"columns {found}")
    if "prompt" not in resolved and "messages" not in resolved and not {"chosen", "rejected"} <= set(resolved):
        if "prompt" in columns and columns["prompt"] is None:
            raise DataError("task.columns.prompt cannot be null: every example needs a prompt (or a 'messages' "
                            "column of whole conversations, task.columns.messages)")
        raise DataError(f"{path}: missing column 'prompt'; the file has columns {found}: name yours with "
                        f"task.columns.prompt=COLUMN, or a column of whole conversations with "
                        f"task.columns.messages=COLUMN")
    if "messages" in resolved:
        beside = [n for n in ("prompt", "response", "chosen", "rejected") if n in resolved]
        if beside:
            named = " and ".join(f"{resolved[n]!r} ({n})" for n in beside)
            off = " ".join(f"task.columns.{n}=null" for n in beside)
            raise DataError(f"{path}: column {resolved['messages']!r} holds whole conversations (prompt and replies); "
                            f"{named} cannot be read beside it: switch them off ({off}), or task.columns.messages=null")
    elif "tools" in resolved:
        raise DataError(f"{path}: column {resolved['tools']!r} (tools) goes with a 'messages' column of conversations, "
                        f"which the file does not have; the file has columns {found}")
    if "margin" in resolved and "chosen" not in resolved:
        raise DataError(f"{path}: column {resolved['margin']!r} (margin) is a preference pair's reward margin, but the "
                        f"file has no chosen and rejected columns (it has {found})")
    if ("chosen" in resolved) != ("rejected" in resolved):
        have, lack = ("chosen", "rejected") if "chosen" in resolved else ("rejected", "chosen")
        raise DataError(f"{path}: column {resolved[have]!r} ({have}) needs a {lack} column beside it for preference "
                        f"pairs; the file has columns {found}")
    return resolved


def _number(value, column: str, where: str) -> float:
    """A finite number from a cell (a CSV cell is text), or an error naming the column."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: refused below, named
            value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise DataError(f"{where}: column {column!r} must be a finite number, got {value!r}")
    return float(value)


def _check_text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: column {what!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: column {what!r} is empty")
    return value


# what a chat message may carry besides role and content, passed to the template as given
# (an assistant's tool calls, a tool message's name and call id)
MESSAGE_EXTRAS = ("tool_calls", "name", "tool_call_id")


def _check_prompt(value, column: str, where: str):
    if not is_chat(value):
        return _check_text(value, column, where)
    if not value:
        raise DataError(f"{where}: column {column!r} is an empty list of chat messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: column {column!r}, message {i} is a {type(message).__name__}, not "
                            f"{{role, content}}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise DataError(f"{where}: column {column!r}, message {i} has no 'role'")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: column {column!r}, message {i} has role {message['role']!r}; a chat "
                            f"message's role is one of {', '.join(CHAT_ROLES)}")
        # an assistant message that calls tools may have no text (``datasets`` reads it as null)
        calls = message.get("tool_calls")
        content = message.get("content")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise DataError(f"{where}: column {column!r}, message {i} has no 'content'")
        extras = {k: message[k] for k in MESSAGE_EXTRAS if message.get(k) is not None}
        messages.append({"role": message["role"], "content": content, **extras})
    return messages


def tokenize_table(
    table,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    columns: Mapping[str, str] | None,
    limits: Limits,
    stop_id: int,
    teachers_seen: dict[str, str] | None = None,
    loss_on: str = "all_assistant",
) -> list[dict]:
    """Checked, tokenized examples ``{prompt_ids, response_ids?, loss_mask?, reference?,
    reward?, chosen_ids?, rejected_ids?, margin?, teacher?}``; each response ends with ``stop_id``.
    A ``messages`` column's conversation becomes a prompt and a response holding every turn
    after it, ``loss_mask`` 1 on the trained assistant turns (``loss_on``, see
    :mod:`lightning_unified.data.conversations`). ``teachers_seen``, when given, gets
    {teacher name: where the first example naming it is}."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"task.loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    path = Path(path)
    resolved = resolve_columns(list(table.column_names), columns, path)
    locate = _Locator(path, _format(path) if path.exists() else "")
    examples, dropped = [], 0
    for row, record in enumerate(table):
        where = locate(row)
        responses = {}
        if "messages" in resolved:
            column = resolved["messages"]
            tools = _as_data_error(check_tools, record[resolved["tools"]], resolved["tools"], where) \
                if "tools" in resolved else None
            trajectory = _render(tokenizer, _check_conversation(record[column], column, where), stop_id=stop_id,
                                 loss_on=loss_on, tools=tools, where=f"{where}, column {column!r}")
            example = {"prompt_ids": trajectory.prompt_ids, "prompt": trajectory.prompt_messages, "row": row,
                       "loss_mask": trajectory.loss_mask, "reference": trajectory.last_reply}
            responses["response"] = trajectory.response_ids
        elif "prompt" in resolved:
            prompt = _check_prompt(record[resolved["prompt"]], resolved["prompt"], where)
            # the row names the example in later errors (a token budget it does not fit)
            example = {"prompt_ids": prompt_token_ids(tokenizer, prompt), "prompt": prompt, "row": row}
        else:  # preference pairs as two whole conversations: the prompt is what they share
            example = {"row": row}
        if "chosen" in resolved and _pair_of_conversations(record, resolved, where):
            example.update(_conversation_pair(tokenizer, record, resolved, example.get("prompt"), stop_id, where))
            responses.update(chosen=example.pop("chosen_ids"), rejected=example.pop("rejected_ids"))
        elif "prompt_ids" not in example:
            raise DataError(f"{where}: without a prompt column, 'chosen' and 'rejected' must each be a whole "
                            f"conversation (a list of chat messages), whose shared messages are the prompt")
        for name in ("response", "chosen", "rejected"):
            if name in resolved and name not in responses:
                text = _check_text(record[resolved[name]], resolved[name], where)
                responses[name] = tokenizer(text, add_special_tokens=False).input_ids + [stop_id]
        if "reference" in resolved:
            reference = record[resolved["reference"]]
            if reference is None or (isinstance(reference, str) and not reference.strip()):
                raise DataError(f"{where}: column {resolved['reference']!r} is empty")
            example["reference"] = str(reference)
        for name in ("reward", "margin"):  # margin: TRL's, the reward gap a pair must reach (signal=reward_model)
            if name in resolved:
                example[name] = _number(record[resolved[name]], resolved[name], where)
        if "teacher_prompt" in resolved:  # the teacher's own prompt, for signal.teacher_context='{teacher_prompt}'
            example["teacher_prompt"] = _check_text(record[resolved["teacher_prompt"]], resolved["teacher_prompt"], where)
        if "teacher" in resolved:
            example["teacher"] = _check_text(record[resolved["teacher"]], resolved["teacher"], where).strip()
            if teachers_seen is not None:
                teachers_seen.setdefault(example["teacher"], where)
        too_long = _over_limit(len(example["prompt_ids"]), responses, limits)
        if too_long:
            if limits.overlong == "error":
                raise DataError(f"{where}: {too_long}; raise the limit, or set task.overlong=drop to leave such "
                                f"examples out (they are counted)")
            dropped += 1
            continue
        example.update({f"{name}_ids": ids for name, ids in responses.items()})
        examples.append(example)
    if dropped:
        log.warning("%s: dropped %d of %d examples over the length limits (task.overlong=drop)",
                    path, dropped, len(table))
    if not examples:
        raise DataError(f"{path}: no examples left" + (f" ({dropped} over the length limits)" if dropped else ""))
    return examples


def _check_conversation(value, column: str, where: str) -> list[dict]:
    if not is_chat(value):
        raise DataError(f"{where}: column {column!r} must be a conversation, a list of chat messages "
                        f"{{role, content}}; got {type(value).__name__}")
    return _check_prompt(value, column, where)


def _as_data_error(fn, *args, **kwargs):
    """``fn``'s result; a conversation it refuses is bad input in a data file."""
    try:
        return fn(*args, **kwargs)
    except ConversationError as error:
        raise DataError(str(error)) from None


def _render(tokenizer, messages, *, where: str, **settings):
    """The conversation's trajectory (:func:`render_conversation`)."""
    return _as_data_error(render_conversation, tokenizer, messages, where=where, **settings)


def _pair_of_conversations(record, resolved: dict, where: str) -> bool:
    """Whether the row's chosen and rejected are conversations (lists of messages) rather
    than texts; both or neither."""
    chosen, rejected = (is_chat(record[resolved[n]]) for n in ("chosen", "rejected"))
    if chosen != rejected:
        raise DataError(f"{where}: columns {resolved['chosen']!r} and {resolved['rejected']!r} (chosen, rejected) "
                        f"must both be texts or both conversations")
    return chosen


def _conversation_pair(tokenizer, record, resolved: dict, prompt, stop_id: int, where: str) -> dict:
    """``prompt_ids``, ``prompt``, ``chosen_ids`` and ``rejected_ids`` of a pair given as
    conversations (TRL's conversational preference format): the prompt's messages followed by
    each reply's, or, without a prompt column, two whole conversations that share all but
    their last assistant message. Only that last turn differs, and only it is in the margin."""
    if prompt is not None and not is_chat(prompt):
        raise DataError(f"{where}: 'chosen' and 'rejected' are conversations, so the prompt must be chat messages "
                        f"too, not a text")
    conversations = {}
    for name in ("chosen", "rejected"):
        column = resolved[name]
        conversations[name] = list(prompt or []) + _check_conversation(record[column], column, where)
    chosen, rejected = conversations["chosen"], conversations["rejected"]
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if shared != len(chosen) - 1 or shared != len(rejected) - 1:
        raise DataError(f"{where}: the chosen and rejected conversations differ at message {shared}, but a pair "
                        f"shares everything except its last assistant message (chosen has {len(chosen)} messages, "
                        f"rejected {len(rejected)})")
    out = {}
    for name, messages in conversations.items():
        trajectory = _render(tokenizer, messages, stop_id=stop_id, loss_on="last_assistant",
                             where=f"{where}, column {resolved[name]!r}")
        out.update(prompt_ids=trajectory.prompt_ids, prompt=trajectory.prompt_messages)
        out[f"{name}_ids"] = trajectory.response_ids
    return out


def _over_limit(prompt_tokens: int, responses: dict[str, list[int]], limits: Limits) -> str | None:
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        return f"the prompt has {prompt_tokens} tokens, over task.max_prompt_tokens={limits.max_prompt_tokens}"
    for name, ids in responses.items():
        if limits.max_response_tokens is not None and len(ids) > limits.max_response_tokens:
            return (f"the {name} has {len(ids)} tokens (with its end token), over "
                    f"task.max_response_tokens={limits.max_response_tokens}")
    return None
