"""Attention ops: varlen, paged prefill, paged decode (common/ops/attention.py).

Every case runs through the public function twice, as the torch reference
and as the Triton kernel (TRITON_INTERPRET=1 on CPU), and both are compared
with `_expected_f64`: a per-query float64 loop written here from the
documented semantics (it shares no code with the op module). Outputs are
poisoned with NaN first, the paged cache's unused slots hold NaN and unused
block-table entries point far outside the cache, so anything read or left
unwritten by mistake shows up. Fixtures ``ops_impl`` (which implementation)
and ``close`` (dtype tolerances vs float64) come from tests/ops/conftest.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from maca_infer.common.ops import _dispatch, _launch
from maca_infer.common.ops import _split_kv
from maca_infer.common.ops import attention as attn

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# --------------------------------------------------------------------------
# Independent float64 computation
# --------------------------------------------------------------------------
def _visible(query_pos: int, key_pos: int, causal: bool, window: int | None) -> bool:
    if causal and key_pos > query_pos:
        return False
    if window is not None:
        if key_pos <= query_pos - window:
            return False
        if not causal and key_pos >= query_pos + window:
            return False
    return True


def _expected_f64(q, k, v, *, causal=True, window=None, softcap=None, alibi=None, scale=None):
    """One sequence: q [Lq, Hq, D], k [Lk, Hk, D], v [Lk, Hk, Dv] -> (out, lse) float64.

    Query i sits at position Lk - Lq + i; each (query, head) is computed on its
    own from the explicit list of keys it may see.
    """
    q_len, num_q_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[:2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(q_len, num_q_heads, v.shape[2], dtype=torch.float64)
    lse = torch.full((q_len, num_q_heads), -math.inf, dtype=torch.float64)
    for i in range(q_len):
        pos = kv_len - q_len + i
        keys = [j for j in range(kv_len) if _visible(pos, j, causal, window)]
        if not keys:
            continue
        idx = torch.tensor(keys)
        for h in range(num_q_heads):
            kv_head = h // group
            s = (k[idx, kv_head].double() @ q[i, h].double()) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            if alibi is not None:
                s = s + float(alibi[h]) * (idx - pos).double()
            lse[i, h] = torch.logsumexp(s, dim=0)
            out[i, h] = torch.softmax(s, dim=0) @ v[idx, kv_head].double()
    return out, lse


# --------------------------------------------------------------------------
# Building inputs
# --------------------------------------------------------------------------
def _sequences(kv_lens, num_kv_heads, head_dim, head_dim_v, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype) for n in kv_lens]
    values = [torch.randn(n, num_kv_heads, head_dim_v, generator=gen).to(dtype) for n in kv_lens]
    return keys, values


def _paged_cache(keys, values, block_size, seed, spare_blocks=3, spare_columns=2):
    """Scatters each sequence into shuffled blocks; free slots hold NaN.

    Returns key_cache, value_cache, block_table (int32) whose entries past a
    sequence's last block point outside the cache.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    blocks_per_seq = [-(-k.shape[0] // block_size) for k in keys]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    num_kv_heads, head_dim = keys[0].shape[1:]
    head_dim_v = values[0].shape[2]
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=keys[0].dtype)
    value_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim_v), float("nan"),
                             dtype=values[0].dtype)
    width = max(blocks_per_seq) + spare_columns
    block_table = torch.full((len(keys), width), num_blocks + 10_000, dtype=torch.int32)
    used = 0
    for b, (k, v) in enumerate(zip(keys, values)):
        for logical in range(blocks_per_seq[b]):
            physical = int(order[used])
            used += 1
            block_table[b, logical] = physical
            rows = slice(logical * block_size, min((logical + 1) * block_size, k.shape[0]))
            count = rows.stop - rows.start
            key_cache[physical, :count] = k[rows]
            value_cache[physical, :count] = v[rows]
    return key_cache, value_cache, block_table


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _alibi(num_heads):
    # BLOOM's slopes for a power-of-two head count, cycled: realistic magnitudes
    base = [2 ** (-8 * (i + 1) / 8) for i in range(8)]
    return torch.tensor([base[h % 8] for h in range(num_heads)], dtype=torch.float32)


FEATURES = {
    "plain": {},
    "window": {"sliding_window": 5},
    "softcap": {"logit_softcap": 1.5},
    "alibi": {"alibi_slopes": "alibi"},
    "all": {"sliding_window": 7, "logit_softcap": 3.0, "alibi_slopes": "alibi"},
}


def _options(feature, num_q_heads):
    options = dict(FEATURES[feature])
    if options.get("alibi_slopes") == "alibi":
        options["alibi_slopes"] = _alibi(num_q_heads)
    return options


def _expected_options(options):
    return dict(window=options.get("sliding_window"), softcap=options.get("logit_softcap"),
                alibi=options.get("alibi_slopes"), scale=options.get("scale"))


# --------------------------------------------------------------------------
# paged_prefill_attention
# --------------------------------------------------------------------------
# (q_len, kv_len) per sequence: 1-token sequences next to long ones, a cached
# prefix, a prefix that ends mid-block, a fresh prompt longer than a tile.
PREFILL_BATCH = [(1, 1), (5, 37), (17, 17), (1, 20), (3, 9)]
# (num_q_heads, num_kv_heads, head_dim, head_dim_v, block_size)
PREFILL_SHAPES = {
    "gqa3-d48-dv32-bs8": (6, 2, 48, 32, 8),
    "mqa-d80-bs16": (3, 1, 80, 80, 16),
    "mha-d32-bs1": (2, 2, 32, 32, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature, shape", [
    ("plain", "gqa3-d48-dv32-bs8"),
    ("window", "mqa-d80-bs16"),
    ("softcap", "gqa3-d48-dv32-bs8"),
    ("alibi", "mha-d32-bs1"),
    ("all", "gqa3-d48-dv32-bs8"),
])
def test_paged_prefill_matches_float64(ops_impl, close, dtype, feature, shape, batch=PREFILL_BATCH):
    num_q_heads, num_kv_heads, head_dim, head_dim_v, block_size = PREFILL_SHAPES[shape]
    q_lens = [ql for ql, _ in batch]
    kv_lens = [kl for _, kl in batch]
    keys, values = _sequences(kv_lens, num_kv_heads, head_dim, head_dim_v, dtype, seed=1)
    key_cache, value_cache, block_table = _paged_cache(keys, values, block_size, seed=1)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    options = _options(feature, num_q_heads)
    out = torch.full((q.shape[0], num_q_heads, head_dim_v), float("nan"), dtype=dtype)

    got = attn.paged_prefill_attention(q, key_cache, value_cache, block_table, _cu(q_lens),
                                       torch.tensor(kv_lens, dtype=torch.int32), out=out, **options)

    assert got is out
    assert _dispatch.last_impl("paged_prefill_attention") == ops_impl
    start = 0
    for b, (q_len, _) in enumerate(batch):
        expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b], **_expected_options(options))
        close(got[start:start + q_len], expected, dtype, f"sequence {b}")
        start += q_len


def test_paged_prefill_strided_query_and_output(ops_impl, close):
    """q sliced out of a fused qkv projection, out a slice of a wider buffer."""
    dtype, num_q_heads, num_kv_heads, head_dim = torch.float16, 4, 2, 32
    q_lens, kv_lens = [3, 18], [10, 18]
    keys, values = _sequences(kv_lens, num_kv_heads, head_dim, head_dim, dtype, seed=3)
    key_cache, value_cache, block_table = _paged_cache(keys, values, 8, seed=3)
    qkv = torch.randn(sum(q_lens), (num_q_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q = qkv[:, :num_q_heads * head_dim].view(-1, num_q_heads, head_dim)
    assert not q.is_contiguous()
    wide = torch.full((sum(q_lens), num_q_heads, 2 * head_dim), float("nan"), dtype=dtype)
    out = wide[:, :, :head_dim]

    attn.paged_prefill_attention(q, key_cache, value_cache, block_table, _cu(q_lens),
                                 torch.tensor(kv_lens, dtype=torch.int32), out=out)

    assert torch.isnan(wide[:, :, head_dim:]).all(), "wrote outside the out view"
    start = 0
    for b, q_len in enumerate(q_lens):
        expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b])
        close(out[start:start + q_len], expected, dtype, f"sequence {b}")
        start += q_len


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_large_head_dims(ops_impl, close, dtype):
    """head_dim 192 with head_dim_v 128 (DeepSeek-style prefill), 256 (Gemma) in decode."""
    q_lens, kv_lens = [2, 9], [11, 9]
    keys, values = _sequences(kv_lens, 1, 192, 128, dtype, seed=9)
    key_cache, value_cache, block_table = _paged_cache(keys, values, 16, seed=9)
    q = torch.randn(sum(q_lens), 2, 192).to(dtype)
    got = attn.paged_prefill_attention(q, key_cache, value_cache, block_table, _cu(q_lens),
                                       torch.tensor(kv_lens, dtype=torch.int32), max_seqlen_q=max(q_lens))
    start = 0
    for b, q_len in enumerate(q_lens):
        expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b])
        close(got[start:start + q_len], expected, dtype, f"prefill sequence {b}")
        start += q_len
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, None, 2, 1, 256, 256, 16, [20, 5])
    got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, num_kv_splits=2,
                                           return_lse=True)
    _check_decode(close, q, keys, values, got, lse, dtype, {})


# --------------------------------------------------------------------------
# varlen_attention
# --------------------------------------------------------------------------
VARLEN_CASES = {
    # name: (q_lens, k_lens, causal, sliding_window)
    "causal": ([1, 19, 6], [1, 19, 6], True, None),
    "causal-prefix": ([4, 1, 7], [21, 9, 7], True, None),
    # q_len > k_len: the first queries see no key -> 0
    "causal-more-queries": ([6, 2], [3, 5], True, None),
    "bidirectional": ([7, 1, 18], [7, 1, 18], False, None),
    "bidirectional-window": ([17, 5], [17, 9], False, 4),
    "causal-window": ([18, 3], [18, 12], True, 6),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_matches_float64(ops_impl, close, dtype, case):
    q_lens, k_lens, causal, window = VARLEN_CASES[case]
    num_q_heads, num_kv_heads, head_dim, head_dim_v = 6, 3, 48, 64
    keys, values = _sequences(k_lens, num_kv_heads, head_dim, head_dim_v, dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    out = torch.full((q.shape[0], num_q_heads, head_dim_v), float("nan"), dtype=dtype)

    got = attn.varlen_attention(q, torch.cat(keys), torch.cat(values), _cu(q_lens), _cu(k_lens),
                                causal=causal, sliding_window=window, out=out)

    assert got is out
    assert _dispatch.last_impl("varlen_attention") == ops_impl
    start = 0
    for b, q_len in enumerate(q_lens):
        expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b], causal=causal, window=window)
        close(got[start:start + q_len], expected, dtype, f"sequence {b}")
        start += q_len
    if case == "causal-more-queries":
        assert (got[:3] == 0).all(), "queries that see no key must give 0"


def test_varlen_fused_qkv_slices(ops_impl, close):
    """q, k, v are column slices of one fused projection (strided tokens)."""
    dtype, num_q_heads, num_kv_heads, head_dim = torch.float16, 4, 2, 32
    lens = [7, 20]
    qkv = torch.randn(sum(lens), (num_q_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    q, k, v = (t.view(sum(lens), -1, head_dim) for t in (q, k, v))
    got = attn.varlen_attention(q, k, v, _cu(lens), _cu(lens), max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    start = 0
    for b, n in enumerate(lens):
        expected, _ = _expected_f64(q[start:start + n], k[start:start + n], v[start:start + n])
        close(got[start:start + n], expected, dtype, f"sequence {b}")
        start += n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_varlen_diffusion_cross_attention(ops_impl, close, dtype):
    """A UNet's shapes: head_dim 40 (not a multiple of 16), bidirectional,
    77 text tokens attended by each image's 24 latents, and 8-dim heads."""
    for num_heads, head_dim, q_lens, k_lens in ((5, 40, [24, 24], [77, 77]), (3, 8, [5], [9])):
        keys, values = _sequences(k_lens, num_heads, head_dim, head_dim, dtype, seed=11)
        q = torch.randn(sum(q_lens), num_heads, head_dim).to(dtype)
        got = attn.varlen_attention(q, torch.cat(keys), torch.cat(values), _cu(q_lens), _cu(k_lens), causal=False)
        start = 0
        for b, q_len in enumerate(q_lens):
            expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b], causal=False)
            close(got[start:start + q_len], expected, dtype, f"head_dim {head_dim} sequence {b}")
            start += q_len


# --------------------------------------------------------------------------
# paged_decode_attention
# --------------------------------------------------------------------------
DECODE_KV_LENS = [1, 45, 16, 70]


def _decode_inputs(dtype, query_len, num_q_heads, num_kv_heads, head_dim, head_dim_v, block_size, kv_lens,
                   spare_columns=2, seed=6):
    keys, values = _sequences(kv_lens, num_kv_heads, head_dim, head_dim_v, dtype, seed=seed)
    key_cache, value_cache, block_table = _paged_cache(keys, values, block_size, seed=seed,
                                                       spare_columns=spare_columns)
    gen = torch.Generator().manual_seed(seed + 2)
    shape = (len(kv_lens), num_q_heads, head_dim) if query_len is None else \
        (len(kv_lens), query_len, num_q_heads, head_dim)
    q = torch.randn(shape, generator=gen).to(dtype)
    return q, keys, values, key_cache, value_cache, block_table, torch.tensor(kv_lens, dtype=torch.int32)


def _check_decode(close, q, keys, values, got, lse, dtype, options):
    q4 = q.unsqueeze(1) if q.dim() == 3 else q
    got4 = got.unsqueeze(1) if q.dim() == 3 else got
    lse3 = lse.unsqueeze(1) if q.dim() == 3 else lse
    for b in range(q4.shape[0]):
        expected, expected_lse = _expected_f64(q4[b], keys[b], values[b], **_expected_options(options))
        close(got4[b], expected, dtype, f"sequence {b} output")
        finite = torch.isfinite(expected_lse)
        assert torch.equal(torch.isfinite(lse3[b]), finite), f"sequence {b}: lse -inf pattern differs"
        lse_err = (lse3[b].double() - expected_lse)[finite].abs().max().item() if finite.any() else 0.0
        assert lse_err < 1e-3 if dtype != torch.float32 else lse_err < 1e-5, f"sequence {b}: lse error {lse_err}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature, query_len, num_kv_splits, block_size", [
    ("plain", None, 1, 16),      # q [B, Hq, D], one program per (sequence, KV head)
    ("plain", None, 3, 8),       # split-KV + reduction
    ("window", 3, 2, 8),         # multi-token decode (MTP) with a window
    ("softcap", None, None, 32),  # auto split count
    ("alibi", 2, 4, 16),
    ("all", 4, 3, 8),
])
def test_paged_decode_matches_float64(ops_impl, close, dtype, feature, query_len, num_kv_splits, block_size):
    num_q_heads, num_kv_heads, head_dim, head_dim_v = 6, 2, 48, 32
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, query_len, num_q_heads, num_kv_heads, head_dim, head_dim_v, block_size, DECODE_KV_LENS)
    options = _options(feature, num_q_heads)
    out = torch.full(q.shape[:-1] + (head_dim_v,), float("nan"), dtype=dtype)

    got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens,
                                           num_kv_splits=num_kv_splits, return_lse=True, out=out, **options)

    assert got is out
    assert lse.shape == q.shape[:-2] + (num_q_heads,) and lse.dtype == torch.float32
    assert _dispatch.last_impl("paged_decode_attention") == ops_impl
    _check_decode(close, q, keys, values, got, lse, dtype, options)


# --------------------------------------------------------------------------
# The device branch: what a MACA / CUDA card runs (device tile sizes, fp16/bf16
# tl.dot inputs), here in the interpreter (conftest.device_branch)
# --------------------------------------------------------------------------
# several 64-query and 64-key tiles per sequence: the online-softmax rescale
# between key tiles and the causal bound of a later query tile both matter
DEVICE_PREFILL_BATCH = [(70, 150), (1, 1), (5, 100), (17, 17)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feature, shape", [("plain", "gqa3-d48-dv32-bs8"), ("all", "mqa-d80-bs16")])
def test_paged_prefill_device_branch(device_branch, close, dtype, feature, shape):
    test_paged_prefill_matches_float64(device_branch, close, dtype, feature, shape, batch=DEVICE_PREFILL_BATCH)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feature, query_len, num_kv_splits", [
    ("plain", None, 1),   # one split walks three 64-key tiles
    ("softcap", 2, 2),    # split-KV + merge, multi-token decode
    ("all", 3, 1),
])
def test_paged_decode_device_branch(device_branch, close, dtype, feature, query_len, num_kv_splits):
    num_q_heads, num_kv_heads, head_dim, head_dim_v = 6, 2, 48, 32
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, query_len, num_q_heads, num_kv_heads, head_dim, head_dim_v, 16, [1, 190, 64, 70])
    options = _options(feature, num_q_heads)
    got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens,
                                           num_kv_splits=num_kv_splits, return_lse=True, **options)
    assert _dispatch.last_impl("paged_decode_attention") == "triton"
    _check_decode(close, q, keys, values, got, lse, dtype, options)


def test_paged_decode_without_lse_and_with_more_queries_than_keys(ops_impl, close):
    """q_len > kv_len for one sequence: its first queries see nothing (0, lse -inf);
    kv_len 0 (a padding slot of a captured graph batch) gives 0 everywhere."""
    dtype = torch.float32
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, 3, 4, 4, 16, 16, 8, [2, 30, 0])
    plain = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, num_kv_splits=2)
    assert isinstance(plain, torch.Tensor)
    got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, num_kv_splits=2,
                                           return_lse=True)
    assert torch.equal(plain, got)
    assert (got[0, 0] == 0).all() and torch.isinf(lse[0, 0]).all() and (lse[0, 0] < 0).all()
    assert (got[2] == 0).all() and (lse[2] == float("-inf")).all()
    _check_decode(close, q, keys, values, got, lse, dtype, {})


def test_paged_decode_window_far_from_the_start(ops_impl, close):
    """Every sequence longer than its window: the visible keys start blocks
    into the sequence (the reference gathers from there, the kernel starts its
    key loop there)."""
    dtype = torch.bfloat16
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, 2, 4, 2, 32, 32, 8, [40, 33, 57])
    options = {"sliding_window": 6, "alibi_slopes": _alibi(4)}
    got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, num_kv_splits=2,
                                           return_lse=True, **options)
    _check_decode(close, q, keys, values, got, lse, dtype, options)


def test_paged_decode_auto_splits_long_block_table(ops_impl, close):
    """A wide block table makes the auto rule split; results still match float64."""
    dtype, block_size = torch.bfloat16, 16
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, None, 4, 1, 32, 32, block_size, [90, 3], spare_columns=40)
    capacity = block_table.shape[1] * block_size
    assert _split_kv.auto_num_kv_splits(2 * 1, capacity, q.device) > 1  # 2 sequences x 1 KV head
    got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, return_lse=True)
    _check_decode(close, q, keys, values, got, lse, dtype, {})


# --------------------------------------------------------------------------
# Extremes a device meets: large logits, long contexts
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_logits(any_branch, close, dtype):
    """Scores x100 (|s| in the hundreds): exp without the running max overflows float32."""
    num_q_heads, num_kv_heads, head_dim = 4, 2, 32
    options = {"scale": 100.0 / math.sqrt(head_dim)}
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, None, num_q_heads, num_kv_heads, head_dim, head_dim, 16, [150, 9])
    got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, num_kv_splits=2,
                                           return_lse=True, **options)
    _check_decode(close, q, keys, values, got, lse, dtype, options)
    lens = [(20, 150), (3, 9)]
    prefill_q = torch.randn(23, num_q_heads, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = attn.paged_prefill_attention(prefill_q, key_cache, value_cache, block_table, _cu([20, 3]), kv_seqlens,
                                       **options)
    start = 0
    for b, (q_len, _) in enumerate(lens):
        expected, _ = _expected_f64(prefill_q[start:start + q_len], keys[b], values[b], **_expected_options(options))
        close(got[start:start + q_len], expected, dtype, f"prefill sequence {b}")
        start += q_len


def test_long_context_decode_split_kv(any_branch, close):
    """4100 keys cut into KV splits (explicit and auto) next to a 3-key sequence."""
    dtype = torch.float16
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, None, 4, 1, 32, 32, 16, [4100, 3])
    for splits in (8, None):
        got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens,
                                               num_kv_splits=splits, return_lse=True)
        _check_decode(close, q, keys, values, got, lse, dtype, {})


def test_long_context_prefill_with_cached_prefix(any_branch, close, monkeypatch):
    """40 new tokens after a 1060-token cached prefix; the reference scores queries in chunks."""
    monkeypatch.setattr(attn, "_REFERENCE_MAX_SCORES", 1 << 14)  # ~8 queries per chunk at this size
    dtype = torch.float16
    batch = [(40, 1100), (3, 3)]
    keys, values = _sequences([kl for _, kl in batch], 1, 32, 32, dtype, seed=4)
    key_cache, value_cache, block_table = _paged_cache(keys, values, 16, seed=4)
    q = torch.randn(43, 2, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = attn.paged_prefill_attention(q, key_cache, value_cache, block_table, _cu([40, 3]),
                                       torch.tensor([1100, 3], dtype=torch.int32), sliding_window=1030)
    start = 0
    for b, (q_len, _) in enumerate(batch):
        expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b], window=1030)
        close(got[start:start + q_len], expected, dtype, f"sequence {b}")
        start += q_len


# --------------------------------------------------------------------------
# Dispatch and validation
# --------------------------------------------------------------------------
def test_auto_mode_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("MACA_INFER_OPS_IMPL", raising=False)
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        torch.float32, None, 2, 1, 16, 16, 8, [5])
    attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens)
    assert _dispatch.last_impl("paged_decode_attention") == "reference"


def _valid_decode_args():
    q, _, _, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        torch.float16, None, 4, 2, 32, 32, 8, [5, 9])
    return dict(q=q, key_cache=key_cache, value_cache=value_cache, block_table=block_table, kv_seqlens=kv_seqlens)


def _call_decode(args, **options):
    return attn.paged_decode_attention(args["q"], args["key_cache"], args["value_cache"], args["block_table"],
                                       args["kv_seqlens"], **options)


@pytest.mark.parametrize("change, options, message", [
    (lambda a: a.update(q=a["q"].float()), {}, "dtype"),
    (lambda a: a.update(q=torch.randn(2, 4, 36).half(), key_cache=torch.randn(4, 8, 2, 36).half(),
                        value_cache=torch.randn(4, 8, 2, 36).half()), {}, "head_dim=36"),
    (lambda a: a.update(q=torch.randn(2, 3, 32).half()), {}, "num_q_heads=3"),
    (lambda a: a.update(q=torch.randn(2, 9, 4, 32).half()), {}, "q_len=9"),
    (lambda a: a.update(key_cache=torch.randn(4, 12, 2, 32).half(), value_cache=torch.randn(4, 12, 2, 32).half()),
     {}, "block_size=12"),
    (lambda a: a.update(block_table=a["block_table"].float()), {}, "block_table has dtype"),
    (lambda a: a.update(kv_seqlens=a["kv_seqlens"][:1]), {}, "kv_seqlens"),
    (lambda a: a.update(q=torch.randn(2, 4, 64).half()[..., ::2]), {}, "contiguous last dimension"),
    (lambda a: a.update(kv_seqlens=a["kv_seqlens"].to("meta")), {}, "one device"),
    (lambda a: None, {"sliding_window": 0}, "sliding_window=0"),
    (lambda a: None, {"logit_softcap": -1.0}, "logit_softcap=-1.0"),
    (lambda a: None, {"scale": 0.0}, "scale=0.0"),
    (lambda a: None, {"num_kv_splits": 0}, "num_kv_splits=0"),
    (lambda a: None, {"alibi_slopes": torch.ones(3)}, "alibi_slopes must be"),
    (lambda a: None, {"alibi_slopes": torch.ones(4, dtype=torch.float16)}, "alibi_slopes has dtype"),
    (lambda a: None, {"out": torch.empty(2, 4, 16).half()}, "out has shape"),
])
def test_decode_rejects_bad_input(change, options, message):
    args = _valid_decode_args()
    change(args)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _call_decode(args, **options)


def test_prefill_and_varlen_reject_bad_input():
    q = torch.randn(5, 4, 32).half()
    k = torch.randn(5, 2, 32).half()
    cu = _cu([2, 3])
    with pytest.raises(ValueError, match="dtypes?|dtype"):
        attn.varlen_attention(q, k.float(), k, cu, cu)
    with pytest.raises(ValueError, match="head_dim"):
        attn.varlen_attention(q, torch.randn(5, 2, 48).half(), k, cu, cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attn.varlen_attention(q, k, k, cu, _cu([5]))
    with pytest.raises(ValueError, match="cu_seqlens_q has dtype"):
        attn.varlen_attention(q, k, k, cu.float(), cu)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        attn.varlen_attention(q, k, k, cu, cu, max_seqlen_q=-1)
    key_cache = torch.randn(4, 8, 2, 32).half()
    table = torch.zeros(2, 2, dtype=torch.int32)
    kv = torch.tensor([2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="value_cache"):
        attn.paged_prefill_attention(q, key_cache, torch.randn(4, 16, 2, 32).half(), table, cu, kv)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attn.paged_prefill_attention(q, key_cache, key_cache, table, _cu([1, 1, 3]), kv)
    with pytest.raises(ValueError, match="block_table"):
        attn.paged_prefill_attention(q, key_cache, key_cache, table[:1], cu, kv)
    with pytest.raises(ValueError, match="one device"):
        attn.paged_prefill_attention(q, key_cache, key_cache, table, cu, kv.to("meta"))


# --------------------------------------------------------------------------
# The compiler path (the interpreter accepts code the compiler rejects)
# --------------------------------------------------------------------------
def _compile_for_sm90(lazy_kernel, pointer_types, constexprs, float_args, launch=None):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    signature = {}
    kernel = lazy_kernel.jitted(interpret=False)  # with its shared helpers jitted for the compiler too
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    compiled = triton_compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=launch or _launch.options("decode"))
    assert compiled.asm.get("cubin"), f"{lazy_kernel.__name__}: no cubin produced"
    return compiled.metadata.shared


def compile_kernels_for_sm90() -> dict[str, int]:
    """Lowers each kernel (all features on) to a cubin; returns shared memory bytes per kernel.

    Needs a process where triton was imported with TRITON_INTERPRET unset:
    triton's own helpers (tl.cdiv, ...) are jitted for one mode at import.
    """
    floats = {"scale", "logit_softcap"}
    return {
        "prefill": _compile_for_sm90(
            attn._prefill_kernel,
            dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", out_ptr="*fp16", cu_seqlens_q_ptr="*i32",
                 kv_index_ptr="*i32", block_table_ptr="*i32", alibi_slopes_ptr="*fp32"),
            dict(QUERY_GROUP=4, HEAD_DIM=80, HEAD_DIM_V=80, BLOCK_D=128, BLOCK_DV=128, BLOCK_M=64, BLOCK_N=64,
                 PAGED=True, CAUSAL=True, USE_WINDOW=True, USE_SOFTCAP=True, USE_ALIBI=True, DOT_FP32=False),
            floats, _launch.options("prefill")),
        "decode": _compile_for_sm90(
            attn._decode_kernel,
            dict(q_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16", block_table_ptr="*i32",
                 kv_seqlens_ptr="*i32", alibi_slopes_ptr="*fp32", out_ptr="*fp32", lse_ptr="*fp32"),
            dict(QUERY_LEN=2, QUERY_GROUP=4, HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_D=128, BLOCK_DV=128, BLOCK_M=16,
                 BLOCK_N=64, USE_WINDOW=True, USE_SOFTCAP=True, USE_ALIBI=True, WRITE_LSE=True, DOT_FP32=False),
            floats),
        "merge": _compile_for_sm90(
            _split_kv._merge_kernel,
            dict(partial_out_ptr="*fp32", partial_lse_ptr="*fp32", out_ptr="*bf16", lse_ptr="*fp32"),
            dict(HEAD_DIM_V=128, BLOCK_DV=128, BLOCK_S=8, WRITE_LSE=True), set()),
    }


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_target():
    """The interpreter accepts code the compiler rejects: lower every kernel for
    sm_90 in a fresh process (no GPU needed; ptxas ships with triton)."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('attention_tests', {__file__!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(json.dumps(module.compile_kernels_for_sm90()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(shared) == {"prefill", "decode", "merge"}
    for name, size in shared.items():
        # must fit a 64 KiB shared memory (MACA-class parts), not only an H100's
        assert size <= 64 * 1024, f"{name}: {size} bytes of shared memory"
