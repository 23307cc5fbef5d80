"""Fake ``mcoplib._C``: vLLM-schema ops under torch.ops._C and torch.ops._C_cache_ops, in plain torch (CPU)."""

from __future__ import annotations

import torch

calls: list[str] = []
libraries: list[torch.library.Library] = []  # the conftest fixture destroys them on teardown


def _require(condition, message):
    if not condition:
        raise RuntimeError(f"mcoplib._C (fake): {message}")


def _rms(x, weight, eps):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rms_norm(result, input, weight, epsilon):
    calls.append("rms_norm")
    _require(input.is_contiguous() and result.is_contiguous(), "input and result must be contiguous")
    _require(weight.dtype == input.dtype, "weight must have input's dtype")
    result.copy_(_rms(input, weight, epsilon))


def fused_add_rms_norm(input, residual, weight, epsilon):
    """residual <- input + residual; input <- rms_norm(residual) * weight (both in place)."""
    calls.append("fused_add_rms_norm")
    _require(input.is_contiguous() and residual.is_contiguous(), "input and residual must be contiguous")
    _require(weight.dtype == input.dtype == residual.dtype, "one dtype for input, residual and weight")
    residual.copy_(input.float() + residual.float())
    input.copy_(_rms(residual, weight, epsilon))


def silu_and_mul(result, input):
    calls.append("silu_and_mul")
    _require(input.is_contiguous(), "input must be contiguous")
    d = input.shape[-1] // 2
    gate, up = input[..., :d].float(), input[..., d:].float()
    result.copy_(gate / (1.0 + torch.exp(-gate)) * up)


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox):
    """Rotates the first rot_dim = cos_sin_cache.size(1) dims of every head of query and key in place;
    cos_sin_cache[p] = [cos(p * theta_i) for i < rot_dim/2] + [sin(...)]."""
    calls.append("rotary_embedding")
    _require(positions.dtype == torch.int64, "positions must be int64")
    _require(cos_sin_cache.dtype == query.dtype, "cos_sin_cache must have query's dtype")
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long(), : rot // 2].float(), cos_sin_cache[positions.long(), rot // 2:].float()
    for x in (query, key):
        if x is None:
            continue
        heads = x.view(x.shape[0], -1, head_size)  # fails unless the heads are packed
        if is_neox:
            a, b = heads[..., : rot // 2].float(), heads[..., rot // 2: rot].float()
        else:
            a, b = heads[..., 0:rot:2].float(), heads[..., 1:rot:2].float()
        c, s = cos[:, None, :], sin[:, None, :]
        new_a, new_b = a * c - b * s, b * c + a * s
        if is_neox:
            heads[..., : rot // 2], heads[..., rot // 2: rot] = new_a, new_b
        else:
            heads[..., 0:rot:2], heads[..., 1:rot:2] = new_a, new_b


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """key/value [T, H, D] into caches [num_blocks, block_size, H, D] at slot = block * block_size + offset;
    a negative slot is padding."""
    calls.append("reshape_and_cache_flash")
    _require(slot_mapping.dtype == torch.int64, "slot_mapping must be int64")
    _require(kv_cache_dtype == "auto", "only kv_cache_dtype 'auto' (no KV quantization) in the fake")
    _require(key.shape[-1] == value.shape[-1] == key_cache.shape[-1] == value_cache.shape[-1], "one head size")
    for name, t in (("key", key), ("value", value)):
        _require(t.stride(-1) == 1 and t.stride(1) == t.shape[2], f"{name}: heads must be packed")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        _require(t[0].is_contiguous(), f"{name}: each block must be contiguous")
    block_size = key_cache.shape[1]
    for t in range(key.shape[0]):
        slot = int(slot_mapping[t])
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[t]
        value_cache[slot // block_size, slot % block_size] = value[t]


def _register():
    schemas = {
        "_C": {
            "rms_norm": ("rms_norm(Tensor(a!) result, Tensor input, Tensor weight, float epsilon) -> ()", rms_norm),
            "fused_add_rms_norm": ("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, "
                                   "float epsilon) -> ()", fused_add_rms_norm),
            "silu_and_mul": ("silu_and_mul(Tensor(a!) result, Tensor input) -> ()", silu_and_mul),
            "rotary_embedding": ("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, "
                                 "SymInt head_size, Tensor cos_sin_cache, bool is_neox) -> ()", rotary_embedding),
        },
        "_C_cache_ops": {
            "reshape_and_cache_flash": ("reshape_and_cache_flash(Tensor key, Tensor value, Tensor(a!) key_cache, "
                                        "Tensor(b!) value_cache, Tensor slot_mapping, str kv_cache_dtype, "
                                        "Tensor k_scale, Tensor v_scale) -> ()", reshape_and_cache_flash),
        },
    }
    for namespace, ops in schemas.items():
        lib = torch.library.Library(namespace, "FRAGMENT")
        for name, (schema, fn) in ops.items():
            lib.define(schema)
            lib.impl(name, fn, "CompositeExplicitAutograd")
        libraries.append(lib)


_register()
