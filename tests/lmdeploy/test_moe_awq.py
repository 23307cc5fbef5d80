"""MoE and AWQ W4A16 tiny models through LMDeploy's maca path.

- qwen2_moe (shared expert) and mixtral: router -> ``dlinfer.ops.moe_gating_topk_softmax``,
  experts -> ``dlinfer.ops.fused_moe`` (maca-infer's fused MoE);
- llama-awq: every linear -> ``dlinfer.ops.weight_quant_matmul`` on AWQ-packed int4,
  compared with Hugging Face float32 on the *dequantized* weights
  (``maca_infer.modelzoo.dequant_kind``), so the only difference is arithmetic.

LMDeploy 0.18 has no AWQ MoE module in its PyTorch engine (an AWQ qwen2_moe
fails to load on every device with KeyError ``...experts.down.qweight``), so
the MoE W4A16 op is covered by its interface test instead.
"""

from __future__ import annotations

import gc

import pytest

from lmdeploy_helpers import PROMPTS, assert_greedy_parity

MAX_NEW_TOKENS = 24


def _generate(kind: str, dtype: str, counters: dict | None = None):
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    from maca_infer.modelzoo import get

    model_dir = str(get(kind))
    pipe = pipeline(model_dir, backend_config=PytorchEngineConfig(
        device_type="maca", block_size=16, dtype=dtype, cache_max_entry_count=0.05, max_batch_size=8),
        log_level="WARNING")
    try:
        gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, top_k=1, ignore_eos=True)
        outputs = [list(r.token_ids) for r in pipe(PROMPTS, gen_config=gen, do_preprocess=False)]
        prompt_ids = [pipe.async_engine.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    finally:
        pipe.close()
        del pipe
        gc.collect()
    return prompt_ids, outputs


class _CallCounter:
    """Counts calls of one dlinfer op (the vendor registry entry LMDeploy's wrappers reach)."""

    def __init__(self, monkeypatch, name: str):
        import dlinfer.ops as ext_ops

        self.calls = 0
        original = getattr(ext_ops, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(ext_ops, name, counted)


@pytest.mark.parametrize("kind,dtype", [("qwen2_moe", "bfloat16"), ("mixtral", "float16")])
def test_moe_model_matches_hf(dlinfer_ours, monkeypatch, kind, dtype):
    from maca_infer.modelzoo import get

    fused_moe_calls = _CallCounter(monkeypatch, "fused_moe")
    prompt_ids, outputs = _generate(kind, dtype)
    assert fused_moe_calls.calls > 0, "the experts did not run through dlinfer.ops.fused_moe"
    report = assert_greedy_parity(str(get(kind)), PROMPTS, prompt_ids, outputs, dtype)
    print(kind, report)


def test_awq_w4a16_model_matches_dequantized_hf(dlinfer_ours, monkeypatch):
    from maca_infer.modelzoo import dequant_kind, get

    w4a16_calls = _CallCounter(monkeypatch, "weight_quant_matmul")
    prompt_ids, outputs = _generate("llama-awq", "float16")
    assert w4a16_calls.calls > 0, "the AWQ linears did not run through dlinfer.ops.weight_quant_matmul"
    report = assert_greedy_parity(str(get(dequant_kind("llama-awq"))), PROMPTS, prompt_ids, outputs, "float16")
    print("llama-awq", report)
