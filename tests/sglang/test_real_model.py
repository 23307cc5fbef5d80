"""A real trained model through SGLang on the maca device: SmolLM2-135M-Instruct vs Hugging Face.

``python -m sglang.launch_server --attention-backend maca`` (pages of 16
tokens) on the emulated maca device, serving the model zoo's ``smollm2``:

- the chat answer to "What is the capital of France?";
- greedy ids of prompts of 34-54 tokens (3-4 pages) plus 16 new tokens;
- ``maca-infer eval mmlu`` on tests/data/mmlu_easy: HF's choice for every
  question, hence HF's accuracy.

dtype: float32 (``--dtype float32`` on the bf16 checkpoint), as the HF
reference (tests/hf_real_model.py, shared and cached with the LMDeploy / HF
modules): both compute in float32, so greedy ids must equal HF's exactly
(the smallest top-2 margin in the reference is 0.51, far above float32
rounding).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

pytest.importorskip("sglang")

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def model_dir(smollm2_dir):
    return smollm2_dir


@pytest.fixture(scope="module")
def ref(smollm2_ref):
    return smollm2_ref


@pytest.fixture(scope="module")
def server(model_dir, sglang_launcher, tmp_path_factory):
    with sglang_launcher(model_dir, "--tp", "1", "--attention-backend", "maca", "--page-size", "16",
                         "--dtype", "float32", "--max-running-requests", "4",
                         log_dir=tmp_path_factory.mktemp("sglang-smollm2")) as srv:
        yield srv


def test_server_answers_the_capital_of_france(server, model_dir, ref):
    question = ref["request"]["chats"][0]
    reply = server.post("/v1/chat/completions", {"model": model_dir, "temperature": 0, "max_tokens": 32,
                                                 "messages": [{"role": "user", "content": question}]})
    answer = reply["choices"][0]["message"]["content"]
    assert answer == ref["chat"][0] == "The capital of France is Paris."


def test_generate_ids_equal_hf_greedy(server, ref):
    n = ref["request"]["max_new_tokens"]
    assert all(len(ids) > 2 * 16 for ids in ref["prompt_ids"]), "each prompt must span several pages"
    out = server.post("/generate", {
        "input_ids": ref["prompt_ids"],
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
    })
    assert [o["output_ids"] for o in out] == ref["greedy"]


def test_eval_mmlu_accuracy_equals_hf(server, ref, tmp_path):
    mmlu = ref["request"]["mmlu"]
    out = tmp_path / "mmlu.json"
    proc = subprocess.run([sys.executable, "-m", "maca_infer", "eval", "mmlu", "--url", server.url,
                           "--data-dir", mmlu["data_dir"], "--ntrain", str(mmlu["ntrain"]), "--concurrency", "4",
                           "--output", str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    answers = {json.loads(line)["key"]: json.loads(line)["pred"]
               for line in out.with_name(out.name + ".answers.jsonl").read_text().splitlines() if line.strip()}
    hf = ref["mmlu"]
    assert answers == {k: v["pred"] for k, v in hf["preds"].items()}
    assert summary["n_questions"] == hf["n"] and summary["micro_accuracy"] == hf["accuracy"]
    # the server itself is still healthy after the eval's concurrent requests
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
