"""Input validation shared by every op: one message style for bad input.

Each check raises ``ValueError`` naming the op, the argument, the value found
and what is allowed.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; allowed: {_names(allowed)}")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dtypes = {n: t.dtype for n, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        found = ", ".join(f"{n}={str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise ValueError(f"{op}: dtypes must match, got {found}")


def check_dim(op: str, name: str, t: torch.Tensor, ndim: int | Sequence[int], layout: str) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in allowed:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")


def check_size(op: str, name: str, got: int, expected: int, what: str) -> None:
    if got != expected:
        raise ValueError(f"{op}: {name} has {what} {got}, expected {expected}")


def check_in(op: str, name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()}); call .contiguous()")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len({d.type for d in devices.values()}) > 1:
        found = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {found}")


def check_block_size(op: str, block_size: int, minimum: int = 8) -> None:
    if block_size < minimum or block_size & (block_size - 1):
        raise ValueError(f"{op}: block_size={block_size} is not supported; allowed: powers of two >= {minimum} (8, 16, 32, 64, ...)")


def check_head_dim(op: str, name: str, head_dim: int, allowed: Sequence[int]) -> None:
    if head_dim not in allowed:
        raise ValueError(f"{op}: {name}={head_dim} is not supported; allowed: {', '.join(map(str, allowed))}")
