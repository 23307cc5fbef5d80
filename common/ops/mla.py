"""Multi-head latent attention (DeepSeek-V2/V3 MLA) over a paged latent cache.

Public functions:
    fill_mla_cache(kv_c, k_pe, latent_cache, slot_mapping) -> None
    mla_decode(q_nope, q_rope, latent_cache, block_table, kv_seqlens, scale, ...) -> out (, lse)
    mla_prefill(q, latent_cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight, ...) -> out

The latent cache holds one "head" per token: the compressed KV latent
``c`` (``kv_lora_rank`` values, already RMS-normed) followed by the shared
rotary key part ``k_pe`` (``rope_dim`` values, already rotated)::

    latent_cache [num_blocks, block_size, kv_lora_rank + rope_dim]
    (a [num_blocks, block_size, 1, kv_lora_rank + rope_dim] cache, LMDeploy's
    and SGLang's layout with one KV head, is accepted everywhere too)

Token ``t`` of sequence ``b`` lives in block ``block_table[b, t // block_size]``
at offset ``t % block_size``.

Two ways to attend, as in DeepSeek's own inference code:
* decode, "absorbed": the query's no-rope part was multiplied by ``W_UK``
  beforehand, so scores are taken against the latents directly and the
  output stays in latent space (the caller applies ``W_UV``). Every head
  reads the same latent rows, so the kernel loads each latent tile once for
  a tile of heads.
* prefill, "non-absorbed": latents are expanded through ``kv_b_proj`` into
  per-head ``k_nope`` and ``v`` and ordinary causal attention runs (the
  team's ``varlen_attention`` on a device; float32 torch math as reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch, vendor
from maca_infer.common.ops._jit import interpreter_branch, lazy_jit, next_power_of_2, tl
from maca_infer.common.ops._split_kv import (
    auto_num_kv_splits,
    check_plan_arguments,
    check_plan_geometry,
    describe_plan,
    merge_kv_splits,
    plan_mismatch,
    planned_impl,
)
from maca_infer.common.ops._triton_helpers import LOG2E, online_softmax_finish, online_softmax_step
from maca_infer.common.ops.kv_cache import check_slot_mapping, check_slots_in_range

# Heads per decode program (BLOCK_H) and latent rows per decode tile (BLOCK_N)
# come from _launch's "mla_decode" entry: 16 is the smallest tile tl.dot
# takes, and keeps the [16, kv_lora_rank] float32 accumulator plus one latent
# tile in registers for kv_lora_rank = 512 (no spills on sm_80: see
# tests/ops/test_mla.py); one stage on MACA keeps fp32 within 64 KiB.


# ==========================================================================
# Triton kernels
# ==========================================================================
def _fill_mla_cache_kernel_fn(
    kv_c_ptr, k_pe_ptr, cache_ptr, slot_ptr,
    kv_lora_rank, rope_dim, block_size,
    stride_c_token, stride_pe_token, stride_cache_block, stride_cache_token,
    BLOCK_C: tl.constexpr, BLOCK_PE: tl.constexpr,
):
    # One program per token: the latent row is two contiguous runs
    # (c, then k_pe) of the same cache row.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    valid = slot >= 0  # padding tokens write nothing
    row = cache_ptr + (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_token
    c_cols = tl.arange(0, BLOCK_C)
    c_mask = (c_cols < kv_lora_rank) & valid
    c = tl.load(kv_c_ptr + token * stride_c_token + c_cols, mask=c_mask)
    tl.store(row + c_cols, c, mask=c_mask)
    pe_cols = tl.arange(0, BLOCK_PE)
    pe_mask = (pe_cols < rope_dim) & valid
    pe = tl.load(k_pe_ptr + token * stride_pe_token + pe_cols, mask=pe_mask)
    tl.store(row + kv_lora_rank + pe_cols, pe, mask=pe_mask)


_fill_mla_cache_kernel = lazy_jit(_fill_mla_cache_kernel_fn)


def _mla_decode_split_kernel_fn(
    q_nope_ptr, q_rope_ptr, cache_ptr, block_table_ptr, kv_seqlens_ptr,
    partial_out_ptr, partial_lse_ptr,
    num_heads, kv_lora_rank, rope_dim, block_size, num_splits, scale,
    stride_qn_batch, stride_qn_head, stride_qr_batch, stride_qr_head,
    stride_cache_block, stride_cache_token, stride_block_table,
    stride_po_batch, stride_po_head, stride_po_split, stride_pl_batch, stride_pl_head,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_PE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # grid = (batch, cdiv(num_heads, BLOCK_H), num_splits). One program: a tile
    # of BLOCK_H heads of one sequence against one split of its latent rows
    # (the sequence's own length cut into num_splits runs of whole BLOCK_N
    # tiles). Each latent tile [BLOCK_N, kv_lora_rank + rope_dim] is loaded
    # once for all the heads (that is the bandwidth win of MLA decode). Writes
    # the split's softmax-normalized output and its log-sum-exp;
    # _split_kv.merge_kv_splits merges the splits.
    seq = tl.program_id(0).to(tl.int64)
    head_tile = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_seqlens_ptr + seq).to(tl.int32)
    tokens_per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, kv_len)

    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < num_heads
    c_cols = tl.arange(0, BLOCK_C)
    c_mask = c_cols < kv_lora_rank
    pe_cols = tl.arange(0, BLOCK_PE)
    pe_mask = pe_cols < rope_dim

    q_nope = tl.load(q_nope_ptr + seq * stride_qn_batch + heads[:, None] * stride_qn_head + c_cols[None, :],
                     mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_rope = tl.load(q_rope_ptr + seq * stride_qr_batch + heads[:, None] * stride_qr_head + pe_cols[None, :],
                     mask=h_mask[:, None] & pe_mask[None, :], other=0.0)
    if DOT_FP32:
        q_nope = q_nope.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        block = tl.load(block_table_ptr + seq * stride_block_table + pos // block_size, mask=n_mask, other=0)
        rows = cache_ptr + block.to(tl.int64) * stride_cache_block + (pos % block_size) * stride_cache_token
        c = tl.load(rows[:, None] + c_cols[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        k_pe = tl.load(rows[:, None] + kv_lora_rank + pe_cols[None, :], mask=n_mask[:, None] & pe_mask[None, :],
                       other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        # s[h, n] = scale * (q_nope[h] . c[n] + q_rope[h] . k_pe[n]), in log2 units
        s = tl.dot(q_nope, tl.trans(c)) + tl.dot(q_rope, tl.trans(k_pe))
        s = tl.where(n_mask[None, :], s * (scale * LOG2E), float("-inf"))
        m_i, l_i, p, alpha = online_softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)

    # An empty split (a short sequence) writes only lse = -inf: the merge
    # then neither weighs nor reads its output rows.
    out, lse = online_softmax_finish(acc, m_i, l_i)
    has_keys = l_i > 0.0
    tl.store(partial_out_ptr + seq * stride_po_batch + heads[:, None] * stride_po_head + split * stride_po_split
             + c_cols[None, :], out, mask=(h_mask & has_keys)[:, None] & c_mask[None, :])
    tl.store(partial_lse_ptr + seq * stride_pl_batch + heads * stride_pl_head + split, lse, mask=h_mask)


_mla_decode_split_kernel = lazy_jit(_mla_decode_split_kernel_fn)


# ==========================================================================
# Launchers
# ==========================================================================
def _fill_mla_cache_triton(kv_c, k_pe, latent_cache, slot_mapping):
    num_tokens, kv_lora_rank = kv_c.shape
    if num_tokens == 0:
        return
    rope_dim = k_pe.shape[1]
    _fill_mla_cache_kernel[(num_tokens,)](
        kv_c, k_pe, latent_cache, slot_mapping,
        kv_lora_rank, rope_dim, latent_cache.shape[1],
        kv_c.stride(0), k_pe.stride(0), latent_cache.stride(0), latent_cache.stride(1),
        BLOCK_C=next_power_of_2(kv_lora_rank), BLOCK_PE=next_power_of_2(max(rope_dim, 1)),
        **_launch.options("fill_mla_cache"),
    )


def _mla_decode_triton(q_nope, q_rope, cache, block_table, kv_seqlens, scale, num_kv_splits, out, lse, plan):
    del block_table, kv_seqlens, num_kv_splits  # the plan's
    if plan.batch == 0 or plan.num_heads == 0:
        return
    launch = _mla_launch(plan)
    partial_out, partial_lse = launch.partial_out, launch.partial_lse
    qn, qr, cs = q_nope.stride(), q_rope.stride(), cache.stride()
    _mla_decode_split_kernel[launch.grid](
        q_nope, q_rope, cache, plan.block_table, plan.kv_seqlens, partial_out, partial_lse,
        plan.num_heads, plan.kv_lora_rank, plan.rope_dim, plan.block_size, launch.num_kv_splits, scale,
        qn[0], qn[1], qr[0], qr[1], cs[0], cs[1], plan.block_table.stride(0), *launch.partial_strides,
        **launch.constants,
    )
    # one query token per sequence: the merge's token dimension is 1
    merge_kv_splits(partial_out.unsqueeze(1), partial_lse.unsqueeze(1), out.unsqueeze(1),
                    lse.unsqueeze(1) if lse is not None else None)


def _gather_latents(cache, block_table, kv_seqlens):
    """All sequences' latent rows, packed: ([total_kv, L + R], cu_seqlens_k [B + 1] int32).

    One host read of kv_seqlens (prefill has its lengths on the host anyway).
    """
    block_size = cache.shape[1]
    device = cache.device
    lengths = kv_seqlens.to(torch.int64)
    cu_seqlens_k = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens_k[1:])
    total = int(cu_seqlens_k[-1].item())
    seq_of_row = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths, output_size=total)
    pos = torch.arange(total, device=device) - cu_seqlens_k[seq_of_row]
    blocks = block_table[seq_of_row, pos // block_size].to(torch.int64)
    return cache[blocks, pos % block_size], cu_seqlens_k.to(torch.int32)


def _mla_prefill_triton(q, cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight, qk_nope_head_dim,
                        v_head_dim, scale, causal, max_seqlen_q, out):
    from maca_infer.common.ops.attention import varlen_attention

    num_heads = q.shape[1]
    kv_lora_rank = kv_b_proj_weight.shape[1]
    latents, cu_seqlens_k = _gather_latents(cache, block_table, kv_seqlens)
    # expansion through kv_b_proj: one GEMM over every cached row (the vendor BLAS
    # is the right tool for it), in the model dtype like the model's own linear
    kv = torch.matmul(latents[:, :kv_lora_rank], kv_b_proj_weight.t())
    kv = kv.view(-1, num_heads, qk_nope_head_dim + v_head_dim)
    k_pe = latents[:, None, kv_lora_rank:].expand(-1, num_heads, -1)
    k = torch.cat((kv[..., :qk_nope_head_dim], k_pe), dim=-1)
    v = kv[..., qk_nope_head_dim:]
    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, scale=scale, causal=causal,
                     out=out)


# ==========================================================================
# Torch references
# ==========================================================================
def _fill_mla_cache_reference(kv_c, k_pe, latent_cache, slot_mapping):
    block_size = latent_cache.shape[1]
    kv_lora_rank = kv_c.shape[1]
    slots = slot_mapping.long()
    valid = slots >= 0
    slots = slots[valid]
    blocks, offsets = slots // block_size, slots % block_size
    latent_cache[blocks, offsets, :kv_lora_rank] = kv_c[valid]
    latent_cache[blocks, offsets, kv_lora_rank:] = k_pe[valid]


def _sequence_latents(cache, block_table_row, kv_len):
    """Latent rows [kv_len, L + R] of one sequence, in position order."""
    pos = torch.arange(kv_len, device=cache.device)
    blocks = block_table_row[pos // cache.shape[1]].long()
    return cache[blocks, pos % cache.shape[1]]


def _mla_decode_reference(q_nope, q_rope, cache, block_table, kv_seqlens, scale, num_kv_splits, out, lse, plan):
    del block_table, kv_seqlens, num_kv_splits  # the plan's
    kv_lora_rank = plan.kv_lora_rank
    for b, rows in enumerate(_mla_rows(plan)):
        if rows is None:
            out[b] = 0
            if lse is not None:
                lse[b] = float("-inf")
            continue
        latents = cache[rows].float()
        c, k_pe = latents[:, :kv_lora_rank], latents[:, kv_lora_rank:]
        scores = scale * (q_nope[b].float() @ c.t() + q_rope[b].float() @ k_pe.t())  # [H, kv_len]
        out[b] = torch.softmax(scores, dim=-1) @ c
        if lse is not None:
            lse[b] = torch.logsumexp(scores, dim=-1)


def _mla_prefill_reference(q, cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight, qk_nope_head_dim,
                           v_head_dim, scale, causal, max_seqlen_q, out):
    num_heads = q.shape[1]
    kv_lora_rank = kv_b_proj_weight.shape[1]
    # [H, Dn + Dv, L]: per head, rows [0, Dn) make k_nope, rows [Dn, Dn + Dv) make v
    w = kv_b_proj_weight.float().view(num_heads, qk_nope_head_dim + v_head_dim, kv_lora_rank)
    w_uk, w_uv = w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]
    starts = cu_seqlens_q.tolist()
    for b, kv_len in enumerate(kv_seqlens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        latents = _sequence_latents(cache, block_table[b], kv_len).float()
        c, k_pe = latents[:, :kv_lora_rank], latents[:, kv_lora_rank:]
        k_nope = torch.einsum("hdl,jl->hjd", w_uk, c)   # [H, kv_len, Dn]
        v = torch.einsum("hdl,jl->hjd", w_uv, c)        # [H, kv_len, Dv]
        qb = q[q_start:q_end].float().transpose(0, 1)   # [H, q_len, Dn + R]
        scores = scale * (qb[..., :qk_nope_head_dim] @ k_nope.transpose(1, 2)
                          + qb[..., qk_nope_head_dim:] @ k_pe.t())  # [H, q_len, kv_len]
        if causal:
            # query i sits at position kv_len - q_len + i (the new tokens end the sequence)
            query_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
            visible = torch.arange(kv_len, device=q.device)[None, :] <= query_pos
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees no key gives 0
        out[q_start:q_end] = (probs @ v).transpose(0, 1)


# ==========================================================================
# Plan: per-batch metadata, made once and reused by every layer
# ==========================================================================
@dataclass(frozen=True, eq=False)
class MLADecodePlan:
    """What absorbed MLA decode needs to know about one batch, validated once.

    Made by :func:`plan_mla_decode` once per forward batch and passed to
    :func:`mla_decode` by every layer, which then checks only that its
    queries and latent cache match the plan (O(1)) and launches. Derived on
    first use and kept for the other layers: the Triton tier's split count,
    grid and split-KV scratch buffers, and the reference tier's per-sequence
    row indices (one host read of ``kv_seqlens`` per plan, not per layer),
    and the tier (``_dispatch.select_impl``'s choice at the first layer).
    """

    block_table: torch.Tensor
    kv_seqlens: torch.Tensor
    batch: int
    num_heads: int
    kv_lora_rank: int
    rope_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    num_kv_splits: int | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        return describe_plan(self, "batch", "num_heads", "kv_lora_rank", "rope_dim", "block_size")


def plan_mla_decode(block_table: torch.Tensor, kv_seqlens: torch.Tensor, *, num_heads: int, kv_lora_rank: int,
                    rope_dim: int, block_size: int, dtype: torch.dtype,
                    num_kv_splits: int | None = None) -> MLADecodePlan:
    """Validate one MLA decode batch's metadata once; the plan serves every layer.

    ``block_table`` [batch, max_blocks_per_seq] and ``kv_seqlens`` [batch] as
    in :func:`mla_decode`, on the layers' device; ``num_heads``,
    ``kv_lora_rank``, ``rope_dim``, ``block_size`` (a power of two >= 8) and
    ``dtype``: what every layer's queries and latent cache will have;
    ``num_kv_splits``: None (auto) or an int >= 1. Lengths held on the host
    are range-checked here, once.
    """
    op = "plan_mla_decode"
    check_plan_geometry(op, dtype, 0, num_heads=num_heads, rope_dim=rope_dim)
    check_plan_geometry(op, dtype, 1, kv_lora_rank=kv_lora_rank, block_size=block_size)
    _checks.check_block_size(op, block_size)
    _checks.check_dim(op, "kv_seqlens", kv_seqlens, 1, "[batch]")
    batch = kv_seqlens.shape[0]
    _check_block_table(op, block_table, kv_seqlens, batch)
    _check_num_kv_splits(op, num_kv_splits)
    _checks.check_same_device(op, block_table=block_table, kv_seqlens=kv_seqlens)
    _check_lengths_on_host(op, kv_seqlens, block_table, block_size)
    return MLADecodePlan(block_table, kv_seqlens, batch, num_heads, kv_lora_rank, rope_dim, block_size, dtype,
                         block_table.device, num_kv_splits)


def _check_num_kv_splits(op, num_kv_splits):
    if num_kv_splits is not None and (not isinstance(num_kv_splits, int) or isinstance(num_kv_splits, bool)
                                      or num_kv_splits < 1):
        raise ValueError(f"{op}: num_kv_splits={num_kv_splits!r} is not supported; allowed: None or an int >= 1")


def _plan_mismatch(op, plan, name, found) -> ValueError:
    return plan_mismatch(op, plan, "plan_mla_decode", name, found)


def _check_against_plan(op, plan, q_nope, q_rope, latent_cache) -> torch.Tensor:
    """The O(1) per-layer checks of a planned call; returns the cache as [NB, BS, L + R]."""
    cache = latent_cache[:, :, 0] if latent_cache.dim() == 4 and latent_cache.shape[2] == 1 else latent_cache
    for name, t, width in (("q_nope", q_nope, plan.kv_lora_rank), ("q_rope", q_rope, plan.rope_dim)):
        shape = t.shape
        if len(shape) != 3 or shape[0] != plan.batch or shape[1] != plan.num_heads or shape[2] != width:
            raise _plan_mismatch(op, plan, f"{name} has shape", tuple(shape))
        if t.dtype is not plan.dtype:
            raise _plan_mismatch(op, plan, f"{name} has dtype", str(t.dtype).replace("torch.", ""))
        if t.device != plan.device:
            raise _plan_mismatch(op, plan, f"{name} is on", t.device)
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name}'s last dimension must be contiguous (stride {t.stride()})")
    shape = cache.shape
    if len(shape) != 3 or shape[1] != plan.block_size or shape[2] != plan.kv_lora_rank + plan.rope_dim:
        raise _plan_mismatch(op, plan, "latent_cache has shape", tuple(latent_cache.shape))
    if cache.dtype is not plan.dtype:
        raise _plan_mismatch(op, plan, "latent_cache has dtype", str(cache.dtype).replace("torch.", ""))
    if cache.device != plan.device:
        raise _plan_mismatch(op, plan, "latent_cache is on", cache.device)
    if cache.stride(-1) != 1:
        raise ValueError(f"{op}: latent_cache's last dimension must be contiguous (stride {cache.stride()})")
    return cache


class _MLALaunch:
    """The Triton tier's constants and split-KV scratch for one plan."""

    __slots__ = ("num_kv_splits", "grid", "constants", "partial_out", "partial_lse", "partial_strides")

    def __init__(self, plan: MLADecodePlan):
        batch, num_heads, kv_lora_rank, device = plan.batch, plan.num_heads, plan.kv_lora_rank, plan.device
        table = _launch.config("mla_decode")
        block_h = table["BLOCK_H"]
        num_splits = plan.num_kv_splits
        if num_splits is None:
            # one program per (sequence, tile of BLOCK_H heads) and split
            num_splits = auto_num_kv_splits(batch * -(-num_heads // block_h),
                                            plan.block_table.shape[1] * plan.block_size, device)
        block_c = next_power_of_2(kv_lora_rank)
        fp32_limit = table["fp32_max_kv_lora_rank"]
        if plan.dtype == torch.float32 and fp32_limit and block_c > fp32_limit and not interpreter_branch(device):
            raise ValueError(
                f"mla_decode: float32 at kv_lora_rank {kv_lora_rank} does not fit this device "
                f"({_launch.family()}): its tiles need about 100 KiB of shared memory, and a MACA block has "
                f"64 KiB; run the model in bfloat16/float16, or set MACA_INFER_OPS_IMPL=reference")
        self.num_kv_splits = num_splits
        self.grid = (batch, -(-num_heads // block_h), num_splits)
        # split-KV scratch, shared by the plan's layers (they run one after another on the stream)
        self.partial_out = torch.empty((batch, num_heads, num_splits, kv_lora_rank), dtype=torch.float32,
                                       device=device)
        self.partial_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=device)
        po, pl = self.partial_out.stride(), self.partial_lse.stride()
        self.partial_strides = (po[0], po[1], po[2], pl[0], pl[1])
        self.constants = dict(
            BLOCK_H=block_h, BLOCK_N=table["BLOCK_N"], BLOCK_C=block_c,
            BLOCK_PE=max(16, next_power_of_2(plan.rope_dim)),
            DOT_FP32=plan.dtype == torch.float32 or interpreter_branch(device), **_launch.options("mla_decode"),
        )


def _mla_launch(plan: MLADecodePlan) -> _MLALaunch:
    launch = plan._memo.get("triton")
    if launch is None:
        launch = plan._memo["triton"] = _MLALaunch(plan)
    return launch


def _mla_rows(plan: MLADecodePlan) -> list:
    """Per sequence, (block ids, offsets) of its latent rows in position order, or None for no rows."""
    rows = plan._memo.get("reference")
    if rows is None:
        rows = []
        for b, kv_len in enumerate(plan.kv_seqlens.tolist()):
            if kv_len == 0:
                rows.append(None)
                continue
            pos = torch.arange(kv_len, device=plan.block_table.device)
            rows.append((plan.block_table[b, pos // plan.block_size].long(), pos % plan.block_size))
        plan._memo["reference"] = rows
    return rows


# ==========================================================================
# Public functions
# ==========================================================================
def _as_latent_cache(op: str, latent_cache: torch.Tensor) -> torch.Tensor:
    """[NB, BS, L + R], or the one-head [NB, BS, 1, L + R] layout viewed as such."""
    _checks.check_dtype(op, "latent_cache", latent_cache, _checks.FLOAT_DTYPES)
    if latent_cache.dim() == 4 and latent_cache.shape[2] == 1:
        latent_cache = latent_cache[:, :, 0]
    _checks.check_dim(op, "latent_cache", latent_cache, 3,
                      "[num_blocks, block_size, kv_lora_rank + rope_dim] (or [..., 1, kv_lora_rank + rope_dim])")
    if latent_cache.stride(-1) != 1:
        raise ValueError(f"{op}: latent_cache's last dimension must be contiguous (stride {latent_cache.stride()})")
    _checks.check_block_size(op, latent_cache.shape[1])
    return latent_cache


def _check_block_table(op, block_table, kv_seqlens, batch):
    _checks.check_dtype(op, "block_table", block_table, _checks.INDEX_DTYPES)
    _checks.check_dim(op, "block_table", block_table, 2, "[batch, max_blocks_per_seq]")
    if block_table.stride(-1) != 1:
        raise ValueError(f"{op}: block_table's rows must be contiguous (stride {block_table.stride()})")
    _checks.check_size(op, "block_table", block_table.shape[0], batch, "batch")
    _checks.check_dtype(op, "kv_seqlens", kv_seqlens, _checks.INDEX_DTYPES)
    _checks.check_dim(op, "kv_seqlens", kv_seqlens, 1, "[batch]")
    _checks.check_size(op, "kv_seqlens", kv_seqlens.shape[0], batch, "batch")
    if not kv_seqlens.is_contiguous():
        raise ValueError(f"{op}: kv_seqlens must be contiguous (stride {kv_seqlens.stride()})")


def _check_lengths_on_host(op, kv_seqlens, block_table, block_size, q_lens=None):
    """Length checks that need the values: done only where they already live on the host."""
    if kv_seqlens.device.type != "cpu" or kv_seqlens.numel() == 0:
        return
    capacity = block_table.shape[1] * block_size
    low, high = int(kv_seqlens.min()), int(kv_seqlens.max())
    if low < 0 or high > capacity:
        raise ValueError(f"{op}: kv_seqlens holds lengths in [{low}, {high}]; allowed: 0 .. {capacity} "
                         f"(block_table width {block_table.shape[1]} * block_size {block_size})")
    if q_lens is not None:
        short = (kv_seqlens.to(q_lens.dtype) < q_lens).nonzero()
        if short.numel():
            b = int(short[0, 0])
            raise ValueError(f"{op}: sequence {b} has kv_seqlens {int(kv_seqlens[b])} < its query length "
                             f"{int(q_lens[b])}; kv_seqlens counts the cached prefix plus the new tokens")


def _checked_out(op, out, shape, q):
    """``out`` checked against ``shape`` and q's dtype (last dim contiguous), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    _checks.check_dtype(op, "out", out, (q.dtype,))
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected {shape}")
    if out.stride(-1) != 1:
        raise ValueError(f"{op}: out's last dimension must be contiguous (stride {out.stride()})")
    return out


def _check_scale(op, scale):
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: scale={scale!r} is not supported; allowed: a finite float > 0")


def fill_mla_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, latent_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write each token's latent and rotary key into its slot of the latent cache.

    Parameters
    ----------
    kv_c : torch.Tensor
        Shape ``[num_tokens, kv_lora_rank]`` (``[num_tokens, 1, kv_lora_rank]``
        accepted), float16/bfloat16/float32: the normed KV latent
        (``kv_a_layernorm`` output). Rows may be strided.
    k_pe : torch.Tensor
        Shape ``[num_tokens, rope_dim]`` (``[num_tokens, 1, rope_dim]`` accepted),
        kv_c's dtype: the rotated shared key part.
    latent_cache : torch.Tensor
        Shape ``[num_blocks, block_size, kv_lora_rank + rope_dim]`` (or with a
        singleton head dim before the last), kv_c's dtype; block_size a power
        of two >= 8; last dim contiguous. Written in place.
    slot_mapping : torch.Tensor
        Shape ``[num_tokens]``, int32/int64: ``block * block_size + offset``,
        ``-1`` to skip a padding token.

    Math, for each token t with s = slot_mapping[t] >= 0::

        latent_cache[s // block_size, s % block_size, :kv_lora_rank] = kv_c[t]
        latent_cache[s // block_size, s % block_size, kv_lora_rank:] = k_pe[t]
    """
    op = "fill_mla_cache"
    cache = _as_latent_cache(op, latent_cache)
    _checks.check_dtype(op, "kv_c", kv_c, _checks.FLOAT_DTYPES)
    # SGLang hands both parts over with a singleton head dim: [T, 1, L] and [T, 1, R]
    if kv_c.dim() == 3 and kv_c.shape[1] == 1:
        kv_c = kv_c[:, 0]
    if k_pe.dim() == 3 and k_pe.shape[1] == 1:
        k_pe = k_pe[:, 0]
    _checks.check_dim(op, "kv_c", kv_c, 2, "[num_tokens, kv_lora_rank]")
    _checks.check_dim(op, "k_pe", k_pe, 2, "[num_tokens, rope_dim]")
    _checks.check_dtype(op, "k_pe", k_pe, (kv_c.dtype,))
    _checks.check_dtype(op, "latent_cache", cache, (kv_c.dtype,))
    num_tokens, kv_lora_rank = kv_c.shape
    _checks.check_size(op, "k_pe", k_pe.shape[0], num_tokens, "num_tokens (kv_c's)")
    _checks.check_size(op, "latent_cache", cache.shape[2], kv_lora_rank + k_pe.shape[1],
                       "last dim (kv_lora_rank + rope_dim)")
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe)):
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name}'s last dimension must be contiguous (stride {t.stride()})")
    check_slot_mapping(op, slot_mapping, num_tokens)
    _checks.check_same_device(op, kv_c=kv_c, k_pe=k_pe, latent_cache=cache, slot_mapping=slot_mapping)
    check_slots_in_range(op, slot_mapping, cache.shape[0] * cache.shape[1])
    _dispatch.dispatch(op, _fill_mla_cache_triton, _fill_mla_cache_reference, (kv_c, k_pe, cache, slot_mapping),
                       kv_c, k_pe, cache, slot_mapping, vendor_fn=vendor.fill_mla_cache, empty=num_tokens == 0)


def mla_decode(q_nope: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor,
               block_table: torch.Tensor | None = None, kv_seqlens: torch.Tensor | None = None,
               scale: float | None = None, *, num_kv_splits: int | None = None, return_lse: bool = False,
               out: torch.Tensor | None = None, plan: MLADecodePlan | None = None):
    """Absorbed MLA decode: every head attends over the shared latent rows.

    Parameters
    ----------
    q_nope : torch.Tensor
        Shape ``[batch, num_heads, kv_lora_rank]``, float16/bfloat16/float32:
        the no-rope query already multiplied by ``W_UK`` (absorbed). Batch and
        head strides are free; last dim contiguous.
    q_rope : torch.Tensor
        Shape ``[batch, num_heads, rope_dim]``, q_nope's dtype (rotated).
    latent_cache : torch.Tensor
        ``[num_blocks, block_size, kv_lora_rank + rope_dim]`` (or
        ``[..., 1, kv_lora_rank + rope_dim]``), q's dtype.
    block_table : torch.Tensor
        ``[batch, max_blocks_per_seq]`` int32 (int64 accepted); only the first
        ``ceil(kv_len / block_size)`` entries of a row are read.
    kv_seqlens : torch.Tensor
        ``[batch]`` int32/int64: latent rows of each sequence, the current token
        included. A length of 0 gives a zero output and ``lse = -inf``.
    scale : float
        Softmax scale, usually ``1 / sqrt(qk_nope_head_dim + rope_dim)`` (times
        the YaRN mscale^2 for DeepSeek-V3), not ``1/sqrt(kv_lora_rank)``.
    num_kv_splits : int, optional
        Split each sequence's latent rows into this many runs of whole
        16-row tiles (fewer when the sequence is short), processed in
        parallel and merged by a second pass (default: chosen from batch,
        heads and block-table width; see ``_split_kv.auto_num_kv_splits``).
    return_lse : bool
        Also return the log-sum-exp of the scores.
    out : torch.Tensor, optional
        ``[batch, num_heads, kv_lora_rank]``, q's dtype; written and returned.
    plan : MLADecodePlan, optional
        The batch's plan (:func:`plan_mla_decode`, made once per forward
        batch): ``block_table``, ``kv_seqlens`` and ``num_kv_splits`` then
        come from it (pass None, or the plan's own) and this call only checks
        that the queries and cache match it. Without a plan one is made for
        this call.

    Returns
    -------
    out : torch.Tensor
        ``[batch, num_heads, kv_lora_rank]``, q's dtype (latent space: the
        caller applies ``W_UV``).
    lse : torch.Tensor
        ``[batch, num_heads]`` float32, natural log (only with ``return_lse``).

    Math (float32), sequence b with latents c_j = cache row j[:L] and
    kpe_j = cache row j[L:], head h::

        s_hj   = scale * (q_nope[b, h] . c_j + q_rope[b, h] . kpe_j)
        out_bh = sum_j softmax_j(s_hj) c_j
        lse_bh = log sum_j exp(s_hj)
    With splits: each split s computes (out_s, lse_s) over its rows, then
    ``out = sum_s exp(lse_s - lse) out_s`` with ``lse = log sum_s exp(lse_s)``.
    """
    op = "mla_decode"
    if plan is None:
        plan = _mla_plan_for_call(op, q_nope, q_rope, latent_cache, block_table, kv_seqlens, num_kv_splits)
    else:
        check_plan_arguments(op, plan, MLADecodePlan, "plan_mla_decode", block_table=block_table,
                             kv_seqlens=kv_seqlens, num_kv_splits=num_kv_splits)
    cache = _check_against_plan(op, plan, q_nope, q_rope, latent_cache)
    _check_scale(op, scale)
    out_shape = (plan.batch, plan.num_heads, plan.kv_lora_rank)
    out = _checked_out(op, out, out_shape, q_nope)
    _checks.check_same_device(op, q_nope=q_nope, out=out)
    lse = torch.empty(out_shape[:2], dtype=torch.float32, device=q_nope.device) if return_lse else None
    _dispatch.dispatch(op, _mla_decode_triton, _mla_decode_reference,
                       (q_nope, q_rope, cache, plan.block_table, plan.kv_seqlens),
                       q_nope, q_rope, cache, plan.block_table, plan.kv_seqlens, float(scale), plan.num_kv_splits,
                       out, lse, plan, vendor_fn=vendor.mla_decode, empty=plan.batch == 0,
                       impl=planned_impl(op, plan, q_nope, q_rope, cache, plan.block_table, plan.kv_seqlens,
                                         vendor=True))
    return (out, lse) if return_lse else out


def _mla_plan_for_call(op, q_nope, q_rope, latent_cache, block_table, kv_seqlens, num_kv_splits) -> MLADecodePlan:
    """An unplanned call: every input checked as before, then a plan for this call only."""
    if block_table is None or kv_seqlens is None:
        raise ValueError(f"{op}: block_table and kv_seqlens are required without a plan; pass both, or "
                         "plan=plan_mla_decode(...)")
    cache = _as_latent_cache(op, latent_cache)
    _checks.check_dtype(op, "q_nope", q_nope, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "q_nope", q_nope, 3, "[batch, num_heads, kv_lora_rank]")
    _checks.check_dim(op, "q_rope", q_rope, 3, "[batch, num_heads, rope_dim]")
    _checks.check_dtype(op, "q_rope", q_rope, (q_nope.dtype,))
    _checks.check_dtype(op, "latent_cache", cache, (q_nope.dtype,))
    batch, num_heads, kv_lora_rank = q_nope.shape
    if tuple(q_rope.shape[:2]) != (batch, num_heads):
        raise ValueError(f"{op}: q_rope has shape {tuple(q_rope.shape)}; its [batch, num_heads] must match "
                         f"q_nope's {(batch, num_heads)}")
    _checks.check_size(op, "latent_cache", cache.shape[2], kv_lora_rank + q_rope.shape[2],
                       "last dim (q_nope's kv_lora_rank + q_rope's rope_dim)")
    for name, t in (("q_nope", q_nope), ("q_rope", q_rope)):
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name}'s last dimension must be contiguous (stride {t.stride()})")
    _check_block_table(op, block_table, kv_seqlens, batch)
    _check_num_kv_splits(op, num_kv_splits)
    _checks.check_same_device(op, q_nope=q_nope, q_rope=q_rope, latent_cache=cache, block_table=block_table,
                              kv_seqlens=kv_seqlens)
    _check_lengths_on_host(op, kv_seqlens, block_table, cache.shape[1])
    return MLADecodePlan(block_table, kv_seqlens, batch, num_heads, kv_lora_rank, q_rope.shape[2], cache.shape[1],
                         q_nope.dtype, q_nope.device, num_kv_splits)


def mla_prefill(q: torch.Tensor, latent_cache: torch.Tensor, block_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                kv_seqlens: torch.Tensor, kv_b_proj_weight: torch.Tensor, *, qk_nope_head_dim: int, v_head_dim: int,
                scale: float, causal: bool = True, max_seqlen_q: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-absorbed MLA prefill: expand cached latents per head, then causal attention.

    The new tokens' latents must already be in the cache (``fill_mla_cache``
    first); each sequence attends over its cached prefix plus its new tokens.

    Parameters
    ----------
    q : torch.Tensor
        Shape ``[total_q, num_heads, qk_nope_head_dim + rope_dim]``, float16/
        bfloat16/float32: per-head query, no-rope part first, rope part
        (rotated) last. Last dim contiguous.
    latent_cache : torch.Tensor
        ``[num_blocks, block_size, kv_lora_rank + rope_dim]`` (or one-head 4-d), q's dtype.
    block_table : torch.Tensor
        ``[batch, max_blocks_per_seq]`` int32 (int64 accepted).
    cu_seqlens_q : torch.Tensor
        ``[batch + 1]`` int32/int64: sequence b owns query rows
        ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
    kv_seqlens : torch.Tensor
        ``[batch]`` int32/int64: cached prefix + new tokens of each sequence.
    kv_b_proj_weight : torch.Tensor
        ``[num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]``, q's
        dtype (the ``nn.Linear`` weight of ``kv_b_proj``): for head h, rows
        ``h*(Dn+Dv) .. h*(Dn+Dv)+Dn`` give ``k_nope``, the next ``Dv`` rows ``v``.
    qk_nope_head_dim, v_head_dim : int
        ``Dn`` and ``Dv``.
    scale : float
        Softmax scale (``1/sqrt(Dn + rope_dim)``, times mscale^2 with YaRN).
    causal : bool
        Bottom-right aligned causal mask (default True).
    max_seqlen_q : int, optional
        Longest query sequence; computed with one host sync when None.
    out : torch.Tensor, optional
        ``[total_q, num_heads, v_head_dim]``, q's dtype.

    Returns
    -------
    torch.Tensor
        ``[total_q, num_heads, v_head_dim]``, q's dtype.

    Math (float32), sequence b with latent rows j (c_j, kpe_j), query i at
    position p_i = kv_len - q_len + i, head h::

        k_nope_hj = W_UK[h] @ c_j        (W_UK[h]: rows of kv_b_proj for head h's k_nope)
        v_hj      = W_UV[h] @ c_j
        s_hij     = scale * (q_ih[:Dn] . k_nope_hj + q_ih[Dn:] . kpe_j),  -inf where j > p_i (causal)
        out_ih    = sum_j softmax_j(s_hij) v_hj
    """
    op = "mla_prefill"
    cache = _as_latent_cache(op, latent_cache)
    _checks.check_dtype(op, "q", q, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "q", q, 3, "[total_q, num_heads, qk_nope_head_dim + rope_dim]")
    _checks.check_dtype(op, "latent_cache", cache, (q.dtype,))
    _checks.check_dtype(op, "kv_b_proj_weight", kv_b_proj_weight, (q.dtype,))
    _checks.check_dim(op, "kv_b_proj_weight", kv_b_proj_weight, 2,
                      "[num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]")
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: q's last dimension must be contiguous (stride {q.stride()})")
    for name, value in (("qk_nope_head_dim", qk_nope_head_dim), ("v_head_dim", v_head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{op}: {name}={value!r} is not supported; allowed: an int >= 1")
    total_q, num_heads, qk_head_dim = q.shape
    rope_dim = qk_head_dim - qk_nope_head_dim
    if rope_dim < 0:
        raise ValueError(f"{op}: q's head dim {qk_head_dim} is smaller than qk_nope_head_dim={qk_nope_head_dim}")
    kv_lora_rank = cache.shape[2] - rope_dim
    _checks.check_size(op, "kv_b_proj_weight", kv_b_proj_weight.shape[1], kv_lora_rank,
                       "in_features (latent_cache's last dim minus rope_dim)")
    _checks.check_size(op, "kv_b_proj_weight", kv_b_proj_weight.shape[0],
                       num_heads * (qk_nope_head_dim + v_head_dim),
                       "out_features (num_heads * (qk_nope_head_dim + v_head_dim))")
    if not kv_b_proj_weight.is_contiguous():
        raise ValueError(f"{op}: kv_b_proj_weight must be contiguous (stride {kv_b_proj_weight.stride()})")
    _checks.check_dtype(op, "cu_seqlens_q", cu_seqlens_q, _checks.INDEX_DTYPES)
    _checks.check_dim(op, "cu_seqlens_q", cu_seqlens_q, 1, "[batch + 1]")
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ValueError(f"{op}: cu_seqlens_q must be [batch + 1], got shape {tuple(cu_seqlens_q.shape)}")
    _check_block_table(op, block_table, kv_seqlens, batch)
    _check_scale(op, scale)
    if max_seqlen_q is not None and (not isinstance(max_seqlen_q, int) or max_seqlen_q < 0):
        raise ValueError(f"{op}: max_seqlen_q={max_seqlen_q!r} is not supported; allowed: None or an int >= 0")
    out_shape = (total_q, num_heads, v_head_dim)
    out = _checked_out(op, out, out_shape, q)
    _checks.check_same_device(op, q=q, latent_cache=cache, block_table=block_table, cu_seqlens_q=cu_seqlens_q,
                              kv_seqlens=kv_seqlens, kv_b_proj_weight=kv_b_proj_weight, out=out)
    if cu_seqlens_q.device.type == "cpu":
        q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        if batch and (int(q_lens.min()) < 0 or int(cu_seqlens_q[-1]) != total_q or int(cu_seqlens_q[0]) != 0):
            raise ValueError(f"{op}: cu_seqlens_q={cu_seqlens_q.tolist()} must start at 0, never decrease "
                             f"and end at q's total_q={total_q}")
        _check_lengths_on_host(op, kv_seqlens, block_table, cache.shape[1], q_lens)
    _dispatch.dispatch(op, _mla_prefill_triton, _mla_prefill_reference,
                       (q, cache, block_table, kv_seqlens, kv_b_proj_weight),
                       q, cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight, qk_nope_head_dim,
                       v_head_dim, float(scale), bool(causal), max_seqlen_q, out, vendor_fn=vendor.mla_prefill,
                       empty=total_q == 0)
    return out
