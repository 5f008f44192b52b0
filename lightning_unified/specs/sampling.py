"""How on-policy responses are generated: ``data_source.sampling``."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_unified.rules import enforce
from lightning_unified.specs.checks import one_of
from lightning_unified.typecheck import check_fields

BEHAVIOURS = ("tempered", "sampled")
ENGINES = ("hf", "vllm", "server")


@dataclass
class Sampling:
    """How on-policy responses are generated: by which rollout engine (``hf``, the policy's
    own ``generate``; ``vllm``, an engine synced with the policy), with what distribution."""

    # responses per prompt (the group of GRPO / RLOO)
    num_generations: int = 8
    # longest response; None takes the task's (the data module's ``max_new_tokens``)
    max_new_tokens: int | None = None
    # the behaviour log-probs are those of this tempered, truncated distribution
    temperature: float = 1.0
    # nucleus sampling; 1.0 turns it off
    top_p: float = 1.0
    # top-k sampling; 0 turns it off
    top_k: int = 0
    # what behaviour_logp records under top-k / top-p: "tempered", the tempered distribution
    # before truncation (what inference servers report; the ratio to the policy at the
    # sampler's temperature is 1 before any update), or "sampled", the truncated distribution
    # actually sampled from (exact importance weights; the ratio then starts at the kept mass)
    behaviour: str = "tempered"
    # where responses are generated: "hf" (the training model's generate), "vllm" (a vLLM
    # engine in each training process, synced with the policy's weights) or "server" (vLLM
    # servers apart from the trainer, shared by its ranks, pushed the policy's weights)
    engine: str = "hf"
    # the vllm engine's settings: kv_cache_gib, gpu_memory_utilization, dtype, max_model_len,
    # enforce_eager, sleep, sleep_level (see lightning_unified.engines.vllm.VLLMEngine)
    vllm: dict = field(default_factory=dict)
    # the servers' settings: urls, launch, update, timeout_s, push_timeout_s, max_in_flight,
    # transfer, bucket_mb, kv_cache_gib, launch_args, max_model_len, cpu_sets, model, adapter_dir (see
    # lightning_unified.engines.served.ServedEngine)
    server: dict = field(default_factory=dict)
    # sync the engine's weights every this many optimizer steps; > 1 samples from stale
    # weights on purpose (the importance ratio corrects for it)
    sync_every: int = 1
    # 0: sample each batch when it is trained (synchronous). k >= 1: a producer thread
    # samples batch t + k from the weights of step t while the trainer trains on batch t,
    # so every batch is k steps stale (the first k of each epoch less) and the importance
    # ratio corrects for it (lightning_unified.rollouts)
    max_lag: int = 0
    # the producer thread's torch intra-op threads (null: torch's default); with max_lag,
    # splits a CPU's cores between sampling and training
    producer_threads: int | None = None
    # with max_lag, the engine scores each stale batch with the newest weights on the steps
    # Lightning logs (importance/lag_kl and the stale batch's mismatch_kl); false spares the
    # engine that prefill of every row
    lag_diagnostics: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "data_source.sampling")
        if self.num_generations < 1:
            raise ValueError(f"sampling.num_generations must be >= 1, got {self.num_generations}")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        # the command line gives `temperature=2` as an int, which generation's warpers refuse
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        one_of("sampling", "behaviour", self.behaviour, BEHAVIOURS)
        one_of("sampling", "engine", self.engine, ENGINES)
        if self.sync_every < 1:
            raise ValueError(f"sampling.sync_every must be >= 1, got {self.sync_every}")
        if self.max_lag < 0:
            raise ValueError(f"sampling.max_lag must be >= 0, got {self.max_lag}")
        if self.producer_threads is not None and self.producer_threads < 1:
            raise ValueError(f"sampling.producer_threads must be >= 1 or null, got {self.producer_threads}")
        enforce("sampling", self)
