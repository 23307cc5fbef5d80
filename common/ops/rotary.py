"""Rotary position embedding (RoPE) for query and key heads.

Public functions:
    apply_rotary(query, key, cos, sin, *, style="neox", inplace=False) -> (q, k)
    rotary_embedding(positions, query, key, cos_sin_cache, *, style="neox", inplace=False) -> (q, k)

Both rotate the first ``R`` dims of every head (``R`` = rotary dim, taken
from the cos/sin width) and pass dims ``R..D`` through unchanged (partial
rotary, e.g. GLM, Phi, DeepSeek's rope part when given the rope slice).
"""

from __future__ import annotations

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch, vendor
from maca_infer.common.ops._jit import lazy_jit, next_power_of_2, tl

STYLES = ("neox", "gptj")


# --------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------
def _rotary_kernel_fn(
    q_src, q_dst, k_src, k_dst, cos_ptr, sin_ptr, positions_ptr,
    num_q_heads, num_k_heads, head_dim, half_rotary,
    q_src_t, q_src_h, q_dst_t, q_dst_h, k_src_t, k_src_h, k_dst_t, k_dst_h,
    cos_row_stride, sin_row_stride,
    HAS_KEY: tl.constexpr, USE_POSITIONS: tl.constexpr, IS_NEOX: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # One program per token: cos/sin of the token are loaded once and applied
    # to all its query and key heads, a [BLOCK_H, BLOCK_HALF] tile at a time.
    token = tl.program_id(0).to(tl.int64)
    if USE_POSITIONS:
        row = tl.load(positions_ptr + token).to(tl.int64)
    else:
        row = token
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < half_rotary
    cos = tl.load(cos_ptr + row * cos_row_stride + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + row * sin_row_stride + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    # neox rotates (i, i + R/2); gptj rotates the interleaved pair (2i, 2i + 1)
    if IS_NEOX:
        first = i
        second = i + half_rotary
    else:
        first = 2 * i
        second = 2 * i + 1
    heads = tl.arange(0, BLOCK_H)
    pass_cols = 2 * half_rotary + tl.arange(0, BLOCK_PASS)
    pass_mask = pass_cols < head_dim

    for h0 in range(0, num_q_heads, BLOCK_H):
        h = h0 + heads
        mask = (h < num_q_heads)[:, None] & i_mask[None, :]
        src = q_src + token * q_src_t + h[:, None] * q_src_h
        dst = q_dst + token * q_dst_t + h[:, None] * q_dst_h
        x1 = tl.load(src + first[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + second[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + first[None, :], (x1 * cos - x2 * sin).to(q_dst.dtype.element_ty), mask=mask)
        tl.store(dst + second[None, :], (x2 * cos + x1 * sin).to(q_dst.dtype.element_ty), mask=mask)
        if COPY_PASS:
            pmask = (h < num_q_heads)[:, None] & pass_mask[None, :]
            tail = tl.load(src + pass_cols[None, :], mask=pmask, other=0.0)
            tl.store(dst + pass_cols[None, :], tail, mask=pmask)

    if HAS_KEY:
        for h0 in range(0, num_k_heads, BLOCK_H):
            h = h0 + heads
            mask = (h < num_k_heads)[:, None] & i_mask[None, :]
            src = k_src + token * k_src_t + h[:, None] * k_src_h
            dst = k_dst + token * k_dst_t + h[:, None] * k_dst_h
            x1 = tl.load(src + first[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + second[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dst + first[None, :], (x1 * cos - x2 * sin).to(k_dst.dtype.element_ty), mask=mask)
            tl.store(dst + second[None, :], (x2 * cos + x1 * sin).to(k_dst.dtype.element_ty), mask=mask)
            if COPY_PASS:
                pmask = (h < num_k_heads)[:, None] & pass_mask[None, :]
                tail = tl.load(src + pass_cols[None, :], mask=pmask, other=0.0)
                tl.store(dst + pass_cols[None, :], tail, mask=pmask)


_rotary_kernel = lazy_jit(_rotary_kernel_fn)


def _rotary_triton(query, key, q_out, k_out, cos, sin, positions, half_rotary, style):
    num_tokens, num_q_heads, head_dim = query.shape
    if num_tokens == 0:
        return
    num_k_heads = key.shape[1] if key is not None else 0
    block_half = next_power_of_2(half_rotary)
    # keep a tile around 2K elements: enough work per load, modest registers
    block_h = max(1, min(next_power_of_2(max(num_q_heads, num_k_heads)), max(1, 2048 // block_half)))
    pass_dims = head_dim - 2 * half_rotary
    copy_pass = pass_dims > 0 and q_out.data_ptr() != query.data_ptr()
    k_src = key if key is not None else query
    k_dst = k_out if k_out is not None else q_out
    _rotary_kernel[(num_tokens,)](
        query, q_out, k_src, k_dst, cos, sin, positions if positions is not None else cos,
        num_q_heads, num_k_heads, head_dim, half_rotary,
        query.stride(0), query.stride(1), q_out.stride(0), q_out.stride(1),
        k_src.stride(0), k_src.stride(1), k_dst.stride(0), k_dst.stride(1),
        cos.stride(0), sin.stride(0),
        HAS_KEY=key is not None, USE_POSITIONS=positions is not None, IS_NEOX=style == "neox",
        COPY_PASS=copy_pass, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_PASS=max(16, next_power_of_2(pass_dims)),  # masked; unused unless COPY_PASS
        **_launch.options("rotary"),
    )


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------
def _rotate_reference(x, out, cos, sin, half_rotary, style):
    """out[..., :R] <- rotated x[..., :R]; out[..., R:] <- x[..., R:] (float32 math)."""
    rot = x[..., : 2 * half_rotary].float()
    cos = cos.float()[:, None, :]  # [T, 1, R/2], broadcast over heads
    sin = sin.float()[:, None, :]
    if style == "neox":
        x1, x2 = rot[..., :half_rotary], rot[..., half_rotary:]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if out.data_ptr() != x.data_ptr():
        out[..., 2 * half_rotary:].copy_(x[..., 2 * half_rotary:])
    out[..., : 2 * half_rotary].copy_(rotated)


def _rotary_reference(query, key, q_out, k_out, cos, sin, positions, half_rotary, style):
    if positions is not None:  # cos/sin are views into the cache's rows
        cos = cos[positions.long()]
        sin = sin[positions.long()]
    _rotate_reference(query, q_out, cos, sin, half_rotary, style)
    if key is not None:
        _rotate_reference(key, k_out, cos, sin, half_rotary, style)


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------
def _check_heads(op, name, x, num_tokens, head_dim):
    _checks.check_dim(op, name, x, 3, "[num_tokens, num_heads, head_dim]")
    _checks.check_dtype(op, name, x, _checks.FLOAT_DTYPES)
    _checks.check_size(op, name, x.shape[0], num_tokens, "num_tokens")
    if head_dim is not None:
        _checks.check_size(op, name, x.shape[2], head_dim, "head_dim (query's)")
    if x.stride(-1) != 1:
        raise ValueError(f"{op}: {name}'s head_dim must be contiguous (stride {x.stride()})")


def _prepare(op, query, key, half_rotary, style, inplace):
    _checks.check_in(op, "style", style, STYLES)
    _checks.check_dim(op, "query", query, 3, "[num_tokens, num_heads, head_dim]")
    num_tokens, _, head_dim = query.shape
    _check_heads(op, "query", query, num_tokens, None)
    if key is not None:
        _check_heads(op, "key", key, num_tokens, head_dim)
        _checks.check_dtype(op, "key", key, (query.dtype,))
    if half_rotary < 1 or 2 * half_rotary > head_dim:
        raise ValueError(f"{op}: rotary dim {2 * half_rotary} (twice the cos/sin width) is not supported for "
                         f"head_dim {head_dim}; allowed: 2 <= rotary dim <= head_dim")
    if inplace:
        return query, key
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device) if key is not None else None
    return q_out, k_out


def apply_rotary(query: torch.Tensor, key: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, *,
                 style: str = "neox", inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query and key heads by per-token angles given as cos/sin tables.

    Parameters
    ----------
    query : torch.Tensor
        Shape ``[num_tokens, num_q_heads, head_dim]``, float16/bfloat16/float32.
        Token and head strides are free (a view of a fused qkv tensor works);
        the head_dim stride must be 1.
    key : torch.Tensor or None
        Shape ``[num_tokens, num_k_heads, head_dim]``, query's dtype; None to
        rotate only the query (e.g. MLA's query rope part).
    cos, sin : torch.Tensor
        Shape ``[num_tokens, R / 2]``, any float dtype; row ``t`` holds
        ``cos(pos_t * theta_i)``, ``sin(pos_t * theta_i)`` for ``i < R/2``.
        ``R`` (the rotary dim) must be even and ``<= head_dim``.
    style : str
        ``"neox"``: pairs ``(i, i + R/2)`` (Llama, Qwen, HF ``rotate_half``);
        ``"gptj"``: interleaved pairs ``(2i, 2i + 1)`` (GPT-J, GLM, DeepSeek MLA rope).
    inplace : bool
        Write into ``query``/``key`` and return them; otherwise return new
        contiguous tensors and leave the inputs untouched.

    Returns
    -------
    (q, k)
        Rotated query and key (``k`` is None when ``key`` is None).

    Math (float32), for each token t, head h and pair i < R/2 of dims (a, b)::

        y_a = x_a * cos[t, i] - x_b * sin[t, i]
        y_b = x_b * cos[t, i] + x_a * sin[t, i]
        y_d = x_d  for d >= R (passed through)
    """
    op = "apply_rotary"
    for name, table in (("cos", cos), ("sin", sin)):
        _checks.check_dtype(op, name, table, _checks.FLOAT_DTYPES)
        _checks.check_dim(op, name, table, 2, "[num_tokens, rotary_dim / 2]")
        if table.stride(-1) != 1:
            raise ValueError(f"{op}: {name}'s last dimension must be contiguous (stride {table.stride()})")
    if tuple(cos.shape) != tuple(sin.shape):
        raise ValueError(f"{op}: cos has shape {tuple(cos.shape)} but sin has {tuple(sin.shape)}; they must match")
    q_out, k_out = _prepare(op, query, key, cos.shape[1], style, inplace)
    _checks.check_size(op, "cos", cos.shape[0], query.shape[0], "num_tokens")
    _checks.check_same_device(op, query=query, key=key, cos=cos, sin=sin)
    _dispatch.dispatch(op, _rotary_triton, _rotary_reference, (query, key, cos, sin),
                       query, key, q_out, k_out, cos, sin, None, cos.shape[1], style, vendor_fn=vendor.rotary,
                       empty=query.shape[0] == 0)
    return q_out, k_out


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                     cos_sin_cache: torch.Tensor, *, style: str = "neox",
                     inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotary embedding with angles looked up by position in a cos/sin cache.

    Parameters
    ----------
    positions : torch.Tensor
        Shape ``[num_tokens]``, int32 or int64; each in ``[0, max_position)``
        (not checked on the device: out-of-range reads are undefined).
    query, key : torch.Tensor
        As in :func:`apply_rotary`.
    cos_sin_cache : torch.Tensor
        Shape ``[max_position, R]``, any float dtype, vLLM's layout: columns
        ``[0, R/2)`` hold ``cos(p * theta_i)``, columns ``[R/2, R)`` hold
        ``sin(p * theta_i)``.
    style, inplace
        As in :func:`apply_rotary`.

    Returns
    -------
    (q, k)

    Math: ``apply_rotary(query, key, cache[positions, :R/2], cache[positions, R/2:])``,
    with the rows gathered inside the kernel (no [num_tokens, R] temporaries).
    """
    op = "rotary_embedding"
    _checks.check_dtype(op, "positions", positions, _checks.INDEX_DTYPES)
    _checks.check_dim(op, "positions", positions, 1, "[num_tokens]")
    if not positions.is_contiguous():
        raise ValueError(f"{op}: positions must be contiguous (stride {positions.stride()})")
    _checks.check_dtype(op, "cos_sin_cache", cos_sin_cache, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "cos_sin_cache", cos_sin_cache, 2, "[max_position, rotary_dim]")
    if cos_sin_cache.shape[1] % 2:
        raise ValueError(f"{op}: cos_sin_cache has odd width {cos_sin_cache.shape[1]}; "
                         "allowed: an even rotary_dim (cos half, then sin half)")
    if cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"{op}: cos_sin_cache's last dimension must be contiguous (stride {cos_sin_cache.stride()})")
    half_rotary = cos_sin_cache.shape[1] // 2
    q_out, k_out = _prepare(op, query, key, half_rotary, style, inplace)
    _checks.check_size(op, "positions", positions.shape[0], query.shape[0], "num_tokens")
    _checks.check_same_device(op, positions=positions, query=query, key=key, cos_sin_cache=cos_sin_cache)
    cos = cos_sin_cache[:, :half_rotary]
    sin = cos_sin_cache[:, half_rotary:]
    _dispatch.dispatch(op, _rotary_triton, _rotary_reference, (query, key, cos_sin_cache),
                       query, key, q_out, k_out, cos, sin, positions, half_rotary, style, vendor_fn=vendor.rotary,
                       empty=query.shape[0] == 0)
    return q_out, k_out
