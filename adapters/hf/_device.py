"""The maca device for Transformers and Diffusers users.

``device()`` is the torch device that models and pipelines go to: "cuda" on
MetaX MACA (mcPyTorch) and on an NVIDIA stand-in, "cpu" when the maca device
is emulated. It resolves through ``maca_infer.common.device`` (the one
resolver) and activates it, which also applies the MACA workarounds below.

Workarounds applied on real MACA only (logged one line each):
- cuDNN scaled-dot-product attention off: MetaX's CUDA-compatible stack does
  not provide a working cuDNN SDPA path (the same switch vLLM-metax makes,
  see huggingface/diffusers#9704 for the failure it causes in pipelines).
"""

from __future__ import annotations

import re
import threading

import torch

from maca_infer.common.log import get_logger

logger = get_logger(__name__)

_lock = threading.Lock()
_activated_kind: str | None = None

# (what, how to apply, how to undo) for each MACA workaround
_MACA_WORKAROUNDS = (
    (
        "cuDNN SDPA disabled (torch.backends.cuda.enable_cudnn_sdp(False)): no working cuDNN SDPA on MACA "
        "(as vLLM-metax does; see huggingface/diffusers#9704)",
        lambda: torch.backends.cuda.enable_cudnn_sdp(False),
    ),
)


def apply_maca_workarounds() -> list[str]:
    """Apply the MACA-only workarounds; returns what was applied (each logged once)."""
    applied = []
    for what, apply in _MACA_WORKAROUNDS:
        apply()
        logger.info("MACA workaround: %s", what)
        applied.append(what)
    return applied


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
            apply_maca_workarounds()
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
    with _lock:
        _activated_kind = None
