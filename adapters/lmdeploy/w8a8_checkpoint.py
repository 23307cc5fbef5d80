"""Start-up check of an LMDeploy smooth-quant (INT8 W8A8) checkpoint before LMDeploy loads it.

LMDeploy 0.18 copies each checkpoint tensor into the parameter its model built
(``param.data.copy_``): a float weight where a W8A8 module wants int8, or int8
experts where the architecture's model built float experts, is converted
silently and the model answers garbage. Checked here, from the safetensors
headers only (no tensor is read), while the model is loaded:

- every ``<module>.scale`` has an int8 ``<module>.weight`` ``[N, K]`` beside it
  and is a float ``[N, 1]`` (LMDeploy's ``W8A8Linear`` / ``FusedMoEW8A8`` layout,
  ``lmdeploy lite smooth_quant``'s ``QLinear`` buffers);
- every int8 ``<module>.weight`` has its ``<module>.scale``;
- int8 expert weights need a W8A8 MoE module: LMDeploy 0.18 builds one only in
  the models that pass their quantization config to ``build_fused_moe``
  (Mixtral, Qwen3-MoE, DeepSeek-V2/V3, ...); Qwen2-MoE, DeepSeek (v1) and
  Phi-3.5-MoE build float ``FusedMoE`` experts whatever the checkpoint holds.

Any violation is one ValueError naming the tensor and the expected layout.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

LAYOUT = "LMDeploy smooth-quant W8A8: <module>.weight int8 [N, K] with <module>.scale float32 [N, 1]"
_FLOAT_DTYPES = ("F32", "F16", "BF16")


def smooth_quant_config(model_path: str) -> dict | None:
    """The checkpoint's ``quantization_config`` when it is LMDeploy's smooth_quant, else None."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    return quant if isinstance(quant, dict) and quant.get("quant_method") == "smooth_quant" else None


def read_layout(paths: Iterable[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype such as "I8", shape) of every tensor in ``paths`` (headers only)."""
    from safetensors import safe_open

    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in paths:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                layout[name] = (part.get_dtype(), tuple(part.get_shape()))
    return layout


def check_smooth_quant_layout(layout: dict[str, tuple[str, tuple[int, ...]]], *, model_name: str,
                              float_experts: bool) -> None:
    """Raise ValueError for the first tensor that LMDeploy would load wrongly (see module doc).

    Args:
        layout: name -> (safetensors dtype, shape), from :func:`read_layout`.
        model_name: the LMDeploy model class (named in the error).
        float_experts: the built model holds float ``FusedMoE`` experts.
    """
    for name in sorted(layout):
        dtype, shape = layout[name]
        module, _, leaf = name.rpartition(".")
        if leaf == "scale":
            weight = f"{module}.weight"
            if weight not in layout:
                raise ValueError(f"{name}: a W8A8 scale without {weight}; expected {LAYOUT}")
            w_dtype, w_shape = layout[weight]
            if w_dtype != "I8" or len(w_shape) != 2:
                raise ValueError(f"{weight} is {w_dtype} {list(w_shape)} beside its scale {name}; expected {LAYOUT}")
            if dtype not in _FLOAT_DTYPES or shape != (w_shape[0], 1):
                raise ValueError(f"{name} is {dtype} {list(shape)}; expected float32 [{w_shape[0]}, 1], one scale "
                                 f"per output channel of {weight} {list(w_shape)} ({LAYOUT})")
        elif leaf == "weight" and dtype == "I8" and f"{module}.scale" not in layout:
            raise ValueError(f"{name} is int8 {list(shape)} without {module}.scale; expected {LAYOUT}")
    if float_experts:
        experts = [n for n in sorted(layout) if ".experts." in n and layout[n][0] == "I8"]
        if experts:
            raise ValueError(
                f"LMDeploy's {model_name} builds its MoE experts as float FusedMoE: it has no W8A8 MoE path "
                f"for this architecture, so the smooth_quant checkpoint's int8 experts (first: {experts[0]}) "
                "would load as plain numbers. Missing: a FusedMoEW8A8 module in this LMDeploy model (models "
                "that pass quant_config to build_fused_moe have one: Mixtral, Qwen3-MoE, DeepSeek-V2/V3)")


def has_float_experts(model) -> bool:
    from lmdeploy.pytorch.nn.moe.default import FusedMoE

    return any(isinstance(m, FusedMoE) for m in model.modules())


def checked_load_model_weights(upstream):
    """``ModelWeightLoader.load_model_weights`` that checks a smooth-quant checkpoint first."""

    def load_model_weights(self, model, device=None):
        if smooth_quant_config(self.model_path) is not None:
            check_smooth_quant_layout(read_layout(self._shard_paths), model_name=type(model).__name__,
                                      float_experts=has_float_experts(model))
        return upstream(self, model, device=device)

    return load_model_weights
