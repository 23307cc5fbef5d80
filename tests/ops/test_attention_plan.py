"""Plan once per batch, run per layer (issue #12, part 5): plan_paged_decode / plan_mla_decode.

A plan made once serves several "layers" (different caches and queries, one
batch): each planned call must equal the unplanned call on the same inputs
(the same code runs, so exactly), and both must match the float64 math of
tests/ops/test_attention.py. A plan that does not fit its inputs (another
batch, other heads, another dtype) raises a clear error.
"""

from __future__ import annotations

import pytest
import torch

from maca_infer.common.ops import attention as attn
from maca_infer.common.ops import mla

from tests.ops.test_attention import _check_decode, _cu, _decode_inputs, _expected_f64, _options, _sequences
from tests.ops.test_mla import PagedLatents, decode_float64

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_V = 6, 2, 48, 32


def _layers(dtype, query_len, block_size, kv_lens, count):
    """``count`` layers of one batch: their own caches and q, one block table and one set of lengths."""
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, query_len, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_V, block_size, kv_lens)
    layers = []
    for i in range(count):
        scale_k, scale_q = 1.0 + 0.25 * i, 1.0 - 0.1 * i
        layers.append((q * scale_q, [k * scale_k for k in keys], values, key_cache * scale_k, value_cache))
    return layers, block_table, kv_seqlens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("query_len, num_kv_splits, block_size", [(None, None, 16), (3, 2, 8), (2, 3, 8)])
def test_planned_decode_equals_unplanned_and_float64(ops_impl, close, dtype, query_len, num_kv_splits, block_size):
    """Four layers on one plan, each with other options (window, softcap, ALiBi, none): the
    per-window memo and the split-KV scratch shared by the layers must not leak between them."""
    kv_lens = [1, 40, 17, 70]
    layers, block_table, kv_seqlens = _layers(dtype, query_len, block_size, kv_lens, 4)
    plan = attn.plan_paged_decode(block_table, kv_seqlens, num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS,
                                  head_dim=HEAD_DIM, head_dim_v=HEAD_DIM_V, block_size=block_size, dtype=dtype,
                                  query_len=query_len or 1, num_kv_splits=num_kv_splits)
    features = ["window", "softcap", "all", "plain"]
    planned = []
    for (q, keys, values, key_cache, value_cache), feature in zip(layers, features):
        options = _options(feature, NUM_Q_HEADS)
        planned.append(attn.paged_decode_attention(q, key_cache, value_cache, plan=plan, return_lse=True, **options))
    for (q, keys, values, key_cache, value_cache), feature, (got, lse) in zip(layers, features, planned):
        options = _options(feature, NUM_Q_HEADS)
        want, want_lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens,
                                                     num_kv_splits=num_kv_splits, return_lse=True, **options)
        assert torch.equal(got, want), feature
        assert torch.equal(lse, want_lse), feature
        _check_decode(close, q, keys, values, got, lse, dtype, options)


def test_planned_decode_block_table_and_lengths_may_be_passed_again(ops_impl):
    q, _, _, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        torch.float32, None, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_V, 8, [5, 9])
    plan = attn.plan_paged_decode(block_table, kv_seqlens, num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS,
                                  head_dim=HEAD_DIM, head_dim_v=HEAD_DIM_V, block_size=8, dtype=torch.float32)
    a = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, plan=plan)
    b = attn.paged_decode_attention(q, key_cache, value_cache, plan=plan)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="block_table was passed with a plan made for another one"):
        attn.paged_decode_attention(q, key_cache, value_cache, block_table.clone(), plan=plan)
    with pytest.raises(ValueError, match="num_kv_splits was passed with a plan"):
        attn.paged_decode_attention(q, key_cache, value_cache, plan=plan, num_kv_splits=2)


def _plan_for(batch_lens, **overrides):
    """A plan for a float16 batch with block size 8 (``overrides`` change what the plan is asked for)."""
    q, _, _, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        torch.float16, None, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_V, 8, batch_lens)
    kwargs = dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, head_dim_v=HEAD_DIM_V,
                  block_size=8, dtype=torch.float16)
    kwargs.update(overrides)
    return attn.plan_paged_decode(block_table, kv_seqlens, **kwargs), q, key_cache, value_cache


@pytest.mark.parametrize("make_inputs, message", [
    # q of another batch (3 sequences against a 2-sequence plan)
    (lambda q, k, v: (torch.cat([q, q[:1]]), k, v), r"q has shape \(3, 6, 48\) does not match the plan \(batch=2"),
    # other head counts
    (lambda q, k, v: (q[:, :4], k, v), r"q has shape \(2, 4, 48\) does not match the plan"),
    (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), r"key_cache has shape .* does not match the plan .*num_kv_heads=2"),
    # multi-token q against a one-token plan
    (lambda q, k, v: (q.unsqueeze(1).expand(-1, 2, -1, -1), k, v), r"q has shape \(2, 2, 6, 48\)"),
    (lambda q, k, v: (q.float(), k, v), "q has dtype float32 does not match the plan .*dtype=float16"),
    (lambda q, k, v: (q, k.float(), v), "key_cache has dtype float32 does not match the plan"),
    (lambda q, k, v: (q, k, v[..., :16]), r"value_cache has shape .* does not match the plan .*head_dim_v=32"),
])
def test_planned_decode_rejects_inputs_the_plan_was_not_made_for(ops_impl, make_inputs, message):
    plan, q, key_cache, value_cache = _plan_for([5, 9])
    q, key_cache, value_cache = make_inputs(q, key_cache, value_cache)
    with pytest.raises(ValueError, match=message):
        attn.paged_decode_attention(q, key_cache, value_cache, plan=plan)


def test_planned_decode_rejects_a_foreign_plan_and_missing_metadata():
    plan, q, key_cache, value_cache = _plan_for([5, 9])
    with pytest.raises(ValueError, match="plan must be a DecodePlan"):
        attn.paged_decode_attention(q, key_cache, value_cache, plan=object())
    with pytest.raises(ValueError, match="block_table and kv_seqlens are required without a plan"):
        attn.paged_decode_attention(q, key_cache, value_cache)


@pytest.mark.parametrize("overrides, message", [
    ({"num_q_heads": 5}, "num_q_heads=5 must be a multiple of num_kv_heads=2"),
    ({"head_dim": 36}, "head_dim=36 is not supported"),
    ({"block_size": 12}, "block_size=12 is not supported"),
    ({"query_len": 9}, "q_len=9 is not supported"),
    ({"num_kv_splits": 0}, "num_kv_splits=0 is not supported"),
    ({"dtype": torch.int8}, "dtype=torch.int8 is not supported"),
])
def test_plan_paged_decode_rejects_bad_metadata(overrides, message):
    with pytest.raises(ValueError, match=message):
        _plan_for([5, 9], **overrides)


def test_plan_paged_decode_rejects_bad_tables():
    _, q, _, _ = _plan_for([5, 9])
    table = torch.zeros(2, 3, dtype=torch.int32)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    kwargs = dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, block_size=8,
                  dtype=torch.float16)
    with pytest.raises(ValueError, match="block_table has dtype float32"):
        attn.plan_paged_decode(table.float(), lens, **kwargs)
    with pytest.raises(ValueError, match=r"block_table has rows \(batch, from kv_seqlens\) 3, expected 2"):
        attn.plan_paged_decode(torch.zeros(3, 3, dtype=torch.int32), lens, **kwargs)
    with pytest.raises(ValueError, match="one device"):
        attn.plan_paged_decode(table, lens.to("meta"), **kwargs)


# --------------------------------------------------------------------------
# MLA decode
# --------------------------------------------------------------------------
def _mla_layers(dtype, kv_lens, count, heads=4, rank=64, rope=16, block_size=16):
    """``count`` layers of one batch: their own latent caches and queries, one block table."""
    paged = PagedLatents(kv_lens, rank, rope, block_size, dtype, seed=5)
    gen = torch.Generator().manual_seed(11)
    layers = []
    for i in range(count):
        factor = 1.0 + 0.5 * i
        q_nope = torch.randn(len(kv_lens), heads, rank, generator=gen).to(dtype)
        q_rope = torch.randn(len(kv_lens), heads, rope, generator=gen).to(dtype)
        layers.append((q_nope, q_rope, paged.cache * factor, [x * factor for x in paged.latents]))
    return layers, paged.block_table, torch.tensor(kv_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("num_kv_splits", [None, 3])
def test_planned_mla_decode_equals_unplanned_and_float64(ops_impl, close, dtype, num_kv_splits):
    kv_lens = [2, 33, 1, 80]
    layers, table, lens = _mla_layers(dtype, kv_lens, 3)
    rank, rope = layers[0][0].shape[2], layers[0][1].shape[2]
    plan = mla.plan_mla_decode(table, lens, num_heads=4, kv_lora_rank=rank, rope_dim=rope,
                               block_size=layers[0][2].shape[1], dtype=dtype, num_kv_splits=num_kv_splits)
    results = [mla.mla_decode(q_nope, q_rope, cache, scale=0.3, plan=plan, return_lse=True)
               for q_nope, q_rope, cache, _ in layers]
    for (q_nope, q_rope, cache, latents), (got, lse) in zip(layers, results):
        want, want_lse = mla.mla_decode(q_nope, q_rope, cache, table, lens, 0.3, num_kv_splits=num_kv_splits,
                                        return_lse=True)
        assert torch.equal(got, want) and torch.equal(lse, want_lse)
        expected, expected_lse = decode_float64(q_nope, q_rope, latents, rank, 0.3)
        close(got, expected, dtype, "out")
        close(lse, expected_lse, torch.float32 if dtype == torch.float32 else torch.float16, "lse")


def test_planned_mla_decode_rejects_inputs_the_plan_was_not_made_for(ops_impl):
    layers, table, lens = _mla_layers(torch.float32, [5, 9], 1)
    q_nope, q_rope, cache, _ = layers[0]
    plan = mla.plan_mla_decode(table, lens, num_heads=4, kv_lora_rank=64, rope_dim=16, block_size=cache.shape[1],
                               dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q_nope has shape \(1, 4, 64\) does not match the plan \(batch=2"):
        mla.mla_decode(q_nope[:1], q_rope[:1], cache, scale=0.3, plan=plan)
    with pytest.raises(ValueError, match=r"q_nope has shape \(2, 2, 64\) does not match the plan .*num_heads=4"):
        mla.mla_decode(q_nope[:, :2], q_rope[:, :2], cache, scale=0.3, plan=plan)
    with pytest.raises(ValueError, match="latent_cache has dtype float16 does not match the plan"):
        mla.mla_decode(q_nope, q_rope, cache.half(), scale=0.3, plan=plan)
    with pytest.raises(ValueError, match="scale=None is not supported"):
        mla.mla_decode(q_nope, q_rope, cache, plan=plan)
    with pytest.raises(ValueError, match="kv_lora_rank=0 is not supported"):
        mla.plan_mla_decode(table, lens, num_heads=4, kv_lora_rank=0, rope_dim=16, block_size=16,
                            dtype=torch.float32)


def test_plan_chooses_the_tier_once(ops_impl, monkeypatch):
    """The tier is chosen at the plan's first layer (MACA_INFER_OPS_IMPL read once per batch)."""
    from maca_infer.common.ops import _dispatch

    plan, q, key_cache, value_cache = _plan_for([5, 9])
    chosen = []
    original = _dispatch.select_impl
    monkeypatch.setattr(_dispatch, "select_impl", lambda *a, **k: chosen.append(a[0]) or original(*a, **k))
    for _ in range(3):
        attn.paged_decode_attention(q, key_cache, value_cache, plan=plan)
    assert chosen == ["paged_decode_attention"]
    assert _dispatch.last_impl("paged_decode_attention") == ops_impl


# --------------------------------------------------------------------------
# varlen (the HF adapter's attention: one plan per forward)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("max_seqlen_q", [None, 20])
def test_planned_varlen_equals_unplanned_and_float64(ops_impl, close, dtype, max_seqlen_q):
    q_lens, k_lens = [3, 20, 1], [9, 20, 14]
    cu_q, cu_k = _cu(q_lens), _cu(k_lens)
    plan = attn.plan_varlen(cu_q, cu_k, num_q_heads=6, num_kv_heads=3, head_dim=48, head_dim_v=32, dtype=dtype,
                            max_seqlen_q=max_seqlen_q)
    for layer, (window, softcap) in enumerate([(None, None), (5, 2.0), (None, None)]):
        keys, values = _sequences(k_lens, 3, 48, 32, dtype, seed=20 + layer)
        q = torch.randn(sum(q_lens), 6, 48, generator=torch.Generator().manual_seed(layer)).to(dtype)
        k, v = torch.cat(keys), torch.cat(values)
        got = attn.varlen_attention(q, k, v, plan=plan, sliding_window=window, logit_softcap=softcap)
        want = attn.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=max_seqlen_q, sliding_window=window,
                                     logit_softcap=softcap)
        assert torch.equal(got, want)
        start = 0
        for b, q_len in enumerate(q_lens):
            expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b], window=window, softcap=softcap)
            close(got[start:start + q_len], expected, dtype, f"layer {layer} sequence {b}")
            start += q_len


def test_planned_varlen_rejects_inputs_the_plan_was_not_made_for():
    cu = _cu([2, 3])
    plan = attn.plan_varlen(cu, cu, num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float16)
    q, k = torch.randn(5, 4, 32).half(), torch.randn(5, 2, 32).half()
    with pytest.raises(ValueError, match=r"q has shape \(5, 2, 32\) does not match the plan .*num_q_heads=4"):
        attn.varlen_attention(q[:, :2], k, k, plan=plan)
    with pytest.raises(ValueError, match=r"k has shape \(5, 1, 32\) does not match the plan .*num_kv_heads=2"):
        attn.varlen_attention(q, k[:, :1], k[:, :1], plan=plan)
    with pytest.raises(ValueError, match="v has dtype float32 does not match the plan"):
        attn.varlen_attention(q, k, k.float(), plan=plan)
    with pytest.raises(ValueError, match="cu_seqlens_q was passed with a plan made for another one"):
        attn.varlen_attention(q, k, k, cu.clone(), plan=plan)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k are required without a plan"):
        attn.varlen_attention(q, k, k)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k must both be"):
        attn.plan_varlen(cu, _cu([5]), num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float16)
