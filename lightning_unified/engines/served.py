"""The policy sampled by vLLM servers apart from the trainer (``sampling.engine=server``):
one or several ``vllm serve`` processes, on this machine or others, shared by every
trainer rank. Each rank sends its own prompts (spread over the servers that hold the
latest weights); only rank 0 pushes weights, once per version, through vLLM's own
weight-transfer API (:mod:`lightning_unified.engines.transfer`); every token comes back
with the version of the weights that sampled it.

- **Versions.** A push carries the optimizer step as its version; each server reports the
  version it holds, and one that reports another is refused by name. A server's
  ``weight_versions`` say which version sampled each token.
- **Updates.** ``update=drain`` (the default): the servers finish their requests, then take
  the new weights, so a batch comes from one version. ``update=in_flight`` (PipelineRL's):
  the servers pause their requests without aborting them, take the new weights and go on;
  the tokens after the push come from the new weights, and their behaviour log-probs say so.
- **Faults.** A request that fails or times out, or whose answer the server cut short
  (``finish_reason`` "abort") or did not label with a pushed version, is retried on another
  server, and the server that failed is left out (``sampling/server_failures``); with no server left the
  run stops, naming each URL and its error (the last checkpoint is untouched). A push that
  fails leaves its server out of sampling: none is ever sampled with half its weights.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_unified.engines.base import GenerationRequest, Rollout, RolloutEngine, mask_after_stop
from lightning_unified.engines.server_requests import (
    GENERATE,
    Sampled,
    ServerError,
    call,
    generate_body,
    read_prompt_logprobs,
    prompt_groups,
    read_samples,
    score_body,
)
from lightning_unified.teachers.scores import TeacherScores, scores_from_positions, sequences

log = logging.getLogger(__name__)
UPDATES = ("drain", "in_flight")


@dataclass
class Server:
    url: str
    version: int | None = None  # the version of the weights it holds (None: none pushed)
    down: str | None = None  # why it is left out of sampling
    requests: int = 0


class ServedEngine(RolloutEngine):
    """``urls``: the servers' roots (``http://host:port``); empty with ``launch`` = N: the run
    starts N servers on this machine itself (logs in ``<run dir>/servers``). ``update``:
    ``drain`` or ``in_flight``. ``timeout_s`` bounds every request; ``push_timeout_s`` a
    push. ``max_in_flight``: requests open at once per server. ``transfer``: the weight
    transfer backend (``auto``: ``nccl`` on a GPU, ``lu_gloo`` on a CPU); ``bucket_mb`` the
    size of each bucket it sends. ``kv_cache_gib`` and ``launch_args``: a launched server's
    KV cache (CPU) and extra ``vllm serve`` arguments. ``model``: the served model's name for
    requests (None: the server's only one; the adapter's name with LoRA). ``adapter_dir``: where
    a LoRA policy's adapter is written at each push, a path every server can read (None: a
    temporary directory on rank 0's machine)."""

    shares_weights = False

    def __init__(self, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, behaviour: str = "tempered",
                 urls: list[str] | tuple = (), launch: int = 0, update: str = "drain", timeout_s: float = 120.0,
                 push_timeout_s: float = 600.0, max_in_flight: int = 16, transfer: str = "auto", bucket_mb: int = 256,
                 kv_cache_gib: float | None = None, launch_args: list[str] | tuple = (), max_model_len: int | None = None,
                 cpu_sets: list[str] | tuple = (), model: str | None = None, adapter_dir: str | None = None):
        from lightning_unified.engines.vllm import logprobs_mode

        # (servers given or started, one of the two: the rule served-engine-needs-servers)
        urls = [urls] if isinstance(urls, str) else list(urls or [])
        bad = [u for u in urls if not str(u).startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"sampling.server.urls must be http:// or https:// addresses, got {bad}")
        if update not in UPDATES:
            raise ValueError(f"sampling.server.update must be one of {UPDATES}, got {update!r}")
        for name, value in (("timeout_s", timeout_s), ("push_timeout_s", push_timeout_s)):
            if not value > 0:
                raise ValueError(f"sampling.server.{name} must be > 0, got {value}")
        if max_in_flight < 1 or bucket_mb < 1:
            raise ValueError(f"sampling.server.max_in_flight and bucket_mb must be >= 1, got {max_in_flight}, "
                             f"{bucket_mb}")
        self.logprobs_mode = logprobs_mode(temperature, top_k, top_p, behaviour)
        self.urls, self.launch, self.update = [str(u).rstrip("/") for u in urls], launch, update
        self.timeout_s, self.push_timeout_s, self.max_in_flight = timeout_s, push_timeout_s, max_in_flight
        self.transfer, self.bucket_mb, self.kv_cache_gib = transfer, bucket_mb, kv_cache_gib
        self.launch_args, self.max_model_len, self.cpu_sets = list(launch_args), max_model_len, list(cpu_sets)
        self.model, self.adapter_dir = model, adapter_dir
        self.lora = False  # a LoRA policy: its adapter alone moves at each push (set at start)
        self.servers: list[Server] = []
        self.fleet = None
        self.pusher = None
        self.server_failures = 0  # servers left out since the start (sampling/server_failures)
        self.last_push = None  # the latest push's PushRecord (served_start)
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def resolved_transfer(self) -> str:
        """The weight transfer backend: ``auto`` is vLLM's ``nccl`` on a GPU, ours over gloo on a CPU."""
        if self.transfer != "auto":
            return self.transfer
        return "nccl" if torch.cuda.is_available() else "lu_gloo"

    @property
    def updates_in_flight(self) -> bool:
        """The owner may push while this engine's requests run (they pause, then go on)."""
        return self.update == "in_flight"

    # --- start, push, close --------------------------------------------------------------
    def start(self, policy: nn.Module, version: int = 0) -> None:
        from lightning_unified.engines.served_start import start_servers

        urls, self.fleet, self.pusher = start_servers(self, policy)
        self.servers = [Server(url) for url in urls]
        self.sync(policy, version=version)  # a resumed run's step: its tokens' lag is 0, not the step

    def sync(self, policy: nn.Module, version: int = 0) -> None:
        """Every live server takes the policy's weights as version ``version`` (all ranks
        call it: rank 0 pushes, the others join its gathers and learn which servers hold it)."""
        from lightning_unified.engines.served_start import push_to_servers

        self.last_push = push_to_servers(self, policy, version)
        self.sync_bytes = self.last_push.bytes

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        self.servers = []

    # --- sampling --------------------------------------------------------------------------
    def _live(self) -> list[Server]:
        live = [s for s in self.servers if s.down is None]
        if not live:
            raise ServerError(", ".join(s.url for s in self.servers),
                              "no rollout server is left: " + "; ".join(f"{s.url}: {s.down}" for s in self.servers))
        return live

    def _leave_out(self, server: Server, error: Exception) -> None:
        with self._lock:
            if server.down is None:
                server.down = str(error)
                self.server_failures += 1
                log.error("rollout server %s is left out of sampling: %s", server.url, error)

    def _ask(self, body: dict, start: int, read) -> tuple[object, Server]:
        """``body`` on a live server (the one whose turn ``start`` is), then on each other live
        one when it fails: a failed server is left out. ``read(answer, url)`` reads the
        answer; an answer it refuses as the server's fault (a row cut short, tokens of no
        pushed version) fails that server too, and the row is asked again elsewhere. Raises
        when none answers."""
        while True:
            live = self._live()
            server = live[start % len(live)]
            try:
                answer = read(call(server.url, GENERATE, body, timeout_s=self.timeout_s), server.url)
                with self._lock:
                    server.requests += 1
                return answer, server
            except ServerError as error:
                if error.refused_the_request:  # the row is at fault (too long, say), not the server
                    raise ValueError(f"{error} (the request: {_describe(body)})") from None
                if error.status is None and _healthy(server.url):
                    # alive, only slower than the timeout: leaving it out would take every
                    # server out in turn, each as busy as the last
                    raise ServerError(server.url, f"{error}, yet it answers /health: a reply takes longer than "
                                                  f"sampling.server.timeout_s={self.timeout_s:g} there; raise it"
                                      ) from None
                self._leave_out(server, error)
                if len(live) == 1:
                    raise ServerError(server.url, f"{error}; it was the only rollout server left, so the run stops "
                                                  f"(its last checkpoint is intact: resume=true once a server is back)"
                                      ) from None

    def _rows(self, bodies: list[dict], read) -> list[tuple[object, Server]]:
        """Every body answered and read (by ``read``, or by ``read[i]`` for body ``i``), spread
        over the live servers, ``max_in_flight`` open per server. The requests run in daemon
        threads: a run that fails or ends while they are open exits without waiting for
        answers nobody will read (a thread pool's workers would be joined at exit, each up to
        ``timeout_s`` per server tried)."""
        first = next(self._turn)
        readers = read if isinstance(read, list) else [read] * len(bodies)
        workers = max(1, min(len(bodies), self.max_in_flight * len(self._live())))
        return in_daemon_threads(lambda index: self._ask(bodies[index], first + index, readers[index]), len(bodies),
                                 workers)

    def generate(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 request: GenerationRequest) -> Rollout:
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        groups = prompt_groups(prompts, request)  # a request per prompt, n samples each
        bodies = [generate_body(prompts[first], request, first, self.model, count) for first, count in groups]
        answers = self._rows(bodies, [functools.partial(read_samples, with_logp=not request.greedy, samples=count)
                                      for _, count in groups])
        return _rollout([sample for samples, _ in answers for sample in samples], request, prompt_ids.device)

    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
              top_k: int) -> TeacherScores:
        if self.lora:
            raise ValueError("signal.teacher=self scored by sampling.engine=server with a LoRA policy: vLLM cannot "
                             "score prompts under an adapter (vllm-project/vllm#16668); set teacher.engine=hf")
        rows, starts = sequences(prompt_ids, prompt_mask, response_ids, response_mask)
        answers = self._rows([score_body(row, top_k, self.model) for row in rows], _as_is)
        positions = [read_prompt_logprobs(answer, start) for (answer, _), start in zip(answers, starts)]
        tokens = [row[start:] for row, start in zip(rows, starts)]
        return scores_from_positions(positions, tokens, response_ids.shape[1], top_k, "the rollout servers")

    def token_logp(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                   temperature: float) -> Tensor | None:
        if temperature != 1.0 or self.lora:
            # a server's prompt log-probs are the raw distribution's, and none under an adapter
            # (vllm-project/vllm#16668): the lag's diagnostics go unlogged
            return None
        scores = self.score(prompt_ids, prompt_mask, response_ids, response_mask, 0)
        return torch.where(response_mask.bool(), scores.token_logp.to(response_ids.device), 0.0)


def _as_is(answer: dict, url: str) -> dict:
    return answer


def _healthy(url: str) -> bool:
    """The server answers ``/health`` within 5 s: alive, its engine running."""
    try:
        call(url, "/health", timeout_s=5.0)
        return True
    except ServerError:
        return False


def in_daemon_threads(work, count: int, workers: int) -> list:
    """``[work(0), ..., work(count - 1)]``, run by ``workers`` daemon threads; the first
    failure (in index order) is raised once every item has ended, as ``pool.map`` would."""
    results, errors, items = [None] * count, [None] * count, iter(range(count))
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                index = next(items, None)
            if index is None:
                return
            try:
                results[index] = work(index)
            except BaseException as error:  # raised below, in the caller's thread
                errors[index] = error

    threads = [threading.Thread(target=run, daemon=True, name="rollout-request") for _ in range(min(workers, count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = next((error for error in errors if error is not None), None)
    if failed is not None:
        raise failed
    return results


def _describe(body: dict) -> str:
    """A request in a line: its prompt's length and its sampling settings."""
    settings = {k: v for k, v in body.get("sampling_params", {}).items() if k != "seed"}
    return f"{len(body.get('token_ids', []))} prompt tokens, {settings}"


def _rollout(samples: list[Sampled], request: GenerationRequest, device: torch.device) -> Rollout:
    """The rows as right-padded [B, R] tensors, each token's version beside its log-prob."""
    width = max(1, max(len(s.token_ids) for s in samples))
    rows = len(samples)
    ids = torch.full((rows, width), request.pad_token_id, dtype=torch.long)
    logp = torch.zeros((rows, width), dtype=torch.float32)
    versions = torch.zeros((rows, width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.token_ids)
        ids[row, :n] = torch.tensor(sample.token_ids, dtype=torch.long)
        versions[row, :n] = torch.tensor(sample.versions, dtype=torch.long)
        if sample.logprobs is not None:
            logp[row, :n] = torch.tensor(sample.logprobs, dtype=torch.float32)
    mask = mask_after_stop(ids, request.stop_token_ids)
    ids = torch.where(mask.bool(), ids, request.pad_token_id)
    return Rollout(ids.to(device), mask.to(device), None if request.greedy else (logp * mask).to(device),
                   versions=(versions * mask).to(device))
