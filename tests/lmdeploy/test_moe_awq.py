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

import pytest

from lmdeploy_helpers import PROMPTS, OpCallCounter, assert_greedy_parity, pipeline_greedy

MAX_NEW_TOKENS = 24


@pytest.mark.parametrize("kind,dtype", [("qwen2_moe", "bfloat16"), ("mixtral", "float16")])
def test_moe_model_matches_hf(dlinfer_ours, monkeypatch, kind, dtype):
    from maca_infer.modelzoo import get

    counter = OpCallCounter(monkeypatch, ["fused_moe"])
    prompt_ids, outputs = pipeline_greedy(str(get(kind)), PROMPTS, MAX_NEW_TOKENS, dtype)
    assert counter.calls["fused_moe"] > 0, "the experts did not run through dlinfer.ops.fused_moe"
    report = assert_greedy_parity(str(get(kind)), PROMPTS, prompt_ids, outputs, dtype)
    print(kind, report)


def test_awq_w4a16_model_matches_dequantized_hf(dlinfer_ours, monkeypatch):
    from maca_infer.modelzoo import dequant_kind, get

    counter = OpCallCounter(monkeypatch, ["weight_quant_matmul"])
    prompt_ids, outputs = pipeline_greedy(str(get("llama-awq")), PROMPTS, MAX_NEW_TOKENS, "float16")
    assert counter.calls["weight_quant_matmul"] > 0, "the AWQ linears did not run through dlinfer.ops.weight_quant_matmul"
    report = assert_greedy_parity(str(get(dequant_kind("llama-awq"))), PROMPTS, prompt_ids, outputs, "float16")
    print("llama-awq", report)
