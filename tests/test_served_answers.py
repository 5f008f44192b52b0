"""What the served engine does with a server's answers, against local HTTP servers that answer
``/inference/v1/generate`` in vLLM's shape (the shape a real server gave in review: a request
running when the server was paused with ``mode=abort`` came back with HTTP 200,
``finish_reason: "abort"`` and the tokens sampled so far). No vLLM here: the engine's
servers are set directly, without its weight push.

- A row a server cut short is that server's fault: it is asked again on another server and
  the one that cut it is left out (before: the short row was trained on as a whole reply).
- Tokens without the versions that sampled them are refused (before: version 0, silently).
- A prompt's samples go in one request; an answer with fewer samples than asked is refused.
- A run that ends while requests are open exits without waiting for them (before: the
  request pool's threads were joined at exit, each request up to ``timeout_s``)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from lightning_unified.engines.base import GenerationRequest
from lightning_unified.engines.served import ServedEngine, Server
from lightning_unified.engines.server_requests import ServerError


def answer(tokens: list[int], finish_reason: str, versions: bool = True) -> dict:
    """One choice as vLLM's token-in token-out route returns it."""
    choice = {"index": 0, "token_ids": tokens, "finish_reason": finish_reason,
              "logprobs": {"content": [{"token": f"token_id:{t}", "logprob": -1.0} for t in tokens]},
              "weight_versions": [{"version": "3", "start": 0, "end": len(tokens)}] if versions else None}
    return {"request_id": "r", "choices": [choice]}


class Answering:
    """A local HTTP server that answers every POST with ``body`` (after ``delay_s``), its
    choice repeated for each sample the request asks for (``honours_n``), and with
    ``healthy`` a GET of ``/health`` at once (as a live vLLM server does)."""

    def __init__(self, body: dict, delay_s: float = 0.0, healthy: bool = False, honours_n: bool = True):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if healthy and self.path == "/health" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay_s)
                # a choice per sample asked for, as vLLM's (or one, as a server that ignores n)
                samples = asked.get("sampling_params", {}).get("n", 1) if honours_n else 1
                data = json.dumps({**body, "choices": [{**body["choices"][0], "index": index}
                                                       for index in range(samples)]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the engine stopped waiting (its timeout): expected here
                    return
                outer.answered += 1

            def log_message(self, *args):
                pass

        self.answered = 0
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def engine_of(*servers: Answering, timeout_s: float = 10) -> ServedEngine:
    engine = ServedEngine(urls=[s.url for s in servers], timeout_s=timeout_s)
    engine.servers = [Server(s.url) for s in servers]
    return engine


REQUEST = GenerationRequest(max_new_tokens=4, stop_token_ids=(2,), pad_token_id=0, seed=1)


def generate(engine: ServedEngine, rows: int):
    prompts = 5 + torch.arange(rows)[:, None].expand(rows, 3)  # one prompt per row: a request each
    return engine.generate(None, prompts, torch.ones_like(prompts), REQUEST)


def test_a_row_a_server_cut_short_is_asked_again_on_another_and_that_server_left_out() -> None:
    cutting, whole = Answering(answer([7, 8, 9], "abort")), Answering(answer([4, 5, 6, 7], "length"))
    try:
        engine = engine_of(cutting, whole)
        rollout = generate(engine, rows=4)
        # every row whole (4 tokens, max_new_tokens), from the server that did not cut it
        assert rollout.response_mask.sum(-1).tolist() == [4, 4, 4, 4]
        assert engine.servers[0].down is not None and "finish_reason 'abort'" in engine.servers[0].down
        assert engine.server_failures == 1 and engine.servers[1].requests == 4
    finally:
        cutting.close(), whole.close()


def test_the_only_server_cutting_rows_short_stops_the_run_naming_it() -> None:
    cutting = Answering(answer([7, 8, 9], "abort"))
    try:
        with pytest.raises(ServerError, match=f"{cutting.url}.*finish_reason 'abort'"):
            generate(engine_of(cutting), rows=1)
    finally:
        cutting.close()


def test_a_prompts_samples_are_one_request_and_fewer_answers_than_asked_are_refused() -> None:
    """The rows of one prompt go in one request (``n`` of them); a server that answers with
    fewer samples than asked is at fault, never trained on as if the rows were all there."""
    ignoring, whole = Answering(answer([4, 5], "length"), honours_n=False), Answering(answer([4, 5], "length"))
    prompts = torch.full((3, 3), 5)  # one prompt, 3 samples
    try:
        rollout = engine_of(whole).generate(None, prompts, torch.ones_like(prompts), REQUEST)
        assert rollout.response_mask.sum(-1).tolist() == [2, 2, 2] and whole.answered == 1
        with pytest.raises(ServerError, match=f"{ignoring.url} answered a request for 3 sample\\(s\\) with the "
                                              r"choices \[0\], not 0 to 2"):
            engine_of(ignoring).generate(None, prompts, torch.ones_like(prompts), REQUEST)
    finally:
        ignoring.close(), whole.close()


def test_tokens_without_the_versions_that_sampled_them_are_refused() -> None:
    unlabelled = Answering(answer([4, 5, 6, 7], "length", versions=False))
    try:
        with pytest.raises(ServerError, match=f"{unlabelled.url} returned 4 tokens without the weight versions"):
            generate(engine_of(unlabelled), rows=1)
    finally:
        unlabelled.close()


def test_a_run_that_ends_with_requests_open_exits_without_waiting_for_them() -> None:
    """The producer's job runs in a daemon thread; its requests must not hold the process at
    exit (a server that takes 60 s to answer here, within the request's timeout)."""
    child = textwrap.dedent("""
        import threading, time
        from tests.test_served_answers import Answering, answer, engine_of, generate
        slow = Answering(answer([4, 5, 6, 7], "length"), delay_s=60)
        threading.Thread(target=generate, args=(engine_of(slow, timeout_s=90), 4), daemon=True).start()
        time.sleep(1)
        print(time.monotonic(), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    ended = time.monotonic()
    assert done.returncode == 0, done.stderr[-2000:]
    main_done = float(done.stdout.strip().splitlines()[-1])
    assert ended - main_done < 20, f"the process exited {ended - main_done:.0f} s after its main thread ended"


def test_a_healthy_server_slower_than_the_timeout_is_not_left_out() -> None:
    """A reply that takes longer than ``timeout_s`` on a server that answers ``/health`` is
    the timeout's fault: the error says to raise it, and the server stays in use (before:
    it was left out, the row asked of the next server, as busy, until none was left). A
    server that answers nothing is left out as before."""
    slow = Answering(answer([4, 5, 6, 7], "length"), delay_s=3, healthy=True)
    silent = Answering(answer([4, 5, 6, 7], "length"), delay_s=3)
    try:
        engine = engine_of(slow, timeout_s=1)
        with pytest.raises(ServerError, match=f"{slow.url}.*answers /health.*timeout_s=1 there; raise it"):
            generate(engine, rows=1)
        assert engine.servers[0].down is None and engine.server_failures == 0
        engine = engine_of(silent, timeout_s=1)
        with pytest.raises(ServerError, match="only rollout server left"):
            generate(engine, rows=1)
        assert engine.servers[0].down is not None and engine.server_failures == 1
    finally:
        slow.close(), silent.close()
