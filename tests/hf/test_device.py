"""maca_infer.adapters.hf.device(): the maca device through common.device, and MACA workarounds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import maca_infer.adapters.hf as maca_hf
from maca_infer.adapters.hf import _device
from maca_infer.common import device as maca_device


def test_device_is_common_devices_answer():
    assert maca_hf.device() == maca_device.torch_device()
    assert maca_hf.resolve_device("maca") == maca_hf.device()
    assert maca_hf.resolve_device(None) == maca_hf.device()
    assert maca_hf.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert maca_hf.resolve_device("cpu") == torch.device("cpu")
    assert maca_hf.device_map() == {"": str(maca_hf.device())}
    if maca_device.is_emulated():
        assert maca_hf.device().type == "cpu" and maca_hf.resolve_device("maca:0").type == "cpu"
    else:
        assert maca_hf.resolve_device("maca:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("bad, message", [("gpu-please", "'gpu-please' is not a device"), (-1, "device index -1"), (1.5, "of type float")])
def test_bad_device_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        maca_hf.resolve_device(bad)


def test_tensors_and_models_land_on_the_device():
    model = torch.nn.Linear(4, 4).to(maca_hf.device())
    assert next(model.parameters()).device == maca_hf.device()
    assert model(torch.ones(1, 4, device=maca_hf.device())).device == maca_hf.device()


@pytest.fixture
def pretend_maca_host(monkeypatch):
    """common.device answers "maca" (no MetaX stack here); the adapter's activation runs afresh."""
    monkeypatch.setattr(maca_device, "activate", lambda framework=None, graph_mode=None: SimpleNamespace(kind="maca"))
    _device._reset_for_tests()
    enabled_before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(enabled_before)
    _device._reset_for_tests()


def test_maca_workarounds_applied_and_logged_on_maca(pretend_maca_host, maca_log):
    torch.backends.cuda.enable_cudnn_sdp(True)
    assert _device.activate() == "maca"
    assert torch.backends.cuda.cudnn_sdp_enabled() is False
    assert any("cuDNN SDPA disabled" in line and "diffusers#9704" in line for line in maca_log)
    _device.activate()  # idempotent: nothing logged twice
    assert sum("cuDNN SDPA disabled" in line for line in maca_log) == 1


def test_no_workarounds_off_maca(monkeypatch):
    monkeypatch.setattr(maca_device, "activate", lambda framework=None, graph_mode=None: SimpleNamespace(kind="emulated"))
    _device._reset_for_tests()
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        assert _device.activate() == "emulated"
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    finally:
        _device._reset_for_tests()
