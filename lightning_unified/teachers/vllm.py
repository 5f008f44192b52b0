"""A frozen teacher in a vLLM engine inside each training process, loaded from its
directory and never synced: it scores prompt + response with one generated token at most
and reports the prompt positions' log-probs (the response token's and the top-k)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_unified.engines.vllm_process import (
    INSTALL_HINT,
    engine_kwargs,
    import_vllm,
    keeping_process_state,
    shut_down,
    start_engine,
)
from lightning_unified.engines.vllm_scoring import prompt_logprob_scores
from lightning_unified.models.loading import check_model_directory, check_vocabulary_of
from lightning_unified.teachers.scores import TeacherScores


class InProcessTeacher:
    """``path`` is the teacher's Hugging Face directory. ``kv_cache_gib`` (null: 1 GiB on a
    CPU), ``gpu_memory_utilization`` (its share of a GPU otherwise), ``max_model_len`` (null:
    the teacher's ``max_position_embeddings``), ``dtype`` (null: the checkpoint's) and
    ``max_logprobs`` (the largest ``signal.top_k`` it may be asked for) size the engine.
    ``owner`` names the settings in errors; ``role`` is ``teacher`` or ``reference``."""

    def __init__(self, path: str, *, kv_cache_gib: float | None = None, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, dtype: str | None = None, max_logprobs: int = 64,
                 owner: str = "teacher", role: str = "teacher"):
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(f"{owner}.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT}")
        if path is None:
            raise ValueError(f"{owner}.engine=vllm loads the {role} from {owner}.path=DIR; it is not set")
        self.path = str(check_model_directory(path, weights=True))
        self.config = json.loads((Path(self.path) / "config.json").read_text())
        self.kv_cache_gib, self.gpu_memory_utilization = kv_cache_gib, gpu_memory_utilization
        self.max_model_len, self.dtype, self.max_logprobs = max_model_len, dtype, max_logprobs
        self.llm = None
        self.name = f"{role} {path} ({owner}.engine=vllm)"

    def start(self, policy: nn.Module, tokenizer, own_tokenizer: bool = False) -> None:
        """Start the engine; ``own_tokenizer``: the teacher has its own tokenizer (read from
        ``path``, where the engine's model is), so no vocabulary is compared with the policy's."""
        if not own_tokenizer:
            self.check_vocabulary(policy, tokenizer)
        vllm = import_vllm()
        kwargs = engine_kwargs(self.kv_cache_gib, self.gpu_memory_utilization, sleep=False)
        try:
            with keeping_process_state(), torch.inference_mode():
                self.llm = start_engine(lambda: vllm.LLM(
                    model=self.path, skip_tokenizer_init=True, dtype=self.dtype or self.checkpoint_dtype(),
                    # eager: a teacher only prefills (one generated token at most), where CUDA graphs gain nothing
                    max_model_len=self.max_model_len, enforce_eager=True, seed=0, max_logprobs=self.max_logprobs,
                    # the checkpoint's generation_config.json gives no sampling defaults: the
                    # scores are prompt log-probs of the raw distribution either way, and no
                    # request relies on a default
                    tensor_parallel_size=1, generation_config="vllm", **kwargs))
        except Exception as error:
            raise RuntimeError(f"{self.name} could not start: {error}") from error

    def checkpoint_dtype(self) -> str:
        """The dtype the checkpoint was saved in. vLLM's own "auto" runs a float32 checkpoint
        in half precision, so its log-probs would not be the teacher's as trained."""
        return str(self.config.get("dtype") or self.config.get("torch_dtype") or "auto")

    def check_vocabulary(self, policy: nn.Module, tokenizer) -> None:
        """The vocabulary checks an HF teacher gets, from the teacher's config and directory
        (the engine, not this process, loads its weights)."""
        rows = self.config.get("vocab_size") or self.config.get("text_config", {}).get("vocab_size")
        check_vocabulary_of(policy, tokenizer, rows or policy.get_output_embeddings().weight.shape[0], self.path,
                            self.name)

    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
              top_k: int) -> TeacherScores:
        if top_k > self.max_logprobs:
            raise ValueError(f"signal.top_k={top_k} exceeds teacher.vllm.max_logprobs={self.max_logprobs}")
        return prompt_logprob_scores(self.llm, prompt_ids, prompt_mask, response_ids, response_mask, top_k, self.name)

    def close(self) -> None:
        shut_down(self.llm)
        self.llm = None
