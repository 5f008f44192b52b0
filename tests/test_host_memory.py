"""On a CPU, freed heap memory stays with the process for the next step's tensors
(lightning_unified/host_memory.py). Each case runs in its own process: the glibc setting
is process-wide and cannot be undone."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

# A step's 24 MiB tensor, written and freed: how many freed bytes glibc keeps in its heap
# for the next step (mallinfo2's fordblks). With the defaults, a tensor this large comes
# from mmap and goes back to the system when freed, and the next step faults its pages in
# again (the figures: lightning_unified/host_memory.py); kept, it stays in the heap.
CHURN = textwrap.dedent("""
    import ctypes, torch
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    def churn():
        step = torch.ones(6 << 20)
        del step
        return libc.mallinfo2().fordblks
""")
STEP_BYTES = 24 << 20

FIT = textwrap.dedent("""
    import lightning as L
    from lightning_unified.specs import OffPolicy, Sparse
    from tests.lightning_helpers import quiet_trainer, tiny_datamodule, tiny_module
    module = tiny_module(OffPolicy(), Sparse())
    module.keep_freed_host_memory = KEEP
    quiet_trainer(max_steps=1).fit(module, datamodule=tiny_datamodule())
""")

pytestmark = pytest.mark.skipif(sys.platform != "linux" or "libc.so" not in str(ctypes.util.find_library("c")),
                                reason="glibc's allocator only")


def kept_bytes_in_child(script: str, steps: int = 1) -> int:
    """Freed bytes glibc keeps after the last of ``steps`` churns."""
    code = CHURN + script + "\n" + "churn()\n" * (steps - 1) + "print(churn())\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_freed_memory_stays_in_the_heap():
    default = kept_bytes_in_child("")
    kept = kept_bytes_in_child("from lightning_unified.host_memory import keep_freed_host_memory\n"
                               "assert keep_freed_host_memory()\n")
    assert default < STEP_BYTES, default
    assert kept >= STEP_BYTES, kept


def test_a_cpu_fit_keeps_freed_host_memory_unless_told_not_to():
    kept = kept_bytes_in_child(FIT.replace("KEEP", "True"))  # the module's default
    # false gives it back, at every step: glibc's default would keep it from the second on
    # (its mmap threshold rises to the largest block freed)
    default = kept_bytes_in_child("", steps=2)
    released = kept_bytes_in_child(FIT.replace("KEEP", "False"), steps=2)
    assert kept >= STEP_BYTES, kept
    assert default >= STEP_BYTES, default
    assert released < STEP_BYTES, released
