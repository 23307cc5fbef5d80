"""A real trained model through LMDeploy on the maca device: SmolLM2-135M-Instruct vs Hugging Face.

The tiny random models leave near-tied logits where a subtly wrong kernel can
hide; SmolLM2 (``maca-infer make-model smollm2``) is trained, so its greedy
choices have real margins. On the emulated maca device:

- ``pipeline(..., PytorchEngineConfig(device_type="maca"))``: greedy ids of
  prompts of 34-54 tokens (3-4 KV blocks of 16) plus 16 new tokens;
- ``lmdeploy serve api_server --device maca``: the chat answer to "What is
  the capital of France?", greedy ids through ``/generate``, and
  ``maca-infer eval mmlu`` on tests/data/mmlu_easy, whose accuracy (and
  every per-question choice) must be HF's on the same prompts.

dtype: bfloat16, the checkpoint's own (LMDeploy's maca path runs fp16/bf16
only). The reference is HF float32 on the same bf16 weights
(tests/hf_real_model.py, shared and cached with the SGLang / HF modules):
ids must equal HF ``generate`` up to the first step where HF's own top-2
logits lie within the bf16 tie tolerance (lmdeploy_helpers.TIE_TOLERANCE);
the prompts were chosen with clear margins (the smallest, 0.51, at one step
of one prompt; every other step above 1.7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request

import pytest

from lmdeploy_helpers import TIE_TOLERANCE, free_port, stop_process, wait_http

pytestmark = pytest.mark.slow

BF16_TIE = TIE_TOLERANCE["bfloat16"]


@pytest.fixture(scope="module")
def model_dir(smollm2_dir):
    return smollm2_dir


@pytest.fixture(scope="module")
def ref(smollm2_ref):
    return smollm2_ref


def assert_matches_hf(got: list[list[int]], ref: dict, tol: float = BF16_TIE) -> int:
    """Each output equals HF greedy up to a step where HF itself is near-tied; returns the prompts equal in full."""
    full = 0
    for i, (out, want, margins) in enumerate(zip(got, ref["greedy"], ref["margins"])):
        assert len(out) == len(want), f"prompt {i}: {len(out)} tokens, expected {len(want)}"
        diff = next((k for k, (a, b) in enumerate(zip(out, want)) if a != b), None)
        if diff is None:
            full += 1
            continue
        assert margins[diff] < tol, (f"prompt {i} parts from HF at step {diff} where HF's top-2 margin is "
                                     f"{margins[diff]:.2f} (>= {tol}): got {out[:diff + 1]}, HF {want[:diff + 1]}")
    assert full >= len(got) - 1, f"only {full} of {len(got)} prompts equal HF greedy in full"
    return full


def test_pipeline_greedy_matches_hf(model_dir, ref):
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    config = PytorchEngineConfig(device_type="maca", block_size=16, dtype="bfloat16", eager_mode=True,
                                 cache_max_entry_count=0.05, max_batch_size=4)
    pipe = pipeline(model_dir, backend_config=config, log_level="WARNING")
    try:
        n = ref["request"]["max_new_tokens"]
        gen = GenerationConfig(max_new_tokens=n, do_sample=False, top_k=1, ignore_eos=True)
        prompts = ref["request"]["prompts"]
        got = [list(r.token_ids) for r in pipe(prompts, gen_config=gen, do_preprocess=False)]
        prompt_ids = [pipe.async_engine.tokenizer.encode(p, add_bos=True) for p in prompts]
    finally:
        pipe.close()
    assert prompt_ids == ref["prompt_ids"], "LMDeploy and HF tokenized the prompts differently"
    assert all(len(ids) > 2 * 16 for ids in prompt_ids), "each prompt must span several KV blocks"
    assert_matches_hf(got, ref)


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "lmdeploy"), "serve", "api_server", model_dir,
           "--backend", "pytorch", "--device", "maca", "--cache-block-seq-len", "16", "--dtype", "bfloat16",
           "--server-name", "127.0.0.1", "--server-port", str(port), "--log-level", "WARNING",
           "--logprobs-mode", "raw_logprobs"]  # maca-infer eval reads the answer letter from the top-5 logprobs
    env = dict(os.environ, MACA_INFER_DEVICE="emulated", MACA_INFER_EMU_MEMORY_GB="2", OMP_NUM_THREADS="1")
    log = tempfile.NamedTemporaryFile("w+", prefix="lmdeploy-smollm2-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/v1/models", proc, timeout=240, log_path=log.name)
        yield base
    finally:
        stop_process(proc)
        log.close()
        os.unlink(log.name)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_server_answers_the_capital_of_france(server, model_dir, ref):
    question = ref["request"]["chats"][0]
    reply = _post(f"{server}/v1/chat/completions", {"model": model_dir, "temperature": 0, "max_tokens": 32,
                                                     "messages": [{"role": "user", "content": question}]})
    answer = reply["choices"][0]["message"]["content"]
    assert answer == ref["chat"][0] == "The capital of France is Paris."


def test_server_generate_ids_match_hf(server, ref):
    n = ref["request"]["max_new_tokens"]
    got = [_post(f"{server}/generate", {"input_ids": ids, "max_tokens": n, "ignore_eos": True, "temperature": 0,
                                        "top_k": 1})["output_ids"]
           for ids in ref["prompt_ids"]]
    assert_matches_hf(got, ref)


def test_eval_mmlu_accuracy_equals_hf(server, ref, tmp_path):
    mmlu = ref["request"]["mmlu"]
    out = tmp_path / "mmlu.json"
    proc = subprocess.run([sys.executable, "-m", "maca_infer", "eval", "mmlu", "--url", server,
                           "--data-dir", mmlu["data_dir"], "--ntrain", str(mmlu["ntrain"]), "--concurrency", "4",
                           "--output", str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    answers = {json.loads(line)["key"]: json.loads(line)["pred"]
               for line in out.with_name(out.name + ".answers.jsonl").read_text().splitlines() if line.strip()}
    hf = ref["mmlu"]
    assert answers == {k: v["pred"] for k, v in hf["preds"].items()}
    assert summary["n_questions"] == hf["n"] and summary["micro_accuracy"] == hf["accuracy"]
