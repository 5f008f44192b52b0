"""Peak memory of this process for the benchmark scripts: the CUDA allocator's peak on a GPU,
the process's high-water mark (VmHWM, after resetting it) on a CPU."""

from __future__ import annotations

import torch


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets the process's peak RSS (VmHWM)
            f.write("5")


def memory_now(device: str) -> tuple[int, int]:
    """(current, peak) bytes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    return process_memory("self")


def process_memory(pid: int | str = "self") -> tuple[int, int]:
    """(resident, peak resident) bytes of process ``pid``, from /proc (Linux)."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]
