"""``lmdeploy serve api_server ... --backend pytorch --device maca`` end to end.

One server per module (the issue's exact command line, loopback only, a free
port, emulated maca device), reused by every test here and stopped at the end.
Checks: the OpenAI endpoints stream and not; greedy ids equal Hugging Face;
32 concurrent streams equal their sequential outputs; malformed requests get
a 4xx with a clear message and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request

import pytest

from lmdeploy_helpers import (
    PROMPTS,
    api_server_command,
    assert_greedy_parity,
    free_port,
    server_env,
    stop_process,
    wait_http,
)

pytestmark = pytest.mark.slow

SESSION_LEN = 320


@pytest.fixture(scope="module")
def server():
    from maca_infer.modelzoo import get

    model_dir = str(get("llama"))
    port = free_port()
    cmd = api_server_command(model_dir, port, "--session-len", str(SESSION_LEN), "--max-batch-size", "32")
    log = tempfile.NamedTemporaryFile("w+", prefix="lmdeploy-maca-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/v1/models", proc, timeout=240, log_path=log.name)
        yield {"base": base, "model": model_dir, "log": log.name, "proc": proc}
    finally:
        stop_process(proc)
        log.close()
        with open(log.name, errors="replace") as f:
            tail = f.read()[-3000:]
        os.unlink(log.name)
        assert proc.returncode is not None, "server did not stop"
        print(f"server stopped (rc={proc.returncode}); log tail:\n{tail}")


def post(server, path: str, body, *, raw: bool = False, timeout: float = 120):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(server["base"] + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stream_chunks(server, path: str, body, timeout: float = 180) -> list[dict]:
    req = urllib.request.Request(server["base"] + path, data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.status == 200
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            chunks.append(json.loads(payload))
    return chunks


GREEDY = {"temperature": 0, "top_k": 1}


def _assert_same_stream_text(streamed: str, full: str) -> None:
    """Streamed text equals the non-streamed text, except around an incomplete UTF-8
    sequence (U+FFFD): LMDeploy 0.18's detokenizers then hold back the text after it
    differently in the two modes (seen in both directions). That is upstream text
    handling, independent of the device; token ids are compared exactly elsewhere."""
    assert streamed and full, (streamed, full)
    if streamed != full:
        shorter, longer = sorted((streamed, full), key=len)
        assert longer.startswith(shorter) and "\ufffd" in longer, (streamed, full)


def generate_ids(server, prompt: str, max_tokens: int, *, stream: bool = False) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **GREEDY}
    if not stream:
        status, text = post(server, "/generate", body)
        assert status == 200, text
        return json.loads(text)["output_ids"]
    return [t for chunk in stream_chunks(server, "/generate", body) for t in chunk["output_ids"]]


def test_server_reports_emulated_device(server):
    with urllib.request.urlopen(server["base"] + "/v1/models", timeout=30) as r:
        models = json.loads(r.read())
    assert models["data"][0]["id"] == server["model"]
    with open(server["log"], errors="replace") as f:
        assert "EMULATED" in f.read(), "the server must say loudly that the maca device is emulated"


def test_generate_ids_match_hf(server):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server["model"])
    prompts = PROMPTS[:3]
    prompt_ids = [tok(p).input_ids for p in prompts]
    outputs = []
    for ids in prompt_ids:
        status, body = post(server, "/generate", {"input_ids": ids, "max_tokens": 32, "ignore_eos": True, **GREEDY})
        assert status == 200, body
        outputs.append(json.loads(body)["output_ids"])
    assert all(len(o) == 32 for o in outputs)
    report = assert_greedy_parity(server["model"], prompts, prompt_ids, outputs, "float16")
    print(report)


def test_completions_stream_and_not(server):
    body = {"model": server["model"], "prompt": PROMPTS[1], "max_tokens": 24, "ignore_eos": True, **GREEDY}
    status, text = post(server, "/v1/completions", body)
    assert status == 200, text
    full = json.loads(text)
    assert full["choices"][0]["finish_reason"] == "length"
    assert full["usage"]["completion_tokens"] == 24
    chunks = stream_chunks(server, "/v1/completions", body)
    streamed = "".join(c["choices"][0].get("text") or "" for c in chunks)
    _assert_same_stream_text(streamed, full["choices"][0]["text"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completions_stream_and_not(server):
    body = {"model": server["model"], "messages": [{"role": "user", "content": "Tell me about the maca device."}],
            "max_tokens": 20, "ignore_eos": True, **GREEDY}
    status, text = post(server, "/v1/chat/completions", body)
    assert status == 200, text
    full = json.loads(text)
    content = full["choices"][0]["message"]["content"]
    assert content and full["usage"]["completion_tokens"] == 20
    chunks = stream_chunks(server, "/v1/chat/completions", body)
    streamed = "".join((c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks if c.get("choices"))
    _assert_same_stream_text(streamed, content)


def test_32_concurrent_streams_equal_sequential(server):
    """32 streaming requests at once (8 prompts of mixed lengths, 4 streams each): every
    stream's token ids equal that prompt's sequential greedy ids."""
    prompts = [f"Request number {i}: " + PROMPTS[i % len(PROMPTS)][: 20 + 9 * i] for i in range(8)]
    sequential = {p: generate_ids(server, p, 12) for p in prompts}

    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = generate_ids(server, prompts[i % 8], 12, stream=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    assert len(results) == 32
    for i, ids in results.items():
        assert ids == sequential[prompts[i % 8]], f"stream {i} differs from its sequential output"


@pytest.mark.parametrize(
    "path,body,raw,expect",
    [
        ("/v1/completions", b'{"model": "m", "prompt": "hi"', True, "JSON"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, False, "max_new_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, False,
         "max_tokens"),
        ("/v1/completions", {"prompt": "hello world " * SESSION_LEN, "max_tokens": 4}, False, "context length"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello world " * SESSION_LEN}],
                                  "max_tokens": 4}, False, "context length"),
    ],
    ids=["bad-json", "negative-max-tokens", "chat-negative-max-tokens", "prompt-too-long", "chat-prompt-too-long"],
)
def test_malformed_requests_get_4xx_and_server_keeps_serving(server, path, body, raw, expect):
    if not raw:
        body = dict(body, model=server["model"])
    status, text = post(server, path, body, raw=raw)
    assert 400 <= status < 500, (status, text)
    assert expect.lower() in text.lower(), text
    ok_status, ok_text = post(server, "/v1/completions",
                              {"model": server["model"], "prompt": "still there?", "max_tokens": 3, **GREEDY})
    assert ok_status == 200, ok_text
