"""Entry point ``sglang.srt.platforms: maca``: decide whether SGLang runs on maca.

SGLang calls :func:`activate` while it resolves ``current_platform`` (early:
during the import of ``sglang.srt.utils.common``) in every process. It returns
the platform class path only when this process should run on the maca device:

- ``SGLANG_PLATFORM=maca`` forces it (an impossible device then raises);
- a real MetaX device (``resolve().kind == "maca"``) selects it;
- ``MACA_INFER_DEVICE=emulated`` / ``cuda`` (an explicit request) selects the
  emulated device or the CUDA stand-in.

Anything else (a CPU host with MACA_INFER_DEVICE unset, an NVIDIA host) gets
``None``, so installing maca-infer never hijacks an ordinary SGLang launch.

The class is chosen here, once, from the device resolution: ``MacaSRTPlatform``
for a real device (MetaX GPU, CUDA stand-in), its subclass
``MacaEmulatedSRTPlatform`` for the emulated one (:func:`platform_class_for`).
"""

from __future__ import annotations

import logging

from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

PLATFORM_CLASS = "maca_infer.adapters.sglang.platform.MacaSRTPlatform"
EMULATED_PLATFORM_CLASS = "maca_infer.adapters.sglang.platform_emulated.MacaEmulatedSRTPlatform"
ENTRY_POINT_NAME = "maca"


def should_activate() -> tuple[bool, str]:
    """(activate?, why) for this process; raises only when maca is forced and impossible."""
    from maca_infer.common import envs
    from maca_infer.common.device import resolve

    # SGLang's own selector variable: it names an entry point of its group.
    forced = envs.sglang_platform() == ENTRY_POINT_NAME
    requested = envs.device_override()
    # an explicit MACA_INFER_DEVICE that cannot be met raises: the user's error to see
    resolution = resolve()
    if forced:
        return True, f"SGLANG_PLATFORM={ENTRY_POINT_NAME} ({resolution.kind})"
    if resolution.kind == "maca":
        return True, "a MetaX MACA device was found"
    if requested != "auto":
        return True, f"MACA_INFER_DEVICE={requested} ({resolution.kind})"
    return False, f"maca device not requested (auto resolved to {resolution.kind})"


def activate() -> str | None:
    ok, why = should_activate()
    if not ok:
        logger.debug("SGLang platform 'maca' stays inactive: %s", why)
        return None
    from maca_infer.common import versions

    from maca_infer.common.device import resolve

    versions.require("sglang")
    kind = resolve().kind
    _prepare_process(kind)
    log_once(logger, logging.INFO, "SGLang platform 'maca' active: %s", why)
    return platform_class_for(kind)


def platform_class_for(kind: str) -> str:
    """The platform class path for a resolved device kind (SGLang imports it after activate)."""
    return EMULATED_PLATFORM_CLASS if kind == "emulated" else PLATFORM_CLASS


def _prepare_process(kind: str) -> None:
    """Per-process setup before SGLang's modules read the device (before the class is imported)."""
    from maca_infer.common.device import activate

    if kind == "emulated":
        _leave_torch_cuda_alone_for_sglang()
    else:
        activate(framework="sglang")  # MACA_PATH tree, visible devices, MetaX's SGLang knobs


def _leave_torch_cuda_alone_for_sglang() -> None:
    """On the emulated device SGLang runs on CPU tensors, not on an emulated torch.cuda.

    SGLang's in-tree ``is_cuda()`` is ``torch.cuda.is_available() and
    torch.version.cuda``; when the torch.cuda emulation answers True, dozens
    of SGLang modules import sgl_kernel / flashinfer at import time (CUDA-only
    wheels). SGLang's platform seam already lets the maca device be the CPU
    (device "cpu", dispatch key "maca", our ops), so in SGLang processes the
    torch.cuda emulation (installed by the torch.backends autoload when
    MACA_INFER_DEVICE=emulated) is switched off before those modules load.
    This runs from SGLang's platform resolution, which happens during the
    import of ``sglang.srt.utils.common``, before ``is_cuda`` is first
    evaluated.
    """
    from maca_infer.common.device import deactivate, emulation

    if emulation.is_installed():
        deactivate()
        log_once(logger, logging.INFO,
                 "SGLang on the emulated maca device: torch.cuda emulation off in this process "
                 "(SGLang runs on CPU tensors through the maca platform)")
