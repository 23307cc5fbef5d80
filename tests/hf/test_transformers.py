"""Transformers models with our kernels vs stock Transformers (the reference).

Tiny random Llama / Qwen2 / Gemma from the model zoo (plus Mistral with a
sliding window and Qwen3 built from configs): logits of real tokens match
stock SDPA within float32 tolerance, greedy generate gives identical tokens,
our ops are the ones running (counted), and disable() gives back exactly
the stock outputs. The same tests run on Transformers 4.46 (attention through
the attention classes, no AttentionInterface); what that release cannot do
(attn_implementation="maca", ExpertsInterface, Qwen3) skips naming the version.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import maca_infer.adapters.hf as maca_hf
from maca_infer.adapters.hf import (
    _compat, transformers_attention, transformers_attention_classes, transformers_experts, transformers_kernels,
)

# float32 logits: our kernels accumulate in float32 like the stock path, in another order
LOGITS_ATOL = 1e-4
MLP_OPS = {"llama": "silu_and_mul", "qwen2": "silu_and_mul", "gemma": "gelu_and_mul"}
INTERFACE = _compat.has_attention_interface()
needs_attention_interface = pytest.mark.skipif(
    not INTERFACE, reason='attn_implementation="maca" needs transformers >= 4.48 (AttentionInterface)')
needs_experts_interface = pytest.mark.skipif(
    not transformers_experts.interface_available(), reason="experts_implementation needs transformers >= 5")


def _assert_maca_attention_set(model):
    if INTERFACE:
        assert model.config._attn_implementation == "maca"
    else:  # the attention classes' seam: our scaled_dot_product_attention is installed
        assert transformers_attention_classes.users() > 0


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _greedy(model, ids, mask, new_tokens=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
def test_enable_matches_stock_and_round_trips(kind, load_llm, make_batch, op_calls, maca_log):
    model = load_llm(kind)
    assert model.device == maca_hf.device()
    ids, mask = make_batch(model.config.vocab_size, [9, 5, 2], seed=1, device=model.device)
    stock_logits = _logits(model, ids, mask)
    stock_tokens = _greedy(model, ids, mask)
    assert not op_calls, "stock run must not touch our ops"

    maca_hf.enable(model)
    _assert_maca_attention_set(model)
    ours = _logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], stock_logits[real], atol=LOGITS_ATOL, rtol=1e-4)
    # the padding positions too: no key at all (5.x: zeros, as SDPA gives) or only blocked ones (4.46:
    # finfo.min biases, an average SDPA computes; the stock function computes those rows alone)
    torch.testing.assert_close(ours, stock_logits, atol=LOGITS_ATOL, rtol=1e-4)
    assert torch.equal(_greedy(model, ids, mask), stock_tokens)
    for op in ("rms_norm", "apply_rotary", "varlen_attention", MLP_OPS[kind]):
        assert op_calls[op] > 0, f"{op} did not run"
    assert not any("stock" in line for line in maca_log), maca_log  # nothing fell back

    maca_hf.disable(model)
    assert model.config._attn_implementation == "sdpa"
    calls_before = sum(op_calls.values())
    assert torch.equal(_logits(model, ids, mask), stock_logits)
    assert torch.equal(_greedy(model, ids, mask), stock_tokens)
    assert sum(op_calls.values()) == calls_before, "a disabled model still runs our ops"
    assert transformers_kernels._rotary_users == {}
    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    assert not hasattr(modeling.apply_rotary_pos_emb, "__maca_stock__")  # the stock function is back
    assert not hasattr(torch.nn.functional.scaled_dot_product_attention, "__maca_stock__")


@pytest.mark.skipif(INTERFACE, reason="transformers >= 4.48 has AttentionInterface")
def test_attn_implementation_maca_before_4_48_is_a_clear_error(load_llm, make_batch, op_calls):
    with pytest.raises(RuntimeError, match=r'attn_implementation="maca" needs transformers >= 4\.48.*enable\(model\) works'):
        maca_hf.register_attention()
    # enable() still works there (test_enable_matches_stock_and_round_trips covers it fully)
    model = load_llm("llama")
    ids, mask = make_batch(model.config.vocab_size, [4], seed=2, device=model.device)
    maca_hf.enable(model)
    try:
        _logits(model, ids, mask)
    finally:
        maca_hf.disable(model)
    assert op_calls["varlen_attention"] > 0


@needs_attention_interface
def test_attn_implementation_maca_at_load_time(load_llm, make_batch, op_calls):
    maca_hf.register_attention()
    stock = load_llm("llama")
    ours = load_llm("llama", attn_implementation="maca")
    assert ours.config._attn_implementation == "maca"
    ids, mask = make_batch(stock.config.vocab_size, [7, 3], seed=2, device=stock.device)
    real = mask.bool()
    torch.testing.assert_close(_logits(ours, ids, mask)[real], _logits(stock, ids, mask)[real], atol=LOGITS_ATOL, rtol=1e-4)
    assert op_calls["varlen_attention"] > 0 and op_calls["rms_norm"] == 0  # attention only
    assert torch.equal(_greedy(ours, ids, mask), _greedy(stock, ids, mask))


def test_a_model_not_enabled_stays_stock_beside_an_enabled_one(load_llm, make_batch, op_calls):
    """On 4.46 our scaled_dot_product_attention is installed process-wide: only enabled models may reach it."""
    enabled, other = load_llm("llama"), load_llm("llama")
    ids, mask = make_batch(other.config.vocab_size, [6, 3], seed=14, device=other.device)
    stock = _logits(other, ids, mask)
    maca_hf.enable(enabled)
    try:
        assert torch.equal(_logits(other, ids, mask), stock)
        assert sum(op_calls.values()) == 0, op_calls
        _logits(enabled, ids, mask)
        assert op_calls["varlen_attention"] > 0
    finally:
        maca_hf.disable(enabled)


def test_static_cache_generate(load_llm, make_batch, op_calls):
    model = load_llm("llama")
    if not INTERFACE and all(d in ("cpu", "disk") for d in getattr(model, "hf_device_map", {"": 0}).values()):
        # transformers 4.46 looks for an accelerator in hf_device_map to place a static cache (IndexError when
        # every module is on "cpu", as on the emulated device); without the map it uses the model's device
        del model.hf_device_map
    ids, mask = make_batch(model.config.vocab_size, [6, 4], seed=11, device=model.device)
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        stock = model.generate(input_ids=ids, **options)
        maca_hf.enable(model)
        try:
            ours = model.generate(input_ids=ids, **options)
        finally:
            maca_hf.disable(model)
    assert op_calls["varlen_attention"] > 0
    assert torch.equal(ours, stock)


def _right_padded(vocab_size, device):
    ids = torch.randint(3, vocab_size - 3, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding: the last three tokens of row 1 are padding
    return ids.to(device), mask.to(device)


def test_right_padding(load_llm):
    model = load_llm("qwen2")
    ids, mask = _right_padded(model.config.vocab_size, model.device)
    stock = _logits(model, ids, mask)
    maca_hf.enable(model)
    try:
        ours = _logits(model, ids, mask)
    finally:
        maca_hf.disable(model)
    # padding positions included: they run as their own (full) attention, exactly as stock
    torch.testing.assert_close(ours, stock, atol=LOGITS_ATOL, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_bfloat16_error_is_stock_sized(kind, load_llm):
    """bf16 rounds differently (our ops round once, stock rounds per step): compare both to float32."""
    reference_model = load_llm(kind)
    model = load_llm(kind, dtype=torch.bfloat16)
    ids, mask = _right_padded(model.config.vocab_size, model.device)
    real = mask.bool()
    reference = _logits(reference_model, ids, mask)[real]
    stock_error = (_logits(model, ids, mask).float()[real] - reference).abs().max()
    maca_hf.enable(model)
    try:
        ours = _logits(model, ids, mask).float()[real]
    finally:
        maca_hf.disable(model)
    our_error = (ours - reference).abs().max()
    assert our_error <= 1.5 * stock_error + 0.02, (our_error, stock_error)


def _from_config(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    attn_implementation = extra.pop("attn_implementation", None)
    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        config, **_compat.dtype_kwargs(torch.float32), attn_implementation=attn_implementation
    ).to(maca_hf.device()).eval()


def _needs_model_type(model_type: str, since: str):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} needs transformers >= {since}")


@pytest.mark.parametrize(
    "model_type, extra",
    [("mistral", {"sliding_window": 4}), ("qwen3", {})],
    ids=["mistral-sliding-window", "qwen3-qk-norm"],
)
def test_more_architectures(model_type, extra, make_batch, op_calls):
    if model_type == "qwen3":
        _needs_model_type("qwen3", "4.51")
    model = _from_config(model_type, **extra)
    ids, mask = make_batch(64, [10, 6], seed=5, device=model.device)
    stock = _logits(model, ids, mask)
    stock_tokens = _greedy(model, ids, mask)
    maca_hf.enable(model)
    try:
        real = mask.bool()
        torch.testing.assert_close(_logits(model, ids, mask)[real], stock[real], atol=LOGITS_ATOL, rtol=1e-4)
        assert torch.equal(_greedy(model, ids, mask), stock_tokens)
        assert op_calls["varlen_attention"] > 0 and op_calls["silu_and_mul"] > 0
    finally:
        maca_hf.disable(model)
    assert torch.equal(_logits(model, ids, mask), stock)


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral"])
def test_mixture_of_experts_models(kind, load_llm, make_batch, op_calls, maca_log):
    """Norms, rotary, attention, Qwen2-MoE's shared expert MLP and the routed experts (fused_moe) swapped."""
    model = load_llm(kind)
    stock_experts = getattr(model.config, "_experts_implementation", None)
    # transformers < 5: no ExpertsInterface; Qwen2-MoE's routed experts are Qwen2MoeMLPs (our gated MLP),
    # Mixtral's stay stock
    routed_op = "fused_moe" if transformers_experts.interface_available() else None
    ids, mask = make_batch(model.config.vocab_size, [7, 4], seed=8, device=model.device)
    stock = _logits(model, ids, mask)
    stock_tokens = _greedy(model, ids, mask, new_tokens=4)
    maca_hf.enable(model)
    try:
        assert getattr(model.config, "_experts_implementation", "maca") == "maca"
        real = mask.bool()
        torch.testing.assert_close(_logits(model, ids, mask)[real], stock[real], atol=LOGITS_ATOL, rtol=1e-4)
        assert torch.equal(_greedy(model, ids, mask, new_tokens=4), stock_tokens)
        for op in ("varlen_attention", "rms_norm", "apply_rotary", routed_op):
            assert op is None or op_calls[op] > 0, f"{op} did not run"
        assert not any(" runs" in line for line in maca_log), maca_log  # no fallback
    finally:
        maca_hf.disable(model)
    assert getattr(model.config, "_experts_implementation", None) == stock_experts
    assert torch.equal(_logits(model, ids, mask), stock)


def test_gemma2_softcap_and_sliding_window_match_eager(make_batch, op_calls):
    """Gemma2 caps attention logits (SDPA cannot): the reference is Transformers' eager attention."""
    model = _from_config("gemma2", sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                         query_pre_attn_scalar=16, attn_implementation="eager")
    ids, mask = make_batch(64, [9, 5], seed=9, device=model.device)
    eager = _logits(model, ids, mask)
    maca_hf.enable(model)
    try:
        real = mask.bool()
        torch.testing.assert_close(_logits(model, ids, mask)[real], eager[real], atol=LOGITS_ATOL, rtol=1e-4)
        # every layer, the sliding-window ones included, ran our attention (none fell back to stock)
        assert op_calls["varlen_attention"] == model.config.num_hidden_layers and op_calls["gelu_and_mul"] > 0
    finally:
        maca_hf.disable(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_logits(model, ids, mask), eager)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported: gemma, gemma2, llama"):
        maca_hf.enable(model)
    assert not maca_hf.is_enabled(model)
    with pytest.raises(ValueError, match="not supported; pass a transformers PreTrainedModel"):
        maca_hf.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="was not enabled"):
        maca_hf.disable(model)


def test_mask_our_kernel_cannot_take_falls_back_with_one_line(load_llm, op_calls, maca_log):
    """Two sequences packed in one row (block-diagonal causal 4D mask): stock SDPA runs, said once."""
    model = load_llm("llama")
    ids = torch.randint(3, model.config.vocab_size - 3, (1, 6), generator=torch.Generator().manual_seed(6))
    ids = ids.to(model.device)
    block_causal = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).bool().tril()[None, None].to(model.device)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=block_causal).logits
        maca_hf.enable(model)
        try:
            first = model(input_ids=ids, attention_mask=block_causal).logits
            model(input_ids=ids, attention_mask=block_causal)
        finally:
            maca_hf.disable(model)
    # the fallback is the stock attention; norms/MLP/rotary are still ours
    torch.testing.assert_close(first, stock, atol=LOGITS_ATOL, rtol=1e-4)
    assert op_calls["varlen_attention"] == 0 and op_calls["rms_norm"] > 0
    fallback_lines = [line for line in maca_log if "stock SDPA attention runs" in line]
    assert len(fallback_lines) == 1, maca_log
    assert "not full, causal or sliding-window" in fallback_lines[0]


@needs_attention_interface
def test_training_dropout_falls_back(load_llm, maca_log):
    model = load_llm("llama")
    query = torch.randn(1, 4, 5, 32)
    key = value = torch.randn(1, 2, 5, 32)
    attention = next(m for m in model.modules() if type(m).__name__ == "LlamaAttention")
    attention.train()
    try:
        torch.manual_seed(0)
        out, _ = transformers_attention.maca_attention_forward(attention, query, key, value, None, dropout=0.5)
    finally:
        attention.eval()
    assert out.shape == (1, 5, 4, 32)
    assert any("dropout=0.5 in training" in line for line in maca_log)


@pytest.mark.skipif(INTERFACE, reason="the attention classes' seam is for transformers < 4.48")
def test_attention_classes_dropout_in_training_falls_back(load_llm, make_batch, op_calls, maca_log):
    """Dropout in training: the attention classes' call goes to torch's SDPA (said once); outside, torch's own."""
    model = load_llm("llama")
    ids, mask = make_batch(model.config.vocab_size, [5], seed=3, device=model.device)
    attentions = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    maca_hf.enable(model)
    try:
        for module in attentions:
            module.attention_dropout = 0.5
        model.train()
        with torch.no_grad():
            _logits(model, ids, mask)
    finally:
        model.eval()
        for module in attentions:
            module.attention_dropout = 0.0
        maca_hf.disable(model)
    assert op_calls["varlen_attention"] == 0 and op_calls["rms_norm"] > 0
    assert any("dropout_p=0.5" in line and "stock SDPA attention runs" in line for line in maca_log), maca_log


def test_versions_are_checked_at_enable(load_llm, monkeypatch):
    from maca_infer.common import versions

    model = load_llm("llama")
    monkeypatch.setitem(versions.SUPPORTED, "transformers", ("<1", "test: nothing installed is supported"))
    with pytest.raises(RuntimeError, match=r"transformers .* is outside the supported range <1"):
        maca_hf.enable(model)
    assert not maca_hf.is_enabled(model) and model.config._attn_implementation == "sdpa"


def test_enable_twice_is_refused(load_llm):
    model = load_llm("llama")
    maca_hf.enable(model)
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            maca_hf.enable(model)
    finally:
        maca_hf.disable(model)


def test_fused_mlp_survives_moving_the_model(load_llm, make_batch):
    """.to() replaces parameter storage; the fused gate|up weight must follow, not go stale."""
    model = load_llm("llama")
    ids, mask = make_batch(model.config.vocab_size, [5], seed=7, device=model.device)
    stock = _logits(model, ids, mask)
    maca_hf.enable(model)
    try:
        model.to(torch.float64).to(torch.float32)  # new storage for every parameter, same values
        torch.testing.assert_close(_logits(model, ids, mask), stock, atol=LOGITS_ATOL, rtol=1e-4)
    finally:
        maca_hf.disable(model)
    assert torch.equal(_logits(model, ids, mask), stock)


def test_device_map_auto_lands_on_the_maca_device(load_llm, make_batch):
    if maca_hf.device().type == "cpu" and _compat.transformers_version().release < (4, 56):
        pytest.skip("transformers < 4.56 places device_map='auto' weights through torch.device(<index>), which "
                    "needs a real accelerator: the emulated maca device cannot serve it")
    from transformers import AutoModelForCausalLM

    from maca_infer.modelzoo import get

    reference = load_llm("llama")
    auto = AutoModelForCausalLM.from_pretrained(get("llama"), **_compat.dtype_kwargs(torch.float32),
                                                device_map="auto").eval()
    devices = {p.device for p in auto.parameters()}
    # on a device host "auto" says cuda:0; the maca device is cuda (index 0)
    assert {(d.type, d.index or 0) for d in devices} == {(maca_hf.device().type, maca_hf.device().index or 0)}
    ids, mask = make_batch(reference.config.vocab_size, [5], seed=10, device=maca_hf.device())
    assert torch.equal(_logits(auto, ids, mask), _logits(reference, ids, mask))


def test_autograd_runs_stock_modules(load_llm, make_batch, op_calls, maca_log):
    """Our kernels are inference-only: with gradients recorded, the stock path runs and gradients flow."""
    model = load_llm("llama")
    ids, mask = make_batch(model.config.vocab_size, [5], seed=12, device=model.device)
    maca_hf.enable(model)
    try:
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    finally:
        maca_hf.disable(model)
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None
    assert sum(op_calls.values()) == 0
    assert any("autograd is recording" in line for line in maca_log)
    model.zero_grad(set_to_none=True)


@needs_experts_interface
def test_experts_implementation_maca_at_load_time(load_llm, make_batch, op_calls):
    maca_hf.register_attention()
    stock = load_llm("mixtral")
    ours = load_llm("mixtral", experts_implementation="maca")
    ids, mask = make_batch(stock.config.vocab_size, [5, 3], seed=13, device=stock.device)
    real = mask.bool()
    torch.testing.assert_close(_logits(ours, ids, mask)[real], _logits(stock, ids, mask)[real], atol=LOGITS_ATOL, rtol=1e-4)
    assert op_calls["fused_moe"] > 0 and op_calls["varlen_attention"] == 0  # experts only
