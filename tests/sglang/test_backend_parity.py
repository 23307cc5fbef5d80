"""Backend-level parity: the "maca" attention backend vs SGLang's torch_native and float64.

Everything is SGLang's real machinery built on CPU: ReqToTokenPool,
MHATokenToKVPool / MLATokenToKVPool, ForwardBatch, RadixAttention. Each case
is a random batch mixing cached-prefix lengths (0, ragged, page-crossing),
with pages scattered out of order in the pool. The same batch runs through
our backend and through torch_native on two identical pool copies; both are
compared with a float64 computation from the original K/V (not from the
cache), and the K/V each backend wrote into its pool must agree.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.runtime_context import get_parallel  # noqa: E402

from maca_infer.adapters.sglang.attention_backend import (  # noqa: E402
    MacaAttnBackend,
    MacaMLAAttnBackend,
    build_block_table,
)

MAX_CONTEXT = 320
NUM_REQ_ROWS = 12

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


# ---------------------------------------------------------------- batch builder


def _scatter_slots(seq_lens, page_size, gen):
    """Slots of every token of every request: whole pages, shuffled over the pool.

    Page 0 (slots [0, page_size)) stays free: SGLang keeps slot 0 for padding.
    Returns (list of int64 slot tensors, pool size in tokens).
    """
    pages_per_req = [max(1, math.ceil(n / page_size)) for n in seq_lens]
    num_pages = sum(pages_per_req) + 3  # a few never-used pages in between
    page_ids = (torch.randperm(num_pages, generator=gen) + 1).tolist()
    slots, start = [], 0
    for n, count in zip(seq_lens, pages_per_req):
        pages = torch.tensor(page_ids[start:start + count], dtype=torch.int64)
        start += count
        pos = torch.arange(n)
        slots.append(pages[pos // page_size] * page_size + pos % page_size)
    return slots, (num_pages + 1) * page_size


def _make_batch(mode, prefix_lens, new_lens, page_size, gen, req_to_token_pool, slots):
    batch_size = len(prefix_lens)
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    rows = (torch.randperm(NUM_REQ_ROWS, generator=gen)[:batch_size] + 1).to(torch.int64)
    for row, s in zip(rows.tolist(), slots):
        req_to_token_pool.req_to_token[row, : s.numel()] = s.to(torch.int32)
    out_cache_loc = torch.cat([s[p:] for s, p in zip(slots, prefix_lens)])
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, new_lens)])
    batch = ForwardBatch(
        forward_mode=mode,
        batch_size=batch_size,
        input_ids=torch.zeros(sum(new_lens), dtype=torch.int64),
        req_pool_indices=rows,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
        out_cache_loc=out_cache_loc,
        seq_lens_sum=sum(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64),
        positions=positions,
    )
    if mode == ForwardMode.EXTEND:
        batch.extend_seq_lens = torch.tensor(new_lens, dtype=torch.int32)
        batch.extend_prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32)
        batch.extend_seq_lens_cpu = list(new_lens)
        batch.extend_prefix_lens_cpu = list(prefix_lens)
        batch.extend_num_tokens = sum(new_lens)
        starts = torch.zeros(batch_size, dtype=torch.int32)
        starts[1:] = torch.cumsum(batch.extend_seq_lens, 0)[:-1]
        batch.extend_start_loc = starts
    return batch


def _reference(q, keys, values, prefix_lens, new_lens, scale, num_kv_heads):
    """float64 causal attention per request from the original K/V.

    q [T, Hq, D]; keys[b] [kv_len_b, Hk, D]; values[b] [kv_len_b, Hk, Dv];
    query i of request b sits at position prefix_b + i and sees keys j <= prefix_b + i.
    """
    outs, start = [], 0
    group = q.shape[1] // num_kv_heads
    for b, (p, n) in enumerate(zip(prefix_lens, new_lens)):
        qb = q[start:start + n].double()  # [n, Hq, D]
        kb = keys[b].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
        vb = values[b].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("ihd,jhd->hij", qb, kb) * scale
        q_pos = torch.arange(p, p + n).unsqueeze(1)
        k_pos = torch.arange(kb.shape[0]).unsqueeze(0)
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vb))
        start += n
    return torch.cat(outs)


# ---------------------------------------------------------------- MHA / GQA

HQ, HK, HEAD_DIM = 4, 2, 32

# (prefix lengths, new-token lengths): prefixes 0, short, ragged, page-crossing
EXTEND_CASE = ([0, 5, 37, 70], [9, 1, 14, 23])
DECODE_CASE = ([0, 16, 63, 129, 200], [1, 1, 1, 1, 1])


def _mha_setup(page_size, dtype, prefix_lens, new_lens, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    slots, pool_tokens = _scatter_slots(seq_lens, page_size, gen)

    def pools():
        r2t = ReqToTokenPool(size=NUM_REQ_ROWS, max_context_len=MAX_CONTEXT, device="cpu", enable_memory_saver=False)
        kv = MHATokenToKVPool(size=pool_tokens, page_size=page_size, dtype=dtype, head_num=HK, head_dim=HEAD_DIM,
                              layer_num=1, device="cpu", enable_memory_saver=False)
        return r2t, kv

    ours_pools, native_pools = pools(), pools()
    keys = [torch.randn(n, HK, HEAD_DIM, generator=gen).to(dtype) for n in seq_lens]
    values = [torch.randn(n, HK, HEAD_DIM, generator=gen).to(dtype) for n in seq_lens]
    q = torch.randn(sum(new_lens), HQ, HEAD_DIM, generator=gen).to(dtype)
    batches = []
    for r2t, kv in (ours_pools, native_pools):
        for s, k, v, p in zip(slots, keys, values, prefix_lens):
            kv.k_buffer[0][s[:p]] = k[:p]
            kv.v_buffer[0][s[:p]] = v[:p]
        batches.append(_make_batch(mode, prefix_lens, new_lens, page_size, torch.Generator().manual_seed(seed + 1),
                                   r2t, slots))
    new_k = torch.cat([k[p:] for k, p in zip(keys, prefix_lens)])
    new_v = torch.cat([v[p:] for v, p in zip(values, prefix_lens)])
    layer = RadixAttention(HQ, HEAD_DIM, HEAD_DIM ** -0.5, HK, layer_id=0)
    return SimpleNamespace(pools=(ours_pools, native_pools), batches=batches, q=q, new_k=new_k, new_v=new_v,
                           keys=keys, values=values, layer=layer, slots=slots)


def _runner(pools, **extra):
    r2t, kv = pools
    return SimpleNamespace(device="cpu", req_to_token_pool=r2t, token_to_kv_pool=kv, **extra)


def _run(backend, mode, case, batch):
    backend.init_forward_metadata(batch)
    q = case.q.reshape(case.q.shape[0], -1)
    fn = backend.forward_extend if mode == ForwardMode.EXTEND else backend.forward_decode
    return fn(q, case.new_k, case.new_v, case.layer, batch)


@pytest.mark.parametrize("page_size", [1, 16, 32, 64])
@pytest.mark.parametrize("mode,lens", [(ForwardMode.EXTEND, EXTEND_CASE), (ForwardMode.DECODE, DECODE_CASE)],
                         ids=["extend", "decode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_mha_matches_torch_native_and_float64(page_size, mode, lens, dtype):
    prefix_lens, new_lens = lens
    case = _mha_setup(page_size, dtype, prefix_lens, new_lens, mode, seed=page_size)
    ours = MacaAttnBackend(_runner(case.pools[0]))
    native = TorchNativeAttnBackend(_runner(case.pools[1]))
    out_ours = _run(ours, mode, case, case.batches[0])
    out_native = _run(native, mode, case, case.batches[1])

    ref = _reference(case.q, case.keys, case.values, prefix_lens, new_lens, case.layer.scaling, HK)
    tol = TOL[dtype]
    assert out_ours.shape == (sum(new_lens), HQ * HEAD_DIM) and out_ours.dtype == dtype
    torch.testing.assert_close(out_ours.double().view_as(ref), ref, **tol)
    torch.testing.assert_close(out_ours, out_native, **tol)
    # the new tokens' K/V landed in the same slots as SGLang's own writer put them
    written = torch.cat([s[p:] for s, p in zip(case.slots, prefix_lens)])
    for ours_buf, native_buf in ((case.pools[0][1].k_buffer[0], case.pools[1][1].k_buffer[0]),
                                 (case.pools[0][1].v_buffer[0], case.pools[1][1].v_buffer[0])):
        torch.testing.assert_close(ours_buf[written], native_buf[written], atol=0, rtol=0)
    torch.testing.assert_close(case.pools[0][1].k_buffer[0][written], case.new_k, atol=0, rtol=0)


@pytest.mark.parametrize("mode,lens", [(ForwardMode.EXTEND, ([0, 20, 41], [12, 6, 3])),
                                       (ForwardMode.DECODE, ([0, 20, 41, 130], [1, 1, 1, 1]))],
                         ids=["extend", "decode"])
def test_gqa_sliding_window_and_softcap_match_float64(mode, lens):
    """Windowed, soft-capped layer (Gemma-2 style): SGLang's window W shows W + 1 keys."""
    prefix_lens, new_lens = lens
    case = _mha_setup(16, torch.float32, prefix_lens, new_lens, mode, seed=7)
    window, cap = 9, 5.0
    layer = RadixAttention(HQ, HEAD_DIM, HEAD_DIM ** -0.5, HK, layer_id=0, logit_cap=cap, sliding_window_size=window)
    case.layer = layer
    backend = MacaAttnBackend(_runner(case.pools[0]))
    out = _run(backend, mode, case, case.batches[0]).view(-1, HQ, HEAD_DIM)

    start, group = 0, HQ // HK
    for b, (p, n) in enumerate(zip(prefix_lens, new_lens)):
        qb = case.q[start:start + n].double()
        kb = case.keys[b].double().repeat_interleave(group, 1)
        vb = case.values[b].double().repeat_interleave(group, 1)
        s = torch.einsum("ihd,jhd->hij", qb, kb) * layer.scaling
        s = cap * torch.tanh(s / cap)
        qp = torch.arange(p, p + n).unsqueeze(1)
        kp = torch.arange(kb.shape[0]).unsqueeze(0)
        s = s.masked_fill((kp > qp) | (kp < qp - window), float("-inf"))
        ref = torch.einsum("hij,jhd->ihd", s.softmax(-1), vb)
        torch.testing.assert_close(out[start:start + n].double(), ref, **TOL[torch.float32])
        start += n


def test_idle_batch_returns_empty_output():
    """DP attention: an idle rank runs every layer on zero tokens."""
    case = _mha_setup(16, torch.bfloat16, [3], [1], ForwardMode.DECODE)
    backend = MacaAttnBackend(_runner(case.pools[0]))
    idle = ForwardBatch(forward_mode=ForwardMode.IDLE, batch_size=0, input_ids=torch.zeros(0, dtype=torch.int64),
                        req_pool_indices=torch.zeros(0, dtype=torch.int64), seq_lens=torch.zeros(0, dtype=torch.int64),
                        out_cache_loc=torch.zeros(0, dtype=torch.int64), seq_lens_sum=0,
                        seq_lens_cpu=torch.zeros(0, dtype=torch.int64))
    backend.init_forward_metadata(idle)
    empty_q = torch.zeros(0, HQ * HEAD_DIM, dtype=torch.bfloat16)
    empty_kv = torch.zeros(0, HK, HEAD_DIM, dtype=torch.bfloat16)
    out = backend.forward_decode(empty_q, empty_kv, empty_kv, case.layer, idle)
    assert out.shape == (0, HQ * HEAD_DIM)


def test_graph_metadata_hooks_match_eager_decode():
    """init_cuda_graph_state + out_graph (static buffers) gives the eager result."""
    prefix_lens, new_lens = DECODE_CASE
    case = _mha_setup(32, torch.float32, prefix_lens, new_lens, ForwardMode.DECODE, seed=3)
    backend = MacaAttnBackend(_runner(case.pools[0]))
    eager = _run(backend, ForwardMode.DECODE, case, case.batches[0])

    backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    assert backend.get_cuda_graph_seq_len_fill_value() == 1
    backend.graph_block_table.fill_(-7)  # poison: stale columns must never be read
    backend.init_forward_metadata_out_graph(case.batches[0], in_capture=True)
    assert backend.forward_metadata.block_table.data_ptr() == backend.graph_block_table.data_ptr()
    q = case.q.reshape(case.q.shape[0], -1)
    graph_out = backend.forward_decode(q, case.new_k, case.new_v, case.layer, case.batches[0])
    torch.testing.assert_close(graph_out, eager, atol=0, rtol=0)


def test_block_table_names_pages_in_request_order():
    gen = torch.Generator().manual_seed(5)
    slots, _ = _scatter_slots([40, 7], 16, gen)
    r2t = torch.zeros(4, 64, dtype=torch.int32)
    r2t[2, :40] = slots[0].to(torch.int32)
    r2t[3, :7] = slots[1].to(torch.int32)
    table = build_block_table(r2t, torch.tensor([2, 3]), 40, 16)
    assert table.dtype == torch.int32 and table.shape == (2, 3)
    assert table[0].tolist() == (slots[0][::16] // 16).tolist()
    assert table[1, 0].item() == slots[1][0].item() // 16


def test_unsupported_page_size_is_a_value_error():
    r2t = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=64, page_size=8, dtype=torch.bfloat16, head_num=HK, head_dim=HEAD_DIM, layer_num=1,
                          device="cpu", enable_memory_saver=False)
    with pytest.raises(ValueError, match="page_size=8"):
        MacaAttnBackend(_runner((r2t, kv)))


# ---------------------------------------------------------------- MLA

MLA_HEADS, KV_LORA_RANK, ROPE_DIM = 4, 64, 32


def _mla_setup(page_size, dtype, prefix_lens, new_lens, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    slots, pool_tokens = _scatter_slots(seq_lens, page_size, gen)
    width = KV_LORA_RANK + ROPE_DIM

    def pools():
        r2t = ReqToTokenPool(size=NUM_REQ_ROWS, max_context_len=MAX_CONTEXT, device="cpu", enable_memory_saver=False)
        kv = MLATokenToKVPool(size=pool_tokens, page_size=page_size, dtype=dtype, kv_lora_rank=KV_LORA_RANK,
                              qk_rope_head_dim=ROPE_DIM, layer_num=1, device="cpu", enable_memory_saver=False)
        return r2t, kv

    ours_pools, native_pools = pools(), pools()
    latents = [torch.randn(n, 1, width, generator=gen).to(dtype) for n in seq_lens]
    q = (torch.randn(sum(new_lens), MLA_HEADS, width, generator=gen) * 0.5).to(dtype)
    batches = []
    for r2t, kv in (ours_pools, native_pools):
        for s, c, p in zip(slots, latents, prefix_lens):
            kv.kv_buffer[0][s[:p]] = c[:p]
        batches.append(_make_batch(mode, prefix_lens, new_lens, page_size, torch.Generator().manual_seed(seed + 1),
                                   r2t, slots))
    new_latent = torch.cat([c[p:] for c, p in zip(latents, prefix_lens)])
    scale = (128 + ROPE_DIM) ** -0.5  # DeepSeek scales by the un-absorbed qk head dim
    layer = RadixAttention(MLA_HEADS, width, scale, 1, layer_id=0, v_head_dim=KV_LORA_RANK)
    return SimpleNamespace(pools=(ours_pools, native_pools), batches=batches, q=q, new_latent=new_latent,
                           latents=latents, layer=layer, slots=slots)


def _mla_runner(pools):
    config = SimpleNamespace(kv_lora_rank=KV_LORA_RANK, qk_rope_head_dim=ROPE_DIM)
    return _runner(pools, model_config=config, use_mla_backend=True)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("mode,lens", [(ForwardMode.EXTEND, EXTEND_CASE), (ForwardMode.DECODE, DECODE_CASE)],
                         ids=["extend", "decode"])
def test_mla_absorbed_matches_torch_native_and_float64(page_size, mode, lens):
    prefix_lens, new_lens = lens
    dtype = torch.bfloat16
    case = _mla_setup(page_size, dtype, prefix_lens, new_lens, mode, seed=11 + page_size)
    ours = MacaMLAAttnBackend(_mla_runner(case.pools[0]))
    native = TorchNativeAttnBackend(_runner(case.pools[1]))
    q = case.q.reshape(case.q.shape[0], -1)
    k = case.new_latent
    v = k[..., :KV_LORA_RANK]
    outs = []
    # the MLA pool's writer asks whether decode context parallelism is on (a
    # server publishes that; a bare test states it)
    with get_parallel().override(dcp_enabled=False):
        for backend, batch in ((ours, case.batches[0]), (native, case.batches[1])):
            backend.init_forward_metadata(batch)
            fn = backend.forward_extend if mode == ForwardMode.EXTEND else backend.forward_decode
            outs.append(fn(q, k, v, case.layer, batch))
    values = [c[..., :KV_LORA_RANK] for c in case.latents]
    ref = _reference(case.q, case.latents, values, prefix_lens, new_lens, case.layer.scaling, 1)
    assert outs[0].shape == (sum(new_lens), MLA_HEADS * KV_LORA_RANK)
    torch.testing.assert_close(outs[0].double().view_as(ref), ref, **TOL[dtype])
    torch.testing.assert_close(outs[0], outs[1], **TOL[dtype])
    written = torch.cat([s[p:] for s, p in zip(case.slots, prefix_lens)])
    torch.testing.assert_close(case.pools[0][1].kv_buffer[0][written], case.pools[1][1].kv_buffer[0][written],
                               atol=0, rtol=0)


def test_mla_non_absorbed_prefill_matches_float64():
    """DeepSeek's MHA prefill (no cached prefix): per-head K/V, qk dim != v dim."""
    prefix_lens, new_lens = [0, 0, 0], [7, 19, 2]
    case = _mla_setup(16, torch.float32, prefix_lens, new_lens, ForwardMode.EXTEND, seed=4)
    backend = MacaMLAAttnBackend(_mla_runner(case.pools[0]))
    gen = torch.Generator().manual_seed(9)
    qk_dim, v_dim, heads = 48, 32, MLA_HEADS
    T = sum(new_lens)
    q = torch.randn(T, heads, qk_dim, generator=gen)
    k = torch.randn(T, heads, qk_dim, generator=gen)
    v = torch.randn(T, heads, v_dim, generator=gen)
    layer = RadixAttention(heads, qk_dim, qk_dim ** -0.5, heads, layer_id=0, v_head_dim=v_dim)
    backend.init_forward_metadata(case.batches[0])
    out = backend.forward_extend(q.reshape(T, -1), k, v, layer, case.batches[0], save_kv_cache=False)
    starts = [0, 7, 26]
    keys = [k[s:s + n] for s, n in zip(starts, new_lens)]
    values = [v[s:s + n] for s, n in zip(starts, new_lens)]
    ref = _reference(q, keys, values, prefix_lens, new_lens, layer.scaling, heads)
    torch.testing.assert_close(out.double().view_as(ref), ref, **TOL[torch.float32])


@pytest.mark.parametrize("mla_backend", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_plans_once_per_forward_batch(monkeypatch, page_size, mla_backend):
    """Issue #12 (5): the first layer of a forward makes the batch's plan, the next layers reuse it
    (and get what an unplanned call gives); the next forward batch gets a new plan."""
    from maca_infer.common.ops import attention, mla

    module, name = (mla, "plan_mla_decode") if mla_backend else (attention, "plan_paged_decode")
    made = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    prefix_lens, new_lens = DECODE_CASE
    if mla_backend:
        case = _mla_setup(page_size, torch.float32, prefix_lens, new_lens, ForwardMode.DECODE, seed=3)
        backend = MacaMLAAttnBackend(_mla_runner(case.pools[0]))
        q, k = case.q.reshape(case.q.shape[0], -1), case.new_latent
        v = k[..., :KV_LORA_RANK]
    else:
        case = _mha_setup(page_size, torch.float32, prefix_lens, new_lens, ForwardMode.DECODE, seed=3)
        backend = MacaAttnBackend(_runner(case.pools[0]))
        q, k, v = case.q.reshape(case.q.shape[0], -1), case.new_k, case.new_v
    with get_parallel().override(dcp_enabled=False):
        outs = []
        for forward in range(2):
            backend.init_forward_metadata(case.batches[0])
            for layer_step in range(3):  # three "layers" (the test pools hold one: the same layer again)
                outs.append(backend.forward_decode(q, k, v, case.layer, case.batches[0],
                                                   save_kv_cache=layer_step == 0))
            assert len(made) == forward + 1  # one plan per forward, not per layer
    assert made[0] is not made[1]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)
