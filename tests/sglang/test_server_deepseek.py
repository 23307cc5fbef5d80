"""End to end: a DeepSeek-V2-shaped model (MLA + MoE, random weights) on the maca backend.

A ``--tp 1`` server from the tiny checkpoint of the project's model factory:
greedy output of a batch of requests of different lengths must equal Hugging
Face generate; a repeated request runs absorbed MLA extend over the cached
prefix and must give the same tokens. (``--tp 2 --dp 2
--enable-dp-attention`` on this model is in test_dp_attention.py, with the
other architectures.) The server runs in float32, like the DP-attention ones.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang")

pytestmark = pytest.mark.slow

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_path():
    from maca_infer.modelzoo import get

    return get("deepseek_v2")


@pytest.fixture(scope="module")
def prompts(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    texts = ["Deep learning on MetaX GPUs", "MLA", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2]
    return [tok(t).input_ids for t in texts]


def _generate(server, prompts):
    out = server.post("/generate", {
        "input_ids": prompts,
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
    })
    return [o["output_ids"] for o in out], [o["meta_info"]["cached_tokens"] for o in out]


@pytest.fixture(scope="module")
def tp1_outputs(model_path, prompts, sglang_launcher, tmp_path_factory):
    with sglang_launcher(model_path, "--tp", "1", "--attention-backend", "maca", "--max-running-requests", "8",
                         "--dtype", "float32",
                         log_dir=tmp_path_factory.mktemp("sglang")) as server:
        first, _ = _generate(server, prompts)
        again, cached = _generate(server, prompts)
        log = server.log()
    assert "MoE experts run maca_infer fused_moe" in log
    return first, again, cached


def test_tp1_matches_hf_greedy(tp1_outputs, model_path, prompts, hf_greedy_fn):
    first, again, cached = tp1_outputs
    assert first == hf_greedy_fn(model_path, prompts, MAX_NEW, dtype="float32")
    # second round: the prompts are in the radix cache (absorbed MLA extend on a prefix)
    assert all(c > 0 for c in cached)
    assert again == first
