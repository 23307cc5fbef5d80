"""CPU fake of MetaX's flash_attn 2.6.3+metax (see ../README.md): documented semantics in plain torch."""

from __future__ import annotations

import os

import torch

__version__ = "2.6.3+metax.fake"

calls: list[str] = []  # entry points called, in order (tests read it)


def _require(condition, message):
    if not condition:
        raise RuntimeError(f"flash_attn (fake): {message}")


def _check_tensors(q, k, v):
    _require(q.dtype in (torch.float16, torch.bfloat16), f"only fp16 and bf16 are supported, got {q.dtype}")
    _require(k.dtype == q.dtype and v.dtype == q.dtype, "q, k, v must have the same dtype")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require(t.stride(-1) == 1, f"{name} must have a contiguous last dimension")
    head_dim = q.shape[-1]
    # upstream: head dims up to 256; MetaX's build adds 576 (absorbed MLA: value = first 512 of the output)
    _require(head_dim <= 256 or head_dim == 576, f"head dim {head_dim} is not supported")
    _require(k.shape[-1] == head_dim and v.shape[-1] == head_dim, "k and v must have q's head dim")
    _require(q.shape[-2] % k.shape[-2] == 0, "number of query heads must be a multiple of KV heads")


def _check_page(page_block_size):
    small = os.environ.get("MACA_SMALL_PAGESIZE_ENABLE") == "1" and page_block_size % 16 == 0
    _require(page_block_size % 256 == 0 or small,
             f"page_block_size {page_block_size} must be a multiple of 256 (MetaX: of 16 with "
             "MACA_SMALL_PAGESIZE_ENABLE=1)")


def _int32(name, t):
    _require(isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.is_contiguous(),
             f"{name} must be a contiguous int32 tensor")


def _gather(cache, table_row, length):
    page = cache.shape[1]
    blocks = table_row[: -(-length // page)].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def _one_sequence(q, k, v, scale, causal, window, softcap, alibi):
    """q [sq, H, D], k/v [sk, Hk, D] -> out [sq, H, D] (float32), lse [H, sq] (+inf where no key is seen)."""
    sq, heads = q.shape[:2]
    sk = k.shape[0]
    group = heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", q.float(), k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    row = torch.arange(sq)[:, None] + sk - sq  # the key column a query lines up with (bottom-right)
    col = torch.arange(sk)[None, :]
    if alibi is not None:
        s = s - alibi.float()[:, None, None] * (row - col).abs()
    left, right = window
    if causal:
        right = 0
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= col >= row - left
    if right >= 0:
        keep &= col <= row + right
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    seen = torch.isfinite(lse)
    p = torch.where(seen[..., None], torch.exp(s - lse[..., None]), torch.zeros_like(s))
    out = torch.einsum("hij,jhd->ihd", p, v)
    return out, torch.where(seen, lse, torch.full_like(lse, float("inf")))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    calls.append("flash_attn_varlen_func")
    _check_tensors(q, k, v)
    _require(dropout_p == 0.0, "dropout is for training")
    _int32("cu_seqlens_q", cu_seqlens_q)
    _int32("cu_seqlens_k", cu_seqlens_k)
    if alibi_slopes is not None:
        _require(alibi_slopes.dtype == torch.float32 and alibi_slopes.shape[-1] == q.shape[1], "alibi_slopes: fp32")
    if block_table is not None:
        _int32("block_table", block_table)
        _check_page(k.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"))
    batch = cu_seqlens_q.shape[0] - 1
    for b in range(batch):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        _require(q1 - q0 <= max_seqlen_q and k1 - k0 <= max_seqlen_k, "max_seqlen_q/k below a sequence's length")
        if block_table is None:
            keys, values = k[k0:k1], v[k0:k1]
        else:
            keys, values = _gather(k, block_table[b], k1 - k0), _gather(v, block_table[b], k1 - k0)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        out[q0:q1], lse[:, q0:q1] = _one_sequence(q[q0:q1], keys, values, scale, causal, window_size, softcap,
                                                  slopes)
    out = out.to(q.dtype)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    calls.append("flash_attn_with_kvcache")
    _require(k is None and v is None and rotary_cos is None and cache_batch_idx is None and cache_leftpad is None,
             "this fake implements attention over an existing cache only")
    _require(q.dim() == 4, "q must be (batch_size, seqlen, nheads, headdim)")
    _check_tensors(q, k_cache, v_cache)
    _require(isinstance(num_splits, int) and 0 <= num_splits <= 128, f"num_splits {num_splits}")
    batch, sq = q.shape[:2]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    _int32("cache_seqlens", cache_seqlens)
    if block_table is not None:
        _int32("block_table", block_table)
        _check_page(k_cache.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(*q.shape[:3], v_cache.shape[-1], dtype=torch.float32)
    lse = torch.full((batch, q.shape[2], sq), float("inf"))
    for b in range(batch):
        length = int(cache_seqlens[b])
        if block_table is None:
            keys, values = k_cache[b, :length], v_cache[b, :length]
        else:
            keys, values = _gather(k_cache, block_table[b], length), _gather(v_cache, block_table[b], length)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        out[b], lse[b] = _one_sequence(q[b], keys, values, scale, causal, window_size, softcap, slopes)
    out = out.to(q.dtype)
    return (out, lse) if return_softmax_lse else out


__all__ = ["flash_attn_varlen_func", "flash_attn_with_kvcache", "calls"]
