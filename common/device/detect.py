"""Device resolution: what the maca device is on this host.

Three kinds of host (docs/architecture.md, "The device: one resolution"):

=============  ==========================================  ============
kind           evidence                                    torch device
=============  ==========================================  ============
maca           ``torch.version.maca`` set (mcPyTorch) and   ``cuda``
               ``torch.cuda.is_available()``
cuda-standin   ``torch.cuda.is_available()`` without        ``cuda``
               ``torch.version.maca`` (an NVIDIA GPU)
emulated       neither: the CPU plays the maca device       ``cpu``
=============  ==========================================  ============

``MACA_INFER_DEVICE`` (auto|maca|cuda|emulated, read through
``common/envs.py``) overrides auto-detection. An explicit ``maca`` or
``cuda`` on a host without one is a ``RuntimeError`` that lists what was
looked for and what was found; it never falls back.

``MACA_PATH`` (default ``/opt/maca``) and ``mx-smi`` are reported as
evidence; they do not decide the kind: mcPyTorch with a visible device is
what makes tensors land on a MetaX GPU.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass

from maca_infer.common import envs

KINDS = ("maca", "cuda-standin", "emulated")
DEFAULT_MACA_PATH = "/opt/maca"
EMULATED_DEVICE_NAME = "MetaX C500 (emulated on CPU)"


@dataclass(frozen=True)
class Evidence:
    """What detection looked at, for the reason string and the doctor."""

    torch_version_maca: str | None  # mcPyTorch sets torch.version.maca
    cuda_available: bool  # the stock torch.cuda.is_available(), never the emulated one
    cuda_device_count: int
    maca_path: str  # $MACA_PATH or the default
    maca_path_exists: bool
    mx_smi: str | None  # path of mx-smi on PATH or under $MACA_PATH/bin

    def describe(self) -> str:
        maca = repr(self.torch_version_maca) if self.torch_version_maca else "not set"
        tree = "found" if self.maca_path_exists else "missing"
        return (
            f"torch.version.maca={maca}; torch.cuda.is_available()={self.cuda_available}"
            f" ({self.cuda_device_count} device(s)); MACA_PATH={self.maca_path} ({tree});"
            f" mx-smi={self.mx_smi or 'not found'}"
        )


@dataclass(frozen=True)
class Resolution:
    """The answer of :func:`resolve`.

    ``kind`` is one of ``KINDS``; ``torch_device`` is ``"cuda"`` on a device
    and ``"cpu"`` when emulated; ``reason`` says which evidence decided.
    """

    kind: str
    reason: str
    torch_device: str
    device_name: str
    evidence: Evidence | None = None

    @property
    def is_emulated(self) -> bool:
        return self.kind == "emulated"


_lock = threading.Lock()
_cached: Resolution | None = None


def maca_path() -> str:
    """``$MACA_PATH`` or the toolkit's default install location."""
    return envs.maca_path(DEFAULT_MACA_PATH)


def find_mx_smi(root: str | None = None) -> str | None:
    """``mx-smi`` on PATH, else under ``<MACA_PATH>/bin``; None when absent."""
    found = shutil.which("mx-smi")
    if found:
        return found
    candidate = os.path.join(root or maca_path(), "bin", "mx-smi")
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    return None


def _stock_cuda_query() -> tuple[bool, int]:
    """The real torch.cuda.is_available()/device_count(), even under emulation."""
    import torch

    from maca_infer.common.device._patch import PATCHES

    is_available = PATCHES.original(torch.cuda, "is_available")
    device_count = PATCHES.original(torch.cuda, "device_count")
    available = bool(is_available())
    return available, int(device_count()) if available else 0


def gather_evidence() -> Evidence:
    import torch

    root = maca_path()
    available, count = _stock_cuda_query()
    version_maca = getattr(torch.version, "maca", None) or None
    return Evidence(
        torch_version_maca=str(version_maca) if version_maca else None,
        cuda_available=available,
        cuda_device_count=count,
        maca_path=root,
        maca_path_exists=os.path.isdir(root),
        mx_smi=find_mx_smi(root),
    )


def _device_name(evidence: Evidence) -> str:
    import torch

    from maca_infer.common.device._patch import PATCHES

    get_name = PATCHES.original(torch.cuda, "get_device_name")
    try:
        return str(get_name(0))
    except Exception as exc:  # a broken driver still resolves; the name says why
        return f"unknown ({type(exc).__name__}: {exc})"


def _decide(requested: str, evidence: Evidence) -> Resolution:
    seen = evidence.describe()
    is_mcpytorch = evidence.torch_version_maca is not None
    if requested == "emulated":
        note = ""
        if evidence.cuda_available:
            note = " (a device is present but emulation was asked for)"
        return Resolution(
            "emulated",
            f"MACA_INFER_DEVICE=emulated{note}: the CPU plays the maca device. Found: {seen}",
            "cpu",
            EMULATED_DEVICE_NAME,
            evidence,
        )
    if requested == "maca":
        if is_mcpytorch and evidence.cuda_available:
            return Resolution(
                "maca",
                f"MACA_INFER_DEVICE=maca: mcPyTorch with a visible MetaX device. Found: {seen}",
                "cuda",
                _device_name(evidence),
                evidence,
            )
        missing = []
        if not is_mcpytorch:
            missing.append("torch.version.maca (MetaX's mcPyTorch build of torch)")
        if not evidence.cuda_available:
            missing.append("a visible device (torch.cuda.is_available())")
        raise RuntimeError(
            "MACA_INFER_DEVICE=maca but this host has no MetaX MACA device: missing "
            + " and ".join(missing)
            + f". Looked for torch.version.maca, the MACA_PATH tree and mx-smi; found: {seen}."
            " Install MetaX's mcPyTorch and driver (mx-smi should list the GPUs), or set"
            " MACA_INFER_DEVICE=auto (or emulated) to run on CPU."
        )
    if requested == "cuda":
        if evidence.cuda_available:
            return Resolution(
                "cuda-standin",
                f"MACA_INFER_DEVICE=cuda: a CUDA device stands in for the maca device. Found: {seen}",
                "cuda",
                _device_name(evidence),
                evidence,
            )
        raise RuntimeError(
            "MACA_INFER_DEVICE=cuda but torch.cuda.is_available() is False"
            f" (torch {_torch_version()}, built for CUDA {_torch_cuda_version()}). Found: {seen}."
            " Use a host with a GPU and a CUDA build of torch, or set MACA_INFER_DEVICE=auto"
            " (or emulated) to run on CPU."
        )
    # auto
    if is_mcpytorch and evidence.cuda_available:
        return Resolution(
            "maca",
            f"auto: mcPyTorch with a visible MetaX device. Found: {seen}",
            "cuda",
            _device_name(evidence),
            evidence,
        )
    if evidence.cuda_available:
        return Resolution(
            "cuda-standin",
            f"auto: a CUDA device without mcPyTorch stands in for the maca device. Found: {seen}",
            "cuda",
            _device_name(evidence),
            evidence,
        )
    why = "mcPyTorch is installed but sees no device" if is_mcpytorch else "no accelerator"
    return Resolution(
        "emulated",
        f"auto: {why}, so the CPU plays the maca device (emulated). Found: {seen}",
        "cpu",
        EMULATED_DEVICE_NAME,
        evidence,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__


def _torch_cuda_version() -> str:
    import torch

    return str(torch.version.cuda)


def resolve(refresh: bool = False) -> Resolution:
    """What the maca device is on this host (cached per process).

    Raises ``ValueError`` for a bad ``MACA_INFER_DEVICE`` value and
    ``RuntimeError`` when an explicitly requested device is absent.
    ``refresh=True`` re-reads the environment and the host.
    """
    global _cached
    # torch first, outside the lock: importing it runs our torch.backends autoload, which resolves too
    # (the same thread would wait on itself); inside that autoload torch is already in sys.modules.
    import torch  # noqa: F401

    with _lock:
        if _cached is not None and not refresh:
            return _cached
        requested = envs.device_override()
        resolution = _decide(requested, gather_evidence())
        _cached = resolution
        return resolution


def clear_cache() -> None:
    global _cached
    with _lock:
        _cached = None
