"""The one reader of maca-infer's own environment variables.

Every ``MACA_INFER_*`` variable is declared here with its allowed values;
anything else in the code base calls these functions instead of
``os.environ``. A bad value is a ``ValueError`` naming the variable, the value
and what is allowed. (MetaX's and the frameworks' own variables, such as
``MACA_PATH``, are handled in ``common/device/env.py``.)
"""

from __future__ import annotations

import os

# name -> (allowed values or None for free-form, default, help)
VARIABLES: dict[str, tuple[tuple[str, ...] | None, str, str]] = {
    "MACA_INFER_DEVICE": (
        ("auto", "maca", "cuda", "emulated"),
        "auto",
        "which maca device to use: auto-detect, real MetaX MACA, an NVIDIA "
        "CUDA stand-in, or the CPU emulation",
    ),
    "MACA_INFER_OPS_IMPL": (
        ("auto", "reference", "triton"),
        "auto",
        "force an op implementation; an explicit one that cannot run raises",
    ),
    "MACA_INFER_EMU_MEMORY_GB": (
        None,
        "",
        "memory the emulated device reports (GiB); default: a quarter of host RAM",
    ),
    "MACA_INFER_EMU_DEVICE_COUNT": (
        None,
        "",
        "number of emulated maca devices (default 1)",
    ),
    "MACA_INFER_LOG_LEVEL": (
        ("DEBUG", "INFO", "WARNING", "ERROR"),
        "INFO",
        "log level of the maca_infer logger",
    ),
    "MACA_INFER_GRAPH_MODE": (
        ("0", "1"),
        "0",
        "set by adapters when graph capture is on (turns on MACA_GRAPH_LAUNCH_MODE)",
    ),
    "MACA_INFER_DLINFER": (
        ("auto", "ours", "upstream"),
        "auto",
        "LMDeploy: serve `dlinfer` from maca-infer (ours), register into an "
        "installed upstream dlinfer (upstream), or pick by what is installed",
    ),
    "MACA_INFER_MODEL_CACHE": (
        None,
        "",
        "where the tiny model factory caches checkpoints (default ~/.cache/maca-infer/models)",
    ),
}


def get(name: str) -> str:
    """Value of a declared variable, validated, default applied."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a maca-infer variable; known: {sorted(VARIABLES)}")
    allowed, default, _ = VARIABLES[name]
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip()
    if allowed is not None:
        canon = {a.lower(): a for a in allowed}
        if value.lower() not in canon:
            raise ValueError(f"{name}={raw!r} is not allowed; use one of: {', '.join(allowed)}")
        value = canon[value.lower()]
    return value


def device_override() -> str:
    return get("MACA_INFER_DEVICE")


def ops_impl() -> str:
    return get("MACA_INFER_OPS_IMPL")


def log_level() -> str:
    try:
        return get("MACA_INFER_LOG_LEVEL")
    except ValueError:
        return "INFO"


def emu_memory_bytes() -> int | None:
    raw = get("MACA_INFER_EMU_MEMORY_GB")
    if not raw:
        return None
    try:
        gib = float(raw)
    except ValueError:
        raise ValueError(f"MACA_INFER_EMU_MEMORY_GB={raw!r} is not a number of GiB (e.g. 4 or 0.5)") from None
    if gib <= 0:
        raise ValueError(f"MACA_INFER_EMU_MEMORY_GB={raw!r} must be > 0")
    return int(gib * (1 << 30))


def emu_device_count() -> int:
    raw = get("MACA_INFER_EMU_DEVICE_COUNT")
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MACA_INFER_EMU_DEVICE_COUNT={raw!r} must be an integer >= 1")
    return int(raw)


def graph_mode() -> bool:
    return get("MACA_INFER_GRAPH_MODE") == "1"


def dlinfer_mode() -> str:
    return get("MACA_INFER_DLINFER")


def model_cache_dir() -> str:
    return get("MACA_INFER_MODEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "maca-infer", "models"
    )


def triton_interpret() -> bool:
    """Triton's own TRITON_INTERPRET=1: kernels run on CPU tensors in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
