"""The environment interface: what a multi-turn episode talks to.

An environment is made fresh for every episode (one per prompt and sample), so it may keep
the episode's state in ``self``. ``reset`` turns a data row into the conversation's first
messages and the tools on offer; ``step`` answers each policy turn that calls no tool (every turn, where it offers none) with
the environment's messages, a reward and whether the episode is over. Tool calls never reach
``step``: the episode runner (:mod:`lightning_unified.environments.episodes`) executes them
and hands their results back to the policy as ``tool`` messages, as TRL's ``tools=`` and
verl's ``ToolAgentLoop`` do. Nothing here knows Lightning or tokens: messages in, messages
out; the runner owns the tokens.

What comes back from a user's environment is checked at once, and a wrong type is a
:class:`EnvironmentOutputError` naming the class and the method, never a crash further down.
An environment whose ``reset`` or ``step`` raises anything else fails that episode only
(:mod:`lightning_unified.environments.episodes`): its service may be flaky, its code is not wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lightning_unified.environments.tool_worker import check_picklable

ROLES = ("system", "user", "assistant", "tool")
# what the episode runner counts for every episode, logged beside the episode's reward as
# environment/<name> and val/<name>: an environment's own info takes other names
EPISODE_COUNTS = ("turns", "tool_calls", "tool_errors", "tool_timeouts", "ended_by_environment", "max_turns_reached",
                  "reply_cut", "over_budget", "splits", "response_tokens", "environment_tokens")


@dataclass
class Reset:
    """The episode's start: its first messages (a system or user turn the policy answers),
    the tools it may call, as plain Python functions (their names, signatures and
    docstrings become the schemas the chat template's ``tools=`` renders), and the
    episode's numbers before any step (``info``; an episode cut before its first answer
    reports these)."""

    messages: list[dict]
    tools: list[Callable] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class Step:
    """The environment's answer to one policy turn: messages for the policy's next turn
    (empty when ``done``), the turn's reward (the episode's reward is the sum), whether the
    episode is over, and numbers to log (``info``: each name's latest value at the
    episode's end, averaged over episodes as ``environment/<name>``, and ``val/<name>`` in
    validation)."""

    messages: list[dict] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)


class Environment:
    """Subclass and write :meth:`reset` and :meth:`step` (see docs/guides/environments.md)."""

    def reset(self, row: dict) -> Reset:
        """``row``: ``prompt`` (the data's text or messages), ``reference`` (its reference
        answer, or None) and ``index`` (the row's position in the data, or None)."""
        raise NotImplementedError

    def step(self, message: dict) -> Step:
        """``message``: the policy's turn, ``{"role": "assistant", "content": text}``."""
        raise NotImplementedError


class EnvironmentOutputError(TypeError):
    """An environment returned something the episode cannot use; says which class and method."""


def method_name(env, method: str) -> str:
    """``module.Class.method`` of ``env``, for errors."""
    return f"{type(env).__module__}.{type(env).__qualname__}.{method}"


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise EnvironmentOutputError(f"{where} returned messages of type {type(messages).__name__}; expected a list of "
                               f"{{'role', 'content'}} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise EnvironmentOutputError(f"{where}: message {i} is a {type(message).__name__}, not a dict with 'role' and "
                                   f"'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise EnvironmentOutputError(f"{where}: message {i} has role {role!r}; roles are {ROLES}")
        if not isinstance(content, str):
            raise EnvironmentOutputError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}; "
                                   f"content must be a str")
        out.append(dict(message))
    return out


def checked_reset(env, row: dict) -> Reset:
    """``env.reset(row)``, its result checked (a bare list of messages is a reset without tools)."""
    where = method_name(env, "reset")
    result = env.reset(row)
    if isinstance(result, (list, tuple)):
        result = Reset(list(result))
    if not isinstance(result, Reset):
        raise EnvironmentOutputError(f"{where} returned {type(result).__name__}; expected "
                               f"lightning_unified.environments.Reset(messages, tools) or a list of messages")
    messages = check_messages(result.messages, where)
    if not messages or messages[-1]["role"] == "assistant":
        raise EnvironmentOutputError(f"{where} must start the conversation with at least one system or user message for "
                               f"the policy to answer; got {[m['role'] for m in messages]}")
    tools = list(result.tools or [])
    for tool in tools:
        if not callable(tool):
            raise EnvironmentOutputError(f"{where}: tool {tool!r} is not callable; give tools as Python functions")
        why = check_picklable(tool)
        if why is not None:  # tools run in a process of their own, which a timeout can stop
            raise EnvironmentOutputError(
                f"{where}: tool {getattr(tool, '__name__', tool)!r} cannot be sent to the process tools run in "
                f"({why}); a tool is a function defined at the top of a module, a functools.partial of one, or a "
                f"method of an object that pickles (leave a client or a lock out of its __getstate__)")
    return Reset(messages, tools, _checked_info(result.info, where))


def _checked_info(info, where: str) -> dict[str, float]:
    if not isinstance(info, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in info.items()):
        raise EnvironmentOutputError(f"{where} returned info={info!r}; info maps names (str) to numbers")
    taken = sorted(set(info) & {"reward", "failures", *EPISODE_COUNTS})
    if taken:
        raise EnvironmentOutputError(f"{where} returned info named {taken}, which the episode logs itself (reward, "
                                     f"failures and {list(EPISODE_COUNTS)}); give them other names")
    return {k: float(v) for k, v in info.items()}


def checked_step(env, message: dict) -> Step:
    """``env.step(message)``, its result checked."""
    where = method_name(env, "step")
    result = env.step(message)
    if not isinstance(result, Step):
        raise EnvironmentOutputError(f"{where} returned {type(result).__name__}; expected "
                               f"lightning_unified.environments.Step(messages, reward, done)")
    messages = check_messages(result.messages, where)
    if isinstance(result.reward, bool) or not isinstance(result.reward, (int, float)) or not math.isfinite(result.reward):
        raise EnvironmentOutputError(f"{where} returned reward {result.reward!r}; a reward is a finite float")
    if not isinstance(result.done, bool):
        raise EnvironmentOutputError(f"{where} returned done={result.done!r} ({type(result.done).__name__}); done is a bool")
    if not result.done and not messages:
        raise EnvironmentOutputError(f"{where} returned done=False with no messages: the policy would have nothing to "
                               f"answer. Return a message, or done=True")
    return Step(messages, float(result.reward), result.done, _checked_info(result.info, where))
