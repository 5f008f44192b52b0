"""The package's vLLM plugin: registers the ``lu_gloo`` and ``lu_nccl`` weight-transfer
backends with vLLM's factories, in every process that loads plugins (the API server, the engine core, each
worker). Declared in setup.cfg as the ``vllm.general_plugins`` entry point
``lightning_unified``, so an installed package makes ``--weight-transfer-config
'{"backend": "lu_gloo"}'`` work with no extra step."""

from __future__ import annotations

# backend: (module, worker engine class, trainer engine class)
BACKENDS = {
    "lu_gloo": ("lightning_unified.engines.transfer.gloo", "GlooWeightTransferEngine",
                "GlooTrainerWeightTransferEngine"),
    "lu_nccl": ("lightning_unified.engines.transfer.nccl", "CheckedNCCLWeightTransferEngine",
                "CheckedNCCLTrainerWeightTransferEngine"),
}


def register() -> None:
    """Register ``lu_gloo`` and ``lu_nccl`` on both sides; a no-op for a name already
    registered (vLLM loads plugins several times per process tree, and a trainer calls this
    itself)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    # lazily, by module path: a process that never transfers weights imports nothing more
    for name, (module, worker, trainer) in BACKENDS.items():
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, module, worker)
        if name not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine(name, module, trainer)
