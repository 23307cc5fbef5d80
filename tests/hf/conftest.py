"""Fixtures of the HF adapter tests.

- ``op_calls``: counts calls of our ops (rms_norm, silu/gelu_and_mul,
  apply_rotary, varlen_attention, fused_moe) while still running them, so a parity
  test also proves our kernels were the ones computing.
- ``maca_log``: the lines the maca_infer logger writes during a test
  (log_once's memory cleared first, so one-time notices show up again).
- ``load_llm(kind, dtype)``: a tiny model-zoo checkpoint loaded on the maca
  device (``device_map``), in eval mode.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

OPS = {
    "maca_infer.common.ops.norm": ("rms_norm",),
    "maca_infer.common.ops.activation": ("silu_and_mul", "gelu_and_mul"),
    "maca_infer.common.ops.rotary": ("apply_rotary",),
    "maca_infer.common.ops.attention": ("varlen_attention",),
    "maca_infer.common.ops.moe": ("fused_moe",),
}


@pytest.fixture
def op_calls(monkeypatch):
    import importlib

    calls: Counter = Counter()
    for module_name, names in OPS.items():
        module = importlib.import_module(module_name)
        for name in names:
            real = getattr(module, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return calls


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def maca_log(monkeypatch):
    from maca_infer.common import log

    monkeypatch.setattr(log, "_seen", set())
    handler = _Lines()
    root = log.get_logger("maca_infer")
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture(scope="session")
def load_llm():
    from transformers import AutoModelForCausalLM

    import maca_infer.adapters.hf as maca_hf
    from maca_infer.adapters.hf import _compat
    from maca_infer.modelzoo import get

    def load(kind: str, dtype: torch.dtype = torch.float32, **kwargs):
        path = get(kind)
        model = AutoModelForCausalLM.from_pretrained(path, **_compat.dtype_kwargs(dtype),
                                                     device_map=maca_hf.device_map(), **kwargs)
        return model.eval()

    return load


def left_padded_batch(vocab_size: int, lengths: list[int], *, seed: int = 0, device=None):
    """Random token ids [B, max(lengths)] left-padded to the longest, and the 2D mask."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.randint(3, vocab_size - 3, (len(lengths), longest), generator=generator)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, longest - length:] = 1
        ids[row, : longest - length] = 0
    return ids.to(device), mask.to(device)


@pytest.fixture(scope="session")
def make_batch():
    return left_padded_batch
