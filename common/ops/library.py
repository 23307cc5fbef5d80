"""The public ops as ``torch.library`` custom ops: ``torch.ops.maca_infer.<name>``.

``torch.compile`` and CUDA-graph capture cannot look inside our public ops
(host-side validation, dispatch, Triton launches): traced as plain Python
they break the graph. Registered as custom ops they are single graph nodes
with a schema (which inputs they mutate) and a fake implementation (output
shapes and dtypes from input shapes alone), so ``torch.compile(fullgraph=True)``
traces a decoder layer built from them without a graph break, and a captured
decode step replays them.

Importing this module registers every op once (``register()`` is
idempotent). The real implementation of each custom op calls the public op,
which validates and dispatches (vendor / Triton / reference) as it always
does. The schemas are the public signatures with these changes, because a
custom op's schema is fixed and its outputs may not alias its inputs:

- ``out=`` is dropped: each op returns new tensors.
- In-place updates are mutations in the schema: ``fill_kv_cache`` (key and
  value caches), ``fill_mla_cache`` (latent cache), ``add_rms_norm`` and
  ``add_rms_norm_quant_int8`` (the residual, which they therefore do not
  return: read it from the argument you passed).
- ``rotary_embedding`` / ``apply_rotary`` return ``[q]`` or ``[q, k]`` (a
  list: a schema cannot return an optional tensor); the in-place form is the
  separate op ``rotary_embedding_`` / ``apply_rotary_`` (mutates query and key,
  returns nothing).
- ``paged_decode_attention`` and ``mla_decode`` always return ``(out, lse)``.
- Load-time converters that may return (a view of) their input return a copy.

Defaults are the public ops' defaults. ``REGISTERED`` maps each public op
to its custom ops, ``NOT_REGISTERED`` names the public ops left out, each
with the reason (tests/ops/test_library.py checks that the two cover
``ops.__all__``). The ops are registered for every device (one
implementation: the public op dispatches by device itself).
"""

# no ``from __future__ import annotations``: torch infers each schema from the annotations as objects
import inspect
from typing import List, Optional, Tuple

import torch

from maca_infer.common import ops

NAMESPACE = "maca_infer"

# public ops that are not custom ops, and why
NOT_REGISTERED = {
    "w8a8_check_quant_config": "takes a checkpoint's quantization_config dict and returns a string; "
                               "no tensors, it runs at load time and never inside a traced graph",
}

# public op -> the custom ops (names under torch.ops.maca_infer) that serve it
REGISTERED: dict = {}

_definitions = []  # (public op, custom op name, function, fake, mutates_args), in declaration order
_registered = False

Tensor = torch.Tensor


def _custom_op(public: str, name: Optional[str] = None, mutates_args: Tuple[str, ...] = ()):
    """Declare an op in two steps: ``@_custom_op(public) def _op(...)`` (the real implementation; its
    annotations become the schema), then ``@_op def _(...)`` (its fake). ``register()`` defines them."""

    def declare(fn):
        def with_fake(fake):
            _definitions.append((public, name or public, fn, fake, mutates_args))
            return fn

        return with_fake

    return declare


def _unaliased(result: Tensor, *inputs: Tensor) -> Tensor:
    """``result``, copied if it shares memory with an input (a custom op's outputs must be new tensors)."""
    storage = result.untyped_storage().data_ptr()
    if any(isinstance(t, Tensor) and t.untyped_storage().data_ptr() == storage for t in inputs):
        return result.clone()
    return result


def _empty(shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype, device=like.device)


# --------------------------------------------------------------------------
# norms, activations, rotary
# --------------------------------------------------------------------------
@_custom_op("rms_norm")
def _rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, gemma: bool = False) -> Tensor:
    return ops.rms_norm(x, weight, eps, gemma=gemma)


@_rms_norm
def _(x, weight, eps, gemma):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_custom_op("add_rms_norm", mutates_args=("residual",))
def _add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, gemma: bool = False) -> Tensor:
    return ops.add_rms_norm(x, residual, weight, eps, gemma=gemma)[0]


@_add_rms_norm
def _(x, residual, weight, eps, gemma):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gated_fake(x):
    return _empty((*x.shape[:-1], x.shape[-1] // 2), x)


@_custom_op("silu_and_mul")
def _silu_and_mul(x: Tensor) -> Tensor:
    return ops.silu_and_mul(x)


@_silu_and_mul
def _(x):
    return _gated_fake(x)


@_custom_op("gelu_and_mul")
def _gelu_and_mul(x: Tensor, approximate: str = "none") -> Tensor:
    return ops.gelu_and_mul(x, approximate)


@_gelu_and_mul
def _(x, approximate):
    return _gated_fake(x)


def _rotated_fake(query, key):
    rotated = [torch.empty_like(query, memory_format=torch.contiguous_format)]
    if key is not None:
        rotated.append(torch.empty_like(key, memory_format=torch.contiguous_format))
    return rotated


def _as_list(q, k):
    return [q] if k is None else [q, k]


@_custom_op("rotary_embedding")
def _rotary_embedding(positions: Tensor, query: Tensor, key: Optional[Tensor], cos_sin_cache: Tensor,
                      style: str = "neox") -> List[Tensor]:
    return _as_list(*ops.rotary_embedding(positions, query, key, cos_sin_cache, style=style))


@_rotary_embedding
def _(positions, query, key, cos_sin_cache, style):
    return _rotated_fake(query, key)


@_custom_op("rotary_embedding", "rotary_embedding_", mutates_args=("query", "key"))
def _rotary_embedding_(positions: Tensor, query: Tensor, key: Optional[Tensor], cos_sin_cache: Tensor,
                       style: str = "neox") -> None:
    ops.rotary_embedding(positions, query, key, cos_sin_cache, style=style, inplace=True)


@_rotary_embedding_
def _(positions, query, key, cos_sin_cache, style):
    return None


@_custom_op("apply_rotary")
def _apply_rotary(query: Tensor, key: Optional[Tensor], cos: Tensor, sin: Tensor, style: str = "neox") -> List[Tensor]:
    return _as_list(*ops.apply_rotary(query, key, cos, sin, style=style))


@_apply_rotary
def _(query, key, cos, sin, style):
    return _rotated_fake(query, key)


@_custom_op("apply_rotary", "apply_rotary_", mutates_args=("query", "key"))
def _apply_rotary_(query: Tensor, key: Optional[Tensor], cos: Tensor, sin: Tensor, style: str = "neox") -> None:
    ops.apply_rotary(query, key, cos, sin, style=style, inplace=True)


@_apply_rotary_
def _(query, key, cos, sin, style):
    return None


# --------------------------------------------------------------------------
# paged KV cache and attention
# --------------------------------------------------------------------------
@_custom_op("fill_kv_cache", mutates_args=("key_cache", "value_cache"))
def _fill_kv_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor) -> None:
    ops.fill_kv_cache(key, value, key_cache, value_cache, slot_mapping)


@_fill_kv_cache
def _(key, value, key_cache, value_cache, slot_mapping):
    return None


def _attention_fake(q, v):
    return _empty((*q.shape[:-1], v.shape[-1]), q)


@_custom_op("varlen_attention")
def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                      scale: Optional[float] = None, causal: bool = True, sliding_window: Optional[int] = None,
                      logit_softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None) -> Tensor:
    return ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                max_seqlen_k=max_seqlen_k, scale=scale, causal=causal, sliding_window=sliding_window,
                                logit_softcap=logit_softcap, alibi_slopes=alibi_slopes)


@_varlen_attention
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, sliding_window,
      logit_softcap, alibi_slopes):
    return _attention_fake(q, v)


@_custom_op("paged_prefill_attention")
def _paged_prefill_attention(q: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor,
                             cu_seqlens_q: Tensor, kv_seqlens: Tensor, max_seqlen_q: Optional[int] = None,
                             max_kv_seqlen: Optional[int] = None, scale: Optional[float] = None, causal: bool = True,
                             sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
                             alibi_slopes: Optional[Tensor] = None) -> Tensor:
    return ops.paged_prefill_attention(q, key_cache, value_cache, block_table, cu_seqlens_q, kv_seqlens,
                                       max_seqlen_q=max_seqlen_q, max_kv_seqlen=max_kv_seqlen, scale=scale,
                                       causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap,
                                       alibi_slopes=alibi_slopes)


@_paged_prefill_attention
def _(q, key_cache, value_cache, block_table, cu_seqlens_q, kv_seqlens, max_seqlen_q, max_kv_seqlen, scale, causal,
      sliding_window, logit_softcap, alibi_slopes):
    return _attention_fake(q, value_cache)


@_custom_op("paged_decode_attention")
def _paged_decode_attention(q: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor,
                            kv_seqlens: Tensor, scale: Optional[float] = None, sliding_window: Optional[int] = None,
                            logit_softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                            num_kv_splits: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    return ops.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, scale=scale,
                                      sliding_window=sliding_window, logit_softcap=logit_softcap,
                                      alibi_slopes=alibi_slopes, num_kv_splits=num_kv_splits, return_lse=True)


@_paged_decode_attention
def _(q, key_cache, value_cache, block_table, kv_seqlens, scale, sliding_window, logit_softcap, alibi_slopes,
      num_kv_splits):
    return _attention_fake(q, value_cache), _empty(q.shape[:-1], q, torch.float32)


# --------------------------------------------------------------------------
# MLA
# --------------------------------------------------------------------------
@_custom_op("fill_mla_cache", mutates_args=("latent_cache",))
def _fill_mla_cache(kv_c: Tensor, k_pe: Tensor, latent_cache: Tensor, slot_mapping: Tensor) -> None:
    ops.fill_mla_cache(kv_c, k_pe, latent_cache, slot_mapping)


@_fill_mla_cache
def _(kv_c, k_pe, latent_cache, slot_mapping):
    return None


@_custom_op("mla_decode")
def _mla_decode(q_nope: Tensor, q_rope: Tensor, latent_cache: Tensor, block_table: Tensor, kv_seqlens: Tensor,
                scale: float, num_kv_splits: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    return ops.mla_decode(q_nope, q_rope, latent_cache, block_table, kv_seqlens, scale,
                          num_kv_splits=num_kv_splits, return_lse=True)


@_mla_decode
def _(q_nope, q_rope, latent_cache, block_table, kv_seqlens, scale, num_kv_splits):
    return _empty(q_nope.shape, q_nope), _empty(q_nope.shape[:-1], q_nope, torch.float32)


@_custom_op("mla_prefill")
def _mla_prefill(q: Tensor, latent_cache: Tensor, block_table: Tensor, cu_seqlens_q: Tensor, kv_seqlens: Tensor,
                 kv_b_proj_weight: Tensor, qk_nope_head_dim: int, v_head_dim: int, scale: float, causal: bool = True,
                 max_seqlen_q: Optional[int] = None) -> Tensor:
    return ops.mla_prefill(q, latent_cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight,
                           qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim, scale=scale, causal=causal,
                           max_seqlen_q=max_seqlen_q)


@_mla_prefill
def _(q, latent_cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight, qk_nope_head_dim, v_head_dim, scale,
      causal, max_seqlen_q):
    return _empty((*q.shape[:-1], v_head_dim), q)


# --------------------------------------------------------------------------
# MoE routing and experts
# --------------------------------------------------------------------------
def _routing_fake(router_logits, top_k):
    rows = router_logits.shape[0]
    return (_empty((rows, top_k), router_logits, torch.float32),
            _empty((rows, top_k), router_logits, torch.int32))


@_custom_op("moe_topk_softmax")
def _moe_topk_softmax(router_logits: Tensor, top_k: int, renormalize: bool = False) -> Tuple[Tensor, Tensor]:
    return ops.moe_topk_softmax(router_logits, top_k, renormalize)


@_moe_topk_softmax
def _(router_logits, top_k, renormalize):
    return _routing_fake(router_logits, top_k)


@_custom_op("moe_grouped_topk")
def _moe_grouped_topk(router_logits: Tensor, top_k: int, num_expert_group: int, topk_group: int, renormalize: bool,
                      scoring: str = "softmax", correction_bias: Optional[Tensor] = None,
                      routed_scaling_factor: float = 1.0) -> Tuple[Tensor, Tensor]:
    return ops.moe_grouped_topk(router_logits, top_k, num_expert_group=num_expert_group, topk_group=topk_group,
                                renormalize=renormalize, scoring=scoring, correction_bias=correction_bias,
                                routed_scaling_factor=routed_scaling_factor)


@_moe_grouped_topk
def _(router_logits, top_k, num_expert_group, topk_group, renormalize, scoring, correction_bias,
      routed_scaling_factor):
    return _routing_fake(router_logits, top_k)


@_custom_op("moe_align_block_size")
def _moe_align_block_size(topk_ids: Tensor, block_size: int, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    return ops.moe_align_block_size(topk_ids, block_size, num_experts)


@_moe_align_block_size
def _(topk_ids, block_size, num_experts):
    # the sizes depend on shapes only (moe._align_sizes), never on the ids
    assignments = topk_ids.numel()
    max_padded = torch.sym_min(assignments + num_experts * (block_size - 1), assignments * block_size)
    return (_empty((max_padded,), topk_ids, torch.int32), _empty((max_padded // block_size,), topk_ids, torch.int32),
            _empty((1,), topk_ids, torch.int32))


def _moe_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_custom_op("fused_moe")
def _fused_moe(x: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
               activation: str = "silu") -> Tensor:
    return ops.fused_moe(x, w13, w2, topk_weights, topk_ids, activation=activation)


@_fused_moe
def _(x, w13, w2, topk_weights, topk_ids, activation):
    return _moe_fake(x)


@_custom_op("fused_moe_w4a16")
def _fused_moe_w4a16(x: Tensor, w13_qweight: Tensor, w2_qweight: Tensor, w13_scales: Tensor, w2_scales: Tensor,
                     topk_weights: Tensor, topk_ids: Tensor, group_size: int, w13_zeros: Optional[Tensor] = None,
                     w2_zeros: Optional[Tensor] = None, activation: str = "silu") -> Tensor:
    return ops.fused_moe_w4a16(x, w13_qweight, w2_qweight, w13_scales, w2_scales, topk_weights, topk_ids,
                               group_size=group_size, w13_zeros=w13_zeros, w2_zeros=w2_zeros, activation=activation)


@_fused_moe_w4a16
def _(x, w13_qweight, w2_qweight, w13_scales, w2_scales, topk_weights, topk_ids, group_size, w13_zeros, w2_zeros,
      activation):
    return _moe_fake(x)


@_custom_op("fused_moe_w8a8")
def _fused_moe_w8a8(x: Tensor, w13: Tensor, w2: Tensor, w13_scale: Tensor, w2_scale: Tensor, topk_weights: Tensor,
                    topk_ids: Tensor, activation: str = "silu") -> Tensor:
    return ops.fused_moe_w8a8(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, activation=activation)


@_fused_moe_w8a8
def _(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, activation):
    return _moe_fake(x)


# --------------------------------------------------------------------------
# int4 weights (W4A16)
# --------------------------------------------------------------------------
def _unpacked_k(qweight):
    """K of a w4a16 weight: 2 values per uint8, 8 per int32."""
    return qweight.shape[-1] * (8 if qweight.dtype == torch.int32 else 2)


@_custom_op("w4a16_linear")
def _w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None, group_size: int = 128,
                  bias: Optional[Tensor] = None, split_k: Optional[int] = None) -> Tensor:
    return ops.w4a16_linear(x, qweight, scales, zeros, group_size, bias, split_k=split_k)


@_w4a16_linear
def _(x, qweight, scales, zeros, group_size, bias, split_k):
    return _empty((*x.shape[:-1], qweight.shape[0]), x)


@_custom_op("pack_int4")
def _pack_int4(values: Tensor) -> Tensor:
    return ops.pack_int4(values)


@_pack_int4
def _(values):
    return _empty((*values.shape[:-1], values.shape[-1] // 2), values, torch.uint8)


@_custom_op("unpack_int4")
def _unpack_int4(packed: Tensor) -> Tensor:
    return ops.unpack_int4(packed)


@_unpack_int4
def _(packed):
    return _empty((*packed.shape[:-1], packed.shape[-1] * 2), packed, torch.uint8)


@_custom_op("int32_to_uint8_packing")
def _int32_to_uint8_packing(qweight: Tensor) -> Tensor:
    return _unaliased(ops.int32_to_uint8_packing(qweight), qweight)


@_int32_to_uint8_packing
def _(qweight):
    return _empty((*qweight.shape[:-1], qweight.shape[-1] * 4), qweight, torch.uint8)


@_custom_op("dequant_w4a16")
def _dequant_w4a16(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None, group_size: int = 128) -> Tensor:
    return ops.dequant_w4a16(qweight, scales, zeros, group_size)


@_dequant_w4a16
def _(qweight, scales, zeros, group_size):
    return _empty((qweight.shape[0], _unpacked_k(qweight)), scales)


def _w4a16_triple_fake(n, k, scales):
    groups = scales.shape[0]  # the checkpoints store scales [K // g, N]
    return (_empty((n, k // 2), scales, torch.uint8), _empty((n, groups), scales),
            _empty((n, groups), scales, torch.uint8))


@_custom_op("awq_to_w4a16")
def _awq_to_w4a16(qweight: Tensor, qzeros: Tensor, scales: Tensor,
                  group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    converted = ops.awq_to_w4a16(qweight, qzeros, scales, group_size)
    return tuple(_unaliased(t, qweight, qzeros, scales) for t in converted)


@_awq_to_w4a16
def _(qweight, qzeros, scales, group_size):
    return _w4a16_triple_fake(scales.shape[1], qweight.shape[0], scales)


@_custom_op("gptq_to_w4a16")
def _gptq_to_w4a16(qweight: Tensor, qzeros: Optional[Tensor], scales: Tensor, group_size: int,
                   g_idx: Optional[Tensor] = None, sym: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    converted = ops.gptq_to_w4a16(qweight, qzeros, scales, group_size, g_idx=g_idx, sym=sym)
    return tuple(_unaliased(t, qweight, qzeros, scales) for t in converted)


@_gptq_to_w4a16
def _(qweight, qzeros, scales, group_size, g_idx, sym):
    return _w4a16_triple_fake(qweight.shape[1], qweight.shape[0] * 8, scales)


# --------------------------------------------------------------------------
# int8 weights and activations (W8A8)
# --------------------------------------------------------------------------
def _quant_fake(x):
    return _empty(x.shape, x, torch.int8), _empty((*x.shape[:-1], 1), x, torch.float32)


@_custom_op("per_token_quant_int8")
def _per_token_quant_int8(x: Tensor) -> Tuple[Tensor, Tensor]:
    return ops.per_token_quant_int8(x)


@_per_token_quant_int8
def _(x):
    return _quant_fake(x)


@_custom_op("rms_norm_quant_int8")
def _rms_norm_quant_int8(x: Tensor, weight: Tensor, eps: float = 1e-6, gemma: bool = False) -> Tuple[Tensor, Tensor]:
    return ops.rms_norm_quant_int8(x, weight, eps, gemma=gemma)


@_rms_norm_quant_int8
def _(x, weight, eps, gemma):
    return _quant_fake(x)


@_custom_op("add_rms_norm_quant_int8", mutates_args=("residual",))
def _add_rms_norm_quant_int8(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                             gemma: bool) -> Tuple[Tensor, Tensor]:
    return ops.add_rms_norm_quant_int8(x, residual, weight, eps, gemma=gemma)[:2]


@_add_rms_norm_quant_int8
def _(x, residual, weight, eps, gemma):
    return _quant_fake(x)


@_custom_op("w8a8_int8_linear")
def _w8a8_int8_linear(q_x: Tensor, x_scale: Tensor, q_w: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                      out_dtype: torch.dtype = torch.float16) -> Tensor:
    return ops.w8a8_int8_linear(q_x, x_scale, q_w, w_scale, bias, out_dtype)


@_w8a8_int8_linear
def _(q_x, x_scale, q_w, w_scale, bias, out_dtype):
    return _empty((*q_x.shape[:-1], q_w.shape[0]), q_x, out_dtype)


def _w8a8_weight_fake(weight):
    return _empty(weight.shape, weight, torch.int8), _empty(weight.shape[:-1], weight, torch.float32)


@_custom_op("w8a8_from_compressed_tensors")
def _w8a8_from_compressed_tensors(weight: Tensor, weight_scale: Tensor,
                                  weight_zero_point: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    converted = ops.w8a8_from_compressed_tensors(weight, weight_scale, weight_zero_point)
    return tuple(_unaliased(t, weight, weight_scale) for t in converted)


@_w8a8_from_compressed_tensors
def _(weight, weight_scale, weight_zero_point):
    return _w8a8_weight_fake(weight)


@_custom_op("w8a8_from_lmdeploy")
def _w8a8_from_lmdeploy(weight: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    return tuple(_unaliased(t, weight, scale) for t in ops.w8a8_from_lmdeploy(weight, scale))


@_w8a8_from_lmdeploy
def _(weight, scale):
    return _w8a8_weight_fake(weight)


# --------------------------------------------------------------------------
# seeded sampling
# --------------------------------------------------------------------------
@_custom_op("murmur_hash32")
def _murmur_hash32(seed: Tensor, positions: Tensor, col_indices: Tensor) -> Tensor:
    return ops.murmur_hash32(seed, positions, col_indices)


@_murmur_hash32
def _(seed, positions, col_indices):
    return _empty((seed.shape[0], col_indices.shape[0]), seed, torch.int64)


@_custom_op("philox_uniform")
def _philox_uniform(seed: Tensor, offset: Tensor) -> Tensor:
    return ops.philox_uniform(seed, offset)


@_philox_uniform
def _(seed, offset):
    return _empty(offset.shape, offset, torch.float32)


@_custom_op("seeded_multinomial")
def _seeded_multinomial(scores: Tensor, seeds: Tensor, offsets: Tensor, indices: Optional[Tensor] = None) -> Tensor:
    return ops.seeded_multinomial(scores, seeds, offsets, indices)


@_seeded_multinomial
def _(scores, seeds, offsets, indices):
    return _empty((scores.shape[0],), scores, torch.int64)


# --------------------------------------------------------------------------
def _with_defaults(fake, fn):
    """``fake`` called with every argument, the omitted ones at ``fn``'s defaults (fakes state no defaults)."""
    signature = inspect.signature(fn)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return fake(*bound.args)

    return call


def register() -> None:
    """Define every custom op under ``torch.ops.maca_infer`` (once per process).

    An op that is already defined (this module imported again under another
    name, or reloaded) is kept: torch refuses a second definition.
    """
    global _registered
    if _registered:
        return
    for public, name, fn, fake, mutates_args in _definitions:
        if not hasattr(getattr(torch.ops, NAMESPACE), name):
            op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args)
            op.register_fake(_with_defaults(fake, fn))
        REGISTERED.setdefault(public, []).append(name)
    _registered = True


register()
