"""SGLang's "maca" attention backend on the vendor tier (MetaX's flash_attn, faked on CPU).

With MACA_INFER_OPS_IMPL=vendor and the CPU fakes of tests/ops/vendor_fakes on
the path, the backend's KV write and its paged prefill/decode attention go
through common/ops' vendor marshalling into (fake) flash_attn / mcoplib; the
output is checked against the float64 attention of test_backend_parity.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from maca_infer.adapters.sglang.attention_backend import MacaAttnBackend  # noqa: E402
from maca_infer.common.ops import _dispatch  # noqa: E402
from tests.sglang.test_backend_parity import (  # noqa: E402
    DECODE_CASE,
    EXTEND_CASE,
    HEAD_DIM,
    HK,
    HQ,
    _mha_setup,
    _reference,
    _run,
    _runner,
)


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("mode,lens,op", [(ForwardMode.EXTEND, EXTEND_CASE, "paged_prefill_attention"),
                                          (ForwardMode.DECODE, DECODE_CASE, "paged_decode_attention")],
                         ids=["extend", "decode"])
def test_mha_forward_goes_through_the_vendor_tier(vendor_fakes, page_size, mode, lens, op):
    prefix_lens, new_lens = lens
    dtype = torch.bfloat16
    case = _mha_setup(page_size, dtype, prefix_lens, new_lens, mode, seed=page_size)
    flash_calls = len(sys.modules["flash_attn"].calls) if "flash_attn" in sys.modules else 0

    out = _run(MacaAttnBackend(_runner(case.pools[0])), mode, case, case.batches[0])

    assert _dispatch.last_impl(op) == "vendor" and _dispatch.last_impl("fill_kv_cache") == "vendor"
    assert len(sys.modules["flash_attn"].calls) > flash_calls, "flash_attn (fake) was not called"
    ref = _reference(case.q, case.keys, case.values, prefix_lens, new_lens, case.layer.scaling, HK)
    assert out.shape == (sum(new_lens), HQ * HEAD_DIM)
    torch.testing.assert_close(out.double().view_as(ref), ref, atol=2e-2, rtol=2e-2)
    written = torch.cat([s[p:] for s, p in zip(case.slots, prefix_lens)])
    torch.testing.assert_close(case.pools[0][1].k_buffer[0][written], case.new_k, atol=0, rtol=0)
