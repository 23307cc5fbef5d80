"""End to end: a DeepSeek-V3-shaped model (MLA, MoE with noaux_tc routing) on the maca backend.

The tiny ``deepseek_v3`` zoo checkpoint (sigmoid router with
``e_score_correction_bias``, 4 expert groups, routed_scaling_factor 2.5): the
router runs ``ops.moe_grouped_topk`` through the TopK OOT forward, the experts
``ops.fused_moe``, and greedy output equals Hugging Face generate.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang")

pytestmark = pytest.mark.slow

MAX_NEW = 6


def test_deepseek_v3_matches_hf_greedy(sglang_launcher, hf_greedy_fn, tmp_path):
    from transformers import AutoTokenizer

    from maca_infer.modelzoo import get

    model_path = get("deepseek_v3")
    tok = AutoTokenizer.from_pretrained(str(model_path))
    prompts = [tok(t).input_ids for t in ("DeepSeek-V3 routing", "a b c d e f g h i j k l m n o p q r s t u v w")]
    with sglang_launcher(model_path, "--tp", "1", "--attention-backend", "maca", "--max-running-requests", "4",
                         "--dtype", "float32", log_dir=tmp_path) as server:
        out = server.post("/generate", {
            "input_ids": prompts,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
        })
        log = server.log()
    assert "MoE noaux_tc routing runs maca_infer moe_grouped_topk" in log
    assert "MoE experts run maca_infer fused_moe" in log
    assert [o["output_ids"] for o in out] == hf_greedy_fn(model_path, prompts, MAX_NEW, dtype="float32")
