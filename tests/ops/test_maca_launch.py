"""Kernels that fit MACA's limits (issue #11, point 5; MACA_TARGET.md "MACA Triton rules").

Every kernel is compiled ahead of time for an sm_80 target with each MACA
launch table of common/ops/_launch.py (no GPU needed), and each build must
ask for at most 64 KiB of shared memory (its stages counted), at most 512
threads a block counted in MACA's 64-thread warps, and spill nothing. The
kernel sources must not use what MACA's Triton lacks: PTX (``tl.extra.cuda``,
inline asm) and TMA tensor descriptors.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from maca_infer.common.ops import _launch
from maca_infer.common.ops._jit import lazy_jit

# the op modules whose kernels this file checks (w8a8 checks its own)
KERNEL_MODULES = ("norm", "activation", "rotary", "kv_cache", "_split_kv", "attention", "mla", "moe", "quant",
                  "_triton_helpers", "sampling")

FORBIDDEN = {
    r"\btl\.extra\b": "tl.extra (tl.extra.cuda: PTX-only helpers such as gdc_wait)",
    r"\binline_asm": "inline assembly (PTX)",
    r"make_tensor_descriptor|tensor_descriptor|TensorDescriptor": "TMA tensor descriptors",
    r"\blibdevice\b": "CUDA libdevice",
}


def _jitted_functions() -> dict[str, lazy_jit]:
    """Every lazy_jit (kernels and device helpers) of the op modules, by module-qualified name."""
    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"maca_infer.common.ops.{name}")
        for attr, value in vars(module).items():
            if isinstance(value, lazy_jit) and value.fn.__module__ == module.__name__:
                found[f"{name}.{value.fn.__name__}"] = value
    return found


def forbidden_constructs(source: str) -> list[str]:
    """What in ``source`` (comments and docstrings excluded) MACA's Triton cannot compile."""
    code = re.sub(r"#.*", "", source)
    code = re.sub(r'"""[\s\S]*?"""', "", code)
    return [why for pattern, why in FORBIDDEN.items() if re.search(pattern, code)]


def test_the_scan_finds_each_forbidden_construct():
    planted = {
        "tl.extra.cuda.gdc_wait()": "tl.extra",
        "y = tl.inline_asm_elementwise('mov.b32 $0, $1;', '=r,r', [x], dtype=tl.int32, is_pure=True, pack=1)":
            "inline assembly",
        "desc = tl.make_tensor_descriptor(ptr, shape=[M, K], strides=[K, 1], block_shape=[64, 64])": "TMA",
        "y = libdevice.exp(x)": "libdevice",
    }
    for line, why in planted.items():
        assert any(why in found for found in forbidden_constructs(f"def k(x):\n    {line}\n")), line
    assert forbidden_constructs("def k(p):\n    # not tl.extra.cuda here\n    b = tl.make_block_ptr(p)\n") == []


def test_kernel_sources_use_nothing_macas_triton_lacks():
    functions = _jitted_functions()
    assert len(functions) >= 20, sorted(functions)  # kernels and helpers of every module were found
    bad = {name: forbidden_constructs(inspect.getsource(f.fn)) for name, f in functions.items()}
    assert {name: why for name, why in bad.items() if why} == {}


def test_maca_tables_keep_blocks_within_512_threads():
    kernels = set(_launch.TABLES[_launch.DEFAULT])
    for family in _launch.MACA_FAMILIES:
        table = _launch.TABLES[family]
        assert set(table) == kernels, family
        for kernel, entry in table.items():
            for key in ("num_warps", "num_warps_many_rows", "max_warps"):
                if key in entry:
                    threads = entry[key] * _launch.MACA_WARP_SIZE
                    assert threads <= _launch.MACA_MAX_THREADS, (family, kernel, key, threads)


@pytest.mark.parametrize("name, expected", [
    ("MetaX C500", "MXC500"), ("MetaX C550", "MXC550"), ("MXC500", "MXC500"), ("MetaX C280", "MXC550"),
    ("NVIDIA A100-SXM4-80GB", "default"),
])
def test_family_from_the_device_name(name, expected):
    assert _launch.family_of(name) == expected


def test_family_follows_the_resolved_device(fake_maca_host, monkeypatch):
    from maca_infer.common.device import detect

    assert _launch.family() == "MXC500"
    with _launch.use_family("MXC550"):
        assert _launch.options("prefill")["num_stages"] == 1
    monkeypatch.setenv("MACA_INFER_DEVICE", "emulated")
    detect.clear_cache()
    assert _launch.family() == "default"


# One call of each op at the shapes that stress a kernel's tiles: bf16 and fp32
# (twice the tile bytes), head dims 128 and 256, decode with many rows per
# program (2 tokens x 16 heads a KV head), DeepSeek MLA, MoE at 64 rows an
# expert, W4A16 at decode and prefill M.
_ALL_KERNELS_SNIPPET = """
import torch
from maca_infer.common.ops import _launch
from maca_infer.common.ops.norm import rms_norm, add_rms_norm
from maca_infer.common.ops.activation import silu_and_mul
from maca_infer.common.ops.rotary import apply_rotary
from maca_infer.common.ops.kv_cache import fill_kv_cache
from maca_infer.common.ops.attention import varlen_attention, paged_prefill_attention, paged_decode_attention
from maca_infer.common.ops.mla import fill_mla_cache, mla_decode
from maca_infer.common.ops.moe import moe_topk_softmax, moe_grouped_topk, fused_moe, fused_moe_w4a16
from maca_infer.common.ops.quant import w4a16_linear, pack_int4
i32 = torch.int32
with _launch.use_family(FAMILY):
    for dt in (torch.bfloat16, torch.float32):
        rms_norm(torch.randn(2, 4096, dtype=dt), torch.randn(4096, dtype=dt))
        add_rms_norm(torch.randn(2, 10000, dtype=dt), torch.randn(2, 10000, dtype=dt), torch.randn(10000, dtype=dt))
        silu_and_mul(torch.randn(3, 2 * 1408, dtype=dt))
        apply_rotary(torch.randn(4, 32, 128, dtype=dt), torch.randn(4, 8, 128, dtype=dt), torch.randn(4, 64),
                     torch.randn(4, 64), style="neox")
        for d in (128, 256):
            q = torch.randn(64, 8, d, dtype=dt)
            k = torch.randn(64, 2, d, dtype=dt)
            cu = torch.tensor([0, 64], dtype=i32)
            kc = torch.zeros(8, 16, 2, d, dtype=dt)
            fill_kv_cache(k, k, kc, kc.clone(), torch.arange(64, dtype=i32))
            varlen_attention(q, k, k, cu, cu, max_seqlen_q=64, max_seqlen_k=64)
            paged_prefill_attention(q, kc, kc, torch.zeros(1, 8, dtype=i32), cu, torch.tensor([64], dtype=i32),
                                    max_seqlen_q=64, max_kv_seqlen=64)
            paged_decode_attention(torch.randn(2, 2, 32, d, dtype=dt), kc, kc, torch.zeros(2, 8, dtype=i32),
                                   torch.ones(2, dtype=i32), num_kv_splits=2)
        # kv_lora_rank 512 (DeepSeek); float32 only at 256: 512 is refused on MACA (test below)
        rank = 512 if dt != torch.float32 else 256
        lat = torch.zeros(8, 64, rank + 64, dtype=dt)
        fill_mla_cache(torch.randn(3, rank, dtype=dt), torch.randn(3, 64, dtype=dt), lat, torch.arange(3, dtype=i32))
        mla_decode(torch.randn(2, 16, rank, dtype=dt), torch.randn(2, 16, 64, dtype=dt), lat,
                   torch.zeros(2, 4, dtype=i32), torch.ones(2, dtype=i32), 0.1, num_kv_splits=2)
        moe_grouped_topk(torch.randn(64, 64, dtype=dt), 6, num_expert_group=8, topk_group=3, renormalize=True)
        E, H, I = 8, 512, 256
        x = torch.randn(256, H, dtype=dt)
        tw, ti = moe_topk_softmax(torch.randn(256, E, dtype=dt), 2, renormalize=True)
        fused_moe(x, torch.randn(E, 2 * I, H, dtype=dt), torch.randn(E, H, I, dtype=dt), tw, ti)
        w13q = pack_int4(torch.randint(0, 16, (E, 2 * I, H), dtype=torch.uint8))
        w2q = pack_int4(torch.randint(0, 16, (E, H, I), dtype=torch.uint8))
        fused_moe_w4a16(x, w13q, w2q, torch.rand(E, 2 * I, H // 128, dtype=dt), torch.rand(E, H, I // 128, dtype=dt),
                        tw, ti, group_size=128)
        for m in (4, 128):
            w4a16_linear(torch.randn(m, 1024, dtype=dt), pack_int4(torch.randint(0, 16, (512, 1024), dtype=torch.uint8)),
                         torch.rand(512, 8, dtype=dt), group_size=128, split_k=1)
"""


@pytest.mark.parametrize("family", _launch.MACA_FAMILIES)
def test_mla_decode_refuses_float32_latents_too_wide_for_maca(device_branch, family):
    import torch

    from maca_infer.common.ops.mla import mla_decode

    cache = torch.zeros(2, 16, 576)
    args = (torch.randn(1, 16, 512), torch.randn(1, 16, 64), cache, torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), 0.1)
    with _launch.use_family(family), pytest.raises(ValueError, match="float32 at kv_lora_rank 512.*64 KiB"):
        mla_decode(*args)
    with _launch.use_family(family):  # bfloat16 fits
        mla_decode(*(a.bfloat16() if a.is_floating_point() else a for a in args[:5]), 0.1)


def _distinct_maca_tables() -> list[str]:
    families = []
    for family in _launch.MACA_FAMILIES:
        if all(_launch.TABLES[family] is not _launch.TABLES[f] for f in families):
            families.append(family)
    return families


@pytest.mark.parametrize("family", _distinct_maca_tables())
def test_every_kernel_compiles_within_macas_limits(gpu_builds, family):
    builds = gpu_builds(_ALL_KERNELS_SNIPPET.replace("FAMILY", repr(family)))
    kernels = {f.fn.__name__ for f in _jitted_functions().values() if f.fn.__name__.endswith("_kernel_fn")}
    assert kernels <= {b["kernel"] for b in builds}, kernels - {b["kernel"] for b in builds}
    over = []
    for b in builds:
        tiles = {k: v for k, v in b["constexprs"].items() if k.startswith("BLOCK") or k == "DOT_FP32"}
        threads = b["num_warps"] * _launch.MACA_WARP_SIZE
        if b["shared"] > _launch.MACA_SHARED_MEMORY or threads > _launch.MACA_MAX_THREADS or b["usage"]["LOCAL"]:
            over.append((b["kernel"], tiles, f"stages {b['num_stages']}", f"shared {b['shared']} B",
                         f"{threads} MACA threads", f"spills {b['usage']['LOCAL']} B"))
    assert over == [], "\n".join(map(str, over))
