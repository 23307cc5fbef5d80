"""Choosing an op implementation: the Triton kernel or the torch reference.

Rules (one for every op):
- ``MACA_INFER_OPS_IMPL=reference``: the torch reference, always.
- ``MACA_INFER_OPS_IMPL=triton``: the Triton kernel, or an error saying why it
  cannot run (triton missing; CPU tensors without ``TRITON_INTERPRET=1``).
  An explicit request never falls back.
- ``auto`` (default): the Triton kernel when the tensors live on a device
  (real MACA or a CUDA stand-in) and triton imports; the reference otherwise
  (the emulated maca device). If an auto-picked kernel fails to build or
  launch, the reference runs instead and one log line says so.

Empty batches (zero tokens or sequences: an idle SGLang DP-attention rank,
padding) go through the same selection but run neither implementation:
``dispatch(..., empty=True)``. A Triton launch with a grid of 0 programs is an
error on some Triton versions and a no-op on others, and a reference may
reduce over nothing; each public op instead returns its empty outputs itself,
after validating its inputs as for any batch.

``last_impl(op)`` tells which implementation ran (or was chosen, for an empty
batch) last for an op (tests and the doctor read it).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch

from maca_infer.common import envs
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

REFERENCE = "reference"
TRITON = "triton"

_last: dict[str, str] = {}
_broken: set[str] = set()  # ops whose auto-picked kernel failed once


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _on_device(tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tensors)


def select_impl(op: str, *tensors: torch.Tensor) -> str:
    """Which implementation of ``op`` runs for these tensors (see module doc)."""
    forced = envs.ops_impl()
    if forced == REFERENCE:
        return REFERENCE
    on_device = _on_device(tensors)
    if forced == TRITON:
        if not triton_available():
            raise RuntimeError(
                f"{op}: MACA_INFER_OPS_IMPL=triton but triton is not importable; "
                "install triton or use MACA_INFER_OPS_IMPL=reference"
            )
        if not on_device and not envs.triton_interpret():
            devices = sorted({t.device.type for t in tensors if isinstance(t, torch.Tensor)})
            raise ValueError(
                f"{op}: MACA_INFER_OPS_IMPL=triton needs device tensors, got tensors on {devices}; "
                "set TRITON_INTERPRET=1 to run the Triton kernel on CPU, or use the reference"
            )
        return TRITON
    if on_device and op not in _broken:
        if triton_available():
            return TRITON
        log_once(logger, logging.WARNING, "triton is not importable: ops run as torch references")
    return REFERENCE


def dispatch(op: str, triton_fn: Callable | None, reference_fn: Callable, tensors, *args, empty: bool = False,
             **kwargs):
    """Run ``op`` with the implementation ``select_impl`` picks.

    ``tensors`` are the inputs that decide the device; ``args``/``kwargs`` go
    to the chosen function. ``triton_fn`` may be None for ops that have no
    kernel yet: then only the reference exists, and forcing triton raises.
    ``empty``: the batch has no tokens; the implementation is chosen (so a
    misconfigured tier still raises) but not run, and None is returned.
    """
    impl = select_impl(op, *tensors)
    if impl == TRITON and triton_fn is None:
        if envs.ops_impl() == TRITON:
            raise RuntimeError(f"{op}: no Triton kernel exists for this op; only the reference")
        impl = REFERENCE
    if empty:
        _record(op, impl)
        return None
    if impl == TRITON:
        try:
            out = triton_fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - auto mode falls back, explicit re-raises
            if envs.ops_impl() == TRITON:
                raise
            _broken.add(op)
            log_once(logger, logging.WARNING, "%s: Triton kernel failed (%s: %s); the torch reference runs instead",
                     op, type(exc).__name__, exc)
            impl = REFERENCE
        else:
            _record(op, TRITON)
            return out
    _record(op, REFERENCE)
    return reference_fn(*args, **kwargs)


def _record(op: str, impl: str) -> None:
    # which tier served an op, one debug line per change (MACA_INFER_LOG_LEVEL=debug shows it in servers)
    if _last.get(op) != impl:
        logger.debug("%s runs on %s", op, impl)
    _last[op] = impl


def last_impl(op: str) -> str | None:
    return _last.get(op)
