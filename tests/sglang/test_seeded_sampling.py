"""SGLang's ``sampling_seed`` (OpenAI ``seed``) on the maca device.

SGLang honours a request's seed only under ``--enable-deterministic-inference``
(without it the seed is dropped on every device). With the flag and
``--attention-backend maca`` the same seeded request gives the same tokens,
other seeds other tokens, and (what the flag promises) a seeded request's
tokens do not depend on the requests batched with it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang")

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MAX_NEW = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory, sglang_launcher):
    from maca_infer.modelzoo import get

    with sglang_launcher(get("llama"), "--tp", "1", "--attention-backend", "maca", "--page-size", "16",
                         "--enable-deterministic-inference", "--max-running-requests", "8",
                         log_dir=tmp_path_factory.mktemp("sglang")) as srv:
        yield srv


def _generate(server, seed, prompt=PROMPT):
    out = server.post("/generate", {"text": prompt, "sampling_params": {
        "max_new_tokens": MAX_NEW, "temperature": 1.0, "ignore_eos": True, "sampling_seed": seed}})
    return out["output_ids"]


def test_same_seed_same_tokens_other_seeds_differ(server):
    first = _generate(server, 1234)
    assert len(first) == MAX_NEW
    assert _generate(server, 1234) == first, "the same seeded request gave different tokens"
    others = [_generate(server, seed) for seed in (1, 2, 3)]
    assert any(o != first for o in others), "every seed gave the same tokens: the seed is not used"


def test_openai_seed_repeats(server):
    import requests

    def complete():
        r = requests.post(server.url + "/v1/completions", json={
            "model": "default", "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 1.0, "seed": 77},
            timeout=120)
        assert r.status_code == 200, r.text[:2000]
        return r.json()["choices"][0]["text"]

    assert complete() == complete()


def test_seeded_request_independent_of_its_batch(server):
    alone = _generate(server, 4321)
    fillers = ["def fibonacci(n):", "One two three four five six seven eight nine ten", "Hi"]
    with ThreadPoolExecutor(len(fillers) + 1) as pool:
        futures = [pool.submit(_generate, server, 100 + i, p) for i, p in enumerate(fillers)]
        batched = pool.submit(_generate, server, 4321)
        for f in futures:
            f.result()
        assert batched.result() == alone
