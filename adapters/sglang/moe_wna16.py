"""``--quantization moe_wna16`` on maca: AWQ / GPTQ int4 MoE through our W4A16 kernels.

SGLang's ``moe_wna16`` (sglang/srt/layers/quantization/moe_wna16.py) loads
AWQ or GPTQ int4 checkpoints: its weight loader already converts both to one
layout per expert,

    w13_qweight uint8 [E, 2I, H // 2]   low nibble first (two k per byte)
    w2_qweight  uint8 [E, H, I // 2]
    w13_scales        [E, 2I, H // g]   w2_scales [E, H, I // g]
    w13_qzeros  uint8 [E, 2I // 2, H // g]  (two *output rows* per byte, low
    w2_qzeros   uint8 [E, H // 2, I // g]    nibble = even row; GPTQ's +1 applied)

and then runs SGLang's Triton fused MoE, which needs a Triton-capable device.
The maca platform answers ``get_quantization_config("moe_wna16")`` with
:class:`MacaMoeWNA16Config`, whose methods keep SGLang's weight creation and
loading and change only what runs:

- MoE layers: zero points are unpacked once after loading to one uint8 per
  (row, group), and ``apply`` calls ``maca_infer.common.ops.fused_moe_w4a16``
  (``w = (q - z) * s``; z = 8 when the checkpoint is symmetric).
- dense AWQ / GPTQ layers (attention, shared experts): SGLang's AWQ / GPTQ
  parameters are loaded as usual, converted once with ``ops.awq_to_w4a16`` /
  ``ops.gptq_to_w4a16`` and run with ``ops.w4a16_linear`` (SGLang 0.5.23
  removed its own non-Marlin GPTQ kernel).
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Optional

import torch

from maca_infer.adapters.sglang import fused_ops
from maca_infer.common import ops
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)


def unpack_row_pairs(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., R // 2, G] with two rows per byte (low nibble = even row) -> uint8 [..., R, G]."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack((low, high), dim=-2).flatten(-3, -2).contiguous()


def check_silu_moe_config(cfg, method: str) -> None:
    """Our fused MoE ops serve SiLU experts with the router weight applied to the output; refuse anything else."""
    if cfg.activation != "silu":
        raise ValueError(f"maca {method}: activation={cfg.activation!r} is not supported; allowed: silu")
    if getattr(cfg, "apply_router_weight_on_input", False):
        raise NotImplementedError(f"maca {method}: apply_router_weight_on_input is not supported")


def quantization_config_for(name: str):
    """The maca override of SGLang's quantization config class ``name``, or None."""
    if name == "moe_wna16":
        return _config_cls()
    return None


# ---------------------------------------------------------------- dense AWQ / GPTQ layers
# SGLang's classes are subclassed lazily (importing this module never imports SGLang), one
# builder per class, each built once.


def _keep_w4a16(layer: torch.nn.Module, qweight, scales, zeros, group: int) -> None:
    """Store the converted W4A16 weights on ``layer``; the int32 AWQ / GPTQ tensors are no longer read."""
    layer.maca_w4a16 = (qweight, scales, zeros, group)
    for name in ("qweight", "qzeros", "scales"):
        setattr(layer, name, torch.nn.Parameter(torch.empty(0, device=qweight.device), requires_grad=False))


def _w4a16_linear(layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    qweight, scales, zeros, group = layer.maca_w4a16
    return ops.w4a16_linear(x, qweight, scales, zeros, group, bias)


@functools.cache
def _awq_linear_scheme_cls():
    from sglang.srt.layers.quantization.awq.schemes.awq_linear import AWQLinearScheme

    class MacaAWQLinearScheme(AWQLinearScheme):
        """SGLang's AWQ parameters, our W4A16 linear."""

        def __init__(self, quant_config):  # no SGLang GPU kernel object
            self.quant_config = quant_config

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            group = self.quant_config.group_size
            qweight, scales, zeros = ops.awq_to_w4a16(layer.qweight.data, layer.qzeros.data, layer.scales.data, group)
            _keep_w4a16(layer, qweight, scales, zeros, group)
            log_once(logger, logging.INFO, "moe_wna16: AWQ linear layers run maca_infer w4a16_linear")

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]):
            return _w4a16_linear(layer, x, bias)

    return MacaAWQLinearScheme


@functools.cache
def _gptq_linear_scheme_cls():
    from sglang.srt.layers.quantization.gptq.schemes.gptq_linear import GPTQLinearScheme

    class MacaGPTQLinearScheme(GPTQLinearScheme):
        """SGLang's GPTQ parameters (v1 format, desc_act False), our W4A16 linear."""

        def __init__(self, quant_config, sym: bool):  # SGLang's non-Marlin GPTQ kernel is gone
            self.quant_config = quant_config
            self.use_v2_format = getattr(quant_config, "checkpoint_format", "gptq") == "gptq_v2"
            self.sym = sym
            # create_weights records exllama's shuffle choice on the kernel object;
            # ours needs no shuffle, so a plain holder takes the flag
            self.kernel = SimpleNamespace(use_shuffle=False)

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            if self.quant_config.weight_bits != 4 or self.use_v2_format:
                raise ValueError(
                    f"maca moe_wna16: GPTQ weight_bits={self.quant_config.weight_bits}, "
                    f"format={'gptq_v2' if self.use_v2_format else 'gptq'} is not supported; allowed: 4-bit gptq (v1)"
                )
            group = self.quant_config.group_size
            g_idx = getattr(layer, "g_idx", None)
            g_idx = g_idx.data if g_idx is not None and g_idx.numel() else None
            qweight, scales, zeros = ops.gptq_to_w4a16(layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                                       group, g_idx=g_idx, sym=self.sym)
            _keep_w4a16(layer, qweight, scales, zeros, group)
            log_once(logger, logging.INFO, "moe_wna16: GPTQ linear layers run maca_infer w4a16_linear")

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]):
            return _w4a16_linear(layer, x, bias)

    return MacaGPTQLinearScheme


# ---------------------------------------------------------------- MoE layers


@functools.cache
def _moe_method_cls():
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Method

    class MacaMoeWNA16Method(MoeWNA16Method):
        """SGLang's moe_wna16 weights and loader; our fused W4A16 MoE."""

        def create_moe_runner(self, layer, moe_runner_config):
            # SGLang would build its Triton runner here; ours is a function call
            self.moe_runner_config = moe_runner_config

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            if self.quant_config.weight_bits != 4:
                raise ValueError(
                    f"maca moe_wna16: weight_bits={self.quant_config.weight_bits} is not supported; allowed: 4"
                )
            log_once(logger, logging.INFO, "moe_wna16: experts run maca_infer W4A16 fused MoE (group %d, %s)",
                     layer.group_size, "zero points" if self.quant_config.has_zp else "symmetric")
            if self.quant_config.has_zp:
                layer.maca_w13_zeros = unpack_row_pairs(layer.w13_qzeros.data)
                layer.maca_w2_zeros = unpack_row_pairs(layer.w2_qzeros.data)
            else:
                layer.maca_w13_zeros = layer.maca_w2_zeros = None

        def apply(self, layer: torch.nn.Module, dispatch_output):
            cfg = self.moe_runner_config
            check_silu_moe_config(cfg, "moe_wna16")
            x = dispatch_output.hidden_states
            topk_weights, topk_ids = dispatch_output.topk_output[0], dispatch_output.topk_output[1]
            out = ops.fused_moe_w4a16(
                x, layer.w13_qweight, layer.w2_qweight, layer.w13_scales, layer.w2_scales,
                topk_weights, topk_ids, group_size=layer.group_size,
                w13_zeros=layer.maca_w13_zeros, w2_zeros=layer.maca_w2_zeros, activation="silu",
            )
            return StandardCombineInput(hidden_states=fused_ops.scale_routed_output_(out, layer, cfg))

    return MacaMoeWNA16Method


@functools.cache
def _config_cls():
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.awq.awq import AWQConfig, AWQLinearMethod
    from sglang.srt.layers.quantization.gptq.gptq import GPTQConfig, GPTQLinearMethod
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config, is_layer_skipped_quant

    class MacaMoeWNA16Config(MoeWNA16Config):
        """moe_wna16 on the maca device (see module doc)."""

        def get_quant_method(self, layer: torch.nn.Module, prefix: str):
            if not is_layer_skipped_quant(prefix, self.modules_to_not_convert):
                if isinstance(layer, FusedMoE):
                    return _moe_method_cls()(self)
                if isinstance(layer, LinearBase) and self.linear_quant_method == "awq":
                    awq = AWQConfig.from_config(self.full_config)
                    layer.scheme = _awq_linear_scheme_cls()(awq)
                    return AWQLinearMethod(awq)
                if isinstance(layer, LinearBase) and self.linear_quant_method == "gptq":
                    gptq = GPTQConfig.from_config(self.full_config)
                    layer.scheme = _gptq_linear_scheme_cls()(gptq, sym=bool(self.full_config.get("sym", True)))
                    return GPTQLinearMethod(gptq)
            return super().get_quant_method(layer, prefix)

    return MacaMoeWNA16Config
