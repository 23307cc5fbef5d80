"""No silent fallback (issue #12): on a device a failing auto-picked kernel raises, unless allowed.

A device is faked at the two seams the dispatch consults: device detection
(``fake_maca_host``, as in tests/device/test_detect.py) and ``_on_device``
(CPU tensors stand in for device tensors). The kernel failure is planted by
replacing an op's Triton launcher with one that raises.
"""

from __future__ import annotations

import logging

import pytest
import torch

from maca_infer.common.device import detect
from maca_infer.common.ops import _dispatch
from maca_infer.common.ops import norm

PLANTED = "planted kernel failure: out of resources: shared memory"


@pytest.fixture
def auto_on_device(monkeypatch):
    """Auto mode, tensors treated as device tensors, fresh dispatch records, a failing rms_norm kernel."""
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "auto")
    monkeypatch.delenv("MACA_INFER_OPS_FALLBACK", raising=False)
    monkeypatch.setattr(_dispatch, "_on_device", lambda tensors: True)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_last", {})
    monkeypatch.setattr(_dispatch, "_broken", set())
    monkeypatch.setattr(_dispatch, "_fallbacks", [])

    def failing_kernel(*args, **kwargs):
        raise RuntimeError(PLANTED)

    monkeypatch.setattr(norm, "_rms_norm_triton", failing_kernel)


@pytest.fixture
def warnings_seen(caplog, monkeypatch):
    """WARNING records of the maca_infer logger (it does not propagate to the root logger)."""
    from maca_infer.common import log

    monkeypatch.setattr(log, "_seen", set())  # log_once: each test sees its own first warning
    logger = logging.getLogger("maca_infer")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="maca_infer")
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    logger.removeHandler(caplog.handler)


def _expected(x, weight):
    xf = x.double()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()


def test_kernel_failure_on_a_maca_device_raises_with_op_shapes_and_cause(fake_maca_host, auto_on_device):
    x, weight = torch.randn(3, 64), torch.randn(64)
    with pytest.raises(RuntimeError) as info:
        norm.rms_norm(x, weight)
    message = str(info.value)
    assert "rms_norm" in message and "(3, 64) float32" in message and "(64,) float32" in message
    assert PLANTED in message and "MACA_INFER_OPS_FALLBACK=1" in message and "maca device" in message
    assert _dispatch.fallbacks() == [] and _dispatch.last_impl("rms_norm") is None
    with pytest.raises(RuntimeError):  # not marked broken: the next call fails loudly too
        norm.rms_norm(x, weight)


def test_kernel_failure_on_a_cuda_standin_raises_too(monkeypatch, auto_on_device):
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (True, 1))
    monkeypatch.setattr(detect, "_device_name", lambda evidence: "NVIDIA A100")
    monkeypatch.delattr(torch.version, "maca", raising=False)
    monkeypatch.delenv("MACA_INFER_DEVICE", raising=False)
    detect.clear_cache()
    try:
        with pytest.raises(RuntimeError, match="cuda-standin device"):
            norm.rms_norm(torch.randn(2, 32), torch.randn(32))
    finally:
        detect.clear_cache()


def test_allowed_fallback_warns_records_and_runs_the_reference(fake_maca_host, auto_on_device, monkeypatch,
                                                               warnings_seen):
    monkeypatch.setenv("MACA_INFER_OPS_FALLBACK", "1")
    x, weight = torch.randn(3, 64), torch.randn(64)
    out = norm.rms_norm(x, weight)
    assert torch.allclose(out.double(), _expected(x, weight), rtol=1e-5, atol=1e-5)
    norm.rms_norm(x, weight)  # the op stays on the reference: one warning, one record
    [warning] = [w for w in warnings_seen() if "rms_norm" in w]
    assert PLANTED in warning and "MACA_INFER_OPS_FALLBACK=1" in warning
    assert _dispatch.fallbacks() == [{"op": "rms_norm", "reason": f"RuntimeError: {PLANTED}",
                                      "shapes": "(3, 64) float32 on cpu, (64,) float32 on cpu", "device": "maca"}]
    assert _dispatch.tiers() == {"rms_norm": "reference"}


def test_emulated_device_keeps_falling_back(monkeypatch, auto_on_device, warnings_seen):
    monkeypatch.setenv("MACA_INFER_DEVICE", "emulated")
    detect.clear_cache()
    try:
        x, weight = torch.randn(2, 16), torch.randn(16)
        out = norm.rms_norm(x, weight)
    finally:
        detect.clear_cache()
    assert torch.allclose(out.double(), _expected(x, weight), rtol=1e-5, atol=1e-5)
    assert [f["device"] for f in _dispatch.fallbacks()] == ["emulated"]
    assert any(PLANTED in w for w in warnings_seen())


def test_an_explicit_triton_request_still_reraises_the_kernel_error(fake_maca_host, auto_on_device, monkeypatch):
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "triton")
    monkeypatch.setenv("MACA_INFER_OPS_FALLBACK", "1")  # allows auto fallbacks only
    with pytest.raises(RuntimeError, match="^planted"):
        norm.rms_norm(torch.randn(2, 16), torch.randn(16))
