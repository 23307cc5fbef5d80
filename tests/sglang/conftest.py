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
from dataclasses import dataclass, field
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
    process: subprocess.Popen | None
    log_path: Path
    node_log_paths: list[Path] = field(default_factory=list)

    def log(self) -> str:
        """Node 0's log (the whole server when there is one node)."""
        return self.log_path.read_text(errors="replace")

    def all_logs(self, chars: int = 6000) -> str:
        """The tail of every node's log, for failure messages."""
        return _logs_tail(self.node_log_paths or [self.log_path], chars)

    def post(self, path: str, payload: dict, timeout: float = 120) -> dict:
        r = requests.post(self.url + path, json=payload, timeout=timeout)
        assert r.status_code == 200, f"{path} -> {r.status_code}: {r.text[:2000]}"
        return r.json()


def server_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(MACA_INFER_DEVICE="emulated", TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("SGLANG_PLATFORM", None)
    return env


def _server_cmd(model: str | Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1", *args]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left (scheduler / detokenizer children too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=8)  # SGLang then lingers up to 60 s for crash diagnostics
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_line(proc: subprocess.Popen, log_path: Path, line: str, all_logs: list[Path]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while line not in log_path.read_text(errors="replace"):
        if proc.poll() is not None:
            pytest.fail(f"{log_path.name}: exited with {proc.returncode} before {line!r}:\n{_logs_tail(all_logs)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{log_path.name}: no {line!r} after {STARTUP_TIMEOUT_S}s:\n{_logs_tail(all_logs)}")
        time.sleep(1)


def _logs_tail(paths: list[Path], chars: int = 6000) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-chars:]}" for p in paths if p.exists())


@contextlib.contextmanager
def launch_server(model: str | Path, *args: str, log_dir: Path, env: dict | None = None, nnodes: int = 1):
    """Start one server (``nnodes == 1``) or one process per node on this host (``--nnodes N --node-rank i``).

    Multi-node: node 0 serves HTTP; every node gets ``--dist-init-addr`` on
    loopback and ``GLOO_SOCKET_IFNAME=lo``. The run fails (with every node's
    log) as soon as any node exits, and all nodes are stopped on exit.
    """
    port = free_port()
    env = dict(env or server_env())
    cmd = _server_cmd(model, *args)
    if nnodes > 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        cmd += ["--nnodes", str(nnodes), "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    log_paths = [log_dir / (f"sglang-{port}.log" if nnodes == 1 else f"sglang-{port}-node{rank}.log")
                 for rank in range(nnodes)]
    procs: list[subprocess.Popen] = []
    server = Server(f"http://127.0.0.1:{port}", None, log_paths[0], log_paths)
    try:
        # Every node derives the same ZMQ port block from --dist-init-addr and checks that it is free
        # (PortArgs.init_new, logged right after as "server_args="); only node 0 binds it. On separate
        # hosts that never collides; on one host the other nodes must pass their check before node 0
        # binds, so they start first (highest rank first) and node 0 starts once they are past it.
        for rank in reversed(range(nnodes)):
            # nodes > 0 answer health checks on their own --port: one host needs one port per node
            node_cmd = cmd + ["--port", str(port if rank == 0 else free_port())]
            node_cmd += ["--node-rank", str(rank)] if nnodes > 1 else []
            with open(log_paths[rank], "wb") as log:
                procs.insert(0, subprocess.Popen(node_cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True))
            if rank > 0:
                _wait_for_line(procs[0], log_paths[rank], "server_args=", log_paths)
        server.process = procs[0]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            for rank, proc in enumerate(procs):
                if proc.poll() is not None:
                    pytest.fail(f"sglang node {rank} exited with {proc.returncode}:\n{_logs_tail(log_paths)}")
            try:
                if requests.get(server.url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sglang server not healthy after {STARTUP_TIMEOUT_S}s:\n{_logs_tail(log_paths)}")
            time.sleep(2)
        yield server
    finally:
        for proc in procs:
            _stop(proc)


def expect_failure(model: str | Path, *args: str, log_dir: Path, until: str, timeout: float = STARTUP_TIMEOUT_S) -> str:
    """Start a server that must fail: wait until ``until`` shows in its log, stop it, return the log.

    (SGLang lingers about a minute after a scheduler crash for diagnostics: the
    test does not wait for that.)
    """
    port = free_port()
    log_path = log_dir / f"sglang-{port}-expected-failure.log"
    cmd = _server_cmd(model, "--port", str(port), *args)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while until not in log_path.read_text(errors="replace"):
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    pytest.fail(f"the server came up, expected it to fail with {until!r}:\n{_logs_tail([log_path])}")
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no {until!r} after {timeout}s:\n{_logs_tail([log_path])}")
            time.sleep(1)
        text = log_path.read_text(errors="replace")
        assert until in text, f"server exited with {proc.returncode} without {until!r}:\n{text[-6000:]}"
        return text
    finally:
        _stop(proc)


def hf_greedy(model_path, prompts_ids: list[list[int]], max_new_tokens: int, dtype="bfloat16") -> list[list[int]]:
    """Hugging Face generate, greedy, one prompt at a time (no padding effects)."""
    return [tokens for tokens, _ in hf_greedy_with_logits(model_path, prompts_ids, max_new_tokens, dtype)]


def hf_greedy_with_logits(model_path, prompts_ids: list[list[int]], max_new_tokens: int, dtype="float32"):
    """Hugging Face greedy tokens and each step's next-token logits ``[steps, vocab]`` (for ``check_greedy_agreement``)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype))
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompts_ids:
            inp = torch.tensor([ids])
            gen = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                                 do_sample=False, min_new_tokens=max_new_tokens, output_scores=True,
                                 return_dict_in_generate=True)
            logits = torch.stack([step[0] for step in gen.scores]).float()
            outs.append((gen.sequences[0, len(ids):].tolist(), logits))
    return outs


@pytest.fixture(scope="session")
def hf_greedy_with_logits_fn():
    return hf_greedy_with_logits


@pytest.fixture(scope="session")
def sglang_launcher():
    """``launch_server`` as a fixture (test modules never import conftest)."""
    return launch_server


@pytest.fixture(scope="session")
def sglang_expect_failure():
    """``expect_failure`` as a fixture."""
    return expect_failure


@pytest.fixture(scope="session")
def hf_greedy_fn():
    return hf_greedy


@pytest.fixture
def default_server_config():
    """SGLang's default server config published in this process, as a server's would be, undone after.

    SGLang 0.5.17's layer constructors (RotaryEmbedding, SiluAndMul) read the
    published config; a bare test there publishes the defaults of its ServerArgs
    dataclass (no model, so ServerArgs' own resolution is not run). Later
    releases (ServerArgs a msgspec Struct) build these layers with nothing
    published: nothing is done there.
    """
    import dataclasses

    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    if not dataclasses.is_dataclass(ServerArgs):
        yield None
        return
    ctx = runtime_context._CONTEXT
    saved = {name: getattr(ctx, name) for name in type(ctx).__slots__ if hasattr(ctx, name)}
    saved_parallel = ctx.parallel._config
    args = object.__new__(ServerArgs)  # a dataclass there
    for f in dataclasses.fields(ServerArgs):
        if f.default is not dataclasses.MISSING:
            setattr(args, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(args, f.name, f.default_factory())
        else:
            setattr(args, f.name, None)
    runtime_context.publish(args, role="test")
    try:
        yield args
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        ctx.parallel._config = saved_parallel
