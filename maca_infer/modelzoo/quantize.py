"""Round-to-nearest weight quantization: int4 group-wise (AWQ, GPTQ) and int8 per channel (smooth-quant).

A Linear weight ``W`` of shape ``[out_features, in_features]`` is cut along
``in_features`` into groups of ``group_size``; each (output row, group) gets
one fp16 ``scale`` and one integer ``zero`` in [0, 15], and

    q[o, i]   = clamp(round(W[o, i] / scale[o, g]) + zero[o, g], 0, 15)
    W'[o, i]  = (q[o, i] - zero[o, g]) * scale[o, g]         with g = i // group_size

``W'`` (the dequantized weight) is what a correct W4A16 kernel multiplies by.

Zero points:
- AWQ (zero_point=True): scale = (max - min) / 15, zero = round(-min / scale).
- GPTQ sym=True: scale = 2 * max|W| / 15, zero = 8.
- GPTQ sym=False: as AWQ but over [min(W, 0), max(W, 0)], and zero >= 1:
  GPTQ v1 files store ``zero - 1``, and a stored -1 (zero 0) is read back
  differently by different loaders, so it is never produced here.

On-disk packing (int32 words, eight 4-bit values each, value k in bits 4k..4k+3):
- AWQ "gemm": ``qweight`` int32 ``[in, out // 8]``; word ``[i, j]`` holds
  ``q[8j + AWQ_ORDER[k], i]`` in nibble ``k`` (AWQ_ORDER = 0,2,4,6,1,3,5,7),
  ``qzeros`` int32 ``[in // group, out // 8]`` packed the same way,
  ``scales`` fp16 ``[in // group, out]``.
- GPTQ v1: ``qweight`` int32 ``[in // 8, out]``; word ``[r, o]`` holds
  ``q[o, 8r + k]`` in nibble ``k`` (packed along the input dimension),
  ``qzeros`` int32 ``[in // group, out // 8]``, nibble k = ``zero[8j + k] - 1``,
  ``scales`` fp16 ``[in // group, out]``, ``g_idx`` int32 ``[in]`` = i // group.

INT8 per-channel, stored as LMDeploy's smooth-quant W8A8 (``lmdeploy lite
smooth_quant`` writes ``QLinear`` buffers): ``weight`` int8 ``[out, in]`` and
``scale`` float32 ``[out, 1]`` with

    scale[o] = max(max_i |W[o, i]|, 1e-8) / 127
    q[o, i]  = clamp(round(W[o, i] / scale[o]), -127, 127)     (torch.round: half to even, as
                                                              LMDeploy's per_channel_quant)
    W'[o, i] = q[o, i] * scale[o]

(no smoothing factors are folded in: the tiny models have no calibration data,
and LMDeploy's loader reads the same two tensors either way).

The same int8 weights stored as compressed-tensors INT8 W8A8 (llm-compressor's
``INT8_W8A8`` preset, ``format: int-quantized``; SGLang's ``w8a8_int8`` /
``compressed-tensors`` loaders): ``weight`` int8 ``[out, in]`` and
``weight_scale`` float32 ``[out, 1]``; config_groups declare the weights
symmetric per channel and the input activations dynamic, symmetric, per token
(computed at run time, nothing stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and numpy load lazily: `maca-infer --help` imports this module
    import numpy as np
    import torch

BITS = 4
MAX_Q = (1 << BITS) - 1
PACK = 32 // BITS  # values per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_METHODS = ("awq", "gptq", "smooth_quant", "compressed-tensors")
INT8_METHODS = ("smooth_quant", "compressed-tensors")  # int8 per output channel
INT8_MAX = 127


@dataclass(frozen=True)
class QuantScheme:
    """How one quantized kind is stored."""

    method: str  # "awq", "gptq", "smooth_quant" (LMDeploy's INT8 W8A8) or "compressed-tensors" (INT8 W8A8)
    group_size: int  # int4 group along in_features; 0 for the int8 methods (one scale per output channel)
    sym: bool  # GPTQ only; AWQ always has zero points, the int8 methods never

    def __post_init__(self):
        if self.method not in _METHODS:
            raise ValueError(f"quant method {self.method!r} is not supported; use one of: {', '.join(_METHODS)}")
        if self.method == "awq" and self.sym:
            raise ValueError("AWQ 'gemm' checkpoints always carry zero points: sym must be False")
        if self.method in INT8_METHODS and (not self.sym or self.group_size != 0):
            raise ValueError(f"{self.method} weights are symmetric per output channel: sym=True, group_size=0")

    def config(self, modules_to_not_convert: list[str] | None) -> dict:
        """quantization_config as AutoAWQ / AutoGPTQ / ``lmdeploy lite smooth_quant`` / llm-compressor write it."""
        if self.method == "compressed-tensors":
            return compressed_tensors_w8a8_config(modules_to_not_convert or [])
        if self.method == "smooth_quant":
            config = {"quant_method": "smooth_quant", "quant_dtype": "int8"}
            if modules_to_not_convert:
                config["modules_to_not_convert"] = modules_to_not_convert
            return config
        if self.method == "awq":
            return {
                "bits": BITS,
                "group_size": self.group_size,
                "modules_to_not_convert": modules_to_not_convert,
                "quant_method": "awq",
                "version": "gemm",
                "zero_point": True,
            }
        return {
            "bits": BITS,
            "checkpoint_format": "gptq",
            "damp_percent": 0.01,
            "desc_act": False,
            "group_size": self.group_size,
            "model_file_base_name": None,
            "model_name_or_path": None,
            "quant_method": "gptq",
            "static_groups": False,
            "sym": self.sym,
            "true_sequential": True,
        }


def quantize_rtn(weight: torch.Tensor, group_size: int, scheme: QuantScheme):
    """Round-to-nearest quantization of one Linear weight.

    Args:
        weight: ``[out, in]`` float. ``in`` must be a multiple of ``group_size``.
    Returns:
        q: ``[out, in]`` int32 in [0, 15]; scales: ``[out, in // group_size]``
        float16; zeros: ``[out, in // group_size]`` int32 in [0, 15].
    """
    import torch

    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    if out_features % PACK:
        raise ValueError(f"out_features={out_features} is not a multiple of {PACK} (int4 packing)")
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    w_min, w_max = w.amin(dim=-1), w.amax(dim=-1)
    if scheme.method == "gptq" and scheme.sym:
        scales = (2 * torch.maximum(w_min.abs(), w_max.abs()) / MAX_Q).clamp(min=1e-6)
        scales = scales.half().float()  # quantize against the scale that is stored
        zeros = torch.full_like(scales, (MAX_Q + 1) // 2)
    else:
        if scheme.method == "gptq":
            w_min, w_max = w_min.clamp(max=0), w_max.clamp(min=0)
        scales = ((w_max - w_min) / MAX_Q).clamp(min=1e-6).half().float()
        lowest_zero = 1 if scheme.method == "gptq" else 0
        zeros = torch.round(-w_min / scales).clamp(lowest_zero, MAX_Q)
    q = torch.clamp(torch.round(w / scales[..., None]) + zeros[..., None], 0, MAX_Q)
    return (
        q.reshape(out_features, in_features).to(torch.int32),
        scales.half(),
        zeros.to(torch.int32),
    )


def dequantize_rtn(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` per group: ``[out, in]`` float32."""
    out_features, in_features = q.shape
    group_size = in_features // scales.shape[1]
    deq = (q.float().reshape(out_features, -1, group_size) - zeros.float()[..., None]) * scales.float()[..., None]
    return deq.reshape(out_features, in_features)


def _pack_nibbles(values: np.ndarray, order: tuple[int, ...] = tuple(range(PACK))) -> np.ndarray:
    """Pack the last axis by 8: nibble k of each word holds ``values[..., 8j + order[k]]``."""
    import numpy as np

    v = values.astype(np.uint32)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // PACK, PACK)
    words = np.zeros(v.shape[:-1], dtype=np.uint32)
    for k, src in enumerate(order):
        words |= v[..., src] << np.uint32(BITS * k)
    return words.view(np.int32)


def pack_awq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """AWQ 'gemm' tensors (``qweight``, ``qzeros``, ``scales``) of one Linear."""
    import torch

    qweight = _pack_nibbles(q.T.contiguous().numpy(), AWQ_ORDER)  # [in, out // 8]
    qzeros = _pack_nibbles(zeros.T.contiguous().numpy(), AWQ_ORDER)  # [groups, out // 8]
    return {
        "qweight": torch.from_numpy(qweight),
        "qzeros": torch.from_numpy(qzeros),
        "scales": scales.T.contiguous(),
    }


def pack_gptq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) of one Linear."""
    import numpy as np
    import torch

    in_features = q.shape[1]
    group_size = in_features // scales.shape[1]
    qweight = _pack_nibbles(q.numpy()).T  # [out, in // 8] -> [in // 8, out]
    qzeros = _pack_nibbles((zeros - 1).T.contiguous().numpy())  # v1 stores zero - 1
    return {
        "qweight": torch.from_numpy(np.ascontiguousarray(qweight)),
        "qzeros": torch.from_numpy(qzeros),
        "scales": scales.T.contiguous(),
        "g_idx": torch.arange(in_features, dtype=torch.int32) // group_size,
    }


def compressed_tensors_w8a8_config(ignore: list[str]) -> dict:
    """llm-compressor's INT8_W8A8 quantization_config: int8 channel weights, dynamic int8 token activations."""
    common = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "block_structure": None,
              "actorder": None, "observer_kwargs": {}}
    weights = {**common, "strategy": "channel", "dynamic": False, "observer": "minmax"}
    inputs = {**common, "strategy": "token", "dynamic": True, "observer": None}
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None, "format": "int-quantized"}},
        "format": "int-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
    }


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (q int8 ``[out, in]``, scale float32 ``[out, 1]``), symmetric per output channel."""
    import torch

    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / INT8_MAX
    q = torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def quantize_linear(weight: torch.Tensor, scheme: QuantScheme) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Packed checkpoint tensors of one Linear weight and its dequantized ``[out, in]`` float32."""
    if scheme.method in INT8_METHODS:
        q, scale = quantize_int8_per_channel(weight)
        scale_name = "scale" if scheme.method == "smooth_quant" else "weight_scale"
        return {"weight": q, scale_name: scale}, q.float() * scale
    q, scales, zeros = quantize_rtn(weight, scheme.group_size, scheme)
    pack = pack_awq if scheme.method == "awq" else pack_gptq
    return pack(q, scales, zeros), dequantize_rtn(q, scales, zeros)
