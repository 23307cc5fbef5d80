"""The HF adapter's kernel swaps accept zero tokens (issue #10; cheap cover, HF itself never runs T = 0).

RMSNorm, the fused gated MLP, the rotary replacement and the "maca" experts
implementation are called on [batch, 0, ...] / [0, ...] inputs on both op
tiers: correctly shaped empty outputs, no kernel launch.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from maca_infer.adapters.hf import transformers_experts, transformers_kernels  # noqa: E402

DTYPE = torch.float32
H, I, HQ, HK, D, E, TOP_K = 64, 32, 4, 2, 32, 4, 2



def test_rms_norm_forward(ops_tier):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(H)
    norm._maca_gemma_norm = False
    with torch.no_grad():
        out = transformers_kernels._rms_norm_forward(norm, torch.empty(2, 0, H))
    assert out.shape == (2, 0, H) and out.dtype == DTYPE


def test_gated_mlp_forward(ops_tier):
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = torch.nn.Linear(H, I), torch.nn.Linear(H, I), torch.nn.Linear(I, H)
    mlp._maca_act = ("silu_and_mul", {})
    with torch.no_grad():
        out = transformers_kernels._gated_mlp_forward(mlp, torch.empty(1, 0, H))
    assert out.shape == (1, 0, H)


def test_rotary_replacement(ops_tier):
    def stock(*args, **kwargs):
        raise AssertionError("the stock apply_rotary_pos_emb ran; ours should serve an empty sequence")

    rotary = transformers_kernels._make_rotary(stock)
    transformers_kernels._enter_rotary_scope(None, None)
    try:
        q, k = rotary(torch.empty(1, HQ, 0, D), torch.empty(1, HK, 0, D), torch.empty(1, 0, D), torch.empty(1, 0, D))
    finally:
        transformers_kernels._leave_rotary_scope(None, None, None)
    assert q.shape == (1, HQ, 0, D) and k.shape == (1, HK, 0, D)


@pytest.mark.skipif(not transformers_experts.interface_available(),
                    reason="experts_implementation needs transformers >= 5 (ExpertsInterface)")
def test_maca_experts_forward(ops_tier):
    experts = SimpleNamespace(
        has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True,
        config=SimpleNamespace(hidden_act="silu"),
        gate_up_proj=torch.randn(E, 2 * I, H), down_proj=torch.randn(E, H, I),
    )
    with torch.no_grad():
        out = transformers_experts.maca_experts_forward(experts, torch.empty(0, H),
                                                        torch.empty(0, TOP_K, dtype=torch.int64),
                                                        torch.empty(0, TOP_K))
    assert out.shape == (0, H) and out.dtype == DTYPE
