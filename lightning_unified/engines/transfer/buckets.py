"""Tensors packed into flat byte buffers of a bounded size, the same way on both ends of a
transfer: the trainer and the server cut the stream at the same places from the same
metadata, so only the bytes travel, never a description of each bucket."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def bucket_plan(sizes: list[int], bucket_bytes: int) -> list[range]:
    """Consecutive runs of tensor indices, each of at most ``bucket_bytes`` bytes, except a
    tensor larger than that, which is a bucket of its own: so a bucket holds at most
    ``max(bucket_bytes, largest tensor)`` bytes."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets, start, filled = [], 0, 0
    for index, size in enumerate(sizes):
        if filled and filled + size > bucket_bytes:
            buckets.append(range(start, index))
            start, filled = index, 0
        filled += size
    if start < len(sizes):
        buckets.append(range(start, len(sizes)))
    return buckets


def as_bytes(tensor: Tensor) -> Tensor:
    """A contiguous tensor's storage as a flat uint8 view (a copy only if not contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def unpack(buffer: Tensor, names: list[str], shapes: list[list[int]],
           dtypes: list[torch.dtype]) -> Iterator[tuple[str, Tensor]]:
    """The named tensors a packed ``buffer`` holds, as views of it (no copy)."""
    offset = 0
    for name, shape, dtype in zip(names, shapes, dtypes):
        size = tensor_bytes(shape, dtype)
        yield name, buffer[offset:offset + size].view(dtype).view(shape)
        offset += size
    if offset != buffer.numel():
        raise RuntimeError(f"a bucket of {buffer.numel()} bytes held {offset} bytes of tensors: the two ends of the "
                           f"transfer disagree on the tensors' shapes or dtypes")
