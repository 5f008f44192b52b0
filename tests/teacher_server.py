"""A real vLLM OpenAI-compatible server (the CPU build) on the loopback address, for the
served-teacher and weight-push tests: started in its own process group, stopped when the
test ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning as L

# the server's start on this 2-core CPU takes 20-60 s; more means it is not coming up
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeacherServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving ``model_dir`` at ``url``."""

    def __init__(self, model_dir: str, log_path: Path, port: int | None = None, max_logprobs: int = 64,
                 extra_args: list[str] = (), extra_env: dict[str, str] | None = None):
        self.model_dir, self.log_path, self.max_logprobs = model_dir, log_path, max_logprobs
        self.extra_args, self.extra_env = list(extra_args), dict(extra_env or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> TeacherServer:
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                   "--host", "127.0.0.1", "--port", str(self.port), "--max-logprobs", str(self.max_logprobs),
                   "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "16", *self.extra_args]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **self.extra_env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as answer:
                    if json.loads(answer.read()).get("data"):
                        return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer in {START_TIMEOUT_S} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        """Kill the server's whole process group and wait for it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        self.process = None


class KillServerAfter(L.Callback):
    """Kills the process group ``pid`` leads once ``step`` optimizer steps are done: the
    teacher server goes down in the middle of a run, as a crashed server would."""

    def __init__(self, pid: int, step: int):
        self.pid, self.step = pid, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(self.pid, signal.SIGKILL)
