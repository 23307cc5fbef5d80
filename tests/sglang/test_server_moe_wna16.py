"""End to end: `--quantization moe_wna16` (AWQ / GPTQ int4 MoE) through our W4A16 kernels.

The project's tiny int4 checkpoints (group 32) are served with
``--quantization moe_wna16 --attention-backend maca``:

- ``qwen2_moe-awq``: AWQ with zero points; experts through
  ``fused_moe_w4a16``, attention and shared expert through ``w4a16_linear``;
- ``mixtral-gptq``: GPTQ v1, symmetric; SGLang builds Mixtral's quantized
  variant (per-expert linears), so every layer runs ``w4a16_linear``.

The reference is each checkpoint's float twin (``modelzoo.dequant_kind``: the
exact dequantized weights) through Hugging Face generate in float32: our
kernels dequantize exactly, so the greedy tokens must be equal (a bf16 HF run
rounds the dequantized weights and flips one near-tie of the GPTQ model).
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang")

pytestmark = pytest.mark.slow

MAX_NEW = 8
PROMPTS = [[17, 300, 45, 99, 1000, 23, 7], [5, 6], list(range(100, 130))]


@pytest.mark.parametrize("kind,expected_log", [
    ("qwen2_moe-awq", ["experts run maca_infer W4A16 fused MoE", "AWQ linear layers run maca_infer w4a16_linear"]),
    ("mixtral-gptq", ["GPTQ linear layers run maca_infer w4a16_linear"]),
])
def test_int4_moe_matches_dequantized_hf(kind, expected_log, sglang_launcher, hf_greedy_fn, tmp_path_factory):
    from maca_infer.modelzoo import dequant_kind, get

    with sglang_launcher(get(kind), "--quantization", "moe_wna16", "--attention-backend", "maca",
                         "--max-running-requests", "8", log_dir=tmp_path_factory.mktemp("sglang")) as server:
        out = server.post("/generate", {
            "input_ids": PROMPTS,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
        })
        log = server.log()
    got = [o["output_ids"] for o in out]
    for line in expected_log:
        assert f"moe_wna16: {line}" in log
    assert got == hf_greedy_fn(get(dequant_kind(kind)), PROMPTS, MAX_NEW, dtype="float32")
