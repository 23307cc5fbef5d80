"""Padded [B, H, S, D] attention with masks -> packed varlen attention.

Reference: float64 attention written out here (scores, additive/boolean
mask, softmax, fully masked rows -> 0, as torch SDPA gives), never our code.
"""

from __future__ import annotations

import math

import pytest
import torch

from maca_infer.adapters.hf import attention as packed


def reference_attention(query, key, value, attend, scale=None, softcap=None):
    """float64: query [B,Hq,Sq,D], key/value [B,Hk,Sk,D], attend [B,Sq,Sk] bool -> [B,Sq,Hq,Dv]."""
    groups = query.shape[1] // key.shape[1]
    q = query.double()
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~attend[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: 0
    return (probs @ v).transpose(1, 2)


def causal_padding_mask(lengths_valid, q_len, k_len, *, left=True, window=None):
    """[B, Sq, Sk] bool: HF-style causal mask (query i at position k_len - q_len + i) with key padding."""
    batch = len(lengths_valid)
    positions_q = torch.arange(q_len) + (k_len - q_len)
    positions_k = torch.arange(k_len)
    attend = positions_k[None, :] <= positions_q[:, None]
    if window is not None:
        attend &= positions_k[None, :] > positions_q[:, None] - window
    attend = attend.expand(batch, q_len, k_len).clone()
    for b, valid in enumerate(lengths_valid):
        key_valid = torch.zeros(k_len, dtype=torch.bool)
        if left:
            key_valid[k_len - valid:] = True
        else:
            key_valid[:valid] = True
        attend[b] &= key_valid[None, :]
    return attend


def qkv(batch, q_heads, kv_heads, q_len, k_len, head_dim=32, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda heads, length: torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)  # noqa: E731
    return make(q_heads, q_len), make(kv_heads, k_len), make(kv_heads, k_len)


def poisoned_rows(attend):
    """[B, Sq] rows no key is visible from."""
    return ~attend.any(dim=-1)


@pytest.mark.parametrize(
    "case",
    [
        dict(name="left-padded prefill", valid=[7, 4, 1], q_len=7, k_len=7, left=True),
        dict(name="right-padded prefill", valid=[7, 3], q_len=7, k_len=7, left=False),
        dict(name="decode after left padding", valid=[9, 5], q_len=1, k_len=9, left=True),
        dict(name="chunk after a cached prefix", valid=[12, 8], q_len=3, k_len=12, left=True),
        dict(name="sliding window", valid=[11, 6], q_len=11, k_len=11, left=True, window=4),
    ],
    ids=lambda c: c["name"],
)
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_padded_masks_match_reference(case, mask_kind):
    attend = causal_padding_mask(case["valid"], case["q_len"], case["k_len"], left=case["left"], window=case.get("window"))
    query, key, value = qkv(len(case["valid"]), 4, 2, case["q_len"], case["k_len"])
    mask = attend[:, None]
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        if poisoned_rows(attend).any():  # finite bias on a fully blocked row averages the keys: not packable
            with pytest.raises(packed.UnsupportedAttention, match="blocks every key"):
                packed.sdpa_equivalent(query, key, value, mask)
            return
    out = packed.sdpa_equivalent(query, key, value, mask, sliding_window=case.get("window"))
    expected = reference_attention(query, key, value, attend)
    assert out.shape == expected.shape
    # every query, padding ones included, as the stock attention computes it
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


def test_static_cache_prefill_with_empty_future_slots():
    """A static cache hands over Sk = max_cache_len keys; slots past the prompt are masked for everyone."""
    q_len, cache_len = 5, 12
    attend = (torch.arange(cache_len)[None, :] <= torch.arange(q_len)[:, None]).expand(2, q_len, cache_len).clone()
    attend[1, :, :2] = False  # left padding in row 1
    query, key, value = qkv(2, 4, 2, q_len, cache_len)
    out = packed.sdpa_equivalent(query, key, value, attend[:, None])
    torch.testing.assert_close(out.double(), reference_attention(query, key, value, attend), atol=2e-5, rtol=1e-5)
    plan = packed.plan_from_mask(attend[:, None], 2, q_len, cache_len)
    assert plan.causal and plan.cu_seqlens_k.tolist() == [0, 5, 8]


def test_right_padding_queries_run_as_their_own_full_attention():
    attend = causal_padding_mask([6, 3], 6, 6, left=False)
    plan = packed.plan_from_mask(attend[:, None], 2, 6, 6)
    assert plan.causal and plan.cu_seqlens_q.tolist() == [0, 6, 9]
    # row 1's padding queries 3..5 all see keys 0..2: one non-causal sequence
    assert plan.extra is not None and not plan.extra.causal
    assert plan.extra.q_index.tolist() == [9, 10, 11] and plan.extra.k_index.tolist() == [6, 7, 8]


def test_plan_packs_only_visible_rows():
    attend = causal_padding_mask([5, 2], 5, 5, left=True)
    plan = packed.plan_from_mask(attend[:, None], 2, 5, 5)
    assert plan.causal and plan.sliding_window is None
    assert plan.cu_seqlens_q.tolist() == [0, 5, 7] and plan.cu_seqlens_k.tolist() == [0, 5, 7]
    assert plan.q_index.tolist() == [0, 1, 2, 3, 4, 8, 9]


def test_window_only_when_the_mask_needs_it():
    short = causal_padding_mask([3, 3], 3, 3, window=8)  # window longer than the sequence: plain causal
    assert packed.plan_from_mask(short[:, None], 2, 3, 3, sliding_window=8).sliding_window is None
    long = causal_padding_mask([10, 10], 10, 10, window=3)
    assert packed.plan_from_mask(long[:, None], 2, 10, 10, sliding_window=3).sliding_window == 3
    with pytest.raises(packed.UnsupportedAttention):  # a windowed mask without knowing the window
        packed.plan_from_mask(long[:, None], 2, 10, 10, sliding_window=None)


def test_no_mask_matches_sdpa_semantics():
    query, key, value = qkv(2, 4, 4, 5, 8)
    # SDPA's is_causal is top-left: query i sees keys j <= i (keys past Sq never)
    attend = (torch.arange(8)[None, :] <= torch.arange(5)[:, None]).expand(2, 5, 8)
    out = packed.sdpa_equivalent(query, key, value, None, is_causal=True)
    torch.testing.assert_close(out.double(), reference_attention(query, key, value, attend), atol=2e-5, rtol=1e-5)
    out = packed.sdpa_equivalent(query, key, value, None, is_causal=False, scale=0.3)
    full = torch.ones(2, 5, 8, dtype=torch.bool)
    torch.testing.assert_close(out.double(), reference_attention(query, key, value, full, scale=0.3), atol=2e-5, rtol=1e-5)


def test_key_padding_mask_non_causal_gqa_and_softcap():
    query, key, value = qkv(3, 6, 2, 5, 7, head_dim=16)
    key_valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    attend = key_valid[:, None, :].expand(3, 5, 7)
    out = packed.sdpa_equivalent(query, key, value, key_valid[:, None, None, :], logit_softcap=5.0)
    torch.testing.assert_close(
        out.double(), reference_attention(query, key, value, attend, softcap=5.0), atol=2e-5, rtol=1e-5
    )


def test_half_precision_against_float64():
    attend = causal_padding_mask([6, 3], 6, 6)
    query, key, value = qkv(2, 4, 2, 6, 6, dtype=torch.bfloat16)
    out = packed.sdpa_equivalent(query, key, value, attend[:, None])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference_attention(query, key, value, attend), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "name, make_mask",
    [
        ("random holes", lambda: torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.4),
        # two sequences packed in one row (block-diagonal causal): not one causal sequence per row
        ("packed sequences", lambda: torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).bool().tril()[None, None].expand(2, 1, 6, 6)),
        ("per-head masks", lambda: torch.stack([torch.ones(6, 6).bool(), torch.ones(6, 6).tril().bool()])[None].expand(2, 2, 6, 6)),
        ("float bias", lambda: torch.randn(2, 1, 6, 6)),
    ],
)
def test_masks_we_cannot_pack_are_refused(name, make_mask):
    query, key, value = qkv(2, 2, 2, 6, 6)
    with pytest.raises(packed.UnsupportedAttention):
        packed.sdpa_equivalent(query, key, value, make_mask())


def test_unsupported_shapes_and_autograd_are_refused():
    query, key, value = qkv(1, 2, 2, 4, 4, head_dim=24)
    with pytest.raises(packed.UnsupportedAttention, match="head_dim=24"):
        packed.sdpa_equivalent(query, key, value, None)
    query, key, value = qkv(1, 3, 2, 4, 4)
    with pytest.raises(packed.UnsupportedAttention, match="3 query heads over 2"):
        packed.sdpa_equivalent(query, key, value, None)
    query, key, value = qkv(1, 2, 2, 4, 4)
    with pytest.raises(packed.UnsupportedAttention, match="autograd"):
        packed.sdpa_equivalent(query.requires_grad_(), key, value, None)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_layers_of_a_forward_share_one_ops_plan(monkeypatch, with_mask):
    """Issue #12 (5): the layers of a forward (one mask, or none) make one varlen plan between
    them; each layer's result stays the float64 one."""
    from maca_infer.common.ops import attention

    packed.dense_plan.cache_clear()  # a plan remembered by an earlier test would already hold its ops plan
    made = []
    original = attention.plan_varlen
    monkeypatch.setattr(attention, "plan_varlen", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    attend = causal_padding_mask([7, 4], 7, 7, left=True)
    mask = attend[:, None] if with_mask else None
    if not with_mask:
        attend = causal_padding_mask([7, 7], 7, 7)
    for layer in range(3):
        query, key, value = qkv(2, 4, 2, 7, 7, seed=layer)
        out = packed.sdpa_equivalent(query, key, value, mask, is_causal=not with_mask)
        torch.testing.assert_close(out.double(), reference_attention(query, key, value, attend), atol=2e-5,
                                   rtol=1e-5)
    assert len(made) == 1
