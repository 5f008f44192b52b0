"""The one reload notice vLLM logs at every weight sync for a layer that holds no weights
(the weights themselves: :mod:`lightning_unified.engines.parameter_copy`)."""

from __future__ import annotations

import logging

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryReloadNotice(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", logged at every weight sync.
    A rotary layer's only tensor is its cos/sin cache, a buffer computed from the config that
    no checkpoint holds; vLLM puts the computed one back, so nothing failed. Every other
    layer's failure still reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.msg == "%s: Failed to load weights" and len(args) == 1
                    and str(args[0]).endswith("RotaryEmbedding"))


def quiet_rotary_reload_notice() -> None:
    """Installs :class:`RotaryReloadNotice` on the logger of vLLM's weight reload, once."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, RotaryReloadNotice) for f in logger.filters):
        logger.addFilter(RotaryReloadNotice())
