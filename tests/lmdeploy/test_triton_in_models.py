"""LMDeploy's pipeline with every op on our Triton kernels (interpreted), greedy-equal to HF.

The other pipeline tests run the emulated device's default tier, the torch
references. Here a fresh process sets ``MACA_INFER_OPS_IMPL=triton`` (an
explicit request: a kernel that cannot run raises, it never falls back) and
``TRITON_INTERPRET=1`` before anything imports triton, runs a tiny dense and
a tiny MoE model (DeepSeek-V2 shape: shared experts, MLA projections) for a
few greedy tokens, and reports which implementation each op last used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lmdeploy_helpers import PROMPTS, assert_greedy_parity, clean_env

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 6
PIPELINE = textwrap.dedent(
    """
    import json, sys
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
    from maca_infer.common.ops import _dispatch
    from maca_infer.modelzoo import get

    kind, prompts, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model_dir = str(get(kind))
    config = PytorchEngineConfig(device_type="maca", block_size=16, dtype="float16", eager_mode=True,
                                 cache_max_entry_count=0.05, max_batch_size=4)
    pipe = pipeline(model_dir, backend_config=config, log_level="WARNING")
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, top_k=1, ignore_eos=True)
    outputs = [list(r.token_ids) for r in pipe(prompts, gen_config=gen, do_preprocess=False)]
    prompt_ids = [pipe.async_engine.tokenizer.encode(p, add_bos=True) for p in prompts]
    pipe.close()
    print(json.dumps({"model_dir": model_dir, "outputs": outputs, "prompt_ids": prompt_ids,
                      "impl": dict(_dispatch._last)}))
    """
)
DENSE_OPS = {"rms_norm", "add_rms_norm", "apply_rotary", "silu_and_mul", "fill_kv_cache", "varlen_attention",
             "paged_decode_attention"}


@pytest.mark.parametrize("kind,model_ops", [("llama", set()), ("deepseek_v2", {"moe_topk_softmax", "fused_moe"})])
def test_pipeline_on_triton_kernels_matches_hf(kind, model_ops):
    prompts = PROMPTS[:2]
    env = clean_env(TRITON_INTERPRET="1", MACA_INFER_OPS_IMPL="triton", MACA_INFER_DLINFER="ours")
    if "MACA_INFER_MODEL_CACHE" in os.environ:
        env["MACA_INFER_MODEL_CACHE"] = os.environ["MACA_INFER_MODEL_CACHE"]
    proc = subprocess.run([sys.executable, "-c", PIPELINE, kind, json.dumps(prompts), str(MAX_NEW_TOKENS)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert DENSE_OPS | model_ops <= set(run["impl"]), f"ops that never ran: {DENSE_OPS | model_ops - set(run['impl'])}"
    assert run["impl"] == {op: "triton" for op in run["impl"]}, run["impl"]
    assert all(len(o) == MAX_NEW_TOKENS for o in run["outputs"])
    report = assert_greedy_parity(run["model_dir"], prompts, run["prompt_ids"], run["outputs"], "float16")
    print(f"{kind} on triton kernels: {report}")
