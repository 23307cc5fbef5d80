"""Device resolution: the three kinds, the override, and its errors."""

from __future__ import annotations

import pytest
import torch

from maca_infer.common import envs
from maca_infer.common.device import detect, resolve


@pytest.fixture(autouse=True)
def _fresh_resolution(monkeypatch):
    monkeypatch.delenv("MACA_INFER_DEVICE", raising=False)
    detect.clear_cache()
    yield
    detect.clear_cache()


@pytest.fixture
def cpu_only_host(monkeypatch, tmp_path):
    """No accelerator, no mcPyTorch, no toolkit (whatever the real host has)."""
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (False, 0))
    monkeypatch.delattr(torch.version, "maca", raising=False)
    monkeypatch.setenv("MACA_PATH", str(tmp_path / "no-maca-here"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no mx-smi on PATH either


def test_auto_on_cpu_host_is_emulated(cpu_only_host):
    res = resolve(refresh=True)
    assert res.kind == "emulated"
    assert res.torch_device == "cpu"
    assert "emulated" in res.device_name
    assert "no accelerator" in res.reason
    assert "mx-smi=not found" in res.reason and "(missing)" in res.reason


def test_auto_on_this_host_matches_the_stock_torch_answer():
    # independent reference: what stock torch says about this machine
    available, _ = detect._stock_cuda_query()
    has_maca = bool(getattr(torch.version, "maca", None))
    expected = "maca" if (has_maca and available) else "cuda-standin" if available else "emulated"
    assert resolve(refresh=True).kind == expected


def test_fake_maca_host_resolves_to_maca(fake_maca_host):
    res = resolve(refresh=True)
    assert res.kind == "maca"
    assert res.torch_device == "cuda"
    assert res.device_name == fake_maca_host.device_name
    assert repr(fake_maca_host.version_maca) in res.reason
    assert f"MACA_PATH={fake_maca_host.maca_path} (found)" in res.reason
    assert str(fake_maca_host.mx_smi) in res.reason
    assert res.evidence.mx_smi == str(fake_maca_host.mx_smi)


def test_explicit_maca_on_fake_host(fake_maca_host, monkeypatch):
    monkeypatch.setenv("MACA_INFER_DEVICE", "maca")
    assert resolve(refresh=True).kind == "maca"


def test_cuda_standin_without_mcpytorch(monkeypatch):
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (True, 2))
    monkeypatch.setattr(detect, "_device_name", lambda evidence: "NVIDIA H100")
    monkeypatch.delattr(torch.version, "maca", raising=False)
    res = resolve(refresh=True)
    assert (res.kind, res.torch_device, res.device_name) == ("cuda-standin", "cuda", "NVIDIA H100")
    monkeypatch.setenv("MACA_INFER_DEVICE", "cuda")
    assert resolve(refresh=True).kind == "cuda-standin"


def test_mcpytorch_without_a_device_is_emulated_and_says_why(cpu_only_host, monkeypatch):
    monkeypatch.setattr(torch.version, "maca", "3.3.0.15", raising=False)
    res = resolve(refresh=True)
    assert res.kind == "emulated"
    assert "mcPyTorch is installed but sees no device" in res.reason


def test_asking_for_maca_without_it_is_an_error_naming_what_was_looked_for(cpu_only_host, monkeypatch):
    monkeypatch.setenv("MACA_INFER_DEVICE", "maca")
    with pytest.raises(RuntimeError) as info:
        resolve(refresh=True)
    message = str(info.value)
    for looked_for in ("torch.version.maca", "MACA_PATH", "mx-smi"):
        assert looked_for in message
    assert "found:" in message and "torch.cuda.is_available()=False" in message


def test_asking_for_maca_with_mcpytorch_but_no_device_names_the_missing_device(cpu_only_host, monkeypatch):
    monkeypatch.setattr(torch.version, "maca", "3.3.0.15", raising=False)
    monkeypatch.setenv("MACA_INFER_DEVICE", "maca")
    with pytest.raises(RuntimeError, match=r"missing a visible device"):
        resolve(refresh=True)


def test_asking_for_cuda_without_a_gpu_is_an_error(cpu_only_host, monkeypatch):
    monkeypatch.setenv("MACA_INFER_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match=r"MACA_INFER_DEVICE=cuda but torch.cuda.is_available\(\) is False"):
        resolve(refresh=True)


def test_explicit_emulated_wins_over_a_present_device(fake_maca_host, monkeypatch):
    monkeypatch.setenv("MACA_INFER_DEVICE", "emulated")
    res = resolve(refresh=True)
    assert res.kind == "emulated" and res.torch_device == "cpu"
    assert "a device is present but emulation was asked for" in res.reason


@pytest.mark.parametrize("bad", ["gpu", "MACA2", "cpu"])
def test_bad_device_value_names_value_and_allowed(monkeypatch, bad):
    monkeypatch.setenv("MACA_INFER_DEVICE", bad)
    with pytest.raises(ValueError) as info:
        resolve(refresh=True)
    message = str(info.value)
    assert repr(bad) in message
    for allowed in envs.VARIABLES["MACA_INFER_DEVICE"][0]:
        assert allowed in message


def test_value_is_case_insensitive(monkeypatch, cpu_only_host):
    monkeypatch.setenv("MACA_INFER_DEVICE", "EMULATED")
    assert resolve(refresh=True).kind == "emulated"


def test_resolution_is_cached_until_refresh(fake_maca_host, monkeypatch):
    first = resolve(refresh=True)
    assert first.kind == "maca"
    monkeypatch.setenv("MACA_INFER_DEVICE", "emulated")
    assert resolve() is first  # cached: the environment is read once
    assert resolve(refresh=True).kind == "emulated"


def test_resolution_is_frozen(cpu_only_host):
    res = resolve(refresh=True)
    with pytest.raises(AttributeError):
        res.kind = "maca"  # type: ignore[misc]


def test_activate_on_a_maca_host_leaves_torch_alone(fake_maca_host, monkeypatch):
    import os

    from maca_infer.common.device import activate, emulation, torch_device
    from maca_infer.common.device._patch import PATCHES

    if emulation.is_installed():
        pytest.skip("this process runs with the emulation installed process-wide")
    environ = {k: v for k, v in os.environ.items() if k != "MACA_SMALL_PAGESIZE_ENABLE"}
    monkeypatch.setattr(os, "environ", environ)  # activate() writes the env: keep it to this test
    stock_is_available = torch.cuda.is_available
    res = activate(framework="lmdeploy")
    assert res.kind == "maca" and torch_device() == torch.device("cuda")
    assert not emulation.is_installed() and PATCHES.records() == []
    assert torch.cuda.is_available is stock_is_available
    # on a MACA host the vendor knobs and the toolkit dirs are applied
    assert environ["MACA_SMALL_PAGESIZE_ENABLE"] == "1"
    assert str(fake_maca_host.maca_path / "lib") in environ["LD_LIBRARY_PATH"].split(os.pathsep)
