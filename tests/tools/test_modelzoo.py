"""The tiny model factory: checkpoints load, generate, quantize and cache correctly.

References used here are independent of the factory's own code: transformers
loads and runs every float kind; quantized tensors are unpacked with plain
Python integer arithmetic following the AutoAWQ/AutoGPTQ unpack order (the
factory packs with numpy), and compared with the float reference checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maca_infer import modelzoo
from maca_infer.modelzoo import DEQUANT_KINDS, KINDS, QUANTIZED_KINDS, build, dequant_kind, get

FLOAT_KINDS = tuple(k for k in KINDS if k not in QUANTIZED_KINDS)
SMOOTH_QUANT_KINDS = tuple(k for k in QUANTIZED_KINDS if k.endswith("-w8a8-smoothquant"))
INT4_KINDS = tuple(k for k in QUANTIZED_KINDS if k.split("-")[1] in ("awq", "gptq"))
COMPRESSED_TENSORS_KINDS = ("llama-w8a8", "deepseek-w8a8")  # INT8 W8A8, SGLang's w8a8_int8 / compressed-tensors
REQUIRED_KINDS = (
    "llama", "qwen2", "qwen2_moe", "mixtral", "gemma", "deepseek_v2", "deepseek_v3",
    "llama-awq", "llama-gptq", "qwen2_moe-awq",
)
PROMPT = "The quick brown fox jumps over the lazy dog. 你好，世界！"
NEW_TOKENS = 12


def test_required_kinds_are_offered():
    assert set(REQUIRED_KINDS) <= set(KINDS)
    assert all(dequant_kind(k) in DEQUANT_KINDS for k in QUANTIZED_KINDS)


@pytest.mark.parametrize("kind", FLOAT_KINDS + DEQUANT_KINDS)
def test_kind_loads_in_transformers_and_generates(kind):
    transformers = pytest.importorskip("transformers")
    path = get(kind)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    # every tensor on disk has a home in the model and vice versa
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) <= model.config.vocab_size
    assert model.config.vocab_size % 64 == 0

    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )
    new_tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new_tokens) == NEW_TOKENS, "stopped early: an end token won a greedy step"
    assert len(set(new_tokens)) >= 3, f"degenerate greedy output {new_tokens}"
    assert not set(new_tokens) & set(tokenizer.all_special_ids)

    scores = torch.stack(out.scores)[:, 0]  # [steps, vocab]
    spread = scores[:, : len(tokenizer)].std(dim=-1)
    assert bool(((spread > 1.0) & (spread < 20.0)).all()), f"logit std per step {spread.tolist()}"
    top2 = scores.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    # Near-ties make greedy comparisons between implementations flaky. They
    # cannot be ruled out for random weights (the gap between the two largest
    # of 4k logits has non-zero density at 0), but they must be rare.
    assert float(margins.median()) > 0.3, f"top-1 margins too small: {margins.tolist()}"
    assert int((margins < 0.05).sum()) <= NEW_TOKENS // 4, f"many near-ties: {margins.tolist()}"


@pytest.mark.parametrize("family_kind", ["llama", "qwen2", "mixtral", "gemma", "deepseek_v3"])
def test_tokenizer_round_trips_and_chat_template(family_kind):
    transformers = pytest.importorskip("transformers")
    path = get(family_kind)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    manifest = json.loads((path / modelzoo.MANIFEST).read_text())
    text = "Hello world!\n  def f(x): return x * 2  # 中文：你好，世界。日本語も。🙂"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()), "no merges learned"
    # special tokens are single ids, and what the config/manifest says
    for token, token_id in manifest["special_token_ids"].items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    config = json.loads((path / "config.json").read_text())
    eos = config["eos_token_id"]
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])

    with_specials = tokenizer(text)["input_ids"]
    if tokenizer.bos_token_id is not None:
        assert with_specials == [tokenizer.bos_token_id] + ids
    else:
        assert with_specials == ids
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True, tokenize=False
    )
    assert "你好" in chat
    assert any(tok in chat for tok in manifest["special_token_ids"]) or "[INST]" in chat


def test_tokenizer_loads_through_lmdeploy():
    pytest.importorskip("lmdeploy")
    from lmdeploy.tokenizer import Tokenizer

    path = get("qwen2")
    tokenizer = Tokenizer(str(path))
    ids = tokenizer.encode("你好, world", add_bos=False)
    assert tokenizer.decode(ids) == "你好, world"
    assert tokenizer.eos_token_id == json.loads((path / "config.json").read_text())["eos_token_id"]


def test_tokenizer_loads_through_sglang():
    pytest.importorskip("sglang")
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    path = get("llama")
    tokenizer = get_tokenizer(str(path))
    ids = tokenizer.encode("你好, world", add_special_tokens=False)
    assert tokenizer.decode(ids) == "你好, world"


# ---------------------------------------------------------------- quantized

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c of 8 lives in nibble AWQ_REVERSE_ORDER[c]


def _nibble(word: int, k: int) -> int:
    return ((word & 0xFFFFFFFF) >> (4 * k)) & 0xF


def _unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Plain-Python AWQ 'gemm' dequantization: ``[out, in]`` float64."""
    qw, qz, sc = qweight.tolist(), qzeros.tolist(), scales.double().tolist()
    in_features, out_features = len(qw), len(qw[0]) * 8
    group_size = in_features // len(qz)
    w = [[0.0] * in_features for _ in range(out_features)]
    for i in range(in_features):
        g = i // group_size
        for o in range(out_features):
            j, c = divmod(o, 8)
            q = _nibble(qw[i][j], AWQ_REVERSE_ORDER[c])
            z = _nibble(qz[g][j], AWQ_REVERSE_ORDER[c])
            w[o][i] = (q - z) * sc[g][o]
    return torch.tensor(w, dtype=torch.float64)


def _unpack_gptq(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """Plain-Python GPTQ v1 dequantization (stored zero + 1): ``[out, in]`` float64."""
    qw, qz, sc, gi = qweight.tolist(), qzeros.tolist(), scales.double().tolist(), g_idx.tolist()
    in_features, out_features = len(qw) * 8, len(qw[0])
    w = [[0.0] * in_features for _ in range(out_features)]
    for i in range(in_features):
        g = gi[i]
        for o in range(out_features):
            q = _nibble(qw[i // 8][o], i % 8)
            z = _nibble(qz[g][o // 8], o % 8) + 1
            w[o][i] = (q - z) * sc[g][o]
    return torch.tensor(w, dtype=torch.float64)


@pytest.mark.parametrize("kind", INT4_KINDS)
def test_quantized_checkpoint_matches_its_dequant_reference(kind, tmp_path):
    path = get(kind)
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["bits"] == 4 and qc["group_size"] in (32, 64)
    method = qc["quant_method"]
    if method == "awq":
        assert qc["version"] == "gemm" and qc["zero_point"] is True
        assert "lm_head" in qc["modules_to_not_convert"]
    else:
        assert method == "gptq" and qc["desc_act"] is False and isinstance(qc["sym"], bool)
    quantized = load_file(path / "model.safetensors")
    reference = load_file(get(dequant_kind(kind)) / "model.safetensors")
    # the float model the quantized one was made from (same seed, same dtype)
    original = load_file(build(kind.split("-")[0], tmp_path / "float", dtype="float16") / "model.safetensors")
    assert "quantization_config" not in json.loads((get(dequant_kind(kind)) / "config.json").read_text())

    modules = sorted({n.rsplit(".", 1)[0] for n in quantized if n.endswith(".qweight")})
    assert modules and not any(n.startswith("lm_head") for n in modules)
    assert not any(".gate." in n or n.endswith("gate.qweight") for n in quantized if ".qweight" in n)
    # non-quantized tensors are the float model's, bit for bit
    for name, tensor in quantized.items():
        if name in original:
            assert torch.equal(tensor, original[name]), name
            assert torch.equal(tensor, reference[name]), name

    # plain-Python unpacking is slow: check every projection kind of the first
    # layer (attention, dense/shared MLP, one expert) and all shapes elsewhere
    checked = [m for m in modules if m.startswith("model.layers.0.") and ".experts." not in m]
    checked += [m for m in modules if ".experts.0." in m][:3]
    for module in modules:
        out_features, in_features = original[f"{module}.weight"].shape
        group_size = qc["group_size"]
        scales = quantized[f"{module}.scales"]
        assert scales.dtype == torch.float16 and scales.shape == (in_features // group_size, out_features)
        assert quantized[f"{module}.qzeros"].shape == (in_features // group_size, out_features // 8)
        assert quantized[f"{module}.qweight"].dtype == torch.int32
        if method == "awq":
            assert quantized[f"{module}.qweight"].shape == (in_features, out_features // 8)
        else:
            assert quantized[f"{module}.qweight"].shape == (in_features // 8, out_features)
            assert torch.equal(quantized[f"{module}.g_idx"], torch.arange(in_features, dtype=torch.int32) // group_size)
        if module not in checked:
            continue
        if method == "awq":
            dequant = _unpack_awq(quantized[f"{module}.qweight"], quantized[f"{module}.qzeros"], scales)
        else:
            dequant = _unpack_gptq(
                quantized[f"{module}.qweight"], quantized[f"{module}.qzeros"], scales, quantized[f"{module}.g_idx"]
            )
        ref = reference[f"{module}.weight"].double()
        torch.testing.assert_close(dequant.half().double(), ref, rtol=0, atol=0, msg=module)
        # round-to-nearest int4, group 32: error ~ step/sqrt(12), step ~ range/15
        weight = original[f"{module}.weight"].double()
        rel = float((dequant - weight).norm() / weight.norm())
        assert 0.01 < rel < 0.15, f"{module}: relative quantization error {rel:.3f}"
        if method == "gptq" and qc["sym"]:
            zeros = [_nibble(w, k) + 1 for w in quantized[f"{module}.qzeros"].flatten().tolist() for k in range(8)]
            assert set(zeros) == {8}


def _upstream_awq_dequantizers():
    """Torch dequantizers that LMDeploy and SGLang themselves ship: ``[in, out]``."""
    found = {}
    try:
        from lmdeploy.pytorch.backends.default.awq_modules import dequantize_gemm
    except ImportError:
        pass
    else:
        found["lmdeploy"] = lambda qw, qz, sc, g: dequantize_gemm(qw, qz, sc, 4, g)
    try:
        from sglang.kernels.ops.quantization.awq_triton import awq_dequantize_decomposition
    except ImportError:
        pass
    else:
        found["sglang"] = lambda qw, qz, sc, g: awq_dequantize_decomposition(qw, sc, qz)
    return found


@pytest.mark.parametrize("kind", INT4_KINDS)
def test_packing_matches_framework_unpackers(kind):
    """The frameworks' own unpack code reads back exactly the -dequant weights."""
    quantized = load_file(get(kind) / "model.safetensors")
    reference = load_file(get(dequant_kind(kind)) / "model.safetensors")
    group_size = json.loads((get(kind) / "config.json").read_text())["quantization_config"]["group_size"]
    modules = sorted({n.rsplit(".", 1)[0] for n in quantized if n.endswith(".qweight")})
    if kind.split("-")[1] == "awq":
        unpackers = _upstream_awq_dequantizers()
    else:
        try:
            from sglang.srt.hardware_backend.xpu.quantization.int4pack_utils import (
                unpack_gptq_qweight,
                unpack_gptq_qzeros,
            )
        except ImportError:
            unpackers = {}
        else:
            def sglang_gptq(qw, qz, sc, g_idx):
                g = g_idx.long()
                codes, zeros = unpack_gptq_qweight(qw), unpack_gptq_qzeros(qz) + 1  # v1: stored zero - 1
                return ((codes.float() - zeros[g].float()) * sc[g].float()).half()

            unpackers = {"sglang": sglang_gptq}
    if not unpackers:
        pytest.skip("neither lmdeploy nor sglang is installed")
    for framework, dequantize in unpackers.items():
        for module in modules:
            last = quantized[f"{module}.g_idx"] if f"{module}.g_idx" in quantized else group_size
            weight = dequantize(quantized[f"{module}.qweight"], quantized[f"{module}.qzeros"],
                                quantized[f"{module}.scales"], last)
            assert torch.equal(weight.T.to(torch.float16), reference[f"{module}.weight"]), (framework, module)


@pytest.mark.parametrize("kind", SMOOTH_QUANT_KINDS)
def test_smooth_quant_checkpoint_matches_lmdeploy_quantizer_and_dequant_reference(kind, tmp_path):
    """LMDeploy smooth-quant W8A8: ``weight`` int8 [out, in] + ``scale`` float32 [out, 1] per Linear
    (experts too; routers, norms and lm_head stay float), equal to what LMDeploy's own quantizer
    (``per_channel_quant``, the one ``lmdeploy lite smooth_quant`` calls) makes of the float
    model, and ``q * scale`` is the float32 -dequant reference."""
    path = get(kind)
    assert json.loads((path / "config.json").read_text())["quantization_config"] == {
        "quant_method": "smooth_quant", "quant_dtype": "int8"}
    quantized = load_file(path / "model.safetensors")
    reference = load_file(get(dequant_kind(kind), dtype="float32") / "model.safetensors")
    # the float32 weights the factory quantizes (same seed)
    original = load_file(build(kind.split("-")[0], tmp_path / "float", dtype="float32") / "model.safetensors")
    modules = sorted(n.removesuffix(".scale") for n in quantized if n.endswith(".scale"))
    assert modules and not any(m.startswith("lm_head") or m.endswith(".gate") for m in modules)
    if kind.startswith("mixtral"):
        assert any(".experts.0.w1" in m for m in modules) and any(".experts.7.w2" in m for m in modules)
    try:
        from lmdeploy.pytorch.kernels.default.w8a8_kernels import per_channel_quant
    except ImportError:
        per_channel_quant = None
    for name, tensor in quantized.items():
        module = name.rsplit(".", 1)[0]
        if module not in modules:
            assert tensor.dtype == torch.float16 and torch.equal(tensor, original[name].half()), name
            continue
        if name.endswith(".scale"):
            continue
        weight, scale = tensor, quantized[f"{module}.scale"]
        out_features, in_features = original[name].shape
        assert weight.dtype == torch.int8 and weight.shape == (out_features, in_features), name
        assert scale.dtype == torch.float32 and scale.shape == (out_features, 1), name
        assert int(weight.abs().amax(dim=1).min()) == 127, f"{name}: each row's largest |q| must be 127"
        torch.testing.assert_close(weight.double() * scale.double(), reference[name].double(),
                                   rtol=1e-7, atol=0, msg=name)
        if per_channel_quant is not None:
            ref_q, ref_scale = per_channel_quant(original[name], torch.int8)
            assert torch.equal(ref_q, weight) and torch.equal(ref_scale, scale), name
        rel = float((weight.double() * scale.double() - original[name].double()).norm() / original[name].double().norm())
        assert 1e-3 < rel < 0.02, f"{name}: relative int8 quantization error {rel:.4f}"


@pytest.mark.parametrize("kind", COMPRESSED_TENSORS_KINDS)
def test_compressed_tensors_w8a8_checkpoint_matches_dequant_reference(kind, tmp_path):
    """compressed-tensors INT8 W8A8: ``weight`` int8 [out, in] + ``weight_scale`` float32 [out, 1] per Linear
    (attention incl. MLA's kv_b_proj, MLPs, every expert; routers and lm_head stay float, listed in
    ``ignore``), a config compressed-tensors' own parser reads as channel int8 weights with dynamic token
    int8 activations; ``q * scale`` is the float32 -dequant reference, whose other tensors are the
    quantized kind's bf16 values; LMDeploy's own quantizer (``per_channel_quant``) makes the same int8
    weights and scales of the float model. (SGLang's loader and dequantizer read it back in
    tests/sglang/test_w8a8_loading.py.)"""
    from maca_infer.common import ops

    path = get(kind)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert ops.w8a8_check_quant_config(qc) == "compressed-tensors"
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        pass
    else:
        parsed = QuantizationConfig.model_validate(qc).config_groups["group_0"]
        assert (parsed.weights.num_bits, parsed.weights.type, parsed.weights.strategy) == (8, "int", "channel")
        assert parsed.input_activations.dynamic and parsed.input_activations.strategy == "token"
    quantized = load_file(path / "model.safetensors")
    reference = load_file(get(dequant_kind(kind)) / "model.safetensors")
    # the float32 weights the factory quantizes (same seed)
    architecture = json.loads((path / modelzoo.MANIFEST).read_text())["architecture"]
    original = load_file(build(architecture, tmp_path / "float", dtype="float32") / "model.safetensors")
    modules = sorted(n.removesuffix(".weight_scale") for n in quantized if n.endswith(".weight_scale"))
    routers = [n.removesuffix(".weight") for n in quantized if n.endswith("mlp.gate.weight")]
    try:
        from lmdeploy.pytorch.kernels.default.w8a8_kernels import per_channel_quant
    except ImportError:
        per_channel_quant = None
    assert qc["ignore"] == ["lm_head"] + routers
    assert not set(qc["ignore"]) & set(modules)
    if kind.startswith("deepseek"):
        assert routers and any(m.endswith("self_attn.kv_b_proj") for m in modules)
        assert any(".experts.7.down_proj" in m for m in modules) and any("shared_experts" in m for m in modules)
    for name, tensor in quantized.items():
        module = name.rsplit(".", 1)[0]
        if module not in modules:
            assert tensor.dtype in (torch.bfloat16, torch.float32), name  # float32: V3's routing bias
            assert torch.equal(tensor.float(), reference[name].float()), name
            continue
        if name.endswith(".weight_scale"):
            continue
        scale = quantized[f"{module}.weight_scale"]
        assert tensor.dtype == torch.int8 and scale.dtype == torch.float32, name
        assert scale.shape == (tensor.shape[0], 1), name
        assert int(tensor.abs().amax(dim=1).min()) == 127, f"{name}: each row's largest |q| must be 127"
        assert reference[name].dtype == torch.float32
        assert torch.equal(tensor.float() * scale, reference[name]), name
        if per_channel_quant is not None:
            ref_q, ref_scale = per_channel_quant(original[name], torch.int8)
            assert torch.equal(ref_q, tensor) and torch.equal(ref_scale, scale), name
        weight = original[name].double()
        rel = float((reference[name].double() - weight).norm() / weight.norm())
        assert 1e-3 < rel < 0.02, f"{name}: relative int8 quantization error {rel:.4f}"


# ---------------------------------------------------------------- greedy comparison helper


def test_greedy_agreement_passes_ties_and_catches_decided_mismatches():
    from maca_infer.modelzoo.checks import check_greedy_agreement

    logits = torch.zeros(4, 10)
    logits[0, 3] = 5.0  # decided: 3
    logits[1, 4], logits[1, 7] = 5.0, 4.9  # undecided between 4 and 7
    logits[2, 1] = 5.0
    logits[3, 2] = 5.0
    assert check_greedy_agreement([3, 4, 1, 2], logits, [3, 4, 1, 2]).matched == 4
    parted = check_greedy_agreement([3, 4, 1, 2], logits, [3, 7, 9, 9])
    assert parted.matched == 1 and parted.parted_at_tie
    with pytest.raises(AssertionError, match="greedy step 0"):
        check_greedy_agreement([3, 4, 1, 2], logits, [5, 4, 1, 2])
    with pytest.raises(AssertionError, match="greedy step 1"):  # undecided step, but 9 is not a contender
        check_greedy_agreement([3, 4, 1, 2], logits, [3, 9, 1, 2])
    with pytest.raises(ValueError, match="steps >= 4"):
        check_greedy_agreement([3, 4, 1, 2], logits[:2], [3, 4, 1, 2])


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe"])
def test_bfloat16_and_float32_greedy_agree_up_to_ties(kind):
    """The tiny models are usable for greedy comparisons across precisions."""
    transformers = pytest.importorskip("transformers")
    from maca_infer.modelzoo.checks import check_greedy_agreement

    path = get(kind)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    matched = []
    for prompt in ("Once upon a time", PROMPT):
        inputs = tokenizer(prompt, return_tensors="pt")
        start = inputs["input_ids"].shape[1]
        ref = fp32.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
        cand = bf16.generate(**inputs, max_new_tokens=8, do_sample=False)
        result = check_greedy_agreement(ref.sequences[0, start:].tolist(), torch.stack(ref.scores)[:, 0],
                                        cand[0, start:].tolist())
        matched.append(result.matched)
    assert max(matched) == 8, f"no prompt agreed fully: {matched}"


# ---------------------------------------------------------------- cache, seeds, CLI


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = build("qwen2", tmp_path / "a", seed=7)
    b = build("qwen2", tmp_path / "b", seed=7)
    c = build("qwen2", tmp_path / "c", seed=8)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert wa.keys() == wc.keys()
    for name in wa:
        assert not torch.equal(wa[name], wc[name]), f"{name} does not depend on the seed"


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="kind='gpt5'"):
        build("gpt5", tmp_path)
    with pytest.raises(ValueError, match="seed=-1"):
        get("llama", seed=-1)
    with pytest.raises(ValueError, match="dtype='int8'"):
        build("llama", tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="not a quantized kind"):
        dequant_kind("llama")


def test_get_caches_and_does_not_rebuild(tmp_path, monkeypatch):
    from maca_infer.modelzoo import factory

    monkeypatch.setenv("MACA_INFER_MODEL_CACHE", str(tmp_path))
    calls = []
    real_build = factory.build
    monkeypatch.setattr(factory, "build", lambda *a, **k: calls.append(a) or real_build(*a, **k))
    first = get("llama", seed=3)
    assert first.parent == tmp_path and first.name.startswith("llama-s3-")
    assert (first / "model.safetensors").is_file() and len(calls) == 1
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert get("llama", seed=3) == first
    assert len(calls) == 1 and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert get("llama", seed=4) != first and len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_get_prunes_day_old_builds_of_older_factory_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("MACA_INFER_MODEL_CACHE", str(tmp_path))
    day_old = tmp_path / "qwen2-s0-0123456789ab"
    fresh = tmp_path / "qwen2-s0-ba9876543210"
    other_dtype = tmp_path / "qwen2-s0-float32-0123456789ab"
    for folder in (day_old, fresh, other_dtype):
        folder.mkdir()
    two_days_ago = os.path.getmtime(tmp_path) - 2 * 24 * 3600
    os.utime(day_old, (two_days_ago, two_days_ago))
    os.utime(other_dtype, (two_days_ago, two_days_ago))
    current = get("qwen2")
    assert current.is_dir() and fresh.is_dir() and other_dtype.is_dir()
    assert not day_old.exists()


def test_get_is_safe_when_processes_race(tmp_path):
    env = dict(os.environ, MACA_INFER_MODEL_CACHE=str(tmp_path), MACA_INFER_LOG_LEVEL="WARNING")
    code = "from maca_infer.modelzoo import get; print(get('qwen2', seed=5))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    entries = [p for p in tmp_path.iterdir() if p.name != "_tokenizers"]
    assert [p.name for p in entries] == [Path(outs[0]).name], "a temporary build folder was left behind"
    reference = build("qwen2", tmp_path / "again", seed=5)
    assert (Path(outs[0]) / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_make_model_cli_writes_a_checkpoint(tmp_path, capsys):
    from maca_infer.cli import main

    out = tmp_path / "m"
    assert main(["make-model", "qwen2_moe", "--out", str(out), "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", modelzoo.MANIFEST):
        assert (out / name).is_file(), name
    manifest = json.loads((out / modelzoo.MANIFEST).read_text())
    assert manifest["kind"] == "qwen2_moe" and manifest["seed"] == 2
    with pytest.raises(SystemExit):
        main(["make-model", "no-such-kind", "--out", str(out)])
    assert main(["make-model", "qwen2_moe", "--out", str(out), "--seed", "-1"]) == 2
    assert "seed=-1" in capsys.readouterr().err


def test_make_model_cli_cached_prints_the_get_path(capsys):
    from maca_infer.cli import main

    assert main(["make-model", "gemma", "--cached"]) == 0
    assert capsys.readouterr().out.strip() == str(get("gemma"))
