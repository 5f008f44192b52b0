"""What crosses the wire between the trainer and a vLLM server that samples the policy:
token ids in, token ids, each one's log-prob and the weights' version that sampled it out
(vLLM's token-in token-out route ``/inference/v1/generate``), and the control routes of
its development mode (``/pause``, ``/resume``, ``/weight_info``). Plain HTTP with JSON, a
timeout on every call; every failure is a :class:`ServerError` naming the URL."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from lightning_unified.engines.base import GenerationRequest
from lightning_unified.engines.transfer.client import ServerClient, ServerError

__all__ = ["GENERATE", "Sampled", "ServerError", "call", "generate_body", "prompt_groups", "read_prompt_logprobs",
           "read_samples", "row_seed", "score_body"]

GENERATE = "/inference/v1/generate"


def call(url: str, route: str, body: dict | None = None, *, timeout_s: float, method: str | None = None,
         query: dict | None = None) -> dict:
    """``route`` of the server at ``url``: POST ``body`` as JSON (GET without one), the
    answer's JSON object back ({} for none); a refusal, a timeout or a dropped connection is
    a :class:`ServerError` naming the URL (the weight pusher's calls go the same way)."""
    path = route + (f"?{urllib.parse.urlencode(query)}" if query else "")
    answer = ServerClient(url, timeout_s).call(method or ("GET" if body is None else "POST"), path, body)
    return answer if isinstance(answer, dict) else {}


def row_seed(seed: int, row: int) -> int:
    """One sampling stream per row, from the request's seed: a row samples the same tokens
    whatever else shares the server's batch (as the in-process engine's)."""
    return (seed * 1_000_003 + row) % (2**63 - 1)


def prompt_groups(prompts: list[list[int]], request: GenerationRequest) -> list[tuple[int, int]]:
    """``[(first row, rows)]``: runs of consecutive rows with the same prompt (a group's
    samples), each asked in one request with ``n`` = its rows, so a step sends a request per
    prompt, not per row (the API server's work per request is most of a small model's
    sampling time). vLLM gives the ``i``-th of ``n`` samples the seed ``seed + i``, which is
    ``row_seed`` of row ``first + i``: the tokens are those of one request per row. A run
    whose seeds would wrap inside a group is split (it never happens for seeds below 2**40)."""
    groups: list[tuple[int, int]] = []
    for row, prompt in enumerate(prompts):
        if groups:
            first, count = groups[-1]
            same_stream = request.greedy or row_seed(request.seed, first) + count == row_seed(request.seed, row)
            if prompts[first] == prompt and same_stream:
                groups[-1] = (first, count + 1)
                continue
        groups.append((row, 1))
    return groups


def generate_body(prompt: list[int], request: GenerationRequest, row: int, model: str | None = None,
                  samples: int = 1) -> dict:
    """The request for rows ``row`` to ``row + samples - 1``, which share ``prompt``: its
    ids and the run's sampling settings, nothing of the server's defaults (vLLM applies a
    checkpoint's generation defaults to settings a request leaves out): the run's stop tokens
    alone, its temperature, top-k and top-p."""
    params = {"max_tokens": request.max_new_tokens, "stop_token_ids": list(request.stop_token_ids),
              "ignore_eos": True, "detokenize": False, "n": samples,
              "temperature": 0.0 if request.greedy else request.temperature,
              "top_k": request.top_k or -1, "top_p": request.top_p, "min_p": 0.0, "repetition_penalty": 1.0,
              "presence_penalty": 0.0, "frequency_penalty": 0.0}
    if not request.greedy:
        params["logprobs"] = 0
        params["seed"] = row_seed(request.seed, row)
    body = {"token_ids": prompt, "sampling_params": params, "output_mode": "tokens"}
    if model is not None:
        body["model"] = model
    return body


def score_body(tokens: list[int], top_k: int, model: str | None = None) -> dict:
    """A request for the log-probs of the given tokens (the prompt positions of a request
    that generates one token at most), with the top ``top_k`` at each."""
    body = {"token_ids": tokens, "output_mode": "tokens",
            "sampling_params": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k, "detokenize": False}}
    if model is not None:
        body["model"] = model
    return body


@dataclass
class Sampled:
    """One row as a server sampled it: its tokens, each one's log-prob (None when greedy)
    and the version of the weights that sampled each."""

    token_ids: list[int]
    logprobs: list[float] | None
    versions: list[int]


# how a whole row ends: a stop token, or max_tokens. Anything else ("abort": the server was
# paused with mode=abort, as a failed push leaves it, or the request was aborted) is a row cut short
FINISHED = ("stop", "length")


def read_samples(answer: dict, url: str, with_logp: bool, samples: int) -> list[Sampled]:
    """The ``samples`` choices of a ``/inference/v1/generate`` answer (the body's
    ``sampling_params.n``), in the order of their index; another count is the server's fault."""
    choices = sorted(answer.get("choices") or [], key=lambda choice: choice.get("index", 0))
    if [choice.get("index", 0) for choice in choices] != list(range(samples)):
        raise ServerError(url, f"{url} answered a request for {samples} sample(s) with the choices "
                               f"{[choice.get('index') for choice in choices]}, not 0 to {samples - 1}")
    return [_read_choice(choice, url, with_logp) for choice in choices]


def _read_choice(choice: dict, url: str, with_logp: bool) -> Sampled:
    """One choice. A row the server cut short (``finish_reason`` "abort") and a token
    sampled by weights that carry no version of ours (``default``: the server's own, never
    pushed; or none at all) are refused: each is the server's fault, and the row is asked
    again elsewhere."""
    tokens = choice.get("token_ids") or []
    if choice.get("finish_reason") not in FINISHED:
        raise ServerError(url, f"{url} ended a row after {len(tokens)} tokens with finish_reason "
                               f"{choice.get('finish_reason')!r}, not a stop token or max_tokens: it was cut short "
                               f"(the server was paused with mode=abort, or the request aborted)")
    logprobs = None
    if with_logp:
        content = (choice.get("logprobs") or {}).get("content") or []
        if len(content) != len(tokens):
            raise ServerError(url, f"returned {len(content)} log-probs for {len(tokens)} tokens (is it a vLLM server "
                                   f"started with --enable-scale-out?)")
        logprobs = [entry["logprob"] for entry in content]
    spans = choice.get("weight_versions")
    if tokens and not spans:
        raise ServerError(url, f"{url} returned {len(tokens)} tokens without the weight versions that sampled them (is "
                               f"it a vLLM server started with --enable-scale-out?)")
    versions = [0] * len(tokens)
    for span in spans or []:
        try:
            version = int(span["version"])
        except (TypeError, ValueError):
            raise ServerError(url, f"sampled with weights of version {span['version']!r}, which no push of this run "
                                   f"made (the server's own weights: it was not given the policy's)") from None
        versions[span["start"]:span["end"]] = [version] * (span["end"] - span["start"])
    return Sampled(tokens, logprobs, versions)


def read_prompt_logprobs(answer: dict, start: int) -> list[dict[int, float]]:
    """{token id: log-prob} at each prompt position from ``start`` on (the response's)."""
    positions = answer.get("prompt_logprobs") or []
    return [{int(token): entry["logprob"] for token, entry in table.items()} for table in positions[start:]]
