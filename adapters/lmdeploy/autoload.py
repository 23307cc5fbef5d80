"""``torch.backends`` entry point of the LMDeploy adapter.

Torch imports it at the end of ``import torch`` in every process
(TORCH_DEVICE_BACKEND_AUTOLOAD), which is how LMDeploy's engine, checker and
api_server children get maca-infer's ``dlinfer`` and LMDeploy fixes. It only
installs two ``sys.meta_path`` finders (no framework import, no version
check, nothing happens until something imports ``dlinfer`` or LMDeploy's maca
backend) and it never raises.
"""

from __future__ import annotations


def autoload() -> None:
    try:
        import importlib.util

        if importlib.util.find_spec("lmdeploy") is None:
            return
        from maca_infer.adapters.lmdeploy import install_hooks

        install_hooks()
    except Exception as exc:  # noqa: BLE001 - an entry point must not break `import torch`
        try:
            from maca_infer.common.log import get_logger

            get_logger(__name__).error("LMDeploy adapter hooks not installed: %s: %s", type(exc).__name__, exc)
        except Exception:  # noqa: BLE001
            pass
