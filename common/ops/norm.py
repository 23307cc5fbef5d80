"""RMSNorm and fused residual-add + RMSNorm.

Public functions:
    rms_norm(x, weight, eps=1e-6, *, gemma=False, out=None) -> Tensor like x
    add_rms_norm(x, residual, weight, eps=1e-6, *, gemma=False, out=None) -> (normed, residual)
"""

from __future__ import annotations

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch, vendor
from maca_infer.common.ops._jit import lazy_jit, next_power_of_2, tl
from maca_infer.common.ops._triton_helpers import residual_add_tile, rms_normed_tile, rms_scale_tile


# Rows wider than this are normalized in chunks (two passes over the row);
# narrower rows stay in registers between the sum of squares and the scaling.
_MAX_BLOCK = 8192
# Narrow rows are packed several to a program, up to this many elements a program.
_ROW_TILE = 2048


# --------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------
def _rms_norm_kernel_fn(
    x_ptr, residual_ptr, weight_ptr, out_ptr,
    num_rows, hidden_size, x_row_stride, residual_row_stride, out_row_stride, eps,
    HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    # One program per BLOCK_ROWS rows (several narrow rows, e.g. per-head
    # q/k norms of 128 values, share a program so every thread has work).
    # A row that fits in BLOCK is read once; a wider one (SINGLE_BLOCK off,
    # BLOCK_ROWS = 1) is read twice: sum of squares, then scaling.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows[:, None] * x_row_stride
    res_rows = residual_ptr + rows[:, None] * residual_row_stride
    out_rows = out_ptr + rows[:, None] * out_row_stride
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        col_mask = cols < hidden_size
        mask = row_mask[:, None] & col_mask[None, :]
        x = residual_add_tile(x_rows, res_rows, cols, mask, HAS_RESIDUAL)
        inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / hidden_size + eps)
        y = rms_scale_tile(x, inv_rms, weight_ptr, cols, col_mask, GEMMA)
        tl.store(out_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, hidden_size, BLOCK):
            offs = start + cols
            x = residual_add_tile(x_rows, res_rows, offs, row_mask[:, None] & (offs < hidden_size)[None, :],
                                  HAS_RESIDUAL)
            sum_sq += x * x
        inv_rms = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=1) / hidden_size + eps)
        for start in range(0, hidden_size, BLOCK):
            offs = start + cols
            y = rms_normed_tile(x_rows, res_rows, weight_ptr, offs, row_mask, hidden_size, inv_rms, HAS_RESIDUAL,
                                GEMMA)
            tl.store(out_rows + offs[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & (offs < hidden_size)[None, :])


_rms_norm_kernel = lazy_jit(_rms_norm_kernel_fn)


def _rms_norm_triton(x, residual, weight, eps, gemma, out):
    hidden = x.shape[-1]
    # [N, H] rows, a view when the rows are evenly strided; the kernel walks columns with stride 1
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out2 = out.view(-1, hidden)
    res2 = residual.view(-1, hidden) if residual is not None else x2
    num_rows = x2.shape[0]
    if num_rows == 0:
        return
    block = min(next_power_of_2(hidden), _MAX_BLOCK)
    single_block = block >= hidden
    # narrow rows share a program: about _ROW_TILE elements per program
    block_rows = max(1, min(_ROW_TILE // block, next_power_of_2(num_rows))) if single_block else 1
    tile = block_rows * block
    _rms_norm_kernel[((num_rows + block_rows - 1) // block_rows,)](
        x2, res2, weight, out2,
        num_rows, hidden, x2.stride(0), res2.stride(0), out2.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, GEMMA=gemma, BLOCK_ROWS=block_rows, BLOCK=block,
        SINGLE_BLOCK=single_block,
        # about 8-16 elements per thread: big tiles get more warps, not more registers (up to the
        # family's cap: 8 on MACA, whose 64-thread warps make 16 warps 1024 threads)
        num_warps=min(4 if tile <= 2048 else (8 if tile <= 4096 else 16), _launch.config("rms_norm")["max_warps"]),
        **_launch.options("rms_norm"),
    )


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------
def _rms_norm_reference(x, residual, weight, eps, gemma, out):
    if residual is not None:
        residual.copy_(x.float() + residual.float())
        x = residual
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    w = weight.float() + 1.0 if gemma else weight.float()
    out.copy_(xf * inv_rms * w)


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------
def _check_common(op, x, weight, eps, out):
    _checks.check_dtype(op, "x", x, _checks.FLOAT_DTYPES)
    _checks.check_dtype(op, "weight", weight, _checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be [..., hidden_size], got a 0-d tensor")
    _checks.check_dim(op, "weight", weight, 1, "[hidden_size]")
    _checks.check_size(op, "weight", weight.shape[0], x.shape[-1], "length (x's hidden_size)")
    if not weight.is_contiguous():
        raise ValueError(f"{op}: weight must be contiguous (stride {weight.stride()})")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: eps={eps!r} is not supported; allowed: a float >= 0")
    if out is not None:
        _checks.check_dtype(op, "out", out, (x.dtype,))
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
        _checks.check_contiguous(op, "out", out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, gemma: bool = False,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Root-mean-square layer norm over the last dimension.

    Parameters
    ----------
    x : torch.Tensor
        Shape ``[..., hidden_size]``, dtype float16, bfloat16 or float32. Rows
        may be strided (a slice of a wider tensor) as long as they can be
        viewed as ``[N, hidden_size]``; otherwise they are copied first.
    weight : torch.Tensor
        Shape ``[hidden_size]``, any float dtype, contiguous.
    eps : float
        Added to the mean square before the square root.
    gemma : bool
        Gemma's variant: scale by ``1 + weight`` instead of ``weight``.
    out : torch.Tensor, optional
        Contiguous, shape and dtype of ``x``; written and returned.

    Returns
    -------
    torch.Tensor
        Shape and dtype of ``x``.

    Math (float32, per row ``x`` of length ``H``)::

        inv_rms = 1 / sqrt(sum_i x_i^2 / H + eps)
        y_i     = x_i * inv_rms * w_i            (gemma: * (1 + w_i))
        output  = y rounded to x.dtype
    """
    op = "rms_norm"
    _check_common(op, x, weight, eps, out)
    _checks.check_same_device(op, x=x, weight=weight, out=out)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _dispatch.dispatch(op, _rms_norm_triton, _rms_norm_reference, (x, weight),
                       x, None, weight, float(eps), bool(gemma), out, vendor_fn=vendor.rms_norm, empty=x.numel() == 0)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                 gemma: bool = False, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add (in place) followed by RMSNorm, in one pass.

    Parameters
    ----------
    x : torch.Tensor
        Shape ``[..., hidden_size]``, dtype float16, bfloat16 or float32 (the
        layer's output to be added to the residual stream).
    residual : torch.Tensor
        Same shape and dtype as ``x``, contiguous. Overwritten with
        ``x + residual`` and returned.
    weight : torch.Tensor
        Shape ``[hidden_size]``, any float dtype.
    eps, gemma, out
        As in :func:`rms_norm`.

    Returns
    -------
    (normed, residual)
        ``normed``: shape and dtype of ``x``; ``residual``: the updated input.

    Math::

        residual <- round_to_dtype(x + residual)    (sum in float32)
        normed    = rms_norm(residual, weight, eps)
    """
    op = "add_rms_norm"
    _check_common(op, x, weight, eps, out)
    _checks.check_dtype(op, "residual", residual, (x.dtype,))
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}, expected x's shape {tuple(x.shape)}")
    # Written in place, so it cannot be silently replaced by a contiguous copy.
    _checks.check_contiguous(op, "residual", residual)
    _checks.check_same_device(op, x=x, residual=residual, weight=weight, out=out)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _dispatch.dispatch(op, _rms_norm_triton, _rms_norm_reference, (x, residual, weight),
                       x, residual, weight, float(eps), bool(gemma), out, vendor_fn=vendor.rms_norm,
                       empty=x.numel() == 0)
    return out, residual
