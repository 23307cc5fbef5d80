"""maca-infer doctor: every field, the exit status, the fix named."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from maca_infer import doctor
from maca_infer.common import versions
from maca_infer.common.device import detect, env as device_env


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("MACA_INFER_DEVICE", raising=False)
    detect.clear_cache()
    yield
    detect.clear_cache()


def _check_shape(report):
    assert set(report) == {"device", "versions", "toolkit", "env", "adapters", "problems", "ok"}
    for key in ("kind", "reason", "torch_device", "device_name"):
        assert key in report["device"]
    assert [v["name"] for v in report["versions"]] == list(versions.SUPPORTED)
    for row in report["versions"]:
        assert set(row) == {"name", "installed", "supported", "in_range", "message"}
        # independent reference: versions.status for the same package
        assert row["in_range"] == versions.status(row["name"]).ok
    for key in ("maca_path", "maca_path_exists", "dirs", "mx_smi", "devices", "visible_devices_order"):
        assert key in report["toolkit"]
    assert set(report["env"]["frameworks"]) == set(device_env.FRAMEWORKS)
    for rows in report["env"]["frameworks"].values():
        for row in rows:
            assert set(row) == {"name", "value", "in_effect", "status", "why"}
    assert [a["adapter"] for a in report["adapters"]] == ["lmdeploy", "sglang", "hf"]
    for row in report["adapters"]:
        assert set(row) == {"adapter", "would_activate", "why_not"}
        assert row["would_activate"] == (row["why_not"] is None)


@pytest.mark.slow
def test_doctor_json_in_a_fresh_process(run_python):
    done = run_python(
        "import sys; from maca_infer.cli import main; sys.exit(main(['doctor', '--json']))",
        env={"MACA_INFER_DEVICE": "emulated"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    _check_shape(report)
    assert report["device"]["kind"] == "emulated" and report["ok"] is True
    assert report["device"]["emulation_active"] is True  # the autoload hook installed it
    assert report["device"]["runtime_patches"] > 40
    assert report["device"]["emulated_memory_bytes"] > 0
    owners = {r["owner"]: r for r in report["device"]["runtime_patches_by_owner"]}
    assert owners["device"]["applied_here"] == report["device"]["runtime_patches"]
    assert owners["lmdeploy"]["declared"] >= 6 and owners["lmdeploy"]["applied_here"] == 0


@pytest.mark.slow
def test_doctor_exits_non_zero_naming_the_fix(run_python):
    done = run_python(
        "import sys; from maca_infer.cli import main; sys.exit(main(['doctor']))",
        env={"MACA_INFER_DEVICE": "maca"},
    )
    assert done.returncode == 1
    assert "status: MISSING REQUIRED PIECES" in done.stdout
    assert "MACA_INFER_DEVICE=maca but this host has no MetaX MACA device" in done.stderr
    assert "fix:" in done.stderr


def test_doctor_on_a_fake_maca_host(fake_maca_host, monkeypatch):
    monkeypatch.delenv("MACA_SMALL_PAGESIZE_ENABLE", raising=False)
    monkeypatch.setenv("PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM", "0")
    report = doctor.collect(graph_mode=True)
    _check_shape(report)
    assert report["device"]["kind"] == "maca"
    toolkit = report["toolkit"]
    assert toolkit["maca_path"] == str(fake_maca_host.maca_path) and toolkit["maca_path_exists"]
    assert toolkit["mx_smi"] == str(fake_maca_host.mx_smi)
    assert [d["index"] for d in toolkit["devices"]] == list(range(8))
    assert toolkit["visible_devices_order"] == "0,1,2,3,4,5,6,7"
    assert str(fake_maca_host.maca_path / "bin") in toolkit["dirs"]["PATH"]
    knobs = {row["name"]: row for row in report["env"]["frameworks"]["sglang"]}
    assert knobs["MACA_SMALL_PAGESIZE_ENABLE"]["status"] == "would set"
    assert knobs["MACA_GRAPH_LAUNCH_MODE"]["value"] == "1"
    assert knobs["CUDA_GRAPH_DP_USE_SUM_BS"]["value"] == "False"
    kept = knobs["PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM"]
    assert (kept["status"], kept["value"], kept["in_effect"]) == ("set by the user", "0", "0")
    assert "CUDA_GRAPH_DP_USE_SUM_BS" not in {row["name"] for row in report["env"]["frameworks"]["lmdeploy"]}
    assert report["ok"] is True
    text = doctor.render(report)
    assert "MetaX C500" in text and "status: OK" in text


def test_doctor_requires_the_toolkit_on_a_maca_host(fake_maca_host):
    shutil.rmtree(fake_maca_host.maca_path)
    report = doctor.collect()
    assert report["device"]["kind"] == "maca"
    required = [p for p in report["problems"] if p["required"]]
    assert report["ok"] is False and len(required) == 1
    assert f"MACA_PATH={fake_maca_host.maca_path}" in required[0]["what"]
    assert "MACA SDK" in required[0]["fix"]


def test_vendor_knobs_are_maca_only_in_the_report(monkeypatch, tmp_path):
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (False, 0))
    monkeypatch.setenv("MACA_PATH", str(tmp_path / "absent"))
    monkeypatch.delenv("MACA_SMALL_PAGESIZE_ENABLE", raising=False)
    report = doctor.collect()
    assert report["device"]["kind"] == "emulated"
    knob = next(r for r in report["env"]["frameworks"]["hf"] if r["name"] == "MACA_SMALL_PAGESIZE_ENABLE")
    assert knob["status"] == "MetaX hosts only"
    assert report["ok"] is True


def test_conflicting_visible_devices_is_a_required_problem(monkeypatch, tmp_path):
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (False, 0))
    monkeypatch.setenv("MACA_PATH", str(tmp_path / "absent"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("MACA_VISIBLE_DEVICES", "1")
    report = doctor.collect()
    assert report["ok"] is False
    assert any("disagree" in p["what"] and p["required"] for p in report["problems"])


def test_doctor_shows_the_guides_singular_visible_device(monkeypatch, tmp_path):
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (False, 0))
    monkeypatch.setenv("MACA_PATH", str(tmp_path / "absent"))
    for name in ("CUDA_VISIBLE_DEVICES", "MACA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MACA_VISIBLE_DEVICE", "7,5,1,3,4,0,6,2")
    report = doctor.collect()
    assert report["toolkit"]["visible_devices"] == {"variable": "MACA_VISIBLE_DEVICE", "value": "7,5,1,3,4,0,6,2"}
    rows = {r["name"]: r for r in report["env"]["frameworks"]["sglang"]}
    assert rows["CUDA_VISIBLE_DEVICES"]["value"] == "7,5,1,3,4,0,6,2"
    assert "mirrors MACA_VISIBLE_DEVICE " in rows["CUDA_VISIBLE_DEVICES"]["why"]
    assert rows["MACA_VISIBLE_DEVICES"]["value"] == "7,5,1,3,4,0,6,2"
    assert "7,5,1,3,4,0,6,2 (from MACA_VISIBLE_DEVICE)" in doctor.render(report)


def test_doctor_tells_knobs_it_set_from_the_users(fake_maca_host, monkeypatch):
    import os

    from maca_infer.common.device import activate, emulation

    if emulation.is_installed():
        pytest.skip("the emulation is installed process-wide")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MACA_SMALL", "PYTORCH_ENABLE_PG"))}
    environ["PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM"] = "0"  # the user's
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setattr(device_env, "_applied_here", {})
    activate(framework="lmdeploy")
    rows = {r["name"]: r for r in doctor.collect()["env"]["frameworks"]["lmdeploy"]}
    assert rows["MACA_SMALL_PAGESIZE_ENABLE"]["status"] == "set by maca-infer"
    assert rows["PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM"]["status"] == "set by the user"
    assert device_env.applied_env()["MACA_SMALL_PAGESIZE_ENABLE"] == "1"


def test_doctor_shows_the_ops_tier_and_every_fallback(fake_maca_host, monkeypatch):
    from maca_infer.common.ops import _dispatch

    monkeypatch.delenv("MACA_INFER_OPS_IMPL", raising=False)
    monkeypatch.delenv("MACA_INFER_OPS_FALLBACK", raising=False)
    monkeypatch.setattr(_dispatch, "_last", {"rms_norm": "reference", "silu_and_mul": "triton"})
    monkeypatch.setattr(_dispatch, "_fallbacks", [{"op": "rms_norm", "reason": "RuntimeError: planted",
                                                   "shapes": "(3, 64) float16 on cuda:0", "device": "maca"}])
    ops = doctor.collect()["device"]["ops"]
    assert ops["tier"] == ("triton" if _dispatch.triton_available() else "reference (triton is not importable)")
    assert ops["launch_family"] == "MXC500" and ops["fallback_allowed"] is False
    assert ops["ran"] == {"rms_norm": "reference", "silu_and_mul": "triton"}
    assert [f["op"] for f in ops["fallbacks"]] == ["rms_norm"]
    text = doctor.render(doctor.collect())
    assert "FELL BACK: rms_norm" in text and "RuntimeError: planted" in text and "ran: silu_and_mul" in text
    monkeypatch.setenv("MACA_INFER_OPS_FALLBACK", "1")
    assert doctor.collect()["device"]["ops"]["fallback_allowed"] is True


def test_doctor_shows_the_vendor_tier_on_a_metax_host(fake_maca_host, vendor_fakes, monkeypatch):
    """MetaX's libraries importable (CPU fakes here): auto's first tier is vendor, and what served each op."""
    from maca_infer.common.ops import _dispatch

    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "auto")
    monkeypatch.setattr(_dispatch, "_last", {"paged_decode_attention": "vendor", "rms_norm": "triton"})
    ops = doctor.collect()["device"]["ops"]
    assert ops["vendor_libraries"] == {"flash_attn": True, "flash_mla": True, "mcoplib._C": True}
    assert ops["tier"].startswith("vendor (flash_attn, flash_mla, mcoplib._C) where it serves the call, else ")
    text = doctor.render(doctor.collect())
    assert re.search(r"vendor library: flash_mla +importable", text)
    assert re.search(r"ran: paged_decode_attention +vendor", text)
