"""apply_rotary / rotary_embedding: reference and Triton kernel vs float64 math.

The float64 answer is computed from the positions and the RoPE base
directly (angles with ``math.cos``/``math.sin``, pair by pair), never from
the cos/sin tables handed to the op.
"""

from __future__ import annotations

import math

import pytest
import torch

from maca_infer.common.ops import _dispatch
from maca_infer.common.ops.rotary import apply_rotary, rotary_embedding

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BASE = 10000.0
POSITIONS = [0, 7, 3, 100, 2, 1]  # out of order, one large


def rope_float64(x: torch.Tensor, positions, rotary_dim: int, style: str) -> torch.Tensor:
    """Rotate pair by pair: (i, i + R/2) for neox, (2i, 2i + 1) for gptj."""
    x = x.double()
    out = x.clone()
    half = rotary_dim // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            theta = pos * BASE ** (-2.0 * i / rotary_dim)
            a, b = (i, i + half) if style == "neox" else (2 * i, 2 * i + 1)
            c, s = math.cos(theta), math.sin(theta)
            out[t, :, a] = x[t, :, a] * c - x[t, :, b] * s
            out[t, :, b] = x[t, :, b] * c + x[t, :, a] * s
    return out


def cos_sin_tables(positions, rotary_dim: int, max_position: int = 128):
    """vLLM layout cache [max_position, R] and the per-token cos/sin rows."""
    inv_freq = BASE ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1).float()
    rows = cache[torch.tensor(positions)]
    return cache, rows[:, : rotary_dim // 2], rows[:, rotary_dim // 2:]


def fused_qkv_views(num_tokens, num_q_heads, num_k_heads, head_dim, dtype):
    """query/key as views of one [T, (Hq + 2 Hk) * D] projection output (strided tokens)."""
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_k_heads) * head_dim, dtype=dtype)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim: (num_q_heads + num_k_heads) * head_dim].view(num_tokens, num_k_heads, head_dim)
    return qkv, q, k


# (head_dim, rotary_dim): full rotary; rotary half not a power of two (80 -> 40 pairs);
# partial rotary (dims >= R pass through) with an odd number of passed-through dims
SHAPES = ((32, 32), (80, 80), (64, 16), (40, 18))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ("neox", "gptj"))
@pytest.mark.parametrize("head_dim, rotary_dim", SHAPES)
def test_rotary_embedding(ops_impl, dtype, style, head_dim, rotary_dim, close):
    torch.manual_seed(head_dim + rotary_dim)
    num_tokens = len(POSITIONS)
    qkv, q, k = fused_qkv_views(num_tokens, 6, 2, head_dim, dtype)  # 6 query heads: not a multiple of 8
    qkv_before = qkv.clone()
    cache, _, _ = cos_sin_tables(POSITIONS, rotary_dim)
    positions = torch.tensor(POSITIONS, dtype=torch.int64)
    q_out, k_out = rotary_embedding(positions, q, k, cache, style=style)
    assert _dispatch.last_impl("rotary_embedding") == ops_impl
    assert torch.equal(qkv, qkv_before), "inplace=False must not touch the inputs"
    close(q_out, rope_float64(q, POSITIONS, rotary_dim, style), dtype, "query")
    close(k_out, rope_float64(k, POSITIONS, rotary_dim, style), dtype, "key")
    # passed-through dims are copied bit for bit
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(k_out[..., rotary_dim:], k[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ("neox", "gptj"))
def test_apply_rotary_inplace_on_fused_qkv(ops_impl, dtype, style, close):
    torch.manual_seed(3)
    head_dim, rotary_dim = 48, 32
    qkv, q, k = fused_qkv_views(len(POSITIONS), 3, 1, head_dim, dtype)
    expected_q = rope_float64(q, POSITIONS, rotary_dim, style)
    expected_k = rope_float64(k, POSITIONS, rotary_dim, style)
    v_before = qkv[:, 4 * head_dim:].clone()
    _, cos, sin = cos_sin_tables(POSITIONS, rotary_dim)
    q_out, k_out = apply_rotary(q, k, cos, sin, style=style, inplace=True)
    assert _dispatch.last_impl("apply_rotary") == ops_impl
    assert q_out is q and k_out is k
    close(q, expected_q, dtype, "query")
    close(k, expected_k, dtype, "key")
    assert torch.equal(qkv[:, 4 * head_dim:], v_before), "the value part of qkv must be untouched"


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_long_context_positions(ops_impl, dtype, close):
    """Positions past 32768 (128k-context models): cache rows far into the table."""
    positions = [32768, 5, 131071, 40000]
    torch.manual_seed(9)
    _, q, k = fused_qkv_views(len(positions), 4, 2, 64, dtype)
    cache, _, _ = cos_sin_tables(positions, 64, max_position=131072)
    q_out, k_out = rotary_embedding(torch.tensor(positions), q, k, cache, style="neox")
    close(q_out, rope_float64(q, positions, 64, "neox"), dtype, "query")
    close(k_out, rope_float64(k, positions, 64, "neox"), dtype, "key")


@pytest.mark.parametrize("positions_dtype", (torch.int32, torch.int64))
def test_query_only_and_bf16_cache(ops_impl, positions_dtype, close):
    # MLA-style: rotate only the query's rope part; the cache is in the model dtype
    torch.manual_seed(4)
    q = torch.randn(len(POSITIONS), 5, 16, dtype=torch.bfloat16)
    cache, _, _ = cos_sin_tables(POSITIONS, 16)
    q_out, k_out = rotary_embedding(torch.tensor(POSITIONS, dtype=positions_dtype), q, None,
                                    cache.bfloat16(), style="gptj")
    assert k_out is None
    close(q_out, rope_float64(q, POSITIONS, 16, "gptj"), torch.bfloat16)


def test_single_token(ops_impl, close):
    q = torch.randn(1, 1, 16)
    k = torch.randn(1, 1, 16)
    cache, cos, sin = cos_sin_tables([5], 16)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    close(q_out, rope_float64(q, [5], 16, "neox"), torch.float32)
    close(k_out, rope_float64(k, [5], 16, "neox"), torch.float32)


def _q(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: apply_rotary(_q(2, 2, 16), None, _q(2, 8), _q(2, 8), style="llama"), "style='llama'"),
        (lambda: apply_rotary(_q(2, 2, 16), None, _q(2, 9), _q(2, 9)), "rotary dim 18"),
        (lambda: apply_rotary(_q(2, 2, 16), None, _q(2, 8), _q(2, 4)), "cos has shape"),
        (lambda: apply_rotary(_q(2, 2, 16), _q(2, 2, 16, dtype=torch.float16), _q(2, 8), _q(2, 8)),
         "key has dtype float16"),
        (lambda: apply_rotary(_q(2, 2, 16), _q(3, 2, 16), _q(2, 8), _q(2, 8)), "key has num_tokens 3"),
        (lambda: apply_rotary(_q(2, 2, 16), _q(2, 2, 8), _q(2, 8), _q(2, 8)), "key has head_dim"),
        (lambda: apply_rotary(_q(2, 32), None, _q(2, 8), _q(2, 8)), "query must be"),
        (lambda: apply_rotary(_q(2, 16, 2).transpose(1, 2), None, _q(2, 8), _q(2, 8)), "head_dim must be contiguous"),
        (lambda: apply_rotary(_q(2, 2, 16), None, _q(3, 8), _q(3, 8)), "cos has num_tokens 3"),
        (lambda: rotary_embedding(torch.zeros(2), _q(2, 2, 16), None, _q(10, 16)), "positions has dtype float32"),
        (lambda: rotary_embedding(torch.zeros(2, dtype=torch.int32), _q(2, 2, 16), None, _q(10, 15)), "odd width 15"),
        (lambda: rotary_embedding(torch.zeros(4, dtype=torch.int32)[::2], _q(2, 2, 16), None, _q(10, 16)),
         "positions must be contiguous"),
        (lambda: rotary_embedding(torch.zeros(2, dtype=torch.int32), _q(2, 2, 16), None, _q(10, 16, dtype=torch.float16).to("meta")),
         "one device"),
    ],
)
def test_bad_input_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernels_compile_for_gpu_without_spills(gpu_builds):
    # Llama-like: 32 query heads, 8 KV heads, head_dim 128, views of a fused qkv
    builds = gpu_builds("""
        import torch
        from maca_infer.common.ops.rotary import apply_rotary, rotary_embedding
        qkv = torch.randn(4, 48 * 128, dtype=torch.bfloat16)
        q = qkv[:, :32 * 128].view(4, 32, 128)
        k = qkv[:, 32 * 128:40 * 128].view(4, 8, 128)
        rotary_embedding(torch.arange(4), q, k, torch.randn(64, 128), style="neox", inplace=True)
        apply_rotary(q, k, torch.randn(4, 32), torch.randn(4, 32), style="gptj")  # partial: pass-through copy
    """)
    assert [b["constexprs"]["COPY_PASS"] for b in builds] == [False, True]
    for build in builds:
        assert build["usage"]["LOCAL"] == 0, build
