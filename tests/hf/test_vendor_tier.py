"""The HF adapter on the vendor tier (MetaX's flash_attn / mcoplib, faked on CPU).

A tiny Llama in float16 with the adapter enabled and MACA_INFER_OPS_IMPL=vendor
(the CPU fakes of tests/ops/vendor_fakes on the path): every swapped op
(RMSNorm, SiLU-and-mul, rotary, varlen attention) must run on the vendor tier,
and the logits (left padding included) must match stock Transformers in float32.
"""

from __future__ import annotations

import sys

import torch

import maca_infer.adapters.hf as maca_hf
from maca_infer.common.ops import _dispatch

OPS = ("rms_norm", "silu_and_mul", "apply_rotary", "varlen_attention")


def test_llama_forward_goes_through_the_vendor_tier(vendor_fakes, load_llm, make_batch):
    stock, model = load_llm("llama"), load_llm("llama", torch.float16)
    ids, mask = make_batch(model.config.vocab_size, [6, 4])
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        maca_hf.enable(model)
        got = model(input_ids=ids, attention_mask=mask).logits

    assert {op: _dispatch.last_impl(op) for op in OPS} == {op: "vendor" for op in OPS}
    assert "flash_attn_varlen_func" in sys.modules["flash_attn"].calls
    real = mask.bool()
    error = (got.float() - expected)[real].abs().max() / expected[real].abs().max()
    assert error < 1e-2, f"relative logits error {error:.3g} (float16 vendor vs float32 stock)"
