"""maca-infer doctor on a MetaX host: torch/triton must be MetaX's builds, not PyPI's."""

from __future__ import annotations

import pytest

from maca_infer import doctor
from maca_infer.common import versions
from maca_infer.common.device import detect


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("MACA_INFER_DEVICE", raising=False)
    detect.clear_cache()
    yield
    detect.clear_cache()


def _versions(monkeypatch, **table):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: table[name] if name in table else real(name))


def _warnings(report):
    return [p for p in report["problems"] if p.get("warn")]


def test_pypi_triton_on_a_maca_host_is_named(fake_maca_host, monkeypatch, capsys):
    _versions(monkeypatch, torch="2.10.0+metax3.8.0.7", triton="3.8.0")
    report = doctor.collect()
    assert report["device"]["kind"] == "maca" and report["toolkit"]["metax_host"] is True
    warnings = _warnings(report)
    assert [w["what"].split(" ")[0] for w in warnings] == ["triton"]
    assert warnings[0]["what"].startswith("triton 3.8.0 is not MetaX's build: ")
    assert "MetaX's triton wheel" in warnings[0]["fix"] and warnings[0]["required"] is False
    assert report["toolkit"]["vendor_builds"]["torch"]["metax_build"] is True


def test_pypi_torch_on_a_metax_host_warns_with_one_line(fake_maca_host, monkeypatch, capsys):
    import argparse

    import torch

    # a PyPI torch on a MetaX host: no torch.version.maca, sees no device -> resolves emulated
    monkeypatch.delattr(torch.version, "maca", raising=False)
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (False, 0))
    _versions(monkeypatch, torch="2.14.1+cu130", triton="3.6.0+metax3.8.0.7")
    doctor.run(argparse.Namespace(json=True, graph_mode=False))
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1
    assert err[0].startswith("maca-infer doctor: warning: torch 2.14.1+cu130 is not MetaX's build: ")
    assert "fix: " in err[0]


def test_metax_builds_and_cpu_hosts_get_no_warning(fake_maca_host, monkeypatch):
    _versions(monkeypatch, torch="2.10.0+metax3.8.0.7", triton="3.6.0+metax3.8.0.7")
    assert _warnings(doctor.collect()) == []
    # a CPU host (no toolkit, no device) with PyPI builds is not a MetaX host
    monkeypatch.setenv("MACA_PATH", str(fake_maca_host.maca_path / "gone"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (False, 0))
    _versions(monkeypatch, torch="2.14.1+cu130", triton="3.8.0")
    detect.clear_cache()
    report = doctor.collect()
    assert report["toolkit"]["metax_host"] is False and _warnings(report) == []
