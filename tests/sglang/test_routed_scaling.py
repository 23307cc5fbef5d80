"""DeepSeek's ``routed_scaling_factor`` is applied exactly once through every maca MoE method.

SGLang splits the job between the model and the experts by a host flag:
``DeepseekV2MoE.forward_normal`` multiplies the routed output by the factor
itself unless its module's ``_is_cuda`` (or ``_is_musa``) is true; on CUDA it
leaves it to the experts, whose Triton runner scales in ``moe_combine_topk``
under the same flag (``moe_runner/triton_utils/fused_moe.py``). The maca MoE
methods (unquantized ``fused_ops``, ``moe_wna16``, ``w8a8``) replace that
runner, so they must take the runner's place under both flag values: on a
real MACA device ``is_cuda()`` is true (mcPyTorch sets ``torch.version.cuda``
beside ``torch.version.maca``), on the emulated device it is false.

Each case runs SGLang's own ``DeepseekV2MoE.forward_normal`` (router and
shared expert stubbed with fixed tensors) over the maca method and compares
with a float64 DeepSeek MoE: ``sum_k w_k * expert_k(x) * factor + shared(x)``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe as sglang_fused_moe  # noqa: E402
from sglang.srt.layers.moe.topk import StandardTopKOutput  # noqa: E402
from sglang.srt.models import deepseek_v2  # noqa: E402

from maca_infer.adapters.sglang import fused_ops, moe_wna16, w8a8_int8  # noqa: E402

E, H, I, TOP_K, GROUP, T = 4, 64, 32, 2, 32, 5
FACTOR = 2.5


def _silu_mlp(x, w13, w2):
    gate, up = (x @ w13.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w2.T


def _reference(x, w13, w2, weights, ids, shared):
    """float64 DeepSeek MoE: routed experts weighted by top-k weights, times the factor, plus the shared expert."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    routed = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            routed[t] += float(weights[t, k]) * _silu_mlp(x[t:t + 1], w13[e], w2[e])[0]
    return routed * FACTOR + shared.double()


def _unpack_nibbles(q):
    """uint8 [..., K // 2] low nibble first -> [..., K]."""
    return torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)


def _unquantized(gen):
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) * 0.2, torch.randn(E, H, I, generator=gen) * 0.2
    layer = SimpleNamespace(num_experts=E, w13_weight=w13, w2_weight=w2)
    method = SimpleNamespace(moe_runner_config=_runner_config(), forward_native=None)
    return layer, (lambda lyr, d: fused_ops._unquantized_moe_forward(method, lyr, d)), (w13, w2), 1e-4


def _moe_wna16(gen):
    q13 = torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, generator=gen)
    q2 = torch.randint(0, 256, (E, H, I // 2), dtype=torch.uint8, generator=gen)
    s13, s2 = torch.rand(E, 2 * I, H // GROUP, generator=gen) * 0.05, torch.rand(E, H, I // GROUP, generator=gen) * 0.05
    layer = SimpleNamespace(w13_qweight=q13, w2_qweight=q2, w13_scales=s13, w2_scales=s2, group_size=GROUP,
                            maca_w13_zeros=None, maca_w2_zeros=None)  # symmetric: z = 8
    method = moe_wna16._moe_method_cls().__new__(moe_wna16._moe_method_cls())
    method.moe_runner_config = _runner_config()
    w13 = (_unpack_nibbles(q13).double() - 8) * s13.double().repeat_interleave(GROUP, dim=-1)
    w2 = (_unpack_nibbles(q2).double() - 8) * s2.double().repeat_interleave(GROUP, dim=-1)
    return layer, method.apply, (w13, w2), 1e-4


def _w8a8(gen):
    q13 = torch.randint(-127, 128, (E, 2 * I, H), dtype=torch.int8, generator=gen)
    q2 = torch.randint(-127, 128, (E, H, I), dtype=torch.int8, generator=gen)
    s13, s2 = torch.rand(E, 2 * I, 1, generator=gen) * 2e-3, torch.rand(E, H, 1, generator=gen) * 2e-3
    layer = SimpleNamespace(w13_weight=SimpleNamespace(data=q13), w2_weight=SimpleNamespace(data=q2),
                            w13_weight_scale=SimpleNamespace(data=s13), w2_weight_scale=SimpleNamespace(data=s2))
    method = w8a8_int8._MacaW8A8MoE()
    method.prefix, method.moe_runner_config = "model.layers.1.mlp.experts", _runner_config()
    method.process_weights_after_loading(layer)
    # per-token int8 activations: a few 1e-3 off the float64 model, far from a factor of 2.5 either way
    return layer, method.apply, (q13.double() * s13.double(), q2.double() * s2.double()), 3e-2


def _runner_config():
    # what FusedMoE hands create_moe_runner for DeepSeek: the factor is always in the runner config
    return SimpleNamespace(activation="silu", apply_router_weight_on_input=False, gemm1_alpha=None,
                           gemm1_clamp_limit=None, routed_scaling_factor=FACTOR, inplace=True)


def _tokens_and_routing(gen):
    """x [T, H]; top-k weights [T, k] (softmax, as DeepSeek's renormalised router); distinct expert ids [T, k]."""
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(T)]).to(torch.int32)
    return x, torch.softmax(torch.randn(T, TOP_K, generator=gen), dim=-1), ids


PATHS = {"unquantized": _unquantized, "moe_wna16": _moe_wna16, "w8a8": _w8a8}


@pytest.fixture(params=[False, True], ids=["is_cuda-false", "is_cuda-true"])
def host_is_cuda(request, monkeypatch):
    """SGLang's module-level CUDA flags, as a host with (MACA, NVIDIA) or without (emulated) CUDA torch sets them."""
    monkeypatch.setattr(deepseek_v2, "_is_cuda", request.param)
    monkeypatch.setattr(deepseek_v2, "_is_musa", False)
    monkeypatch.setattr(sglang_fused_moe, "_is_cuda", request.param)
    monkeypatch.setattr(sglang_fused_moe, "_is_musa", False)
    import sglang.srt.utils as sglang_utils

    monkeypatch.setattr(sglang_utils, "is_cuda", lambda: request.param)
    return request.param


def _deepseek_moe(layer, apply, topk, shared):
    """A DeepseekV2MoE whose forward_normal is SGLang's; gate, top-k and shared expert give fixed tensors."""

    def experts(hidden_states, topk_output):
        return apply(layer, SimpleNamespace(hidden_states=hidden_states, topk_output=topk_output)).hidden_states

    moe = SimpleNamespace(
        shared_experts=None, experts=_Experts(experts), _fuse_shared_experts_inside_sbo=False, is_hash=False,
        routed_scaling_factor=FACTOR, _shared_expert_tp1=False, reduce_results=False,
        _maybe_quant_moe_input_once=lambda h: None,
        _forward_shared_experts=lambda h, alloc, pre_quant_input=None: shared.clone(),
        gate=lambda h, alloc: torch.zeros(h.shape[0], E), topk=lambda h, logits: topk,
    )
    return moe


class _Experts:
    """What forward_normal reads of ``self.experts`` (a FusedMoE): called on (hidden, topk), plus three fields."""

    moe_runner_config = SimpleNamespace(inplace=True)
    quant_method = None
    should_fuse_routed_scaling_factor_in_topk = False

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, hidden_states, topk_output):
        return self._fn(hidden_states, topk_output)


@pytest.mark.parametrize("path", list(PATHS))
def test_routed_scaling_factor_applied_once(path, host_is_cuda, monkeypatch):
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "reference")
    gen = torch.Generator().manual_seed(7)
    layer, apply, (w13, w2), tol = PATHS[path](gen)
    x, weights, ids = _tokens_and_routing(gen)
    shared = torch.randn(T, H, generator=gen) * 0.1
    moe = _deepseek_moe(layer, apply, StandardTopKOutput(weights, ids, torch.zeros(T, E)), shared)

    out = deepseek_v2.DeepseekV2MoE.forward_normal(moe, x.clone())

    ref = _reference(x, w13, w2, weights, ids, shared)
    routed_ratio = ((out.double() - shared.double()).norm() / (ref - shared.double()).norm()).item()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < tol, (f"{path}, is_cuda={host_is_cuda}: relative error {rel:.3g} vs float64 DeepSeek MoE; "
                       f"routed part is {routed_ratio:.3g}x the reference (factor {FACTOR})")


@pytest.mark.parametrize("path", list(PATHS))
def test_factor_folded_into_topk_weights_is_not_applied_again(path, monkeypatch):
    """A router that folds the factor into the weights (``should_fuse_routed_scaling_factor_in_topk``, CUDA
    runners like TRT-LLM's) leaves nothing for the experts: their output is the weighted sum as routed."""
    for module in (deepseek_v2, sglang_fused_moe):
        monkeypatch.setattr(module, "_is_cuda", True)  # the only host where the model leaves the factor out
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "reference")
    gen = torch.Generator().manual_seed(11)
    layer, apply, (w13, w2), tol = PATHS[path](gen)
    layer.should_fuse_routed_scaling_factor_in_topk = True
    x, weights, ids = _tokens_and_routing(gen)
    zeros = torch.zeros(T, H)

    out = apply(layer, SimpleNamespace(hidden_states=x, topk_output=(weights * FACTOR, ids, None))).hidden_states

    ref = _reference(x, w13, w2, weights, ids, zeros)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < tol, f"{path}: relative error {rel:.3g} vs float64 (weights already carry the factor {FACTOR})"
