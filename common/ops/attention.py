"""Attention over variable-length batches and the paged KV cache.

Public functions:
    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)            -> out
    paged_prefill_attention(q, key_cache, value_cache, block_table,
                            cu_seqlens_q, kv_seqlens, ...)                 -> out
    paged_decode_attention(q, key_cache, value_cache, block_table,
                           kv_seqlens, ..., return_lse=False)              -> out (, lse)

Semantics shared by all three (one definition, used by the kernels, the
references and the tests):

* Positions. Sequence ``b`` has ``q_len`` queries and ``kv_len`` keys; the
  queries are the *last* ``q_len`` positions of the sequence (bottom-right
  alignment, as flash-attn >= 2.1 and a KV cache with a prefix imply): query
  ``i`` sits at position ``p_i = kv_len - q_len + i`` and key ``j`` at ``j``.
* Score: ``s_ij = scale * <q_i, k_j>`` (``scale`` default ``1/sqrt(D)``);
  with ``logit_softcap = c``: ``s_ij = c * tanh(s_ij / c)``; with
  ``alibi_slopes``: ``s_ij += slope_h * (j - p_i)``.
* Visibility (masked scores are ``-inf``):
  causal: ``j <= p_i``; sliding window ``W``: additionally ``j > p_i - W``,
  i.e. the query sees itself and the ``W - 1`` keys before it. That is HF's
  ``sliding_window`` and flash-attn's ``window_size=(W - 1, 0)``. Without
  ``causal`` a window is symmetric: ``|j - p_i| < W`` (flash-attn's
  ``(W - 1, W - 1)``, which is what HF passes to flash-attn; HF's eager
  bidirectional sliding mask keeps ``|j - p_i| <= W``: pass ``W + 1`` to
  match that one).
* ``out_i = sum_j softmax_j(s_ij) v_j`` in float32, rounded to ``q.dtype``;
  ``lse_i = log(sum_j exp(s_ij))`` (natural log). A query that sees no key
  (possible only when ``q_len > kv_len`` with ``causal``) gets ``out = 0``
  and ``lse = -inf``.
* GQA/MQA: query head ``h`` reads KV head ``h // (Hq // Hk)``.
* Head dims ``D`` (q, k) and ``Dv`` (v) may differ; each is a multiple of 8
  from 8 to 256. dtypes: float16, bfloat16, float32 (q, k, v, caches and
  out share one); index tensors int32 (int64 accepted).

The paged KV cache is ``key_cache [num_blocks, block_size, Hk, D]`` and
``value_cache [num_blocks, block_size, Hk, Dv]``; token ``t`` of sequence ``b``
lives in block ``block_table[b, t // block_size]`` at offset
``t % block_size``. Only the first ``ceil(kv_len / block_size)`` entries of a
block-table row are read; the rest may hold anything.

Implementations: Triton kernels (one flash-attention style prefill kernel
that serves both the contiguous varlen and the paged layout; a decode
kernel with split-KV whose partials ``_split_kv.merge_kv_splits`` merges,
as for MLA; both built from the device helpers in ``_triton_helpers``) and
torch references that gather each sequence's blocks and run one batched
matmul per sequence (per batch chunk for decode) so that the emulated maca
device can serve with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch, vendor
from maca_infer.common.ops._jit import interpreter_branch, lazy_jit, next_power_of_2, tl, triton
from maca_infer.common.ops._split_kv import (
    auto_num_kv_splits,
    check_plan_arguments,
    check_plan_geometry,
    describe_plan,
    merge_kv_splits,
    plan_mismatch,
    planned_impl,
)
from maca_infer.common.ops._triton_helpers import (
    attention_scores,
    online_softmax_finish,
    online_softmax_step,
    visible_key_range,
    visible_keys,
)

# Head dims: every multiple of 8 up to 256. That covers the tiny test
# models' 32, LLMs' 64, 80, 96, 128, 192, 256 and diffusion UNets' 40, 72,
# 88, 160; the kernels pad a dim to a power-of-two tile (>= 16, tl.dot's
# minimum) and mask the rest.
HEAD_DIMS = tuple(range(8, 257, 8))
# Multi-token decode (speculative / MTP verification) is capped so that the
# decode kernel's packed (token, head) rows stay a small tile.
MAX_DECODE_QUERY_LEN = 8
# The references bound their score matrix to this many float32 elements
# (64 MiB) by processing queries (varlen, prefill) or sequences (decode) in chunks.
_REFERENCE_MAX_SCORES = 1 << 24


# ==========================================================================
# Triton kernels
# ==========================================================================
def _prefill_kernel_fn(
    q_ptr, k_ptr, v_ptr, out_ptr,
    cu_seqlens_q_ptr, kv_index_ptr, block_table_ptr, alibi_slopes_ptr,
    stride_q_token, stride_q_head,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head,
    stride_out_token, stride_out_head,
    stride_block_table,
    block_size, scale, logit_softcap, sliding_window,
    QUERY_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # One program per (query tile of BLOCK_M tokens, query head, sequence):
    # flash-attention forward with an online softmax over key tiles.
    # PAGED: keys come from the block table (kv_index_ptr = kv_seqlens);
    # otherwise from contiguous rows (kv_index_ptr = cu_seqlens_k).
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq).to(tl.int64)
    q_len = (tl.load(cu_seqlens_q_ptr + seq + 1) - q_start).to(tl.int32)
    if tile * BLOCK_M >= q_len:
        return
    if PAGED:
        k_start = q_start * 0
        kv_len = tl.load(kv_index_ptr + seq).to(tl.int32)
    else:
        k_start = tl.load(kv_index_ptr + seq).to(tl.int64)
        kv_len = (tl.load(kv_index_ptr + seq + 1) - k_start).to(tl.int32)
    kv_head = head // QUERY_GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    q_pos = kv_len - q_len + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V

    q_ptrs = q_ptr + (q_start + offs_m)[:, None] * stride_q_token + head * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if USE_ALIBI:
        slope = tl.load(alibi_slopes_ptr + head).to(tl.float32)
    else:
        slope = 0.0

    # Key range this tile can see: [lo, hi).
    first_pos = kv_len - q_len + tile * BLOCK_M
    last_pos = kv_len - q_len + tl.minimum((tile + 1) * BLOCK_M, q_len) - 1
    lo, hi = visible_key_range(first_pos, last_pos, kv_len, sliding_window, CAUSAL, USE_WINDOW)
    lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        if PAGED:
            block = tl.load(block_table_ptr + seq * stride_block_table + offs_n // block_size,
                            mask=n_valid, other=0).to(tl.int64)
            in_block = (offs_n % block_size).to(tl.int64)
            k_rows = block * stride_k_block + in_block * stride_k_token
            v_rows = block * stride_v_block + in_block * stride_v_token
        else:
            k_rows = (k_start + offs_n) * stride_k_token
            v_rows = (k_start + offs_n) * stride_v_token
        if BLOCK_D == HEAD_DIM:  # no head-dim mask: fewer predicate registers
            k = tl.load(k_ptr + k_rows[:, None] + kv_head * stride_k_head + offs_d[None, :],
                        mask=n_valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + k_rows[:, None] + kv_head * stride_k_head + offs_d[None, :],
                        mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        if BLOCK_DV == HEAD_DIM_V:
            v = tl.load(v_ptr + v_rows[:, None] + kv_head * stride_v_head + offs_dv[None, :],
                        mask=n_valid[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + v_rows[:, None] + kv_head * stride_v_head + offs_dv[None, :],
                        mask=n_valid[:, None] & dv_valid[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        rel = offs_n[None, :] - q_pos[:, None]  # j - p_i
        s = attention_scores(s, rel, scale, logit_softcap, slope, USE_SOFTCAP, USE_ALIBI)
        s = tl.where(visible_keys(rel, m_valid, n_valid, sliding_window, CAUSAL, USE_WINDOW), s, float("-inf"))
        m_i, l_i, p, alpha = online_softmax_step(m_i, l_i, s)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    out, _ = online_softmax_finish(acc, m_i, l_i)
    out_ptrs = out_ptr + (q_start + offs_m)[:, None] * stride_out_token + head * stride_out_head + offs_dv[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & dv_valid[None, :])


_prefill_kernel = lazy_jit(_prefill_kernel_fn)


def _decode_kernel_fn(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_seqlens_ptr, alibi_slopes_ptr,
    out_ptr, lse_ptr,
    stride_q_seq, stride_q_token, stride_q_head,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head,
    stride_block_table,
    stride_out_seq, stride_out_token, stride_out_head, stride_out_split,
    stride_lse_seq, stride_lse_token, stride_lse_head, stride_lse_split,
    block_size, scale, logit_softcap, sliding_window, num_kv_splits,
    QUERY_LEN: tl.constexpr, QUERY_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # One program per (sequence, KV head, KV split). Its BLOCK_M rows are the
    # QUERY_LEN x QUERY_GROUP (token, query head) pairs that share this KV
    # head, so each key/value tile is loaded once and used by all of them.
    # With several splits each program covers one slice of the visible keys
    # and writes a normalized partial output and its log-sum-exp; the
    # merge kernel (_split_kv) merges them. With one split it writes the result.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_seqlens_ptr + seq).to(tl.int32)

    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < QUERY_LEN * QUERY_GROUP
    token = rows // QUERY_GROUP
    head = kv_head * QUERY_GROUP + rows % QUERY_GROUP
    q_pos = kv_len - QUERY_LEN + token
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V

    q_rows = seq.to(tl.int64) * stride_q_seq + token * stride_q_token + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if USE_ALIBI:
        slope = tl.load(alibi_slopes_ptr + head, mask=row_valid, other=0.0).to(tl.float32)[:, None]
    else:
        slope = 0.0

    # Visible keys of the whole sequence: [lo, kv_len); this split's share.
    lo, _ = visible_key_range(kv_len - QUERY_LEN, kv_len - 1, kv_len, sliding_window, True, USE_WINDOW)
    per_split = tl.cdiv(tl.cdiv(kv_len - lo, num_kv_splits), BLOCK_N) * BLOCK_N
    split_lo = lo + split * per_split
    split_hi = tl.minimum(split_lo + per_split, kv_len)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(split_lo, split_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < split_hi
        block = tl.load(block_table_ptr + seq * stride_block_table + offs_n // block_size,
                        mask=n_valid, other=0).to(tl.int64)
        in_block = (offs_n % block_size).to(tl.int64)
        k = tl.load(k_cache_ptr + (block * stride_k_block + in_block * stride_k_token)[:, None]
                    + kv_head * stride_k_head + offs_d[None, :],
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        v = tl.load(v_cache_ptr + (block * stride_v_block + in_block * stride_v_token)[:, None]
                    + kv_head * stride_v_head + offs_dv[None, :],
                    mask=n_valid[:, None] & dv_valid[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        rel = offs_n[None, :] - q_pos[:, None]
        s = attention_scores(s, rel, scale, logit_softcap, slope, USE_SOFTCAP, USE_ALIBI)
        s = tl.where(visible_keys(rel, row_valid, n_valid, sliding_window, True, USE_WINDOW), s, float("-inf"))
        m_i, l_i, p, alpha = online_softmax_step(m_i, l_i, s)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    # A row (or split) that saw no key gets out = 0 and lse = -inf.
    out, lse = online_softmax_finish(acc, m_i, l_i)
    out_rows = (seq.to(tl.int64) * stride_out_seq + token * stride_out_token + head * stride_out_head
                + split * stride_out_split)
    tl.store(out_ptr + out_rows[:, None] + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & dv_valid[None, :])
    if WRITE_LSE:
        lse_rows = (seq.to(tl.int64) * stride_lse_seq + token * stride_lse_token + head * stride_lse_head
                    + split * stride_lse_split)
        tl.store(lse_ptr + lse_rows, lse, mask=row_valid)


_decode_kernel = lazy_jit(_decode_kernel_fn)


# ==========================================================================
# Launchers
# ==========================================================================
def _tile_sizes(head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the prefill kernel."""
    if interpreter_branch(device):
        return 16, 16  # every program runs in numpy: the smallest tile tl.dot takes
    table = _launch.config("prefill")
    if max(head_dim, head_dim_v) > 128 and dtype == torch.float32:
        return table["BLOCK_M_fp32_wide"], table["BLOCK_N_fp32_wide"]
    if max(head_dim, head_dim_v) > 128 or dtype == torch.float32:
        # keep q, k, v tiles and the accumulator within registers and a
        # 64 KiB shared memory (fp32 64x64 tiles at D=128 need ~115 KiB)
        return table["BLOCK_M_wide"], table["BLOCK_N_wide"]
    return table["BLOCK_M"], table["BLOCK_N"]


# Launch options (warps, stages) come from _launch's tables: the prefill
# kernel uses 8 warps (with 4, ptxas on sm_80/sm_90 spills ~1 KiB per thread
# at D=128 and ~300 B at D=256); on MACA both kernels run one stage.


def _dot_tile(dim: int) -> int:
    """Power-of-two tile covering a head dim; tl.dot needs every side >= 16."""
    return max(16, next_power_of_2(dim))


def _dot_in_fp32(tensor: torch.Tensor) -> bool:
    # The interpreter computes bf16 arithmetic wrongly (triton-lang/triton#11584);
    # on a device fp16/bf16 tiles go to the tensor cores with fp32 accumulation.
    return tensor.dtype == torch.float32 or interpreter_branch(tensor.device)


def _max_seqlen(cu_seqlens: torch.Tensor) -> int:
    if cu_seqlens.numel() <= 1:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def _feature_args(q, scale, sliding_window, logit_softcap, alibi_slopes):
    """Runtime scalars and constexpr switches the kernels share."""
    return dict(
        scale=float(scale),
        logit_softcap=float(logit_softcap) if logit_softcap else 1.0,
        sliding_window=int(sliding_window) if sliding_window else 0,
        alibi_slopes_ptr=alibi_slopes if alibi_slopes is not None else q,  # unread when USE_ALIBI is off
        USE_WINDOW=bool(sliding_window), USE_SOFTCAP=bool(logit_softcap), USE_ALIBI=alibi_slopes is not None,
        DOT_FP32=_dot_in_fp32(q),
    )


def _prefill_triton(q, k, v, cu_seqlens_q, kv_index, block_table, max_seqlen_q,
                    scale, causal, sliding_window, logit_softcap, alibi_slopes, out, paged):
    batch = cu_seqlens_q.shape[0] - 1
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, head_dim_v = k.shape[-2], v.shape[-1]
    if batch == 0 or q.shape[0] == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = _max_seqlen(cu_seqlens_q)
    if max_seqlen_q == 0:
        return out
    block_m, block_n = _tile_sizes(head_dim, head_dim_v, q.dtype, q.device)
    if paged:
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
        block_size, table, table_stride = k.shape[1], block_table, block_table.stride(0)
    else:
        k_strides = (0, k.stride(0), k.stride(1))
        v_strides = (0, v.stride(0), v.stride(1))
        block_size, table, table_stride = 1, cu_seqlens_q, 0  # table unread when not PAGED
    grid = (triton.cdiv(max_seqlen_q, block_m), num_q_heads, batch)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, kv_index, table,
        stride_q_token=q.stride(0), stride_q_head=q.stride(1),
        stride_k_block=k_strides[0], stride_k_token=k_strides[1], stride_k_head=k_strides[2],
        stride_v_block=v_strides[0], stride_v_token=v_strides[1], stride_v_head=v_strides[2],
        stride_out_token=out.stride(0), stride_out_head=out.stride(1),
        stride_block_table=table_stride, block_size=block_size,
        QUERY_GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=_dot_tile(head_dim), BLOCK_DV=_dot_tile(head_dim_v),
        BLOCK_M=block_m, BLOCK_N=block_n, PAGED=paged, CAUSAL=bool(causal),
        **_feature_args(q, scale, sliding_window, logit_softcap, alibi_slopes), **_launch.options("prefill"),
    )
    return out


def _decode_triton(q4, key_cache, value_cache, block_table, kv_seqlens, scale, sliding_window, logit_softcap,
                   alibi_slopes, num_kv_splits, out4, lse3, plan):
    del block_table, kv_seqlens, num_kv_splits  # the plan's
    if plan.batch == 0:
        return
    launch = _decode_launch(plan, sliding_window)
    kwargs = launch.arguments(scale, sliding_window, logit_softcap, alibi_slopes is not None, lse3 is not None)
    qs, ks, vs = q4.stride(), key_cache.stride(), value_cache.stride()
    kwargs.update(stride_q_seq=qs[0], stride_q_token=qs[1], stride_q_head=qs[2],
                  stride_k_block=ks[0], stride_k_token=ks[1], stride_k_head=ks[2],
                  stride_v_block=vs[0], stride_v_token=vs[1], stride_v_head=vs[2],
                  alibi_slopes_ptr=alibi_slopes if alibi_slopes is not None else q4)  # unread when USE_ALIBI is off
    if launch.num_kv_splits == 1:
        os_ = out4.stride()
        ls = lse3.stride() if lse3 is not None else (0, 0, 0)
        _decode_kernel[launch.grid](
            q4, key_cache, value_cache, plan.block_table, plan.kv_seqlens, out_ptr=out4,
            lse_ptr=lse3 if lse3 is not None else out4,  # unread when WRITE_LSE is off
            stride_out_seq=os_[0], stride_out_token=os_[1], stride_out_head=os_[2],
            stride_lse_seq=ls[0], stride_lse_token=ls[1], stride_lse_head=ls[2], **kwargs,
        )
        return
    _decode_kernel[launch.grid](
        q4, key_cache, value_cache, plan.block_table, plan.kv_seqlens, out_ptr=launch.partial_out,
        lse_ptr=launch.partial_lse, **launch.partial_strides, **kwargs,
    )
    merge_kv_splits(launch.partial_out, launch.partial_lse, out4, lse3)


# ==========================================================================
# Plans: per-batch metadata, made once and reused by every layer
# ==========================================================================
@dataclass(frozen=True, eq=False)
class DecodePlan:
    """What paged decode attention needs to know about one batch, validated once.

    Made by :func:`plan_paged_decode` (once per forward batch: SGLang's
    ``init_forward_metadata``, LMDeploy's step metadata) and passed to
    :func:`paged_decode_attention` by every layer, which then checks only
    that its q and caches have the shapes, dtype and device the plan was
    made for (O(1)) and launches. FlashInfer's plan/run split.

    Fields: the batch's ``block_table`` [batch, max_blocks] and
    ``kv_seqlens`` [batch] (the plan keeps these tensors, not copies: it is
    valid for their contents at the time each layer runs, except the
    reference tier's schedule, which is read from them at the first layer
    that runs on the reference), the head and cache geometry, and
    ``num_kv_splits`` as requested (None: the auto rule). Derived per
    sliding window on first use and kept for the other layers: the
    Triton tier's split count, grid, tile sizes and split-KV scratch buffers,
    and the reference tier's grouping of sequences with their gather tables and
    masks (one host read of ``kv_seqlens`` per plan instead of per layer).
    The tier (``MACA_INFER_OPS_IMPL``, see ``_dispatch``), the Triton launch
    table (``_launch`` family) and the interpreter branch are the ones in
    force at that first use.
    """

    block_table: torch.Tensor
    kv_seqlens: torch.Tensor
    batch: int
    query_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    num_kv_splits: int | None = None
    _memo: dict = field(default_factory=dict, repr=False)
    # what every layer's q and caches must look like (compared per call)
    q_shape: tuple = field(init=False, repr=False)
    q_shape3: tuple | None = field(init=False, repr=False)
    key_cache_tail: tuple = field(init=False, repr=False)
    value_cache_tail: tuple = field(init=False, repr=False)

    def __post_init__(self):
        put = object.__setattr__
        put(self, "q_shape", (self.batch, self.query_len, self.num_q_heads, self.head_dim))
        put(self, "q_shape3", (self.batch, self.num_q_heads, self.head_dim) if self.query_len == 1 else None)
        put(self, "key_cache_tail", (self.block_size, self.num_kv_heads, self.head_dim))
        put(self, "value_cache_tail", (self.block_size, self.num_kv_heads, self.head_dim_v))

    def describe(self) -> str:
        return describe_plan(self, "batch", "query_len", "num_q_heads", "num_kv_heads", "head_dim", "head_dim_v",
                             "block_size").replace("query_len=", "q_len=")


def plan_paged_decode(
    block_table: torch.Tensor, kv_seqlens: torch.Tensor, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, head_dim_v: int | None = None, query_len: int = 1,
    num_kv_splits: int | None = None,
) -> DecodePlan:
    """Validate one decode batch's metadata once; the plan serves every layer.

    ``block_table`` [batch, max_blocks_per_seq] and ``kv_seqlens`` [batch]
    (int32, int64 accepted) as in :func:`paged_decode_attention`, on the
    device the layers run on; ``num_q_heads`` / ``num_kv_heads`` /
    ``head_dim`` / ``head_dim_v`` (default ``head_dim``) / ``block_size`` /
    ``dtype``: what every layer's q and caches will have; ``query_len``:
    new tokens per sequence (1..8); ``num_kv_splits``: None (auto) or
    1..1024. Raises ValueError naming the value and what is allowed.
    """
    op = "plan_paged_decode"
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    check_plan_geometry(op, dtype, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        head_dim_v=head_dim_v, block_size=block_size, query_len=query_len)
    if query_len > MAX_DECODE_QUERY_LEN:
        raise ValueError(f"{op}: q_len={query_len} is not supported; allowed: 1..{MAX_DECODE_QUERY_LEN} "
                         "(use paged_prefill_attention for longer chunks)")
    _checks.check_block_size(op, block_size, minimum=1)
    _check_heads(op, num_q_heads, num_kv_heads, head_dim, head_dim_v)
    _check_index(op, "block_table", block_table, 2, "[batch, max_blocks_per_seq]")
    _check_index(op, "kv_seqlens", kv_seqlens, 1, "[batch]")
    batch = kv_seqlens.shape[0]
    _checks.check_size(op, "block_table", block_table.shape[0], batch, "rows (batch, from kv_seqlens)")
    _check_num_kv_splits(op, num_kv_splits)
    _checks.check_same_device(op, block_table=block_table, kv_seqlens=kv_seqlens)
    return DecodePlan(block_table, kv_seqlens, batch, query_len, num_q_heads, num_kv_heads, head_dim, head_dim_v,
                      block_size, dtype, block_table.device, num_kv_splits)


def _check_num_kv_splits(op, num_kv_splits):
    if num_kv_splits is not None and (isinstance(num_kv_splits, bool) or not isinstance(num_kv_splits, int)
                                      or not 1 <= num_kv_splits <= 1024):
        raise ValueError(f"{op}: num_kv_splits={num_kv_splits!r} is not supported; allowed: None (auto) "
                         "or an int in 1..1024")


def _plan_mismatch(op, plan, name, found) -> ValueError:
    return plan_mismatch(op, plan, "plan_paged_decode", name, found)


def _check_against_plan(op, plan, q, key_cache, value_cache) -> None:
    """The O(1) per-layer checks of a planned call."""
    shape = q.shape
    if shape != plan.q_shape and shape != plan.q_shape3:
        raise _plan_mismatch(op, plan, "q has shape", tuple(shape))
    if q.dtype is not plan.dtype:
        raise _plan_mismatch(op, plan, "q has dtype", str(q.dtype).replace("torch.", ""))
    if q.device != plan.device:
        raise _plan_mismatch(op, plan, "q is on", q.device)
    if q.stride(-1) != 1:
        _check_last_dim_contiguous(op, "q", q)
    for name, cache, tail in (("key_cache", key_cache, plan.key_cache_tail),
                              ("value_cache", value_cache, plan.value_cache_tail)):
        cs = cache.shape
        if cs[1:] != tail or cs[0] != key_cache.shape[0]:
            raise _plan_mismatch(op, plan, f"{name} has shape", tuple(cs))
        if cache.dtype is not plan.dtype:
            raise _plan_mismatch(op, plan, f"{name} has dtype", str(cache.dtype).replace("torch.", ""))
        if cache.device != plan.device:
            raise _plan_mismatch(op, plan, f"{name} is on", cache.device)
        if cache.stride(-1) != 1:
            _check_last_dim_contiguous(op, name, cache)


def _planned_options(op, plan, scale, sliding_window, logit_softcap):
    """_check_options' result for a layer's options, validated once per distinct value per plan."""
    key = ("options", scale, sliding_window, logit_softcap)
    try:
        hit = plan._memo.get(key)
    except TypeError:  # an unhashable value: validate it (and raise) without the memo
        return _check_options(op, None, plan.num_q_heads, plan.head_dim, scale, sliding_window, logit_softcap, None)
    if hit is None:
        hit = _check_options(op, None, plan.num_q_heads, plan.head_dim, scale, sliding_window, logit_softcap, None)
        plan._memo[key] = hit
    return hit


class _DecodeLaunch:
    """The Triton tier's constants for one plan and sliding window."""

    __slots__ = ("num_kv_splits", "grid", "constants", "partial_out", "partial_lse", "partial_strides", "_arguments")

    def __init__(self, plan: DecodePlan, sliding_window: int | None):
        batch, query_len = plan.batch, plan.query_len
        num_q_heads, num_kv_heads = plan.num_q_heads, plan.num_kv_heads
        head_dim, head_dim_v, dtype, device = plan.head_dim, plan.head_dim_v, plan.dtype, plan.device
        num_kv_splits = plan.num_kv_splits
        if num_kv_splits is None:
            capacity = plan.block_table.shape[1] * plan.block_size
            if sliding_window:
                capacity = min(capacity, sliding_window + query_len - 1)
            # one program per (sequence, KV head) and split
            num_kv_splits = auto_num_kv_splits(batch * num_kv_heads, capacity, device)
        group = num_q_heads // num_kv_heads
        block_m = max(16, next_power_of_2(query_len * group))
        table = _launch.config("decode")
        if interpreter_branch(device):
            block_n = 16
        elif max(head_dim, head_dim_v) <= 128 and dtype != torch.float32:
            block_n = table["BLOCK_N"]
        elif dtype == torch.float32 and max(head_dim, head_dim_v) > 128:
            block_n = table["BLOCK_N_fp32_wide"]
        else:
            block_n = table["BLOCK_N_wide"]
        self.num_kv_splits = num_kv_splits
        self.grid = (batch, num_kv_heads, num_kv_splits)
        self.constants = dict(
            stride_block_table=plan.block_table.stride(0), block_size=plan.block_size,
            QUERY_LEN=query_len, QUERY_GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
            BLOCK_D=_dot_tile(head_dim), BLOCK_DV=_dot_tile(head_dim_v), BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_FP32=dtype == torch.float32 or interpreter_branch(device),
            # more (token, head) rows per program -> more warps, so the accumulator stays in registers
            **_launch.options("decode",
                              num_warps=table["num_warps"] if block_m <= 32 else table["num_warps_many_rows"]),
        )
        # split-KV scratch, shared by the plan's layers (they run one after another on the stream)
        self.partial_out = self.partial_lse = self.partial_strides = None
        if num_kv_splits > 1:
            self.partial_out = torch.empty((batch, query_len, num_q_heads, num_kv_splits, head_dim_v),
                                           dtype=torch.float32, device=device)
            self.partial_lse = torch.empty((batch, query_len, num_q_heads, num_kv_splits), dtype=torch.float32,
                                           device=device)
            po, pl = self.partial_out.stride(), self.partial_lse.stride()
            self.partial_strides = dict(
                stride_out_seq=po[0], stride_out_token=po[1], stride_out_head=po[2], stride_out_split=po[3],
                stride_lse_seq=pl[0], stride_lse_token=pl[1], stride_lse_head=pl[2], stride_lse_split=pl[3])
        self._arguments = {}

    def arguments(self, scale, sliding_window, logit_softcap, use_alibi, write_lse) -> dict:
        """A fresh dict of the launch's keyword arguments that do not name a tensor or its strides."""
        key = (scale, logit_softcap, use_alibi, write_lse)
        base = self._arguments.get(key)
        if base is None:
            base = self._arguments[key] = dict(
                scale=scale, logit_softcap=logit_softcap if logit_softcap else 1.0,
                sliding_window=sliding_window if sliding_window else 0,
                USE_WINDOW=bool(sliding_window), USE_SOFTCAP=bool(logit_softcap), USE_ALIBI=use_alibi,
                num_kv_splits=self.num_kv_splits, WRITE_LSE=write_lse or self.num_kv_splits > 1,
                **({"stride_out_split": 0, "stride_lse_split": 0} if self.num_kv_splits == 1 else {}),
                **self.constants)
        return dict(base)


def _decode_launch(plan: DecodePlan, sliding_window: int | None) -> _DecodeLaunch:
    key = ("triton", sliding_window)
    launch = plan._memo.get(key)
    if launch is None:
        launch = plan._memo[key] = _DecodeLaunch(plan, sliding_window)
    return launch


# ==========================================================================
# Torch references
# ==========================================================================
def _reference_attention(q, k, v, query_positions, kv_lens, scale, causal, sliding_window, logit_softcap,
                         alibi_slopes):
    """Dense masked attention for a batch of equally padded sequences.

    q [N, Lq, Hq, D], k [N, Lk, Hk, D], v [N, Lk, Hk, Dv]: any float dtype;
    query_positions [N, Lq] int64 (p_i); kv_lens [N] int64: keys at
    j >= kv_len are padding (k there may hold anything, v must be finite).
    Returns float32 out [N, Lq, Hq, Dv] and lse [N, Lq, Hq].

    Cost control (this runs the emulated device's serving): queries go in
    chunks that keep the score matrix under _REFERENCE_MAX_SCORES elements,
    and each chunk multiplies only against the key range it can see (causal
    and window bounds), which halves a causal prefill.
    """
    n, lq, hq, d = q.shape
    lk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hk
    device = q.device
    key_pos = torch.arange(lk, device=device)
    key_valid = key_pos[None, :] < kv_lens[:, None]  # [N, Lk]
    # Head-major float32 copies, made in one pass each (cast and transpose
    # together); the score matmul then reads k_h transposed at no cost.
    k_h = torch.empty((n, hk, lk, d), dtype=torch.float32, device=device).copy_(k.permute(0, 2, 1, 3))
    v_h = torch.empty((n, hk, lk, dv), dtype=torch.float32, device=device).copy_(v.permute(0, 2, 1, 3))
    slopes = alibi_slopes.float().view(1, hk, group, 1, 1) if alibi_slopes is not None else None
    out = torch.zeros((n, lq, hq, dv), dtype=torch.float32, device=device)
    lse = torch.full((n, lq, hq), float("-inf"), dtype=torch.float32, device=device)
    chunk = max(1, _REFERENCE_MAX_SCORES // max(1, n * hq * lk))
    for start in range(0, lq, chunk):
        positions = query_positions[:, start:start + chunk]  # [N, c]
        c = positions.shape[1]
        lo, hi = 0, lk
        if causal:
            hi = min(hi, int(positions.max()) + 1)
        if sliding_window:
            lo = max(lo, int(positions.min()) - sliding_window + 1)
            if not causal:
                hi = min(hi, int(positions.max()) + sliding_window)
        if hi <= lo:
            continue  # no query of the chunk sees a key: out 0, lse -inf
        q_c = q[:, start:start + c].float().reshape(n, c, hk, group, d).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(q_c.reshape(n, hk, group * c, d), k_h[:, :, lo:hi].transpose(-1, -2))  # [N, Hk, G*c, L]
        scores = scores.view(n, hk, group, c, hi - lo).mul_(scale)
        if logit_softcap:
            scores.div_(logit_softcap).tanh_().mul_(logit_softcap)
        rel = key_pos[None, None, lo:hi] - positions[:, :, None]  # [N, c, L]: j - p_i
        if slopes is not None:
            scores.add_(slopes * rel[:, None, None].float())
        visible = key_valid[:, None, lo:hi].expand(n, c, hi - lo)
        if causal:
            visible = visible & (rel <= 0)
        if sliding_window:
            visible = visible & (rel > -sliding_window)
            if not causal:
                visible = visible & (rel < sliding_window)
        scores.masked_fill_(~visible[:, None, None], float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(row_max == float("-inf"), 0.0, row_max)  # rows with no visible key
        probs = scores.sub_(row_max).exp_()
        row_sum = probs.sum(dim=-1, keepdim=True)
        o = torch.matmul(probs.view(n, hk, group * c, hi - lo), v_h[:, :, lo:hi]).view(n, hk, group, c, dv)
        o.div_(row_sum.clamp_min(torch.finfo(torch.float32).tiny))  # empty rows: 0 / tiny = 0
        out[:, start:start + c] = o.permute(0, 3, 1, 2, 4).reshape(n, c, hq, dv)
        lse[:, start:start + c] = (row_max + torch.log(row_sum)).squeeze(-1).permute(0, 3, 1, 2).reshape(n, c, hq)
    return out, lse


def _positions(q_len: int, kv_len: int, device) -> torch.Tensor:
    return torch.arange(kv_len - q_len, kv_len, device=device).view(1, q_len)


def _gather_blocks(cache, block_ids):
    """cache[block_ids] for a 1-D index, as one index_select (much faster than
    advanced indexing for 16-bit dtypes on CPU): [len, BS, H, D]."""
    return cache.index_select(0, block_ids.long())


def _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, sliding_window, logit_softcap,
                      alibi_slopes, out, bounds=None):
    # bounds: (q_bounds, k_bounds) host lists, read once by a plan (else here, one host sync)
    q_bounds, k_bounds = bounds if bounds is not None else (cu_seqlens_q.tolist(), cu_seqlens_k.tolist())
    for b in range(len(q_bounds) - 1):
        qs, qe, ks, ke = q_bounds[b], q_bounds[b + 1], k_bounds[b], k_bounds[b + 1]
        if qe == qs:
            continue
        kv_len = ke - ks
        o, _ = _reference_attention(
            q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
            _positions(qe - qs, kv_len, q.device), torch.tensor([kv_len], device=q.device),
            scale, causal, sliding_window, logit_softcap, alibi_slopes)
        out[qs:qe] = o[0]
    return out


def _paged_prefill_reference(q, key_cache, value_cache, block_table, cu_seqlens_q, kv_seqlens, scale, causal,
                             sliding_window, logit_softcap, alibi_slopes, out):
    """One sequence at a time: gather its blocks (one index_select), one matmul."""
    q_bounds = cu_seqlens_q.tolist()
    kv_lens = kv_seqlens.tolist()
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    for b in range(len(q_bounds) - 1):
        qs, qe, kv_len = q_bounds[b], q_bounds[b + 1], kv_lens[b]
        if qe == qs:
            continue
        blocks = block_table[b, :-(-kv_len // block_size)]
        k = _gather_blocks(key_cache, blocks).view(-1, num_kv_heads, key_cache.shape[3])[:kv_len]
        v = _gather_blocks(value_cache, blocks).view(-1, num_kv_heads, value_cache.shape[3])[:kv_len]
        o, _ = _reference_attention(
            q[qs:qe].unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            _positions(qe - qs, kv_len, q.device), torch.tensor([kv_len], device=q.device),
            scale, causal, sliding_window, logit_softcap, alibi_slopes)
        out[qs:qe] = o[0]
    return out


class _DecodeGroup:
    """Sequences of similar length the reference runs as one padded batch."""

    __slots__ = ("idx", "identity", "table", "n", "keys", "lo", "hi", "positions", "local_lens", "v_padding",
                 "hidden", "rel", "has_empty_rows", "chunked")


def _decode_schedule(plan: DecodePlan, sliding_window: int | None) -> list[_DecodeGroup]:
    """The reference tier's groups for one plan and window (one host read of kv_seqlens).

    Sequences sorted by length go in groups whose gathered keys, values and
    scores stay under _REFERENCE_MAX_SCORES float32 elements; each group's
    block ids, padding and visibility masks are computed here once.
    """
    key = ("reference", sliding_window)
    groups = plan._memo.get(key)
    if groups is not None:
        return groups
    batch, query_len, num_q_heads = plan.batch, plan.query_len, plan.num_q_heads
    block_size, num_kv_heads = plan.block_size, plan.num_kv_heads
    block_table = plan.block_table
    kv_lens = plan.kv_seqlens.to(device=block_table.device, dtype=torch.int64)
    order = torch.argsort(kv_lens, stable=True)
    order_host, sorted_lens = torch.stack((order, kv_lens[order])).tolist()  # the plan's one host sync
    # float32 elements one sequence of length L costs: gathered k and v, scores
    per_key = num_kv_heads * (plan.head_dim + plan.head_dim_v) + num_q_heads * query_len
    groups = []
    start = 0
    while start < batch:
        # sorted ascending: the group's last member is its longest
        end = start + 1
        while end < batch and (end + 1 - start) * max(1, sorted_lens[end]) * per_key <= _REFERENCE_MAX_SCORES:
            end += 1
        g = _DecodeGroup()
        g.idx = order[start:end]
        g.identity = end - start == batch and order_host == list(range(batch))
        lens = kv_lens[g.idx]
        end_block = max(1, -(-sorted_lens[end - 1] // block_size))
        # With a window, blocks before the first key any query of the group can
        # see are skipped; positions are then counted from first_block.
        first_block = 0
        if sliding_window:
            first_block = min(end_block - 1, max(0, sorted_lens[start] - query_len - sliding_window + 1) // block_size)
        num_blocks = end_block - first_block
        offset = first_block * block_size
        table = block_table[g.idx, first_block:end_block].long()
        # Entries past a row's last needed block may hold anything: read block 0 there (masked anyway).
        needed = torch.arange(first_block, end_block, device=table.device)[None, :] < (-(-lens // block_size))[:, None]
        g.table = torch.where(needed, table, 0).flatten()
        g.n = end - start
        g.keys = num_blocks * block_size
        g.local_lens = lens - offset
        g.positions = g.local_lens[:, None] - query_len + torch.arange(query_len, device=lens.device)[None, :]
        # key range any query of the group sees: [lo, hi) (host ints: the lengths are on the host now)
        longest, shortest = sorted_lens[end - 1] - offset, sorted_lens[start] - offset
        g.hi = max(0, longest)
        g.lo = max(0, shortest - query_len - sliding_window + 1) if sliding_window else 0
        g.has_empty_rows = sorted_lens[start] < query_len  # a query before the first key sees nothing
        g.chunked = g.n * num_q_heads * query_len * max(1, g.hi - g.lo) > _REFERENCE_MAX_SCORES
        key_pos = torch.arange(g.lo, max(g.lo, g.hi), device=lens.device)
        # 0 * garbage must stay 0: never-written cache slots may hold NaN
        g.v_padding = (torch.arange(g.keys, device=lens.device)[None, :] >= g.local_lens[:, None])
        g.v_padding = g.v_padding[:, :, None, None] if bool(g.v_padding.any()) else None
        rel = key_pos[None, None, :] - g.positions[:, :, None]  # [n, Lq, L]: j - p_i
        visible = (key_pos[None, None, :] < g.local_lens[:, None, None]) & (rel <= 0)
        if sliding_window:
            visible &= rel > -sliding_window
        g.hidden = (~visible)[:, None, None]  # [n, 1, 1, Lq, L] against scores [n, Hk, G, Lq, L]
        g.rel = rel[:, None, None].float()
        groups.append(g)
        start = end
    plan._memo[key] = groups
    return groups


def _decode_reference(q4, key_cache, value_cache, block_table, kv_seqlens, scale, sliding_window, logit_softcap,
                      alibi_slopes, num_kv_splits, out4, lse3, plan):
    """Per group (see _decode_schedule): gather its blocks, one batched matmul.

    num_kv_splits is a kernel scheduling choice; the reference ignores it.
    """
    del block_table, kv_seqlens, num_kv_splits  # the plan's
    batch, query_len, num_q_heads, head_dim = q4.shape
    if batch == 0:
        return
    num_kv_heads, head_dim_v = plan.num_kv_heads, plan.head_dim_v
    group_size = num_q_heads // num_kv_heads
    device = q4.device
    slopes = alibi_slopes.float().view(1, num_kv_heads, group_size, 1, 1) if alibi_slopes is not None else None
    for g in _decode_schedule(plan, sliding_window):
        n, length = g.n, g.hi - g.lo
        k = _gather_blocks(key_cache, g.table).view(n, g.keys, num_kv_heads, head_dim)
        v = _gather_blocks(value_cache, g.table).view(n, g.keys, num_kv_heads, head_dim_v)
        if g.v_padding is not None:
            v.masked_fill_(g.v_padding, 0.0)
        q_g = q4 if g.identity else q4.index_select(0, g.idx)
        if g.chunked or length <= 0:  # a huge group, or no query sees a key: the chunked general path
            o, lse = _reference_attention(q_g, k, v, g.positions, g.local_lens, scale, True, sliding_window,
                                          logit_softcap, alibi_slopes)
        else:
            k_h = torch.empty((n, num_kv_heads, length, head_dim), dtype=torch.float32, device=device).copy_(
                k[:, g.lo:g.hi].permute(0, 2, 1, 3))
            v_h = torch.empty((n, num_kv_heads, length, head_dim_v), dtype=torch.float32, device=device).copy_(
                v[:, g.lo:g.hi].permute(0, 2, 1, 3))
            q_c = q_g.float().reshape(n, query_len, num_kv_heads, group_size, head_dim).permute(0, 2, 3, 1, 4)
            scores = torch.matmul(q_c.reshape(n, num_kv_heads, group_size * query_len, head_dim),
                                  k_h.transpose(-1, -2))
            scores = scores.view(n, num_kv_heads, group_size, query_len, length).mul_(scale)
            if logit_softcap:
                scores.div_(logit_softcap).tanh_().mul_(logit_softcap)
            if slopes is not None:
                scores.add_(slopes * g.rel)
            scores.masked_fill_(g.hidden, float("-inf"))
            if g.has_empty_rows:  # rows with no visible key: out 0, lse -inf (softmax would give NaN)
                row_max = scores.amax(dim=-1, keepdim=True)
                row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
                probs = scores.sub_(row_max).exp_()
                row_sum = probs.sum(dim=-1, keepdim=True)
                lse = (row_max + torch.log(row_sum)).squeeze(-1) if lse3 is not None else None
                probs.div_(row_sum.clamp_min(torch.finfo(torch.float32).tiny))  # empty rows: 0 / tiny = 0
            else:
                lse = torch.logsumexp(scores, dim=-1) if lse3 is not None else None
                probs = torch.softmax(scores, dim=-1)
            o = torch.matmul(probs.view(n, num_kv_heads, group_size * query_len, length), v_h)
            o = o.view(n, num_kv_heads, group_size, query_len, head_dim_v).permute(0, 3, 1, 2, 4)
            o = o.reshape(n, query_len, num_q_heads, head_dim_v)
            if lse is not None:
                lse = lse.permute(0, 3, 1, 2).reshape(n, query_len, num_q_heads)
        if g.identity:
            out4.copy_(o)
            if lse3 is not None:
                lse3.copy_(lse)
        else:
            out4.index_copy_(0, g.idx, o.to(out4.dtype))
            if lse3 is not None:
                lse3.index_copy_(0, g.idx, lse)


# ==========================================================================
# Validation
# ==========================================================================
def _check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension (shape {tuple(t.shape)}, "
                         f"stride {t.stride()}); call .contiguous()")


def _check_index(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    _checks.check_dtype(op, name, t, _checks.INDEX_DTYPES)
    _checks.check_dim(op, name, t, ndim, layout)
    if ndim == 1:
        _checks.check_contiguous(op, name, t)
    else:  # a block table may be a column slice of a wider one (SGLang's req_to_token)
        _check_last_dim_contiguous(op, name, t)


def _check_options(op, q, num_q_heads, head_dim, scale, sliding_window, logit_softcap, alibi_slopes):
    """Validates the shared keyword options; returns (scale, window, softcap) normalized."""
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: scale={scale!r} is not supported; allowed: None (1/sqrt(head_dim)) or a float > 0")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"{op}: sliding_window={sliding_window!r} is not supported; allowed: None (no window) "
                         "or an int >= 1 (keys p-W < j <= p are visible)")
    if logit_softcap is not None and (not isinstance(logit_softcap, (int, float)) or logit_softcap < 0
                                      or not math.isfinite(logit_softcap)):
        raise ValueError(f"{op}: logit_softcap={logit_softcap!r} is not supported; allowed: None or 0 (off) "
                         "or a float > 0")
    if alibi_slopes is not None:
        _check_alibi(op, alibi_slopes, num_q_heads)
    window = int(sliding_window) if sliding_window else None
    softcap = float(logit_softcap) if logit_softcap else None
    return float(scale), window, softcap


def _check_cu_seqlens(op, cu_seqlens_q, cu_seqlens_k):
    _check_index(op, "cu_seqlens_q", cu_seqlens_q, 1, "[batch + 1]")
    _check_index(op, "cu_seqlens_k", cu_seqlens_k, 1, "[batch + 1]")
    if cu_seqlens_q.shape[0] < 1 or cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must both be [batch + 1], got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")


def _check_alibi(op, alibi_slopes, num_q_heads):
    _checks.check_dtype(op, "alibi_slopes", alibi_slopes, (torch.float32,))
    if alibi_slopes.dim() != 1 or alibi_slopes.shape[0] != num_q_heads:
        raise ValueError(f"{op}: alibi_slopes must be [num_q_heads={num_q_heads}], "
                         f"got shape {tuple(alibi_slopes.shape)}")
    _checks.check_contiguous(op, "alibi_slopes", alibi_slopes)


def _check_heads(op, q_heads, kv_heads, head_dim, head_dim_v):
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"{op}: num_q_heads={q_heads} must be a multiple of num_kv_heads={kv_heads} (GQA/MQA)")
    for name, dim in (("head_dim", head_dim), ("head_dim_v", head_dim_v)):
        if dim not in HEAD_DIMS:
            raise ValueError(f"{op}: {name}={dim} is not supported; allowed: multiples of 8 from 8 to 256")


def _check_cache(op, q, key_cache, value_cache, block_table):
    _checks.check_dim(op, "key_cache", key_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    _checks.check_dim(op, "value_cache", value_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim_v]")
    _checks.check_dtype(op, "key_cache", key_cache, (q.dtype,))
    _checks.check_dtype(op, "value_cache", value_cache, (q.dtype,))
    if tuple(value_cache.shape[:3]) != tuple(key_cache.shape[:3]):
        raise ValueError(f"{op}: value_cache has shape {tuple(value_cache.shape)}; its [num_blocks, block_size, "
                         f"num_kv_heads] must match key_cache's {tuple(key_cache.shape[:3])}")
    _checks.check_size(op, "key_cache", key_cache.shape[-1], q.shape[-1], "head_dim (q's)")
    # Page size 1 (SGLang's default token pool) works too: the kernels index
    # tokens through the table one by one.
    _checks.check_block_size(op, key_cache.shape[1], minimum=1)
    _check_last_dim_contiguous(op, "key_cache", key_cache)
    _check_last_dim_contiguous(op, "value_cache", value_cache)
    _check_index(op, "block_table", block_table, 2, "[batch, max_blocks_per_seq]")


def _check_out(op, out, shape, dtype, name="out"):
    if out is None:
        return
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    _checks.check_dtype(op, name, out, (dtype,))
    _check_last_dim_contiguous(op, name, out)


def _check_max(op, name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{op}: {name}={value!r} is not supported; allowed: None (computed) or an int >= 0 "
                         "not smaller than the true maximum")


# ==========================================================================
# Public functions
# ==========================================================================
def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None, *,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
    scale: float | None = None, causal: bool = True, sliding_window: int | None = None,
    logit_softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
    out: torch.Tensor | None = None, plan: "VarlenPlan | None" = None,
) -> torch.Tensor:
    """Attention over a batch of packed variable-length sequences.

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, num_q_heads, head_dim]``, float16 / bfloat16 / float32.
        Token and head strides are free (a slice of a fused qkv tensor is
        fine); the last dimension must be contiguous.
    k : torch.Tensor
        ``[total_k, num_kv_heads, head_dim]``, dtype of ``q``.
    v : torch.Tensor
        ``[total_k, num_kv_heads, head_dim_v]``, dtype of ``q``.
    cu_seqlens_q, cu_seqlens_k : torch.Tensor
        ``[batch + 1]``, int32 (int64 accepted), contiguous, on q's device:
        sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``
        and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``.
    max_seqlen_q : int, optional
        Longest query sequence (sizes the kernel grid; computed with one host
        sync when None). ``max_seqlen_k`` is accepted for interface parity
        and not needed.
    scale, causal, sliding_window, logit_softcap, alibi_slopes
        See the module docstring. ``alibi_slopes`` is ``[num_q_heads]`` float32.
    out : torch.Tensor, optional
        ``[total_q, num_q_heads, head_dim_v]``, dtype of ``q``; written and returned.
    plan : VarlenPlan, optional
        The batch's plan (:func:`plan_varlen`, made once per forward): the
        ``cu_seqlens`` and ``max_seqlen_q`` then come from it (pass None, or
        the plan's own) and this call only checks q, k, v against it.

    Returns
    -------
    torch.Tensor
        ``[total_q, num_q_heads, head_dim_v]``, dtype of ``q``.

    Math (sequence ``b``, query ``i`` at position ``p_i = kv_len - q_len + i``,
    query head ``h``, KV head ``g = h // (Hq // Hk)``; float32)::

        s_ij   = scale * q_ih . k_jg                   (softcap: c * tanh(s_ij / c))
        s_ij  += slope_h * (j - p_i)                   (ALiBi)
        s_ij   = -inf unless j visible from p_i        (causal / window)
        out_ih = sum_j softmax_j(s_ij) * v_jg
    """
    op = "varlen_attention"
    if plan is not None:
        return _varlen_planned(op, plan, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                               causal, sliding_window, logit_softcap, alibi_slopes, out)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k are required without a plan; pass both, or "
                         "plan=plan_varlen(...)")
    _checks.check_dtype(op, "q", q, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "q", q, 3, "[total_q, num_q_heads, head_dim]")
    _checks.check_dim(op, "k", k, 3, "[total_k, num_kv_heads, head_dim]")
    _checks.check_dim(op, "v", v, 3, "[total_k, num_kv_heads, head_dim_v]")
    _checks.check_dtype(op, "k", k, (q.dtype,))
    _checks.check_dtype(op, "v", v, (q.dtype,))
    _checks.check_size(op, "k", k.shape[-1], q.shape[-1], "head_dim (q's)")
    if tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"{op}: v has shape {tuple(v.shape)}; its [total_k, num_kv_heads] must match "
                         f"k's {tuple(k.shape[:2])}")
    _check_heads(op, q.shape[1], k.shape[1], q.shape[2], v.shape[2])
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_last_dim_contiguous(op, name, t)
    _check_cu_seqlens(op, cu_seqlens_q, cu_seqlens_k)
    _check_max(op, "max_seqlen_q", max_seqlen_q)
    _check_max(op, "max_seqlen_k", max_seqlen_k)
    scale, sliding_window, logit_softcap = _check_options(op, q, q.shape[1], q.shape[2], scale, sliding_window,
                                                          logit_softcap, alibi_slopes)
    out_shape = (q.shape[0], q.shape[1], v.shape[2])
    _check_out(op, out, out_shape, q.dtype)
    _checks.check_same_device(op, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                              alibi_slopes=alibi_slopes, out=out)
    if out is None:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)

    def run_triton():
        return _prefill_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q, scale, causal,
                               sliding_window, logit_softcap, alibi_slopes, out, paged=False)

    def run_reference():
        return _varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, sliding_window,
                                 logit_softcap, alibi_slopes, out)

    _dispatch.dispatch(op, run_triton, run_reference, (q, k, v), empty=q.shape[0] == 0,
                       vendor_fn=lambda: vendor.prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q,
                                                        scale, causal, sliding_window, logit_softcap, alibi_slopes,
                                                        out, paged=False, max_seqlen_k=max_seqlen_k))
    return out


@dataclass(frozen=True, eq=False)
class VarlenPlan:
    """varlen_attention's per-batch metadata, validated once (see :func:`plan_varlen`).

    Kept for the layers on first use: the host copy of the ``cu_seqlens``
    (reference tier), ``max_seqlen_q`` when not given (Triton tier), the tier.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    batch: int
    max_seqlen_q: int | None
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device: torch.device
    _memo: dict = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        return describe_plan(self, "batch", "num_q_heads", "num_kv_heads", "head_dim", "head_dim_v")


def plan_varlen(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, num_q_heads: int, num_kv_heads: int,
                head_dim: int, dtype: torch.dtype, head_dim_v: int | None = None,
                max_seqlen_q: int | None = None) -> VarlenPlan:
    """Validate one packed batch's metadata once (``cu_seqlens`` as in :func:`varlen_attention`);
    the plan serves every layer whose q, k, v have these head counts, dims and dtype."""
    op = "plan_varlen"
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    check_plan_geometry(op, dtype, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        head_dim_v=head_dim_v)
    _check_heads(op, num_q_heads, num_kv_heads, head_dim, head_dim_v)
    _check_cu_seqlens(op, cu_seqlens_q, cu_seqlens_k)
    _check_max(op, "max_seqlen_q", max_seqlen_q)
    _checks.check_same_device(op, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return VarlenPlan(cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.shape[0] - 1, max_seqlen_q, num_q_heads, num_kv_heads,
                      head_dim, head_dim_v, dtype, cu_seqlens_q.device)


def _varlen_planned(op, plan, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                    sliding_window, logit_softcap, alibi_slopes, out):
    """varlen_attention with a plan: O(1) checks of q, k, v against it, then the same implementations."""
    check_plan_arguments(op, plan, VarlenPlan, "plan_varlen", cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if max_seqlen_q is not None and max_seqlen_q != plan.max_seqlen_q:
        raise ValueError(f"{op}: max_seqlen_q={max_seqlen_q} was passed with a plan made with "
                         f"{plan.max_seqlen_q}; pass None or make a new plan")
    for name, t, tail in (("q", q, (plan.num_q_heads, plan.head_dim)), ("k", k, (plan.num_kv_heads, plan.head_dim)),
                          ("v", v, (plan.num_kv_heads, plan.head_dim_v))):
        if t.dim() != 3 or t.shape[1:] != tail or (name == "v" and t.shape[0] != k.shape[0]):
            raise plan_mismatch(op, plan, "plan_varlen", f"{name} has shape", tuple(t.shape))
        if t.dtype is not plan.dtype:
            raise plan_mismatch(op, plan, "plan_varlen", f"{name} has dtype", str(t.dtype).replace("torch.", ""))
        if t.device != plan.device:
            raise plan_mismatch(op, plan, "plan_varlen", f"{name} is on", t.device)
        if t.stride(-1) != 1:
            _check_last_dim_contiguous(op, name, t)
    _check_max(op, "max_seqlen_k", max_seqlen_k)
    scale, sliding_window, logit_softcap = _planned_options(op, plan, scale, sliding_window, logit_softcap)
    if alibi_slopes is not None:
        _check_alibi(op, alibi_slopes, plan.num_q_heads)
        _checks.check_same_device(op, q=q, alibi_slopes=alibi_slopes)
    out_shape = (q.shape[0], plan.num_q_heads, plan.head_dim_v)
    if out is None:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    else:
        _check_out(op, out, out_shape, q.dtype)
        _checks.check_same_device(op, q=q, out=out)
    cu_q, cu_k, memo = plan.cu_seqlens_q, plan.cu_seqlens_k, plan._memo

    def run_triton():
        if "max_seqlen_q" not in memo:  # one host sync per plan when the caller did not know it
            memo["max_seqlen_q"] = plan.max_seqlen_q if plan.max_seqlen_q is not None else _max_seqlen(cu_q)
        return _prefill_triton(q, k, v, cu_q, cu_k, None, memo["max_seqlen_q"], scale, causal, sliding_window,
                               logit_softcap, alibi_slopes, out, paged=False)

    def run_reference():
        if "bounds" not in memo:
            memo["bounds"] = (cu_q.tolist(), cu_k.tolist())
        return _varlen_reference(q, k, v, cu_q, cu_k, scale, causal, sliding_window, logit_softcap, alibi_slopes,
                                 out, bounds=memo["bounds"])

    _dispatch.dispatch(op, run_triton, run_reference, (q, k, v), empty=q.shape[0] == 0,
                       impl=planned_impl(op, plan, q, k, v, vendor=True),
                       vendor_fn=lambda: vendor.prefill(q, k, v, cu_q, cu_k, None, plan.max_seqlen_q, scale, causal,
                                                        sliding_window, logit_softcap, alibi_slopes, out, paged=False,
                                                        max_seqlen_k=max_seqlen_k))
    return out


def paged_prefill_attention(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, kv_seqlens: torch.Tensor, *,
    max_seqlen_q: int | None = None, max_kv_seqlen: int | None = None,
    scale: float | None = None, causal: bool = True, sliding_window: int | None = None,
    logit_softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill (or chunked prefill) attention whose keys live in the paged cache.

    The new tokens' keys and values must already be in the cache; each
    sequence attends to its cached prefix plus its new tokens.

    Parameters
    ----------
    q : torch.Tensor
        ``[total_q, num_q_heads, head_dim]``, float16 / bfloat16 / float32;
        free token/head strides, contiguous last dimension.
    key_cache : torch.Tensor
        ``[num_blocks, block_size, num_kv_heads, head_dim]``, dtype of ``q``;
        block_size a power of two (1 included); free strides except the last.
    value_cache : torch.Tensor
        ``[num_blocks, block_size, num_kv_heads, head_dim_v]``, dtype of ``q``.
    block_table : torch.Tensor
        ``[batch, max_blocks_per_seq]``, int32 (int64 accepted): physical
        block of each logical block, any order.
    cu_seqlens_q : torch.Tensor
        ``[batch + 1]``, int32: sequence ``b``'s queries are rows
        ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (``q_len_b`` of them).
    kv_seqlens : torch.Tensor
        ``[batch]``, int32: ``kv_len_b`` = cached prefix + new tokens
        (``>= q_len_b`` for a well-formed batch).
    max_seqlen_q : int, optional
        Longest ``q_len_b`` (kernel grid; one host sync when None).
        ``max_kv_seqlen`` is accepted for interface parity.
    scale, causal, sliding_window, logit_softcap, alibi_slopes, out
        As in :func:`varlen_attention`.

    Returns
    -------
    torch.Tensor
        ``[total_q, num_q_heads, head_dim_v]``, dtype of ``q``.

    Math: as :func:`varlen_attention` with ``k_j``, ``v_j`` read from
    ``cache[block_table[b, j // block_size], j % block_size]`` for
    ``0 <= j < kv_len_b``; query ``i`` of sequence ``b`` sits at position
    ``kv_len_b - q_len_b + i`` (bottom-right causal alignment).
    """
    op = "paged_prefill_attention"
    _checks.check_dtype(op, "q", q, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "q", q, 3, "[total_q, num_q_heads, head_dim]")
    _check_last_dim_contiguous(op, "q", q)
    _check_cache(op, q, key_cache, value_cache, block_table)
    _check_heads(op, q.shape[1], key_cache.shape[2], q.shape[2], value_cache.shape[3])
    _check_index(op, "cu_seqlens_q", cu_seqlens_q, 1, "[batch + 1]")
    _check_index(op, "kv_seqlens", kv_seqlens, 1, "[batch]")
    batch = kv_seqlens.shape[0]
    _checks.check_size(op, "cu_seqlens_q", cu_seqlens_q.shape[0], batch + 1, "length (batch + 1, batch from kv_seqlens)")
    _checks.check_size(op, "block_table", block_table.shape[0], batch, "rows (batch, from kv_seqlens)")
    _check_max(op, "max_seqlen_q", max_seqlen_q)
    _check_max(op, "max_kv_seqlen", max_kv_seqlen)
    scale, sliding_window, logit_softcap = _check_options(op, q, q.shape[1], q.shape[2], scale, sliding_window,
                                                          logit_softcap, alibi_slopes)
    out_shape = (q.shape[0], q.shape[1], value_cache.shape[3])
    _check_out(op, out, out_shape, q.dtype)
    _checks.check_same_device(op, q=q, key_cache=key_cache, value_cache=value_cache, block_table=block_table,
                              cu_seqlens_q=cu_seqlens_q, kv_seqlens=kv_seqlens, alibi_slopes=alibi_slopes,
                              out=out)
    if out is None:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)

    def run_triton():
        return _prefill_triton(q, key_cache, value_cache, cu_seqlens_q, kv_seqlens, block_table, max_seqlen_q,
                               scale, causal, sliding_window, logit_softcap, alibi_slopes, out, paged=True)

    def run_reference():
        return _paged_prefill_reference(q, key_cache, value_cache, block_table, cu_seqlens_q, kv_seqlens, scale,
                                        causal, sliding_window, logit_softcap, alibi_slopes, out)

    _dispatch.dispatch(op, run_triton, run_reference, (q, key_cache, value_cache), empty=q.shape[0] == 0,
                       vendor_fn=lambda: vendor.prefill(q, key_cache, value_cache, cu_seqlens_q, kv_seqlens, block_table,
                                                        max_seqlen_q, scale, causal, sliding_window, logit_softcap,
                                                        alibi_slopes, out, paged=True))
    return out


def paged_decode_attention(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor | None = None,
    kv_seqlens: torch.Tensor | None = None, *,
    scale: float | None = None, sliding_window: int | None = None, logit_softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None, num_kv_splits: int | None = None, return_lse: bool = False,
    out: torch.Tensor | None = None, plan: DecodePlan | None = None,
):
    """Decode attention: a few new queries per sequence against the paged cache.

    Parameters
    ----------
    q : torch.Tensor
        ``[batch, num_q_heads, head_dim]`` (one new token per sequence) or
        ``[batch, q_len, num_q_heads, head_dim]`` with ``1 <= q_len <= 8``
        (speculative/MTP verification: the last ``q_len`` positions, causal
        among themselves). float16 / bfloat16 / float32, contiguous last dim.
    key_cache, value_cache, block_table
        As in :func:`paged_prefill_attention`; the queries' own keys are
        already in the cache.
    kv_seqlens : torch.Tensor
        ``[batch]``, int32 (int64 accepted): keys per sequence, including the
        ``q_len`` new ones.
    scale, sliding_window, logit_softcap, alibi_slopes
        See the module docstring (always causal).
    num_kv_splits : int, optional
        Split each sequence's keys into this many slices processed by separate
        programs, then merged by a reduction kernel (long contexts, small
        batches). None: chosen from the block table's capacity (shapes only,
        no host sync; see ``_split_kv.auto_num_kv_splits``). The result does not depend
        on it beyond rounding.
    return_lse : bool
        Also return the log-sum-exp of each query's scores.
    out : torch.Tensor, optional
        ``q.shape[:-1] + (head_dim_v,)``, dtype of ``q``; written and returned.
    plan : DecodePlan, optional
        The batch's plan (:func:`plan_paged_decode`, made once per forward
        batch): then ``block_table``, ``kv_seqlens`` and ``num_kv_splits``
        come from it (pass None, or the plan's own), and this call only
        checks that q and the caches match it. Without a plan one is made
        for this call.

    Returns
    -------
    out : torch.Tensor
        ``[..., num_q_heads, head_dim_v]`` (leading dims of ``q``), dtype of ``q``.
    lse : torch.Tensor, only with ``return_lse``
        ``[..., num_q_heads]`` float32, natural log; ``-inf`` for a query with
        no visible key.

    Math (query ``t`` of sequence ``b`` at ``p = kv_len_b - q_len + t``)::

        s_j   = scale * q . k_j  (softcap, ALiBi as in varlen_attention),  j <= p (and j > p - W)
        out   = sum_j exp(s_j - lse) v_j,   lse = log sum_j exp(s_j)
        split-KV: slice r gives (o_r, lse_r) over its keys, then
        lse = log sum_r exp(lse_r),  out = sum_r exp(lse_r - lse) o_r
    """
    op = "paged_decode_attention"
    if plan is None:
        plan = _plan_for_call(op, q, key_cache, value_cache, block_table, kv_seqlens, num_kv_splits)
    else:
        check_plan_arguments(op, plan, DecodePlan, "plan_paged_decode", block_table=block_table,
                             kv_seqlens=kv_seqlens, num_kv_splits=num_kv_splits)
    _check_against_plan(op, plan, q, key_cache, value_cache)
    scale, sliding_window, logit_softcap = _planned_options(op, plan, scale, sliding_window, logit_softcap)
    if alibi_slopes is not None:
        _check_alibi(op, alibi_slopes, plan.num_q_heads)
        _checks.check_same_device(op, q=q, alibi_slopes=alibi_slopes)
    out_shape = tuple(q.shape[:-1]) + (plan.head_dim_v,)
    if out is None:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    else:
        _check_out(op, out, out_shape, q.dtype)
        _checks.check_same_device(op, q=q, out=out)
    lse = torch.empty(out_shape[:-1], dtype=torch.float32, device=q.device) if return_lse else None
    # the implementations take q, out and lse with a q_len dimension: [B, q_len, Hq, ...]
    if q.dim() == 3:
        q4, out4, lse3 = q.unsqueeze(1), out.unsqueeze(1), (lse.unsqueeze(1) if return_lse else None)
    else:
        q4, out4, lse3 = q, out, lse
    args = (q4, key_cache, value_cache, plan.block_table, plan.kv_seqlens, scale, sliding_window, logit_softcap,
            alibi_slopes, plan.num_kv_splits, out4, lse3, plan)
    _dispatch.dispatch(op, _decode_triton, _decode_reference, (q, key_cache, value_cache), *args,
                       vendor_fn=vendor.paged_decode, empty=plan.batch == 0,
                       impl=planned_impl(op, plan, q, key_cache, value_cache, vendor=True))
    return (out, lse) if return_lse else out


def _plan_for_call(op, q, key_cache, value_cache, block_table, kv_seqlens, num_kv_splits) -> DecodePlan:
    """An unplanned call: every input checked as before, then a plan for this call only."""
    if block_table is None or kv_seqlens is None:
        raise ValueError(f"{op}: block_table and kv_seqlens are required without a plan; pass both, or "
                         "plan=plan_paged_decode(...)")
    _checks.check_dtype(op, "q", q, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "q", q, (3, 4), "[batch, num_q_heads, head_dim] or [batch, q_len, num_q_heads, head_dim]")
    _check_last_dim_contiguous(op, "q", q)
    q4 = q.unsqueeze(1) if q.dim() == 3 else q
    query_len = q4.shape[1]
    if not 1 <= query_len <= MAX_DECODE_QUERY_LEN:
        raise ValueError(f"{op}: q_len={query_len} is not supported; allowed: 1..{MAX_DECODE_QUERY_LEN} "
                         "(use paged_prefill_attention for longer chunks)")
    _check_cache(op, q, key_cache, value_cache, block_table)
    _check_heads(op, q4.shape[2], key_cache.shape[2], q4.shape[3], value_cache.shape[3])
    _check_index(op, "kv_seqlens", kv_seqlens, 1, "[batch]")
    batch = q4.shape[0]
    _checks.check_size(op, "kv_seqlens", kv_seqlens.shape[0], batch, "length (q's batch)")
    _checks.check_size(op, "block_table", block_table.shape[0], batch, "rows (q's batch)")
    _check_num_kv_splits(op, num_kv_splits)
    _checks.check_same_device(op, q=q, key_cache=key_cache, value_cache=value_cache, block_table=block_table,
                              kv_seqlens=kv_seqlens)
    return DecodePlan(block_table, kv_seqlens, batch, query_len, q4.shape[2], key_cache.shape[2], q4.shape[3],
                      value_cache.shape[3], key_cache.shape[1], q.dtype, q.device, num_kv_splits)
