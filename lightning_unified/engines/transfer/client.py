"""One vLLM server's control routes over HTTP, each call bounded by a timeout and each
failure an error naming the server's URL, the route and what came back. It is the
``client`` vLLM's trainer-side weight-transfer engines drive (their four-method protocol)
and the few routes around a push: versions, the prefix cache, pausing, LoRA adapters.
The weight-transfer, version and cache routes need ``VLLM_SERVER_DEV_MODE=1`` on the server."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any


class ServerError(RuntimeError):
    """A server refused a call or did not answer it; ``url`` is the server's, ``status`` the
    HTTP status of a refusal (None: no answer at all)."""

    def __init__(self, url: str, message: str, status: int | None = None):
        super().__init__(message)
        self.url, self.status = url, status

    @property
    def refused_the_request(self) -> bool:
        """The server answered and refused what was asked (a 4xx other than a timeout, a rate
        limit or a 404, which a server restarted without the run's adapter answers): the
        request is at fault, not the server."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in (404, 408, 429)


class ServerClient:
    """``url`` is the server's root (``http://127.0.0.1:8000``). ``timeout_s`` bounds each
    call but ``update_weights``, which lasts as long as the transfer it receives (the
    trainer bounds each bucket of that transfer instead)."""

    def __init__(self, url: str, timeout_s: float):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a server's URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, payload: Any = None, timeout_s: float | None = -1.0) -> Any:
        """The JSON answer to ``method path`` (None for an empty one); ``timeout_s`` None waits
        as long as the server keeps the connection open."""
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        timeout = self.timeout_s if timeout_s == -1.0 else timeout_s
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                body = answer.read()
        except urllib.error.HTTPError as error:
            text = _message(error.read().decode(errors="replace"))[:2000]
            hint = (" (the weight-transfer and version routes need VLLM_SERVER_DEV_MODE=1 on the server)"
                    if error.code == 404 else "")
            raise ServerError(self.url, f"{self.url} refused {method} {path} (HTTP {error.code}): {text}{hint}",
                              error.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            waited = f" in {timeout:.0f} s" if timeout is not None else ""
            raise ServerError(self.url, f"{self.url} did not answer {method} {path}{waited}: "
                                        f"{type(error).__name__}: {reason}") from None
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:  # some routes answer in plain text ("Success: ...")
            return body.decode(errors="replace")

    # --- vLLM's VLLMWeightSyncClient protocol --------------------------------------------------
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.call("POST", "/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self.call("POST", "/start_weight_update")

    def update_weights(self, update_info: dict | list) -> None:
        self.call("POST", "/update_weights", {"update_info": update_info}, timeout_s=None)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.call("POST", "/finish_weight_update", {"weight_version": weight_version} if weight_version else None)

    def shutdown_weight_transfer_engine(self) -> None:
        self.call("POST", "/shutdown_weight_transfer_engine")

    # --- around a push ---------------------------------------------------------------------------
    def weight_version(self) -> str:
        return str(self.call("GET", "/weight_info")["weight_version"])

    def set_weight_version(self, version: str) -> None:
        self.call("POST", "/update_weight_version", {"new_version": version})

    def reset_prefix_cache(self) -> bool:
        """False while running requests hold cached blocks (vLLM then resets nothing)."""
        return bool(self.call("POST", "/reset_prefix_cache")["success"])

    def pause(self, mode: str) -> None:
        self.call("POST", f"/pause?mode={mode}")

    def resume(self) -> None:
        self.call("POST", "/resume")

    def models(self) -> list[dict]:
        return self.call("GET", "/v1/models").get("data", [])

    def server_info(self) -> dict:
        return self.call("GET", "/server_info?config_format=json")

    def load_lora_adapter(self, name: str, path: str) -> None:
        self.call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_lora_adapter(self, name: str) -> None:
        self.call("POST", "/v1/unload_lora_adapter", {"lora_name": name})


def _message(body: str) -> str:
    """vLLM's error message out of its JSON error body (the body itself otherwise)."""
    try:
        answer = json.loads(body)
    except json.JSONDecodeError:
        return body
    if isinstance(answer, dict):
        error = answer.get("error", answer.get("detail", answer))
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return body
