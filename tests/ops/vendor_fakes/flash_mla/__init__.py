"""CPU fake of MetaX's flash_mla 1.0.1+metax (see ../README.md), from FlashMLA's interface docstrings."""

from __future__ import annotations

import torch

__version__ = "1.0.1+metax.fake"

calls: list[str] = []
TILE_SCHEDULER_METADATA_SIZE = 8


def _require(condition, message):
    if not condition:
        raise RuntimeError(f"flash_mla (fake): {message}")


def get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k):
    """-> (tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [batch + 1] int32).

    The fake's metadata remembers what it was planned for, so a call with other
    lengths or head counts fails as a real kernel would misbehave."""
    calls.append("get_mla_metadata")
    _require(cache_seqlens.dtype == torch.int32 and cache_seqlens.dim() == 1, "cache_seqlens: (batch_size) int32")
    metadata = torch.zeros(1, TILE_SCHEDULER_METADATA_SIZE, dtype=torch.int32)
    metadata[0, 0] = int(cache_seqlens.sum())
    metadata[0, 1] = num_heads_per_head_k
    metadata[0, 2] = num_heads_k
    num_splits = torch.arange(cache_seqlens.shape[0] + 1, dtype=torch.int32)
    return metadata, num_splits


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                           softmax_scale=None, causal=False):
    """q [b, s_q, h_q, d], k_cache [num_blocks, page_block_size, h_k, d] ->
    (out [b, s_q, h_q, head_dim_v], softmax_lse [b, h_q, s_q] float32); v = k_cache[..., :head_dim_v]."""
    calls.append("flash_mla_with_kvcache")
    batch, sq, heads, dim = q.shape
    _require(q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype, "bf16/fp16 q and k_cache")
    _require(dim == 576 and head_dim_v == 512, f"head dims 576/512 only, got {dim}/{head_dim_v}")
    _require(k_cache.dim() == 4 and k_cache.shape[1] == 64 and k_cache.shape[3] == dim,
             "k_cache: (num_blocks, 64, h_k, 576)")
    _require(q.stride(-1) == 1 and k_cache.stride(-1) == 1, "contiguous last dimensions")
    _require(block_table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32, "int32 block_table/cache_seqlens")
    heads_k = k_cache.shape[2]
    _require(heads % heads_k == 0, "h_q must be a multiple of h_k")
    planned = (int(cache_seqlens.sum()), sq * heads // heads_k, heads_k)
    _require(tuple(int(x) for x in tile_scheduler_metadata[0, :3]) == planned and num_splits.shape[0] == batch + 1,
             "tile_scheduler_metadata / num_splits were not made by get_mla_metadata for these lengths and heads")
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(batch, sq, heads, head_dim_v)
    lse = torch.full((batch, heads, sq), float("inf"))
    group = heads // heads_k
    for b in range(batch):
        length = int(cache_seqlens[b])
        blocks = block_table[b, : -(-length // 64)].long()
        rows = k_cache[blocks].reshape(-1, heads_k, dim)[:length].float().repeat_interleave(group, dim=1)
        s = torch.einsum("ihd,jhd->hij", q[b].float(), rows) * scale
        if causal:  # bottom-right aligned, as flash-attn
            keep = torch.arange(length)[None, :] <= torch.arange(sq)[:, None] + length - sq
            s = s.masked_fill(~keep, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        seen = torch.isfinite(row_lse)
        p = torch.where(seen[..., None], torch.exp(s - row_lse[..., None]), torch.zeros_like(s))
        out[b] = torch.einsum("hij,jhd->ihd", p, rows[..., :head_dim_v])
        lse[b] = torch.where(seen, row_lse, torch.full_like(row_lse, float("inf")))
    return out.to(q.dtype), lse
