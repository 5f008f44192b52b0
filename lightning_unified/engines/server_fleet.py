"""vLLM servers the run starts and stops itself (``sampling.server.launch``): on one machine,
each ``python -m vllm.entrypoints.openai.api_server`` in a process group of its own, its log
in the run directory, killed when the run ends, fails or is interrupted, never left behind.

A server started by hand takes the same flags (:func:`serve_command`); ``docs/guides/
served_rollouts.md`` has the commands for one machine, for trainer and engine nodes, and
for tensor-parallel servers.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

from lightning_unified.engines.server_requests import ServerError, call

# a server's start on a 2-core CPU takes 20-60 s; more means it is not coming up
START_TIMEOUT_S = 600.0
_FLEETS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for fleet in list(_FLEETS):
        fleet.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: str, port: int, *, host: str = "127.0.0.1", dtype: str = "float32",
                  max_model_len: int | None = None, logprobs_mode: str = "processed_logprobs",
                  kv_cache_gib: float | None = None, extra: list[str] | None = None) -> list[str]:
    """The arguments of a server that samples the policy for a run: token ids in and out
    (``--skip-tokenizer-init``), the log-probs of the distribution the run's behaviour names
    (``--logprobs-mode``), and the transfer backend's flags (``extra``:
    :func:`lightning_unified.engines.transfer.server_flags`, with ``--enable-scale-out`` for
    ``/inference/v1/generate``). A server started by hand takes the same."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", host,
               "--port", str(port), "--dtype", dtype, "--skip-tokenizer-init", "--logprobs-mode", logprobs_mode]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    if kv_cache_gib is not None:  # in bytes: the CPU build's own setting counts whole GiB only
        command += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30))]
    # Hydra reads `launch_args=[--max-num-seqs,64]` as a string and an int: both are arguments
    return command + [str(argument) for argument in extra or []]


def serve_env(extra: dict | None = None) -> dict:
    """The environment a server needs: vLLM's development routes (pause, resume, the weights'
    version and transfer)."""
    return {"VLLM_SERVER_DEV_MODE": "1", **(extra or {})}


def _die_with_the_trainer() -> None:
    """In the server's process before it runs: Linux sends it SIGTERM when the trainer that
    started it dies, even by SIGKILL (where no atexit hook runs), so it is never left behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerFleet:
    """``count`` servers of ``model_dir`` on free ports of this machine, logs in ``log_dir``."""

    def __init__(self, log_dir: Path, count: int):
        self.log_dir, self.count = Path(log_dir), count
        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []
        _FLEETS.add(self)

    def start(self, model_dir: str, *, command_args: dict, env: dict, cpu_sets: list[str] | None = None) -> list[str]:
        """Start every server and wait until each answers; their URLs."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            port = free_port()
            command = serve_command(model_dir, port, **command_args)
            if cpu_sets:  # pinned apart from the trainer's cores (the benchmark does)
                command = ["taskset", "-c", str(cpu_sets[index % len(cpu_sets)]), *command]
            log = open(self.log_dir / f"server_{index}.log", "ab")
            self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                   env={**os.environ, **env}, preexec_fn=_die_with_the_trainer))
            log.close()
            self.urls.append(f"http://127.0.0.1:{port}")
        for index, (url, process) in enumerate(zip(self.urls, self.processes)):
            self._wait(url, process, self.log_dir / f"server_{index}.log")
        return list(self.urls)

    def _wait(self, url: str, process: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.stop()
                raise ServerError(url, f"exited with {process.returncode} while starting; its log {log} ends:\n"
                                       f"{log.read_text(errors='replace')[-3000:]}")
            try:
                if call(url, "/v1/models", timeout_s=2).get("data"):
                    return
            except ServerError:
                time.sleep(1)
        self.stop()
        raise ServerError(url, f"did not answer within {START_TIMEOUT_S:g} s of its start; its log is {log}")

    def stop(self) -> None:
        """Kill every server's process group and wait for it."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait(timeout=30)
        self.processes, self.urls = [], []
