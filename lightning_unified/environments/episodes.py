"""Multi-turn episodes through a rollout engine, token-exact: tokens in, tokens out.

Each turn, every episode still running hands its whole context (prompt, then every token so
far) to the engine, which generates the policy's reply. The reply's tokens are kept exactly
as generated, with their behaviour log-probs, and the loss mask is 1 on them. The
environment's answer (tool results, feedback) is appended as the chat template renders it
after the conversation so far: the template renders the conversation through the policy's
reply, and again with the environment's messages and the next generation prompt; the
second render must start with the first, and the difference (with whatever the template
writes after the reply's end-of-turn token) is the environment's tokens, loss mask 0. The
policy's reply is never re-tokenized, so a reply the tokenizer would split differently keeps
the tokens it was sampled as (the drift verl#7322 and trl#6250 chased).

A template that rewrites earlier turns (one that drops past reasoning, say) cannot extend
the prefix: the second render does not start with the first. The trajectory then splits, as
prime-rl and Tinker do: the row so far ends after the policy's reply, and a new row starts
whose prompt is the template's render of the whole conversation. Both rows belong to the
same episode and share its reward; advantages are taken per episode.

An episode ends when the environment says done, after ``max_turns`` policy turns, when a
reply does not end with a stop token (cut by the per-turn ``max_new_tokens``), or when the
next turn would exceed the episode's ``max_tokens`` (every token after the first prompt,
the policy's and the environment's): each is counted. An environment whose ``reset`` or
``step`` raises fails its episode (``Episode.failed``; its rows are left out of the loss and
counted, :mod:`lightning_unified.failures`), and the others go on; a wrong type returned
(:class:`~lightning_unified.environments.base.EnvironmentOutputError`) is the code's error,
raised at once, as is an environment that cannot be made. Nothing here knows Lightning.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_unified.data.collate import pad
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.environments.base import (EPISODE_COUNTS, EnvironmentOutputError, Reset, checked_reset,
                                                 checked_step, method_name)
from lightning_unified.environments.tools import parse_tool_calls, run_tool_call, tool_schemas
from lightning_unified.failures import RowFailure, row_failure

COUNTS = EPISODE_COUNTS


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_tokens: int
    tool_timeout: float


@dataclass
class Segment:
    """One row of the batch: a prompt, then tokens of the policy (loss mask 1, with their
    behaviour log-probs) and of the environment (loss mask 0)."""

    prompt: list[int]
    response: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)

    def context(self) -> list[int]:
        return self.prompt + self.response


def render_ids(tokenizer, messages: list[dict], schemas: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                         **({"tools": schemas} if schemas else {}))
    return tokenizer(text, add_special_tokens=False).input_ids  # the template writes its special tokens itself


def environment_tokens(tokenizer, conversation: list[dict], new_messages: list[dict], schemas: list[dict],
                       stop_ids: tuple[int, ...]) -> list[int] | None:
    """The tokens that follow the policy's reply (the last message of ``conversation``)
    when the environment answers with ``new_messages``, through the next generation
    prompt; None where the template does not extend the conversation's render."""
    through_reply = render_ids(tokenizer, conversation, schemas, False)
    extended = render_ids(tokenizer, conversation + new_messages, schemas, True)
    if extended[:len(through_reply)] != through_reply:
        return None
    # what the template writes after the reply's end-of-turn token (a newline) the policy did not generate
    stops = [i for i, token in enumerate(through_reply) if token in stop_ids]
    after_stop = through_reply[stops[-1] + 1:] if stops else []
    return after_stop + extended[len(through_reply):]


class Episode:
    """One conversation between the policy and one environment."""

    def __init__(self, env, start: Reset, prompt_index: int, tokenizer, index: int = 0):
        # the episode's place in its batch, and its prompt's
        self.env, self.index, self.prompt_index = env, index, prompt_index
        self.messages = list(start.messages)
        self.tools = {getattr(t, "__name__", repr(t)): t for t in start.tools}
        self.schemas = tool_schemas(start.tools)
        self.segments = [Segment(render_ids(tokenizer, self.messages, self.schemas, True))]
        self.reward, self.done, self.used = 0.0, False, 0
        self.counts = dict.fromkeys(COUNTS, 0)
        self.info: dict[str, float] = dict(start.info)  # each name's latest value
        self.failed: RowFailure | None = None  # the environment raised: the episode is left out of the loss
        self.label = f"prompt {prompt_index}"  # the episode's prompt, in its failure's message

    @property
    def row(self) -> Segment:
        return self.segments[-1]

    def end(self, why: str) -> None:
        self.done = True
        self.counts[why] += 1

    def fail(self, method: str, error: Exception) -> None:
        """The environment's ``method`` raised ``error``: the episode ends, failed, with no reward."""
        self.done, self.reward = True, 0.0
        self.failed = row_failure(self.index, f"{method_name(self.env, method)} on {self.label}", error)


def start_episode(env, row: dict, prompt_index: int, tokenizer, index: int) -> Episode:
    """``env``'s episode on ``row``; failed at once when its ``reset`` raises (its row is then
    the data's prompt as a user turn, so that it can still stand in a rank's generation)."""
    label = f"the data's example {row.get('index')}: {str(row.get('prompt'))[:80]!r}"
    try:
        start = checked_reset(env, row)
    except EnvironmentOutputError:
        raise
    except Exception as error:  # noqa: BLE001 - the episode fails, the batch goes on
        prompt = row["prompt"]
        messages = list(prompt) if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": str(prompt)}]
        episode = Episode(env, Reset(messages), prompt_index, tokenizer, index)
        episode.label = label
        episode.fail("reset", error)
        return episode
    episode = Episode(env, start, prompt_index, tokenizer, index)
    episode.label = label
    return episode


def turn_seed(seed: int, turn: int) -> int:
    return random.Random(f"turn:{seed}:{turn}").getrandbits(63)


def _left_padded(contexts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    ids, mask = pad(contexts, pad_id, "left")
    return ids.to(device), mask.to(device)


def _any_rank(active: bool, device) -> bool:
    """Whether any rank still has an episode running: every rank then generates (sharded
    forwards hang unless all ranks run the same number)."""
    flag = torch.tensor([float(active)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def run_episodes(engine, policy, tokenizer, rows: list[dict], factory: Callable, request: GenerationRequest,
                 limits: EpisodeLimits, device, group: int = 1) -> list[Episode]:
    """``group`` episodes per row of ``rows`` (each a fresh environment from ``factory``),
    run turn by turn through ``engine`` until every one has ended. ``request`` holds the
    per-turn ``max_new_tokens``, the sampling settings and the seed; ``request.synced``
    with an engine that runs the training model: every rank runs the same number of turns."""
    episodes = []
    for index, row in enumerate(rows):
        for _ in range(group):
            episodes.append(start_episode(factory(), row, index, tokenizer, len(episodes)))
    stops = request.stop_token_ids
    # the training model's own generate under a sharded strategy: every rank runs every turn.
    # An engine with weights of its own (vLLM, hf's copy when sampling ahead) runs no
    # collectives, and must not: it may be in the producer's thread beside the training step's
    lockstep = request.synced and engine.shares_weights and torch.distributed.is_initialized()
    for turn in range(limits.max_turns):
        if not lockstep and request.cancelled is not None and request.cancelled.is_set():
            break  # its producer is being stopped: these rows will not be trained on
        active = [e for e in episodes if not e.done]
        if lockstep:
            if not _any_rank(bool(active), device):
                break
        elif not active:
            break
        # a rank with nothing left still generates (one row, discarded) while others do
        runs = active or episodes[:1]
        budget = max(limits.max_tokens - e.used for e in runs)
        ids, mask = _left_padded([e.row.context() for e in runs], request.pad_token_id, device)
        turn_request = dataclasses.replace(request, max_new_tokens=max(1, min(request.max_new_tokens, budget)),
                                           seed=turn_seed(request.seed, turn))
        rollout = engine.generate(policy, ids, mask, turn_request)
        if not active:
            continue
        lengths = rollout.response_mask.sum(-1).tolist()
        generated = rollout.response_ids.tolist()
        logps = rollout.logp.tolist() if rollout.logp is not None else None
        for i, episode in enumerate(active):
            reply = generated[i][:lengths[i]]
            logp = logps[i][:lengths[i]] if logps is not None else [0.0] * len(reply)
            room = limits.max_tokens - episode.used
            if len(reply) > room:  # a longer budget was asked for another row: this one's ends here
                reply, logp = reply[:room], logp[:room]
            episode.row.response += reply
            episode.row.loss_mask += [1] * len(reply)
            episode.row.logp += logp
            episode.used += len(reply)
            episode.counts["turns"] += 1
            episode.counts["response_tokens"] += len(reply)
            _after_reply(episode, reply, tokenizer, stops, limits, turn)
    for episode in episodes:
        if not episode.done:  # the turn loop ran out: max_turns
            episode.end("max_turns_reached")
    return episodes


def _after_reply(episode: Episode, reply: list[int], tokenizer, stops: tuple[int, ...], limits: EpisodeLimits,
                 turn: int) -> None:
    """The environment's answer to the policy's reply, appended; or the episode's end."""
    ended = bool(reply) and reply[-1] in stops
    text = tokenizer.decode(reply[:-1] if ended else reply, skip_special_tokens=False)
    before = episode.row.context()[:-len(reply)] if reply else episode.row.context()
    if not ended:
        episode.end("over_budget" if episode.used >= limits.max_tokens else "reply_cut")
        return
    message = {"role": "assistant", "content": text}
    # an environment without tools hears every turn, whatever it looks like
    calls = parse_tool_calls(text, tokenizer, raw=tokenizer.decode(reply, skip_special_tokens=False), prefix=before,
                             schemas=episode.schemas) if episode.tools else []
    if calls:
        answer = []
        for call in calls:
            result = run_tool_call(call, episode.tools, limits.tool_timeout)
            episode.counts["tool_calls"] += 1
            episode.counts["tool_errors"] += result.error
            episode.counts["tool_timeouts"] += result.timed_out
            answer.append({"role": "tool", "name": call.name or "unknown", "content": result.content})
    else:
        try:
            step = checked_step(episode.env, message)
        except EnvironmentOutputError:
            raise
        except Exception as error:  # noqa: BLE001 - the episode fails, the batch goes on
            episode.messages.append(message)
            episode.fail("step", error)
            return
        episode.reward += step.reward
        for name, value in step.info.items():
            episode.info[name] = value
        if step.done:
            episode.messages.append(message)
            episode.end("ended_by_environment")
            return
        answer = step.messages
    if turn + 1 >= limits.max_turns:
        episode.messages.append(message)
        episode.end("max_turns_reached")
        return
    tokens = environment_tokens(tokenizer, episode.messages + [message], answer, episode.schemas, stops)
    episode.messages += [message, *answer]
    if tokens is None:  # the template rewrote history: a new row from the whole conversation's render
        tokens = render_ids(tokenizer, episode.messages, episode.schemas, True)
        if episode.used + len(tokens) >= limits.max_tokens:
            episode.end("over_budget")
            return
        episode.counts["splits"] += 1
        episode.segments.append(Segment(tokens))
        episode.used += len(tokens)
        return
    if episode.used + len(tokens) >= limits.max_tokens:  # no room left for a reply after them
        episode.end("over_budget")
        return
    episode.row.response += tokens
    episode.row.loss_mask += [0] * len(tokens)
    episode.row.logp += [0.0] * len(tokens)
    episode.used += len(tokens)
    episode.counts["environment_tokens"] += len(tokens)


def episode_rows(episodes: list[Episode], pad_id: int, device) -> dict:
    """The episodes' rows as batch tensors (prompts left-padded, responses right-padded)
    with each row's episode and prompt, and each episode's reward, counts and info."""
    segments = [(e_index, episode, s) for e_index, episode in enumerate(episodes) for s in episode.segments]
    prompt_ids, prompt_mask = _left_padded([s.prompt for _, _, s in segments], pad_id, device)
    response, response_mask = pad([s.response for _, _, s in segments], pad_id, "right")
    loss_mask, _ = pad([s.loss_mask for _, _, s in segments], 0, "right")
    logp = torch.zeros(response.shape)
    for i, (_, _, s) in enumerate(segments):
        logp[i, :len(s.logp)] = torch.tensor(s.logp)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response.to(device),
            "response_mask": response_mask.to(device), "loss_mask": loss_mask.to(device), "logp": logp.to(device),
            "episode": [e for e, _, _ in segments], "prompt_index": [ep.prompt_index for _, ep, _ in segments],
            "episode_rewards": torch.tensor([ep.reward for ep in episodes], dtype=torch.float32, device=device),
            "failed": torch.tensor([ep.failed is not None for _, ep, _ in segments], dtype=torch.bool, device=device),
            "failures": [tuple(ep.failed) for ep in episodes if ep.failed is not None]}


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Per-episode means of the counts and of every ``info`` the environments gave, over
    the episodes that did not fail (those are counted in ``environment/failures``)."""
    episodes = [e for e in episodes if e.failed is None]
    n = max(1, len(episodes))
    out = {name: sum(e.counts[name] for e in episodes) / n for name in COUNTS}
    out["reward"] = sum(e.reward for e in episodes) / n
    names = sorted({k for e in episodes for k in e.info})
    for name in names:
        values = [e.info[name] for e in episodes if name in e.info]
        out[name] = sum(values) / len(values)
    return out
