"""Device helpers the Triton kernels share: attention, online softmax, split-KV merge, int4, RMSNorm rows, MoE.

Each helper is a ``lazy_jit`` device function: a kernel imports it by name
(``from maca_infer.common.ops._triton_helpers import online_softmax_step``)
and calls it; ``lazy_jit`` jits it for the kernel's mode (compiler or
interpreter) and the compiler inlines it, so a helper costs what the same
lines written in the kernel cost.

Attention conventions (the kernels in ``attention.py`` and ``mla.py``):
scores leave ``attention_scores`` in log2 units (natural scores times
log2(e)), so the softmax runs on ``exp2``; a masked score is ``-inf``. The
running state of a row is ``m`` (max score seen, log2 units), ``l`` (sum of
``exp2(s - m)``) and the unnormalized output ``acc``. A log-sum-exp handed
out of a kernel is always in natural-log units.

int4 (the w4a16 layout of ``quant.py``): two values per byte along K, the
even k in the low nibble; a group's weight is ``(q - zero) * scale`` with
``zero = 8`` when the checkpoint has no zero points.
"""

from __future__ import annotations

from maca_infer.common.ops._jit import lazy_jit, tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): log(x) = log2(x) * LN2
if tl is not None:  # Triton kernels may read only constexpr globals
    LOG2E = tl.constexpr(LOG2E)
    LN2 = tl.constexpr(LN2)


# --------------------------------------------------------------------------
# attention: scores and visibility
# --------------------------------------------------------------------------
@lazy_jit
def attention_scores(qk, rel, scale, logit_softcap, slope, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr):
    """Raw dot products ``qk`` [M, N] -> scores in log2 units.

    ``scale * qk``, or with a softcap ``c * tanh(scale * qk / c)``; then the
    ALiBi bias ``slope * rel`` (``rel`` = key position - query position,
    [M, N]; ``slope`` a scalar or an [M, 1] column; unread without ALiBi).
    """
    if USE_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at +-inf, no overflow to NaN
        x = qk * (scale / logit_softcap)
        s = logit_softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * LOG2E
    else:
        s = qk * (scale * LOG2E)
    if USE_ALIBI:
        s += (slope * LOG2E) * rel.to(tl.float32)
    return s


@lazy_jit
def visible_keys(rel, row_valid, key_valid, sliding_window, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr):
    """[M, N] mask of the (query, key) pairs whose score counts.

    ``rel`` = key position - query position [M, N]; ``row_valid`` [M] and
    ``key_valid`` [N] drop padding rows and keys. Causal: ``rel <= 0``;
    window ``W``: ``rel > -W``, and without causal also ``rel < W``.
    """
    visible = row_valid[:, None] & key_valid[None, :]
    if CAUSAL:
        visible = visible & (rel <= 0)
    if USE_WINDOW:
        visible = visible & (rel > -sliding_window)
        if not CAUSAL:
            visible = visible & (rel < sliding_window)
    return visible


@lazy_jit
def visible_key_range(first_pos, last_pos, kv_len, sliding_window, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr):
    """[lo, hi): the keys that queries at positions first_pos..last_pos can see (rules of ``visible_keys``)."""
    lo = first_pos * 0
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    if USE_WINDOW:
        lo = tl.maximum(lo, first_pos - sliding_window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, last_pos + sliding_window)
    return lo, hi


# --------------------------------------------------------------------------
# online softmax (flash attention) and the merge of split-KV partials
# --------------------------------------------------------------------------
@lazy_jit
def online_softmax_step(m_i, l_i, s):
    """Fold one tile of scores ``s`` [M, N] (log2 units, masked = -inf) into a row's state.

    Returns ``(m_new, l_new, p, alpha)``: the caller updates its output as
    ``acc = acc * alpha[:, None] + p @ v``. A row with no visible key so far
    keeps ``m = -inf`` and is shifted by 0 instead, so that ``exp2`` gives 0
    rather than NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_new = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_new, p, alpha


@lazy_jit
def online_softmax_finish(acc, m_i, l_i):
    """``(out, lse)`` of the rows: ``acc / l`` and ``log(sum exp(s))`` in natural log.

    A row that saw no key gets ``out = 0`` and ``lse = -inf``.
    """
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = tl.where(has_keys[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    return out, lse


@lazy_jit
def merge_lse_partials(lse_parts, out_parts):
    """Merge split-KV partial results of one row.

    ``lse_parts`` [S] (natural log; ``-inf`` for a split that saw no key or
    a padding split), ``out_parts`` [S, D] (each normalized over its split;
    rows of empty splits must be loaded as 0). Returns ``(out [D], lse)``::

        lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) out_s

    and ``(0, -inf)`` when no split saw a key.
    """
    m = tl.max(lse_parts, axis=0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp(lse_parts - m_shift)
    total = tl.sum(weight, axis=0)
    has_keys = total > 0.0
    out = tl.sum(weight[:, None] * out_parts, axis=0) / tl.where(has_keys, total, 1.0)
    lse = tl.where(has_keys, m_shift + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
    return out, lse


# --------------------------------------------------------------------------
# int4 weights (w4a16 layout)
# --------------------------------------------------------------------------
@lazy_jit
def int4_shift(offs_k):
    """[BLOCK_K, 1] bit offset of value k in its byte: 0 (low nibble) for even k, 4 for odd k."""
    return (offs_k[:, None] % 2) * 4


@lazy_jit
def unpack_int4(packed, shift):
    """int4 values (int32, 0..15) of a tile of bytes; ``shift`` from ``int4_shift``."""
    return (packed.to(tl.int32) >> shift) & 0xF


@lazy_jit
def load_int4_tile(col_ptrs, offs_k, mask):
    """[BLOCK_K, BLOCK_N] int4 values of a weight tile; ``col_ptrs`` [1, BLOCK_N] point at each
    output channel's packed row (K // 2 bytes), ``mask`` [BLOCK_K, BLOCK_N]."""
    # The shift is computed before the load: on sm_90, ptxas then keeps the MoE
    # down-projection at 80 registers a thread instead of 120.
    shift = int4_shift(offs_k)
    packed = tl.load(col_ptrs + offs_k[:, None] // 2, mask=mask, other=0)
    return unpack_int4(packed, shift)


@lazy_jit
def load_group_scale_zero(scale_ptrs, zero_ptrs, mask, HAS_ZEROS: tl.constexpr):
    """float32 ``(scale, zero)`` [BLOCK_N] of one K group; ``zero`` is 8 without zero points."""
    scale = tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zero_ptrs, mask=mask, other=8).to(tl.float32)
    else:
        zero = tl.zeros_like(scale) + 8.0
    return scale, zero


@lazy_jit
def dequant_int4(q, scale, zero):
    """float32 weights ``(q - zero) * scale`` of an int4 tile ``q`` [BLOCK_K, BLOCK_N]; scale, zero [BLOCK_N]."""
    return (q.to(tl.float32) - zero[None, :]) * scale[None, :]


# --------------------------------------------------------------------------
# RMSNorm rows (norm.py, and the norm fused with int8 quantization in w8a8.py)
# --------------------------------------------------------------------------
@lazy_jit
def residual_add_tile(x_rows, res_rows, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """float32 tile [ROWS, BLOCK] (columns ``offs``) of the norm's input: ``x``, or with a residual ``x + residual``.

    The sum is rounded to the residual's dtype and stored back into the
    residual first: the norm must see the residual exactly as the next layer
    will read it back. ``x_rows``/``res_rows`` [ROWS, 1] point at each row.
    """
    x = tl.load(x_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_rows.dtype.element_ty)
        tl.store(res_rows + offs[None, :], s, mask=mask)
        x = s.to(tl.float32)
    return x


@lazy_jit
def rms_scale_tile(x, inv_rms, weight_ptr, offs, col_mask, GEMMA: tl.constexpr):
    """``x * inv_rms * w`` (float32) of a tile ``x`` [ROWS, BLOCK]; ``w`` = weight[offs] (Gemma: ``1 + weight``)."""
    w = tl.load(weight_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    return x * inv_rms[:, None] * w[None, :]


@lazy_jit
def rms_normed_tile(x_rows, res_rows, weight_ptr, offs, row_mask, hidden, inv_rms, HAS_RESIDUAL: tl.constexpr,
                    GEMMA: tl.constexpr):
    """A later pass over a wide row: the normed tile (float32), its input read back (the updated residual, or x)."""
    col_mask = offs < hidden
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        x = tl.load(res_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    return rms_scale_tile(x, inv_rms, weight_ptr, offs, col_mask, GEMMA)


# --------------------------------------------------------------------------
# fused MoE grouped GEMMs (moe.py, and the int8 experts of w8a8.py)
# --------------------------------------------------------------------------
@lazy_jit
def moe_block_assignments(sorted_ids_ptr, expert_ids_ptr, num_assignments, BLOCK_M: tl.constexpr):
    """``(assignment, valid, expert)`` of this program's block of ``moe_align_block_size``'s sorted assignments.

    ``assignment`` [BLOCK_M] (``a = t * top_k + j``; padding slots hold
    ``num_assignments``), ``valid`` [BLOCK_M] masks the padding, ``expert``
    (int64) the block's expert. The caller has already returned for blocks
    at or past ``num_tokens_post_pad``.
    """
    pid_m = tl.program_id(0)
    assignment = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = assignment < num_assignments
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    return assignment, valid, expert


@lazy_jit
def moe_weight_columns(w_ptr, expert, stride_we, stride_wn, num_columns, BLOCK_N: tl.constexpr):
    """``(offs_n, mask_n, w_rows)``: this program's BLOCK_N output columns (grid axis 1) of ``expert``'s weight.

    ``w_rows`` [1, BLOCK_N] points at each column's weight row (``w[expert, n]``, K contiguous).
    """
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, offs_n < num_columns, w_ptr + expert * stride_we + offs_n[None, :] * stride_wn


@lazy_jit
def moe_k_tile(x_ptr, rows, stride_row, valid, k0, size_k, BLOCK_K: tl.constexpr):
    """``(a, offs_k, mask_k)``: the [BLOCK_M, BLOCK_K] input tile at K offset ``k0`` of the block's rows.

    ``rows`` [BLOCK_M] (int64) index the input rows (tokens for GEMM 1,
    assignments for GEMM 2); padding rows (``valid`` false) and columns past
    ``size_k`` read 0.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < size_k
    a = tl.load(x_ptr + rows[:, None] * stride_row + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0)
    return a, offs_k, mask_k


@lazy_jit
def moe_activation(gate, ACTIVATION: tl.constexpr):
    """The gate activation (float32) of the MoE MLP: 0 silu, 1 gelu (erf), 2 gelu_tanh (moe._ACTIVATION_CODE)."""
    if ACTIVATION == 0:  # silu
        act = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == 1:  # gelu (erf)
        act = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    else:  # gelu_tanh; tanh(u) = 2 * sigmoid(2u) - 1
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
    return act
