"""Writing new tokens' keys and values into the paged KV cache.

Public function:
    fill_kv_cache(key, value, key_cache, value_cache, slot_mapping) -> None

Cache layout (LMDeploy's and SGLang's, one layer): ``[num_blocks,
block_size, num_kv_heads, head_dim]``. A token's slot is the flat index
``block * block_size + offset``; slot ``-1`` marks a padding token (CUDA-graph
batches are padded) and is skipped.
"""

from __future__ import annotations

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch, vendor
from maca_infer.common.ops._jit import lazy_jit, next_power_of_2, tl

_TILE = 4096  # elements of one (heads x dims) tile of a program


# --------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------
def _fill_kv_cache_kernel_fn(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    num_kv_heads, head_dim, v_head_dim, block_size,
    k_t, k_h, v_t, v_h,
    kc_b, kc_s, kc_h, vc_b, vc_s, vc_h,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid = (num_tokens, cdiv(num_kv_heads, BLOCK_H)): one program copies a
    # token's heads [h0, h0 + BLOCK_H) of K and V; head_dim is innermost so
    # both the read and the write are contiguous runs.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    valid = slot >= 0  # padding tokens write nothing
    block = slot // block_size
    offset = slot % block_size
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = (h < num_kv_heads) & valid

    d = tl.arange(0, BLOCK_D)
    mask = h_mask[:, None] & (d < head_dim)[None, :]
    k = tl.load(key_ptr + token * k_t + h[:, None] * k_h + d[None, :], mask=mask)
    tl.store(key_cache_ptr + block * kc_b + offset * kc_s + h[:, None] * kc_h + d[None, :], k, mask=mask)

    dv = tl.arange(0, BLOCK_DV)
    mask_v = h_mask[:, None] & (dv < v_head_dim)[None, :]
    v = tl.load(value_ptr + token * v_t + h[:, None] * v_h + dv[None, :], mask=mask_v)
    tl.store(value_cache_ptr + block * vc_b + offset * vc_s + h[:, None] * vc_h + dv[None, :], v, mask=mask_v)


_fill_kv_cache_kernel = lazy_jit(_fill_kv_cache_kernel_fn)


def _fill_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping):
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    v_head_dim = value.shape[2]
    block_d = next_power_of_2(head_dim)
    block_dv = next_power_of_2(v_head_dim)
    block_h = max(1, min(next_power_of_2(num_kv_heads), _TILE // max(block_d, block_dv)))
    grid = (num_tokens, (num_kv_heads + block_h - 1) // block_h)
    _fill_kv_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping,
        num_kv_heads, head_dim, v_head_dim, key_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_DV=block_dv, **_launch.options("fill_kv_cache"),
    )


# --------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------
def _fill_kv_cache_reference(key, value, key_cache, value_cache, slot_mapping):
    block_size = key_cache.shape[1]
    slots = slot_mapping.long()
    valid = slots >= 0
    slots = slots[valid]
    blocks, offsets = slots // block_size, slots % block_size
    # advanced-index assignment honours any cache strides (views of a bigger pool)
    key_cache[blocks, offsets] = key[valid]
    value_cache[blocks, offsets] = value[valid]


# --------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------
def check_slot_mapping(op: str, slot_mapping: torch.Tensor, num_tokens: int) -> None:
    """slot_mapping must be a 1-d int32/int64 tensor with one slot per token."""
    _checks.check_dtype(op, "slot_mapping", slot_mapping, _checks.INDEX_DTYPES)
    _checks.check_dim(op, "slot_mapping", slot_mapping, 1, "[num_tokens]")
    _checks.check_size(op, "slot_mapping", slot_mapping.shape[0], num_tokens, "length (num_tokens)")
    if not slot_mapping.is_contiguous():
        raise ValueError(f"{op}: slot_mapping must be contiguous (stride {slot_mapping.stride()})")


def check_slots_in_range(op: str, slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Range check of slot values, on host tensors only (on a device it would cost a sync)."""
    if slot_mapping.device.type != "cpu" or slot_mapping.numel() == 0:
        return
    low, high = int(slot_mapping.min()), int(slot_mapping.max())
    if low < -1 or high >= num_slots:
        raise ValueError(f"{op}: slot_mapping holds slots in [{low}, {high}]; allowed: -1 (padding) "
                         f"or 0 .. {num_slots - 1} (num_blocks * block_size - 1)")


def fill_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Scatter each token's key and value heads into its slot of the paged cache.

    Parameters
    ----------
    key : torch.Tensor
        Shape ``[num_tokens, num_kv_heads, head_dim]``, float16/bfloat16/float32.
        Token and head strides are free (e.g. a view of a fused qkv tensor);
        the last dimension of every tensor here must be contiguous.
    value : torch.Tensor
        Shape ``[num_tokens, num_kv_heads, v_head_dim]``, key's dtype.
    key_cache : torch.Tensor
        Shape ``[num_blocks, block_size, num_kv_heads, head_dim]``, key's dtype;
        ``block_size`` a power of two >= 8. Block, slot and head strides are
        free (a layer's view of a larger pool is fine). Written in place.
    value_cache : torch.Tensor
        Shape ``[num_blocks, block_size, num_kv_heads, v_head_dim]``, key's dtype.
    slot_mapping : torch.Tensor
        Shape ``[num_tokens]``, int32 or int64: ``block * block_size + offset``
        of each token, or ``-1`` to skip the token (padding).

    Math, for each token t with s = slot_mapping[t] >= 0::

        key_cache[s // block_size, s % block_size]   = key[t]
        value_cache[s // block_size, s % block_size] = value[t]
    """
    op = "fill_kv_cache"
    _checks.check_dtype(op, "key", key, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    _checks.check_dim(op, "value", value, 3, "[num_tokens, num_kv_heads, v_head_dim]")
    _checks.check_dim(op, "key_cache", key_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    _checks.check_dim(op, "value_cache", value_cache, 4, "[num_blocks, block_size, num_kv_heads, v_head_dim]")
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        _checks.check_dtype(op, name, t, (key.dtype,))
    num_tokens, num_kv_heads, head_dim = key.shape
    _checks.check_size(op, "value", value.shape[0], num_tokens, "num_tokens (key's)")
    _checks.check_size(op, "value", value.shape[1], num_kv_heads, "num_kv_heads (key's)")
    _checks.check_size(op, "key_cache", key_cache.shape[2], num_kv_heads, "num_kv_heads (key's)")
    _checks.check_size(op, "key_cache", key_cache.shape[3], head_dim, "head_dim (key's)")
    _checks.check_size(op, "value_cache", value_cache.shape[2], num_kv_heads, "num_kv_heads (key's)")
    _checks.check_size(op, "value_cache", value_cache.shape[3], value.shape[2], "v_head_dim (value's)")
    if tuple(value_cache.shape[:2]) != tuple(key_cache.shape[:2]):
        raise ValueError(f"{op}: value_cache has [num_blocks, block_size] {tuple(value_cache.shape[:2])}, "
                         f"expected key_cache's {tuple(key_cache.shape[:2])}")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name}'s last dimension must be contiguous (stride {t.stride()})")
    block_size = key_cache.shape[1]
    _checks.check_block_size(op, block_size)
    check_slot_mapping(op, slot_mapping, num_tokens)
    _checks.check_same_device(op, key=key, value=value, key_cache=key_cache, value_cache=value_cache,
                              slot_mapping=slot_mapping)
    check_slots_in_range(op, slot_mapping, key_cache.shape[0] * block_size)
    _dispatch.dispatch(op, _fill_kv_cache_triton, _fill_kv_cache_reference,
                       (key, value, key_cache, value_cache, slot_mapping),
                       key, value, key_cache, value_cache, slot_mapping, vendor_fn=vendor.fill_kv_cache,
                       empty=num_tokens == 0)
