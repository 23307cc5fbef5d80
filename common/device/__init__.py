"""maca_infer.common.device: what the maca device is on this host.

Public API (stable; adapters and ops rely on it):
    resolve() -> Resolution        cached; kind in {"maca", "cuda-standin", "emulated"}
    torch_device() -> torch.device  "cuda" on a device, "cpu" when emulated
    is_emulated() -> bool
    activate() -> Resolution       env setup + emulation when emulated; idempotent
    deactivate()                   undo the emulation (stock torch again)

With ``MACA_INFER_DEVICE=emulated`` the emulation is installed while
``import torch`` runs (the ``torch.backends`` autoload hook), before any
framework module binds ``torch.cuda.Stream`` and friends. Calling
``activate()`` by hand works too, but only code imported afterwards sees the
emulated names it bound at import (``from torch.cuda import Stream``); so
activate before importing the framework, or use the variable (it also
reaches worker subprocesses). ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` turns the
hook off.

Importing this package is cheap (no torch): the autoload hook imports it in
every process.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from maca_infer.common.device.detect import KINDS, Resolution, resolve

if TYPE_CHECKING:
    import torch

__all__ = ["KINDS", "Resolution", "resolve", "torch_device", "is_emulated", "activate", "deactivate"]

_activate_lock = threading.RLock()


def torch_device() -> "torch.device":
    """The torch device that holds maca tensors: ``cuda``, or ``cpu`` when emulated."""
    import torch

    return torch.device(resolve().torch_device)


def is_emulated() -> bool:
    return resolve().kind == "emulated"


def activate(framework: str | None = None, graph_mode: bool | None = None) -> Resolution:
    """Make this process ready to use the maca device; idempotent.

    framework: "lmdeploy", "sglang", "hf" or None: which of MetaX's
    recommended env knobs to add (only on a real MACA host); graph_mode:
    add the graph-launch knob (default: MACA_INFER_GRAPH_MODE).

    Sets up the environment (toolkit paths, visible devices; never
    overwriting what the user set) and, when the device resolves to
    ``emulated``, installs the CPU emulation. On a MACA host the fixes of
    ``maca_fixes.py`` are applied (ledgered runtime patches); on a CUDA host
    torch is left untouched.
    """
    from maca_infer.common import envs
    from maca_infer.common.device import emulation
    from maca_infer.common.device.env import apply_env

    with _activate_lock:
        resolution = resolve()
        if graph_mode is None:
            graph_mode = envs.graph_mode()
        # the emulation first: an env error (say, conflicting visible-device
        # lists) is raised, but must not leave a CPU host without its device
        if resolution.kind == "emulated" and not emulation.is_installed():
            emulation.install()
        apply_env(framework, graph_mode, vendor_knobs=resolution.kind == "maca")
        if resolution.kind == "maca":
            from maca_infer.common.device import maca_fixes

            maca_fixes.apply()  # torch fixes for MetaX's stack (cuDNN SDPA off), once per process
        return resolution


def deactivate() -> int:
    """Undo the emulation (no-op elsewhere); returns how many patches were undone."""
    from maca_infer.common.device import emulation

    with _activate_lock:
        return emulation.uninstall()
