"""Gated activations of the MLP: SiLU-and-mul (SwiGLU) and GELU-and-mul (GeGLU).

Public functions:
    silu_and_mul(x, *, out=None) -> [..., d]
    gelu_and_mul(x, approximate="none", *, out=None) -> [..., d]
"""

from __future__ import annotations

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch, vendor
from maca_infer.common.ops._jit import lazy_jit, next_power_of_2, tl

_GELU_APPROXIMATIONS = ("none", "tanh")
_BLOCK = 1024  # columns per program; the grid's second axis covers wider rows


# --------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------
def _act_and_mul_kernel_fn(
    x_ptr, out_ptr, d, x_row_stride, out_row_stride,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid = (rows, cdiv(d, BLOCK)); gate and up halves of a row are read
    # with the same contiguous offsets, so both loads coalesce.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == "gelu":
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:  # "gelu_tanh"
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi) * (...)
        # tanh from core tl ops; exp of -2|u| never overflows
        e = tl.exp(-2.0 * tl.abs(u))
        tanh_abs = (1.0 - e) / (1.0 + e)
        act = 0.5 * gate * (1.0 + tl.where(u >= 0, tanh_abs, -tanh_abs))
    tl.store(out_ptr + row * out_row_stride + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


_act_and_mul_kernel = lazy_jit(_act_and_mul_kernel_fn)


def _act_and_mul_triton(x, out, activation):
    d = out.shape[-1]
    x2 = x.reshape(-1, 2 * d)  # a view unless the leading dims cannot merge
    out2 = out.view(-1, d)
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return
    block = min(next_power_of_2(d), _BLOCK)
    grid = (rows, (d + block - 1) // block)
    _act_and_mul_kernel[grid](x2, out2, d, x2.stride(0), out2.stride(0), ACTIVATION=activation, BLOCK=block,
                              **_launch.options("act_and_mul"))


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------
def _act_and_mul_reference(x, out, activation):
    d = out.shape[-1]
    gate = x[..., :d].float()
    up = x[..., d:].float()
    if activation == "silu":
        act = torch.nn.functional.silu(gate)
    elif activation == "gelu":
        act = torch.nn.functional.gelu(gate, approximate="none")
    else:
        act = torch.nn.functional.gelu(gate, approximate="tanh")
    out.copy_(act * up)


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------
def _prepare(op, x, out):
    _checks.check_dtype(op, "x", x, _checks.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op}: x must be [..., 2*d] (gate then up), got shape {tuple(x.shape)}; "
                         "the last dimension must be even")
    if x.stride(-1) != 1:
        raise ValueError(f"{op}: x's last dimension must be contiguous (stride {x.stride()})")
    out_shape = (*x.shape[:-1], x.shape[-1] // 2)
    if out is None:
        return torch.empty(out_shape, dtype=x.dtype, device=x.device)
    _checks.check_dtype(op, "out", out, (x.dtype,))
    if tuple(out.shape) != out_shape:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected {out_shape}")
    _checks.check_contiguous(op, "out", out)
    _checks.check_same_device(op, x=x, out=out)
    return out


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU gate: SiLU of the first half times the second half.

    Parameters
    ----------
    x : torch.Tensor
        Shape ``[..., 2 * d]``, dtype float16, bfloat16 or float32; the first
        ``d`` columns are the gate projection, the last ``d`` the up
        projection (the fused ``gate_up_proj`` layout). Last dim contiguous.
    out : torch.Tensor, optional
        Contiguous ``[..., d]`` in x's dtype; written and returned.

    Returns
    -------
    torch.Tensor
        Shape ``[..., d]``, dtype of ``x``.

    Math (float32)::

        g, u  = x[..., :d], x[..., d:]
        out   = g * sigmoid(g) * u = g / (1 + exp(-g)) * u
    """
    out = _prepare("silu_and_mul", x, out)
    _dispatch.dispatch("silu_and_mul", _act_and_mul_triton, _act_and_mul_reference, (x,), x, out, "silu",
                       vendor_fn=vendor.act_and_mul, empty=out.numel() == 0)
    return out


def gelu_and_mul(x: torch.Tensor, approximate: str = "none", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """GeGLU gate: GELU of the first half times the second half.

    Parameters
    ----------
    x : torch.Tensor
        Shape ``[..., 2 * d]``, dtype float16, bfloat16 or float32 (gate, then up).
    approximate : str
        ``"none"`` (exact, erf) or ``"tanh"`` (the tanh approximation used by
        Gemma's ``gelu_pytorch_tanh``).
    out : torch.Tensor, optional
        Contiguous ``[..., d]`` in x's dtype.

    Returns
    -------
    torch.Tensor
        Shape ``[..., d]``, dtype of ``x``.

    Math (float32), g = x[..., :d], u = x[..., d:]::

        none: gelu(g) = g/2 * (1 + erf(g / sqrt(2)))
        tanh: gelu(g) = g/2 * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3)))
        out = gelu(g) * u
    """
    _checks.check_in("gelu_and_mul", "approximate", approximate, _GELU_APPROXIMATIONS)
    out = _prepare("gelu_and_mul", x, out)
    activation = "gelu" if approximate == "none" else "gelu_tanh"
    _dispatch.dispatch("gelu_and_mul", _act_and_mul_triton, _act_and_mul_reference, (x,), x, out, activation,
                       empty=out.numel() == 0)
    return out

