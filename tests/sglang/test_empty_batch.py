"""Every forward the SGLang adapter registers accepts a batch of zero tokens (issue #10).

With ``--enable-dp-attention`` a DP rank without requests runs an IDLE batch
of 0 tokens through the whole model: norms, rotary, attention, MLP / MoE
(dense and moe_wna16), and, for MLA models, the DeepSeek forward-method
handler. Each forward is called here with T = 0, on both op tiers, and must
return correctly shaped empty outputs without launching a kernel. The
multi-process DP-attention servers live in test_dp_attention.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402

from maca_infer.adapters.sglang import fused_ops, moe_wna16, plugin  # noqa: E402
from maca_infer.adapters.sglang.attention_backend import MacaAttnBackend, MacaMLAAttnBackend  # noqa: E402
from maca_infer.adapters.sglang.platform import MacaSRTPlatform  # noqa: E402
from maca_infer.common.device import detect  # noqa: E402

DTYPE = torch.bfloat16



def _empty(*shape, dtype=DTYPE):
    return torch.empty(shape, dtype=dtype)


def _expect(t, shape, dtype=DTYPE):
    assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, f"got {tuple(t.shape)} {t.dtype}"


# ---------------------------------------------------------------- fused ops (OOT forwards)


def test_rmsnorm_forward(ops_tier):
    from sglang.srt.layers.layernorm import RMSNorm

    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96).to(DTYPE)
    _expect(fused_ops._rmsnorm_forward(norm, _empty(0, 96)), (0, 96))
    residual = _empty(0, 96)
    normed, new_residual = fused_ops._rmsnorm_forward(norm, _empty(0, 96), residual)
    _expect(normed, (0, 96))
    assert new_residual is residual


def test_silu_and_mul_forward(ops_tier):
    from sglang.srt.layers.activation import SiluAndMul

    _expect(fused_ops._silu_and_mul_forward(SiluAndMul(), _empty(0, 2 * 48)), (0, 48))


@pytest.fixture
def maca_rotary(monkeypatch):
    """A RotaryEmbedding built as in a maca server process (see test_platform.py)."""
    from sglang.srt.layers.rotary_embedding import base

    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    monkeypatch.setenv("MACA_INFER_DEVICE", "emulated")
    detect.clear_cache()
    monkeypatch.setattr(base, "current_platform", MacaSRTPlatform())

    def build(neox):
        return base.RotaryEmbedding(head_size=64, rotary_dim=32, max_position_embeddings=256, base=10000,
                                    is_neox_style=neox, dtype=torch.float32)

    yield build
    detect.clear_cache()


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rotary_forward(ops_tier, maca_rotary, neox):
    """The crash of issue #10: query.view(0, -1, head_size) cannot infer -1."""
    rope = maca_rotary(neox)
    positions = torch.empty(0, dtype=torch.int64)
    q, k = fused_ops._rotary_forward(rope, positions, _empty(0, 4 * 64, dtype=torch.float32),
                                     _empty(0, 2 * 64, dtype=torch.float32))
    _expect(q, (0, 4 * 64), torch.float32)
    _expect(k, (0, 2 * 64), torch.float32)


def _rotate_both_layouts(rope, num_tokens):
    positions = torch.arange(num_tokens, dtype=torch.int64) * 7
    q = torch.randn(num_tokens, 4, 64)
    k = torch.randn(num_tokens, 1, 64)
    q3, k3 = fused_ops._rotary_forward(rope, positions, q.clone(), k.clone())
    q2, k2 = fused_ops._rotary_forward(rope, positions, q.reshape(num_tokens, 4 * 64).clone(),
                                       k.reshape(num_tokens, 64).clone())
    _expect(q3, (num_tokens, 4, 64), torch.float32)
    _expect(k3, (num_tokens, 1, 64), torch.float32)
    torch.testing.assert_close(q3.reshape(num_tokens, 4 * 64), q2, rtol=0, atol=0)
    torch.testing.assert_close(k3.reshape(num_tokens, 64), k2, rtol=0, atol=0)
    return q, q3


def test_rotary_forward_on_per_head_layout_empty(ops_tier, maca_rotary):
    """DeepSeek passes q_pe / k_pe as [T, H, D], not [T, H * D]: an idle rank sends T == 0 that way too."""
    _rotate_both_layouts(maca_rotary(True), 0)


def test_rotary_forward_on_per_head_layout(maca_rotary):
    """[T, H, D] rotates exactly like [T, H * D] (the head count is not the last dim's)."""
    q, q3 = _rotate_both_layouts(maca_rotary(True), 5)
    assert not torch.equal(q3, q)  # it did rotate


E, H, I, TOP_K, GROUP = 4, 64, 32, 2, 32


def _dispatch_output(hidden):
    weights, ids = torch.empty(0, TOP_K, dtype=torch.float32), torch.empty(0, TOP_K, dtype=torch.int32)
    return SimpleNamespace(hidden_states=_empty(0, hidden), topk_output=(weights, ids, None))


def test_unquantized_moe_forward(ops_tier):
    layer = SimpleNamespace(num_experts=E, w13_weight=torch.randn(E, 2 * I, H).to(DTYPE),
                            w2_weight=torch.randn(E, H, I).to(DTYPE))
    cfg = SimpleNamespace(activation="silu", apply_router_weight_on_input=False, gemm1_alpha=None,
                          gemm1_clamp_limit=None)
    method = SimpleNamespace(moe_runner_config=cfg, forward_native=None)
    out = fused_ops._unquantized_moe_forward(method, layer, _dispatch_output(H))
    _expect(out.hidden_states, (0, H))


# ---------------------------------------------------------------- moe_wna16


def _uint8(*shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8)


@pytest.mark.parametrize("has_zeros", [False, True], ids=["symmetric", "zero-points"])
def test_moe_wna16_experts(ops_tier, has_zeros):
    method_cls = moe_wna16._moe_method_cls()
    method = method_cls.__new__(method_cls)  # SGLang's config plumbing is not needed to apply
    method.moe_runner_config = SimpleNamespace(activation="silu", apply_router_weight_on_input=False,
                                               routed_scaling_factor=2.5)
    zeros = (lambda *s: torch.full(s, 8, dtype=torch.uint8)) if has_zeros else (lambda *s: None)
    layer = SimpleNamespace(
        w13_qweight=_uint8(E, 2 * I, H // 2), w2_qweight=_uint8(E, H, I // 2),
        w13_scales=torch.rand(E, 2 * I, H // GROUP).to(DTYPE), w2_scales=torch.rand(E, H, I // GROUP).to(DTYPE),
        group_size=GROUP, maca_w13_zeros=zeros(E, 2 * I, H // GROUP), maca_w2_zeros=zeros(E, H, I // GROUP),
    )
    _expect(method.apply(layer, _dispatch_output(H)).hidden_states, (0, H))


@pytest.mark.parametrize("scheme", ["awq", "gptq"])
def test_moe_wna16_dense_linear(ops_tier, scheme):
    awq_cls, gptq_cls = moe_wna16._awq_linear_scheme_cls(), moe_wna16._gptq_linear_scheme_cls()
    config = SimpleNamespace(group_size=GROUP, checkpoint_format="gptq")
    linear = awq_cls(config) if scheme == "awq" else gptq_cls(config, sym=True)
    layer = SimpleNamespace(maca_w4a16=(_uint8(48, H // 2), torch.rand(48, H // GROUP).to(DTYPE), None, GROUP))
    _expect(linear.apply_weights(layer, _empty(0, H), None), (0, 48))
    _expect(linear.apply_weights(layer, _empty(0, H), torch.randn(48).to(DTYPE)), (0, 48))


# ---------------------------------------------------------------- attention backend

HQ, HK, HEAD_DIM, PAGE = 4, 2, 32, 16
KV_LORA_RANK, ROPE_DIM, MLA_HEADS = 64, 32, 4


def _zero_token_batch(mode):
    """What a DP-attention rank with no requests runs (mode IDLE), or an empty batch of another mode."""
    no_ints = torch.zeros(0, dtype=torch.int64)
    batch = ForwardBatch(forward_mode=mode, batch_size=0, input_ids=no_ints, req_pool_indices=no_ints,
                         seq_lens=no_ints, out_cache_loc=no_ints, seq_lens_sum=0, seq_lens_cpu=no_ints,
                         positions=no_ints)
    if mode == ForwardMode.EXTEND:
        batch.extend_seq_lens = torch.zeros(0, dtype=torch.int32)
        batch.extend_prefix_lens = torch.zeros(0, dtype=torch.int32)
        batch.extend_seq_lens_cpu, batch.extend_prefix_lens_cpu = [], []
        batch.extend_num_tokens = 0
        batch.extend_start_loc = torch.zeros(0, dtype=torch.int32)
    return batch


def _mha_backend():
    r2t = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=64, page_size=PAGE, dtype=DTYPE, head_num=HK, head_dim=HEAD_DIM, layer_num=1,
                          device="cpu", enable_memory_saver=False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=r2t, token_to_kv_pool=kv, model=torch.nn.Module())
    backend = MacaAttnBackend(runner)
    return backend, kv


def _mla_backend():
    r2t = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    kv = MLATokenToKVPool(size=64, page_size=PAGE, dtype=DTYPE, kv_lora_rank=KV_LORA_RANK,
                          qk_rope_head_dim=ROPE_DIM, layer_num=1, device="cpu", enable_memory_saver=False)
    config = SimpleNamespace(kv_lora_rank=KV_LORA_RANK, qk_rope_head_dim=ROPE_DIM)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=r2t, token_to_kv_pool=kv, model=torch.nn.Module(),
                             model_config=config, use_mla_backend=True)
    return MacaMLAAttnBackend(runner), kv


MODES = [ForwardMode.IDLE, ForwardMode.DECODE, ForwardMode.EXTEND]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_mha_backend_zero_tokens(ops_tier, mode):
    backend, pool = _mha_backend()
    before = pool.k_buffer[0].clone(), pool.v_buffer[0].clone()
    batch = _zero_token_batch(mode)
    backend.init_forward_metadata(batch)
    layer = RadixAttention(HQ, HEAD_DIM, HEAD_DIM ** -0.5, HK, layer_id=0)
    q, kv = _empty(0, HQ * HEAD_DIM), _empty(0, HK, HEAD_DIM)
    for forward in (backend.forward, backend.forward_decode, backend.forward_extend):
        _expect(forward(q, kv, kv, layer, batch), (0, HQ * HEAD_DIM))
    assert torch.equal(pool.k_buffer[0], before[0]) and torch.equal(pool.v_buffer[0], before[1])


def test_mha_backend_graph_metadata_of_an_idle_batch(ops_tier):
    """Graph replay of a decode graph with a DP-idle batch (SGLang pads it; bs may be 0)."""
    backend, _ = _mha_backend()
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    batch = _zero_token_batch(ForwardMode.IDLE)
    backend.init_forward_metadata_out_graph(batch)
    layer = RadixAttention(HQ, HEAD_DIM, HEAD_DIM ** -0.5, HK, layer_id=0)
    kv = _empty(0, HK, HEAD_DIM)
    _expect(backend.forward_decode(_empty(0, HQ * HEAD_DIM), kv, kv, layer, batch), (0, HQ * HEAD_DIM))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_mla_backend_zero_tokens(ops_tier, mode):
    backend, pool = _mla_backend()
    before = pool.kv_buffer[0].clone()
    batch = _zero_token_batch(mode)
    backend.init_forward_metadata(batch)
    width = KV_LORA_RANK + ROPE_DIM
    absorbed = RadixAttention(MLA_HEADS, width, 0.1, 1, layer_id=0, v_head_dim=KV_LORA_RANK)
    latent = _empty(0, 1, width)
    for forward in (backend.forward, backend.forward_decode, backend.forward_extend):
        _expect(forward(_empty(0, MLA_HEADS * width), latent, latent[..., :KV_LORA_RANK], absorbed, batch),
                (0, MLA_HEADS * KV_LORA_RANK))
    # q_nope / q_rope handed over separately
    _expect(backend.forward_decode(_empty(0, MLA_HEADS * KV_LORA_RANK), latent[..., :KV_LORA_RANK],
                                   None, absorbed, batch, q_rope=_empty(0, MLA_HEADS * ROPE_DIM),
                                   k_rope=_empty(0, 1, ROPE_DIM)), (0, MLA_HEADS * KV_LORA_RANK))
    # the non-absorbed (MHA) prefill layer: per-head K/V, qk dim != v dim
    mha = RadixAttention(MLA_HEADS, 48, 48 ** -0.5, MLA_HEADS, layer_id=0, v_head_dim=32)
    out = backend.forward_extend(_empty(0, MLA_HEADS * 48), _empty(0, MLA_HEADS, 48), _empty(0, MLA_HEADS, 32),
                                 mha, batch, save_kv_cache=False)
    _expect(out, (0, MLA_HEADS * 32))
    assert torch.equal(pool.kv_buffer[0], before)


def test_deepseek_handler_on_an_idle_batch():
    """The maca MLA forward-method handler picks absorbed MLA for an idle batch (no prefix info)."""
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    method = plugin.handle_attention_maca(SimpleNamespace(), _zero_token_batch(ForwardMode.IDLE))
    assert method == AttnForwardMethod.MLA
    # a zero-token extend with no cached prefix: the MHA prefill, which the backend serves empty
    assert plugin.handle_attention_maca(SimpleNamespace(), _zero_token_batch(ForwardMode.EXTEND)) == \
        AttnForwardMethod.MHA
