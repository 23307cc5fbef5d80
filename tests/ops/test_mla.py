"""MLA: fill_mla_cache, mla_decode (absorbed) and mla_prefill (non-absorbed).

The float64 answers are computed from each sequence's latents as generated,
in position order, before the test scatters them into the paged cache
(block tables out of order, blocks shared by nobody, padding slots), so a
wrong block lookup cannot cancel out.
"""

from __future__ import annotations

import math

import pytest
import torch

from maca_infer.common.ops import _dispatch
from maca_infer.common.ops.mla import fill_mla_cache, mla_decode, mla_prefill

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PagedLatents:
    """Per-sequence latents [kv_len, L + R] scattered into a paged cache by hand."""

    def __init__(self, kv_lens, kv_lora_rank, rope_dim, block_size, dtype, seed, spare_blocks=3):
        generator = torch.Generator().manual_seed(seed)
        self.kv_lens = list(kv_lens)
        self.kv_lora_rank = kv_lora_rank
        self.latents = [torch.randn(n, kv_lora_rank + rope_dim, generator=generator).to(dtype) for n in kv_lens]
        blocks_per_seq = [-(-n // block_size) for n in kv_lens]
        num_blocks = sum(blocks_per_seq) + spare_blocks
        order = torch.randperm(num_blocks, generator=generator).tolist()  # blocks handed out shuffled
        width = max(blocks_per_seq) + 1  # one unused, garbage column
        self.block_table = torch.full((len(kv_lens), width), num_blocks + 7, dtype=torch.int32)
        self.cache = torch.full((num_blocks, block_size, kv_lora_rank + rope_dim), float("nan"), dtype=dtype)
        for b, n in enumerate(kv_lens):
            for i in range(blocks_per_seq[b]):
                self.block_table[b, i] = order.pop()
            for pos in range(n):
                self.cache[self.block_table[b, pos // block_size], pos % block_size] = self.latents[b][pos]
        # rows past a sequence's end inside its last block stay NaN: reading them would poison the result


def decode_float64(q_nope, q_rope, latents, kv_lora_rank, scale):
    """Dense float64 absorbed attention per sequence: (out [B, H, L], lse [B, H])."""
    outs, lses = [], []
    for b, lat in enumerate(latents):
        lat = lat.double()
        c, k_pe = lat[:, :kv_lora_rank], lat[:, kv_lora_rank:]
        if lat.shape[0] == 0:
            outs.append(torch.zeros(q_nope.shape[1], kv_lora_rank, dtype=torch.float64))
            lses.append(torch.full((q_nope.shape[1],), float("-inf"), dtype=torch.float64))
            continue
        scores = scale * (q_nope[b].double() @ c.T + q_rope[b].double() @ k_pe.T)
        peak = scores.max(dim=1, keepdim=True).values
        weights = (scores - peak).exp()
        total = weights.sum(dim=1, keepdim=True)
        outs.append(weights / total @ c)
        lses.append((peak + total.log()).squeeze(1))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", (8, 16))
@pytest.mark.parametrize("num_kv_splits", (None, 1, 3))
def test_mla_decode(ops_impl, dtype, block_size, num_kv_splits, close, nan_tensor):
    kv_lora_rank, rope_dim, num_heads = 48, 16, 5  # L not a power of two; heads not a multiple of 8
    kv_lens = [1, 37, 70]  # one-token sequence beside long ones
    paged = PagedLatents(kv_lens, kv_lora_rank, rope_dim, block_size, dtype, seed=block_size)
    generator = torch.Generator().manual_seed(1)
    q_nope = torch.randn(len(kv_lens), num_heads, kv_lora_rank, generator=generator).to(dtype)
    q_rope = torch.randn(len(kv_lens), num_heads, rope_dim, generator=generator).to(dtype)
    scale = 1 / math.sqrt(kv_lora_rank + rope_dim)
    out = nan_tensor((len(kv_lens), num_heads, kv_lora_rank), dtype)
    result, lse = mla_decode(q_nope, q_rope, paged.cache, paged.block_table, torch.tensor(kv_lens, dtype=torch.int32),
                             scale, num_kv_splits=num_kv_splits, return_lse=True, out=out)
    assert _dispatch.last_impl("mla_decode") == ops_impl
    assert result is out and lse.dtype == torch.float32 and lse.shape == (3, num_heads)
    expected_out, expected_lse = decode_float64(q_nope, q_rope, paged.latents, kv_lora_rank, scale)
    close(out, expected_out, dtype, "out")
    close(lse, expected_lse, torch.float32 if dtype == torch.float32 else torch.float16, "lse")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("num_kv_splits", (1, 3))
def test_mla_decode_device_branch(device_branch, dtype, num_kv_splits, close, nan_tensor):
    """The card's branch (fp16/bf16 tl.dot inputs) in the interpreter; see conftest.device_branch."""
    test_mla_decode(device_branch, dtype, 16, num_kv_splits, close, nan_tensor)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_mla_decode_strided_query_4d_cache_many_heads(ops_impl, dtype, close):
    # q_nope as the absorbed bmm leaves it ([H, B, L] transposed to [B, H, L]);
    # 19 heads span two head tiles; the cache has LMDeploy's singleton head dim
    kv_lora_rank, rope_dim, num_heads = 64, 32, 19
    kv_lens = [33, 5]
    paged = PagedLatents(kv_lens, kv_lora_rank, rope_dim, 8, dtype, seed=5)
    generator = torch.Generator().manual_seed(2)
    q_nope = torch.randn(num_heads, len(kv_lens), kv_lora_rank, generator=generator).to(dtype).transpose(0, 1)
    q_rope = torch.randn(len(kv_lens), num_heads, rope_dim, generator=generator).to(dtype)
    out = mla_decode(q_nope, q_rope, paged.cache.unsqueeze(2), paged.block_table,
                     torch.tensor(kv_lens, dtype=torch.int64), 0.3, num_kv_splits=2)
    expected, _ = decode_float64(q_nope, q_rope, paged.latents, kv_lora_rank, 0.3)
    close(out, expected, dtype)


def test_mla_decode_empty_sequence(ops_impl):
    paged = PagedLatents([0, 9], 32, 16, 8, torch.float32, seed=3)
    q_nope = torch.randn(2, 3, 32)
    q_rope = torch.randn(2, 3, 16)
    out, lse = mla_decode(q_nope, q_rope, paged.cache, paged.block_table, torch.tensor([0, 9], dtype=torch.int32),
                          0.2, return_lse=True)
    assert torch.equal(out[0], torch.zeros(3, 32))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    expected, _ = decode_float64(q_nope[1:], q_rope[1:], paged.latents[1:], 32, 0.2)
    assert torch.allclose(out[1:].double(), expected, rtol=1e-5, atol=1e-6)


def test_mla_decode_splits_agree(ops_impl):
    # the split-KV merge must not change the answer beyond float32 rounding
    paged = PagedLatents([100, 3], 32, 16, 16, torch.float32, seed=4)
    q_nope, q_rope = torch.randn(2, 4, 32), torch.randn(2, 4, 16)
    kv = torch.tensor([100, 3], dtype=torch.int32)
    one = mla_decode(q_nope, q_rope, paged.cache, paged.block_table, kv, 0.25, num_kv_splits=1)
    many = mla_decode(q_nope, q_rope, paged.cache, paged.block_table, kv, 0.25, num_kv_splits=8)
    assert torch.allclose(one, many, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- prefill
def prefill_float64(q, latents, kv_b_proj_weight, q_lens, qk_nope_head_dim, v_head_dim, scale, causal):
    """Explicit per (sequence, query, head) float64 loop over visible keys."""
    num_heads = q.shape[1]
    kv_lora_rank = kv_b_proj_weight.shape[1]
    w = kv_b_proj_weight.double().reshape(num_heads, qk_nope_head_dim + v_head_dim, kv_lora_rank)
    out = torch.zeros(q.shape[0], num_heads, v_head_dim, dtype=torch.float64)
    row = 0
    for lat, q_len in zip(latents, q_lens):
        lat = lat.double()
        kv_len = lat.shape[0]
        c, k_pe = lat[:, :kv_lora_rank], lat[:, kv_lora_rank:]
        for h in range(num_heads):
            k = torch.cat((c @ w[h, :qk_nope_head_dim].T, k_pe), dim=1)   # [kv_len, Dn + R]
            v = c @ w[h, qk_nope_head_dim:].T                              # [kv_len, Dv]
            for i in range(q_len):
                position = kv_len - q_len + i
                visible = position + 1 if causal else kv_len
                scores = scale * (k[:visible] @ q[row + i, h].double())
                weights = (scores - scores.max()).exp()
                out[row + i, h] = weights @ v[:visible] / weights.sum()
        row += q_len
    return out


# (q_len, kv_len): a one-token chunk after a long prefix, a fresh prompt, a
# chunk with a cached prefix, a one-token fresh sequence
PREFILL_SEQS = [(1, 20), (9, 9), (6, 17), (1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", (True, False))
def test_mla_prefill(ops_impl, dtype, causal, close, nan_tensor):
    kv_lora_rank, rope_dim, qk_nope_head_dim, v_head_dim, num_heads = 48, 16, 16, 32, 3
    q_lens = [s[0] for s in PREFILL_SEQS]
    kv_lens = [s[1] for s in PREFILL_SEQS]
    paged = PagedLatents(kv_lens, kv_lora_rank, rope_dim, 8, dtype, seed=7 + causal)
    generator = torch.Generator().manual_seed(11)
    q = torch.randn(sum(q_lens), num_heads, qk_nope_head_dim + rope_dim, generator=generator).to(dtype)
    weight = (torch.randn(num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank, generator=generator)
              / math.sqrt(kv_lora_rank)).to(dtype)
    cu_seqlens_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    scale = 1 / math.sqrt(qk_nope_head_dim + rope_dim)
    out = nan_tensor((sum(q_lens), num_heads, v_head_dim), dtype)
    result = mla_prefill(q, paged.cache, paged.block_table, cu_seqlens_q, torch.tensor(kv_lens, dtype=torch.int32),
                         weight, qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim, scale=scale,
                         causal=causal, out=out)
    assert result is out
    assert _dispatch.last_impl("mla_prefill") == ops_impl
    expected = prefill_float64(q, paged.latents, weight, q_lens, qk_nope_head_dim, v_head_dim, scale, causal)
    # the kernel path rounds the expanded k_nope / v to the model dtype once more
    close(out, expected, dtype, factor=1.0 if dtype == torch.float32 else 1.5)


# ---------------------------------------------------------------- cache fill
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", (8, 32))
def test_fill_mla_cache(ops_impl, dtype, block_size, nan_tensor):
    generator = torch.Generator().manual_seed(block_size)
    num_tokens, kv_lora_rank, rope_dim, num_blocks = 6, 48, 16, 3
    # kv_c and k_pe as slices of one projection output (strided rows)
    projection = torch.randn(num_tokens, kv_lora_rank + rope_dim + 8, generator=generator).to(dtype)
    kv_c, k_pe = projection[:, :kv_lora_rank], projection[:, kv_lora_rank + 8:]
    cache = nan_tensor((num_blocks, block_size, kv_lora_rank + rope_dim), dtype)
    slots = [2 * block_size + 1, -1, 0, block_size * num_blocks - 1, block_size, -1]
    expected = cache.clone()
    for t, slot in enumerate(slots):
        if slot >= 0:
            expected[slot // block_size, slot % block_size] = torch.cat((kv_c[t], k_pe[t]))
    fill_mla_cache(kv_c, k_pe.unsqueeze(1), cache, torch.tensor(slots, dtype=torch.int64))
    assert _dispatch.last_impl("fill_mla_cache") == ops_impl
    assert torch.equal(cache.isnan(), expected.isnan())
    assert torch.equal(cache.nan_to_num(), expected.nan_to_num())


def test_fill_then_decode_round_trip(ops_impl, close):
    # the decode reads back exactly what the fill wrote, through a 4-d cache view
    generator = torch.Generator().manual_seed(9)
    kv_lora_rank, rope_dim, block_size = 32, 16, 8
    latents = torch.randn(13, kv_lora_rank + rope_dim, generator=generator)
    cache = torch.full((4, block_size, 1, kv_lora_rank + rope_dim), float("nan"))
    block_table = torch.tensor([[3, 1, 0, 2]], dtype=torch.int32)
    slots = torch.tensor([int(block_table[0, p // block_size]) * block_size + p % block_size for p in range(13)])
    fill_mla_cache(latents[:, :kv_lora_rank], latents[:, kv_lora_rank:], cache, slots)
    q_nope, q_rope = torch.randn(1, 2, kv_lora_rank), torch.randn(1, 2, rope_dim)
    out = mla_decode(q_nope, q_rope, cache, block_table, torch.tensor([13], dtype=torch.int32), 0.5)
    expected, _ = decode_float64(q_nope, q_rope, [latents], kv_lora_rank, 0.5)
    close(out, expected, torch.float32)


# ---------------------------------------------------------------- bad input
def _decode_args(**override):
    args = dict(q_nope=torch.randn(2, 3, 32), q_rope=torch.randn(2, 3, 16), latent_cache=torch.zeros(4, 8, 48),
                block_table=torch.zeros(2, 2, dtype=torch.int32), kv_seqlens=torch.tensor([3, 9], dtype=torch.int32),
                scale=0.1)
    args.update(override)
    return args


def _prefill_args(**override):
    args = dict(q=torch.randn(5, 2, 32), latent_cache=torch.zeros(4, 8, 48),
                block_table=torch.zeros(2, 2, dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
                kv_seqlens=torch.tensor([3, 9], dtype=torch.int32),
                kv_b_proj_weight=torch.randn(2 * (16 + 32), 32), qk_nope_head_dim=16, v_head_dim=32, scale=0.1)
    args.update(override)
    return args


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: mla_decode(**_decode_args(latent_cache=torch.zeros(4, 12, 48))), "block_size=12"),
        (lambda: mla_decode(**_decode_args(latent_cache=torch.zeros(4, 8, 50))), r"latent_cache has last dim .* 50, expected 48"),
        (lambda: mla_decode(**_decode_args(q_rope=torch.randn(2, 3, 16).half())), "q_rope has dtype float16"),
        (lambda: mla_decode(**_decode_args(q_rope=torch.randn(2, 4, 16))), "q_rope has shape"),
        (lambda: mla_decode(**_decode_args(block_table=torch.zeros(2, 2))), "block_table has dtype float32"),
        (lambda: mla_decode(**_decode_args(block_table=torch.zeros(3, 2, dtype=torch.int32))), "block_table has batch 3"),
        (lambda: mla_decode(**_decode_args(kv_seqlens=torch.tensor([3, 17], dtype=torch.int32))),
         r"lengths in \[3, 17\]"),
        (lambda: mla_decode(**_decode_args(scale=0.0)), "scale=0.0"),
        (lambda: mla_decode(**_decode_args(), num_kv_splits=0), "num_kv_splits=0"),
        (lambda: mla_decode(**_decode_args(), out=torch.empty(2, 3, 48)), "out has shape"),
        (lambda: mla_decode(**_decode_args(kv_seqlens=torch.tensor([3, 9], dtype=torch.int32, device="meta"))),
         "one device"),
        (lambda: mla_prefill(**_prefill_args(kv_b_proj_weight=torch.randn(2 * 48, 30))), r"kv_b_proj_weight has in_features .* 30, expected 32"),
        (lambda: mla_prefill(**_prefill_args(kv_b_proj_weight=torch.randn(3 * 48, 32))), "out_features"),
        (lambda: mla_prefill(**_prefill_args(qk_nope_head_dim=40)), "smaller than qk_nope_head_dim=40"),
        (lambda: mla_prefill(**_prefill_args(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32))),
         "must start at 0"),
        (lambda: mla_prefill(**_prefill_args(kv_seqlens=torch.tensor([1, 9], dtype=torch.int32))),
         "sequence 0 has kv_seqlens 1 < its query length 2"),
        (lambda: fill_mla_cache(torch.randn(2, 32), torch.randn(2, 8), torch.zeros(2, 8, 48),
                                torch.tensor([0, 1])), r"latent_cache has last dim .* 48, expected 40"),
        (lambda: fill_mla_cache(torch.randn(2, 32), torch.randn(2, 16), torch.zeros(2, 8, 48),
                                torch.tensor([0, 16])), r"slots in \[0, 16\]"),
    ],
)
def test_bad_input_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernels_compile_for_gpu_without_spills(gpu_builds):
    # DeepSeek-V3 shapes: kv_lora_rank 512, rope 64, 16 heads per rank; bf16 and fp32 tiles
    builds = gpu_builds("""
        import torch
        from maca_infer.common.ops.mla import fill_mla_cache, mla_decode
        for dtype in (torch.bfloat16, torch.float32):
            cache = torch.zeros(8, 64, 576, dtype=dtype)
            fill_mla_cache(torch.randn(3, 512, dtype=dtype), torch.randn(3, 64, dtype=dtype), cache,
                           torch.arange(3, dtype=torch.int32))
            mla_decode(torch.randn(2, 16, 512, dtype=dtype), torch.randn(2, 16, 64, dtype=dtype), cache,
                       torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 0.1,
                       num_kv_splits=2, return_lse=True)
    """)
    kernels = ["_fill_mla_cache_kernel_fn", "_mla_decode_split_kernel_fn", "_merge_kernel_fn"]  # merge: _split_kv
    assert [b["kernel"] for b in builds] == kernels * 2
    for build in builds:
        assert build["usage"]["LOCAL"] == 0, build
