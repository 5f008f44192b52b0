"""A teacher behind an OpenAI-compatible completions endpoint (vLLM's server is the
reference): token ids go over the wire, never text, and the teacher's log-probs of the
prompt positions come back (``prompt_logprobs``), one generated token at most.

Requests carry a few rows each and go out concurrently, a bounded number in flight, each
with a timeout and retried with exponential backoff. A server that stays down stops the
run with :class:`TeacherServerError`, naming the URL and what was tried; the run's last
checkpoint is untouched, so ``resume=true`` continues once the server is back."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from torch import Tensor

from lightning_unified.engines.transfer.client import ServerClient, ServerError
from lightning_unified.teachers.scores import TeacherScores, scores_from_positions, sequences

log = logging.getLogger(__name__)

# text whose tokens show whether two tokenizers agree: words, digits, punctuation, accents, CJK
PROBE_TEXT = "The quick brown fox jumps over 13 lazy dogs: 12+34=46, isn't it? Ünïcödé — 日本語 ½ x^2 {ok}\n\t"
# vocabulary ids checked by decoding, spread evenly over the policy's vocabulary
PROBE_IDS = 64


class TeacherServerError(RuntimeError):
    """The teacher server did not answer, or refused a request."""


class ServedTeacher:
    """``url`` is the server's root (``http://127.0.0.1:8000``); ``model`` the served model's
    name (None: the server's only one). ``timeout_s`` bounds each request; a failed request
    is tried ``retries`` more times, ``backoff_s``, 2x, 4x ... seconds apart. At most
    ``max_in_flight`` requests of ``rows_per_request`` rows each are open at once.
    ``owner`` is where the settings come from (``teacher``, ``signal.teachers.NAME`` or
    ``reference``); ``role`` what the served model is to the run (``teacher`` or ``reference``)."""

    def __init__(self, url: str, model: str | None = None, *, timeout_s: float = 120.0, retries: int = 4,
                 backoff_s: float = 2.0, max_in_flight: int = 4, rows_per_request: int = 8, owner: str = "teacher",
                 role: str = "teacher"):
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"{owner}.url must be the server's http:// or https:// address, got {url!r}")
        if timeout_s <= 0:
            raise ValueError(f"{owner}.server.timeout_s must be > 0, got {timeout_s}")
        if backoff_s < 0:
            raise ValueError(f"{owner}.server.backoff_s must be >= 0, got {backoff_s}")
        for name, value, low in (("retries", retries, 0), ("max_in_flight", max_in_flight, 1),
                                 ("rows_per_request", rows_per_request, 1)):
            if value < low:
                raise ValueError(f"{owner}.server.{name} must be >= {low}, got {value}")
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_in_flight, self.rows_per_request = max_in_flight, rows_per_request
        self.max_model_len: int | None = None
        self.name = f"{role} server {self.url}"
        self.owner, self.role = owner, role

    # --- start: which model, and is its vocabulary the policy's -----------------------------
    def start(self, policy, tokenizer, own_tokenizer: bool = False) -> None:
        """Find the served model and check its vocabulary against ``tokenizer``: the
        policy's, or with ``own_tokenizer`` the teacher's own (signal.teacher_tokenizer=auto)."""
        served = self._request("GET", "/v1/models").get("data", [])
        names = [m.get("id") for m in served]
        if self.model is None:
            if len(names) != 1:
                raise TeacherServerError(f"{self.name} serves {len(names)} models ({names}); name one with "
                                         f"{self.owner}.server.model")
            self.model = names[0]
        elif self.model not in names:
            raise TeacherServerError(f"{self.name} does not serve {self.model!r}; it serves {names}")
        self.max_model_len = next((m.get("max_model_len") for m in served if m.get("id") == self.model), None)
        self.name = f"{self.role} server {self.url} ({self.model})"
        self.check_vocabulary(tokenizer, own_tokenizer)

    def check_vocabulary(self, tokenizer, own_tokenizer: bool = False) -> None:
        """The server's tokenizer must map tokens as the policy's does: the same ids for a
        probe text, and the same text for ids spread over the policy's vocabulary."""
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        if own_tokenizer:
            refuse = (f"{self.name} uses another vocabulary than the teacher's tokenizer {name} (teacher.path), "
                      f"which encodes the replies it scores: give the served model's own directory as teacher.path")
        else:
            refuse = (f"{self.name} uses another vocabulary than the policy (tokenizer {name}); its log-probs are "
                      f"compared with the policy's token by token: serve a {self.role} with the policy's tokenizer"
                      + (", or align the two tokenizers with signal.teacher_tokenizer=auto (and teacher.path=DIR "
                         "holding the served model's tokenizer)" if self.role == "teacher" else ""))
        ours = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
        theirs = self._request("POST", "/tokenize", {"model": self.model, "prompt": PROBE_TEXT,
                                                     "add_special_tokens": False})["tokens"]
        if theirs != ours:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise TeacherServerError(f"{refuse}. The probe text {PROBE_TEXT!r} tokenizes to {theirs[at:at + 4]}... "
                                     f"there and {ours[at:at + 4]}... here, from token {at}")
        size = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        spread = [i for i in sorted({round(k * (size - 1) / (PROBE_IDS - 1)) for k in range(PROBE_IDS)})
                  if i not in special]
        for token in spread:
            try:
                text = self._request("POST", "/detokenize", {"model": self.model, "tokens": [token]}, retry=False)["prompt"]
            except TeacherServerError as error:
                raise TeacherServerError(f"{refuse}. Token id {token} (of the policy's {size}) does not decode "
                                         f"there: {error}") from None
            if text != tokenizer.decode([token]):
                raise TeacherServerError(f"{refuse}. Token id {token} is {text!r} there and "
                                         f"{tokenizer.decode([token])!r} here")

    # --- scoring -----------------------------------------------------------------------------
    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
              top_k: int) -> TeacherScores:
        """The teacher's log-prob of every response token and, with ``top_k``, its top-k at
        every response position."""
        rows, prompt_lengths = sequences(prompt_ids, prompt_mask, response_ids, response_mask)
        longest = max(len(r) for r in rows)
        if self.max_model_len is not None and longest > self.max_model_len:
            raise TeacherServerError(f"a prompt and response of {longest} tokens exceed the max_model_len="
                                     f"{self.max_model_len} of {self.name}")
        starts = range(0, len(rows), self.rows_per_request)
        payloads = [{"model": self.model, "prompt": rows[s:s + self.rows_per_request], "max_tokens": 1,
                     "temperature": 0.0, "prompt_logprobs": top_k} for s in starts]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_in_flight, len(payloads)))) as pool:
            answers = list(pool.map(lambda p: self._request("POST", "/v1/completions", p), payloads))
        tables = []
        for start, answer in zip(starts, answers):
            choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
            expected = len(payloads[start // self.rows_per_request]["prompt"])
            if len(choices) != expected:
                raise TeacherServerError(f"{self.name} answered {len(choices)} of {expected} prompts")
            tables.extend(c.get("prompt_logprobs") for c in choices)
        positions, tokens = [], []
        for row, prompt_length, table in zip(rows, prompt_lengths, tables):
            if table is None or len(table) != len(row):
                raise TeacherServerError(f"{self.name} returned no prompt_logprobs, or not one per token: is it an "
                                         f"OpenAI-compatible server that reports them (vLLM's does)?")
            positions.append([{int(k): v["logprob"] for k, v in step.items()} for step in table[prompt_length:]])
            tokens.append(row[prompt_length:])
        return scores_from_positions(positions, tokens, response_ids.shape[1], top_k, self.name)

    def close(self) -> None:
        """Nothing is held between requests."""

    # --- one request, retried ------------------------------------------------------------------
    def _request(self, method: str, path: str, payload: dict | None = None, retry: bool = True) -> dict:
        attempts = self.retries + 1 if retry else 1
        began, problem = time.monotonic(), ""
        for attempt in range(attempts):
            try:  # the package's one HTTP caller (each call bounded, each failure naming the URL)
                answer = ServerClient(self.url, self.timeout_s).call(method, path, payload)
                if isinstance(answer, dict):
                    return answer
                problem = f"an answer that is no JSON object: {str(answer)[:200]!r}"
            except ServerError as error:
                if error.status is not None and error.status < 500 and error.status != 429:
                    # the request is wrong: asking again will not help
                    raise TeacherServerError(f"{self.name}: {error}") from None
                problem = str(error)
            if attempt + 1 < attempts:
                wait = self.backoff_s * 2 ** attempt
                log.warning("%s: %s %s failed (attempt %d of %d: %s); retrying in %.1f s", self.name, method, path,
                            attempt + 1, attempts, problem, wait)
                time.sleep(wait)
        raise TeacherServerError(
            f"{self.name} did not answer {method} {path}: {attempts} attempt{'s' if attempts != 1 else ''} over {time.monotonic() - began:.0f} s "
            f"(timeout {self.timeout_s} s each, backoff from {self.backoff_s} s), last error: {problem}. The run's "
            f"last checkpoint is intact: start the server again and rerun with resume=true"
        )
