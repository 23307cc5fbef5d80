"""Int4 weight-only quantization (W4A16): packing, checkpoint converters, dequant, linear.

The one int4 layout every maca-infer op reads ("w4a16 layout"):

- ``qweight`` uint8 ``[N, K // 2]``: output channel ``n`` is a row; two
  consecutive input channels share a byte, LOW nibble first:
  ``byte[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)``.
- ``scales`` ``[N, K // g]`` (fp16/bf16/fp32): one scale per (row, group of
  ``g`` consecutive input channels); ``group_size=-1`` means one group over
  the whole row (per-channel), i.e. ``scales`` is ``[N, 1]``.
- ``zeros`` uint8 ``[N, K // g]`` (one unpacked zero point per byte), or
  None for symmetric weights, where the zero point is 8.
- dequantization: ``w[n, k] = (q[n, k] - zero[n, k // g]) * scale[n, k // g]``.

Checkpoints come in other packings and are converted once, at load:
``awq_to_w4a16`` (AutoAWQ GEMM: 8 nibbles per int32 along N, interleaved),
``gptq_to_w4a16`` (GPTQ v1: 8 nibbles per int32 along K, zeros stored
minus one), and ``int32_to_uint8_packing`` for int4 already laid out
``[N, K // 8]`` int32 with nibble ``i`` of word ``j`` holding input channel
``8j + i`` (on little-endian hosts this is a free reinterpretation).
``dequant_w4a16`` and ``w4a16_linear`` also accept that int32 packing directly.

Only ``w4a16_linear`` is a dispatched op (Triton kernel that dequantizes in
registers, or the torch reference); the packing helpers are plain torch and
run on any device.
"""

from __future__ import annotations

import sys

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch
from maca_infer.common.ops._jit import interpreter_branch, lazy_jit, tl, triton
from maca_infer.common.ops._triton_helpers import dequant_int4, load_group_scale_zero, load_int4_tile

# group sizes: a power of two >= 16 that divides K (checkpoints use 32, 64, 128),
# or -1 / K itself for one group per row. A Triton K tile must sit inside one group.
MIN_GROUP_SIZE = 16
SYMMETRIC_ZERO = 8

# AutoAWQ packs logical columns [0..7] of an int32 at these nibble positions
# (its pack order is [0, 2, 4, 6, 1, 3, 5, 7]); column j sits at AWQ_NIBBLE_OF_COLUMN[j].
AWQ_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)


# --------------------------------------------------------------------------
# packing helpers (plain torch, any device)
# --------------------------------------------------------------------------

def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int4 values two per byte, low nibble first.

    Parameters
    ----------
    values : torch.Tensor
        ``[..., K]`` uint8 (or any integer dtype) with every value in 0..15; K even.

    Returns
    -------
    torch.Tensor
        ``[..., K // 2]`` uint8, ``out[..., j] = values[..., 2j] | (values[..., 2j+1] << 4)``.
    """
    op = "pack_int4"
    if values.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"{op}: values has dtype {str(values.dtype).replace('torch.', '')}; allowed: uint8 or another integer dtype")
    if values.dim() < 1 or values.shape[-1] % 2:
        raise ValueError(f"{op}: values must be [..., K] with K even, got shape {tuple(values.shape)}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 15):
        raise ValueError(f"{op}: values must lie in 0..15, got range [{int(values.min())}, {int(values.max())}]")
    v = values.to(torch.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`.

    Parameters
    ----------
    packed : torch.Tensor
        ``[..., K // 2]`` uint8.

    Returns
    -------
    torch.Tensor
        ``[..., K]`` uint8 in 0..15: ``out[..., 2j] = packed[..., j] & 15``,
        ``out[..., 2j+1] = packed[..., j] >> 4``.
    """
    _checks.check_dtype("unpack_int4", "packed", packed, (torch.uint8,))
    if packed.dim() < 1:
        raise ValueError(f"unpack_int4: packed must be [..., K // 2], got a scalar")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def int32_to_uint8_packing(qweight: torch.Tensor) -> torch.Tensor:
    """Re-pack int4 stored 8 per int32 into the w4a16 layout (2 per uint8).

    Parameters
    ----------
    qweight : torch.Tensor
        ``[..., K // 8]`` int32; nibble ``i`` (bits ``4i .. 4i+3``) of word
        ``j`` holds input channel ``8j + i``.

    Returns
    -------
    torch.Tensor
        ``[..., K // 2]`` uint8, low nibble first. Byte ``b`` of a
        little-endian int32 holds nibbles ``2b`` (low) and ``2b + 1`` (high),
        so on little-endian hosts this is a reinterpretation without copying
        (for contiguous input).
    """
    _checks.check_dtype("int32_to_uint8_packing", "qweight", qweight, (torch.int32,))
    if qweight.dim() < 1:
        raise ValueError("int32_to_uint8_packing: qweight must be [..., K // 8], got a scalar")
    if sys.byteorder == "little" and qweight.is_contiguous():
        return qweight.view(torch.uint8)
    nibbles = _int32_nibbles(qweight)  # [..., K//8, 8]
    return pack_int4(nibbles.flatten(-2))


def _int32_nibbles(words: torch.Tensor) -> torch.Tensor:
    """``[..., W]`` int32 -> ``[..., W, 8]`` uint8, entry ``i`` = bits ``4i .. 4i+3``."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    # arithmetic right shift keeps the sign bits of word 7, the mask drops them
    return ((words.unsqueeze(-1) >> shifts) & 0x0F).to(torch.uint8)


def _resolve_group_size(op: str, group_size: int, in_features: int) -> int:
    """The effective group size g (K for per-channel), or a ValueError naming what is allowed."""
    if group_size in (-1, in_features):
        return in_features
    if not isinstance(group_size, int) or group_size < MIN_GROUP_SIZE or group_size & (group_size - 1):
        raise ValueError(f"{op}: group_size={group_size!r} is not supported; allowed: 32, 64, 128 (any power of "
                         f"two >= {MIN_GROUP_SIZE} dividing K), or -1 / K for one group per row")
    if in_features % group_size:
        raise ValueError(f"{op}: K={in_features} is not a multiple of group_size={group_size}")
    return group_size


def _as_uint8_packing(op: str, qweight: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    if qweight.dtype == torch.int32:
        return int32_to_uint8_packing(qweight)
    _checks.check_dtype(op, name, qweight, (torch.uint8, torch.int32))
    return qweight


def _check_w4a16_weight(op: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        group_size: int) -> tuple[int, int, int]:
    """Validate a w4a16-layout weight; returns (N, K, effective group size)."""
    _checks.check_dim(op, "qweight", qweight, 2, "[N, K // 2] uint8")
    _checks.check_dtype(op, "scales", scales, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "scales", scales, 2, "[N, K // group_size]")
    out_features, in_features = qweight.shape[0], qweight.shape[1] * 2
    group = _resolve_group_size(op, group_size, in_features)
    num_groups = in_features // group
    if tuple(scales.shape) != (out_features, num_groups):
        raise ValueError(f"{op}: scales has shape {tuple(scales.shape)}, expected [N, K // group_size] = "
                         f"{(out_features, num_groups)} for qweight {tuple(qweight.shape)} (K={in_features}) and group_size={group_size}")
    if zeros is not None:
        _checks.check_dtype(op, "zeros", zeros, (torch.uint8,))
        if tuple(zeros.shape) != (out_features, num_groups):
            raise ValueError(f"{op}: zeros has shape {tuple(zeros.shape)}, expected {(out_features, num_groups)} "
                             "(one unpacked uint8 zero point per group)")
    _checks.check_same_device(op, qweight=qweight, scales=scales, zeros=zeros)
    return out_features, in_features, group


def dequant_w4a16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                  group_size: int = 128) -> torch.Tensor:
    """Dequantize a w4a16-layout weight.

    Parameters
    ----------
    qweight : torch.Tensor
        ``[N, K // 2]`` uint8 (low nibble first), or ``[N, K // 8]`` int32
        (8 nibbles per word, see :func:`int32_to_uint8_packing`).
    scales : torch.Tensor
        ``[N, K // g]`` float16 / bfloat16 / float32.
    zeros : torch.Tensor or None
        ``[N, K // g]`` uint8 zero points; None means 8 (symmetric).
    group_size : int
        32, 64, 128 (any power of two >= 16 dividing K), or -1 (one group
        over the whole row, ``g = K``).

    Returns
    -------
    torch.Tensor
        ``[N, K]`` in ``scales.dtype``:
        ``w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]`` computed in fp32.
    """
    op = "dequant_w4a16"
    qweight = _as_uint8_packing(op, qweight)
    _, _, group = _check_w4a16_weight(op, qweight, scales, zeros, group_size)
    return _dequant_fp32(qweight, scales, zeros, group).to(scales.dtype)


def _dequant_fp32(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int) -> torch.Tensor:
    """``[..., N, K // 2]`` uint8 -> ``[..., N, K]`` fp32 (no validation; shared with the MoE reference)."""
    shape = (*qweight.shape[:-1], qweight.shape[-1] * 2)
    # unpack straight into fp32 and finish in place: the emulated device runs this per call
    weight = torch.empty((*qweight.shape, 2), dtype=torch.float32, device=qweight.device)
    weight[..., 0] = qweight & 0x0F
    weight[..., 1] = qweight >> 4
    # [..., N, K] -> [..., N, K // g, g]: scales and zeros broadcast over each group
    weight = weight.view(*shape[:-1], shape[-1] // group, group)
    weight.sub_(SYMMETRIC_ZERO if zeros is None else zeros.to(torch.float32).unsqueeze(-1))
    weight.mul_(scales.to(torch.float32).unsqueeze(-1))
    return weight.view(shape)


# --------------------------------------------------------------------------
# checkpoint converters (run once at load)
# --------------------------------------------------------------------------

def _check_int32(op: str, name: str, t: torch.Tensor, layout: str) -> None:
    _checks.check_dtype(op, name, t, (torch.int32,))
    _checks.check_dim(op, name, t, 2, layout)


def awq_to_w4a16(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert an AutoAWQ (GEMM) int4 tensor triple to the w4a16 layout.

    Parameters
    ----------
    qweight : torch.Tensor
        ``[K, N // 8]`` int32. Word ``(k, c)`` holds output columns
        ``8c .. 8c+7``; logical column ``8c + j`` sits at nibble
        ``AWQ_NIBBLE_OF_COLUMN[j] = [0, 4, 1, 5, 2, 6, 3, 7][j]``.
    qzeros : torch.Tensor
        ``[K // g, N // 8]`` int32, same nibble order; zero points stored as is.
    scales : torch.Tensor
        ``[K // g, N]`` float16 / bfloat16 / float32.
    group_size : int
        32, 64, 128 (any power of two >= 16 dividing K) or -1.

    Returns
    -------
    (qweight, scales, zeros)
        ``[N, K // 2]`` uint8, ``[N, K // g]`` in ``scales.dtype``,
        ``[N, K // g]`` uint8, such that AWQ's
        ``W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]`` (``y = x @ W``)
        equals ``dequant_w4a16(...)[n, k]``.
    """
    op = "awq_to_w4a16"
    _check_int32(op, "qweight", qweight, "[K, N // 8] int32")
    _check_int32(op, "qzeros", qzeros, "[K // group_size, N // 8] int32")
    _checks.check_dtype(op, "scales", scales, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "scales", scales, 2, "[K // group_size, N]")
    _checks.check_same_device(op, qweight=qweight, qzeros=qzeros, scales=scales)
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    if in_features % 2:
        raise ValueError(f"{op}: K={in_features} (qweight rows) must be even to pack two int4 per byte")
    group = _resolve_group_size(op, group_size, in_features)
    num_groups = in_features // group
    if tuple(scales.shape) != (num_groups, out_features):
        raise ValueError(f"{op}: scales has shape {tuple(scales.shape)}, expected [K // g, N] = {(num_groups, out_features)}")
    if tuple(qzeros.shape) != (num_groups, out_features // 8):
        raise ValueError(f"{op}: qzeros has shape {tuple(qzeros.shape)}, expected [K // g, N // 8] = {(num_groups, out_features // 8)}")
    order = torch.tensor(AWQ_NIBBLE_OF_COLUMN, device=qweight.device)

    def columns(words: torch.Tensor) -> torch.Tensor:  # [R, N//8] int32 -> [R, N] uint8 in logical column order
        return _int32_nibbles(words).index_select(-1, order).flatten(-2)

    q = columns(qweight)  # [K, N]
    zeros = columns(qzeros)  # [K//g, N]
    return pack_int4(q.t()), scales.t().contiguous(), zeros.t().contiguous()


def gptq_to_w4a16(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor, group_size: int, *,
                  g_idx: torch.Tensor | None = None,
                  sym: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert a GPTQ (v1 checkpoint format, 4 bit) tensor triple to the w4a16 layout.

    Parameters
    ----------
    qweight : torch.Tensor
        ``[K // 8, N]`` int32; nibble ``i`` of word ``(r, n)`` holds input
        channel ``8r + i`` of column ``n``.
    qzeros : torch.Tensor or None
        ``[K // g, N // 8]`` int32; nibble ``i`` of word ``(gr, c)`` holds
        column ``8c + i``; GPTQ v1 stores ``zero - 1``, so 1 is added on load
        (mod 16). May be None when ``sym`` (zero point 8).
    scales : torch.Tensor
        ``[K // g, N]`` float16 / bfloat16 / float32.
    group_size : int
        32, 64, 128 (any power of two >= 16 dividing K) or -1.
    g_idx : torch.Tensor or None
        ``[K]`` group of each input channel. Only the trivial ``k // g``
        (no act-order / desc_act) is supported; anything else is a ValueError.
    sym : bool
        Symmetric quantization: every zero point must be 8 (checked when
        ``qzeros`` is given).

    Returns
    -------
    (qweight, scales, zeros)
        ``[N, K // 2]`` uint8, ``[N, K // g]`` in ``scales.dtype``,
        ``[N, K // g]`` uint8 (all 8 when ``sym``), with
        ``W[k, n] = (q[k, n] - (stored_z[k // g, n] + 1)) * s[k // g, n]``.
    """
    op = "gptq_to_w4a16"
    _check_int32(op, "qweight", qweight, "[K // 8, N] int32")
    _checks.check_dtype(op, "scales", scales, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "scales", scales, 2, "[K // group_size, N]")
    in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
    group = _resolve_group_size(op, group_size, in_features)
    num_groups = in_features // group
    if tuple(scales.shape) != (num_groups, out_features):
        raise ValueError(f"{op}: scales has shape {tuple(scales.shape)}, expected [K // g, N] = {(num_groups, out_features)}")
    _checks.check_same_device(op, qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)
    if g_idx is not None:
        expected = torch.arange(in_features, device=g_idx.device) // group
        if tuple(g_idx.shape) != (in_features,) or not torch.equal(g_idx.to(torch.int64), expected):
            raise ValueError(f"{op}: g_idx (shape {tuple(g_idx.shape)}) is not k // group_size: act-order (desc_act=True) "
                             "GPTQ checkpoints are not supported; allowed: g_idx=None or the trivial k // group_size")
    if qzeros is None:
        if not sym:
            raise ValueError(f"{op}: qzeros=None is only allowed with sym=True")
        zeros = torch.full((num_groups, out_features), SYMMETRIC_ZERO, dtype=torch.uint8, device=qweight.device)
    else:
        _check_int32(op, "qzeros", qzeros, "[K // group_size, N // 8] int32")
        if tuple(qzeros.shape) != (num_groups, out_features // 8) or out_features % 8:
            raise ValueError(f"{op}: qzeros has shape {tuple(qzeros.shape)}, expected [K // g, N // 8] = {(num_groups, out_features // 8)}")
        # v1 stores zero - 1 (a zero point of 0 wraps to 15): add one back, mod 16
        zeros = ((_int32_nibbles(qzeros).flatten(-2).to(torch.int32) + 1) & 0x0F).to(torch.uint8)
        if sym and not bool((zeros == SYMMETRIC_ZERO).all()):
            found = sorted(set(zeros.unique().tolist()))
            raise ValueError(f"{op}: sym=True but the decoded zero points are {found[:8]} (expected all 8); "
                             "pass sym=False for asymmetric checkpoints")
    # [K//8, N] -> [K//8, N, 8] -> [K//8, 8, N] -> [K, N]: input channel 8r + i
    q = _int32_nibbles(qweight).permute(0, 2, 1).reshape(in_features, out_features)
    return pack_int4(q.t()), scales.t().contiguous(), zeros.t().contiguous()


# --------------------------------------------------------------------------
# W4A16 linear: Triton kernel
# --------------------------------------------------------------------------

def _w4a16_gemm_kernel_fn(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_split, stride_om,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per (BLOCK_M rows of x, BLOCK_N output channels, K split).

    The int4 weight tile is loaded as bytes (half the bytes of an fp8 weight,
    a quarter of fp16) and dequantized in registers. BLOCK_K divides the
    group size (or the whole row is one group), so each K tile needs one
    scale (and zero) per output channel.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        k0 = (pid_k * tiles_per_split + t) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = load_int4_tile(qweight_ptr + offs_n[None, :] * stride_qn, offs_k,
                           mask_k[:, None] & mask_n[None, :])  # [BLOCK_K, BLOCK_N]
        group = k0 // group_size
        scale, zero = load_group_scale_zero(scales_ptr + offs_n * stride_sn + group,
                                            zeros_ptr + offs_n * stride_zn + group, mask_n & (k0 < K), HAS_ZEROS)
        w = dequant_int4(q, scale, zero)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])


_w4a16_gemm_kernel = lazy_jit(_w4a16_gemm_kernel_fn)

_SM_COUNT: dict = {}


def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a device (1 for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _w4a16_linear_triton(x2d, qweight, scales, zeros, group, bias, split_k, out):
    m, k = x2d.shape
    n = qweight.shape[0]
    interpret = interpreter_branch(x2d.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    table = _launch.config("w4a16_gemm")
    block_n = 32 if interpret else table["BLOCK_N"]
    block_k = table["BLOCK_K"]
    if group < k:  # a K tile must not straddle two groups
        block_k = min(block_k, group)
    k_tiles = triton.cdiv(k, block_k)
    grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k is None:
        # decode-sized M leaves most SMs idle: split K until the grid fills the device
        split_k = 1
        if not interpret and m <= 64:
            while split_k < 16 and grid_mn * split_k < 2 * device_sm_count(x2d.device) and k_tiles >= 4 * split_k:
                split_k *= 2
    split_k = max(1, min(split_k, k_tiles))
    if split_k == 1:
        result = out if out is not None else torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        stride_split = 0
    else:  # fp32 partials, summed below
        result = torch.empty((split_k, m, n), dtype=torch.float32, device=x2d.device)
        stride_split = result.stride(0)
    dot_fp32 = interpret or x2d.dtype == torch.float32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _w4a16_gemm_kernel[grid](
        x2d, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, result,
        m, n, k, group,
        x2d.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0,
        stride_split, n,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k, DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_launch.options("w4a16_gemm"),
    )
    if split_k == 1:
        return result
    summed = result.sum(0)
    if bias is not None:
        summed += bias.to(torch.float32)
    if out is None:
        return summed.to(x2d.dtype)
    out.copy_(summed)
    return out


def _w4a16_linear_reference(x2d, qweight, scales, zeros, group, bias, split_k, out):
    del split_k  # a kernel launch detail
    weight = _dequant_fp32(qweight, scales, zeros, group)  # [N, K] fp32
    y = x2d.to(torch.float32) @ weight.t()
    if bias is not None:
        y += bias.to(torch.float32)
    if out is None:
        return y.to(x2d.dtype)
    out.copy_(y)
    return out


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 group_size: int = 128, bias: torch.Tensor | None = None, *, split_k: int | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ dequant(W).T + bias`` with int4 weights (W4A16).

    Parameters
    ----------
    x : torch.Tensor
        ``[..., K]`` float16 / bfloat16 / float32.
    qweight : torch.Tensor
        ``[N, K // 2]`` uint8 (low nibble first) or ``[N, K // 8]`` int32
        (8 nibbles per word, input channel ``8j + i`` at nibble ``i``).
    scales : torch.Tensor
        ``[N, K // g]`` float16 / bfloat16 / float32 (may differ from ``x.dtype``).
    zeros : torch.Tensor or None
        ``[N, K // g]`` uint8; None = symmetric (zero point 8).
    group_size : int
        32, 64, 128 (any power of two >= 16 dividing K) or -1 (per channel).
    bias : torch.Tensor or None
        ``[N]`` float.
    split_k : int or None
        Kernel only: split the K loop over this many programs (partials in
        fp32, summed after). None picks by problem size and device.
    out : torch.Tensor or None
        ``[..., N]`` in ``x.dtype`` to write into (contiguous).

    Returns
    -------
    torch.Tensor
        ``[..., N]`` in ``x.dtype``:
        ``W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]``;
        ``y[m, n] = sum_k x[m, k] * W[n, k] + bias[n]`` accumulated in fp32.
    """
    op = "w4a16_linear"
    _checks.check_dtype(op, "x", x, _checks.FLOAT_DTYPES)
    qweight = _as_uint8_packing(op, qweight)
    n, k, group = _check_w4a16_weight(op, qweight, scales, zeros, group_size)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; its last dim must be K={k} (qweight is {tuple(qweight.shape)} uint8)")
    if bias is not None:
        _checks.check_dtype(op, "bias", bias, _checks.FLOAT_DTYPES)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({n},)")
    if split_k is not None and split_k < 1:
        raise ValueError(f"{op}: split_k={split_k} is not supported; allowed: None or an integer >= 1")
    lead_shape = x.shape[:-1]
    if out is not None:
        _checks.check_dtype(op, "out", out, (x.dtype,))
        if tuple(out.shape) != (*lead_shape, n):
            raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected {(*lead_shape, n)}")
        _checks.check_contiguous(op, "out", out)
    _checks.check_same_device(op, x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias, out=out)
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None:
            _checks.check_contiguous(op, name, t)
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out2d = out.view(-1, n) if out is not None else None
    empty = x2d.shape[0] == 0
    y = _dispatch.dispatch(op, _w4a16_linear_triton, _w4a16_linear_reference, (x, qweight),
                           x2d, qweight, scales, zeros, group, bias, split_k, out2d, empty=empty)
    if out is not None:
        return out
    if empty:
        return torch.empty((*lead_shape, n), dtype=x.dtype, device=x.device)
    return y.reshape(*lead_shape, n)
