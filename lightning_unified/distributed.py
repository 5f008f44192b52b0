"""Process-group hygiene: the rollout engines, then the process group, go down before the
interpreter does."""

from __future__ import annotations

import atexit

import torch.distributed as dist

from lightning_unified.rollouts import close_all as close_all_engines

_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Tear the process group down before the interpreter does. Lightning registers this only
    for NCCL; a gloo group left to interpreter shutdown (ddp_spawn workers exit through
    sys.exit) can abort with "terminate called without an active exception"."""
    global _REGISTERED
    if _REGISTERED or not (dist.is_available() and dist.is_initialized()):
        return
    atexit.register(_destroy_process_group)
    _REGISTERED = True


def _destroy_process_group() -> None:
    # a run closes its engine when it ends (config.train); one left open (a module used from
    # Python, a run that failed) closes here, while the group its teardown needs still exists
    close_all_engines()
    if dist.is_initialized():
        dist.destroy_process_group()
