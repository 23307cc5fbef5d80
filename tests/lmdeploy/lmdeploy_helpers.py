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

# A run may part from HF's float32 greedy run only where HF itself was
# undecided: at the first differing step, HF's own top-1 minus top-2 logit
# (float32, on the same prefix: the runs agreed up to there) is below this, and
# the run's token is within it of HF's top. About 2-3x the logit error of
# fp16/bf16 runs of the tiny models; nothing after the first difference counts.
TIE_TOLERANCE = {"float16": 0.15, "bfloat16": 0.4}

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


def hf_reference(model_dir: str, prompts: list[str], max_new_tokens: int = 0, check=(),
                 act_quant: str | None = None) -> dict:
    """Run tests/lmdeploy/hf_reference.py in a clean process and return its JSON
    (``act_quant="int8_per_token"``: a W8A8 reference, see that script)."""
    request = {"model": str(model_dir), "prompts": prompts, "max_new_tokens": max_new_tokens,
               "check": [list(map(list, pair)) for pair in check], "act_quant": act_quant}
    proc = subprocess.run([PYTHON, os.path.join(HERE, "hf_reference.py")], input=json.dumps(request),
                          capture_output=True, text=True, env=clean_env(), timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"HF reference failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class ParityReport:
    compared_steps: int  # steps compared over all sequences (each up to its first difference, inclusive)
    total_steps: int
    greedy_prefix: list[int]  # per sequence: tokens equal to HF generate before the first difference
    excused: list[str]  # the differences allowed at HF's own near-ties: "prompt b step t margin m"


def assert_greedy_parity(model_dir: str, prompts: list[str], prompt_ids: list[list[int]],
                         outputs: list[list[int]], dtype: str, act_quant: str | None = None,
                         tie_tolerance: float | None = None) -> ParityReport:
    """Each output equals HF float32 ``generate`` token for token up to its first difference, and
    that difference is excused only where HF's own top-2 margin at that step (float32, same prefix)
    is below TIE_TOLERANCE[dtype] and the output's token is within that distance of HF's top logit.
    Nothing after the first difference is compared (the prefixes differ from there on).
    ``tie_tolerance`` replaces TIE_TOLERANCE[dtype] where the model's own arithmetic is noisier."""
    tol = TIE_TOLERANCE[dtype] if tie_tolerance is None else tie_tolerance
    n = max(len(o) for o in outputs)
    ref = hf_reference(model_dir, prompts, n, check=list(zip(prompt_ids, outputs)), act_quant=act_quant)
    assert ref["prompt_ids"] == prompt_ids, "LMDeploy and HF tokenized the prompts differently"
    compared = total = 0
    prefixes, excused = [], []
    for b, out in enumerate(outputs):
        greedy, margins, teacher = ref["greedy"][b], ref["margins"][b], ref["teacher"][b]
        steps = min(len(out), len(greedy))
        total += steps
        prefix = next((i for i in range(steps) if out[i] != greedy[i]), steps)
        prefixes.append(prefix)
        compared += min(prefix + 1, steps)
        if prefix == steps:
            continue
        chosen, best, _ = teacher[prefix]  # HF's logits at the shared prefix, from the teacher-forced pass
        margin = margins[prefix]
        assert margin < tol and best - chosen < tol, (
            f"prompt {b} step {prefix}: LMDeploy picked {out[prefix]} but HF's greedy token is {greedy[prefix]}; "
            f"HF was decided there (its float32 top-2 margin {margin:.3f}, LMDeploy's token {best - chosen:.3f} "
            f"below the top; tie tolerance {tol}); lmdeploy={out[:prefix + 1]} hf={greedy[:prefix + 1]}"
        )
        excused.append(f"prompt {b} step {prefix} margin {margin:.3f}")
    return ParityReport(compared, total, prefixes, excused)


def pipeline_greedy(model_dir: str, prompts: list[str], max_new_tokens: int, dtype: str,
                    **engine_kwargs) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, greedy ids) from ``lmdeploy.pipeline`` on the maca device (eos ignored, no chat template)."""
    import gc

    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    config = dict(device_type="maca", block_size=16, dtype=dtype, cache_max_entry_count=0.05, max_batch_size=8)
    config.update(engine_kwargs)
    pipe = pipeline(model_dir, backend_config=PytorchEngineConfig(**config), log_level="WARNING")
    try:
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, top_k=1, ignore_eos=True)
        outputs = [list(r.token_ids) for r in pipe(prompts, gen_config=gen, do_preprocess=False)]
        prompt_ids = [pipe.async_engine.tokenizer.encode(p, add_bos=True) for p in prompts]
    finally:
        pipe.close()
        del pipe
        gc.collect()
    return prompt_ids, outputs


class OpCallCounter:
    """Counts calls of ``dlinfer.ops`` functions (the entries LMDeploy's kernel wrappers reach): ``calls[name]``."""

    def __init__(self, monkeypatch, names):
        import dlinfer.ops as ext_ops

        self.calls = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(ext_ops, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(ext_ops, name, counted)


def api_server_command(model_dir: str, port: int, *extra: str) -> list[str]:
    """``lmdeploy serve api_server`` on the maca device (the README's command line), loopback only."""
    lmdeploy_cli = os.path.join(os.path.dirname(PYTHON), "lmdeploy")  # the venv's console script
    return [lmdeploy_cli, "serve", "api_server", model_dir, "--backend", "pytorch", "--device", "maca",
            "--cache-block-seq-len", "16", "--dtype", "float16",
            "--server-name", "127.0.0.1", "--server-port", str(port), "--log-level", "WARNING", *extra]


def server_env() -> dict:
    """Environment of an api_server child: the emulated maca device with a small memory budget."""
    return dict(os.environ, MACA_INFER_DEVICE="emulated", MACA_INFER_EMU_MEMORY_GB="2", OMP_NUM_THREADS="1")


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
