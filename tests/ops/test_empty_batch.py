"""Every public op accepts a batch of zero tokens (issue #10).

With SGLang DP attention (``--enable-dp-attention``) an idle rank runs every
layer on an IDLE batch of 0 tokens; LMDeploy and CUDA-graph padding can hand
over empty batches too. Each op must then return correctly shaped, correctly
typed empty outputs (in-place ops: write nothing) on every implementation
tier, and launch no Triton kernel: a grid of 0 programs is an error on some
Triton versions and a no-op on others. Input validation still runs.

``EMPTY_CASES`` holds one case per name in ``maca_infer.common.ops.__all__``
(a test checks the two lists match, so a new op needs its zero-token case).
Weight-conversion helpers have no token dimension: their case feeds zero
output channels / rows, the empty analogue.
"""

from __future__ import annotations

import pytest
import torch

from maca_infer.common import ops
from maca_infer.common.ops import _dispatch

DTYPES = (torch.bfloat16, torch.float32)

# int4 weight helpers and the seeded-sampling twins: no implementation tiers (plain torch), no dispatch
NOT_DISPATCHED = {"pack_int4", "unpack_int4", "int32_to_uint8_packing", "dequant_w4a16", "awq_to_w4a16",
                  "gptq_to_w4a16", "murmur_hash32", "philox_uniform", "seeded_multinomial",
                  "w8a8_from_compressed_tensors", "w8a8_from_lmdeploy", "w8a8_check_quant_config"}

EMPTY_CASES = {}


def covers(name):
    def register(fn):
        EMPTY_CASES[name] = fn
        return fn
    return register


def expect(t, shape, dtype):
    assert isinstance(t, torch.Tensor), f"expected a tensor, got {type(t).__name__}"
    assert tuple(t.shape) == tuple(shape), f"shape {tuple(t.shape)} != expected {tuple(shape)}"
    assert t.dtype == dtype, f"dtype {t.dtype} != expected {dtype}"


def randn(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def no_tokens(*shape, dtype):
    return torch.empty(shape, dtype=dtype)


# ---------------------------------------------------------------- norms and activations

@covers("rms_norm")
def _rms_norm(dtype):
    x = no_tokens(0, 64, dtype=dtype)
    expect(ops.rms_norm(x, randn(64, dtype=dtype)), (0, 64), dtype)
    # leading dims around the empty one ([B, 0, H]) and an explicit out
    out = no_tokens(3, 0, 64, dtype=dtype)
    assert ops.rms_norm(no_tokens(3, 0, 64, dtype=dtype), randn(64, dtype=dtype), out=out) is out


@covers("add_rms_norm")
def _add_rms_norm(dtype):
    x, residual = no_tokens(0, 64, dtype=dtype), no_tokens(0, 64, dtype=dtype)
    normed, res = ops.add_rms_norm(x, residual, randn(64, dtype=torch.float32), gemma=True)
    expect(normed, (0, 64), dtype)
    assert res is residual


@covers("silu_and_mul")
def _silu_and_mul(dtype):
    expect(ops.silu_and_mul(no_tokens(0, 128, dtype=dtype)), (0, 64), dtype)
    expect(ops.silu_and_mul(no_tokens(2, 0, 128, dtype=dtype)), (2, 0, 64), dtype)


@covers("gelu_and_mul")
def _gelu_and_mul(dtype):
    expect(ops.gelu_and_mul(no_tokens(0, 128, dtype=dtype)), (0, 64), dtype)
    expect(ops.gelu_and_mul(no_tokens(0, 128, dtype=dtype), "tanh"), (0, 64), dtype)


@covers("apply_rotary")
def _apply_rotary(dtype):
    q, k = no_tokens(0, 4, 32, dtype=dtype), no_tokens(0, 2, 32, dtype=dtype)
    cos = sin = no_tokens(0, 8, dtype=torch.float32)  # partial rotary: 16 of 32 dims
    q_out, k_out = ops.apply_rotary(q, k, cos, sin, style="gptj")
    expect(q_out, (0, 4, 32), dtype)
    expect(k_out, (0, 2, 32), dtype)
    q_out, k_out = ops.apply_rotary(q, None, cos, sin, inplace=True)
    assert q_out is q and k_out is None


@covers("rotary_embedding")
def _rotary_embedding(dtype):
    positions = torch.empty(0, dtype=torch.int64)
    q, k = no_tokens(0, 4, 32, dtype=dtype), no_tokens(0, 2, 32, dtype=dtype)
    cache = randn(16, 32, dtype=torch.float32)
    q_out, k_out = ops.rotary_embedding(positions, q, k, cache)
    expect(q_out, (0, 4, 32), dtype)
    expect(k_out, (0, 2, 32), dtype)


# ---------------------------------------------------------------- KV cache and attention

NUM_BLOCKS, BLOCK_SIZE, HQ, HK, D = 4, 16, 4, 2, 32


def _kv_caches(dtype):
    return randn(NUM_BLOCKS, BLOCK_SIZE, HK, D, dtype=dtype), randn(NUM_BLOCKS, BLOCK_SIZE, HK, D, dtype=dtype)


@covers("fill_kv_cache")
def _fill_kv_cache(dtype):
    key_cache, value_cache = _kv_caches(dtype)
    before = key_cache.clone(), value_cache.clone()
    result = ops.fill_kv_cache(no_tokens(0, HK, D, dtype=dtype), no_tokens(0, HK, D, dtype=dtype),
                               key_cache, value_cache, torch.empty(0, dtype=torch.int32))
    assert result is None
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1]), "an empty fill wrote the cache"


@covers("varlen_attention")
def _varlen_attention(dtype):
    q, k, v = no_tokens(0, HQ, D, dtype=dtype), no_tokens(0, HK, D, dtype=dtype), no_tokens(0, HK, 16, dtype=dtype)
    no_sequences = torch.zeros(1, dtype=torch.int32)
    expect(ops.varlen_attention(q, k, v, no_sequences, no_sequences), (0, HQ, 16), dtype)
    # sequences that all have zero new tokens: still nothing to compute
    zero_length = torch.zeros(3, dtype=torch.int32)
    expect(ops.varlen_attention(q, k, v, zero_length, zero_length, max_seqlen_q=0), (0, HQ, 16), dtype)


@covers("paged_prefill_attention")
def _paged_prefill_attention(dtype):
    key_cache, value_cache = _kv_caches(dtype)
    out = ops.paged_prefill_attention(no_tokens(0, HQ, D, dtype=dtype), key_cache, value_cache,
                                      torch.zeros(0, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                                      torch.zeros(0, dtype=torch.int32))
    expect(out, (0, HQ, D), dtype)


@covers("paged_decode_attention")
def _paged_decode_attention(dtype):
    key_cache, value_cache = _kv_caches(dtype)
    table, lens = torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    out, lse = ops.paged_decode_attention(no_tokens(0, HQ, D, dtype=dtype), key_cache, value_cache, table, lens,
                                          return_lse=True)
    expect(out, (0, HQ, D), dtype)
    expect(lse, (0, HQ), torch.float32)
    # multi-token decode layout [B, q_len, Hq, D]
    out = ops.paged_decode_attention(no_tokens(0, 2, HQ, D, dtype=dtype), key_cache, value_cache, table, lens)
    expect(out, (0, 2, HQ, D), dtype)


# ---------------------------------------------------------------- MLA

KV_LORA_RANK, ROPE_DIM, MLA_HEADS, QK_NOPE, V_DIM = 64, 16, 4, 32, 32


def _latent_cache(dtype):
    return randn(NUM_BLOCKS, BLOCK_SIZE, KV_LORA_RANK + ROPE_DIM, dtype=dtype)


@covers("fill_mla_cache")
def _fill_mla_cache(dtype):
    cache = _latent_cache(dtype)
    before = cache.clone()
    result = ops.fill_mla_cache(no_tokens(0, KV_LORA_RANK, dtype=dtype), no_tokens(0, ROPE_DIM, dtype=dtype),
                                cache, torch.empty(0, dtype=torch.int64))
    assert result is None
    assert torch.equal(cache, before), "an empty fill wrote the latent cache"


@covers("mla_decode")
def _mla_decode(dtype):
    out, lse = ops.mla_decode(no_tokens(0, MLA_HEADS, KV_LORA_RANK, dtype=dtype),
                              no_tokens(0, MLA_HEADS, ROPE_DIM, dtype=dtype), _latent_cache(dtype),
                              torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 0.1,
                              return_lse=True)
    expect(out, (0, MLA_HEADS, KV_LORA_RANK), dtype)
    expect(lse, (0, MLA_HEADS), torch.float32)


@covers("mla_prefill")
def _mla_prefill(dtype):
    out = ops.mla_prefill(no_tokens(0, MLA_HEADS, QK_NOPE + ROPE_DIM, dtype=dtype), _latent_cache(dtype),
                          torch.zeros(0, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                          torch.zeros(0, dtype=torch.int32),
                          randn(MLA_HEADS * (QK_NOPE + V_DIM), KV_LORA_RANK, dtype=dtype),
                          qk_nope_head_dim=QK_NOPE, v_head_dim=V_DIM, scale=0.1)
    expect(out, (0, MLA_HEADS, V_DIM), dtype)


# ---------------------------------------------------------------- MoE and int4

NUM_EXPERTS, TOP_K, HIDDEN, INTER, GROUP = 8, 2, 64, 32, 32


def _routing():
    return torch.empty(0, TOP_K, dtype=torch.float32), torch.empty(0, TOP_K, dtype=torch.int32)


@covers("moe_topk_softmax")
def _moe_topk_softmax(dtype):
    weights, ids = ops.moe_topk_softmax(no_tokens(0, NUM_EXPERTS, dtype=dtype), TOP_K, renormalize=True)
    expect(weights, (0, TOP_K), torch.float32)
    expect(ids, (0, TOP_K), torch.int32)


@covers("moe_grouped_topk")
def _moe_grouped_topk(dtype):
    weights, ids = ops.moe_grouped_topk(no_tokens(0, NUM_EXPERTS, dtype=dtype), TOP_K, num_expert_group=4,
                                        topk_group=2, renormalize=True, scoring="sigmoid",
                                        correction_bias=randn(NUM_EXPERTS, dtype=torch.float32),
                                        routed_scaling_factor=2.5)
    expect(weights, (0, TOP_K), torch.float32)
    expect(ids, (0, TOP_K), torch.int32)


@covers("moe_align_block_size")
def _moe_align_block_size(dtype):
    sorted_ids, expert_ids, num_post_pad = ops.moe_align_block_size(torch.empty(0, TOP_K, dtype=torch.int32), 16,
                                                                    NUM_EXPERTS)
    expect(sorted_ids, (0,), torch.int32)
    expect(expert_ids, (0,), torch.int32)
    expect(num_post_pad, (1,), torch.int32)
    assert num_post_pad.item() == 0


@covers("fused_moe")
def _fused_moe(dtype):
    w13, w2 = randn(NUM_EXPERTS, 2 * INTER, HIDDEN, dtype=dtype), randn(NUM_EXPERTS, HIDDEN, INTER, dtype=dtype)
    expect(ops.fused_moe(no_tokens(0, HIDDEN, dtype=dtype), w13, w2, *_routing()), (0, HIDDEN), dtype)
    out = no_tokens(0, HIDDEN, dtype=dtype)
    assert ops.fused_moe(no_tokens(0, HIDDEN, dtype=dtype), w13, w2, *_routing(), activation="gelu", out=out) is out


def _int4(*shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8)


@covers("fused_moe_w4a16")
def _fused_moe_w4a16(dtype):
    out = ops.fused_moe_w4a16(
        no_tokens(0, HIDDEN, dtype=dtype), _int4(NUM_EXPERTS, 2 * INTER, HIDDEN // 2),
        _int4(NUM_EXPERTS, HIDDEN, INTER // 2), randn(NUM_EXPERTS, 2 * INTER, HIDDEN // GROUP, dtype=dtype),
        randn(NUM_EXPERTS, HIDDEN, INTER // GROUP, dtype=dtype), *_routing(), group_size=GROUP,
        w13_zeros=torch.full((NUM_EXPERTS, 2 * INTER, HIDDEN // GROUP), 8, dtype=torch.uint8),
    )
    expect(out, (0, HIDDEN), dtype)


@covers("w4a16_linear")
def _w4a16_linear(dtype):
    qweight, scales = _int4(48, HIDDEN // 2), randn(48, HIDDEN // GROUP, dtype=dtype)
    expect(ops.w4a16_linear(no_tokens(0, HIDDEN, dtype=dtype), qweight, scales, None, GROUP), (0, 48), dtype)
    bias = randn(48, dtype=dtype)
    expect(ops.w4a16_linear(no_tokens(2, 0, HIDDEN, dtype=dtype), qweight, scales, None, GROUP, bias),
           (2, 0, 48), dtype)
    out = no_tokens(0, 48, dtype=dtype)
    assert ops.w4a16_linear(no_tokens(0, HIDDEN, dtype=dtype), qweight, scales, None, GROUP, out=out) is out


@covers("pack_int4")
def _pack_int4(dtype):
    expect(ops.pack_int4(torch.empty(0, 8, dtype=torch.uint8)), (0, 4), torch.uint8)


@covers("unpack_int4")
def _unpack_int4(dtype):
    expect(ops.unpack_int4(torch.empty(0, 4, dtype=torch.uint8)), (0, 8), torch.uint8)


@covers("int32_to_uint8_packing")
def _int32_to_uint8_packing(dtype):
    expect(ops.int32_to_uint8_packing(torch.empty(0, 2, dtype=torch.int32)), (0, 8), torch.uint8)


@covers("dequant_w4a16")
def _dequant_w4a16(dtype):
    # zero output channels
    expect(ops.dequant_w4a16(torch.empty(0, HIDDEN // 2, dtype=torch.uint8), no_tokens(0, HIDDEN // GROUP, dtype=dtype),
                             None, GROUP), (0, HIDDEN), dtype)


@covers("awq_to_w4a16")
def _awq_to_w4a16(dtype):
    # AWQ packs N along int32 words: zero output channels = zero words per row
    qweight, scales, zeros = ops.awq_to_w4a16(torch.empty(HIDDEN, 0, dtype=torch.int32),
                                              torch.empty(HIDDEN // GROUP, 0, dtype=torch.int32),
                                              no_tokens(HIDDEN // GROUP, 0, dtype=dtype), GROUP)
    expect(qweight, (0, HIDDEN // 2), torch.uint8)
    expect(scales, (0, HIDDEN // GROUP), dtype)
    expect(zeros, (0, HIDDEN // GROUP), torch.uint8)


@covers("gptq_to_w4a16")
def _gptq_to_w4a16(dtype):
    qweight, scales, zeros = ops.gptq_to_w4a16(torch.empty(HIDDEN // 8, 0, dtype=torch.int32),
                                               torch.empty(HIDDEN // GROUP, 0, dtype=torch.int32),
                                               no_tokens(HIDDEN // GROUP, 0, dtype=dtype), GROUP)
    expect(qweight, (0, HIDDEN // 2), torch.uint8)
    expect(scales, (0, HIDDEN // GROUP), dtype)
    expect(zeros, (0, HIDDEN // GROUP), torch.uint8)


# ---------------------------------------------------------------- int8 weights and activations (W8A8)

def _int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


@covers("per_token_quant_int8")
def _per_token_quant_int8(dtype):
    q, scale = ops.per_token_quant_int8(no_tokens(0, HIDDEN, dtype=dtype))
    expect(q, (0, HIDDEN), torch.int8)
    expect(scale, (0, 1), torch.float32)
    q, scale = ops.per_token_quant_int8(no_tokens(2, 0, HIDDEN, dtype=dtype))
    expect(q, (2, 0, HIDDEN), torch.int8)
    expect(scale, (2, 0, 1), torch.float32)


@covers("rms_norm_quant_int8")
def _rms_norm_quant_int8(dtype):
    q, scale = ops.rms_norm_quant_int8(no_tokens(2, 0, HIDDEN, dtype=dtype), randn(HIDDEN, dtype=dtype))
    expect(q, (2, 0, HIDDEN), torch.int8)
    expect(scale, (2, 0, 1), torch.float32)


@covers("add_rms_norm_quant_int8")
def _add_rms_norm_quant_int8(dtype):
    residual = no_tokens(0, HIDDEN, dtype=dtype)
    q, scale, returned = ops.add_rms_norm_quant_int8(no_tokens(0, HIDDEN, dtype=dtype), residual,
                                                     randn(HIDDEN, dtype=dtype))
    expect(q, (0, HIDDEN), torch.int8)
    expect(scale, (0, 1), torch.float32)
    assert returned is residual


@covers("w8a8_int8_linear")
def _w8a8_int8_linear(dtype):
    q_w, w_scale = _int8(48, HIDDEN), torch.rand(48)
    expect(ops.w8a8_int8_linear(torch.empty(0, HIDDEN, dtype=torch.int8), torch.empty(0, 1), q_w, w_scale,
                                out_dtype=dtype), (0, 48), dtype)
    expect(ops.w8a8_int8_linear(torch.empty(2, 0, HIDDEN, dtype=torch.int8), torch.empty(2, 0, 1), q_w,
                                w_scale.view(48, 1), randn(48, dtype=dtype), out_dtype=dtype), (2, 0, 48), dtype)


@covers("fused_moe_w8a8")
def _fused_moe_w8a8(dtype):
    w13, w2 = _int8(NUM_EXPERTS, 2 * INTER, HIDDEN), _int8(NUM_EXPERTS, HIDDEN, INTER)
    scales = torch.rand(NUM_EXPERTS, 2 * INTER, 1), torch.rand(NUM_EXPERTS, HIDDEN)
    expect(ops.fused_moe_w8a8(no_tokens(0, HIDDEN, dtype=dtype), w13, w2, *scales, *_routing()), (0, HIDDEN), dtype)
    out = no_tokens(0, HIDDEN, dtype=dtype)
    assert ops.fused_moe_w8a8(no_tokens(0, HIDDEN, dtype=dtype), w13, w2, *scales, *_routing(), out=out) is out


@covers("w8a8_from_compressed_tensors")
def _w8a8_from_compressed_tensors(dtype):
    # zero output channels
    q_w, w_scale = ops.w8a8_from_compressed_tensors(torch.empty(0, HIDDEN, dtype=torch.int8),
                                                    no_tokens(0, 1, dtype=dtype))
    expect(q_w, (0, HIDDEN), torch.int8)
    expect(w_scale, (0,), torch.float32)


@covers("w8a8_from_lmdeploy")
def _w8a8_from_lmdeploy(dtype):
    q_w, w_scale = ops.w8a8_from_lmdeploy(torch.empty(NUM_EXPERTS, 0, HIDDEN, dtype=torch.int8),
                                          no_tokens(NUM_EXPERTS, 0, 1, dtype=dtype))
    expect(q_w, (NUM_EXPERTS, 0, HIDDEN), torch.int8)
    expect(w_scale, (NUM_EXPERTS, 0), torch.float32)


@covers("w8a8_check_quant_config")
def _w8a8_check_quant_config(dtype):
    # no tensors at all: the empty analogue is a config that names no layer
    assert ops.w8a8_check_quant_config({"quant_method": "smooth_quant"}) == "smooth_quant"


# ---------------------------------------------------------------- seeded sampling (no requests in the batch)

@covers("murmur_hash32")
def _murmur_hash32(dtype):
    none = torch.empty(0, dtype=torch.int64)
    expect(ops.murmur_hash32(none, none, torch.arange(5)), (0, 5), torch.int64)


@covers("philox_uniform")
def _philox_uniform(dtype):
    none = torch.empty(0, dtype=torch.int64)
    expect(ops.philox_uniform(none, none), (0,), torch.float32)


@covers("seeded_multinomial")
def _seeded_multinomial(dtype):
    none = torch.empty(0, dtype=torch.int64)
    expect(ops.seeded_multinomial(no_tokens(0, 16, dtype=dtype), none, none), (0,), torch.int64)


# ---------------------------------------------------------------- tests

def test_every_public_op_has_an_empty_batch_case():
    assert sorted(EMPTY_CASES) == sorted(ops.__all__)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("op", sorted(EMPTY_CASES))
def test_zero_tokens_give_empty_outputs(op, dtype, ops_impl, no_kernel_launch):
    torch.manual_seed(0)
    _dispatch._last.pop(op, None)
    EMPTY_CASES[op](dtype)
    if op not in NOT_DISPATCHED:
        # the tier was still chosen (a misconfigured forced tier raises), it just had nothing to run
        assert _dispatch.last_impl(op) == ops_impl


# Bad input must raise even when there are no tokens: the early exit comes after validation.
BAD_EMPTY_CALLS = {
    "rms_norm: weight length": lambda: ops.rms_norm(no_tokens(0, 64, dtype=torch.float16),
                                                    randn(32, dtype=torch.float16)),
    "silu_and_mul: odd width": lambda: ops.silu_and_mul(no_tokens(0, 63, dtype=torch.float16)),
    "rotary_embedding: positions dtype": lambda: ops.rotary_embedding(
        torch.empty(0, dtype=torch.float32), no_tokens(0, 4, 32, dtype=torch.float16),
        no_tokens(0, 2, 32, dtype=torch.float16), randn(16, 32, dtype=torch.float32)),
    "fill_kv_cache: head count": lambda: ops.fill_kv_cache(
        no_tokens(0, HK + 1, D, dtype=torch.float16), no_tokens(0, HK + 1, D, dtype=torch.float16),
        *_kv_caches(torch.float16), torch.empty(0, dtype=torch.int32)),
    "paged_decode_attention: GQA ratio": lambda: ops.paged_decode_attention(
        no_tokens(0, 3, D, dtype=torch.float16), *_kv_caches(torch.float16), torch.zeros(0, 2, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32)),
    "varlen_attention: k dtype": lambda: ops.varlen_attention(
        no_tokens(0, HQ, D, dtype=torch.float16), no_tokens(0, HK, D, dtype=torch.float32),
        no_tokens(0, HK, D, dtype=torch.float32), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)),
    "mla_decode: latent width": lambda: ops.mla_decode(
        no_tokens(0, MLA_HEADS, KV_LORA_RANK, dtype=torch.float16), no_tokens(0, MLA_HEADS, 8, dtype=torch.float16),
        _latent_cache(torch.float16), torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 0.1),
    "moe_topk_softmax: top_k > E": lambda: ops.moe_topk_softmax(no_tokens(0, 4, dtype=torch.float16), 5),
    "fused_moe: w2 shape": lambda: ops.fused_moe(
        no_tokens(0, HIDDEN, dtype=torch.float16), randn(NUM_EXPERTS, 2 * INTER, HIDDEN, dtype=torch.float16),
        randn(NUM_EXPERTS, HIDDEN, INTER + 1, dtype=torch.float16), *_routing()),
    "w4a16_linear: K": lambda: ops.w4a16_linear(no_tokens(0, HIDDEN * 2, dtype=torch.float16),
                                                _int4(48, HIDDEN // 2), randn(48, 2, dtype=torch.float16), None, 32),
    "w8a8_int8_linear: w_scale shape": lambda: ops.w8a8_int8_linear(
        torch.empty(0, HIDDEN, dtype=torch.int8), torch.empty(0, 1), _int8(48, HIDDEN), torch.rand(47)),
    "fused_moe_w8a8: w13 dtype": lambda: ops.fused_moe_w8a8(
        no_tokens(0, HIDDEN, dtype=torch.float16), randn(NUM_EXPERTS, 2 * INTER, HIDDEN, dtype=torch.float16),
        _int8(NUM_EXPERTS, HIDDEN, INTER), torch.rand(NUM_EXPERTS, 2 * INTER), torch.rand(NUM_EXPERTS, HIDDEN),
        *_routing()),
    "per_token_quant_int8: x dtype": lambda: ops.per_token_quant_int8(torch.empty(0, HIDDEN, dtype=torch.int8)),
    "add_rms_norm_quant_int8: residual dtype": lambda: ops.add_rms_norm_quant_int8(
        no_tokens(0, HIDDEN, dtype=torch.float16), no_tokens(0, HIDDEN, dtype=torch.float32),
        randn(HIDDEN, dtype=torch.float16)),
}


@pytest.mark.parametrize("call", sorted(BAD_EMPTY_CALLS))
def test_empty_batch_still_validates_input(call, ops_impl, no_kernel_launch):
    with pytest.raises(ValueError):
        BAD_EMPTY_CALLS[call]()


def test_empty_batch_still_checks_the_forced_tier(monkeypatch):
    """MACA_INFER_OPS_IMPL=triton on CPU tensors without the interpreter is an error, empty batch or not."""
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not _dispatch.triton_available():
        pytest.skip("triton is not importable")
    with pytest.raises(ValueError, match="needs device tensors"):
        ops.rms_norm(no_tokens(0, 64, dtype=torch.float16), randn(64, dtype=torch.float16))
    with pytest.raises(ValueError, match="needs device tensors"):
        ops.fused_moe(no_tokens(0, HIDDEN, dtype=torch.float16),
                      randn(NUM_EXPERTS, 2 * INTER, HIDDEN, dtype=torch.float16),
                      randn(NUM_EXPERTS, HIDDEN, INTER, dtype=torch.float16), *_routing())
