"""tools/device_check.py (``make device-check``) on a host without a device: the no-device exit,
the report, step selection, timeouts and the budget (with fake steps), and the kernel-vs-reference
comparison its ops step uses."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "device_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("maca_device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


dc = _load()


def _fake(name, code, timeout_s=30.0):
    return dc.StepSpec(name, [sys.executable, "-c", code], timeout_s)


# ---------------------------------------------------------------- no device

@pytest.mark.parametrize("device_var", ["emulated", None])
def test_no_device_exits_at_once_with_a_clear_message(tmp_path, device_var):
    if device_var is None and torch.cuda.is_available():
        pytest.skip("auto-detection finds a device on this host")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.pop("MACA_INFER_DEVICE", None)
    if device_var:  # the variable the CI sets: torch's autoload hook resolves the device while torch imports
        env["MACA_INFER_DEVICE"] = device_var
    t0 = time.monotonic()
    base = subprocess.run([sys.executable, "-c", "import torch, maca_infer.common.device"], env=env, timeout=60)
    imports_s = time.monotonic() - t0
    assert base.returncode == 0
    out = tmp_path / "report.md"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA or MACA device here (resolved: emulated" in proc.stderr
    assert "device-check needs one" in proc.stderr
    # nothing ran: no report, no work folder
    assert not out.exists() and not (tmp_path / "report-work").exists()
    # "at once": under 5 s (on a host so busy that importing torch alone takes over 2.5 s, twice that)
    assert elapsed < max(5.0, 2 * imports_s), f"{elapsed:.1f} s (imports alone {imports_s:.1f} s)"


def test_no_device_runs_no_step(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dc, "resolve_device", lambda: dc.Resolved(False, "emulated, test"))

    def boom(*a, **k):
        raise AssertionError("a step ran without a device")

    monkeypatch.setattr(dc, "run_steps", boom)
    monkeypatch.setattr(dc, "step_specs", boom)
    assert dc.main(["--out", str(tmp_path / "r.md")]) == dc.NO_DEVICE
    assert "resolved: emulated, test" in capsys.readouterr().err


# ---------------------------------------------------------------- steps: selection, timeout, budget

def test_parse_steps_keeps_the_documented_order_and_rejects_unknown_names():
    assert dc.parse_steps("bench,ops") == ["ops", "bench"]
    assert dc.parse_steps("ops,resources,bench,parity") == list(dc.STEPS)
    assert dc.parse_steps(" parity ") == ["parity"]
    for bad in ("ops,speed", "", ","):
        with pytest.raises(SystemExit):
            dc.parse_steps(bad)


def test_step_specs_build_only_the_selected_steps(tmp_path):
    args = dc.argparse.Namespace(repeats=3)
    specs = dc.step_specs(["resources", "bench"], tmp_path, args)
    assert [s.name for s in specs] == ["resources", "bench"]
    bench = specs[1]
    assert bench.cmd[1:3] == ["-m", "maca_infer.bench"] and "--repeats" in bench.cmd
    for s in specs:  # compiled kernels on the real device: never the interpreter or the emulation
        assert "TRITON_INTERPRET" not in s.env and "MACA_INFER_DEVICE" not in s.env
    ops = dc.step_specs(["ops"], tmp_path, args)[0]
    assert ops.env["MACA_INFER_OPS_IMPL"] == "triton" and ops.cmd[-3:-1] == ["ops", "--json"]


def test_a_step_past_its_timeout_is_killed_and_the_next_still_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    # the step starts a child that would outlive it: the whole process group must go
    sleeper = _fake("ops", "import subprocess, sys, time\n"
                           f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                           f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
                           "print('started', flush=True)\ntime.sleep(60)", timeout_s=3)
    failing = _fake("resources", "import sys; print('broken kernel'); sys.exit(3)")
    ok = _fake("bench", "print('fine')")
    t0 = time.monotonic()
    results = dc.run_steps([sleeper, failing, ok], budget_s=100)
    assert time.monotonic() - t0 < 30
    assert [r.status for r in results] == ["timeout", "fail", "pass"]
    assert results[0].returncode is None and "started" in results[0].tail and "killed after 3 s" in results[0].note
    assert 2.5 < results[0].seconds < 20
    assert results[1].returncode == 3 and "broken kernel" in results[1].tail
    assert "fine" in results[2].tail
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the timed-out step's child {child} is still alive")


def test_the_budget_caps_steps_and_skips_what_it_cannot_fit():
    results = dc.run_steps([_fake("ops", "import time; time.sleep(60)", timeout_s=100),
                            _fake("bench", "print('never')")], budget_s=2)
    assert results[0].status == "timeout" and results[0].seconds < 20
    assert results[1].status == "skipped" and results[1].note == "budget spent"


def test_step_json_is_read_into_the_result(tmp_path):
    out = tmp_path / "ops.json"
    spec = _fake("ops", f"import json; json.dump({{'cases': [1]}}, open({str(out)!r}, 'w'))")
    spec.json_path = out
    assert dc.run_steps([spec], 30)[0].data == {"cases": [1]}


def test_main_with_a_device_runs_the_selected_steps_and_writes_the_report(monkeypatch, tmp_path):
    monkeypatch.setattr(dc, "resolve_device", lambda: dc.Resolved(True, "cuda-standin, NVIDIA H200 (test)"))
    seen = []

    def fake_specs(names, work, args):
        seen.append(names)
        assert work.is_dir()
        return [_fake(n, "print('ok')" if n == "ops" else "import sys; sys.exit(1)") for n in names]

    monkeypatch.setattr(dc, "step_specs", fake_specs)
    out = tmp_path / "check.md"
    assert dc.main(["--steps", "parity,ops", "--out", str(out), "--budget-s", "60"]) == 1
    assert seen == [["ops", "parity"]]
    text = out.read_text()
    assert "Device: cuda-standin, NVIDIA H200 (test)" in text
    assert "| ops | pass |" in text and "| parity | FAIL |" in text
    assert "| bench |" not in text and "| resources |" not in text
    assert dc.main(["--steps", "ops", "--out", str(out)]) == 0


# ---------------------------------------------------------------- the report

def test_report_tables_from_synthetic_results():
    results = [
        dc.StepResult("ops", "fail", 12.3, tail="FAIL paged_decode_attention", data={"cases": [
            {"op": "rms_norm", "model": "Llama-3-8B", "shape": "T=4 H=4096", "status": "pass", "error": 1.5e-3,
             "tolerance": 0.025, "detail": "bfloat16", "vendor": "pass", "vendor_error": 2.5e-3},
            {"op": "paged_decode_attention", "model": "Qwen2.5-7B", "shape": "B=4", "status": "FAIL",
             "error": 0.3, "tolerance": 0.025, "detail": "bfloat16"}]}),
        dc.StepResult("resources", "pass", 4.0, data={
            "kernels": [{"kernel": "_rms_norm_kernel", "op": "rms_norm", "constexprs": "BLOCK=1024",
                         "shared": 4096, "n_regs": 40, "n_spills": 0, "num_warps": 4, "num_stages": 1},
                        {"kernel": "_fused_moe_kernel", "op": "fused_moe bf16", "constexprs": "BLOCK_M=16",
                         "shared": 65536, "n_regs": 255, "n_spills": 128, "num_warps": 8, "num_stages": 2}],
            "tiers": {"rms_norm": "triton", "fused_moe": "reference"},
            "fallbacks": [{"op": "fused_moe", "reason": "OutOfResources: shared memory"}]}),
        dc.StepResult("bench", "pass", 90.0, data={
            "peak_bandwidth_Bps": 1.8e12, "peak_flops": 2.8e14,
            "cases": [{"op": "silu_and_mul", "model": "Llama-3-8B", "shape": "T=64", "floor_s": 1e-6,
                       "measured_s": 4e-6},
                      {"op": "w8a8_int8_linear", "model": "Llama-3-8B", "shape": "T=64", "floor_s": 2e-5,
                       "measured_s": None}]}),
        dc.StepResult("parity", "timeout", 240.0, tail="sglang: loading weights", note="killed after 240 s",
                      data={"servers": {"lmdeploy": {"dtype": "bfloat16", "status": "pass",
                                                     "chat": "The capital of France is Paris.", "equal": "3/3"}}}),
    ]
    text = dc.report_markdown("maca, MetaX C500 (torch.version.maca=3.2)", results, 480)
    assert text.startswith("# maca-infer device check")
    assert "Device: maca, MetaX C500 (torch.version.maca=3.2)" in text
    assert "used 346 s" in text
    # per-step status table
    assert "| ops | FAIL | 12.3 |" in text and "| resources | pass | 4.0 |" in text
    assert "| parity | TIMEOUT | 240.0 | killed after 240 s |" in text
    # ops: kernel vs reference
    assert "| rms_norm | Llama-3-8B | T=4 H=4096 | pass | 1.50e-03 | 0.025 | pass | 2.50e-03 | bfloat16 |" in text
    assert "| paged_decode_attention | Qwen2.5-7B | B=4 | FAIL | 3.00e-01 |" in text
    # resources: shared, registers, spills, warps, stages; tiers and fallbacks
    assert "| _rms_norm_kernel | rms_norm | BLOCK=1024 | 4096 | 40 | 0 | 4 | 1 |" in text
    assert "| _fused_moe_kernel | fused_moe bf16 | BLOCK_M=16 | 65536 | 255 | 128 | 8 | 2 |" in text
    assert "| fused_moe | reference |" in text and "- fused_moe: OutOfResources: shared memory" in text
    # bench: measured time and % of the floor
    assert "Peaks: 1800 GB/s, 280 TFLOP/s" in text
    assert "| silu_and_mul | Llama-3-8B | T=64 | 1.00 | 4.0 | 25% |" in text
    assert "| w8a8_int8_linear | Llama-3-8B | T=64 | 20.00 | n/a | n/a |" in text
    # parity row; the output tail of steps that did not pass, not of those that did
    assert "| lmdeploy | bfloat16 | pass | The capital of France is Paris. | 3/3 |" in text
    assert "sglang: loading weights" in text and "FAIL paged_decode_attention" in text
    assert text.count("Output tail:") == 2


def test_report_cells_cannot_break_the_table():
    r = dc.StepResult("parity", "fail", 1.0, data={"servers": {"sglang": {
        "status": "ERROR", "detail": "RuntimeError: a | b\nnext line"}}})
    text = dc.report_markdown("maca", [r], 10)
    row = next(line for line in text.splitlines() if line.startswith("| sglang"))
    assert "a \\| b next line" in row


# ---------------------------------------------------------------- the ops step's comparison

def test_compare_flags_errors_by_dtype_and_exact_integers():
    ref = torch.linspace(-1, 1, 64).to(torch.bfloat16)
    assert dc._compare([ref.clone()], [ref]) == (0.0, "float32")
    err, dtype = dc._compare([ref * 1.05], [ref])
    assert dtype == "bfloat16" and dc._TOLERANCE[dtype] < err < 0.1
    ids = torch.arange(8)
    assert dc._compare([ids.flip(0)], [ids])[0] == float("inf")
    assert dc._compare([torch.full((3,), float("nan"))], [torch.ones(3)])[0] == float("inf")
    assert dc._compare([ref], [ref, ref])[0] == float("inf")


def test_tensors_of_includes_inputs_written_in_place():
    cache = torch.zeros(4)
    x = torch.ones(4)

    def fill():
        cache.add_(x)

    fill()
    got = dc._tensors_of(fill, None)
    assert len(got) == 2 and any(torch.equal(t, torch.ones(4)) for t in got)
    assert sum(torch.equal(t, torch.ones(4)) for t in got) == 2  # the written cache is compared too
    got[0].add_(1)
    assert torch.equal(cache, torch.ones(4))  # copies: a later run cannot change what was captured


def test_ops_worker_passes_real_kernels_and_flags_a_wrong_one(tmp_path, monkeypatch):
    """The ops step's worker, here on CPU tensors in Triton's interpreter (on the card: compiled)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run Triton kernels on CPU tensors")
    from maca_infer.common import envs
    from maca_infer.common.ops import _dispatch

    real = [c for c in dc._small_cases() if c.model == "Llama-3-8B" and c.op in ("rms_norm", "fill_kv_cache")]
    assert [c.op for c in real] == ["rms_norm", "fill_kv_cache"]

    def wrong(dev):  # a "kernel" 5% off its reference in the cache it writes
        cache = torch.zeros(64, dtype=torch.bfloat16)
        x = torch.randn(64, dtype=torch.bfloat16)
        return lambda: cache.copy_(x * (1.05 if envs.ops_impl() == "triton" else 1.0))

    broken = type("Case", (), {"op": "broken_op", "model": "test", "shape": "64", "make": staticmethod(wrong)})
    out = tmp_path / "ops.json"
    monkeypatch.delenv("MACA_INFER_OPS_IMPL", raising=False)
    assert dc.worker_ops(out, device="cpu", cases=real + [broken]) == 1
    rows = {r["op"]: r for r in dc.json.loads(out.read_text())["cases"]}
    assert rows["rms_norm"]["status"] == "pass" and rows["fill_kv_cache"]["status"] == "pass"
    assert rows["broken_op"]["status"] == "FAIL" and rows["broken_op"]["detail"] == "bfloat16"
    assert _dispatch.last_impl("rms_norm") == "reference"  # the reference ran last, after the kernel
    assert dc.worker_ops(out, device="cpu", cases=real) == 0


def test_ops_worker_checks_the_vendor_tier_where_its_libraries_import(tmp_path, monkeypatch, vendor_fakes):
    """With MetaX's libraries importable (CPU fakes here) each case also runs on the vendor tier against the
    reference; a vendor result off the reference fails the case, a call it cannot serve is shown as n/a."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run Triton kernels on CPU tensors")
    from maca_infer.common.ops import vendor

    cases = [c for c in dc._small_cases() if c.model == "Llama-3-8B" and c.op in ("silu_and_mul", "fill_kv_cache")]
    assert [c.op for c in cases] == ["silu_and_mul", "fill_kv_cache"]
    out = tmp_path / "ops.json"
    assert dc.worker_ops(out, device="cpu", cases=cases) == 0
    rows = {r["op"]: r for r in dc.json.loads(out.read_text())["cases"]}
    assert rows["silu_and_mul"]["vendor"] == "pass" and rows["fill_kv_cache"]["vendor"] == "pass"
    assert "| pass |" in "\n".join(dc._ops_section({"cases": list(rows.values())}))

    monkeypatch.setattr(vendor, "act_and_mul", lambda x, out, activation: out.copy_(x[..., : out.shape[-1]]))
    assert dc.worker_ops(out, device="cpu", cases=cases[:1]) == 1
    row = dc.json.loads(out.read_text())["cases"][0]
    assert row["vendor"] == "FAIL" and row["status"] == "FAIL" and row["vendor_error"] > row["tolerance"]

    monkeypatch.setattr(vendor, "act_and_mul", lambda *a: vendor._need(False, "planted"))
    assert dc.worker_ops(out, device="cpu", cases=cases[:1]) == 0
    assert dc.json.loads(out.read_text())["cases"][0]["vendor"].startswith("n/a: ")


def test_resources_worker_records_each_kernel_once_with_its_op_and_the_tiers(tmp_path, monkeypatch):
    """The resources step's worker in the interpreter: kernels and tiers are recorded (resources are
    the compiled binary's, so n/a here), and a case that raises is an error, not a crash."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run Triton kernels on CPU tensors")
    from maca_infer.common.ops import _dispatch, _jit

    # the worker runs in a fresh process on the card: no tiers from earlier tests in this one
    monkeypatch.setattr(_dispatch, "_last", {})
    monkeypatch.setattr(_dispatch, "_fallbacks", [])
    cases = [c for c in dc._small_cases() if c.model == "Llama-3-8B" and c.op in ("rms_norm", "silu_and_mul")]

    def raising(dev):
        def fn():
            raise RuntimeError("out of resources")
        return fn

    bad = type("Case", (), {"op": "bad_op", "model": "test", "shape": "1", "make": staticmethod(raising)})
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "triton")
    monkeypatch.setattr(_jit.lazy_jit, "__getitem__", _jit.lazy_jit.__getitem__)  # restored after the test
    out = tmp_path / "resources.json"
    assert dc.worker_resources(out, device="cpu", cases=cases + cases) == 0
    data = dc.json.loads(out.read_text())
    ops = [k["op"] for k in data["kernels"]]
    assert sorted(set(ops)) == ["rms_norm", "silu_and_mul"] and len(ops) == len(set(ops))  # once each
    assert data["tiers"]["rms_norm"] == "triton" and data["tiers"]["silu_and_mul"] == "triton"
    assert all(k["kernel"] for k in data["kernels"]) and data["errors"] == []
    assert dc.worker_resources(out, device="cpu", cases=[bad]) == 1
    assert "bad_op [test]: RuntimeError: out of resources" in dc.json.loads(out.read_text())["errors"][0]
