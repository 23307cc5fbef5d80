"""INT8 W8A8 on maca: ``--quantization w8a8_int8`` and compressed-tensors INT8 checkpoints through our ops.

Two SGLang entries read the same checkpoint layout (compressed-tensors
``int-quantized``: ``<module>.weight`` int8 ``[N, K]``, ``<module>.weight_scale``
``[N, 1]``, per-token dynamic activations):

- ``--quantization w8a8_int8`` (``W8A8Int8Config``, MetaX's DeepSeek-R1-W8A8
  launch line; SGLang accepts it for a compressed-tensors checkpoint);
- no flag: the checkpoint's ``quant_method: compressed-tensors``
  (``CompressedTensorsConfig`` with its ``CompressedTensorsW8A8Int8`` scheme;
  SGLang 0.5.23 has an INT8 MoE scheme only for NPU).

Upstream, both call ``sgl_kernel.int8_scaled_mm`` and SGLang's Triton
``per_token_quant_int8`` / ``fused_moe(use_int8_w8a8=True)``. The maca
platform answers ``get_quantization_config`` with the subclasses below; they
keep SGLang's parameter creation and weight loaders and change what runs:

- Linear layers: ``ops.per_token_quant_int8`` + ``ops.w8a8_int8_linear`` on
  the int8 ``[N, K]`` weight as loaded (no transpose) and its float32
  ``[N, 1]`` scale (DeepSeek's ``kv_b_proj`` post-processing reads both in
  that layout);
- MoE layers: ``ops.fused_moe_w8a8`` on ``w13`` int8 ``[E, 2I, H]`` /
  ``w2`` ``[E, H, I]`` with per-channel scales.

Nothing here imports or calls sgl_kernel. Checks, each a ValueError naming
the tensor and the layout expected: a checkpoint tensor loaded into an int8
weight must be int8 (the loader would otherwise cast floats silently), a
scale must be per output channel; at config time (server start-up) a
compressed-tensors scheme other than INT8 W8A8 with per-channel weights and
dynamic per-token activations (FP8, static or group scales) is refused
(``ops.w8a8_check_quant_config``).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch

from maca_infer.adapters.sglang import fused_ops
from maca_infer.common import ops
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

W8A8_INT8 = "w8a8_int8"
COMPRESSED_TENSORS = ("compressed-tensors", "compressed_tensors")
LINEAR_LAYOUT = "weight int8 [N, K], weight_scale float [N, 1] (one scale per output channel)"
MOE_LAYOUT = "experts' weight int8 [N, K], weight_scale float [N, 1] (one scale per output channel)"
# what SGLang's own classes accept, plus float32: our ops compute in float32 and take any float activations
ACT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def quantization_config_for(name: str):
    """The maca override of SGLang's quantization config class ``name``, or None."""
    if name == W8A8_INT8:
        return _w8a8_int8_config_cls()
    if name in COMPRESSED_TENSORS:
        return _compressed_tensors_config_cls()
    return None


def check_w8a8_checkpoint_config(config: dict, entry: str) -> None:
    """Refuse, at start-up, a checkpoint quantization_config our INT8 ops cannot serve (ValueError)."""
    method = (config or {}).get("quant_method")
    if entry == W8A8_INT8 and method in (None, W8A8_INT8):
        return  # SGLang's own w8a8_int8 checkpoints: int8 weights with per-channel scales, nothing to choose
    try:
        ops.w8a8_check_quant_config(config)
    except ValueError as exc:
        raise ValueError(f"maca {entry}: this checkpoint's quantization_config cannot run on the maca device: "
                         f"{exc}") from None


def _checked_loader(loader: Callable, where: str, layout: str, *, moe: bool) -> Callable:
    """``loader`` that first checks each checkpoint tensor: int8 weights, per-channel (``[N, 1]`` / ``[N]``) scales."""

    def load(param, loaded_weight, *args, **kwargs):
        is_scale = param.dtype != torch.int8
        if moe:  # FusedMoE.weight_loader(param, loaded_weight, weight_name, shard_id=..., expert_id=...)
            tensor = args[0] if args else kwargs.get("weight_name", where)
        else:  # a fused layer (qkv_proj, gate_up_proj) loads one shard per checkpoint tensor
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            tensor = f"{where}.{'weight_scale' if is_scale else 'weight'}" + ("" if shard is None else f" (shard {shard})")
        if param.dtype == torch.int8 and loaded_weight.dtype != torch.int8:
            raise ValueError(f"maca w8a8: checkpoint tensor {tensor} has dtype "
                             f"{str(loaded_weight.dtype).replace('torch.', '')} and shape "
                             f"{tuple(loaded_weight.shape)}; expected {layout}")
        per_channel = (loaded_weight.dim() == 2 and loaded_weight.shape[1] == 1) or (
            loaded_weight.dim() == 1 and loaded_weight.numel() > 1)
        if is_scale and not per_channel:
            raise ValueError(f"maca w8a8: checkpoint tensor {tensor} has shape "
                             f"{tuple(loaded_weight.shape)}; expected {layout} (per-tensor, group and block "
                             "scales are not supported)")
        return loader(param, loaded_weight, *args, **kwargs)

    return load


def _w8a8_layout(where: str, weight: torch.Tensor, scale: torch.Tensor):
    """``ops.w8a8_from_compressed_tensors`` on a loaded layer, its ValueError naming the layer."""
    try:
        return ops.w8a8_from_compressed_tensors(weight, scale)
    except ValueError as exc:
        raise ValueError(f"maca w8a8: {where}: {exc}") from None


# ---------------------------------------------------------------- shared layer behaviour


class _MacaW8A8Linear:
    """Linear layers: SGLang's int8 weight / per-channel scale parameters; our per-token quant + int8 GEMM."""

    prefix = "?"

    def _wrap_loader(self, kwargs: dict, key: str = "weight_loader") -> None:
        kwargs[key] = _checked_loader(kwargs[key], self.prefix, LINEAR_LAYOUT, moe=False)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # checks dtype and shapes; the int8 [N, K] weight stays as loaded, the scale stays [N, 1] float32
        _w8a8_layout(self.prefix, layer.weight.data, layer.weight_scale.data)
        layer.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(layer.weight_scale.data.float(), requires_grad=False)
        log_once(logger, logging.INFO, "w8a8: linear layers run maca_infer per_token_quant_int8 + w8a8_int8_linear")

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        q_x, x_scale = ops.per_token_quant_int8(x)
        return ops.w8a8_int8_linear(q_x, x_scale, layer.weight, layer.weight_scale, bias, out_dtype=x.dtype)

    apply_weights = apply  # the compressed-tensors scheme's name for it


class _MacaW8A8MoE:
    """MoE layers: SGLang's int8 expert parameters and loader; our fused W8A8 MoE."""

    prefix = "?"

    def _create_w8a8_moe_weights(self, create: Callable, layer, num_experts, hidden_size,
                                 intermediate_size_per_partition, params_dtype, **extra_weight_attrs):
        extra_weight_attrs["weight_loader"] = _checked_loader(extra_weight_attrs["weight_loader"], self.prefix,
                                                              MOE_LAYOUT, moe=True)
        create(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
               **extra_weight_attrs)

    def create_moe_runner(self, layer, moe_runner_config):
        # SGLang would build its Triton runner here; ours is a function call
        self.moe_runner_config = moe_runner_config

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w13, w13_scale = _w8a8_layout(f"{self.prefix} w13", layer.w13_weight.data, layer.w13_weight_scale.data)
        w2, w2_scale = _w8a8_layout(f"{self.prefix} w2", layer.w2_weight.data, layer.w2_weight_scale.data)
        layer.maca_w8a8 = (w13, w2, w13_scale, w2_scale)
        log_once(logger, logging.INFO, "w8a8: experts run maca_infer fused_moe_w8a8")

    def apply(self, layer: torch.nn.Module, dispatch_output):
        from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput

        from maca_infer.adapters.sglang.moe_wna16 import check_silu_moe_config

        check_silu_moe_config(self.moe_runner_config, "w8a8")
        topk = dispatch_output.topk_output
        w13, w2, w13_scale, w2_scale = layer.maca_w8a8
        out = ops.fused_moe_w8a8(dispatch_output.hidden_states, w13, w2, w13_scale, w2_scale, topk[0], topk[1],
                                 activation="silu")
        return StandardCombineInput(hidden_states=fused_ops.scale_routed_output_(out, layer, self.moe_runner_config))

    apply_weights = apply


# ---------------------------------------------------------------- --quantization w8a8_int8


@functools.cache
def _w8a8_int8_config_cls():
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8Config, W8A8Int8LinearMethod, W8A8Int8MoEMethod

    class MacaW8A8Int8LinearMethod(_MacaW8A8Linear, W8A8Int8LinearMethod):
        def __init__(self, quant_config, prefix: str):
            super().__init__(quant_config)
            self.prefix = prefix

        def create_weights(self, layer, *args, **extra_weight_attrs):
            self._wrap_loader(extra_weight_attrs)
            W8A8Int8LinearMethod.create_weights(self, layer, *args, **extra_weight_attrs)

    class MacaW8A8Int8MoEMethod(_MacaW8A8MoE, W8A8Int8MoEMethod):
        def __init__(self, quant_config, prefix: str):
            super().__init__(quant_config)
            self.prefix = prefix

        def create_weights(self, layer, *args, **extra_weight_attrs):
            self._create_w8a8_moe_weights(W8A8Int8MoEMethod.create_weights, layer, *args, **extra_weight_attrs)

    class MacaW8A8Int8Config(W8A8Int8Config):
        """``--quantization w8a8_int8`` on the maca device (see module doc)."""

        @classmethod
        def from_config(cls, config):
            check_w8a8_checkpoint_config(config, W8A8_INT8)
            return cls(config)

        @classmethod
        def get_supported_act_dtypes(cls):
            return list(ACT_DTYPES)

        def get_quant_method(self, layer: torch.nn.Module, prefix: str):
            method = super().get_quant_method(layer, prefix)
            if isinstance(method, W8A8Int8LinearMethod):
                return MacaW8A8Int8LinearMethod(self, prefix)
            if isinstance(method, W8A8Int8MoEMethod):
                return MacaW8A8Int8MoEMethod(self, prefix)
            return method  # ignored layers: SGLang's unquantized method

    return MacaW8A8Int8Config


# ---------------------------------------------------------------- compressed-tensors checkpoints


@functools.cache
def _compressed_tensors_config_cls():
    from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from sglang.srt.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsLinearScheme,
        CompressedTensorsMoEScheme,
    )
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8LinearMethod, W8A8Int8MoEMethod

    class _Scheme:
        def __init__(self, prefix: str):
            self.prefix = prefix

        @classmethod
        def get_min_capability(cls) -> int:
            return 0  # our ops: any maca device

    class MacaCompressedTensorsW8A8Int8(_Scheme, _MacaW8A8Linear, CompressedTensorsLinearScheme):
        """The INT8 W8A8 linear scheme: SGLang's parameters (as ``w8a8_int8`` creates them), our ops."""

        def create_weights(self, layer, output_partition_sizes, input_size_per_partition, params_dtype,
                           weight_loader, **kwargs):
            extra = {"weight_loader": weight_loader}
            self._wrap_loader(extra)
            W8A8Int8LinearMethod.create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                                                None, None, params_dtype, **extra)

    class MacaCompressedTensorsW8A8Int8MoE(_Scheme, _MacaW8A8MoE, CompressedTensorsMoEScheme):
        """The INT8 W8A8 MoE scheme SGLang has only for NPU: its parameters, our fused MoE."""

        def create_weights(self, layer, *args, **extra_weight_attrs):
            self._create_w8a8_moe_weights(W8A8Int8MoEMethod.create_weights, layer, *args, **extra_weight_attrs)

    class MacaCompressedTensorsConfig(CompressedTensorsConfig):
        """compressed-tensors INT8 W8A8 on the maca device (see module doc)."""

        @classmethod
        def from_config(cls, config):
            check_w8a8_checkpoint_config(config, "compressed-tensors")
            return super().from_config(config)

        @classmethod
        def get_supported_act_dtypes(cls):
            return list(ACT_DTYPES)

        def get_linear_scheme(self, layer, layer_name=None, matched_target=None):
            scheme = self.get_scheme_dict(layer, layer_name, matched_target)
            if not scheme or scheme.get("weights") is None:
                return None  # ignored (lm_head, routers): SGLang's unquantized method
            return MacaCompressedTensorsW8A8Int8(layer_name)

        def get_moe_scheme(self, layer, layer_name=None):
            self._add_fused_moe_to_target_scheme_map()
            projections = [self.get_scheme_dict(layer, f"{layer_name}.0.{p}")
                           for p in ("gate_proj", "up_proj", "down_proj")]
            if any(p != projections[0] for p in projections):
                raise ValueError(f"maca compressed-tensors: {layer_name}: the experts' gate/up/down projections "
                                 "have different quantization schemes; expected one INT8 W8A8 scheme for all")
            if not projections[0] or projections[0].get("weights") is None:
                return None
            return MacaCompressedTensorsW8A8Int8MoE(layer_name)

        def _check_scheme_supported(self, min_capability: int, error: bool = True) -> bool:
            return True  # from_config admitted only the INT8 W8A8 scheme, which our ops serve on any maca device

    return MacaCompressedTensorsConfig
