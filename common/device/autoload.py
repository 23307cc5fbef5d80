"""The ``torch.backends`` entry point: torch calls :func:`autoload` while
``import torch`` runs, in every process (TORCH_DEVICE_BACKEND_AUTOLOAD), so
framework worker subprocesses get the emulated maca device too.

It acts only when ``MACA_INFER_DEVICE=emulated`` is set; otherwise it returns
at once having imported nothing beyond ``maca_infer.common.envs``. It never
raises: an exception here would make ``import torch`` fail for every
program on the host. A bad ``MACA_INFER_DEVICE`` value is logged as an error
naming the value and the allowed ones (and raises later, from ``resolve()``,
where maca-infer is actually used).
"""

from __future__ import annotations


def autoload() -> None:
    try:
        from maca_infer.common import envs

        try:
            requested = envs.device_override()
        except ValueError as exc:
            from maca_infer.common.log import get_logger

            get_logger(__name__).error("%s (the maca device is not set up in this process)", exc)
            return
        if requested != "emulated":
            return
        from maca_infer.common.device import activate

        activate()
    except Exception as exc:  # never break `import torch`
        try:
            from maca_infer.common.log import get_logger

            get_logger(__name__).error(
                "torch.backends autoload of maca-infer failed: %s: %s (continuing without the maca device setup)",
                type(exc).__name__,
                exc,
            )
        except Exception:
            pass
