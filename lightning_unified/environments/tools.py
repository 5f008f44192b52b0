"""Tools: plain Python functions offered to the policy, the schemas its chat template
renders, the calls parsed from its text, and the calls run with a time limit.

A tool's schema comes from its name, type hints and Google-style docstring
(``transformers.utils.get_json_schema``, what ``apply_chat_template(tools=[fn])`` uses).

Which text is a tool call: where the tokenizer carries a ``response_template`` (transformers
then knows its template's own format and parses with ``tokenizer.parse_response``, given the
prompt before the reply and the tools' schemas), that; otherwise the Hermes format that Qwen2.5, Qwen3, Hermes and SmolLM3 templates ask for, one
JSON object per call between ``<tool_call>`` and ``</tool_call>``::

    <tool_call>{"name": "multiply", "arguments": {"a": 123, "b": 456}}</tool_call>

Whatever goes wrong with a call (an unknown tool, arguments that are not JSON or do not fit
the function, a tool that raises or runs past its time limit) comes back to the policy as
the tool's message, starting ``error:``, and is counted: the episode goes on. Calls run in
a worker process, which a timeout ends (:mod:`~lightning_unified.environments.tool_worker`).
No tool here runs the policy's text as code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from transformers.utils import get_json_schema

from lightning_unified.environments.tool_worker import call_tool

HERMES = "hermes"
RESPONSE_TEMPLATE = "response_template"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


class ToolSchemaError(ValueError):
    """A tool whose schema cannot be written (no docstring, an argument not described)."""


def tool_schemas(tools: list[Callable]) -> list[dict]:
    """The JSON schemas of ``tools``, as chat templates take them, in order."""
    out, names = [], set()
    for tool in tools:
        name = getattr(tool, "__name__", repr(tool))
        try:
            schema = get_json_schema(tool)
        except Exception as error:  # transformers' own exceptions name what is missing
            raise ToolSchemaError(f"tool {name!r}: {error} (a tool needs type hints and a docstring with an Args: "
                                  f"section describing every argument)") from error
        if schema["function"]["name"] in names:
            raise ToolSchemaError(f"two tools are named {schema['function']['name']!r}")
        names.add(schema["function"]["name"])
        out.append(schema)
    return out


@dataclass
class ToolCall:
    """One call the policy wrote: the tool's name and arguments, or why it cannot be run."""

    name: str | None
    arguments: dict | None
    error: str | None = None


def tool_call_format(tokenizer) -> str:
    """``response_template`` where the tokenizer has one, else ``hermes``."""
    return RESPONSE_TEMPLATE if getattr(tokenizer, "response_template", None) else HERMES


def describe_tool_call_format(tokenizer) -> str:
    """Which text the policy's tool calls are read from, for the run's log."""
    if tool_call_format(tokenizer) == RESPONSE_TEMPLATE:
        return "the tokenizer's response_template (transformers' parse_response)"
    return ("Hermes JSON between <tool_call> and </tool_call> (the tokenizer has no response_template; "
            "lightning_unified/environments/tools.py)")


def parse_tool_calls(text: str, tokenizer=None, *, raw: str | None = None, prefix: list[int] | None = None,
                     schemas: list[dict] | None = None) -> list[ToolCall]:
    """The tool calls in one policy turn's ``text`` (empty: the turn is an answer). With a
    tokenizer's ``response_template``, the reply as generated (``raw``, its stop token
    included) is parsed after ``prefix``, the token ids before it."""
    if tokenizer is not None and tool_call_format(tokenizer) == RESPONSE_TEMPLATE:
        return _from_response_template(text if raw is None else raw, tokenizer, prefix or [], schemas)
    calls = []
    for body, closing in _HERMES_CALL.findall(text):
        if not closing:
            calls.append(ToolCall(None, None, "the tool call is not closed with </tool_call>"))
            continue
        calls.append(_from_json(body.strip()))
    return calls


def _from_json(body: str) -> ToolCall:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return ToolCall(None, None, f"the tool call is not valid JSON ({error.msg} at character {error.pos}): "
                                    f"{body[:80]!r}")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(None, None, 'a tool call is a JSON object {"name": ..., "arguments": {...}}')
    return _call(value["name"], value.get("arguments", {}))


def _call(name: str, arguments) -> ToolCall:
    if isinstance(arguments, str):  # some formats write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return ToolCall(name, None, f"the arguments of {name!r} are not valid JSON ({error.msg})")
    if not isinstance(arguments, dict):
        return ToolCall(name, None, f"the arguments of {name!r} must be a JSON object, got {json.dumps(arguments)}")
    return ToolCall(name, arguments)


def _from_response_template(raw: str, tokenizer, prefix: list[int], schemas: list[dict] | None) -> list[ToolCall]:
    try:
        message = tokenizer.parse_response(raw, prefix=prefix, **({"tools": schemas} if schemas else {}))
    except Exception as error:  # the template's parser refuses the text: the policy hears why
        return [ToolCall(None, None, f"the reply could not be parsed: {str(error).splitlines()[0]}")]
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            calls.append(ToolCall(None, None, f"a tool call without a name: {call!r}"[:120]))
        else:
            calls.append(_call(function["name"], function.get("arguments", {})))
    return calls


@dataclass
class ToolResult:
    content: str
    error: bool = False
    timed_out: bool = False


def run_tool_call(call: ToolCall, tools: dict[str, Callable], timeout: float) -> ToolResult:
    """``call`` run against ``tools`` (name to function) within ``timeout`` seconds, in a
    worker process (:mod:`~lightning_unified.environments.tool_worker`): a tool still
    running then is stopped with its process, and the policy hears that it timed out."""
    if call.error is not None:
        return ToolResult(f"error: {call.error}", error=True)
    if call.name not in tools:
        return ToolResult(f"error: unknown tool {call.name!r}; the tools are {sorted(tools)}", error=True)
    outcome = call_tool(tools[call.name], call.arguments, timeout)
    if outcome.timed_out:
        return ToolResult(f"error: tool {call.name!r} took longer than {timeout:g} s", error=True, timed_out=True)
    if outcome.raised is not None:
        return ToolResult(f"error: {call.name} raised {outcome.raised}"[:500], error=True)
    if outcome.error is not None:
        return ToolResult(f"error: tool {call.name!r} could not run: {outcome.error}"[:500], error=True)
    return ToolResult(outcome.content)
