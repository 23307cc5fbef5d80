"""bench serving against a scripted streaming server on loopback.

The server streams ``max_tokens`` chunks after a fixed first-token delay and
fixed gaps, reports usage, and fails every request whose prompt contains
"FAIL"; counts and lower bounds on the latencies follow from that script.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from maca_infer.bench import serving

FIRST_DELAY = 0.05
GAP = 0.01


@pytest.fixture()
def server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            data = json.dumps({"data": [{"id": "tiny"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            text = body.get("prompt") or body["messages"][0]["content"]
            if "FAIL" in text:
                data = b'{"error": "scripted"}'
                self.send_response(400)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            time.sleep(FIRST_DELAY)
            n = body["max_tokens"]
            for i in range(n):
                if i:
                    time.sleep(GAP)
                chunk = ({"choices": [{"delta": {"content": f"t{i}"}}]} if "messages" in body
                         else {"choices": [{"text": f"t{i}"}]})
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            usage = {"choices": [], "usage": {"prompt_tokens": len(text.split()), "completion_tokens": n}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def _args(url, *extra):
    p = argparse.ArgumentParser()
    serving.add_arguments(p)
    return p.parse_args(["--url", url, "--no-progress", *extra])


@pytest.mark.parametrize("chat", [False, True])
def test_counts_and_latency_bounds(server, tmp_path, chat):
    url, seen = server
    out = tmp_path / "s.json"
    extra = ["--chat"] if chat else []
    rc = serving.run(_args(url, "--num-prompts", "6", "--input-len", "12", "--output-len", "5",
                           "--max-concurrency", "3", "--json", str(out), *extra))
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 6 and s["errors"] == 0
    assert s["total_output_tokens"] == 30
    assert s["total_input_tokens"] == 72  # usage.prompt_tokens from the server (words)
    assert s["ttft_ms"]["median"] >= FIRST_DELAY * 1000 * 0.9
    assert s["itl_ms"]["median"] >= GAP * 1000 * 0.9
    assert s["tpot_ms"]["mean"] >= GAP * 1000 * 0.9
    assert all(b["temperature"] == 1.0 and b["stream"] for b in seen)


def test_sharegpt_dataset_and_errors_counted(server, tmp_path):
    url, seen = server
    data = [
        {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "a b c"}]},
        {"conversations": [{"from": "human", "value": "please FAIL now"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "s.json"
    rc = serving.run(_args(url, "--dataset", "sharegpt", "--dataset-path", str(path), "--num-prompts", "5",
                           "--json", str(out)))
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["requests"] == 2 and s["completed"] == 1 and s["errors"] == 1
    assert "HTTP 400" in s["error_samples"][0]
    assert s["total_output_tokens"] == 3  # output length taken from the gpt turn (3 words)


def test_bad_arguments_are_clear(server):
    url, _ = server
    with pytest.raises(SystemExit, match="--num-prompts 0: must be > 0"):
        serving.run(_args(url, "--num-prompts", "0"))
    with pytest.raises(SystemExit, match="needs --dataset-path"):
        serving.run(_args(url, "--dataset", "sharegpt"))
