"""DeepSeek-V3's noaux_tc router on LMDeploy's maca backend: ops.moe_grouped_topk, same experts as LMDeploy's own.

LMDeploy builds the router through ``MacaOpsBackend.build_op(RouterNoauxTCBuildSpec)``;
the ledgered build_op fix answers it with ``MacaRouterNoauxTC``. It must pick
the experts and weights of LMDeploy's torch default (``DefaultRouterNoauxTCImpl``,
what the dlinfer backends inherit). The slow case runs the tiny DeepSeek-V3
zoo model through the pipeline, greedy-equal to HF.
"""

from __future__ import annotations

import pytest
import torch

from lmdeploy_helpers import PROMPTS, assert_greedy_parity, pipeline_greedy


@pytest.fixture(scope="module")
def maca_backend(dlinfer_ours):
    import lmdeploy.pytorch.backends.dlinfer.maca.op_backend as op_backend

    from maca_infer.adapters.lmdeploy import lmdeploy_patches

    lmdeploy_patches.apply(op_backend)  # what the import hook does when LMDeploy loads the module
    return op_backend.MacaOpsBackend


@pytest.mark.parametrize("num_experts,groups,topk_group,top_k", [(256, 8, 4, 8), (8, 4, 2, 2), (64, 8, 3, 6)])
@pytest.mark.parametrize("scoring,renormalize,logit_scale", [
    ("sigmoid", True, 3.0), ("sigmoid", False, 3.0), ("softmax", True, 3.0),
    ("softmax", True, 60.0),  # logits past exp's float32 range: the softmax must subtract the max
])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_router_matches_lmdeploys_default(maca_backend, monkeypatch, num_experts, groups, topk_group, top_k,
                                          scoring, renormalize, logit_scale, impl):
    from lmdeploy.pytorch.backends.default.moe_router import DefaultRouterNoauxTCImpl
    from lmdeploy.pytorch.backends.moe_router import RouterNoauxTCBuildSpec

    from maca_infer.adapters.lmdeploy import lmdeploy_patches
    from maca_infer.common.ops import _dispatch

    monkeypatch.setenv("MACA_INFER_OPS_IMPL", impl)
    spec = RouterNoauxTCBuildSpec(scoring_func=scoring, top_k=top_k, n_group=groups, top_k_group=topk_group,
                                  n_routed_experts=num_experts, routed_scaling_factor=2.5, renormalize=renormalize)
    ours = maca_backend.build_op(spec)
    assert isinstance(ours, lmdeploy_patches.MacaRouterNoauxTC)
    theirs = DefaultRouterNoauxTCImpl(scoring, top_k, groups, topk_group, num_experts, 2.5, renormalize)
    gen = torch.Generator().manual_seed(num_experts + top_k)
    logits = torch.randn(23, num_experts, generator=gen) * logit_scale
    # non-negative bias: every biased score is > 0, where LMDeploy's fill of dropped groups with 0 is exact
    bias = torch.rand(num_experts, generator=gen) * 0.2
    weights, ids = ours.forward(logits, bias)
    assert _dispatch.last_impl("moe_grouped_topk") == impl
    ref_weights, ref_ids = theirs.forward(logits, bias)
    assert ids.dtype == ref_ids.dtype and weights.dtype == torch.float32
    ids, order = ids.sort(dim=-1)
    ref_ids, ref_order = ref_ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.float().gather(1, ref_order),
                               rtol=1e-5, atol=1e-6)


def test_router_n_groups_stays_lmdeploys(maca_backend):
    from lmdeploy.pytorch.backends.default.moe_router import DefaultRouterNoauxTCImpl
    from lmdeploy.pytorch.backends.moe_router import RouterNoauxTCBuildSpec

    spec = RouterNoauxTCBuildSpec(scoring_func="sigmoid", top_k=4, n_group=1, top_k_group=1, n_routed_experts=16,
                                  routed_scaling_factor=1.0, router_n_groups=2)
    assert isinstance(maca_backend.build_op(spec), DefaultRouterNoauxTCImpl)


@pytest.mark.slow
def test_deepseek_v3_pipeline_matches_hf(dlinfer_ours):
    from maca_infer.common.ops import _dispatch
    from maca_infer.modelzoo import get

    model_dir = str(get("deepseek_v3"))
    prompts = PROMPTS[:2]
    prompt_ids, outputs = pipeline_greedy(model_dir, prompts, 8, "float16", eager_mode=True, max_batch_size=4)
    assert _dispatch.last_impl("moe_grouped_topk") is not None, "the noaux_tc router did not run our op"
    print(assert_greedy_parity(model_dir, prompts, prompt_ids, outputs, "float16"))
