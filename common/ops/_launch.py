"""Launch tables: each kernel's warps, pipeline stages and tiles, per device family.

MACA's Triton imposes limits NVIDIA's does not (MACA_TARGET.md, "MACA Triton
rules"; MetaX's Triton backend and vLLM-metax's kernel patches):

- a warp ("wave") is 64 threads and a block holds at most 1024 threads on a
  C500, 512 on a C550: portable launches use ``num_warps <= 8``;
- a block gets 64 KiB of shared memory, and ``num_stages`` multiplies the
  tile buffers of a pipelined loop (MetaX runs its attention and MLA Triton
  kernels with one stage).

So every kernel launch reads its options here instead of from literals, the
way MetaX keys its fused-MoE configs by device name (``MXC500``, ``MXC550``).
The family is chosen once from the device name (``MetaX C500`` -> ``MXC500``);
an NVIDIA stand-in, the emulated device and the interpreter use ``default``
(the launches tuned on sm_80/sm_90, where a block may use far more shared
memory). tests/ops/test_maca_launch.py compiles every kernel with each MACA
table for an sm_80 target and checks the limits.

Entries: ``num_warps`` / ``num_stages`` go to the launch as they are (a kernel
whose entry has no ``num_stages`` gets Triton's default); ``max_warps`` caps a
launcher that sizes its warps by the tile; upper-case keys are tile sizes;
``*_wide`` variants serve head dims > 128 or float32 tiles (twice the bytes),
``*_fp32_wide`` float32 tiles at head dims > 128 (four times the bytes).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

MACA_WARP_SIZE = 64  # threads per warp ("wave") on MACA
MACA_MAX_THREADS = 512  # per block, portable: C550's limit (C500: 1024)
MACA_SHARED_MEMORY = 64 * 1024  # bytes per block

DEFAULT = "default"

# The CUDA stand-in (and interpreter) launches: what the kernels were tuned with on sm_80/sm_90.
_DEFAULT_TABLE: dict[str, dict[str, Any]] = {
    "rms_norm": {"max_warps": 16},
    "act_and_mul": {"num_warps": 4},
    "rotary": {"num_warps": 4},
    "fill_kv_cache": {"num_warps": 4},
    "merge_kv_splits": {"num_warps": 4},
    # prefill: 8 warps (4 spill ~1 KiB a thread at D=128 on sm_80/sm_90)
    "prefill": {"num_warps": 8, "num_stages": 2, "BLOCK_M": 64, "BLOCK_N": 64,
                "BLOCK_M_wide": 32, "BLOCK_N_wide": 32, "BLOCK_M_fp32_wide": 32, "BLOCK_N_fp32_wide": 32},
    # decode: 4 warps up to 32 (token, head) rows a program, 8 above
    "decode": {"num_warps": 4, "num_warps_many_rows": 8, "num_stages": 2, "BLOCK_N": 64, "BLOCK_N_wide": 32,
               "BLOCK_N_fp32_wide": 32},
    "fill_mla_cache": {"num_warps": 4},
    "mla_decode": {"num_warps": 4, "BLOCK_H": 16, "BLOCK_N": 16, "fp32_max_kv_lora_rank": None},
    "moe_topk": {"num_warps": 4},
    "moe_align_count": {"num_warps": 8},
    "moe_align_scatter": {"num_warps": 4},
    "moe_gemm": {"num_warps": 4, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_K_wide": 64},
    "w4a16_gemm": {"num_warps": 4, "BLOCK_N": 64, "BLOCK_K": 64},
}

# MetaX: <= 8 warps (512 threads of 64), <= 64 KiB shared memory with the
# stages counted. Attention and MLA run one stage as MetaX's own kernels do;
# the GEMMs keep two (MetaX's MoE tables use 3-4 stages with smaller tiles).
# Shared memory of the sm_80 builds (tests/ops/test_maca_launch.py), default
# table -> this one: prefill bf16 D=128 64x64 56 -> 40 KiB, fp32 D=256 100 ->
# 48 KiB (1 stage and 16x16 tiles: one stage alone leaves 96); decode fp32
# D=256 82 -> 40 KiB (BLOCK_N 16); MoE gate/up fp32 96 -> 24 KiB (2 stages,
# K tile 32), bf16 48 -> 24 KiB. MLA decode fp32 at kv_lora_rank 512 needs
# 100 KiB even at one stage and the smallest tiles: refused on MACA.
_MACA_TABLE: dict[str, dict[str, Any]] = {
    **_DEFAULT_TABLE,
    "rms_norm": {"max_warps": 8, "num_stages": 1},
    "act_and_mul": {"num_warps": 4, "num_stages": 1},
    "rotary": {"num_warps": 4, "num_stages": 1},
    "fill_kv_cache": {"num_warps": 4, "num_stages": 1},
    "merge_kv_splits": {"num_warps": 4, "num_stages": 1},
    "prefill": {"num_warps": 8, "num_stages": 1, "BLOCK_M": 64, "BLOCK_N": 64,
                "BLOCK_M_wide": 32, "BLOCK_N_wide": 32, "BLOCK_M_fp32_wide": 16, "BLOCK_N_fp32_wide": 16},
    "decode": {"num_warps": 4, "num_warps_many_rows": 8, "num_stages": 1, "BLOCK_N": 64, "BLOCK_N_wide": 32,
               "BLOCK_N_fp32_wide": 16},
    "fill_mla_cache": {"num_warps": 4, "num_stages": 1},
    # fp32 at kv_lora_rank 512 needs ~100 KiB even at the smallest tiles (16 heads x 16 rows): refused
    "mla_decode": {"num_warps": 4, "num_stages": 1, "BLOCK_H": 16, "BLOCK_N": 16, "fp32_max_kv_lora_rank": 256},
    "moe_topk": {"num_warps": 4, "num_stages": 1},
    "moe_align_count": {"num_warps": 8, "num_stages": 1},
    "moe_align_scatter": {"num_warps": 4, "num_stages": 1},
    "moe_gemm": {"num_warps": 4, "num_stages": 2, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_K_wide": 32},
    "w4a16_gemm": {"num_warps": 4, "num_stages": 2, "BLOCK_N": 64, "BLOCK_K": 64},
}

TABLES: dict[str, dict[str, dict[str, Any]]] = {
    "MXC500": _MACA_TABLE,  # allows 1024 threads, but the portable table keeps C550's 512
    "MXC550": _MACA_TABLE,
    DEFAULT: _DEFAULT_TABLE,
}
MACA_FAMILIES = ("MXC500", "MXC550")

_forced: str | None = None
_resolved: tuple[object, str] | None = None  # (detect's Resolution, its family)


def family_of(device_name: str) -> str:
    """``MXC500`` / ``MXC550`` for a MetaX board name, ``default`` for anything else.

    An unknown MetaX board gets the C550 table: its limits are the strictest.
    """
    name = device_name.upper()
    if "METAX" not in name and not name.startswith("MXC"):
        return DEFAULT
    if "C500" in name:
        return "MXC500"
    return "MXC550"


def family() -> str:
    """The family whose table this process launches with (decided once per device resolution)."""
    global _resolved
    if _forced is not None:
        return _forced
    from maca_infer.common.device import detect

    try:
        resolution = detect.resolve()
    except (RuntimeError, ValueError):  # a misconfigured device fails elsewhere, with its own message
        return DEFAULT
    if _resolved is None or _resolved[0] is not resolution:
        chosen = family_of(resolution.device_name) if resolution.kind == "maca" else DEFAULT
        _resolved = (resolution, chosen)
    return _resolved[1]


@contextlib.contextmanager
def use_family(name: str) -> Iterator[None]:
    """Launch with ``name``'s table inside the block (ahead-of-time builds, tests)."""
    global _forced
    if name not in TABLES:
        raise ValueError(f"unknown launch family {name!r}; known: {sorted(TABLES)}")
    saved, _forced = _forced, name
    try:
        yield
    finally:
        _forced = saved


def config(kernel: str) -> dict[str, Any]:
    """The table entry of ``kernel`` for this process's family (a copy)."""
    return dict(TABLES[family()][kernel])


def options(kernel: str, **overrides: Any) -> dict[str, Any]:
    """``num_warps`` / ``num_stages`` of ``kernel``'s entry, for ``kernel[grid](..., **options(...))``."""
    entry = TABLES[family()][kernel]
    launch = {k: entry[k] for k in ("num_warps", "num_stages") if k in entry}
    launch.update(overrides)
    return launch
