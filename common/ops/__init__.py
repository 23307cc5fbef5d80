"""maca_infer.common.ops: the kernels every adapter uses.

One file per op family; each holds the Triton kernel, its launcher, the
torch reference and the public function that validates inputs once and
dispatches (``_dispatch.py``). Names are imported lazily so that importing
one op never pays for building another.
"""

from __future__ import annotations

import importlib

# public name -> module (under maca_infer.common.ops) that defines it
_EXPORTS = {
    # norms and activations
    "rms_norm": "norm",
    "add_rms_norm": "norm",
    "silu_and_mul": "activation",
    "gelu_and_mul": "activation",
    "rotary_embedding": "rotary",
    "apply_rotary": "rotary",
    # paged KV cache and attention
    "fill_kv_cache": "kv_cache",
    "varlen_attention": "attention",
    "paged_prefill_attention": "attention",
    "paged_decode_attention": "attention",
    # MLA
    "fill_mla_cache": "mla",
    "mla_decode": "mla",
    "mla_prefill": "mla",
    # MoE and int4
    "moe_topk_softmax": "moe",
    "moe_grouped_topk": "moe",
    "moe_align_block_size": "moe",
    "fused_moe": "moe",
    "fused_moe_w4a16": "moe",
    "w4a16_linear": "quant",
    "pack_int4": "quant",
    "unpack_int4": "quant",
    "dequant_w4a16": "quant",
    "awq_to_w4a16": "quant",
    "gptq_to_w4a16": "quant",
    "int32_to_uint8_packing": "quant",
    # int8 weights and activations (W8A8)
    "per_token_quant_int8": "w8a8",
    "rms_norm_quant_int8": "w8a8",
    "add_rms_norm_quant_int8": "w8a8",
    "w8a8_int8_linear": "w8a8",
    "fused_moe_w8a8": "w8a8",
    "w8a8_from_compressed_tensors": "w8a8",
    "w8a8_from_lmdeploy": "w8a8",
    "w8a8_check_quant_config": "w8a8",
    # seeded sampling (bit-exact twins of SGLang's / LMDeploy's seeded draws)
    "murmur_hash32": "sampling",
    "philox_uniform": "sampling",
    "seeded_multinomial": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maca_infer.common.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
