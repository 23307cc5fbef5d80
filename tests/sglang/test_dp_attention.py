"""End to end: DP attention (``--tp 2 --dp 2 --enable-dp-attention``) on every architecture family.

With DP attention each rank runs attention on its own share of the batch; a
rank with no request runs an IDLE batch of **zero tokens** through the whole
model (norms, rotary, attention, MLP/MoE) and then joins the MLP collectives.
A single request therefore always leaves one rank idle; 8 concurrent requests
keep both busy with different batch shapes.

For each model family whose SGLang implementation supports DP attention
(dense Qwen3 with one-token pages, Qwen2-MoE, DeepSeek-V2 with MLA) the tp 1
server's greedy answers are the reference; the DP-attention server must
return exactly the same tokens for the single request and for the 8
concurrent ones. The dense model also runs as two "nodes" (two processes,
``--nnodes 2 --node-rank 0/1``, gloo over loopback), MetaX's multi-node
launch scaled down to one host.

SGLang 0.5.x's Llama, Qwen2 and Mixtral split attention heads over the whole
``--tp`` group, so DP attention cannot be right for them on any device: the
maca backend refuses them at start-up with the reason (before the first
request), which the last test checks.

The servers run in float32: tensor parallelism splits the o_proj / MLP
reductions across ranks, and in half precision that reordering alone flips
near-tied greedy picks of a random-weight model, which would test rounding,
not the backend. Every wait is bounded (server start, each request, the
whole module); on failure the message carries the tail of every rank's log.
"""

from __future__ import annotations

import concurrent.futures
import pytest
import requests

pytest.importorskip("sglang")

from maca_infer.adapters.sglang import compat  # noqa: E402

if not compat.has("emulated_dp_attention"):  # the platform refuses it there (test_platform checks the refusal)
    pytest.skip(f"SGLang {compat.sglang_version()}: DP attention on the emulated device needs SGLang >= "
                f"{compat.FEATURES['emulated_dp_attention'][0]}", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_NEW = 8
REQUEST_TIMEOUT_S = 120
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Hi",
    "One two three four five six seven eight nine ten eleven twelve thirteen",
    "MetaX C500",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "Deep learning on MetaX GPUs",
    "MLA",
]

# kind -> extra server flags (qwen3 keeps SGLang's default one-token pages)
MODELS = {
    "qwen3": (),
    "qwen2_moe": ("--page-size", "16"),
    "deepseek_v2": (),
}
DENSE = "qwen3"
# SGLang models written for plain TP only
NO_DP_ATTENTION = ("llama", "qwen2", "mixtral")
COMMON = ("--attention-backend", "maca", "--dtype", "float32", "--max-running-requests", "8")
DP_ATTENTION = ("--tp", "2", "--dp", "2", "--enable-dp-attention")


def _generate_one(server, ids: list[int]) -> list[int]:
    return server.post("/generate", {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
    }, timeout=REQUEST_TIMEOUT_S)["output_ids"]


def _single_then_concurrent(server, prompts: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """One request alone (one DP rank idle), then all prompts as concurrent requests."""
    single = _generate_one(server, prompts[0])
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        concurrent_out = list(pool.map(lambda ids: _generate_one(server, ids), prompts))
    return single, concurrent_out


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def model_path(kind):
    from maca_infer.modelzoo import get

    return get(kind)


@pytest.fixture(scope="module")
def prompts(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    return [tok(t).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def tp1_answers(kind, model_path, prompts, sglang_launcher, tmp_path_factory):
    with sglang_launcher(model_path, "--tp", "1", *COMMON, *MODELS[kind],
                         log_dir=tmp_path_factory.mktemp("sglang")) as server:
        return [_generate_one(server, ids) for ids in prompts]


def test_dp_attention_matches_tp1(kind, model_path, prompts, tp1_answers, sglang_launcher, tmp_path_factory):
    with sglang_launcher(model_path, *DP_ATTENTION, *COMMON, *MODELS[kind],
                         log_dir=tmp_path_factory.mktemp("sglang")) as server:
        try:
            single, concurrent_out = _single_then_concurrent(server, prompts)
        except (AssertionError, requests.RequestException) as exc:
            pytest.fail(f"{kind}: DP-attention server failed a request: {exc}\n{server.all_logs(8000)}")
        log = server.log()
    assert "DP1 TP1" in log, "the second DP rank never ran"
    assert single == tp1_answers[0], f"{kind}: single request (one rank idle) differs from tp 1"
    assert concurrent_out == tp1_answers, f"{kind}: concurrent requests differ from tp 1"


# --- two "nodes" on one host ------------------------------------------------------------------------------------

def test_two_nodes_dp_attention_matches_tp1(kind, model_path, prompts, tp1_answers, sglang_launcher, tmp_path):
    """``--nnodes 2 --node-rank 0/1 --dist-init-addr 127.0.0.1:PORT``: one rank per node, gloo over loopback."""
    if kind != DENSE:
        pytest.skip(f"the multi-node launch runs once, on the dense {DENSE}")
    with sglang_launcher(model_path, *DP_ATTENTION, *COMMON, *MODELS[kind], log_dir=tmp_path, nnodes=2) as server:
        try:
            single, concurrent_out = _single_then_concurrent(server, prompts)
        except (AssertionError, requests.RequestException) as exc:
            pytest.fail(f"two-node DP-attention server failed a request: {exc}\n{server.all_logs()}")
    assert single == tp1_answers[0]
    assert concurrent_out == tp1_answers


# --- models SGLang cannot run with DP attention --------------------------------------------------------------------

@pytest.mark.parametrize("plain_tp_kind", NO_DP_ATTENTION)
def test_plain_tp_models_are_refused_with_the_reason(plain_tp_kind, sglang_expect_failure, tmp_path):
    from maca_infer.modelzoo import get

    log = sglang_expect_failure(get(plain_tp_kind), *DP_ATTENTION, *COMMON, log_dir=tmp_path,
                                until="does not support DP attention")
    assert "Serve it without --enable-dp-attention" in log
