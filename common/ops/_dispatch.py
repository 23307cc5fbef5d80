"""Choosing an op implementation: MetaX's vendor kernel, the Triton kernel or the torch reference.

Three tiers, tried in this order by ``auto``: ``vendor`` (MetaX's own
libraries: flash_attn, flash_mla, mcoplib; ``vendor.py`` marshals each call),
``triton``, ``reference``.

Rules (one for every op):
- ``MACA_INFER_OPS_IMPL=reference``: the torch reference, always.
- ``MACA_INFER_OPS_IMPL=vendor``: the vendor kernel, on any device where the
  vendor library imports (CPU tests put fakes of it on the path), or an error
  saying why it cannot serve the call (library missing; a dtype, head dim or
  page size it does not take; an op without a vendor kernel).
- ``MACA_INFER_OPS_IMPL=triton``: the Triton kernel, or an error saying why it
  cannot run (triton missing; CPU tensors without ``TRITON_INTERPRET=1``).
  An explicit request never falls back.
- ``auto`` (default): on a real MACA device, the vendor kernel when its
  library imports and it serves the call (else the next tier, one debug line
  per op and reason; a vendor kernel that *fails* raises, naming the op and
  its inputs). Then the Triton
  kernel when the tensors live on a device
  (real MACA or a CUDA stand-in) and triton imports; the reference otherwise
  (the emulated maca device). If an auto-picked kernel fails to build or
  launch on a device, that is an error naming the op, the input shapes and
  the cause: a silent switch to the reference is a 10-100x slowdown nobody
  sees. ``MACA_INFER_OPS_FALLBACK=1`` allows the switch: the reference runs,
  with one WARNING per op and reason, and the op stays on the reference.
  On the emulated device (no accelerator) a failing kernel still falls back
  with a log line, as before.

Empty batches (zero tokens or sequences: an idle SGLang DP-attention rank,
padding) go through the same selection but run neither implementation:
``dispatch(..., empty=True)``. A Triton launch with a grid of 0 programs is an
error on some Triton versions and a no-op on others, and a reference may
reduce over nothing; each public op instead returns its empty outputs itself,
after validating its inputs as for any batch.

``last_impl(op)`` tells which implementation ran (or was chosen, for an empty
batch) last for an op, ``tiers()`` the same for every op that ran, and
``fallbacks()`` every kernel failure that fell back to the reference (the
doctor and ``bench ops`` show both).
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
VENDOR = "vendor"
TIERS = (VENDOR, TRITON, REFERENCE)


class CannotServe(Exception):
    """Raised by a vendor marshaller (``vendor.py``) before it launches anything: the message says why."""

_last: dict[str, str] = {}
_broken: set[str] = set()  # ops whose auto-picked kernel failed once
_fallbacks: list[dict[str, str]] = []  # {"op", "reason", "shapes", "device"}, one per (op, reason)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _on_device(tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tensors)


def select_impl(op: str, *tensors: torch.Tensor, vendor: bool = False) -> str:
    """Which implementation of ``op`` runs for these tensors (see module doc).

    ``vendor``: the op has a vendor tier. ``vendor`` is only a first choice:
    ``dispatch`` moves on to the next tier when the vendor cannot serve a call
    in ``auto``.
    """
    forced = envs.ops_impl()
    if forced == REFERENCE:
        return REFERENCE
    if forced == VENDOR:
        if not vendor:
            raise RuntimeError(f"{op}: MACA_INFER_OPS_IMPL=vendor but MetaX's libraries have no kernel for this op; "
                               "use auto, triton or reference")
        return VENDOR
    on_device = _on_device(tensors)
    if forced != TRITON and vendor and on_device and _device_kind() == "maca":
        return VENDOR
    return _kernel_or_reference(op, tensors, on_device)


def _kernel_or_reference(op: str, tensors, on_device: bool) -> str:
    forced = envs.ops_impl()
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


def dispatch(op: str, triton_fn: Callable | None, reference_fn: Callable, tensors, *args,
             vendor_fn: Callable | None = None, empty: bool = False, impl: str | None = None, **kwargs):
    """Run ``op`` with the implementation ``select_impl`` picks.

    ``tensors`` are the inputs that decide the device; ``args``/``kwargs`` go
    to the chosen function. ``triton_fn`` may be None for ops that have no
    kernel yet: then only the reference exists, and forcing triton raises.
    ``vendor_fn`` (same arguments) marshals the call to MetaX's library or
    raises :class:`CannotServe` before launching anything; None: no vendor tier.
    ``empty``: the batch has no tokens; the implementation is chosen (so a
    misconfigured tier still raises) but not run, and None is returned.
    ``impl``: the tier ``select_impl`` already chose for such tensors (an
    attention plan chooses once per batch, for all its layers); None: choose
    now. A Triton kernel that has since failed and fallen back is chosen again.
    """
    if impl is None or (impl == TRITON and op in _broken):
        impl = select_impl(op, *tensors, vendor=vendor_fn is not None)
    if impl == VENDOR:
        if empty:
            _record(op, VENDOR)
            return None
        try:
            out = vendor_fn(*args, **kwargs)
        except CannotServe as exc:
            if envs.ops_impl() == VENDOR:
                raise RuntimeError(f"{op}: MACA_INFER_OPS_IMPL=vendor cannot serve this call: {exc}. "
                                   "Use auto (falls through to triton) or MACA_INFER_OPS_IMPL=triton|reference"
                                   ) from exc
            log_once(logger, logging.DEBUG, "%s: the vendor kernel cannot serve this call (%s); next tier", op, exc)
            impl = _kernel_or_reference(op, tensors, _on_device(tensors))
        except Exception as exc:  # noqa: BLE001 - name the op and inputs; never a silent switch of tier
            raise RuntimeError(
                f"{op}: MetaX's vendor kernel failed on inputs [{_describe_inputs(tensors)}]: "
                f"{type(exc).__name__}: {exc}. MACA_INFER_OPS_IMPL=triton runs maca-infer's Triton kernel instead"
            ) from exc
        else:
            _record(op, VENDOR)
            return out
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
        except Exception as exc:  # noqa: BLE001 - auto mode may fall back (see module doc), explicit re-raises
            if envs.ops_impl() == TRITON:
                raise
            _fall_back_or_raise(op, tensors, exc)
            impl = REFERENCE
        else:
            _record(op, TRITON)
            return out
    _record(op, REFERENCE)
    return reference_fn(*args, **kwargs)


def _describe_inputs(tensors) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
                     for t in tensors if isinstance(t, torch.Tensor)) or "no tensors"


def _device_kind() -> str:
    from maca_infer.common.device import detect

    try:
        return detect.resolve().kind
    except (RuntimeError, ValueError):  # a misconfigured device: treat it as a device (strict)
        return "unresolved"


def _fall_back_or_raise(op: str, tensors, exc: Exception) -> None:
    """An auto-picked kernel failed: raise on a device unless allowed; else record and warn."""
    reason = f"{type(exc).__name__}: {exc}"
    shapes = _describe_inputs(tensors)
    kind = _device_kind()
    if kind != "emulated" and not envs.ops_fallback_allowed():
        raise RuntimeError(
            f"{op}: the Triton kernel failed on inputs [{shapes}] ({kind} device): {reason}. "
            "Set MACA_INFER_OPS_FALLBACK=1 to run the torch reference instead (10-100x slower), "
            "or MACA_INFER_OPS_IMPL=reference for every op"
        ) from exc
    _broken.add(op)
    if not any(f["op"] == op and f["reason"] == reason for f in _fallbacks):
        _fallbacks.append({"op": op, "reason": reason, "shapes": shapes, "device": kind})
    log_once(logger, logging.WARNING, "%s: Triton kernel failed (%s); the torch reference runs instead%s",
             op, reason, "" if kind == "emulated" else " (MACA_INFER_OPS_FALLBACK=1)")


def fallbacks() -> list[dict[str, str]]:
    """Every auto-picked kernel failure that fell back to the reference in this process (copies)."""
    return [dict(f) for f in _fallbacks]


def tiers() -> dict[str, str]:
    """op -> the implementation (vendor / triton / reference) that served it last, for every op that ran here."""
    return dict(sorted(_last.items()))


def _record(op: str, impl: str) -> None:
    # which tier served an op, one debug line per change (MACA_INFER_LOG_LEVEL=debug shows it in servers)
    if _last.get(op) != impl:
        logger.debug("%s runs on %s", op, impl)
    _last[op] = impl


def last_impl(op: str) -> str | None:
    return _last.get(op)
