"""The one reader of environment variables in maca-infer.

Every ``MACA_INFER_*`` variable is declared here with its allowed values;
anything else in the code base calls these functions instead of
``os.environ``. A bad value is a ``ValueError`` naming the variable, the value
and what is allowed.

Other programs' variables that maca-infer reads (MetaX's toolkit, Triton,
dlinfer, SGLang) are read here too, through :func:`external` or a named
helper, their meaning left to their owners (declared in ``EXTERNAL``). Which
vendor knobs maca-infer *sets* for a framework is ``common/device/env.py``'s
business; :func:`temporarily` sets variables for a block and restores them.
(tests/tools/test_env_reads.py checks that no other module reads ``os.environ``.)
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# name -> (allowed values or None for free-form, default, help)
VARIABLES: dict[str, tuple[tuple[str, ...] | None, str, str]] = {
    "MACA_INFER_DEVICE": (
        ("auto", "maca", "cuda", "emulated"),
        "auto",
        "which maca device to use: auto-detect, real MetaX MACA, an NVIDIA "
        "CUDA stand-in, or the CPU emulation",
    ),
    "MACA_INFER_OPS_IMPL": (
        ("auto", "vendor", "triton", "reference"),
        "auto",
        "force an op implementation (vendor: MetaX's flash_attn / flash_mla / mcoplib kernels); "
        "an explicit one that cannot run or cannot serve a call raises",
    ),
    "MACA_INFER_OPS_FALLBACK": (
        ("0", "1"),
        "0",
        "on a device (MetaX or a CUDA stand-in): 1 lets an op whose auto-picked Triton kernel fails run "
        "the torch reference (10-100x slower) with a WARNING; 0 raises with the op, shapes and cause",
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
    "MACA_INFER_TRITON_BRANCH": (
        ("auto", "device"),
        "auto",
        "under TRITON_INTERPRET=1 on CPU tensors: auto runs the kernels' interpreter branch (fp32 "
        "tl.dot inputs, small tiles); device runs the branch a MACA/CUDA device runs (its tile "
        "sizes, fp16/bf16 tl.dot inputs), so tests check that code on CPU",
    ),
}


# other programs' variables read by maca-infer -> what they mean to their owner
EXTERNAL: dict[str, str] = {
    "MACA_PATH": "MetaX toolkit root (default /opt/maca)",
    "TRITON_INTERPRET": "Triton: 1 runs kernels on CPU tensors in numpy",
    "DLINFER_LINEAR_USE_NN_LAYOUT": "dlinfer: 1 means linear weights are [K, N] (x @ W) instead of [N, K]",
    "SGLANG_PLATFORM": "SGLang: the sglang.srt.platforms entry point to use",
    "SGLANG_CPU_OMP_THREADS_BIND": "SGLang: cores of each CPU rank's OpenMP threads",
    "MACA_SMALL_PAGESIZE_ENABLE": "MetaX: 1 lets MetaX's flash_attn take paged KV caches with small pages (16..128)",
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


def ops_fallback_allowed() -> bool:
    """MACA_INFER_OPS_FALLBACK=1: a failing auto-picked kernel on a device may fall back to the reference."""
    return get("MACA_INFER_OPS_FALLBACK") == "1"


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


def external(name: str) -> str | None:
    """Raw value of another program's variable (None when unset); MACA_INFER_* go through :func:`get`."""
    if name.startswith("MACA_INFER_"):
        raise KeyError(f"{name} is maca-infer's own variable: read it with envs.get()")
    return os.environ.get(name)


def triton_interpret() -> bool:
    """Triton's own TRITON_INTERPRET=1: kernels run on CPU tensors in numpy."""
    return (external("TRITON_INTERPRET") or "0").strip() == "1"


def triton_device_branch() -> bool:
    """MACA_INFER_TRITON_BRANCH=device: interpreted kernels take the device branch (tests)."""
    return get("MACA_INFER_TRITON_BRANCH") == "device"


def maca_path(default: str) -> str:
    """``$MACA_PATH`` (MetaX toolkit root), or ``default`` when unset or blank."""
    return (external("MACA_PATH") or "").strip() or default


def dlinfer_linear_nn_layout() -> bool:
    """dlinfer's DLINFER_LINEAR_USE_NN_LAYOUT=1: ``linear`` weights come as [K, N]."""
    return (external("DLINFER_LINEAR_USE_NN_LAYOUT") or "0").strip() == "1"


def maca_small_pages() -> bool:
    """MetaX's MACA_SMALL_PAGESIZE_ENABLE=1: its flash_attn accepts small KV-cache pages."""
    return (external("MACA_SMALL_PAGESIZE_ENABLE") or "0").strip() == "1"


def sglang_platform() -> str:
    """SGLang's SGLANG_PLATFORM (an entry-point name of sglang.srt.platforms), "" when unset."""
    return (external("SGLANG_PLATFORM") or "").strip()


@contextlib.contextmanager
def temporarily(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore each (unset again if it was unset)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
