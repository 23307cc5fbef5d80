"""OOT forwards for SGLang's fused ops (RMSNorm, SiLU-and-mul, rotary, unquantized MoE), routed to maca_infer.common.ops.

SGLang's ``BaseFusedOp`` dispatch (``sglang.kernels.fused_op``) tries, in
order: a forward registered with ``register_oot_forward`` for the platform's
dispatch key, then ``forward_<key>``, then ``forward_native``. The maca
platform's key is ``maca``; the forwards below serve the common cases and hand
every other case (quantized input fusion, variance-size override, fp32
residual streams, ...) to ``forward_native`` unchanged, so behaviour never
silently changes.

Registration is keyed on the exact class: subclasses (YaRN / Llama-3 rotary,
GemmaRMSNorm) keep their own forwards.
"""

from __future__ import annotations

import logging
import math

from maca_infer.common import ops
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

_registered = False


def _rmsnorm_forward(self, x, residual=None, post_residual_addition=None, quant_linear=None):
    """RMSNorm.forward: x [T, H] (+ residual [T, H], updated in place like SGLang's CUDA path)."""
    simple = (
        self.has_weight
        and self.variance_size_override is None
        and post_residual_addition is None
        and quant_linear is None
        and not self.fp32_residual
        and self.override_orig_dtype is None
        and not self.cast_x_before_out_mul
        and x.shape[-1] == self.hidden_size
    )
    if not simple or (residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous())):
        return self.forward_native(x, residual, post_residual_addition, quant_linear)
    if residual is None:
        return ops.rms_norm(x, self.weight, self.variance_epsilon)
    return ops.add_rms_norm(x, residual, self.weight, self.variance_epsilon)


def _silu_and_mul_forward(self, x):
    """SiluAndMul.forward: x [..., 2d] -> silu(x[..., :d]) * x[..., d:]."""
    return ops.silu_and_mul(x)


def _rotary_forward(self, positions, query, key, offsets=None, fused_set_kv_buffer_arg=None):
    """RotaryEmbedding.forward: q [T, Hq*D], k [T, Hk*D] rotated by cos_sin_cache[positions]."""
    if fused_set_kv_buffer_arg is not None or hasattr(self, "sin_cos_cache") or key is None:
        return self.forward_native(positions, query, key, offsets, fused_set_kv_buffer_arg)
    if offsets is not None:
        positions = positions + offsets
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    cache = self.cos_sin_cache
    if cache.device != query.device:
        cache = cache.to(query.device)
        self.cos_sin_cache = cache
    # q/k come as [T, H * D] or [T, H, D] (DeepSeek's q_pe / k_pe); the head count comes from the non-token
    # dims, because view(T, -1, D) cannot infer -1 when T == 0 (an idle DP-attention rank)
    q, k = ops.rotary_embedding(
        positions,
        query.view(num_tokens, math.prod(query.shape[1:]) // self.head_size, self.head_size),
        key.view(num_tokens, math.prod(key.shape[1:]) // self.head_size, self.head_size),
        cache,
        style="neox" if self.is_neox_style else "gptj",
    )
    return q.reshape(query.shape), k.reshape(key.shape)


def _unquantized_moe_forward(self, layer, dispatch_output):
    """UnquantizedFusedMoEMethod.forward: routed experts through ops.fused_moe.

    x [T, H]; layer.w13_weight [E, 2I, H] (gate rows, then up rows);
    layer.w2_weight [E, H, I]; topk weights/ids [T, k] from SGLang's router.
    y = sum_k w_k * w2[e_k] @ (silu(gate) * up), as SGLang's forward_native.
    """
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

    cfg = self.moe_runner_config
    plain = (
        cfg.activation == "silu"
        and not cfg.apply_router_weight_on_input
        and getattr(layer, "w13_weight_bias", None) is None
        and getattr(layer, "w2_weight_bias", None) is None
        and getattr(cfg, "gemm1_alpha", None) is None
        and getattr(cfg, "gemm1_clamp_limit", None) is None
        and not getattr(self, "w13_swiglu_interleaved", False)
    )
    if not plain:
        return self.forward_native(layer, dispatch_output)
    topk_weights, topk_ids = dispatch_output.topk_output[0], dispatch_output.topk_output[1]
    x = dispatch_output.hidden_states
    log_once(logger, logging.INFO, "MoE experts run maca_infer fused_moe")
    out = ops.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, activation="silu")
    return StandardCombineInput(hidden_states=out)


def register_fused_op_forwards(dispatch_key: str) -> None:
    """Register our forwards for ``dispatch_key`` (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.kernels.fused_op import BaseFusedOp
    from sglang.srt.layers.activation import SiluAndMul
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    BaseFusedOp.register_oot_forward(RMSNorm, _rmsnorm_forward, dispatch_key)
    BaseFusedOp.register_oot_forward(SiluAndMul, _silu_and_mul_forward, dispatch_key)
    BaseFusedOp.register_oot_forward(RotaryEmbedding, _rotary_forward, dispatch_key)
    BaseFusedOp.register_oot_forward(UnquantizedFusedMoEMethod, _unquantized_moe_forward, dispatch_key)
    _registered = True
