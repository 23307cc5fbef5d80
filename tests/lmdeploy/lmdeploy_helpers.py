"""Helpers shared by the LMDeploy adapter tests: the HF reference, free ports, servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable

# Logit distance within which two float implementations may legitimately pick
# different tokens (bf16/fp16 weights and activations vs float32 HF). Outside a
# near-tie every token must be HF's argmax.
TIE_TOLERANCE = {"float16": 0.3, "bfloat16": 0.6}

# Mixed lengths; the longest spans several 16-token blocks before generation starts.
PROMPTS = [
    "Hello, how are you",
    "The quick brown fox jumps over the lazy dog and then the cat sat on the mat while the dog slept. " * 2,
    "中国的首都是",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n# Tests\n",
]


def clean_env(**extra: str) -> dict:
    """Environment of a process that runs stock torch on the CPU (no maca-infer device)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACA_INFER_")}
    env["OMP_NUM_THREADS"] = "1"  # the host's 2 cores are shared: spinning threads only slow everyone
    env.update(extra)
    return env


def hf_reference(model_dir: str, prompts: list[str], max_new_tokens: int = 0, check=()) -> dict:
    """Run tests/lmdeploy/hf_reference.py in a clean process and return its JSON."""
    request = {"model": str(model_dir), "prompts": prompts, "max_new_tokens": max_new_tokens,
               "check": [list(map(list, pair)) for pair in check]}
    proc = subprocess.run([PYTHON, os.path.join(HERE, "hf_reference.py")], input=json.dumps(request),
                          capture_output=True, text=True, env=clean_env(), timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"HF reference failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class ParityReport:
    exact_steps: int
    near_tie_steps: int
    total_steps: int
    greedy_prefix: list[int]  # per sequence: tokens equal to HF generate before the first difference


def assert_greedy_parity(model_dir: str, prompts: list[str], prompt_ids: list[list[int]],
                         outputs: list[list[int]], dtype: str) -> ParityReport:
    """Every generated token is HF's float32 greedy choice given the same context, except at
    near-ties (top logits within TIE_TOLERANCE[dtype]); and each output equals HF ``generate``
    token for token up to the first near-tie of HF's own run."""
    tol = TIE_TOLERANCE[dtype]
    n = max(len(o) for o in outputs)
    ref = hf_reference(model_dir, prompts, n, check=list(zip(prompt_ids, outputs)))
    assert ref["prompt_ids"] == prompt_ids, "LMDeploy and HF tokenized the prompts differently"
    exact = ties = total = 0
    prefixes = []
    for b, (rows, out) in enumerate(zip(ref["teacher"], outputs)):
        for i, (chosen, best, best_token) in enumerate(rows):
            total += 1
            if out[i] == best_token:
                exact += 1
                continue
            assert best - chosen <= tol, (
                f"prompt {b} step {i}: LMDeploy picked {out[i]} (logit {chosen:.3f}) but HF's argmax is "
                f"{best_token} (logit {best:.3f}); gap {best - chosen:.3f} > tie tolerance {tol}"
            )
            ties += 1
        greedy, margins = ref["greedy"][b], ref["margins"][b]
        first_tie = next((i for i, m in enumerate(margins) if m < tol), len(margins))
        prefix = next((i for i in range(min(len(out), len(greedy))) if out[i] != greedy[i]), min(len(out), len(greedy)))
        assert prefix >= min(first_tie, len(out)), (
            f"prompt {b}: LMDeploy differs from HF generate at step {prefix}, before HF's first near-tie "
            f"(step {first_tie}); lmdeploy={out[:prefix + 1]} hf={greedy[:prefix + 1]}"
        )
        prefixes.append(prefix)
    assert exact >= 0.9 * total, f"only {exact}/{total} steps were HF's exact argmax"
    return ParityReport(exact, ties, total, prefixes)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{f.read()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    with open(log_path, errors="replace") as f:
        raise TimeoutError(f"server not up after {timeout}s:\n{f.read()[-6000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (uvicorn shuts down cleanly), then SIGKILL the process group if needed."""
    import signal

    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
