"""A real vLLM server that takes the policy's weights, for the weight-push tests, and the
log-probs to compare on both ends.

The server finds this package's vLLM plugin the way an installed package's is found: an
entry point in the ``vllm.general_plugins`` group. The tests do not reinstall the package
(the editable install is shared); they put a ``lightning_unified`` distribution's metadata,
whose ``entry_points.txt`` is the ``[options.entry_points]`` of this checkout's setup.cfg,
first on the server's ``PYTHONPATH``, beside this checkout's source. So the server runs
exactly the entry point an install of setup.cfg declares."""

from __future__ import annotations

import configparser
import os
from pathlib import Path

import torch

from lightning_unified.engines.transfer.client import ServerClient
from lightning_unified.engines.transfer.server_args import server_flags
from tests.lightning_helpers import save_chat_model
from tests.teacher_server import TeacherServer

ROOT = Path(__file__).resolve().parents[1]


def entry_points_text() -> str:
    """setup.cfg's ``[options.entry_points]``, as pip writes it into ``entry_points.txt``."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = []
    for group, body in config["options.entry_points"].items():
        lines.append(f"[{group}]")
        lines.extend(line.strip() for line in body.strip().splitlines() if line.strip())
    return "\n".join(lines) + "\n"


def plugin_path(directory: Path) -> Path:
    """A directory holding only this package's distribution metadata (its entry points)."""
    info = directory / "lightning_unified-0.2.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lightning_unified\nVersion: 0.2.0\n")
    (info / "entry_points.txt").write_text(entry_points_text())
    return directory


def push_server(model_dir: str, directory: Path, lora_rank: int | None = None,
                extra_args: tuple[str, ...] = ()) -> TeacherServer:
    """A started server of ``model_dir`` with the ``lu_gloo`` backend, as ``server_flags``
    gives it, the plugin found through its entry point."""
    arguments, environment = server_flags("lu_gloo", lora_rank)
    python_path = os.pathsep.join([str(plugin_path(directory / "plugin")), str(ROOT),
                                   os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return TeacherServer(model_dir, directory / "server.log", extra_args=[*arguments, *extra_args],
                         extra_env={**environment, "PYTHONPATH": python_path}).start()


def save_tiny_model(directory: Path, **config) -> str:
    """The tests' tiny Llama (2 heads of 32: vLLM's CPU attention) with a 512-token context."""
    return save_chat_model(directory, **{"num_attention_heads": 2, "num_key_value_heads": 2,
                                         "max_position_embeddings": 512, **config})


def served_prompt_logp(url: str, model: str, ids: list[int]) -> torch.Tensor:
    """[T - 1] the server's log-prob of each token of ``ids`` after the ones before it."""
    answer = ServerClient(url, 60).call("POST", "/v1/completions", {
        "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
    table = answer["choices"][0]["prompt_logprobs"]
    return torch.tensor([table[t][str(ids[t])]["logprob"] for t in range(1, len(ids))])


def served_sample(url: str, model: str, ids: list[int], seed: int, tokens: int = 4) -> tuple[list[int], torch.Tensor]:
    """Tokens sampled after ``ids`` and the server's log-prob of each (token in, token out)."""
    answer = ServerClient(url, 60).call("POST", "/inference/v1/generate", {
        "model": model, "token_ids": ids,
        "sampling_params": {"max_tokens": tokens, "temperature": 1.0, "logprobs": 0, "seed": seed,
                            "ignore_eos": True}})
    choice = answer["choices"][0]
    return choice["token_ids"], torch.tensor([c["logprob"] for c in choice["logprobs"]["content"]])


@torch.no_grad()
def trainer_logp(model, ids: list[int], start: int = 1) -> torch.Tensor:
    """The trainer's log-prob of each token of ``ids`` from position ``start`` on."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]
