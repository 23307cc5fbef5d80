"""INT8 W8A8 checkpoints and SGLang: our zoo's packing read by SGLang's own code; the maca configs' checks.

- ``llama-w8a8`` / ``deepseek-w8a8`` (compressed-tensors ``int-quantized``)
  go through SGLang's *upstream* compressed-tensors parsing (which scheme it
  picks), its ``CompressedTensorsW8A8Int8`` parameters, loader and
  post-processing, and its int8 dequantizer (``int8_utils.block_dequant``
  with one-row blocks = per-channel scales); the result must equal the
  ``-dequant`` reference bit for bit. MoE experts: SGLang's
  ``W8A8Int8MoEMethod`` parameters must take the experts stacked as SGLang
  stacks them (gate rows, then up rows).
- the maca config classes (what ``--quantization w8a8_int8`` / a
  compressed-tensors checkpoint get on the maca platform) refuse FP8 and
  other schemes at config time and non-int8 / non-per-channel tensors at
  load time, each with a ValueError naming the tensor or field.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("sglang")
from safetensors.torch import load_file  # noqa: E402

KINDS = ("llama-w8a8", "deepseek-w8a8")


def _checkpoint(kind):
    from maca_infer.modelzoo import dequant_kind, get

    path = get(kind)
    return (json.loads((path / "config.json").read_text())["quantization_config"],
            load_file(path / "model.safetensors"), load_file(get(dequant_kind(kind)) / "model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_sglang_reads_back_the_dequant_reference(kind):
    from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from sglang.srt.layers.quantization.compressed_tensors.schemes import CompressedTensorsW8A8Int8
    from sglang.srt.layers.quantization.int8_utils import block_dequant
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8MoEMethod
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    qc, quantized, reference = _checkpoint(kind)
    config = CompressedTensorsConfig.from_config(qc)  # SGLang's own parser
    args = config.target_scheme_map["Linear"]
    assert config._is_dynamic_token_w8a8(args["weights"], args["input_activations"])
    modules = sorted(n.removesuffix(".weight_scale") for n in quantized if n.endswith(".weight_scale"))
    assert modules
    for module in modules:
        weight, scale = quantized[f"{module}.weight"], quantized[f"{module}.weight_scale"]
        n, k = weight.shape
        scheme = config._get_scheme_from_parts(args["weights"], args["input_activations"], format=qc["format"])
        assert type(scheme) is CompressedTensorsW8A8Int8 and not scheme.is_static_input_scheme
        layer = torch.nn.Module()
        scheme.create_weights(layer, output_partition_sizes=[n], input_size_per_partition=k,
                              params_dtype=torch.bfloat16, weight_loader=default_weight_loader)
        default_weight_loader(layer.weight, weight)  # asserts equal shapes
        default_weight_loader(layer.weight_scale, scale)
        assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
        scheme.process_weights_after_loading(layer)  # SGLang keeps the weight transposed: [K, N]
        dequant = block_dequant(layer.weight.data.t(), layer.weight_scale.data, [1, k])
        assert torch.equal(dequant, reference[f"{module}.weight"].float()), module

    experts = sorted({m.rsplit(".", 2)[0] for m in modules if ".experts." in m})
    assert bool(experts) == kind.startswith("deepseek")
    for prefix in experts:  # "model.layers.1.mlp.experts"
        ids = sorted({int(m.split(".experts.")[1].split(".")[0]) for m in modules if m.startswith(prefix + ".")})
        inter, hidden = quantized[f"{prefix}.0.gate_proj.weight"].shape
        layer = torch.nn.Module()
        W8A8Int8MoEMethod(None).create_weights(layer, len(ids), hidden, inter, torch.bfloat16,
                                               weight_loader=default_weight_loader)
        for e in ids:
            p = f"{prefix}.{e}"
            w13 = torch.cat([quantized[f"{p}.gate_proj.weight"], quantized[f"{p}.up_proj.weight"]])
            s13 = torch.cat([quantized[f"{p}.gate_proj.weight_scale"], quantized[f"{p}.up_proj.weight_scale"]])
            layer.w13_weight.data[e].copy_(w13)
            layer.w13_weight_scale.data[e].copy_(s13)
            layer.w2_weight.data[e].copy_(quantized[f"{p}.down_proj.weight"])
            layer.w2_weight_scale.data[e].copy_(quantized[f"{p}.down_proj.weight_scale"])
            assert torch.equal(block_dequant(layer.w13_weight.data[e], layer.w13_weight_scale.data[e], [1, hidden]),
                               torch.cat([reference[f"{p}.gate_proj.weight"], reference[f"{p}.up_proj.weight"]]))
            assert torch.equal(block_dequant(layer.w2_weight.data[e], layer.w2_weight_scale.data[e], [1, inter]),
                               reference[f"{p}.down_proj.weight"])


def _maca_configs():
    from maca_infer.adapters.sglang.w8a8_int8 import quantization_config_for

    return quantization_config_for("w8a8_int8"), quantization_config_for("compressed-tensors")


def test_maca_configs_accept_int8_and_refuse_fp8_and_static_scales():
    w8a8_int8, compressed = _maca_configs()
    qc, _, _ = _checkpoint("llama-w8a8")
    for cls in (w8a8_int8, compressed):
        assert torch.float32 in cls.get_supported_act_dtypes()
        cls.from_config(copy.deepcopy(qc))
    w8a8_int8.from_config({"quant_method": "w8a8_int8"})  # SGLang's own format: nothing to choose

    fp8 = copy.deepcopy(qc)
    fp8["format"] = "float-quantized"
    for part in ("weights", "input_activations"):
        fp8["config_groups"]["group_0"][part]["type"] = "float"
    static = copy.deepcopy(qc)
    static["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor")
    for cls, name in ((w8a8_int8, "w8a8_int8"), (compressed, "compressed-tensors")):
        with pytest.raises(ValueError, match=f"maca {name}: .*format='float-quantized' is not supported.*FP8"):
            cls.from_config(copy.deepcopy(fp8))
        with pytest.raises(ValueError, match=r"input_activations\.dynamic=False is not supported"):
            cls.from_config(copy.deepcopy(static))
    with pytest.raises(ValueError, match="quant_method='awq' is not a W8A8 INT8 scheme"):
        w8a8_int8.from_config({"quant_method": "awq", "bits": 4})


def test_loader_refuses_float_weights_and_non_channel_scales():
    from maca_infer.adapters.sglang.w8a8_int8 import LINEAR_LAYOUT, MOE_LAYOUT, _checked_loader

    loaded = []
    where = "model.layers.0.self_attn.qkv_proj"
    linear = _checked_loader(lambda param, w, *a, **k: loaded.append(w), where, LINEAR_LAYOUT, moe=False)
    weight = torch.nn.Parameter(torch.empty(4, 8, dtype=torch.int8), requires_grad=False)
    scale = torch.nn.Parameter(torch.empty(4, 1), requires_grad=False)
    linear(weight, torch.zeros(4, 8, dtype=torch.int8), "q")
    linear(scale, torch.ones(4, 1), "q")
    assert len(loaded) == 2
    with pytest.raises(ValueError, match=rf"{where}\.weight \(shard k\) has dtype bfloat16 .*expected weight int8"):
        linear(weight, torch.zeros(4, 8, dtype=torch.bfloat16), "k")
    with pytest.raises(ValueError, match=rf"{where}\.weight_scale has shape \(\); .*per-tensor"):
        linear(scale, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"has shape \(4, 2\); .*one scale per output channel"):
        linear(scale, torch.ones(4, 2), "v")
    moe = _checked_loader(lambda *a, **k: None, "model.layers.1.mlp.experts", MOE_LAYOUT, moe=True)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    with pytest.raises(ValueError, match=rf"{name} has dtype float16"):
        moe(weight, torch.zeros(4, 8, dtype=torch.float16), name, shard_id="w3", expert_id=3)
    assert len(loaded) == 2


def test_layer_checks_name_the_layer():
    """After loading: a weight that is not int8 [N, K] with a [N, 1] scale is a ValueError naming the layer."""
    from maca_infer.adapters.sglang.w8a8_int8 import _w8a8_layout

    q, s = _w8a8_layout("model.layers.0.mlp.down_proj", torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1))
    assert q.shape == (4, 8) and s.shape == (4,)
    with pytest.raises(ValueError, match=r"maca w8a8: model\.layers\.0\.mlp\.down_proj: .*weight_scale has shape \(4, 2\)"):
        _w8a8_layout("model.layers.0.mlp.down_proj", torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 2))
