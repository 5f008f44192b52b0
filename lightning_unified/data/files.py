"""Examples from files: JSONL, Parquet, or a Hugging Face ``datasets`` dataset on disk.

``datasets`` does the reading; this module names what is wrong with the input. Every
error says the file and the line (JSONL) or row (other formats), and the column: a
malformed JSON line, a missing column, an empty prompt or response, a chat message without
role or content, an example over the length limit. Nothing is silently skipped or
truncated: overlong examples are an error unless ``overlong="drop"``, and then the count
of what was dropped is said in the log.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lightning_unified.data.chat import is_chat, prompt_token_ids

log = logging.getLogger(__name__)

# the columns a file may have, by their names in the code; task.columns renames them
COLUMNS = ("prompt", "response", "reference", "reward", "chosen", "rejected", "teacher")
REQUIRED = ("prompt",)
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
            if name in REQUIRED:
                raise DataError(f"task.columns.{name} cannot be null: every example needs a {name}")
            continue  # switched off: e.g. a prompt-only run over a file that also has responses
        column = columns.get(name, name)
        if column in found:
            resolved[name] = column
        elif name in REQUIRED or column != name:  # a column the user named must be there
            hint = f" (task.columns.{name}={column})" if column != name else ""
            raise DataError(f"{path}: missing column {column!r}{hint}; the file has columns {found}")
    if ("chosen" in resolved) != ("rejected" in resolved):
        have, lack = ("chosen", "rejected") if "chosen" in resolved else ("rejected", "chosen")
        raise DataError(f"{path}: column {resolved[have]!r} ({have}) needs a {lack} column beside it for preference "
                        f"pairs; the file has columns {found}")
    return resolved


def _check_text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: column {what!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: column {what!r} is empty")
    return value


def _check_prompt(value, column: str, where: str):
    if not is_chat(value):
        return _check_text(value, column, where)
    if not value:
        raise DataError(f"{where}: column {column!r} is an empty list of chat messages")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: column {column!r}, message {i} is a {type(message).__name__}, not "
                            f"{{role, content}}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str) or (key == "role" and not message[key]):
                raise DataError(f"{where}: column {column!r}, message {i} has no {key!r}")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: column {column!r}, message {i} has role {message['role']!r}; a chat "
                            f"message's role is one of {', '.join(CHAT_ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def tokenize_table(
    table,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    columns: Mapping[str, str] | None,
    limits: Limits,
    stop_id: int,
    teachers_seen: dict[str, str] | None = None,
) -> list[dict]:
    """Checked, tokenized examples ``{prompt_ids, response_ids?, reference?, reward?,
    chosen_ids?, rejected_ids?, teacher?}``; each response ends with ``stop_id``.
    ``teachers_seen``, when given, gets {teacher name: where the first example naming it is}."""
    path = Path(path)
    resolved = resolve_columns(list(table.column_names), columns, path)
    locate = _Locator(path, _format(path) if path.exists() else "")
    examples, dropped = [], 0
    for row, record in enumerate(table):
        where = locate(row)
        prompt = _check_prompt(record[resolved["prompt"]], resolved["prompt"], where)
        # the row names the example in later errors (a token budget it does not fit)
        example = {"prompt_ids": prompt_token_ids(tokenizer, prompt), "prompt": prompt, "row": row}
        responses = {}
        for name in ("response", "chosen", "rejected"):
            if name in resolved:
                text = _check_text(record[resolved[name]], resolved[name], where)
                responses[name] = tokenizer(text, add_special_tokens=False).input_ids + [stop_id]
        if "reference" in resolved:
            reference = record[resolved["reference"]]
            if reference is None or (isinstance(reference, str) and not reference.strip()):
                raise DataError(f"{where}: column {resolved['reference']!r} is empty")
            example["reference"] = str(reference)
        if "reward" in resolved:
            reward = record[resolved["reward"]]
            if isinstance(reward, str):  # a CSV cell is text
                try:
                    reward = float(reward)
                except ValueError:
                    pass
            if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
                raise DataError(f"{where}: column {resolved['reward']!r} must be a finite number, got {reward!r}")
            example["reward"] = float(reward)
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


def _over_limit(prompt_tokens: int, responses: dict[str, list[int]], limits: Limits) -> str | None:
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        return f"the prompt has {prompt_tokens} tokens, over task.max_prompt_tokens={limits.max_prompt_tokens}"
    for name, ids in responses.items():
        if limits.max_response_tokens is not None and len(ids) > limits.max_response_tokens:
            return (f"the {name} has {len(ids)} tokens (with its end token), over "
                    f"task.max_response_tokens={limits.max_response_tokens}")
    return None
