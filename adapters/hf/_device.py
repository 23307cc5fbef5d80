"""The maca device for Transformers and Diffusers users.

``device()`` is the torch device that models and pipelines go to: "cuda" on
MetaX MACA (mcPyTorch) and on an NVIDIA stand-in, "cpu" when the maca device
is emulated. It resolves through ``maca_infer.common.device`` (the one
resolver) and activates it; on a MACA host that applies the device's torch
fixes (``common/device/maca_fixes.py``, e.g. cuDNN SDPA off; logged once).
"""

from __future__ import annotations

import re
import threading

import torch

from maca_infer.common.log import get_logger

logger = get_logger(__name__)

_lock = threading.Lock()
_activated_kind: str | None = None


def activate() -> str:
    """Activate the maca device for HF use (idempotent); returns its kind.

    kind is "maca", "cuda-standin" or "emulated" (see common.device).
    """
    global _activated_kind
    with _lock:
        if _activated_kind is not None:
            return _activated_kind
        from maca_infer.common import device as maca_device

        # env setup (MetaX's HF knobs on a MACA host) and, when emulated, the CPU emulation
        kind = maca_device.activate("hf").kind
        if kind == "maca":
            from maca_infer.common.device import maca_fixes

            maca_fixes.apply()  # no-op when common.device.activate() applied them already
        _activated_kind = kind
        return kind


def device(index: int | None = None) -> torch.device:
    """The torch device the maca device is on this host (activates it).

    Returns torch.device("cuda"[, index]) on MACA or an NVIDIA stand-in and
    torch.device("cpu") when emulated (the index is then ignored).
    """
    activate()
    from maca_infer.common.device import torch_device

    base = torch_device()
    if base.type == "cpu" or index is None:
        return base
    return torch.device(base.type, index)


_MACA_SPEC = re.compile(r"^maca(?::(\d+))?$")


def resolve_device(spec: str | torch.device | int | None = None) -> torch.device:
    """A device argument as our helpers take it: "maca"/"maca:N" mean the maca device.

    None means the maca device too; ints are device indices on it; any other
    string or torch.device is passed to torch.device unchanged.
    """
    if spec is None:
        return device()
    if isinstance(spec, torch.device):
        return spec
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"device index {spec} is not allowed; use an index >= 0 or 'maca'")
        return device(spec)
    if isinstance(spec, str):
        match = _MACA_SPEC.match(spec.strip().lower())
        if match:
            return device(int(match.group(1)) if match.group(1) else None)
        try:
            return torch.device(spec)
        except RuntimeError as exc:
            raise ValueError(f"device {spec!r} is not a device; use 'maca', 'maca:N' or a torch device string") from exc
    raise ValueError(f"device {spec!r} of type {type(spec).__name__} is not allowed; use 'maca', an int or a torch.device")


def device_map(spec: str | torch.device | int | None = None) -> dict[str, str]:
    """A ``device_map`` for ``from_pretrained`` that puts the whole model on the maca device."""
    return {"": str(resolve_device(spec))}


def _reset_for_tests() -> None:
    global _activated_kind
    from maca_infer.common.device import maca_fixes

    with _lock:
        _activated_kind = None
        maca_fixes.undo()
