"""Process environment for the maca device: toolkit paths, vendor knobs,
visible devices.

Rules:
- A variable the user set is never overwritten. Path lists (``PATH``,
  ``LD_LIBRARY_PATH``) are extended: missing toolkit dirs are appended
  after the user's entries, so the user's own choices keep precedence.
- Everything set is logged with the reason.
- ``MACA_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES`` are kept in step: the
  MACA runtime reads the first, torch and the frameworks read the second.
  Whichever the user set is copied to the other; both set to different
  values is an error. MetaX's guide spells the first ``MACA_VISIBLE_DEVICE``
  (singular, ``export MACA_VISIBLE_DEVICE=7,5,1,3,4,0,6,2`` after
  ``mx-smi topo -m``): it is read the same way; when both spellings are set
  the plural wins, with a warning.

``LD_LIBRARY_PATH`` changes reach child processes (framework workers), not
the dynamic loader of the running process: set it before starting Python to
load MACA libraries in the current process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass

from maca_infer.common.device.detect import DEFAULT_MACA_PATH, maca_path
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

FRAMEWORKS = ("lmdeploy", "sglang", "hf")

# Toolkit sub-directories as MetaX's install guide lists them: (env var, dir
# relative to MACA_PATH). cu-bridge is MetaX's CUDA-compatibility layer
# (CUCC_PATH): its bin/ and tools/ hold the nvcc-like drivers.
TOOLKIT_DIRS: tuple[tuple[str, str], ...] = (
    ("PATH", "bin"),
    ("PATH", "mxgpu_llvm/bin"),
    ("PATH", "tools/cu-bridge/bin"),
    ("PATH", "tools/cu-bridge/tools"),
    ("LD_LIBRARY_PATH", "lib"),
    ("LD_LIBRARY_PATH", "mxgpu_llvm/lib"),
    ("LD_LIBRARY_PATH", "ompi/lib"),
)
CU_BRIDGE_DIR = "tools/cu-bridge"


@dataclass(frozen=True)
class Knob:
    name: str
    value: str
    why: str


# MetaX's recommended settings (their LMDeploy/SGLang deployment guide).
COMMON_KNOBS = (
    Knob("MACA_SMALL_PAGESIZE_ENABLE", "1", "MetaX guide: small device pages cut KV-cache fragmentation"),
    Knob(
        "PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM",
        "1",
        "MetaX guide: high-priority streams for process-group collectives (tensor parallel)",
    ),
)
SGLANG_KNOBS = (
    Knob("CUDA_GRAPH_DP_USE_SUM_BS", "False", "MetaX guide for SGLang: graph batch sizes per DP rank, not summed"),
)
GRAPH_KNOBS = (
    Knob("MACA_GRAPH_LAUNCH_MODE", "1", "MetaX guide: graph launch mode for captured (CUDA-graph) decoding"),
)


def _check_framework(framework: str) -> None:
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework={framework!r} is not known; use one of: {', '.join(FRAMEWORKS)}")


def recommended_knobs(framework: str, graph_mode: bool) -> list[Knob]:
    """MetaX's recommended knobs for ``framework`` with their reasons."""
    _check_framework(framework)
    knobs = list(COMMON_KNOBS)
    if framework == "sglang":
        knobs.extend(SGLANG_KNOBS)
    if graph_mode:
        knobs.extend(GRAPH_KNOBS)
    return knobs


def recommended_env(framework: str, graph_mode: bool) -> dict[str, str]:
    """``{name: value}`` of MetaX's recommended knobs for ``framework``.

    framework: "lmdeploy", "sglang" or "hf"; graph_mode: CUDA-graph capture on.
    """
    return {k.name: k.value for k in recommended_knobs(framework, graph_mode)}


def toolkit_paths(root: str | None = None) -> dict[str, list[str]]:
    """Existing toolkit dirs under ``root`` (default ``$MACA_PATH``), per variable."""
    root = root or maca_path()
    found: dict[str, list[str]] = {"PATH": [], "LD_LIBRARY_PATH": []}
    for var, rel in TOOLKIT_DIRS:
        path = os.path.join(root, rel)
        if os.path.isdir(path):
            found[var].append(path)
    return found


def _split(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p]


def compose_paths(environ: MutableMapping[str, str] | None = None, root: str | None = None) -> dict[str, str]:
    """New ``PATH``/``LD_LIBRARY_PATH`` values with the toolkit dirs appended.

    Only variables that change are returned; dirs already listed are kept
    where the user put them.
    """
    environ = os.environ if environ is None else environ
    changes: dict[str, str] = {}
    for var, dirs in toolkit_paths(root).items():
        current = _split(environ.get(var))
        missing = [d for d in dirs if d not in current]
        if missing:
            changes[var] = os.pathsep.join(current + missing)
    return changes


def _normalize_devices(value: str) -> str:
    return ",".join(p.strip() for p in value.split(",") if p.strip())


MACA_VISIBLE = "MACA_VISIBLE_DEVICES"
MACA_VISIBLE_SINGULAR = "MACA_VISIBLE_DEVICE"  # as MetaX's deployment guide spells it
CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"


def maca_visible_devices(environ: MutableMapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(variable, value)`` of the MACA device list the user set, or None.

    ``MACA_VISIBLE_DEVICES`` wins over the guide's singular
    ``MACA_VISIBLE_DEVICE`` when both are set (one warning when they differ).
    """
    environ = os.environ if environ is None else environ
    plural = environ.get(MACA_VISIBLE)
    singular = environ.get(MACA_VISIBLE_SINGULAR)
    if plural is not None:
        if singular is not None and _normalize_devices(singular) != _normalize_devices(plural):
            log_once(logger, logging.WARNING, "%s=%s and %s=%s are both set and differ; %s wins",
                     MACA_VISIBLE_SINGULAR, singular, MACA_VISIBLE, plural, MACA_VISIBLE)
        return MACA_VISIBLE, plural
    if singular is not None:
        return MACA_VISIBLE_SINGULAR, singular
    return None


def visible_devices_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The variables to add so MACA_ and CUDA_VISIBLE_DEVICES agree.

    Returns ``{}`` when neither or both (equal) are set; raises
    ``ValueError`` when both are set to different device lists. The guide's
    singular ``MACA_VISIBLE_DEVICE`` alone is copied to both.
    """
    environ = os.environ if environ is None else environ
    maca = maca_visible_devices(environ)
    cuda = environ.get(CUDA_VISIBLE)
    added: dict[str, str] = {}
    if maca is not None and maca[0] == MACA_VISIBLE_SINGULAR:
        added[MACA_VISIBLE] = maca[1]  # the MACA runtime reads the plural
    if maca is not None and cuda is not None:
        if _normalize_devices(maca[1]) != _normalize_devices(cuda):
            raise ValueError(
                f"{maca[0]}={maca[1]!r} and {CUDA_VISIBLE}={cuda!r} disagree; "
                "set only one of them (maca-infer copies it to the other) or set both to the same list"
            )
        return added
    if maca is not None:
        added[CUDA_VISIBLE] = maca[1]
        return added
    if cuda is not None:
        return {MACA_VISIBLE: cuda}
    return {}


@dataclass(frozen=True)
class EnvChange:
    name: str
    value: str
    why: str
    applied: bool  # False: the user had set it (value is then the user's)


def plan_env(
    framework: str | None = None,
    graph_mode: bool = False,
    *,
    vendor_knobs: bool = True,
    environ: MutableMapping[str, str] | None = None,
    root: str | None = None,
) -> list[EnvChange]:
    """What :func:`apply_env` would do, without doing it.

    Entries with ``applied=False`` are knobs the user already set (kept).
    """
    environ = os.environ if environ is None else environ
    plan: list[EnvChange] = []
    for name, value in visible_devices_env(environ).items():
        source = maca_visible_devices(environ)  # None: the user set only CUDA_VISIBLE_DEVICES
        other = source[0] if source is not None else CUDA_VISIBLE
        plan.append(EnvChange(name, value, f"mirrors {other} (MACA runtime and torch read different names)", True))
    root = root or environ.get("MACA_PATH", "").strip() or DEFAULT_MACA_PATH
    if os.path.isdir(root):
        if "MACA_PATH" not in environ:
            plan.append(EnvChange("MACA_PATH", root, "the MACA toolkit was found at its default location", True))
        cu_bridge = os.path.join(root, CU_BRIDGE_DIR)
        if os.path.isdir(cu_bridge) and "CUCC_PATH" not in environ:
            plan.append(EnvChange("CUCC_PATH", cu_bridge, "MetaX cu-bridge (CUDA-compatible build tools)", True))
    for name, value in compose_paths(environ, root).items():
        plan.append(EnvChange(name, value, f"MACA toolkit dirs under MACA_PATH={root}", True))
    if vendor_knobs and framework is not None:
        for knob in recommended_knobs(framework, graph_mode):
            if knob.name in environ:
                plan.append(EnvChange(knob.name, environ[knob.name], "set by the user (kept)", False))
            else:
                plan.append(EnvChange(knob.name, knob.value, knob.why, True))
    return plan


# what apply_env() set in this process's os.environ (name -> value), for the doctor
_applied_here: dict[str, str] = {}


def applied_env() -> dict[str, str]:
    """Variables apply_env() set in this process (not the ones the user set)."""
    return dict(_applied_here)


def apply_env(
    framework: str | None = None,
    graph_mode: bool = False,
    *,
    vendor_knobs: bool = True,
    environ: MutableMapping[str, str] | None = None,
    root: str | None = None,
) -> dict[str, str]:
    """Set up the environment; returns ``{name: value}`` of what it set.

    framework: "lmdeploy", "sglang", "hf" or None (paths and visible devices
    only); graph_mode: add the graph-mode knob; vendor_knobs: False skips
    MetaX's knobs (they mean nothing off a MetaX host).
    """
    environ = os.environ if environ is None else environ
    if framework is not None:
        _check_framework(framework)
    applied: dict[str, str] = {}
    for change in plan_env(framework, graph_mode, vendor_knobs=vendor_knobs, environ=environ, root=root):
        if not change.applied:
            continue
        environ[change.name] = change.value
        applied[change.name] = change.value
        if environ is os.environ:
            _applied_here[change.name] = change.value
        logger.info("env: %s=%s (%s)", change.name, change.value, change.why)
    return applied
