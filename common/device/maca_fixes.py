"""Fixes for torch on a real MetaX MACA host (none apply elsewhere).

Each fix is a runtime patch of the one helper (common/patching.py): declared
here, applied by :func:`apply` (``common.device.activate()`` on a MACA host,
and the HF adapter's ``activate()``), undone by :func:`undo`. Each applied
fix is logged once.

- cuDNN scaled-dot-product attention off: MetaX's CUDA-compatible stack does
  not provide a working cuDNN SDPA path (the same switch vLLM-metax makes;
  huggingface/diffusers#9704 shows the failure it causes in pipelines).
"""

from __future__ import annotations

from maca_infer.common.log import get_logger
from maca_infer.common.patching import LEDGER
from maca_infer.common.versions import range_of

logger = get_logger(__name__)

CUDNN_SDPA_OFF = LEDGER.declare(
    "torch.backends.cuda.enable_cudnn_sdp",
    owner="device",
    why="no working cuDNN SDPA on MACA: MetaX's CUDA-compatible stack lacks that path, and "
        "scaled_dot_product_attention picking it fails (as vLLM-metax notes; see huggingface/diffusers#9704)",
    how="torch.backends.cuda.enable_cudnn_sdp(False) on a MACA host (the previous setting is restored on undo); "
        "SDPA then uses its flash / memory-efficient / math kernels",
    versions=f"{range_of('torch')} (MetaX mcPyTorch builds)",
    remove_when="MetaX's mcPyTorch ships a working cuDNN SDPA backend",
)


def _cudnn_sdpa_off():
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    return lambda: torch.backends.cuda.enable_cudnn_sdp(before)


_FIXES = ((CUDNN_SDPA_OFF, _cudnn_sdpa_off, "cuDNN SDPA disabled (torch.backends.cuda.enable_cudnn_sdp(False))"),)


def apply() -> list[str]:
    """Apply the MACA fixes not yet in effect; returns what was applied now (each logged)."""
    applied = []
    for record, do, what in _FIXES:
        if LEDGER.is_applied(record.target):
            continue
        LEDGER.apply(record, do)
        message = f"{what}: {record.why}"
        logger.info("MACA workaround: %s", message)
        applied.append(message)
    return applied


def undo() -> int:
    """Undo the MACA fixes in effect (tests); returns how many."""
    count = 0
    for record, _, _ in _FIXES:
        if LEDGER.is_applied(record.target):
            LEDGER.undo(record.target)
            count += 1
    return count
