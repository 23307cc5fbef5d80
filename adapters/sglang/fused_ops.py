"""OOT forwards for SGLang's fused ops (RMSNorm, SiLU-and-mul, rotary, MoE experts, noaux_tc top-k), routed to maca_infer.common.ops.

SGLang's ``BaseFusedOp`` dispatch (``sglang.kernels.fused_op``) tries, in
order: a forward registered with ``register_oot_forward`` for the platform's
dispatch key, then ``forward_<key>``, then ``forward_native``. The maca
platform's key is ``maca``; the forwards below serve the common cases and hand
every other case (quantized input fusion, variance-size override, fp32
residual streams, ...) to ``forward_native`` unchanged, so behaviour never
silently changes.

Registration is keyed on the exact class: subclasses (YaRN / Llama-3 rotary,
GemmaRMSNorm) keep their own forwards.

Under ``torch.compile`` (SGLang's ``--enable-torch-compile``) the RMSNorm,
SiLU-and-mul and rotary forwards call the same ops as ``torch.ops.maca_infer.*`` custom
ops (``common/ops/library.py``, registered by ``register_fused_op_forwards``),
which Dynamo records as graph nodes instead of breaking the graph at our
Python dispatch; eager calls skip the custom-op layer (its per-call cost).
"""

from __future__ import annotations

import logging
import math

import torch

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
    if torch.compiler.is_compiling():  # --enable-torch-compile: one graph node (common/ops/library.py), no break
        if residual is None:
            return torch.ops.maca_infer.rms_norm(x, self.weight, self.variance_epsilon)
        return torch.ops.maca_infer.add_rms_norm(x, residual, self.weight, self.variance_epsilon), residual
    if residual is None:
        return ops.rms_norm(x, self.weight, self.variance_epsilon)
    return ops.add_rms_norm(x, residual, self.weight, self.variance_epsilon)


def _silu_and_mul_forward(self, x):
    """SiluAndMul.forward: x [..., 2d] -> silu(x[..., :d]) * x[..., d:]."""
    if torch.compiler.is_compiling():
        return torch.ops.maca_infer.silu_and_mul(x)
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
    args = (positions, query.view(num_tokens, math.prod(query.shape[1:]) // self.head_size, self.head_size),
            key.view(num_tokens, math.prod(key.shape[1:]) // self.head_size, self.head_size), cache,
            "neox" if self.is_neox_style else "gptj")
    if torch.compiler.is_compiling():
        q, k = torch.ops.maca_infer.rotary_embedding(*args)
    else:
        q, k = ops.rotary_embedding(*args[:4], style=args[4])
    return q.reshape(query.shape), k.reshape(key.shape)


def scale_routed_output_(out: torch.Tensor, layer, runner_config) -> torch.Tensor:
    """Multiply the experts' output ``out`` [T, H] in place by ``routed_scaling_factor`` where SGLang's runner would.

    Every maca MoE method (unquantized, ``moe_wna16``, ``w8a8``) takes the place of SGLang's Triton runner,
    which applies ``runner_config.routed_scaling_factor`` when summing the top-k (``moe_combine_topk``) only
    under its module's ``_is_cuda or _is_musa``; DeepSeek's MoE (``DeepseekV2MoE.forward_normal``) applies
    it itself under exactly the opposite condition. The runner module's flags are read here, not
    ``is_cuda()`` again, so the experts follow the runner's decision whatever the host: true on a MACA
    device (mcPyTorch sets ``torch.version.cuda``), false on the emulated one. Nothing is applied when the
    router already folded the factor into the top-k weights (``should_fuse_routed_scaling_factor_in_topk``).
    """
    scale = getattr(runner_config, "routed_scaling_factor", None)
    if scale is None or scale == 1.0 or getattr(layer, "should_fuse_routed_scaling_factor_in_topk", False):
        return out
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe as sglang_runner

    if sglang_runner._is_cuda or sglang_runner._is_musa:
        out.mul_(scale)
    return out


def _unquantized_moe_forward(self, layer, dispatch_output):
    """UnquantizedFusedMoEMethod.forward: routed experts through ops.fused_moe.

    x [T, H]; layer.w13_weight [E, 2I, H] (gate rows, then up rows);
    layer.w2_weight [E, H, I]; topk weights/ids [T, k] from SGLang's router.
    y = sum_k w_k * w2[e_k] @ (silu(gate) * up), as SGLang's forward_native, times routed_scaling_factor
    where SGLang's runner would apply it (``scale_routed_output_``).
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
    if not plain:  # SGLang's CPU forward leaves the routed scale to the model, as its off-CUDA runners do
        combined = self.forward_native(layer, dispatch_output)
        scale_routed_output_(combined.hidden_states, layer, cfg)
        return combined
    topk_weights, topk_ids = dispatch_output.topk_output[0], dispatch_output.topk_output[1]
    x = dispatch_output.hidden_states
    log_once(logger, logging.INFO, "MoE experts run maca_infer fused_moe")
    out = ops.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, activation="silu")
    return StandardCombineInput(hidden_states=scale_routed_output_(out, layer, cfg))


def _noaux_tc_routing(self, router_logits, dynamic_expert_bias, router_logits_partials, dispatch_info) -> bool:
    """DeepSeek-V3's noaux_tc router (sigmoid, grouped top-k steered by e_score_correction_bias), with none of
    the extras our op does not model: custom routing, fused shared-expert slots, EPLB remapping, per-token
    bias, split router partials, other scorings or output formats, SGLang's simulated routings."""
    from sglang.srt.environ import envs
    from sglang.srt.layers.moe.topk import TopKOutputFormat

    cfg = self.topk_config
    return (
        cfg.use_grouped_topk
        and cfg.correction_bias is not None
        and cfg.scoring_func == "sigmoid"
        and cfg.custom_routing_function is None
        and cfg.num_shared_topk_slots == 0
        and not cfg.sqrtsoftplus_log1p
        and cfg.output_format in (None, TopKOutputFormat.STANDARD)
        and dynamic_expert_bias is None
        and router_logits_partials is None
        and dispatch_info is None
        and router_logits.dim() == 2
        and not envs.SGLANG_SIMULATE_UNIFORM_EXPERTS.get()
        and not envs.SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS.get()
    )


def _topk_forward(self, hidden_states, router_logits, *, num_token_non_padded=None,
                  expert_location_dispatch_info=None, dynamic_expert_bias=None, router_logits_partials=None):
    """TopK.forward: DeepSeek-V3 noaux_tc routing through ops.moe_grouped_topk; every other routing is SGLang's.

    router_logits [T, E]; ``topk_config``: top_k, num_expert_group, topk_group,
    renormalize, correction_bias [E], routed_scaling_factor (applied here only
    when SGLang folds it into the top-k weights). Returns SGLang's
    StandardTopKOutput: weights [T, k] float32, ids [T, k] int32 (-1 on
    CUDA-graph padding rows, as SGLang's CPU path).
    """
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    num_token_non_padded_r, dispatch_info = self._resolve_routing_inputs(
        num_token_non_padded, expert_location_dispatch_info)
    if not _noaux_tc_routing(self, router_logits, dynamic_expert_bias, router_logits_partials, dispatch_info):
        return self.forward_native(hidden_states, router_logits, num_token_non_padded=num_token_non_padded,
                                   expert_location_dispatch_info=expert_location_dispatch_info,
                                   dynamic_expert_bias=dynamic_expert_bias,
                                   router_logits_partials=router_logits_partials)
    cfg = self.topk_config
    scaling = cfg.routed_scaling_factor if cfg.apply_routed_scaling_factor_on_output else 1.0
    log_once(logger, logging.INFO, "MoE noaux_tc routing runs maca_infer moe_grouped_topk")
    weights, ids = ops.moe_grouped_topk(
        router_logits, cfg.top_k, num_expert_group=cfg.num_expert_group, topk_group=cfg.topk_group,
        renormalize=cfg.renormalize, scoring="sigmoid", correction_bias=cfg.correction_bias,
        routed_scaling_factor=float(scaling if scaling is not None else 1.0),
    )
    if num_token_non_padded_r is not None:  # rows past the real tokens route nowhere
        rows = torch.arange(ids.shape[0], device=ids.device)
        ids.masked_fill_((rows >= num_token_non_padded_r)[:, None], -1)
    return self._apply_waterfill(StandardTopKOutput(weights, ids, router_logits), hidden_states.shape[0])


def register_fused_op_forwards(dispatch_key: str) -> None:
    """Register our forwards for ``dispatch_key`` (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.layers.activation import SiluAndMul
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    from maca_infer.adapters.sglang.compat import oot_forward_registry, topk_forward_fits
    from maca_infer.common.ops import library  # noqa: F401 - defines torch.ops.maca_infer.* for the compiled path

    registry = oot_forward_registry()

    registry.register_oot_forward(RMSNorm, _rmsnorm_forward, dispatch_key)
    registry.register_oot_forward(SiluAndMul, _silu_and_mul_forward, dispatch_key)
    registry.register_oot_forward(RotaryEmbedding, _rotary_forward, dispatch_key)
    registry.register_oot_forward(UnquantizedFusedMoEMethod, _unquantized_moe_forward, dispatch_key)
    if topk_forward_fits(TopK):
        registry.register_oot_forward(TopK, _topk_forward, dispatch_key)
    _registered = True
