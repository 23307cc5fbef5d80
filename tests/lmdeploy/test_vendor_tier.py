"""LMDeploy's attention layer on the vendor tier (MetaX's flash_attn / mcoplib, faked on CPU).

The three engine steps of test_dlinfer_interface's attention test (fresh
prefill, prefill on a cached prefix, decode), run with
MACA_INFER_OPS_IMPL=vendor and the CPU fakes of tests/ops/vendor_fakes: every
KV write and attention call goes from LMDeploy's DlinferAttentionImpl through
maca-infer's dlinfer ops into common/ops' vendor marshalling, and each step's
output is still checked against float64 attention.
"""

from __future__ import annotations

import sys

import pytest
import torch

from maca_infer.common.ops import _dispatch
from tests.lmdeploy.test_dlinfer_interface import maca_backend  # noqa: F401 - the fixture
from tests.lmdeploy.test_dlinfer_interface import test_attention_prefill_prefix_and_decode as engine_steps


@pytest.mark.parametrize("block_size", [16, 64])
def test_attention_steps_go_through_the_vendor_tier(vendor_fakes, maca_backend, block_size):  # noqa: F811
    engine_steps(maca_backend, block_size, torch.float16)

    tiers = _dispatch.tiers()
    assert tiers["fill_kv_cache"] == "vendor"
    assert tiers["paged_decode_attention"] == "vendor"
    assert "vendor" in {tiers.get("varlen_attention"), tiers.get("paged_prefill_attention")}
    assert {"flash_attn_varlen_func", "flash_attn_with_kvcache"} <= set(sys.modules["flash_attn"].calls)
    assert "reshape_and_cache_flash" in sys.modules["mcoplib._C"].calls
