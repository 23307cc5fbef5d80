"""The HF adapter on the vendor tier (MetaX's flash_attn / mcoplib, faked on CPU).

A tiny Llama in float16 with the adapter enabled and MACA_INFER_OPS_IMPL=vendor
(the CPU fakes of tests/ops/vendor_fakes on the path): every swapped op
(RMSNorm, SiLU-and-mul, rotary, varlen attention) must run on the vendor tier,
and the logits (left padding included) must match stock Transformers in float32.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

import maca_infer.adapters.hf as maca_hf
from maca_infer.adapters.hf import _compat
from maca_infer.common.ops import _dispatch
from maca_infer.modelzoo import get

OPS = ("rms_norm", "silu_and_mul", "apply_rotary", "varlen_attention")


def test_llama_forward_goes_through_the_vendor_tier(vendor_fakes):
    stock = AutoModelForCausalLM.from_pretrained(get("llama"), **_compat.dtype_kwargs(torch.float32)).eval()
    model = AutoModelForCausalLM.from_pretrained(get("llama"), **_compat.dtype_kwargs(torch.float16),
                                                 device_map=maca_hf.device_map()).eval()
    ids = torch.randint(3, model.config.vocab_size - 3, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        maca_hf.enable(model)
        got = model(input_ids=ids, attention_mask=mask).logits

    assert {op: _dispatch.last_impl(op) for op in OPS} == {op: "vendor" for op in OPS}
    assert "flash_attn_varlen_func" in sys.modules["flash_attn"].calls
    real = mask.bool()
    error = (got.float() - expected)[real].abs().max() / expected[real].abs().max()
    assert error < 1e-2, f"relative logits error {error:.3g} (float16 vendor vs float32 stock)"
