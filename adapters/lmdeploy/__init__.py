"""maca_infer.adapters.lmdeploy: LMDeploy's PyTorch engine on the maca device.

LMDeploy, given ``device_type="maca"`` (``--device maca``), imports
``dlinfer`` and calls ``dlinfer.ops.*``. This adapter

- serves ``dlinfer`` for vendor "maca" from maca-infer's ops when no upstream
  dlinfer is installed, or registers the ops upstream lacks into an installed
  one (``MACA_INFER_DLINFER=auto|ours|upstream``, see ``import_hooks.py``);
- fixes LMDeploy 0.18's maca op backend at import time (``lmdeploy_patches.py``;
  every change is a record of the one patch helper, declared in ``patching.py``
  and listed by ``maca-infer patches list --runtime``);
- checks the LMDeploy version (``common/versions.py``).

Nothing here imports LMDeploy: the work happens in import hooks, installed in
every process by the ``torch.backends`` entry point (``autoload.py``) or by
calling :func:`activate` before using LMDeploy.
"""

from __future__ import annotations

import threading

from maca_infer.common import versions
from maca_infer.common.log import get_logger

logger = get_logger(__name__)

_lock = threading.Lock()
_active = False


def install_hooks() -> None:
    """Install the import hooks only (cheap; no version check, imports nothing heavy)."""
    from maca_infer.adapters.lmdeploy import import_hooks

    import_hooks.install()
    hooks = import_hooks.post_import_hooks
    if not hooks.hooks:
        # the callbacks import their modules only when the hooked module loads:
        # this runs inside `import torch`, where importing more of maca-infer is unsafe
        hooks.register(import_hooks.LMDEPLOY_MACA_OP_BACKEND, _apply_lmdeploy_fixes)
        hooks.register("dlinfer", _register_into_upstream_dlinfer)
        hooks.register(import_hooks.LMDEPLOY_ZMQ_ENGINE, _apply_zmq_engine_fix)
        hooks.register(import_hooks.LMDEPLOY_BASE_WORKER, _apply_worker_fix)


def _apply_lmdeploy_fixes(module) -> None:
    from maca_infer.adapters.lmdeploy import lmdeploy_patches

    lmdeploy_patches.apply(module)


def _apply_zmq_engine_fix(module) -> None:
    from maca_infer.adapters.lmdeploy import lmdeploy_patches

    lmdeploy_patches.apply_zmq_engine_fix(module)


def _apply_worker_fix(module) -> None:
    from maca_infer.adapters.lmdeploy import lmdeploy_patches

    lmdeploy_patches.apply_worker_fix(module)


def _register_into_upstream_dlinfer(module) -> None:
    from maca_infer.adapters.lmdeploy import registration

    registration.register_into(module)


def activate() -> str:
    """Make LMDeploy's maca device usable in this process; idempotent.

    Checks the installed LMDeploy against the supported range, installs the
    import hooks, and activates the maca device (the CPU emulation when
    ``MACA_INFER_DEVICE=emulated``). Returns the LMDeploy version.

    Raises:
        RuntimeError: LMDeploy missing or outside the supported range.
    """
    global _active
    with _lock:
        version = versions.require("lmdeploy")
        if _active:
            return version
        from maca_infer.common import device

        device.activate()
        install_hooks()
        _active = True
        logger.debug("LMDeploy %s adapter active", version)
        return version
