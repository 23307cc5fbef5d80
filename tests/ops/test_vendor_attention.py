"""The vendor tier's attention and MLA marshalling, through CPU fakes of MetaX's libraries.

``vendor_fakes`` (tests/conftest.py) puts fakes of flash_attn 2.6.3+metax and
flash_mla 1.0.1+metax on the path (written from their public docstrings:
tests/ops/vendor_fakes) and forces ``MACA_INFER_OPS_IMPL=vendor``. Every
result is checked against the float64 math of tests/ops/test_attention.py
and test_mla.py on the same awkward inputs (GQA/MQA, shuffled block tables
with garbage past each sequence, NaN in unused cache rows, windows, softcap,
ALiBi, queries that see no key), so the cache layouts, block tables,
``cache_seqlens``, scales, windows and MLA's 512 + 64 split we hand over are
what the libraries document.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from maca_infer.common.ops import _dispatch
from maca_infer.common.ops import attention as attn
from maca_infer.common.ops.mla import mla_decode
from tests.ops.test_attention import (
    VARLEN_CASES,
    _check_decode,
    _cu,
    _decode_inputs,
    _expected_f64,
    _expected_options,
    _options,
    _paged_cache,
    _sequences,
)
from tests.ops import test_mla as mla_tests
from tests.ops.test_mla import PagedLatents, decode_float64

HALF = [torch.float16, torch.bfloat16]
# what flash-attn serves: its ALiBi is causal-only here, and softcap + ALiBi together is refused
SERVED_FEATURES = {"plain": {}, "window": {"sliding_window": 5}, "softcap": {"logit_softcap": 1.5},
                   "alibi": {"alibi_slopes": "alibi"}, "window-softcap": {"sliding_window": 7, "logit_softcap": 3.0}}


def _served_options(feature, num_q_heads):
    options = dict(SERVED_FEATURES[feature])
    if options.get("alibi_slopes") == "alibi":
        options["alibi_slopes"] = _options("alibi", num_q_heads)["alibi_slopes"]
    return options


def _calls(library):
    return sys.modules[library].calls


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("feature", list(SERVED_FEATURES))
@pytest.mark.parametrize("heads, head_dim, block_size", [((6, 2), 48, 16), ((3, 1), 80, 32), ((4, 4), 64, 64)])
def test_paged_prefill(vendor_fakes, close, dtype, feature, heads, head_dim, block_size):
    num_q_heads, num_kv_heads = heads
    batch = [(1, 1), (5, 37), (17, 17), (1, 20), (3, 9), (4, 70)]
    q_lens, kv_lens = [b[0] for b in batch], [b[1] for b in batch]
    keys, values = _sequences(kv_lens, num_kv_heads, head_dim, head_dim, dtype, seed=1)
    key_cache, value_cache, block_table = _paged_cache(keys, values, block_size, seed=1)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    options = dict(_served_options(feature, num_q_heads), scale=0.19)
    out = torch.full((q.shape[0], num_q_heads, head_dim), float("nan"), dtype=dtype)

    attn.paged_prefill_attention(q, key_cache, value_cache, block_table, _cu(q_lens),
                                 torch.tensor(kv_lens, dtype=torch.int64), out=out, **options)

    assert _dispatch.last_impl("paged_prefill_attention") == "vendor"
    assert _calls("flash_attn")[-1] == "flash_attn_varlen_func"
    start = 0
    for b, q_len in enumerate(q_lens):
        expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b], **_expected_options(options))
        close(out[start:start + q_len], expected, dtype, f"sequence {b}")
        start += q_len


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen(vendor_fakes, close, dtype, case):
    q_lens, k_lens, causal, window = VARLEN_CASES[case]
    num_q_heads, num_kv_heads, head_dim = 6, 3, 64
    keys, values = _sequences(k_lens, num_kv_heads, head_dim, head_dim, dtype, seed=4)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=torch.Generator().manual_seed(5)).to(dtype)
    scale = 0.3  # not 1/sqrt(D): the scale must be handed over, not re-derived

    got = attn.varlen_attention(q, torch.cat(keys), torch.cat(values), _cu(q_lens), _cu(k_lens), causal=causal,
                                sliding_window=window, scale=scale)

    assert _dispatch.last_impl("varlen_attention") == "vendor"
    start = 0
    for b, q_len in enumerate(q_lens):
        expected, _ = _expected_f64(q[start:start + q_len], keys[b], values[b], causal=causal, window=window,
                                    scale=scale)
        close(got[start:start + q_len], expected, dtype, f"sequence {b}")
        start += q_len


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("feature, query_len, block_size", [
    ("plain", None, 16), ("plain", 3, 64), ("window", 2, 32), ("softcap", None, 64), ("alibi", 4, 16),
    ("window-softcap", 4, 32),
])
def test_paged_decode(vendor_fakes, close, dtype, feature, query_len, block_size):
    """kv_lens [1, 45, 16, 70]: with q_len 3-4 the first sequence's early queries see no key (lse -inf)."""
    num_q_heads, num_kv_heads, head_dim = 8, 2, 64
    q, keys, values, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, query_len, num_q_heads, num_kv_heads, head_dim, head_dim, block_size, [1, 45, 16, 70])
    options = dict(_served_options(feature, num_q_heads), scale=0.21)  # not 1/sqrt(D): handed over, not re-derived

    got, lse = attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, return_lse=True,
                                           **options)

    assert _dispatch.last_impl("paged_decode_attention") == "vendor"
    assert _calls("flash_attn")[-1] == "flash_attn_with_kvcache"
    _check_decode(close, q, keys, values, got, lse, dtype, options)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("block_size, library", [(64, "flash_mla"), (16, "flash_attn"), (32, "flash_attn")])
def test_mla_decode(vendor_fakes, close, dtype, block_size, library):
    """kv_lora_rank 512 + rope 64 = MetaX's head dim 576; a 0-length sequence gives 0 and lse -inf."""
    kv_lens, num_heads = [0, 70, 1, 130], 16
    paged = PagedLatents(kv_lens, 512, 64, block_size, dtype, seed=11)
    generator = torch.Generator().manual_seed(12)
    q_nope = torch.randn(len(kv_lens), num_heads, 512, generator=generator).to(dtype)
    q_rope = torch.randn(len(kv_lens), num_heads, 64, generator=generator).to(dtype)
    scale = 1.0 / math.sqrt(192) * 1.3  # DeepSeek-style: not 1/sqrt(576)
    out = torch.full((len(kv_lens), num_heads, 512), float("nan"), dtype=dtype)

    got, lse = mla_decode(q_nope, q_rope, paged.cache.unsqueeze(2), paged.block_table, torch.tensor(kv_lens),
                          scale, return_lse=True, out=out)

    assert got is out and _dispatch.last_impl("mla_decode") == "vendor"
    assert _calls(library)[-1] in ("flash_mla_with_kvcache", "flash_attn_with_kvcache")
    expected, expected_lse = decode_float64(q_nope, q_rope, paged.latents, 512, scale)
    close(got, expected, dtype, "mla output")
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("-inf")).all()
    assert (lse.double() - expected_lse)[finite].abs().max() < 1e-3


# --------------------------------------------------------------------------
# Forced vendor that cannot serve a call: an error that says why
# --------------------------------------------------------------------------
def _decode_call(dtype=torch.float16, head_dim=64, head_dim_v=64, block_size=16, **options):
    q, _, _, key_cache, value_cache, block_table, kv_seqlens = _decode_inputs(
        dtype, None, 4, 2, head_dim, head_dim_v, block_size, [5, 9])
    return lambda: attn.paged_decode_attention(q, key_cache, value_cache, block_table, kv_seqlens, **options)


def _varlen_call(causal, head_dim_v=32, **options):
    q = torch.randn(6, 2, 32, dtype=torch.float16)
    k = torch.randn(6, 2, 32, dtype=torch.float16)
    v = torch.randn(6, 2, head_dim_v, dtype=torch.float16)
    return lambda: attn.varlen_attention(q, k, v, _cu([6]), _cu([6]), causal=causal, **options)


def _mla_call(kv_lora_rank=512, block_size=64, dtype=torch.bfloat16):
    paged = PagedLatents([5], kv_lora_rank, 64, block_size, dtype, seed=1)
    q_nope, q_rope = torch.randn(1, 2, kv_lora_rank, dtype=dtype), torch.randn(1, 2, 64, dtype=dtype)
    return lambda: mla_decode(q_nope, q_rope, paged.cache, paged.block_table, torch.tensor([5]), 0.1)


@pytest.mark.parametrize("make, reason", [
    (lambda: _decode_call(dtype=torch.float32), "flash_attn takes float16/bfloat16, not float32"),
    (lambda: _decode_call(head_dim_v=32), "value head dim to equal the key's (32 != 64)"),
    (lambda: _varlen_call(True, head_dim_v=48), "value head dim to equal the key's (48 != 32)"),
    (lambda: _decode_call(block_size=8), "block_size 8"),
    (lambda: _varlen_call(False, alibi_slopes=torch.ones(2)), "non-causal ALiBi"),
    (lambda: _decode_call(logit_softcap=2.0, alibi_slopes=torch.ones(4)), "softcap and ALiBi"),
    (lambda: _mla_call(kv_lora_rank=256), "kv_lora_rank 512 + rope 64, got 256 + 64"),
    (lambda: _mla_call(dtype=torch.float32), "float16/bfloat16, not float32"),
])
def test_forced_vendor_that_cannot_serve_raises(vendor_fakes, make, reason):
    call = make()
    with pytest.raises(RuntimeError, match="MACA_INFER_OPS_IMPL=vendor cannot serve this call") as info:
        call()
    assert reason in str(info.value)


def test_small_pages_need_metax_switch(vendor_fakes, monkeypatch, close):
    call = _decode_call(block_size=16)
    monkeypatch.setenv("MACA_SMALL_PAGESIZE_ENABLE", "0")
    with pytest.raises(RuntimeError, match="multiple of 256, got block_size 16.*MACA_SMALL_PAGESIZE_ENABLE=1"):
        call()
    monkeypatch.setenv("MACA_SMALL_PAGESIZE_ENABLE", "1")
    call()
    assert _dispatch.last_impl("paged_decode_attention") == "vendor"


def test_mla_without_flash_mla_uses_flash_attn_576(vendor_fakes, monkeypatch, close):
    """A 64-token page prefers flash_mla; without it the same call goes to flash_attn with head dim 576."""
    from maca_infer.common.ops import vendor

    monkeypatch.setitem(sys.modules, "flash_mla", None)  # import flash_mla raises ImportError
    vendor.forget_libraries()
    _mla_call()()
    assert _calls("flash_attn")[-1] == "flash_attn_with_kvcache"


def test_planned_mla_decode_asks_flash_mla_for_its_schedule_once_per_batch(vendor_fakes, close):
    """A plan serves every layer: FlashMLA's get_mla_metadata runs once, flash_mla_with_kvcache per layer."""
    from maca_infer.common.ops.mla import plan_mla_decode

    kv_lens, num_heads, dtype, scale = [70, 1, 130], 16, torch.bfloat16, 0.07
    paged = PagedLatents(kv_lens, 512, 64, 64, dtype, seed=21)
    kv_seqlens = torch.tensor(kv_lens)
    plan = plan_mla_decode(paged.block_table, kv_seqlens, num_heads=num_heads, kv_lora_rank=512, rope_dim=64,
                           block_size=64, dtype=dtype)
    generator = torch.Generator().manual_seed(22)
    for layer in range(3):
        q_nope = torch.randn(len(kv_lens), num_heads, 512, generator=generator).to(dtype)
        q_rope = torch.randn(len(kv_lens), num_heads, 64, generator=generator).to(dtype)
        got = mla_decode(q_nope, q_rope, paged.cache, scale=scale, plan=plan)
        close(got, decode_float64(q_nope, q_rope, paged.latents, 512, scale)[0], dtype, f"layer {layer}")
    calls = _calls("flash_mla")
    assert calls.count("get_mla_metadata") == 1 and calls.count("flash_mla_with_kvcache") == 3


def test_varlen_hands_the_callers_longest_lengths_to_flash_attn(vendor_fakes, close):
    """max_seqlen_q/k given by the caller reach flash_attn as they are (no host read): the fake refuses
    bounds below a sequence's length, so a too-small one shows it was passed through."""
    q_lens = k_lens = [3, 9]
    keys, values = _sequences(k_lens, 2, 32, 32, torch.float16, seed=8)
    q = torch.randn(sum(q_lens), 2, 32).half()
    args = (q, torch.cat(keys), torch.cat(values), _cu(q_lens), _cu(k_lens))
    got = attn.varlen_attention(*args, max_seqlen_q=9, max_seqlen_k=9)
    expected, _ = _expected_f64(q[3:], keys[1], values[1])
    close(got[3:], expected, torch.float16, "sequence 1")
    with pytest.raises(RuntimeError, match="max_seqlen_q/k below a sequence's length"):
        attn.varlen_attention(*args, max_seqlen_q=9, max_seqlen_k=4)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_varlen_with_a_narrower_value_head(vendor_fakes, close, dtype):
    """DeepSeek's prefill shape (qk 192, v 128) scaled down: v zero-padded to the qk head dim, output cut back."""
    q_lens, k_lens = [5, 1, 12], [9, 1, 12]
    keys, values = _sequences(k_lens, 2, 48, 32, dtype, seed=14)
    q = torch.randn(sum(q_lens), 4, 48, generator=torch.Generator().manual_seed(15)).to(dtype)
    got = attn.varlen_attention(q, torch.cat(keys), torch.cat(values), _cu(q_lens), _cu(k_lens))
    assert got.shape == (sum(q_lens), 4, 32) and _dispatch.last_impl("varlen_attention") == "vendor"
    start = 0
    for b, q_len in enumerate(q_lens):
        close(got[start:start + q_len], _expected_f64(q[start:start + q_len], keys[b], values[b])[0], dtype,
              f"sequence {b}")
        start += q_len


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("causal", (True, False))
def test_mla_prefill(vendor_fakes, close, nan_tensor, dtype, causal):
    """test_mla's non-absorbed prefill (its float64 loop) on the vendor tier: kv_b_proj GEMM, then flash_attn."""
    mla_tests.test_mla_prefill("vendor", dtype, causal, close, nan_tensor)
    assert _dispatch.last_impl("varlen_attention") == "vendor" and _calls("flash_attn")[-1] == "flash_attn_varlen_func"


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("block_size", (16, 64))
def test_fill_mla_cache(vendor_fakes, nan_tensor, dtype, block_size):
    """test_mla's cache fill (strided kv_c / k_pe, padding slots) through reshape_and_cache_flash."""
    mla_tests.test_fill_mla_cache("vendor", dtype, block_size, nan_tensor)
    assert sys.modules["mcoplib._C"].calls[-1] == "reshape_and_cache_flash"
