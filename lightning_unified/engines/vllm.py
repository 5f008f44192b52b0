"""A vLLM engine colocated in the training process (one per rank, tensor parallel 1).

It starts from the policy's config alone (``load_format="dummy"``), then takes the policy's
weights through :meth:`VLLMEngine.sync`, so a fresh model, a LoRA adapter (merged), a
resumed run and a sharded policy (gathered) all reach the engine the same way. Its
sampled-token log-probs are the behaviour policy: they differ from the trainer's by the
engine's kernels and precision, which is what the importance ratio corrects.
"""

from __future__ import annotations

import importlib.util
import tempfile

import torch
from torch import Tensor, nn

from lightning_unified.engines.base import GenerationRequest, Rollout, RolloutEngine
from lightning_unified.engines.plain_generation import say_ignored_once
from lightning_unified.engines.vllm_process import (
    ENGINE_CALLS,
    INSTALL_HINT,
    engine_kwargs,
    import_vllm,
    keeping_process_state,
    shut_down,
    start_engine,
)
from lightning_unified.engines.vllm_scoring import prompt_logprob_scores
from lightning_unified.engines.vllm_reload_notice import quiet_rotary_reload_notice
from lightning_unified.engines.parameter_copy import architecture, base_model, engine_weights
from lightning_unified.engines.vllm_adapter import AdapterSlot


def logprobs_mode(temperature: float, top_k: int, top_p: float, behaviour: str) -> str:
    """vLLM's log-prob mode giving the behaviour policy ``behaviour`` names: it reports the
    raw distribution or the processed one (after temperature and top-k / top-p). The one it
    cannot give (tempered, untruncated, at a temperature other than 1 under top-k / top-p) is
    refused by the rule ``vllm-reports-raw-or-sampled`` when the sampling settings are built."""
    truncated = bool(top_k) or top_p < 1.0
    if behaviour == "sampled" or not truncated:
        return "processed_logprobs"
    if temperature == 1.0:
        return "raw_logprobs"  # tempered at 1 and before truncation: the raw distribution
    raise ValueError("vLLM has no log-prob mode for the tempered distribution before truncation at a temperature "
                     "other than 1 (rule vllm-reports-raw-or-sampled: set sampling.behaviour=sampled)")


class VLLMEngine(RolloutEngine):
    """``kv_cache_gib`` is the KV cache's size (null: 1 GiB on a CPU, and on a GPU the share
    ``gpu_memory_utilization`` of its memory that the engine may take beside training);
    ``dtype`` null is the trainer's compute dtype (bf16 under ``bf16-mixed``; the policy's
    parameters' without a trainer); ``max_model_len`` null takes the policy's
    ``max_position_embeddings``; ``enforce_eager`` skips CUDA graphs and compilation (a
    faster start, slower decoding; null: eager on a CPU, CUDA graphs on a GPU); ``sleep``
    frees the engine's GPU memory during the training step (vLLM's sleep mode; GPUs only) at
    ``sleep_level`` 2, weights and KV cache discarded (the next sync overwrites the weights
    anyway: vLLM's level for weight updates), or 1, weights copied to the CPU and back (for
    weights that must outlive the sleep, ``sampling.sync_every`` > 1); ``max_logprobs`` is the
    largest top-k it may be asked to score (self-distillation scored by the rollout engine).
    Every call into the engine holds the process's one vLLM lock
    (:data:`~lightning_unified.engines.vllm_process.ENGINE_CALLS`)."""

    def __init__(self, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, behaviour: str = "tempered",
                 kv_cache_gib: float | None = None, gpu_memory_utilization: float = 0.3, dtype: str | None = None,
                 max_model_len: int | None = None, enforce_eager: bool | None = None, sleep: bool = False,
                 sleep_level: int = 2, max_logprobs: int = 20):
        if importlib.util.find_spec("vllm") is None:  # at construction: before any model work
            raise ImportError(f"sampling.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT}")
        self.logprobs_mode = logprobs_mode(temperature, top_k, top_p, behaviour)
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ValueError(f"sampling.vllm.kv_cache_gib must be > 0, got {kv_cache_gib}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"sampling.vllm.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        self.dtype = dtype
        self.max_model_len = max_model_len
        # CUDA graphs on a GPU (decoding's many small launches replayed as one); a CPU compiles
        # slowly for little gain
        self.enforce_eager = (not torch.cuda.is_available()) if enforce_eager is None else enforce_eager
        if sleep and not torch.cuda.is_available():
            raise ValueError("sampling.vllm.sleep=true frees the engine's GPU memory during training (vLLM's sleep "
                             "mode); without a CUDA GPU there is none to free: set it to false")
        self.use_sleep = sleep
        if sleep_level not in (1, 2):
            raise ValueError(f"sampling.vllm.sleep_level must be 1 or 2, got {sleep_level}")
        self.sleep_level = sleep_level
        if max_logprobs < 0:
            raise ValueError(f"sampling.vllm.max_logprobs must be >= 0, got {max_logprobs}")
        self.max_logprobs = max_logprobs
        self.llm = None
        self._config_dir: tempfile.TemporaryDirectory | None = None
        # a LoRA policy whose adapters alone train: the base weights once, the adapters at each sync
        self.adapter: AdapterSlot | None = None
        self._base_loaded = False

    def start(self, policy: nn.Module, version: int = 0) -> None:
        vllm = import_vllm()
        model = base_model(policy)
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.architectures = [architecture(model)]
        self.max_model_len = self.max_model_len or getattr(config, "max_position_embeddings", None)
        self._config_dir = tempfile.TemporaryDirectory(prefix="lightning_unified_vllm_")
        config.save_pretrained(self._config_dir.name)
        # the trainer's compute dtype (bf16 under bf16-mixed), not the float32 master weights'
        dtype = self.dtype or str(self.compute_dtype or next(model.parameters()).dtype).removeprefix("torch.")
        kwargs = engine_kwargs(self.kv_cache_gib, self.gpu_memory_utilization, self.use_sleep)
        # the adapter alone at each sync, unless the engine scores prompts (vLLM scores them
        # without the adapter's logits: vllm-project/vllm#16668), which takes merged weights
        self.adapter = None if self.scores_prompts else AdapterSlot.for_policy(policy, self._config_dir.name, dtype)
        if self.adapter is not None:
            kwargs.update(self.adapter.engine_kwargs())
        with ENGINE_CALLS:
            self._start(vllm, policy, config, dtype, kwargs)

    def _start(self, vllm, policy: nn.Module, config, dtype: str, kwargs: dict) -> None:
        try:
            with keeping_process_state(), torch.inference_mode():  # the same kind of tensors whether validation or training starts it
                self.llm = start_engine(lambda: vllm.LLM(
                    model=self._config_dir.name, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
                    max_model_len=self.max_model_len, enforce_eager=self.enforce_eager, seed=0,
                    logprobs_mode=self.logprobs_mode, max_logprobs=self.max_logprobs, tensor_parallel_size=1,
                    # no sampling defaults from the checkpoint (vLLM's own are neutral): every
                    # request below states its settings (engines/plain_generation.py)
                    generation_config="vllm", **kwargs))
        except Exception as error:
            raise RuntimeError(self._start_failure(config, error)) from error
        self.sync(policy)
        try:
            # one token now: a model the engine's kernels cannot run fails here, by name
            self.llm.generate([{"prompt_token_ids": [0]}], vllm.SamplingParams(max_tokens=1, detokenize=False),
                              use_tqdm=False)
        except Exception as error:
            raise RuntimeError(self._start_failure(config, error)) from error

    def _start_failure(self, config, error: Exception) -> str:
        text = str(error)
        if "not supported" in text.lower() and "architecture" in text.lower():
            return (f"sampling.engine=vllm: vLLM {_version()} cannot run {config.architectures[0]} "
                    f"(model_type {config.model_type!r}): {text}. Use sampling.engine=hf")
        if "kv cache" in text.lower() or "memory" in text.lower():
            return (f"sampling.engine=vllm: the engine's KV cache cannot hold one sequence of max_model_len="
                    f"{self.max_model_len} tokens: {text}. Raise sampling.vllm.kv_cache_gib (CPU) or "
                    f"gpu_memory_utilization (GPU), or set sampling.vllm.max_model_len to the longest prompt plus "
                    f"max_new_tokens")
        return f"sampling.engine=vllm could not start for {config.architectures[0]}: {text}"

    def sync(self, policy: nn.Module, version: int = 0) -> None:
        """The policy's weights into the engine; with adapters alone training, the base
        weights the first time only (again after a sleep that forgot them) and the adapter
        at every sync (:class:`~lightning_unified.engines.vllm_adapter.AdapterSlot`)."""
        self.sync_bytes = 0
        if self.adapter is None or not self._base_loaded:
            self._sync_weights(policy, merge=self.adapter is None)
            self._base_loaded = True
        if self.adapter is not None:
            with ENGINE_CALLS:
                self.sync_bytes += self.adapter.load(self.llm, policy)

    def _sync_weights(self, policy: nn.Module, merge: bool) -> None:
        # the engine's tensors are inference tensors (it may have started under Lightning's
        # inference-mode validation), which only inference mode may update in place
        quiet_rotary_reload_notice()
        with ENGINE_CALLS, engine_weights(policy, merge=merge) as weights, torch.inference_mode():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _counted(weights, self)})
            # the prefix cache holds keys and values the old weights computed: a prompt prefix
            # every row shares (a chat template's header) would be served from it for the
            # whole run, while the engine reports the new version. (An adapter's blocks are
            # keyed by its path, new at each sync.)
            self.llm.reset_prefix_cache()

    def generate(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 request: GenerationRequest) -> Rollout:
        from vllm import SamplingParams

        say_ignored_once(policy, request.stop_token_ids)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        longest = max(len(r) for r in rows) + request.max_new_tokens
        if self.max_model_len is not None and longest > self.max_model_len:
            raise ValueError(f"sampling.engine=vllm: a prompt of {longest - request.max_new_tokens} tokens plus "
                             f"max_new_tokens={request.max_new_tokens} exceeds the engine's max_model_len="
                             f"{self.max_model_len} (the policy's max_position_embeddings unless "
                             f"sampling.vllm.max_model_len says otherwise)")
        params = [SamplingParams(
            n=1, max_tokens=request.max_new_tokens, stop_token_ids=list(request.stop_token_ids), detokenize=False,
            temperature=0.0 if request.greedy else request.temperature, top_k=request.top_k or -1,
            top_p=request.top_p, logprobs=None if request.greedy else 0,
            # the run's stop tokens alone: vLLM adds the eos ids of the model's config (its
            # generation config) to every request's stops unless told to ignore them
            ignore_eos=True,
            # one stream per row, from the request's seed: the same rows sample the same
            # tokens whatever else shares the engine's batch
            seed=None if request.greedy else _row_seed(request.seed, row),
        ) for row in range(len(rows))]
        with ENGINE_CALLS:
            outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False,
                                        lora_request=self._lora_request())
        return _rollout(outputs, request, device=prompt_ids.device, with_logp=not request.greedy)

    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
              top_k: int):
        if self.adapter is not None:  # the module sets scores_prompts for a self-teacher it scores here
            raise RuntimeError("the vllm rollout engine holds a LoRA adapter, under which vLLM cannot score prompts "
                               "(vllm-project/vllm#16668): set engine.scores_prompts before it starts")
        if top_k > self.max_logprobs:
            raise ValueError(f"signal.top_k={top_k} exceeds the rollout engine's sampling.vllm.max_logprobs="
                             f"{self.max_logprobs}")
        return prompt_logprob_scores(self.llm, prompt_ids, prompt_mask, response_ids, response_mask, top_k,
                                     "the rollout engine (signal.teacher=self, teacher.engine=vllm)",
                                     lora_request=self._lora_request())

    def token_logp(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                   temperature: float) -> Tensor | None:
        if temperature != 1.0 or self.adapter is not None:
            # its prompt log-probs are the raw distribution's, and under an adapter vLLM
            # cannot compute them (vllm-project/vllm#16668): the lag's diagnostics go unlogged
            return None
        scores = prompt_logprob_scores(self.llm, prompt_ids, prompt_mask, response_ids, response_mask, 0,
                                       "the rollout engine (the lag's diagnostics)", lora_request=self._lora_request())
        return scores.token_logp.to(response_ids.device)

    @property
    def forgets_weights_asleep(self) -> bool:
        return self.use_sleep and self.sleep_level == 2

    def _lora_request(self):
        return self.adapter.request if self.adapter is not None else None

    def sleep(self) -> None:
        if self.use_sleep and self.llm is not None:
            with ENGINE_CALLS:
                self.llm.sleep(level=self.sleep_level)
            self._base_loaded = not self.forgets_weights_asleep  # level 2: the base goes too

    def wake_weights(self) -> None:
        # the weights' memory back first, so a sync fills it before the KV cache takes the rest
        # (vLLM's order for weight updates): the sync's gathered tensors and the KV cache are
        # never resident together
        if self.use_sleep and self.llm is not None:
            # the training step's freed activations sit in torch's cache, which the engine's own
            # allocator cannot take: hand them back to the device first (as verl does)
            torch.cuda.empty_cache()
            with ENGINE_CALLS:
                self.llm.wake_up(tags=["weights"])

    def wake(self) -> None:
        if self.use_sleep and self.llm is not None:
            with ENGINE_CALLS:
                self.llm.wake_up(tags=["kv_cache"])

    def close(self) -> None:
        shut_down(self.llm)
        self.llm = None
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None


def _counted(weights, engine: VLLMEngine):
    """The weights as they pass, their bytes added to the engine's ``sync_bytes``."""
    for name, tensor in weights:
        engine.sync_bytes += tensor.numel() * tensor.element_size()
        yield name, tensor


def _row_seed(seed: int, row: int) -> int:
    return (seed * 1_000_003 + row) % (2**63 - 1)


def _version() -> str:
    import vllm

    return vllm.__version__


def _rollout(outputs, request: GenerationRequest, device: torch.device, with_logp: bool) -> Rollout:
    """vLLM's completions as right-padded [B, R] tensors."""
    completions = [o.outputs[0] for o in outputs]
    width = max(1, max(len(c.token_ids) for c in completions))
    ids = torch.full((len(completions), width), request.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    logp = torch.zeros((len(completions), width), dtype=torch.float32)
    for row, c in enumerate(completions):
        n = len(c.token_ids)
        ids[row, :n] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[row, :n] = 1
        if with_logp:
            logp[row, :n] = torch.tensor([step[token].logprob for step, token in zip(c.logprobs, c.token_ids)])
    return Rollout(ids.to(device), mask.to(device), logp.to(device) if with_logp else None)
