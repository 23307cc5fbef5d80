"""Device acceptance check (``make device-check``): what to run the day a MACA or CUDA card is lent.

    python tools/device_check.py [--steps ops,resources,bench,parity] [--budget-s 480] [--out device-check.md]

On a host whose maca device resolves to ``emulated`` (no accelerator) it
exits at once with status 2 and says so; nothing else runs. On a device
(``common.device.resolve()`` kind ``maca`` or ``cuda-standin``) it runs the
selected steps, each in its own subprocess bounded by a timeout (the smaller
of the step's own limit and what is left of ``--budget-s``), and records
pass / fail / timeout, seconds and the output tail of each, so one failing
step never hides the others:

ops        every op's Triton kernel compiled for the card (``MACA_INFER_OPS_IMPL=triton``,
           ``TRITON_INTERPRET`` unset) against its torch reference on the card, on the
           bench cases' real model shapes (small batch / context); where MetaX's libraries
           import (flash_attn / flash_mla / mcoplib), the vendor tier against the same
           reference too (the vendor marshalling's first check on real kernels). Not ``pytest tests/ops``:
           those tests build CPU tensors and their conftest sets ``TRITON_INTERPRET=1``,
           so on any host they run the interpreter, never a compiled kernel.
resources  each kernel launched once in the default (auto) tier; per kernel the shared
           memory, registers and spills of the compiled binary (``CompiledKernel.metadata``,
           ``n_regs``, ``n_spills``), warps, stages; the tier each op ran (vendor or triton
           on a device; reference is a failure) and every fallback.
bench      ``python -m maca_infer.bench`` (= ``maca-infer bench ops``): measured time per case
           and its share of the bandwidth/compute floor.
parity     SmolLM2-135M (model zoo ``smollm2``) served by ``lmdeploy serve api_server --device
           maca`` (bf16) and ``sglang.launch_server --attention-backend maca`` (float32) on the
           card; greedy ids and the chat answer against Hugging Face float32 on the CPU
           (tests/hf_real_model.py). A direct check, not the slow tests tests/{hf,lmdeploy,
           sglang}/test_real_model.py: their server fixtures force ``MACA_INFER_DEVICE=emulated``.

Then it writes one Markdown report. Exit status: 0 when every step passed,
1 otherwise, 2 without a device.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = ("ops", "resources", "bench", "parity")
# each step's own limit (seconds); the total budget caps them further
STEP_TIMEOUTS = {"ops": 90, "resources": 60, "bench": 150, "parity": 240}
TAIL_CHARS = 3000
NO_DEVICE = 2


@dataclass
class StepSpec:
    name: str
    cmd: list[str]
    timeout_s: float
    env: dict | None = None
    json_path: Path | None = None  # what the step writes for the report's tables


@dataclass
class StepResult:
    name: str
    status: str  # pass | fail | timeout | skipped
    seconds: float = 0.0
    tail: str = ""
    returncode: int | None = None
    data: dict | None = None
    note: str = ""


@dataclass
class Resolved:
    ok: bool
    line: str
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- device

def resolve_device() -> Resolved:
    """The maca device here; ``ok`` is False on an emulated host (or one that does not resolve)."""
    try:
        # torch first: resolve() imports torch under its lock, and with MACA_INFER_DEVICE=emulated
        # torch's autoload hook calls resolve() again while importing (a deadlock when resolve came first)
        import torch  # noqa: F401

        from maca_infer.common.device import resolve

        r = resolve()
    except Exception as exc:  # noqa: BLE001 - a misconfigured host is reported, not a traceback
        return Resolved(False, f"unresolved ({type(exc).__name__}: {exc})")
    line = f"{r.kind}, {r.device_name or 'no device name'} ({r.reason})"
    return Resolved(r.kind in ("maca", "cuda-standin"), line)


# ---------------------------------------------------------------- running steps

def parse_steps(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown or not names:
        raise SystemExit(f"--steps {text!r}: choose among {','.join(STEPS)}")
    return [n for n in STEPS if n in names]  # always in the documented order


def run_step(spec: StepSpec, timeout_s: float) -> StepResult:
    """Run one step in its own process group; on timeout kill the whole group (servers included)."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        try:
            proc = subprocess.Popen(spec.cmd, stdout=log, stderr=subprocess.STDOUT, env=spec.env,
                                    cwd=REPO_ROOT, start_new_session=True)
        except OSError as exc:
            return StepResult(spec.name, "fail", time.monotonic() - start, f"could not start: {exc}")
        try:
            rc = proc.wait(timeout=max(timeout_s, 0.1))
            status = "pass" if rc == 0 else "fail"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
        seconds = time.monotonic() - start
        log.seek(0)
        tail = log.read()[-TAIL_CHARS:]
    data = None
    if spec.json_path is not None and Path(spec.json_path).is_file():
        try:
            data = json.loads(Path(spec.json_path).read_text())
        except json.JSONDecodeError:
            data = None
    note = f"killed after {timeout_s:.0f} s" if status == "timeout" else ""
    return StepResult(spec.name, status, seconds, tail, rc, data, note)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
            if sig == signal.SIGTERM:
                continue
        except subprocess.TimeoutExpired:
            continue
    try:  # children that survived their leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_steps(specs: list[StepSpec], budget_s: float) -> list[StepResult]:
    """Run the steps in order, each within min(its timeout, the budget left); none hides another."""
    deadline = time.monotonic() + budget_s
    results = []
    for spec in specs:
        left = deadline - time.monotonic()
        if left < 1:
            results.append(StepResult(spec.name, "skipped", 0.0, note="budget spent"))
            continue
        results.append(run_step(spec, min(spec.timeout_s, left)))
    return results


def step_specs(names: list[str], work: Path, args: argparse.Namespace) -> list[StepSpec]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MACA_INFER_DEVICE")}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    me = [sys.executable, str(Path(__file__).resolve())]
    specs = []
    for name in names:
        out = work / f"{name}.json"
        if name == "ops":
            cmd = me + ["--worker", "ops", "--json", str(out)]
            step_env = dict(env, MACA_INFER_OPS_IMPL="triton")
        elif name == "resources":
            cmd = me + ["--worker", "resources", "--json", str(out)]
            step_env = {k: v for k, v in env.items() if k != "MACA_INFER_OPS_IMPL"}  # the default tier
        elif name == "bench":
            cmd = [sys.executable, "-m", "maca_infer.bench", "--out", str(work / "bench"), "--no-host",
                   "--repeats", str(args.repeats)]
            step_env = env
            out = work / "bench" / "ops.json"
        else:
            cmd = me + ["--worker", "parity", "--json", str(out)]
            step_env = env
        specs.append(StepSpec(name, cmd, STEP_TIMEOUTS[name], step_env, out))
    return specs


# ---------------------------------------------------------------- report

def _cell(value) -> str:
    if value is None:
        return "n/a"
    return str(value).replace("|", "\\|").replace("\n", " ")


def report_markdown(device_line: str, results: list[StepResult], budget_s: float) -> str:
    lines = ["# maca-infer device check", "", f"Device: {device_line}", "",
             f"Budget: {budget_s:.0f} s; used {sum(r.seconds for r in results):.0f} s.", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status.upper() if r.status != 'pass' else 'pass'} | {r.seconds:.1f} | "
              f"{_cell(r.note) if r.note else ''} |" for r in results]
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", ""]
        lines += _SECTIONS.get(r.name, lambda d: [])(r.data or {})
        if r.status != "pass" and r.tail:
            lines += ["", "Output tail:", "", "```", r.tail.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _ops_section(data: dict) -> list[str]:
    rows = data.get("cases", [])
    if not rows:
        return ["(no results)"]
    lines = ["Compiled Triton kernel (and MetaX's vendor kernel, where its libraries import) vs torch "
             "reference on the device (max |a-b| / max |ref|).", "",
             "| op | model | shape | status | rel. error | tolerance | vendor | vendor error | detail |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        err, verr = c.get("error"), c.get("vendor_error")
        lines.append(f"| {_cell(c.get('op'))} | {_cell(c.get('model'))} | {_cell(c.get('shape'))} | "
                     f"{_cell(c.get('status'))} | {'n/a' if err is None else f'{err:.2e}'} | "
                     f"{_cell(c.get('tolerance'))} | {_cell(c.get('vendor', '-'))} | "
                     f"{'-' if verr is None else f'{verr:.2e}'} | {_cell(c.get('detail', ''))} |")
    return lines


def _tiers_lines(data: dict) -> list[str]:
    lines = []
    if data.get("tiers"):
        lines += ["", "| op | tier |", "|---|---|"]
        lines += [f"| {op} | {tier} |" for op, tier in data["tiers"].items()]
    if data.get("fallbacks"):
        lines += ["", "Fallbacks to the torch reference:", ""]
        lines += [f"- {f.get('op')}: {f.get('reason')}" for f in data["fallbacks"]]
    return lines


def _resources_section(data: dict) -> list[str]:
    kernels = data.get("kernels", [])
    lines = ["Per compiled kernel (default tier, one launch per bench case).", "",
             "| kernel | op | constexprs | shared B | registers | spills | warps | stages |",
             "|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        lines.append(f"| {_cell(k.get('kernel'))} | {_cell(k.get('op'))} | {_cell(k.get('constexprs'))} | "
                     f"{_cell(k.get('shared'))} | {_cell(k.get('n_regs'))} | {_cell(k.get('n_spills'))} | "
                     f"{_cell(k.get('num_warps'))} | {_cell(k.get('num_stages'))} |")
    if not kernels:
        lines.append("| (no kernel launched) | | | | | | | |")
    return lines + _tiers_lines(data)


def _bench_section(data: dict) -> list[str]:
    cases = data.get("cases", [])
    if not cases:
        return ["(no results)"]
    lines = [f"Peaks: {data.get('peak_bandwidth_Bps', 0) / 1e9:.0f} GB/s, "
             f"{data.get('peak_flops', 0) / 1e12:.0f} TFLOP/s (bench ops defaults unless passed).", "",
             "| op | model | shape | floor µs | measured µs | % of floor |", "|---|---|---|---|---|---|"]
    for c in cases:
        floor, meas = c.get("floor_s"), c.get("measured_s")
        pct = f"{floor / meas:.0%}" if floor and meas else "n/a"
        lines.append(f"| {_cell(c.get('op'))} | {_cell(c.get('model'))} | {_cell(c.get('shape'))} | "
                     f"{floor * 1e6:.2f} | {'n/a' if not meas else f'{meas * 1e6:.1f}'} | {pct} |"
                     if floor is not None else f"| {_cell(c.get('op'))} | | | n/a | n/a | n/a |")
    return lines + _tiers_lines(data)


def _parity_section(data: dict) -> list[str]:
    servers = data.get("servers", {})
    lines = ["SmolLM2-135M served on the device vs Hugging Face float32 greedy (CPU).", "",
             "| server | dtype | status | chat answer | prompts equal HF | detail |", "|---|---|---|---|---|---|"]
    for name, s in servers.items():
        lines.append(f"| {name} | {_cell(s.get('dtype'))} | {_cell(s.get('status'))} | {_cell(s.get('chat'))} | "
                     f"{_cell(s.get('equal'))} | {_cell(s.get('detail', ''))} |")
    if not servers:
        lines.append("| (none ran) | | | | | |")
    if data.get("error"):
        lines += ["", f"Error: {data['error']}"]
    return lines


_SECTIONS = {"ops": _ops_section, "resources": _resources_section, "bench": _bench_section,
             "parity": _parity_section}


# ---------------------------------------------------------------- workers (run on the device)

_TOLERANCE = {"float32": 1e-3, "float16": 3e-3, "bfloat16": 2.5e-2}


def _tensors_of(fn, result) -> list:
    """The tensors a case touches: what it returns, plus its captured inputs (in-place ops write those)."""
    import torch

    found = []

    def add(v):
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            for x in v:
                add(x)

    add(result)
    for cell in fn.__closure__ or ():
        try:
            add(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return [t.detach().clone() for t in found]


def _compare(got: list, want: list) -> tuple[float, str]:
    import torch

    if len(got) != len(want):
        return float("inf"), f"{len(got)} tensors vs {len(want)}"
    worst, dtype = 0.0, "float32"
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return float("inf"), f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if not a.dtype.is_floating_point:
            if not torch.equal(a, b):
                return float("inf"), f"{a.dtype} tensor differs"
            continue
        a64, b64 = a.double(), b.double()
        if not torch.isfinite(a64).all() and torch.isfinite(b64).all():
            return float("inf"), "non-finite output"
        err = ((a64 - b64).abs().max() / (b64.abs().max().clamp_min(1e-30))).item() if a.numel() else 0.0
        if err > worst:
            worst, dtype = err, str(a.dtype).replace("torch.", "")
    return worst, dtype


class _Recorder:
    """Wraps every lazy_jit launch; keeps each compiled kernel's resources (once per kernel + constexprs)."""

    def __init__(self):
        self.kernels: dict = {}
        self.op = ""

    def install(self):
        from maca_infer.common.ops import _jit

        original = _jit.lazy_jit.__getitem__
        recorder = self

        def recording(self_, grid):
            launcher = original(self_, grid)

            def launch(*args, **kwargs):
                compiled = launcher(*args, **kwargs)
                recorder.add(self_.fn.__name__, kwargs, compiled)
                return compiled

            return launch

        _jit.lazy_jit.__getitem__ = recording

    def add(self, name, kwargs, compiled):
        constexprs = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (int, bool, str))}
        key = (name, json.dumps(constexprs, sort_keys=True))
        if key in self.kernels:
            return
        meta = getattr(compiled, "metadata", None)
        self.kernels[key] = {
            "kernel": name, "op": self.op, "constexprs": ", ".join(f"{k}={v}" for k, v in constexprs.items()),
            "shared": getattr(meta, "shared", None), "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None), "num_warps": getattr(meta, "num_warps", None),
            "num_stages": getattr(meta, "num_stages", None)}


def _small_cases():
    from maca_infer.bench import ops as bench_ops

    cases = bench_ops.build_cases(batch=4, context=300, prefill_len=100, block_size=16, group_size=128)
    # DeepSeek-V3's 256 experts weigh 15 GB per bf16 MoE case: Mixtral's rows cover the same MoE kernels
    return [c for c in cases if not (c.model == "DeepSeek-V3" and c.op.startswith("fused_moe"))]


def worker_ops(path: Path, device: str = "cuda", cases=None) -> int:
    import torch

    from maca_infer.common import envs

    from maca_infer.common.ops import vendor

    dev = torch.device(device)
    impls = ("triton", "reference") + (("vendor",) if any(vendor.available().values()) else ())
    rows, failed = [], 0
    for case in _small_cases() if cases is None else cases:
        row = {"op": case.op, "model": case.model, "shape": case.shape}
        try:
            outs = {}
            for impl in impls:
                # the same inputs both times (built in the default tier: routing of the MoE cases
                # included), fresh because in-place ops (rotary, cache fill) write them
                with envs.temporarily(MACA_INFER_OPS_IMPL="auto"):
                    torch.manual_seed(0)
                    fn = case.make(dev)
                with envs.temporarily(MACA_INFER_OPS_IMPL=impl):
                    try:
                        result = fn()
                    except RuntimeError as exc:
                        if impl != "vendor" or "MACA_INFER_OPS_IMPL=vendor" not in str(exc):
                            raise
                        row["vendor"] = "n/a: " + str(exc).split(": ", 1)[-1][:120]  # cannot serve / no kernel
                        continue
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    outs[impl] = _tensors_of(fn, result)
            err, dtype = _compare(outs["triton"], outs["reference"])
            tol = _TOLERANCE.get(dtype, 1e-3)
            ok = err <= tol
            if "vendor" in outs:
                row["vendor_error"], _ = _compare(outs["vendor"], outs["reference"])
                ok = ok and row["vendor_error"] <= tol
                row["vendor"] = "pass" if row["vendor_error"] <= tol else "FAIL"
            row.update(error=err, tolerance=tol, detail=dtype, status="pass" if ok else "FAIL")
        except Exception as exc:  # noqa: BLE001 - one broken op must not hide the others
            row.update(error=None, tolerance=None, status="ERROR", detail=f"{type(exc).__name__}: {exc}"[:300])
        failed += row["status"] != "pass"
        rows.append(row)
        print(f"{row['status']:5} {case.op} [{case.model} {case.shape}] {row.get('detail', '')}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    path.write_text(json.dumps({"cases": rows}, indent=1))
    return 1 if failed else 0


def worker_resources(path: Path, device: str = "cuda", cases=None) -> int:
    import torch

    from maca_infer.common.ops import _dispatch

    recorder = _Recorder()
    recorder.install()
    errors = []
    for case in _small_cases() if cases is None else cases:
        recorder.op = case.op
        try:
            case.make(torch.device(device))()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{case.op} [{case.model}]: {type(exc).__name__}: {exc}"[:300])
            print("ERROR", errors[-1], flush=True)
    kernels = list(recorder.kernels.values())
    path.write_text(json.dumps({"kernels": kernels, "tiers": _dispatch.tiers(), "fallbacks": _dispatch.fallbacks(),
                                "errors": errors}, indent=1))
    # on a device every op runs on MetaX's vendor kernel or our Triton kernel: the reference means a fallback
    on_reference = [op for op, tier in _dispatch.tiers().items() if tier not in ("triton", "vendor")]
    spills = [k["kernel"] for k in kernels if k.get("n_spills")]
    for k in kernels:
        print(k, flush=True)
    if on_reference:
        print("ops on neither the vendor nor the Triton tier:", on_reference)
    if spills:
        print("kernels that spill:", spills)
    return 1 if errors or on_reference or not kernels else 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120):
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _serve(cmd: list[str], health: str, log_path: Path, timeout: float):
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k != "MACA_INFER_DEVICE"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    with open(log_path, "wb") as log:  # the server keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(health, timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(2)
    _kill_group(proc)
    raise RuntimeError(f"server not up ({' '.join(cmd[:4])} ...): "
                       + log_path.read_text(errors="replace")[-1500:])


def _first_diff(got: list[int], want: list[int]):
    return next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None if len(got) == len(want) else 0)


def worker_parity(path: Path) -> int:
    from maca_infer.modelzoo import get

    model = str(get("smollm2"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACA_INFER_")}  # stock torch on the CPU
    env.update(OMP_NUM_THREADS="4", MACA_INFER_MODEL_CACHE=os.environ.get("MACA_INFER_MODEL_CACHE", ""))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "hf_real_model.py")],
                          input=json.dumps({"model": model, "preset": "smollm2", "mmlu": None}),
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        path.write_text(json.dumps({"servers": {}, "error": "HF reference failed: " + proc.stderr[-1500:]}))
        return 1
    ref = json.loads(proc.stdout)
    n = ref["request"]["max_new_tokens"]
    bin_dir = os.path.dirname(sys.executable)
    servers = {}
    for name in ("lmdeploy", "sglang"):
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = path.with_name(f"{name}.log")
        if name == "lmdeploy":
            dtype = "bfloat16"
            cmd = [os.path.join(bin_dir, "lmdeploy"), "serve", "api_server", model, "--backend", "pytorch",
                   "--device", "maca", "--cache-block-seq-len", "16", "--dtype", dtype, "--eager-mode",
                   "--server-name", "127.0.0.1", "--server-port", str(port), "--log-level", "WARNING"]
            health = f"{base}/v1/models"
        else:
            dtype = "float32"
            cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
                   "--port", str(port), "--tp", "1", "--attention-backend", "maca", "--page-size", "16",
                   "--dtype", dtype, "--max-running-requests", "4", "--disable-cuda-graph"]
            health = f"{base}/health"
        row = {"dtype": dtype}
        server = None
        try:
            server = _serve(cmd, health, log_path, timeout=150)
            reply = _post(f"{base}/v1/chat/completions", {
                "model": model, "temperature": 0, "max_tokens": 32,
                "messages": [{"role": "user", "content": ref["request"]["chats"][0]}]})
            row["chat"] = reply["choices"][0]["message"]["content"]
            if name == "lmdeploy":
                got = [_post(f"{base}/generate", {"input_ids": ids, "max_tokens": n, "ignore_eos": True,
                                                  "temperature": 0, "top_k": 1})["output_ids"]
                       for ids in ref["prompt_ids"]]
            else:
                got = [o["output_ids"] for o in _post(f"{base}/generate", {
                    "input_ids": ref["prompt_ids"],
                    "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}})]
            # bf16 may part from HF only where HF's own top-2 logits are within 0.4 (the tests' tie
            # tolerance); float32 must equal HF exactly
            tie = 0.4 if dtype == "bfloat16" else 0.0
            equal, bad = 0, []
            for i, (out, want, margins) in enumerate(zip(got, ref["greedy"], ref["margins"])):
                d = _first_diff(out, want)
                if d is None:
                    equal += 1
                elif not (d < len(margins) and margins[d] < tie):
                    bad.append(f"prompt {i} parts at step {d}")
            row["equal"] = f"{equal}/{len(got)}"
            chat_ok = row["chat"] == ref["chat"][0]
            row["status"] = "pass" if chat_ok and not bad and equal >= len(got) - (1 if tie else 0) else "FAIL"
            row["detail"] = "; ".join(bad + ([] if chat_ok else [f"HF says {ref['chat'][0]!r}"]))
        except Exception as exc:  # noqa: BLE001 - the other server still runs
            row.update(status="ERROR", detail=f"{type(exc).__name__}: {exc}"[-600:])
        finally:
            if server is not None:
                _kill_group(server)
        servers[name] = row
        print(name, row, flush=True)
    path.write_text(json.dumps({"servers": servers, "hf_chat": ref["chat"][0]}, indent=1))
    return 0 if all(s.get("status") == "pass" for s in servers.values()) else 1


WORKERS = {"ops": worker_ops, "resources": worker_resources, "parity": worker_parity}


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="device_check", description=__doc__.splitlines()[0])
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, among {','.join(STEPS)}")
    p.add_argument("--budget-s", type=float, default=480.0, help="total seconds for all steps (default 480)")
    p.add_argument("--out", default="device-check.md", help="the Markdown report (default device-check.md)")
    p.add_argument("--work-dir", default=None, help="where steps write JSON, logs, bench output "
                   "(default: a folder beside --out)")
    p.add_argument("--repeats", type=int, default=10, help="bench ops repeats per case")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return WORKERS[args.worker](args.json)
    names = parse_steps(args.steps)
    if args.budget_s <= 0:
        raise SystemExit("--budget-s must be > 0")

    device = resolve_device()
    if not device.ok:
        print(f"device-check: no CUDA or MACA device here (resolved: {device.line}): device-check needs one",
              file=sys.stderr)
        return NO_DEVICE
    print(f"device-check on {device.line}: steps {','.join(names)}, budget {args.budget_s:.0f} s", flush=True)

    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    results = run_steps(step_specs(names, work, args), args.budget_s)
    for r in results:
        print(f"  {r.name:10} {r.status:8} {r.seconds:6.1f} s {r.note}", flush=True)
    out.write_text(report_markdown(device.line, results, args.budget_s))
    print(f"wrote {out} (step outputs in {work})")
    return 0 if all(r.status == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
