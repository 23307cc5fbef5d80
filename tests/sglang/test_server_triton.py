"""SGLang servers with every op on our Triton kernels (interpreted), greedy-equal to HF.

The other server tests run the emulated device's default tier, the torch
references. Here the server processes get ``MACA_INFER_OPS_IMPL=triton`` (an
explicit request: a kernel that cannot run raises, it never falls back) and
``TRITON_INTERPRET=1``, with ``MACA_INFER_LOG_LEVEL=debug`` so that the log
names the tier each op ran on. A tiny dense model (Llama) and a tiny MLA + MoE
model (DeepSeek-V2 shape) generate a few greedy tokens for two prompts.
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("sglang")

pytestmark = pytest.mark.slow

MAX_NEW = 4
DENSE_OPS = {"rms_norm", "add_rms_norm", "silu_and_mul", "rotary_embedding",
             "paged_prefill_attention", "paged_decode_attention"}
CASES = {
    "llama": DENSE_OPS,
    "deepseek_v2": {"rms_norm", "add_rms_norm", "silu_and_mul", "rotary_embedding", "fused_moe", "varlen_attention",
                    "mla_decode"},
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_server_on_triton_kernels_matches_hf(kind, sglang_launcher, hf_greedy_fn, tmp_path):
    from transformers import AutoTokenizer

    from maca_infer.modelzoo import get

    model_path = get(kind)
    tok = AutoTokenizer.from_pretrained(str(model_path))
    prompts = [tok(t).input_ids for t in ("Kernels inside models", "a b c d e f g h i j k l m n o p q r s t")]
    # the launcher's usual environment (conftest.server_env) plus the forced tier
    env = {**os.environ, "MACA_INFER_DEVICE": "emulated", "TOKENIZERS_PARALLELISM": "false",
           "MACA_INFER_OPS_IMPL": "triton", "TRITON_INTERPRET": "1", "MACA_INFER_LOG_LEVEL": "debug"}
    env.pop("SGLANG_PLATFORM", None)
    with sglang_launcher(model_path, "--tp", "1", "--attention-backend", "maca", "--max-running-requests", "4",
                         "--dtype", "float32", "--disable-cuda-graph", log_dir=tmp_path, env=env) as server:
        out = server.post("/generate", {
            "input_ids": prompts,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
        })
        log = server.log()
    ran = {}
    for op, impl in re.findall(r"\[maca-infer\] DEBUG (\w+) runs on (\w+)", log):
        ran.setdefault(op, set()).add(impl)
    missing = CASES[kind] - set(ran)
    assert not missing, f"ops that never ran: {missing}; ran: {ran}"
    assert all(impls == {"triton"} for impls in ran.values()), ran
    assert [o["output_ids"] for o in out] == hf_greedy_fn(model_path, prompts, MAX_NEW, dtype="float32")
