"""bench/ops.py: the byte and FLOP counts, and the report files.

Not a timing test: it checks the arithmetic of the floors against the sizes
of the tensors each case really builds, and that the report is written.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from maca_infer.bench import ops as bench


def _case(cases, op, model):
    return next(c for c in cases if c.op == op and c.model == model)


def test_bytes_equal_the_tensors_the_case_touches():
    cases = bench.build_cases(batch=4, context=64, prefill_len=32, block_size=16, group_size=128)
    rms = _case(cases, "rms_norm", "Llama-3-8B")
    x = torch.empty(4, 4096, dtype=torch.bfloat16)
    assert rms.bytes == 2 * x.nbytes + 4096 * 2  # read x, write y, read weight
    dec = _case(cases, "paged_decode_attention", "Llama-3-8B")
    kv = torch.empty(4, 64, 8, 128, dtype=torch.bfloat16)  # B, L, Hk, D of K (and V)
    q = torch.empty(4, 32, 128, dtype=torch.bfloat16)
    assert dec.bytes == 2 * kv.nbytes + 2 * q.nbytes
    assert dec.flops == 2 * (2 * 4 * 32 * 64 * 128)  # QK^T and PV
    moe_dense = _case(cases, "fused_moe bf16", "Mixtral-8x7B")
    moe_int4 = _case(cases, "fused_moe w4a16 g128", "Mixtral-8x7B")
    # int4 weights: 1/4 of the bf16 bytes plus one bf16 scale per 128 weights
    act = 2 * 1 * 4096 * 2
    assert (moe_int4.bytes - act) / (moe_dense.bytes - act) == (0.5 + 2 / 128) / 2


def test_floor_is_the_slower_of_memory_and_compute():
    c = bench.Case("x", "m", "s", bytes=1e9, flops=1e12)
    assert c.floor_s(1e12, 1e15) == 1e-3 and c.bound(1e12, 1e15) == "memory"
    assert c.floor_s(1e12, 1e14) == 1e-2 and c.bound(1e12, 1e14) == "compute"


def test_report_files(tmp_path):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--no-host", "--out", str(tmp_path), "--batch", "2", "--context", "32"])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "ops.json").read_text())
    assert data["cases"]
    assert all(c["floor_s"] > 0 for c in data["cases"])
    assert (tmp_path / "ops.md").read_text().count("\n| ") >= len(data["cases"])
    assert (tmp_path / "ops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiers_and_fallbacks_are_in_the_report(monkeypatch):
    from maca_infer.common.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_last", {})
    monkeypatch.setattr(_dispatch, "_fallbacks", [])
    assert bench.tiers_markdown() == ""  # nothing ran in this process (host figures run in a subprocess)
    monkeypatch.setattr(_dispatch, "_last", {"rms_norm": "reference", "silu_and_mul": "triton"})
    monkeypatch.setattr(_dispatch, "_fallbacks", [{"op": "rms_norm", "reason": "RuntimeError: planted",
                                                   "shapes": "(3, 64) float16 on cuda:0", "device": "maca"}])
    text = bench.tiers_markdown()
    assert "| rms_norm | reference |" in text and "| silu_and_mul | triton |" in text
    assert "- rms_norm: RuntimeError: planted (inputs (3, 64) float16 on cuda:0)" in text


def test_w8a8_rows_count_int8_bytes_and_floor_at_the_int8_peak():
    cases = bench.build_cases(batch=4, context=64, prefill_len=32, block_size=16, group_size=128)
    for model in ("Llama-3-8B", "DeepSeek-V3"):
        lin = _case(cases, "w8a8_int8_linear", model)
        k, n = (4096, 2 * 14336) if model == "Llama-3-8B" else (7168, 2 * 18432)
        q_w, w_scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
        q_x, x_scale = torch.empty(4, k, dtype=torch.int8), torch.empty(4, 1)
        y = torch.empty(4, n, dtype=torch.bfloat16)
        assert lin.bytes == q_w.nbytes + w_scale.nbytes + q_x.nbytes + x_scale.nbytes + y.nbytes
        assert lin.flops == 2 * 4 * k * n
        # compute-bound at batch 4096 tokens would be judged against 560 TOPS, not 280 TFLOP/s
        assert lin.floor_s(1e30, 280e12) == lin.flops / 560e12
    dense = _case(cases, "fused_moe bf16", "DeepSeek-V3")
    int8 = _case(cases, "fused_moe w8a8", "DeepSeek-V3")
    assert int8.flops == dense.flops and int8.rate_scale == 2.0
    act = 2 * 1 * 7168 * 2
    # int8 weights: half the bf16 bytes plus one fp32 scale per output channel (2I + H per expert)
    per_expert_dense = 3 * 2048 * 7168 * 2
    per_expert_int8 = 3 * 2048 * 7168 + (2 * 2048 + 7168) * 4
    assert (int8.bytes - act) / (dense.bytes - act) == pytest.approx(per_expert_int8 / per_expert_dense)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert p.parse_args([]).peak_int8_tops == 560.0


def test_planned_attention_step_syncs_once(monkeypatch):
    """The host figures' attention step (issue #12, part 5): with a plan per step the reference tier
    reads the lengths once per step, not once per layer, and issues fewer aten ops (launches on a device)."""
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "reference")
    counts = {}
    for planned in (False, True):
        step = bench._attention_step(batch=3, context=20, block_size=8, layers=4, planned=planned)
        with bench._count_aten() as c:
            step()
        counts[planned] = (c.ops, c.syncs)
    assert counts[False][1] == 4 and counts[True][1] == 1
    assert counts[True][0] < counts[False][0]
