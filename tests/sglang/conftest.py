"""Shared pieces of the SGLang adapter tests: launching a bounded, loopback server.

``launch_server(model, *args)`` starts ``python -m sglang.launch_server`` on
127.0.0.1 and a free port, on the emulated maca device
(``MACA_INFER_DEVICE=emulated``), in its own process group; it waits for
``/health`` and always kills the whole group on exit (servers never outlive a
test module).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from maca_infer.common.device import deactivate, emulation

# SGLang decides "CUDA or not" once, at import (is_cuda() is cached): in this
# test process it must see stock torch. A torch.cuda emulation left installed
# by an earlier test module (or by MACA_INFER_DEVICE=emulated in the CI env)
# would make SGLang import sgl_kernel. Servers get their own processes.
if emulation.is_installed():
    deactivate()

STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, payload: dict, timeout: float = 120) -> dict:
        r = requests.post(self.url + path, json=payload, timeout=timeout)
        assert r.status_code == 200, f"{path} -> {r.status_code}: {r.text[:2000]}"
        return r.json()


def server_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(MACA_INFER_DEVICE="emulated", TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("SGLANG_PLATFORM", None)
    return env


@contextlib.contextmanager
def launch_server(model: str | Path, *args: str, log_dir: Path, env: dict | None = None):
    port = free_port()
    log_path = log_dir / f"sglang-{port}.log"
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1",
           "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or server_env(),
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sglang server exited with {proc.returncode}:\n{server.log()[-6000:]}")
            try:
                if requests.get(server.url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sglang server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log()[-6000:]}")
            time.sleep(2)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=8)  # SGLang then lingers up to 60 s for crash diagnostics
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # scheduler / detokenizer children share the group: make sure none is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def hf_greedy(model_path, prompts_ids: list[list[int]], max_new_tokens: int, dtype="bfloat16") -> list[list[int]]:
    """Hugging Face generate, greedy, one prompt at a time (no padding effects)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype))
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompts_ids:
            inp = torch.tensor([ids])
            gen = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                                 do_sample=False, min_new_tokens=max_new_tokens)
            outs.append(gen[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="session")
def sglang_launcher():
    """``launch_server`` as a fixture (test modules never import conftest)."""
    return launch_server


@pytest.fixture(scope="session")
def hf_greedy_fn():
    return hf_greedy
