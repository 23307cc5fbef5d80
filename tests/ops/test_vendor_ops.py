"""The vendor tier's mcoplib marshalling and the dispatch rules of the vendor tier.

mcoplib's ops (vLLM schemas under torch.ops._C / _C_cache_ops / _moe_C) are
faked on CPU (tests/ops/vendor_fakes/mcoplib, fixture ``vendor_fakes``);
results are compared with the float64 math of the ops' own tests.
"""

from __future__ import annotations

import sys

import pytest
import torch

from maca_infer.common.ops import _dispatch, vendor
from maca_infer.common.ops.activation import gelu_and_mul, silu_and_mul
from maca_infer.common.ops.kv_cache import fill_kv_cache
from maca_infer.common.ops.moe import moe_topk_softmax
from maca_infer.common.ops.norm import add_rms_norm, rms_norm
from maca_infer.common.ops.rotary import apply_rotary, rotary_embedding
from tests.ops.test_activation import gated_float64
from tests.ops.test_kv_cache import check_fill
from tests.ops.test_moe import softmax_float64
from tests.ops.test_norm import rms_norm_float64
from tests.ops.test_rotary import POSITIONS, cos_sin_tables, fused_qkv_views, rope_float64

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _called(module, name):
    return sys.modules[module].calls[-1] == name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, num_kv_heads, head_dim", [(16, 1, 64), (32, 3, 24), (64, 2, 128)])
@pytest.mark.parametrize("slots_dtype", (torch.int32, torch.int64))
def test_fill_kv_cache(vendor_fakes, dtype, block_size, num_kv_heads, head_dim, slots_dtype, nan_tensor):
    check_fill("vendor", dtype, block_size, num_kv_heads, head_dim, head_dim, slots_dtype, nan_tensor, num_tokens=9)
    assert _called("mcoplib._C", "reshape_and_cache_flash")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", (7, 96, 1000))
def test_rms_norm_and_add_rms_norm(vendor_fakes, dtype, hidden, close):
    generator = torch.Generator().manual_seed(hidden)
    wide = torch.randn(5, 2 * hidden, generator=generator).to(dtype)
    x = wide[:, :hidden]  # strided rows: the marshaller makes them contiguous for the kernel
    weight = torch.randn(hidden, generator=generator).to(dtype)
    residual = torch.randn(5, hidden, generator=generator).to(dtype)
    residual_before, x_before = residual.clone(), x.clone()

    close(rms_norm(x, weight, 1e-5), rms_norm_float64(x, weight, 1e-5, False), dtype, "rms_norm")
    assert _dispatch.last_impl("rms_norm") == "vendor" and _called("mcoplib._C", "rms_norm")
    normed, res = add_rms_norm(x, residual, weight, 1e-5)
    assert _dispatch.last_impl("add_rms_norm") == "vendor" and _called("mcoplib._C", "fused_add_rms_norm")
    assert res is residual and torch.equal(x, x_before), "x must stay untouched (the vendor op overwrites its input)"
    close(residual, x_before.double() + residual_before.double(), dtype, "residual")
    close(normed, rms_norm_float64(residual, weight, 1e-5, False), dtype, "normed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", (5, 96))
def test_silu_and_mul(vendor_fakes, dtype, d, close):
    wide = torch.randn(2, 3, 4 * d, generator=torch.Generator().manual_seed(d)).to(dtype)
    x = wide[..., : 2 * d]  # strided rows
    got = silu_and_mul(x)
    assert _dispatch.last_impl("silu_and_mul") == "vendor" and _called("mcoplib._C", "silu_and_mul")
    close(got, gated_float64(x, "silu").reshape(2, 3, d), dtype, "silu_and_mul")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ("neox", "gptj"))
@pytest.mark.parametrize("head_dim, rotary_dim", ((32, 32), (80, 80), (64, 16)))
def test_rotary_embedding(vendor_fakes, dtype, style, head_dim, rotary_dim, close):
    torch.manual_seed(head_dim + rotary_dim)
    qkv, q, k = fused_qkv_views(len(POSITIONS), 6, 2, head_dim, dtype)
    qkv_before = qkv.clone()
    cache, _, _ = cos_sin_tables(POSITIONS, rotary_dim)
    positions = torch.tensor(POSITIONS, dtype=torch.int32)

    q_out, k_out = rotary_embedding(positions, q, k, cache.to(dtype), style=style)

    assert _dispatch.last_impl("rotary_embedding") == "vendor" and _called("mcoplib._C", "rotary_embedding")
    assert torch.equal(qkv, qkv_before), "inplace=False must not touch the inputs"
    # the cache in the query's dtype is what the kernel reads: bf16 angles cost one more rounding
    close(q_out, rope_float64(q, POSITIONS, rotary_dim, style), dtype, "query", factor=2)
    close(k_out, rope_float64(k, POSITIONS, rotary_dim, style), dtype, "key", factor=2)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ("neox", "gptj"))
def test_apply_rotary_inplace(vendor_fakes, dtype, style, close):
    torch.manual_seed(3)
    rotary_dim = 48
    q = torch.randn(len(POSITIONS), 4, 64).to(dtype)
    k = torch.randn(len(POSITIONS), 2, 64).to(dtype)
    q_before, k_before = q.clone(), k.clone()
    _, cos, sin = cos_sin_tables(POSITIONS, rotary_dim)

    q_out, k_out = apply_rotary(q, k, cos, sin, style=style, inplace=True)

    assert q_out is q and k_out is k and _dispatch.last_impl("apply_rotary") == "vendor"
    close(q, rope_float64(q_before, POSITIONS, rotary_dim, style), dtype, "query", factor=2)
    close(k, rope_float64(k_before, POSITIONS, rotary_dim, style), dtype, "key", factor=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 8, 2), (19, 60, 4), (40, 128, 8)])
@pytest.mark.parametrize("renormalize", (False, True))
def test_moe_topk_softmax(vendor_fakes, dtype, num_tokens, num_experts, top_k, renormalize):
    logits = (torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(num_experts)) * 2).to(dtype)
    weights, ids = moe_topk_softmax(logits, top_k, renormalize)
    assert _dispatch.last_impl("moe_topk_softmax") == "vendor" and _called("mcoplib._moe_C", "topk_softmax")
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and weights.shape == (num_tokens, top_k)
    for t, row in enumerate(logits.double().tolist()):
        probs = softmax_float64(row)
        chosen = ids[t].tolist()
        assert [probs[e] for e in chosen] == pytest.approx(sorted(probs, reverse=True)[:top_k], rel=1e-6)
        expected = [probs[e] for e in chosen]
        if renormalize:
            expected = [p / sum(expected) for p in expected]
        assert weights[t].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------
# Forced vendor that cannot serve, and the dispatch rules
# --------------------------------------------------------------------------
@pytest.mark.parametrize("call, reason", [
    (lambda: rms_norm(torch.randn(2, 8), torch.randn(8), gemma=True), "Gemma's 1 + weight"),
    (lambda: rms_norm(torch.randn(2, 8).half(), torch.randn(8)), "weight in x's dtype (float32 != float16)"),
    (lambda: apply_rotary(torch.randn(3, 2, 8), None, torch.randn(3, 4), torch.randn(3, 4)), "key=None"),
    (lambda: rotary_embedding(torch.tensor([0, 1]), torch.randn(2, 2, 8).half(), torch.randn(2, 1, 8).half(),
                              torch.randn(4, 8)), "cos_sin_cache in the query's dtype"),
    (lambda: fill_kv_cache(torch.randn(2, 1, 8), torch.randn(2, 1, 16), torch.randn(2, 16, 1, 8),
                           torch.randn(2, 16, 1, 16), torch.tensor([0, 1])), "one head size"),
])
def test_forced_vendor_that_cannot_serve_raises(vendor_fakes, call, reason):
    with pytest.raises(RuntimeError, match="MACA_INFER_OPS_IMPL=vendor cannot serve this call") as info:
        call()
    assert reason in str(info.value)


def test_forced_vendor_op_without_vendor_kernel_raises(vendor_fakes):
    with pytest.raises(RuntimeError, match="gelu_and_mul: MACA_INFER_OPS_IMPL=vendor but MetaX's libraries have no"):
        gelu_and_mul(torch.randn(2, 8))


def test_forced_vendor_without_the_libraries_says_which_is_missing(monkeypatch):
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "vendor")
    for name in ("mcoplib", "mcoplib._C"):
        monkeypatch.setitem(sys.modules, name, None)
    vendor.forget_libraries()
    try:
        with pytest.raises(RuntimeError, match=r"cannot serve this call: mcoplib\._C is not importable"):
            silu_and_mul(torch.randn(2, 8))
    finally:
        vendor.forget_libraries()


def test_auto_never_picks_vendor_off_a_maca_device(vendor_fakes, monkeypatch):
    """CPU tensors (the emulated device): the fakes are importable, yet auto runs the reference."""
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "auto")
    silu_and_mul(torch.randn(2, 8).half())
    assert _dispatch.last_impl("silu_and_mul") == "reference"


@pytest.mark.parametrize("kind, expected", [("maca", "vendor"), ("cuda-standin", "triton")])
def test_auto_on_a_device_prefers_vendor_only_on_maca(vendor_fakes, monkeypatch, kind, expected):
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_on_device", lambda tensors: True)  # as if on the card
    monkeypatch.setattr(_dispatch, "_device_kind", lambda: kind)
    x, w = torch.randn(3, 64).half(), torch.randn(64).half()
    close_to = rms_norm_float64(x, w, 1e-6, False)
    got = rms_norm(x, w)
    assert _dispatch.last_impl("rms_norm") == expected
    assert (got.double() - close_to).abs().max() < 1e-2


def test_auto_on_maca_moves_on_when_vendor_cannot_serve(vendor_fakes, monkeypatch):
    """Gemma's norm is not mcoplib's: the Triton kernel serves it, and the next plain norm is vendor again."""
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_on_device", lambda tensors: True)
    monkeypatch.setattr(_dispatch, "_device_kind", lambda: "maca")
    x, w = torch.randn(3, 64).half(), torch.randn(64).half()
    gemma = rms_norm(x, w, gemma=True)
    assert _dispatch.last_impl("rms_norm") == "triton"
    assert (gemma.double() - rms_norm_float64(x, w, 1e-6, True)).abs().max() < 2e-2
    rms_norm(x, w)
    assert _dispatch.last_impl("rms_norm") == "vendor"
    assert _dispatch.tiers()["rms_norm"] == "vendor"


def test_auto_on_maca_without_the_libraries_runs_triton(monkeypatch):
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_on_device", lambda tensors: True)
    monkeypatch.setattr(_dispatch, "_device_kind", lambda: "maca")
    for name in ("mcoplib", "mcoplib._C"):
        monkeypatch.setitem(sys.modules, name, None)
    vendor.forget_libraries()
    try:
        silu_and_mul(torch.randn(2, 32).half())
        assert _dispatch.last_impl("silu_and_mul") == "triton"
    finally:
        vendor.forget_libraries()



@pytest.mark.parametrize("forced", ("vendor", "auto"))
def test_a_failing_vendor_kernel_is_an_error_naming_the_op_and_inputs(vendor_fakes, monkeypatch, forced):
    """Not a silent switch of tier (auto on a MetaX card included): the library's error, the op and its inputs."""
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", forced)
    monkeypatch.setattr(_dispatch, "_on_device", lambda tensors: True)
    monkeypatch.setattr(_dispatch, "_device_kind", lambda: "maca")

    def failing(x, out, activation):
        raise ValueError("planted launch failure")

    monkeypatch.setattr(vendor, "act_and_mul", failing)
    with pytest.raises(RuntimeError, match=r"silu_and_mul: MetaX's vendor kernel failed on inputs \[\(2, 8\) "
                                           r"float16 on cpu\]: ValueError: planted launch failure"):
        silu_and_mul(torch.randn(2, 8).half())
