"""fill_kv_cache: reference and Triton kernel vs a per-token loop.

A cache fill is a copy, so the check is exact: every written slot holds the
token's key/value bit for bit, and every other slot still holds the NaN it
was poisoned with.
"""

from __future__ import annotations

import pytest
import torch

from maca_infer.common.ops import _dispatch
from maca_infer.common.ops.kv_cache import fill_kv_cache

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def expected_caches(key, value, key_cache, value_cache, slots):
    """Poisoned caches filled token by token with Python ints."""
    key_expected, value_expected = key_cache.clone(), value_cache.clone()
    block_size = key_cache.shape[1]
    for token, slot in enumerate(slots):
        if slot == -1:
            continue
        key_expected[slot // block_size, slot % block_size] = key[token]
        value_expected[slot // block_size, slot % block_size] = value[token]
    return key_expected, value_expected


def random_slots(num_tokens, num_blocks, block_size, generator, padding=2):
    """Distinct slots spread over blocks in random order, plus -1 padding tokens."""
    slots = torch.randperm(num_blocks * block_size, generator=generator)[: num_tokens - padding].tolist()
    return slots[: len(slots) // 2] + [-1] * padding + slots[len(slots) // 2:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", (8, 16, 64))
@pytest.mark.parametrize("num_kv_heads, head_dim, v_head_dim", [(1, 64, 64), (3, 24, 40), (2, 192, 128)])
@pytest.mark.parametrize("slots_dtype", (torch.int32, torch.int64))
def test_fill_kv_cache(ops_impl, dtype, block_size, num_kv_heads, head_dim, v_head_dim, slots_dtype, nan_tensor):
    check_fill(ops_impl, dtype, block_size, num_kv_heads, head_dim, v_head_dim, slots_dtype, nan_tensor)


def check_fill(impl, dtype, block_size, num_kv_heads, head_dim, v_head_dim, slots_dtype, nan_tensor, num_tokens=7):
    """Random tokens (with -1 padding) into NaN caches through ``impl``; every slot checked bit for bit."""
    generator = torch.Generator().manual_seed(block_size + head_dim)
    num_blocks = 3
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, v_head_dim, generator=generator).to(dtype)
    key_cache = nan_tensor((num_blocks, block_size, num_kv_heads, head_dim), dtype)
    value_cache = nan_tensor((num_blocks, block_size, num_kv_heads, v_head_dim), dtype)
    slots = random_slots(num_tokens, num_blocks, block_size, generator)
    key_expected, value_expected = expected_caches(key, value, key_cache, value_cache, slots)

    fill_kv_cache(key, value, key_cache, value_cache, torch.tensor(slots, dtype=slots_dtype))
    assert _dispatch.last_impl("fill_kv_cache") == impl
    assert torch.equal(key_cache.isnan(), key_expected.isnan()), "a slot was written that should not be, or missed"
    assert torch.equal(value_cache.isnan(), value_expected.isnan())
    assert torch.equal(key_cache.nan_to_num(), key_expected.nan_to_num())
    assert torch.equal(value_cache.nan_to_num(), value_expected.nan_to_num())


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_strided_inputs_and_cache_view_of_a_pool(ops_impl, dtype, nan_tensor):
    # key/value are views of a fused qkv output; the cache is one layer of a
    # [layers, 2, blocks, block, heads, dim] pool (non-contiguous view)
    generator = torch.Generator().manual_seed(0)
    num_tokens, heads, dim, block_size, num_blocks = 5, 2, 32, 16, 4
    qkv = torch.randn(num_tokens, (4 + 2 * heads) * dim, generator=generator).to(dtype)
    key = qkv[:, 4 * dim: (4 + heads) * dim].view(num_tokens, heads, dim)
    value = qkv[:, (4 + heads) * dim:].view(num_tokens, heads, dim)
    pool = nan_tensor((2, 2, num_blocks, block_size, heads, dim), dtype)
    pool_before = pool.clone()
    key_cache, value_cache = pool[1, 0], pool[1, 1]
    slots = [63, 0, 17, -1, 40]  # last slot of the last block, first slot, out of order
    key_expected, value_expected = expected_caches(key, value, key_cache, value_cache, slots)
    fill_kv_cache(key, value, key_cache, value_cache, torch.tensor(slots, dtype=torch.int32))
    assert torch.equal(key_cache.nan_to_num(), key_expected.nan_to_num())
    assert torch.equal(value_cache.nan_to_num(), value_expected.nan_to_num())
    assert torch.equal(key_cache.isnan(), key_expected.isnan())
    # the other layer of the pool is untouched
    assert pool[0].isnan().all() and pool_before[0].isnan().all()


def test_all_padding_writes_nothing(ops_impl, nan_tensor):
    key = torch.randn(3, 1, 16)
    key_cache = nan_tensor((2, 8, 1, 16), torch.float32)
    value_cache = nan_tensor((2, 8, 1, 16), torch.float32)
    fill_kv_cache(key, key.clone(), key_cache, value_cache, torch.full((3,), -1, dtype=torch.int64))
    assert key_cache.isnan().all() and value_cache.isnan().all()


def _args(num_tokens=2, heads=2, dim=16, block_size=8, num_blocks=2, dtype=torch.float16, slots=None):
    key = torch.randn(num_tokens, heads, dim).to(dtype)
    value = torch.randn(num_tokens, heads, dim).to(dtype)
    key_cache = torch.zeros(num_blocks, block_size, heads, dim, dtype=dtype)
    value_cache = torch.zeros(num_blocks, block_size, heads, dim, dtype=dtype)
    slots = torch.tensor(slots if slots is not None else list(range(num_tokens)), dtype=torch.int32)
    return [key, value, key_cache, value_cache, slots]


def _with(index, transform, **kwargs):
    args = _args(**kwargs)
    args[index] = transform(args[index])
    return lambda: fill_kv_cache(*args)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: fill_kv_cache(*_args(block_size=12)), "block_size=12 is not supported"),
        (lambda: fill_kv_cache(*_args(block_size=4)), "block_size=4 is not supported"),
        (lambda: fill_kv_cache(*_args(slots=[0, 16])), r"slots in \[0, 16\]"),
        (lambda: fill_kv_cache(*_args(slots=[0, -2])), r"slots in \[-2, 0\]"),
        (_with(0, lambda k: k.float()), "value has dtype float16"),
        (_with(2, lambda c: c.float()), "key_cache has dtype float32"),
        (_with(0, lambda k: k.int()), "key has dtype int32"),
        (_with(1, lambda v: v[:1]), "value has num_tokens"),
        (_with(2, lambda c: c[..., :8]), "key_cache has head_dim"),
        (_with(3, lambda c: c[:, :, :1]), "value_cache has num_kv_heads"),
        (_with(3, lambda c: torch.cat([c, c])), "value_cache has"),
        (_with(4, lambda s: s.float()), "slot_mapping has dtype float32"),
        (_with(4, lambda s: s[:1]), r"slot_mapping has length \(num_tokens\) 1, expected 2"),
        (_with(0, lambda k: k[0]), "key must be"),
        (_with(3, lambda c: c.to("meta")), "one device"),
        (_with(0, lambda k: k.transpose(0, 2).contiguous().transpose(0, 2)), "key's last dimension must be contiguous"),
        (_with(2, lambda c: c.transpose(2, 3).contiguous().transpose(2, 3)), "key_cache's last dimension"),
    ],
)
def test_bad_input_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernel_compiles_for_gpu_without_spills(gpu_builds):
    builds = gpu_builds("""
        import torch
        from maca_infer.common.ops.kv_cache import fill_kv_cache
        key = torch.randn(4, 8, 128, dtype=torch.bfloat16)
        cache = torch.zeros(4, 16, 8, 128, dtype=torch.bfloat16)
        fill_kv_cache(key, key, cache, cache.clone(), torch.arange(4, dtype=torch.int32))
    """)
    assert len(builds) == 1 and builds[0]["usage"]["LOCAL"] == 0, builds
