"""DeepSeek-V3's noaux_tc router through ops.moe_grouped_topk, compared with SGLang's own routing.

SGLang's ``TopK`` is a ``BaseFusedOp``; the maca platform registers an OOT
forward for it (``fused_ops._topk_forward``). For noaux_tc (sigmoid scores,
groups ranked by their two best biased scores, ``e_score_correction_bias``
steering selection only) it must pick the experts and weights SGLang's
``forward_native`` picks; every other routing is left to SGLang.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.moe.topk import TopK, TopKConfig  # noqa: E402

from maca_infer.adapters.sglang import fused_ops  # noqa: E402
from maca_infer.common.ops import _dispatch  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _stock_torch():
    # forward_native runs torch.compile'd routing: with a torch.cuda emulation left installed by an
    # earlier test module (LMDeploy's run in the same session), inductor would compile for CUDA
    from maca_infer.common.device import deactivate, emulation

    if emulation.is_installed():
        deactivate()


def _topk(top_k, *, correction_bias, num_expert_group, topk_group, on_output, scoring="sigmoid"):
    # TopK.__init__ reads the published server config; a bare test builds the module around its config.
    # is_draft skips the EPLB lookup (off in these servers too).
    layer = TopK.__new__(TopK)
    torch.nn.Module.__init__(layer)
    layer.topk_config = TopKConfig(
        top_k=top_k, use_grouped_topk=True, topk_group=topk_group, num_expert_group=num_expert_group,
        renormalize=True, scoring_func=scoring, correction_bias=correction_bias, routed_scaling_factor=2.5,
        apply_routed_scaling_factor_on_output=on_output, layer_id=0)
    layer.layer_id, layer.is_draft, layer.enable_waterfill, layer.waterfill_balancer = 0, True, False, None
    return layer


def _sorted(output):
    ids, order = output.topk_ids.sort(dim=-1)
    return ids, output.topk_weights.gather(1, order)


@pytest.mark.parametrize("num_experts,groups,topk_group,top_k", [(256, 8, 4, 8), (8, 4, 2, 2), (64, 8, 3, 6)])
@pytest.mark.parametrize("on_output", [False, True])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_noaux_tc_matches_sglang(monkeypatch, num_experts, groups, topk_group, top_k, on_output, impl):
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", impl)
    gen = torch.Generator().manual_seed(num_experts + top_k)
    bias = torch.randn(num_experts, generator=gen) * 0.5
    layer = _topk(top_k, correction_bias=bias, num_expert_group=groups, topk_group=topk_group, on_output=on_output)
    hidden = torch.randn(19, 32, generator=gen)
    logits = torch.randn(19, num_experts, generator=gen) * 3
    theirs = layer.forward_native(hidden, logits)
    ours = fused_ops._topk_forward(layer, hidden, logits)
    assert _dispatch.last_impl("moe_grouped_topk") == impl
    ids, weights = _sorted(ours)
    ref_ids, ref_weights = _sorted(theirs)
    assert ours.topk_ids.dtype == torch.int32 and ours.topk_weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids.to(torch.int32))
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_padding_rows_route_nowhere():
    bias = torch.randn(16) * 0.1
    layer = _topk(4, correction_bias=bias, num_expert_group=4, topk_group=2, on_output=False)
    out = fused_ops._topk_forward(layer, torch.randn(6, 8), torch.randn(6, 16), num_token_non_padded=torch.tensor(4))
    assert (out.topk_ids[4:] == -1).all() and (out.topk_ids[:4] >= 0).all()


@pytest.mark.parametrize("case", ["no-bias", "softmax"])
def test_other_routings_stay_sglang(monkeypatch, case):
    def refuse(*args, **kwargs):
        raise AssertionError("moe_grouped_topk must not serve this routing")

    monkeypatch.setattr(fused_ops.ops, "moe_grouped_topk", refuse, raising=False)
    bias = None if case == "no-bias" else torch.randn(16) * 0.1
    layer = _topk(4, correction_bias=bias, num_expert_group=4, topk_group=2, on_output=False,
                  scoring="sigmoid" if case == "no-bias" else "softmax")
    logits = torch.randn(5, 16)
    out = fused_ops._topk_forward(layer, torch.randn(5, 8), logits)
    assert torch.equal(out.topk_ids, layer.forward_native(torch.randn(5, 8), logits).topk_ids)
