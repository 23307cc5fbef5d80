"""INT8 weights and activations (W8A8): per-token activation quant, int8 GEMMs, fused MoE, checkpoint converters.

The one W8A8 layout every maca-infer op reads ("w8a8 layout"):

- activations: ``q_x`` int8 ``[T, K]`` with ``x_scale`` float32 ``[T, 1]``,
  symmetric and dynamic (one scale per token, computed at run time by
  :func:`per_token_quant_int8`): ``x[t, k] ~= q_x[t, k] * x_scale[t]``;
- weights: ``q_w`` int8 ``[N, K]`` (the torch ``Linear`` layout, output
  channel ``n`` is a row) with ``w_scale`` float32 ``[N]`` (``[N, 1]`` is
  accepted): ``W[n, k] = q_w[n, k] * w_scale[n]`` (symmetric, per channel);
- MoE experts stack those: ``w13`` int8 ``[E, 2I, H]`` with ``w13_scale``
  ``[E, 2I]``, ``w2`` int8 ``[E, H, I]`` with ``w2_scale`` ``[E, H]``.

Quantization rule (one rule, the reference and the kernels compute it with
the same float32 operations, so they produce bit-identical int8):

    absmax = max(max_k |x[t, k]|, 1e-10)        (float32; a zero row gets q = 0 and a finite scale)
    scale  = absmax / 127                       (IEEE division, rounded to nearest)
    v      = x[t, k] * (127 / absmax)           (the quotient also IEEE)
    q      = sign(v) * floor(|v| + 1/2)         ROUND HALF AWAY FROM ZERO, computed exactly as
             f = floor(|v|); f + (|v| - f >= 1/2)   (|v| + 1/2 itself could round up in float32)
    q      = clamp(q, -127, 127)

Half away from zero is what SGLang's / vLLM's / LMDeploy's Triton quantizers
use (``libdevice.round``). Products are accumulated in int32, exactly: a
K-long dot product of int8 values stays below 2**31 for ``K <= 131072``
(``127 * 128 * K``), the limit the ops check. MACA's Triton needs ``K >= 32``
for an int8 ``tl.dot`` (MACA_TARGET.md rule 4): the kernels always use K tiles
of at least 32 and zero-fill the masked tail, so any K works. Triton's
interpreter computes an int8 ``tl.dot`` with ``np.matmul(..., dtype=int32)``:
exact as well (tests/ops/test_w8a8.py checks it at the int32 extremes).

Ops: :func:`per_token_quant_int8`; :func:`rms_norm_quant_int8` and
:func:`add_rms_norm_quant_int8` (the norm fused with it: the normed row is
rounded to ``x.dtype`` and then quantized, bit for bit what the unfused pair
does); :func:`w8a8_int8_linear`; :func:`fused_moe_w8a8` (``fused_moe``'s
routing and block alignment, int8 grouped GEMMs, the intermediate kept in
float32 until it is quantized per assignment).

Checkpoints: compressed-tensors INT8 W8A8 (``weight`` int8 ``[N, K]``,
``weight_scale`` ``[N, 1]``, ``strategy: channel``, activations ``dynamic:
true, strategy: token``) and LMDeploy's smooth-quant W8A8 (``weight`` int8
``[N, K]``, ``scale`` float32 ``[N, 1]``; MoE ``[E, N, K]`` / ``[E, N, 1]``)
both hold this layout already; :func:`w8a8_from_compressed_tensors` and
:func:`w8a8_from_lmdeploy` check them and return ``(q_w, w_scale)`` with a
float32 ``[..., N]`` scale, and :func:`w8a8_check_quant_config` accepts or
rejects (ValueError) a checkpoint's ``quantization_config``.
"""

from __future__ import annotations

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch
from maca_infer.common.ops._jit import interpreter_branch, lazy_jit, next_power_of_2, tl, triton
from maca_infer.common.ops._triton_helpers import (
    moe_activation,
    moe_block_assignments,
    moe_k_tile,
    moe_weight_columns,
    residual_add_tile,
    rms_normed_tile,
    rms_scale_tile,
)
from maca_infer.common.ops.moe import (
    _ACTIVATION_CODE,
    _activation_fp32,
    _check_routing,
    _moe_align_triton,
    _moe_block_config,
)

INT8_MAX = 127
ABSMAX_EPS = 1e-10  # absmax floor: an all-zero row quantizes to 0 with a finite scale
MAX_K = 131072  # 127 * 128 * K < 2**31: the int32 accumulator cannot overflow
MIN_DOT_K = 32  # MACA's Triton: an int8 tl.dot needs K >= 32 (tiles are zero-padded to it)

# Rows wider than this are quantized in two passes (absmax, then quantize).
_MAX_BLOCK = 8192
_ROW_TILE = 4096


# ==========================================================================
# per-token quantization
# ==========================================================================

@lazy_jit
def int8_row_factors(absmax):
    """Row ``absmax`` [R] (fp32, floored at 1e-10) -> (``127 / absmax``, ``absmax / 127``), both IEEE divisions."""
    absmax = tl.maximum(absmax, 1e-10)
    limit = tl.zeros_like(absmax) + 127.0
    return tl.math.div_rn(limit, absmax), tl.math.div_rn(absmax, limit)


@lazy_jit
def quantize_int8(x, inv):
    """fp32 ``x`` [R, C] times its row factor ``inv`` [R] -> int8, rounded half away from zero (module rule)."""
    v = x * inv[:, None]
    a = tl.abs(v)
    f = tl.floor(a)
    r = tl.minimum(f + tl.where(a - f >= 0.5, 1.0, 0.0), 127.0)
    return tl.where(v < 0, -r, r).to(tl.int8)


def _per_token_quant_kernel_fn(
    x_ptr, q_ptr, scale_ptr,
    num_rows, row_len, stride_x, stride_q,
    BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """One program per BLOCK_ROWS rows; a row wider than BLOCK is read twice (absmax, then quantize)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = row_mask[:, None] & (cols < row_len)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        inv, scale = int8_row_factors(tl.max(tl.abs(x), axis=1))
        tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], quantize_int8(x, inv), mask=mask)
    else:
        absmax = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for start in range(0, row_len, BLOCK):
            offs = start + cols
            mask = row_mask[:, None] & (offs < row_len)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        inv, scale = int8_row_factors(absmax)
        for start in range(0, row_len, BLOCK):
            offs = start + cols
            mask = row_mask[:, None] & (offs < row_len)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_ptr + rows[:, None] * stride_q + offs[None, :], quantize_int8(x, inv), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


_per_token_quant_kernel = lazy_jit(_per_token_quant_kernel_fn)


def _quantized_rows_launch(x2d):
    """``(q, scale, grid, tiling)`` of a kernel quantizing each row of ``x2d`` [R, C]: its outputs
    (int8 [R, C], float32 [R, 1]), grid and tile constexprs (several narrow rows a program; a row
    wider than the block in passes)."""
    num_rows, row_len = x2d.shape
    q = torch.empty((num_rows, row_len), dtype=torch.int8, device=x2d.device)
    scale = torch.empty((num_rows, 1), dtype=torch.float32, device=x2d.device)
    block = min(next_power_of_2(row_len), _MAX_BLOCK)
    if interpreter_branch(x2d.device):
        block = min(block, 1024)
    single_block = block >= row_len
    block_rows = max(1, min(_ROW_TILE // block, next_power_of_2(num_rows))) if single_block else 1
    tiling = dict(BLOCK_ROWS=block_rows, BLOCK=block, SINGLE_BLOCK=single_block,
                  num_warps=4 if block_rows * block <= 2048 else 8)
    return q, scale, (triton.cdiv(num_rows, block_rows),), tiling


def _per_token_quant_triton(x2d):
    q, scale, grid, tiling = _quantized_rows_launch(x2d)
    _per_token_quant_kernel[grid](x2d, q, scale, *x2d.shape, x2d.stride(0), q.stride(0), **tiling)
    return q, scale


def _quantize_rows_reference(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[R, C]`` -> (int8 ``[R, C]``, fp32 ``[R, 1]``): the module's rule, op for op like the kernel."""
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(ABSMAX_EPS)
    limit = torch.full_like(absmax, float(INT8_MAX))
    # torch.div, not ``127 / absmax``: a Python scalar over a tensor is reciprocal() * 127, not IEEE
    v = xf * torch.div(limit, absmax)
    a = v.abs()
    f = a.floor()
    r = (f + (a - f >= 0.5).to(torch.float32)).clamp_max(float(INT8_MAX))
    q = torch.where(v < 0, -r, r).to(torch.int8)
    return q, torch.div(absmax, limit)


def _per_token_quant_reference(x2d):
    return _quantize_rows_reference(x2d.to(torch.float32))


def per_token_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric, dynamic per-token INT8 quantization of activations.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., K]`` float16 / bfloat16 / float32 (rows may be strided).

    Returns
    -------
    q : torch.Tensor
        ``[..., K]`` int8 in ``-127 .. 127``.
    scale : torch.Tensor
        ``[..., 1]`` float32, so that ``x ~= q * scale``.

    Math (float32, per row; see the module docstring for the exact rule):
    ``absmax = max(max|x|, 1e-10)``, ``scale = absmax / 127``,
    ``q = round_half_away_from_zero(x * (127 / absmax))``. The Triton kernel
    and the reference give bit-identical ``q`` and ``scale``.
    """
    op = "per_token_quant_int8"
    _checks.check_dtype(op, "x", x, _checks.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    row_len = x.shape[-1]
    x2d = x.reshape(-1, row_len)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    empty = x2d.shape[0] == 0
    result = _dispatch.dispatch(op, _per_token_quant_triton, _per_token_quant_reference, (x,), x2d, empty=empty)
    lead = x.shape[:-1]
    if empty:
        return (torch.empty((*lead, row_len), dtype=torch.int8, device=x.device),
                torch.empty((*lead, 1), dtype=torch.float32, device=x.device))
    q, scale = result
    return q.view(*lead, row_len), scale.view(*lead, 1)


# ==========================================================================
# RMSNorm (and residual add) fused with per-token quantization
# ==========================================================================

def _rms_norm_quant_kernel_fn(
    x_ptr, residual_ptr, weight_ptr, q_ptr, scale_ptr,
    num_rows, hidden, stride_x, stride_r, stride_q, eps,
    HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    """One program per BLOCK_ROWS rows: rms_norm's math (norm.py), its output rounded to x's dtype, then quantized.

    A row wider than BLOCK takes three passes: residual add + sum of squares,
    absmax of the normed row, quantization (the normed row is recomputed).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows[:, None] * stride_x
    res_rows = residual_ptr + rows[:, None] * stride_r
    q_rows = q_ptr + rows[:, None] * stride_q
    cols = tl.arange(0, BLOCK)
    # rms_norm's output is rounded to x's dtype (as the unfused op stores it) before it is quantized
    if SINGLE_BLOCK:
        col_mask = cols < hidden
        mask = row_mask[:, None] & col_mask[None, :]
        x = residual_add_tile(x_rows, res_rows, cols, mask, HAS_RESIDUAL)
        inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / hidden + eps)
        y = rms_scale_tile(x, inv_rms, weight_ptr, cols, col_mask, GEMMA).to(x_ptr.dtype.element_ty).to(tl.float32)
        inv, scale = int8_row_factors(tl.max(tl.abs(y), axis=1))
        tl.store(q_rows + cols[None, :], quantize_int8(y, inv), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            offs = start + cols
            x = residual_add_tile(x_rows, res_rows, offs, row_mask[:, None] & (offs < hidden)[None, :], HAS_RESIDUAL)
            sum_sq += x * x
        inv_rms = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=1) / hidden + eps)
        absmax = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            y = rms_normed_tile(x_rows, res_rows, weight_ptr, start + cols, row_mask, hidden, inv_rms,
                                HAS_RESIDUAL, GEMMA).to(x_ptr.dtype.element_ty).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(y), axis=1))
        inv, scale = int8_row_factors(absmax)
        for start in range(0, hidden, BLOCK):
            offs = start + cols
            y = rms_normed_tile(x_rows, res_rows, weight_ptr, offs, row_mask, hidden, inv_rms, HAS_RESIDUAL,
                                GEMMA).to(x_ptr.dtype.element_ty).to(tl.float32)
            tl.store(q_rows + offs[None, :], quantize_int8(y, inv), mask=row_mask[:, None] & (offs < hidden)[None, :])
    tl.store(scale_ptr + rows, scale, mask=row_mask)


_rms_norm_quant_kernel = lazy_jit(_rms_norm_quant_kernel_fn)


def _rms_norm_quant_triton(x2d, residual2d, weight, eps, gemma):
    q, scale, grid, tiling = _quantized_rows_launch(x2d)
    res = residual2d if residual2d is not None else x2d
    _rms_norm_quant_kernel[grid](
        x2d, res, weight, q, scale, *x2d.shape, x2d.stride(0), res.stride(0), q.stride(0), eps,
        HAS_RESIDUAL=residual2d is not None, GEMMA=gemma, **tiling,
    )
    return q, scale


def _rms_norm_quant_reference(x2d, residual2d, weight, eps, gemma):
    from maca_infer.common.ops.norm import _rms_norm_reference

    normed = torch.empty_like(x2d)
    _rms_norm_reference(x2d, residual2d, weight, eps, gemma, normed)
    return _quantize_rows_reference(normed.to(torch.float32))


def _run_rms_norm_quant(op, x, residual, weight, eps, gemma):
    from maca_infer.common.ops.norm import _check_common

    _check_common(op, x, weight, eps, None)
    if residual is not None:
        _checks.check_dtype(op, "residual", residual, (x.dtype,))
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}, expected x's shape {tuple(x.shape)}")
        _checks.check_contiguous(op, "residual", residual)  # written in place
    _checks.check_same_device(op, x=x, residual=residual, weight=weight)
    hidden = x.shape[-1]
    x2d = x.reshape(-1, hidden)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    residual2d = residual.view(-1, hidden) if residual is not None else None
    empty = x2d.shape[0] == 0
    tensors = (x, weight) if residual is None else (x, residual, weight)
    result = _dispatch.dispatch(op, _rms_norm_quant_triton, _rms_norm_quant_reference, tensors,
                                x2d, residual2d, weight, float(eps), bool(gemma), empty=empty)
    lead = x.shape[:-1]
    if empty:
        return (torch.empty((*lead, hidden), dtype=torch.int8, device=x.device),
                torch.empty((*lead, 1), dtype=torch.float32, device=x.device))
    q, scale = result
    return q.view(*lead, hidden), scale.view(*lead, 1)


def rms_norm_quant_int8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                        gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm` fused with :func:`per_token_quant_int8`: the W8A8 linear's input in one pass.

    Parameters
    ----------
    x, weight, eps, gemma
        As :func:`maca_infer.common.ops.rms_norm` (``x`` ``[..., H]`` float16 /
        bfloat16 / float32, ``weight`` ``[H]``).

    Returns
    -------
    (q, scale)
        ``[..., H]`` int8 and ``[..., 1]`` float32:
        ``per_token_quant_int8(rms_norm(x, weight, eps, gemma=gemma))``; the
        normed row is rounded to ``x.dtype`` before it is quantized, exactly as
        the two unfused ops would do it.
    """
    return _run_rms_norm_quant("rms_norm_quant_int8", x, None, weight, eps, gemma)


def add_rms_norm_quant_int8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                            gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm` fused with :func:`per_token_quant_int8`.

    Parameters
    ----------
    x, residual, weight, eps, gemma
        As :func:`maca_infer.common.ops.add_rms_norm`; ``residual`` (same
        shape and dtype as ``x``, contiguous) is overwritten with
        ``round_to_dtype(x + residual)``.

    Returns
    -------
    (q, scale, residual)
        ``per_token_quant_int8(add_rms_norm(x, residual, weight, eps)[0])`` and
        the updated residual.
    """
    q, scale = _run_rms_norm_quant("add_rms_norm_quant_int8", x, residual, weight, eps, gemma)
    return q, scale, residual


# ==========================================================================
# W8A8 linear
# ==========================================================================

def _w8a8_gemm_kernel_fn(
    qx_ptr, xs_ptr, qw_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per (BLOCK_M rows, BLOCK_N output channels): int8 x int8 -> int32, then the fp32 epilogue.

    ``y = (acc * x_scale[m]) * w_scale[n] (+ bias[n])`` in float32, in that
    order (the reference multiplies in the same order).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = qx_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = qw_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K  # the zero-filled tail pads K up to the tile (>= 32, as MACA needs)
        a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(w_cols + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc += tl.dot(a, b)
    x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


_w8a8_gemm_kernel = lazy_jit(_w8a8_gemm_kernel_fn)


def _w8a8_linear_triton(q_x, x_scale, q_w, w_scale, bias, out_dtype):
    m, k = q_x.shape
    n = q_w.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=q_x.device)
    if interpreter_branch(q_x.device):
        block_m, block_n, block_k = 16, 32, MIN_DOT_K
    else:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n, block_k = (64, 128) if m <= 32 else (128, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_gemm_kernel[grid](
        q_x, x_scale, q_w, w_scale, bias if bias is not None else w_scale, out,
        m, n, k, q_x.stride(0), q_w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        # warps and stages of the W4A16 GEMM's entry (2 stages on MACA): int8 tiles take no more shared memory
        **_launch.options("w4a16_gemm"),
    )
    return out


def _int8_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of int8 matrices with the exact int32 result, as float64.

    Every product is at most 2**14 and K <= 2**17, so float64 (53 bits) sums
    them exactly; float64 matmul runs on every backend, int32 matmul does not.
    """
    return a.to(torch.float64) @ b.to(torch.float64).t()


def _w8a8_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """The kernels' float32 epilogue: ``(acc * x_scale) * w_scale (+ bias)``."""
    y = acc.to(torch.float32) * x_scale.view(-1, 1) * w_scale.view(1, -1)
    if bias is not None:
        y += bias.to(torch.float32)
    return y


def _w8a8_linear_reference(q_x, x_scale, q_w, w_scale, bias, out_dtype):
    return _w8a8_epilogue(_int8_matmul_exact(q_x, q_w), x_scale, w_scale, bias).to(out_dtype)


def _check_k(op: str, k: int) -> None:
    if k > MAX_K:
        raise ValueError(f"{op}: K={k} exceeds {MAX_K}: the int32 accumulator could overflow (127 * 128 * K >= 2**31)")


def _weight_scale(op: str, name: str, scale: torch.Tensor, lead: tuple[int, ...], layout: str) -> torch.Tensor:
    """Check a float32 per-channel scale of shape ``lead`` or ``(*lead, 1)``; returns it as contiguous ``lead``."""
    _checks.check_dtype(op, name, scale, (torch.float32,))
    if tuple(scale.shape) not in (tuple(lead), (*lead, 1)):
        raise ValueError(f"{op}: {name} has shape {tuple(scale.shape)}, expected {layout} = {tuple(lead)} "
                         f"or {(*lead, 1)} float32 (one scale per output channel)")
    return scale.reshape(lead).contiguous()


def w8a8_int8_linear(q_x: torch.Tensor, x_scale: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``y = (q_x * x_scale) @ (q_w * w_scale).T + bias`` with int8 inputs and int32 accumulation.

    Parameters
    ----------
    q_x : torch.Tensor
        ``[..., K]`` int8 (from :func:`per_token_quant_int8`), ``K <= 131072``.
    x_scale : torch.Tensor
        ``[..., 1]`` float32, one scale per token.
    q_w : torch.Tensor
        ``[N, K]`` int8, contiguous (torch ``Linear`` layout).
    w_scale : torch.Tensor
        ``[N]`` or ``[N, 1]`` float32, one scale per output channel.
    bias : torch.Tensor or None
        ``[N]`` float16 / bfloat16 / float32.
    out_dtype : torch.dtype
        float16 (default), bfloat16 or float32.

    Returns
    -------
    torch.Tensor
        ``[..., N]`` in ``out_dtype``:
        ``acc[m, n] = sum_k q_x[m, k] * q_w[n, k]`` (int32, exact);
        ``y[m, n] = (float(acc) * x_scale[m]) * w_scale[n] + bias[n]`` (float32), rounded to ``out_dtype``.
    """
    op = "w8a8_int8_linear"
    _checks.check_dtype(op, "q_x", q_x, (torch.int8,))
    _checks.check_dtype(op, "q_w", q_w, (torch.int8,))
    _checks.check_dim(op, "q_w", q_w, 2, "[N, K] int8 (torch Linear layout)")
    _checks.check_in(op, "out_dtype", out_dtype, _checks.FLOAT_DTYPES)
    n, k = q_w.shape
    if q_x.dim() < 1 or q_x.shape[-1] != k:
        raise ValueError(f"{op}: q_x has shape {tuple(q_x.shape)}; expected [..., K] int8 with K={k} (q_w is {(n, k)})")
    _check_k(op, k)
    lead = tuple(q_x.shape[:-1])
    _checks.check_dtype(op, "x_scale", x_scale, (torch.float32,))
    if tuple(x_scale.shape) != (*lead, 1):
        raise ValueError(f"{op}: x_scale has shape {tuple(x_scale.shape)}, expected [..., 1] = {(*lead, 1)} float32 "
                         "(one scale per token of q_x)")
    w_scale = _weight_scale(op, "w_scale", w_scale, (n,), "[N]")
    if bias is not None:
        _checks.check_dtype(op, "bias", bias, _checks.FLOAT_DTYPES)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({n},)")
        bias = bias.contiguous()
    _checks.check_contiguous(op, "q_w", q_w)
    _checks.check_same_device(op, q_x=q_x, x_scale=x_scale, q_w=q_w, w_scale=w_scale, bias=bias)
    q_x2d = q_x.reshape(-1, k)
    if q_x2d.stride(-1) != 1:
        q_x2d = q_x2d.contiguous()
    x_scale1d = x_scale.reshape(-1).contiguous()
    empty = q_x2d.shape[0] == 0
    y = _dispatch.dispatch(op, _w8a8_linear_triton, _w8a8_linear_reference, (q_x, q_w),
                           q_x2d, x_scale1d, q_w, w_scale, bias, out_dtype, empty=empty)
    if empty:
        return torch.empty((*lead, n), dtype=out_dtype, device=q_x.device)
    return y.view(*lead, n)


# ==========================================================================
# fused MoE with int8 experts (W8A8)
# ==========================================================================

def _moe_w8a8_gate_up_kernel_fn(
    qx_ptr, xs_ptr, w_ptr, ws_ptr, inter_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    num_assignments, top_k, hidden, inter_size,
    stride_xt, stride_we, stride_wn, stride_se, stride_ia,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM 1 (int8): inter[a, n] = act(gate) * up, float32, for the block's sorted assignments.

    ``gate = (sum_k q_x[t, k] * w13[e, n, k]) * x_scale[t] * w13_scale[e, n]``
    (int32 accumulate), ``up`` likewise with row ``I + n``.
    """
    if tl.program_id(0) * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    assignment, valid, expert = moe_block_assignments(sorted_ids_ptr, expert_ids_ptr, num_assignments, BLOCK_M)
    token = (assignment // top_k).to(tl.int64)
    offs_n, mask_n, gate_rows = moe_weight_columns(w_ptr, expert, stride_we, stride_wn, inter_size, BLOCK_N)
    up_rows = gate_rows + inter_size * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, hidden, BLOCK_K):
        a, offs_k, mask_k = moe_k_tile(qx_ptr, token, stride_xt, valid, k0, hidden, BLOCK_K)
        w_mask = mask_k[:, None] & mask_n[None, :]
        acc_gate += tl.dot(a, tl.load(gate_rows + offs_k[:, None], mask=w_mask, other=0))
        acc_up += tl.dot(a, tl.load(up_rows + offs_k[:, None], mask=w_mask, other=0))
    x_scale = tl.load(xs_ptr + token, mask=valid, other=0.0)
    s_base = ws_ptr + expert * stride_se
    gate = acc_gate.to(tl.float32) * x_scale[:, None] * tl.load(s_base + offs_n, mask=mask_n, other=0.0)[None, :]
    up = acc_up.to(tl.float32) * x_scale[:, None] * tl.load(s_base + inter_size + offs_n, mask=mask_n,
                                                            other=0.0)[None, :]
    tl.store(inter_ptr + assignment[:, None].to(tl.int64) * stride_ia + offs_n[None, :],
             moe_activation(gate, ACTIVATION) * up,
             mask=valid[:, None] & mask_n[None, :])


_moe_w8a8_gate_up_kernel = lazy_jit(_moe_w8a8_gate_up_kernel_fn)


def _moe_w8a8_down_kernel_fn(
    qh_ptr, hs_ptr, w_ptr, ws_ptr, topk_weights_ptr, out_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    num_assignments, hidden, inter_size,
    stride_ha, stride_we, stride_wn, stride_se, stride_oa,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM 2 (int8): out[a, n] = ((acc * h_scale[a]) * w2_scale[e, n]) * topk_weight[a], float32."""
    if tl.program_id(0) * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    assignment, valid, expert = moe_block_assignments(sorted_ids_ptr, expert_ids_ptr, num_assignments, BLOCK_M)
    rows = assignment.to(tl.int64)
    offs_n, mask_n, w_rows = moe_weight_columns(w_ptr, expert, stride_we, stride_wn, hidden, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, inter_size, BLOCK_K):
        a, offs_k, mask_k = moe_k_tile(qh_ptr, rows, stride_ha, valid, k0, inter_size, BLOCK_K)
        acc += tl.dot(a, tl.load(w_rows + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0))
    h_scale = tl.load(hs_ptr + rows, mask=valid, other=0.0)
    w_scale = tl.load(ws_ptr + expert * stride_se + offs_n, mask=mask_n, other=0.0)
    routed = tl.load(topk_weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * h_scale[:, None] * w_scale[None, :] * routed[:, None]
    tl.store(out_ptr + rows[:, None] * stride_oa + offs_n[None, :], y, mask=valid[:, None] & mask_n[None, :])


_moe_w8a8_down_kernel = lazy_jit(_moe_w8a8_down_kernel_fn)


def _fused_moe_w8a8_triton(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, activation, out):
    num_tokens, hidden = x.shape
    num_experts, two_inter = w13.shape[0], w13.shape[1]
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1]
    num_assignments = num_tokens * top_k
    interpret = interpreter_branch(x.device)
    block_m, block_n, block_k = _moe_block_config(num_assignments, num_experts, interpret)
    block_k = max(block_k, MIN_DOT_K)
    q_x, x_scale = _per_token_quant_triton(x)
    sorted_ids, expert_ids, num_post_pad = _moe_align_triton(topk_ids, block_m, num_experts)
    # the activation stays float32 until it is quantized: one rounding (to int8), not two
    inter = torch.empty((num_assignments, inter_size), dtype=torch.float32, device=x.device)
    grid1 = (expert_ids.numel(), triton.cdiv(inter_size, block_n))
    _moe_w8a8_gate_up_kernel[grid1](
        q_x, x_scale, w13, w13_scale, inter, sorted_ids, expert_ids, num_post_pad,
        num_assignments, top_k, hidden, inter_size,
        q_x.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), inter.stride(0),
        ACTIVATION=_ACTIVATION_CODE[activation], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **_launch.options("moe_gemm"),
    )
    q_h, h_scale = _per_token_quant_triton(inter)
    per_assignment = torch.empty((num_assignments, hidden), dtype=torch.float32, device=x.device)
    grid2 = (expert_ids.numel(), triton.cdiv(hidden, block_n))
    _moe_w8a8_down_kernel[grid2](
        q_h, h_scale, w2, w2_scale, topk_weights, per_assignment, sorted_ids, expert_ids, num_post_pad,
        num_assignments, hidden, inter_size,
        q_h.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), per_assignment.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_launch.options("moe_gemm"),
    )
    summed = per_assignment.view(num_tokens, top_k, hidden).sum(dim=1)
    if out is None:
        return summed.to(x.dtype)
    out.copy_(summed)
    return out


def _fused_moe_w8a8_reference(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, activation, out):
    """Loop over the experts that received assignments, with the kernels' quantization steps."""
    num_tokens, hidden = x.shape
    num_experts, two_inter = w13.shape[0], w13.shape[1]
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).to(torch.int64)
    if int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_experts:
        raise ValueError(f"fused_moe_w8a8: topk_ids hold values in [{int(flat_ids.min())}, {int(flat_ids.max())}]; "
                         f"allowed: 0..E-1 = 0..{num_experts - 1}")
    q_x, x_scale = _quantize_rows_reference(x.to(torch.float32))
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    flat_weights = topk_weights.reshape(-1).to(torch.float32)
    per_assignment = torch.zeros((num_tokens * top_k, hidden), dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        assignments = order[start:start + count]
        start += count
        tokens = assignments // top_k
        gate_up = _w8a8_epilogue(_int8_matmul_exact(q_x[tokens], w13[expert]), x_scale[tokens], w13_scale[expert],
                                 None)
        h = _activation_fp32(activation, gate_up[:, :inter_size]) * gate_up[:, inter_size:]
        q_h, h_scale = _quantize_rows_reference(h)
        y = _w8a8_epilogue(_int8_matmul_exact(q_h, w2[expert]), h_scale, w2_scale[expert], None)
        per_assignment[assignments] = y * flat_weights[assignments].unsqueeze(1)
    summed = per_assignment.view(num_tokens, top_k, hidden).sum(dim=1)
    if out is None:
        return summed.to(x.dtype)
    out.copy_(summed)
    return out


def fused_moe_w8a8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                   w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                   activation: str = "silu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused MoE with int8 experts (per-channel scales) and dynamic per-token int8 activations.

    Routing (``topk_weights``, ``topk_ids``, assignments ``a = t * k + j``)
    is :func:`fused_moe`'s, from the same gating ops; the kernels share its
    ``moe_align_block_size`` sort.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` float16 / bfloat16 / float32 (quantized here, per token).
    w13 : torch.Tensor
        ``[E, 2I, H]`` int8, contiguous: rows ``[0, I)`` gate, ``[I, 2I)`` up.
    w2 : torch.Tensor
        ``[E, H, I]`` int8, contiguous.
    w13_scale, w2_scale : torch.Tensor
        ``[E, 2I]`` and ``[E, H]`` float32 per-channel scales (``[E, 2I, 1]``
        / ``[E, H, 1]``, LMDeploy's and compressed-tensors' shape, accepted).
    topk_weights, topk_ids : torch.Tensor
        ``[T, k]`` float and ``[T, k]`` int32 / int64 in ``0 .. E-1``.
    activation : str
        ``"silu"`` (default), ``"gelu"`` or ``"gelu_tanh"``.
    out : torch.Tensor or None
        ``[T, H]`` in ``x.dtype`` to write into.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``. With ``(q_x, s_x) = per_token_quant_int8(x)``,
        for each token t and slot j, ``a = t * k + j``, ``e = topk_ids[t, j]``:
        ``g[n] = (sum_k q_x[t, k] w13[e, n, k]) * s_x[t] * w13_scale[e, n]``,
        ``u[n]`` likewise with row ``I + n`` (int32 accumulate, float32 scaling);
        ``h = act(g) * u`` (float32); ``(q_h, s_h) = per_token_quant_int8(h)``;
        ``y[t] += topk_weights[t, j] * (sum_i q_h[i] w2[e, :, i]) * s_h * w2_scale[e]``.
    """
    op = "fused_moe_w8a8"
    _check_routing(op, x, topk_weights, topk_ids, activation, out)
    _checks.check_dtype(op, "w13", w13, (torch.int8,))
    _checks.check_dtype(op, "w2", w2, (torch.int8,))
    _checks.check_dim(op, "w13", w13, 3, "[E, 2I, H] int8")
    _checks.check_dim(op, "w2", w2, 3, "[E, H, I] int8")
    num_experts, two_inter, hidden = w13.shape
    if hidden != x.shape[1] or two_inter % 2:
        raise ValueError(f"{op}: w13 has shape {tuple(w13.shape)}, expected [E, 2I, H] int8 with H={x.shape[1]} "
                         "and an even 2I")
    inter_size = two_inter // 2
    if tuple(w2.shape) != (num_experts, hidden, inter_size):
        raise ValueError(f"{op}: w2 has shape {tuple(w2.shape)}, expected [E, H, I] = "
                         f"{(num_experts, hidden, inter_size)}")
    _check_k(op, max(hidden, inter_size))
    w13_scale = _weight_scale(op, "w13_scale", w13_scale, (num_experts, two_inter), "[E, 2I]")
    w2_scale = _weight_scale(op, "w2_scale", w2_scale, (num_experts, hidden), "[E, H]")
    _checks.check_contiguous(op, "w13", w13)
    _checks.check_contiguous(op, "w2", w2)
    _checks.check_same_device(op, x=x, w13=w13, w2=w2, w13_scale=w13_scale, w2_scale=w2_scale,
                              topk_weights=topk_weights, topk_ids=topk_ids, out=out)
    if out is not None:
        _checks.check_contiguous(op, "out", out)
    x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    empty = x.shape[0] == 0
    result = _dispatch.dispatch(op, _fused_moe_w8a8_triton, _fused_moe_w8a8_reference, (x, w13, w2, topk_ids),
                                x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, activation, out, empty=empty)
    if empty:
        return out if out is not None else torch.empty_like(x)
    return result


# ==========================================================================
# checkpoint converters and config check (run once at load, plain torch)
# ==========================================================================

def _to_w8a8(op: str, weight: torch.Tensor, scale: torch.Tensor, scale_name: str,
             source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``weight`` int8 ``[..., N, K]`` and a per-channel ``scale`` ``[..., N, 1]`` / ``[..., N]``."""
    if weight.dtype != torch.int8:
        raise ValueError(f"{op}: weight has dtype {str(weight.dtype).replace('torch.', '')}; expected int8 "
                         f"[..., N, K] ({source}); only INT8 W8A8 is supported (no FP8 on the C500)")
    if weight.dim() not in (2, 3):
        raise ValueError(f"{op}: weight must be [N, K] or [E, N, K] int8 ({source}), got shape {tuple(weight.shape)}")
    _checks.check_dtype(op, scale_name, scale, _checks.FLOAT_DTYPES)
    lead = tuple(weight.shape[:-1])
    if tuple(scale.shape) not in (lead, (*lead, 1)):
        raise ValueError(f"{op}: {scale_name} has shape {tuple(scale.shape)}, expected {(*lead, 1)} (per output "
                         f"channel, {source}) for weight {tuple(weight.shape)}; per-tensor, group and block "
                         "scales are not supported")
    _check_k(op, weight.shape[-1])
    _checks.check_same_device(op, weight=weight, **{scale_name: scale})
    return weight.contiguous(), scale.reshape(lead).to(torch.float32).contiguous()


def w8a8_from_compressed_tensors(weight: torch.Tensor, weight_scale: torch.Tensor,
                                 weight_zero_point: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A compressed-tensors INT8 W8A8 layer (``int-quantized``, ``strategy: channel``) -> w8a8 layout.

    Parameters
    ----------
    weight : torch.Tensor
        ``[N, K]`` (or stacked experts ``[E, N, K]``) int8.
    weight_scale : torch.Tensor
        ``[N, 1]`` (``[E, N, 1]``) float16 / bfloat16 / float32.
    weight_zero_point : torch.Tensor or None
        Symmetric checkpoints store none or all zeros; anything else is a ValueError.

    Returns
    -------
    (q_w, w_scale)
        ``q_w`` int8 ``[..., N, K]`` (the same values), ``w_scale`` float32 ``[..., N]``:
        ``W[n, k] = q_w[n, k] * w_scale[n]``.
    """
    op = "w8a8_from_compressed_tensors"
    if weight_zero_point is not None and weight_zero_point.numel() and bool((weight_zero_point != 0).any()):
        raise ValueError(f"{op}: weight_zero_point holds nonzero values: asymmetric INT8 weights are not supported; "
                         "expected symmetric (zero points all 0 or absent)")
    return _to_w8a8(op, weight, weight_scale, "weight_scale", "compressed-tensors: weight int8 [N, K], "
                                                               "weight_scale [N, 1]")


def w8a8_from_lmdeploy(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An LMDeploy smooth-quant W8A8 layer (``W8A8Linear`` / MoE ``gate_up`` and ``down``) -> w8a8 layout.

    Parameters
    ----------
    weight : torch.Tensor
        ``[N, K]`` int8 (``W8A8Linear.weight``) or ``[E, N, K]`` (MoE experts).
    scale : torch.Tensor
        ``[N, 1]`` / ``[E, N, 1]`` float32 (``.scale``).

    Returns
    -------
    (q_w, w_scale)
        As :func:`w8a8_from_compressed_tensors`.
    """
    return _to_w8a8("w8a8_from_lmdeploy", weight, scale, "scale", "LMDeploy smooth-quant: weight int8 [N, K], "
                                                                  "scale float32 [N, 1]")


def _field(scheme: dict, part: str, key: str, default=None):
    args = scheme.get(part) or {}
    return args.get(key, default)


def w8a8_check_quant_config(quantization_config: dict) -> str:
    """Accept a checkpoint's ``quantization_config`` this W8A8 path serves, or raise a ValueError naming the field.

    Accepted: LMDeploy ``{"quant_method": "smooth_quant", "quant_dtype": "int8"}``
    (quant_dtype may be absent) and compressed-tensors whose every
    ``config_groups`` scheme has ``weights`` ``{num_bits: 8, type: int,
    symmetric: true, strategy: channel}`` and ``input_activations``
    ``{num_bits: 8, type: int, symmetric: true, dynamic: true, strategy: token}``
    (the ``INT8_W8A8`` preset; ``format`` ``int-quantized`` or
    ``naive-quantized``). FP8 schemes are rejected: the C500 has no FP8.

    Returns ``"smooth_quant"`` or ``"compressed-tensors"``.
    """
    op = "w8a8_check_quant_config"
    if not isinstance(quantization_config, dict):
        raise ValueError(f"{op}: quantization_config must be a dict, got {type(quantization_config).__name__}")
    method = quantization_config.get("quant_method")
    if method == "smooth_quant":
        dtype = quantization_config.get("quant_dtype", "int8")
        if dtype != "int8":
            raise ValueError(f"{op}: smooth_quant quant_dtype={dtype!r} is not supported; expected 'int8' "
                             "(FP8 needs an FP8 card; the C500 has none)")
        return "smooth_quant"
    if method != "compressed-tensors":
        raise ValueError(f"{op}: quant_method={method!r} is not a W8A8 INT8 scheme; expected 'compressed-tensors' "
                         "or 'smooth_quant'")
    fmt = quantization_config.get("format")
    if fmt not in (None, "int-quantized", "naive-quantized"):
        extra = " (FP8 needs an FP8 card; the C500 has none)" if fmt == "float-quantized" else ""
        raise ValueError(f"{op}: format={fmt!r} is not supported; expected 'int-quantized' "
                         f"(int8 [N, K] weights){extra}")
    groups = quantization_config.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{op}: config_groups is empty; expected a W8A8 INT8 scheme")
    expected_weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    expected_inputs = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
    for name, scheme in groups.items():
        if not isinstance(scheme, dict):
            raise ValueError(f"{op}: config_groups.{name} is a preset name or target list ({scheme!r}); expected "
                             "an expanded scheme dict")
        for part, expected in (("weights", expected_weights), ("input_activations", expected_inputs)):
            if not scheme.get(part):
                raise ValueError(f"{op}: config_groups.{name}.{part} is missing; expected {expected}")
            for key, value in expected.items():
                found = _field(scheme, part, key)
                if found != value:
                    extra = (" (FP8 needs an FP8 card; the C500 has none)"
                             if key == "type" and found == "float" else "")
                    raise ValueError(f"{op}: config_groups.{name}.{part}.{key}={found!r} is not supported; "
                                     f"expected {value!r} (W8A8 INT8: {expected}){extra}")
    return "compressed-tensors"
