"""Every ``dlinfer.ops`` function maca-infer serves accepts a batch of zero tokens (issue #10).

Called with LMDeploy's positional conventions (see test_dlinfer_interface.py)
and T = 0 (no sequences), on both op tiers: each returns correctly shaped
empty outputs, writes nothing into caches and launches no kernel.
``EMPTY_CASES`` must cover ``dlinfer_ops.__all__``.
"""

from __future__ import annotations

import pytest
import torch

from maca_infer.adapters.lmdeploy import dlinfer_ops

DTYPE = torch.float16
NB, BS, HQ, HK, D = 4, 16, 4, 2, 32
E, TOP_K, H, I, GROUP = 4, 2, 64, 32, 32
L, R, MLA_HEADS, QK_NOPE, V_DIM = 64, 16, 4, 32, 32



def _empty(*shape, dtype=DTYPE):
    return torch.empty(shape, dtype=dtype)


def _rand(*shape, dtype=DTYPE):
    return torch.randn(shape).to(dtype)


def _expect(t, shape, dtype=DTYPE):
    assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, f"got {tuple(t.shape)} {t.dtype}"


def _no_lengths():
    return torch.zeros(0, dtype=torch.int32)


def _kv_caches():
    return _rand(NB, BS, HK, D), _rand(NB, BS, HK, D)


EMPTY_CASES = {}


def covers(name):
    def register(fn):
        EMPTY_CASES[name] = fn
        return fn
    return register


@covers("rms_norm")
def _rms_norm(ops):
    _expect(ops.rms_norm(_empty(0, H), _rand(H), 1e-6), (0, H))


@covers("add_rms_norm")
def _add_rms_norm(ops):
    residual = _empty(0, H)
    normed, res = ops.add_rms_norm(_empty(0, H), residual, _rand(H), 1e-6)
    _expect(normed, (0, H))
    assert res is residual


@covers("apply_rotary_pos_emb")
def _apply_rotary_pos_emb(ops):
    cos = sin = _empty(1, 0, D)  # LMDeploy's [1, T, D] tables
    q, k = ops.apply_rotary_pos_emb(_empty(0, HQ, D), _empty(0, HK, D), cos, sin, None, None)
    _expect(q, (0, HQ, D))
    _expect(k, (0, HK, D))


@covers("silu_and_mul")
def _silu_and_mul(ops):
    _expect(ops.silu_and_mul(_empty(0, 2 * I)), (0, I))


@covers("fill_kv_cache")
def _fill_kv_cache(ops):
    key_cache, value_cache = _kv_caches()
    before = key_cache.clone(), value_cache.clone()
    ops.fill_kv_cache(_empty(0, HK, D), _empty(0, HK, D), key_cache, value_cache,
                      torch.zeros(0, 1, dtype=torch.int64), [], [], 0)
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])


@covers("prefill_attention")
def _prefill_attention(ops):
    out = _empty(0, HQ, D)
    result = ops.prefill_attention(_empty(0, HQ, D), _empty(0, HK, D), _empty(0, HK, D), None, None,
                                   _no_lengths(), _no_lengths(), 0, HQ, HK, [], None, None, out)
    assert result is out
    _expect(ops.prefill_attention(_empty(0, HQ, D), _empty(0, HK, D), _empty(0, HK, D), None, None,
                                  _no_lengths(), _no_lengths(), 0, HQ, HK, [], None, None, None,
                                  _no_lengths()), (0, HQ, D))


@covers("paged_prefill_attention")
def _paged_prefill_attention(ops):
    key_cache, value_cache = _kv_caches()
    out = ops.paged_prefill_attention(_empty(0, HQ, D), None, None, key_cache, value_cache,
                                      torch.zeros(0, 2, dtype=torch.int32), BS, _no_lengths(), _no_lengths(),
                                      0, 0, HQ, HK, [], D)
    _expect(out, (0, HQ, D))


@covers("paged_decode_attention")
def _paged_decode_attention(ops):
    key_cache, value_cache = _kv_caches()
    out = _empty(0, HQ, D)
    result = ops.paged_decode_attention(_empty(0, HQ, D), key_cache, value_cache,
                                        torch.zeros(0, 2, dtype=torch.int32), BS, _no_lengths(), _no_lengths(),
                                        0, HQ, HK, D, None, None, out)
    assert result is out
    _expect(ops.paged_decode_attention(_empty(0, HQ, D), key_cache, value_cache,
                                       torch.zeros(0, 2, dtype=torch.int32), BS, _no_lengths(), _no_lengths(),
                                       0, HQ, HK), (0, HQ, D))


@covers("moe_gating_topk_softmax")
def _moe_gating_topk_softmax(ops):
    weights, ids = ops.moe_gating_topk_softmax(_empty(0, E), TOP_K, None)
    _expect(weights, (0, TOP_K), torch.float32)
    _expect(ids, (0, TOP_K), torch.int32)


@covers("fused_moe")
def _fused_moe(ops):
    weights, ids = torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.int32)  # flattened [T * k]
    for renormalize in (False, True):
        out = ops.fused_moe(_empty(0, H), _rand(E, 2 * I, H), _rand(E, H, I), weights, ids, TOP_K, renormalize, None)
        _expect(out, (0, H))


def _uint8(*shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8)


@covers("fused_moe_w4a16")
def _fused_moe_w4a16(ops):
    out = ops.fused_moe_w4a16(_empty(0, H), _uint8(E, 2 * I, H // 2), _uint8(E, H, I // 2),
                              _rand(E, 2 * I, H // GROUP), _rand(E, H, I // GROUP),
                              torch.empty(0, TOP_K, dtype=torch.float32), torch.empty(0, TOP_K, dtype=torch.int32),
                              TOP_K, True, group_size=GROUP)
    _expect(out, (0, H))


@covers("linear")
def _linear(ops):
    _expect(ops.linear(_empty(0, H), _rand(48, H), _rand(48)), (0, 48))


@covers("weight_quant_matmul")
def _weight_quant_matmul(ops):
    # AWQ's GEMM packing (int32 [K, N // 8]) and ours (uint8 [N, K // 2])
    awq = ops.weight_quant_matmul(_empty(1, 0, H), torch.randint(-2**31, 2**31 - 1, (H, 48 // 8), dtype=torch.int32),
                                  _rand(H // GROUP, 48), torch.zeros(H // GROUP, 48 // 8, dtype=torch.int32),
                                  None, False, GROUP)
    _expect(awq, (1, 0, 48))
    ours = ops.weight_quant_matmul(_empty(0, H), _uint8(48, H // 2), _rand(48, H // GROUP), None, _rand(48),
                                   False, GROUP)
    _expect(ours, (0, 48))


@covers("w4a16_linear")
def _w4a16_linear(ops):
    _expect(ops.w4a16_linear(_empty(0, H), _uint8(48, H // 2), _rand(48, H // GROUP), None, GROUP), (0, 48))


def _int8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


@covers("dynamic_quant")
def _dynamic_quant(ops):
    q, scale = ops.dynamic_quant(_empty(0, H), torch.int8)
    _expect(q, (0, H), torch.int8)
    _expect(scale, (0,), torch.float32)


@covers("linear_w8a8")
def _linear_w8a8(ops):
    out = ops.linear_w8a8(_empty(0, H, dtype=torch.int8), _int8(48, H), _empty(0, dtype=torch.float32),
                          _rand(48, 1, dtype=torch.float32), DTYPE, torch.int8, _rand(48))
    _expect(out, (0, 48))


@covers("rms_norm_w8a8")
def _rms_norm_w8a8(ops):
    q, scale = ops.rms_norm_w8a8(_empty(0, H), _rand(H), 1e-6, torch.int8)
    _expect(q, (0, H), torch.int8)
    _expect(scale, (0,), torch.float32)


@covers("add_rms_norm_w8a8")
def _add_rms_norm_w8a8(ops):
    residual = _empty(0, H)
    q, scale, res = ops.add_rms_norm_w8a8(_empty(0, H), residual, _rand(H), 1e-6, torch.int8)
    _expect(q, (0, H), torch.int8)
    _expect(scale, (0,), torch.float32)
    _expect(res, (0, H))


@covers("fused_moe_w8a8")
def _fused_moe_w8a8(ops):
    out = ops.fused_moe_w8a8(_empty(0, H), _int8(E, 2 * I, H), _rand(E, 2 * I, 1, dtype=torch.float32),
                             _int8(E, H, I), _rand(E, H, 1, dtype=torch.float32),
                             torch.empty(0, TOP_K, dtype=torch.float32), torch.empty(0, TOP_K, dtype=torch.int32),
                             TOP_K, True)
    _expect(out, (0, H))


def _latent_cache():
    return _rand(NB, BS, L + R)


@covers("fill_mla_cache")
def _fill_mla_cache(ops):
    cache = _latent_cache()
    before = cache.clone()
    assert ops.fill_mla_cache(_empty(0, L), _empty(0, R), cache, torch.zeros(0, 1, dtype=torch.int64)) is cache
    assert torch.equal(cache, before)


@covers("mla_decode")
def _mla_decode(ops):
    out = _empty(0, MLA_HEADS, L)
    result = ops.mla_decode(_empty(0, MLA_HEADS, L), _empty(0, MLA_HEADS, R), _latent_cache(),
                            torch.zeros(0, 2, dtype=torch.int32), _no_lengths(), 0.1, attn_output=out)
    assert result is out


@covers("mla_prefill")
def _mla_prefill(ops):
    out = ops.mla_prefill(_empty(0, MLA_HEADS, QK_NOPE + R), _latent_cache(), torch.zeros(0, 2, dtype=torch.int32),
                          torch.zeros(1, dtype=torch.int32), _no_lengths(), _rand(MLA_HEADS * (QK_NOPE + V_DIM), L),
                          qk_nope_head_dim=QK_NOPE, v_head_dim=V_DIM, scale=0.1)
    _expect(out, (0, MLA_HEADS, V_DIM))


def test_every_served_op_has_an_empty_batch_case():
    assert sorted(EMPTY_CASES) == sorted(dlinfer_ops.__all__)


@pytest.mark.parametrize("op", sorted(EMPTY_CASES))
def test_zero_tokens(dlinfer_ours, ops_tier, op):
    torch.manual_seed(0)
    EMPTY_CASES[op](dlinfer_ours)
