"""The maca SRTPlatform, its activation rule, the fused-op forwards and the patch ledger.

No server here: SGLang's classes are built in-process on CPU. The fused-op
forwards are compared with SGLang's own ``forward_native`` and a float64
computation; the ledger test resolves every runtime fix's target in the
installed SGLang (it fails when an upgrade moves one).
"""

from __future__ import annotations

import ast
import inspect
import pkgutil
import textwrap

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from maca_infer.adapters.sglang import patching, platform_plugin  # noqa: E402
from maca_infer.adapters.sglang.compat import fix_applies  # noqa: E402
from maca_infer.adapters.sglang.fused_ops import (  # noqa: E402
    _rmsnorm_forward,
    _rotary_forward,
    _silu_and_mul_forward,
    _unquantized_moe_forward,
)
from maca_infer.adapters.sglang.moe_wna16 import unpack_row_pairs  # noqa: E402
from maca_infer.adapters.sglang.platform import MacaSRTPlatform, cpu_binding_for_ranks  # noqa: E402
from maca_infer.adapters.sglang.platform_emulated import MacaEmulatedSRTPlatform  # noqa: E402
from maca_infer.common.device import detect  # noqa: E402


@pytest.fixture
def fresh_resolution(monkeypatch):
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    monkeypatch.delenv("MACA_INFER_DEVICE", raising=False)
    detect.clear_cache()
    yield monkeypatch
    detect.clear_cache()


def test_inactive_on_a_plain_cpu_host(fresh_resolution):
    """Installing maca-infer must not hijack an ordinary SGLang launch."""
    if torch.cuda.is_available():
        pytest.skip("a GPU host resolves to a device")
    assert detect.resolve().kind == "emulated"
    ok, why = platform_plugin.should_activate()
    assert not ok and "auto" in why


@pytest.mark.parametrize("env", [{"MACA_INFER_DEVICE": "emulated"}, {"SGLANG_PLATFORM": "maca"}])
def test_active_when_requested(fresh_resolution, env):
    for k, v in env.items():
        fresh_resolution.setenv(k, v)
    ok, why = platform_plugin.should_activate()
    assert ok, why


def test_bad_device_value_is_an_error(fresh_resolution):
    fresh_resolution.setenv("MACA_INFER_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="gpu0"):
        platform_plugin.should_activate()


def test_the_platform_class_follows_the_device_resolution(fresh_resolution, fake_maca_host):
    """One choice, in the entry point: the emulated subclass only on the emulated device."""
    assert detect.resolve().kind == "maca"
    assert pkgutil.resolve_name(platform_plugin.platform_class_for(detect.resolve().kind)) is MacaSRTPlatform
    fresh_resolution.setenv("MACA_INFER_DEVICE", "emulated")
    detect.clear_cache()
    path = platform_plugin.platform_class_for(detect.resolve().kind)
    assert pkgutil.resolve_name(path) is MacaEmulatedSRTPlatform
    assert issubclass(MacaEmulatedSRTPlatform, MacaSRTPlatform)
    assert platform_plugin.platform_class_for("cuda-standin") == platform_plugin.PLATFORM_CLASS


def _branches_on_emulated(cls) -> list[str]:
    """Methods of ``cls`` (its own) with an ``if`` whose condition mentions "emulated"."""
    found = []
    for name, member in vars(cls).items():
        fn = member.fget if isinstance(member, property) else member
        if not inspect.isfunction(fn):
            continue
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
            if isinstance(node, (ast.If, ast.IfExp)) and "emulated" in ast.unparse(node.test):
                found.append(name)
    return found


def test_the_real_device_platform_has_no_emulated_branches(fresh_resolution, fake_maca_host):
    assert _branches_on_emulated(MacaSRTPlatform) == []
    plat = MacaSRTPlatform()
    assert plat.device_type == "cuda" and plat.get_device_name() == "MetaX C500"
    assert plat.get_device(0) == "cuda:0" and plat.get_device(None) == "cuda"
    caps = plat.capabilities
    assert caps.supports_triton and caps.graph_capture
    assert plat.get_torch_distributed_backend_str() == "nccl"
    assert plat.get_group_coordinator_device(1) == torch.device("cuda", 1)
    assert plat.is_pin_memory_available() and plat.get_compile_backend() == "inductor"
    assert plat.get_graph_runner_cls().__name__ == "DecodeCudaGraphRunner"
    args = SimpleNamespace(attention_backend=None, max_total_tokens=None, sampling_backend=None, tp_size=2)
    plat.apply_server_args_defaults(args)
    assert args.attention_backend == "maca" and not hasattr(args, "disable_cuda_graph")
    assert args.max_total_tokens is None and args.sampling_backend is None


def test_emulated_platform_answers(fresh_resolution):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    fresh_resolution.setenv("MACA_INFER_DEVICE", "emulated")
    plat = MacaEmulatedSRTPlatform()
    assert plat.is_out_of_tree() and plat.device_name == "maca"
    assert plat.get_device(0) == "cpu" and isinstance(plat.get_device(1), str)
    caps = plat.capabilities
    assert not caps.supports_triton and not caps.graph_capture and not caps.supports_pynccl
    assert plat.get_torch_distributed_backend_str() == "gloo"
    assert plat.get_dispatch_key_name() == "maca"
    assert plat.get_default_attention_backend() == "maca"
    assert plat.get_kv_pool_cls(kind="mha") is MHATokenToKVPool
    assert plat.get_kv_pool_cls(kind="mla") is MLATokenToKVPool
    assert plat.get_kv_pool_cls(kind="dsa") is None
    assert plat.get_graph_runner_cls() is None
    free, total = plat.get_available_memory()
    assert 0 <= free <= total


def test_server_args_defaults_keep_user_choices(fresh_resolution):
    fresh_resolution.setenv("MACA_INFER_DEVICE", "emulated")
    fresh_resolution.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0")  # keep the test from writing os.environ
    plat = MacaEmulatedSRTPlatform()
    unset = SimpleNamespace(attention_backend=None, max_total_tokens=None, sampling_backend=None, tp_size=1)
    plat.apply_server_args_defaults(unset)
    assert unset.attention_backend == "maca" and unset.disable_cuda_graph is True
    assert unset.max_total_tokens > 0 and unset.sampling_backend == "pytorch"
    chosen = SimpleNamespace(attention_backend="torch_native", max_total_tokens=1234, sampling_backend="pytorch")
    plat.apply_server_args_defaults(chosen)
    assert chosen.attention_backend == "torch_native" and chosen.max_total_tokens == 1234


def test_cpu_binding_for_ranks():
    assert cpu_binding_for_ranks(2, [0, 1, 2, 3]) == "0-1|2-3"
    assert cpu_binding_for_ranks(4, [0, 1]) == "0|1|0|1"
    assert cpu_binding_for_ranks(1, [5]) == "5"
    with pytest.raises(ValueError, match="ranks=0"):
        cpu_binding_for_ranks(0, [0])


# ---------------------------------------------------------------- fused ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_forward_matches_native_and_float64(dtype):
    from sglang.srt.layers.layernorm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96)
    x = torch.randn(7, 96).to(dtype)
    res = torch.randn(7, 96).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)

    out = _rmsnorm_forward(norm, x)
    ref64 = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(out.double(), ref64, **tol)
    torch.testing.assert_close(out, norm.forward_native(x), **tol)

    ours_res = res.clone()
    normed, new_res = _rmsnorm_forward(norm, x, ours_res)
    native_normed, native_res = norm.forward_native(x, res.clone())
    torch.testing.assert_close(new_res, native_res, atol=0, rtol=0)
    torch.testing.assert_close(normed, native_normed, **tol)


def _silu_and_mul():
    """SGLang's SiluAndMul without a server: its __init__ reads the published server config in
    SGLang 0.5.17 (it has no state: the module alone)."""
    from sglang.srt.layers.activation import SiluAndMul

    op = SiluAndMul.__new__(SiluAndMul)
    torch.nn.Module.__init__(op)
    return op


def test_silu_and_mul_forward_matches_native():
    x = torch.randn(5, 2 * 48)
    op = _silu_and_mul()
    torch.testing.assert_close(_silu_and_mul_forward(op, x), op.forward_native(x), atol=1e-6, rtol=1e-6)


def test_norm_and_mlp_forwards_compile_without_graph_break(default_server_config):
    """Under torch.compile the RMSNorm / SiLU-and-mul forwards are torch.ops.maca_infer nodes (fullgraph)."""
    from sglang.srt.layers.layernorm import RMSNorm

    from maca_infer.common.ops import library  # noqa: F401 - what register_fused_op_forwards imports

    torch.manual_seed(0)
    norm, act = RMSNorm(32, eps=1e-5), _silu_and_mul()
    norm.weight.data = torch.randn(32)
    up = torch.randn(64, 32)

    def block(x, residual):
        normed, residual = _rmsnorm_forward(norm, x, residual)
        return _rmsnorm_forward(norm, _silu_and_mul_forward(act, normed @ up.t())), residual

    x, res = torch.randn(5, 32), torch.randn(5, 32)
    torch._dynamo.reset()
    with torch.no_grad():  # as SGLang runs its model (the custom ops have no autograd formula)
        explained = torch._dynamo.explain(block)(x, res.clone())
    assert explained.graph_break_count == 0, explained.break_reasons
    ops_in_graph = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"maca_infer.add_rms_norm", "maca_infer.rms_norm", "maca_infer.silu_and_mul"} <= ops_in_graph

    eager_res, compiled_res = res.clone(), res.clone()
    with torch.no_grad():
        expected, _ = block(x, eager_res)
        actual, returned = torch.compile(block, backend="aot_eager", fullgraph=True)(x, compiled_res)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled_res, eager_res, atol=0, rtol=0)  # updated in place, as in eager
    assert returned is compiled_res


@pytest.mark.parametrize("neox", [True, False])
def test_rotary_forward_matches_native(neox, fresh_resolution, default_server_config):
    from sglang.srt.layers.rotary_embedding import base
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    # built as in a maca server process (the test process resolved SGLang's
    # platform at import, before any maca request)
    fresh_resolution.setenv("MACA_INFER_DEVICE", "emulated")
    fresh_resolution.setattr(base, "current_platform", MacaSRTPlatform())
    rope = RotaryEmbedding(head_size=64, rotary_dim=32, max_position_embeddings=256, base=10000,
                           is_neox_style=neox, dtype=torch.float32)
    positions = torch.tensor([0, 5, 17, 200, 3])
    q = torch.randn(5, 4 * 64)
    k = torch.randn(5, 2 * 64)
    q_ours, k_ours = _rotary_forward(rope, positions, q.clone(), k.clone())
    q_ref, k_ref = rope.forward_native(positions, q.clone(), k.clone())
    torch.testing.assert_close(q_ours, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_ref, atol=1e-5, rtol=1e-5)


def test_rotary_forward_compiles_without_graph_break(fresh_resolution, default_server_config):
    from sglang.srt.layers.rotary_embedding import base
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    from maca_infer.common.ops import library  # noqa: F401 - what register_fused_op_forwards imports

    fresh_resolution.setenv("MACA_INFER_DEVICE", "emulated")
    fresh_resolution.setattr(base, "current_platform", MacaSRTPlatform())
    rope = RotaryEmbedding(head_size=64, rotary_dim=32, max_position_embeddings=256, base=10000,
                           is_neox_style=False, dtype=torch.float32)
    positions, q, k = torch.tensor([0, 5, 17, 200, 3]), torch.randn(5, 4 * 64), torch.randn(5, 2 * 64)

    def rotate(positions, q, k):
        return _rotary_forward(rope, positions, q, k)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(rotate)(positions, q, k)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert "maca_infer.rotary_embedding" in {str(n.target) for g in explained.graphs for n in g.graph.nodes}
    q_ours, k_ours = torch.compile(rotate, backend="aot_eager", fullgraph=True)(positions, q, k)
    q_ref, k_ref = rope.forward_native(positions, q.clone(), k.clone())
    torch.testing.assert_close(q_ours, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_ref, atol=1e-5, rtol=1e-5)


def test_unquantized_moe_forward_matches_native_and_float64(default_server_config):
    from types import SimpleNamespace

    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native

    torch.manual_seed(1)
    E, H, I, T, k = 6, 32, 48, 9, 2
    layer = SimpleNamespace(num_experts=E, w13_weight=torch.randn(E, 2 * I, H) * 0.2,
                            w2_weight=torch.randn(E, H, I) * 0.2)
    cfg = SimpleNamespace(activation="silu", apply_router_weight_on_input=False, gemm1_alpha=None,
                          gemm1_clamp_limit=None)
    x = torch.randn(T, H)
    weights = torch.rand(T, k)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    method = SimpleNamespace(moe_runner_config=cfg, forward_native=None)
    out = _unquantized_moe_forward(method, layer, SimpleNamespace(hidden_states=x, topk_output=(weights, ids, None)))
    native = moe_forward_native(layer, x, (weights, ids, None), cfg)
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            gate_up = layer.w13_weight[e].double() @ x[t].double()
            h = torch.nn.functional.silu(gate_up[:I]) * gate_up[I:]
            ref[t] += weights[t, j].double() * (layer.w2_weight[e].double() @ h)
    torch.testing.assert_close(out.hidden_states.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.hidden_states, native, atol=1e-4, rtol=1e-4)


def test_unpack_row_pairs_matches_sglang_packing():
    """moe_wna16 packs zero points two rows per byte (awq loader: high = odd row)."""
    zeros = torch.randint(0, 16, (3, 8, 5), dtype=torch.uint8)
    packed = zeros[:, 1::2, :] * 16 + zeros[:, ::2, :]
    assert torch.equal(unpack_row_pairs(packed), zeros)


# ---------------------------------------------------------------- ledger


def test_every_runtime_fix_is_ledgered_and_resolves():
    assert patching.applied() == [], "another test left runtime fixes applied"
    try:
        patching.register_all(emulated=True)
        applied = patching.applied()
        assert len(applied) >= 5
        for record in applied:
            assert record.why and record.how and record.remove_when and "0.5" in record.versions
            pkgutil.resolve_name(record.target)  # still exists in the installed SGLang
        with pytest.raises(RuntimeError, match="already"):
            patching.hook(patching.ROPE_WRAPPER, lambda *a, **k: None)
    finally:
        assert patching.undo_all() == len(applied)
    from sglang.srt.distributed import parallel_state

    assert parallel_state._is_cpu is False  # restored


def test_sglang_hooks_are_undone_through_the_helper():
    """The hook SGLang holds runs the fix while it is applied and SGLang's own function after undo."""
    from sglang.srt.distributed import parallel_state

    seen = []

    def get_rope_upstream(*args, **kwargs):
        seen.append(kwargs.get("device"))

    patching.register_all(emulated=True)
    try:
        rope_hook = patching.hook_of(patching.ROPE_WRAPPER.target)
        rope_hook(get_rope_upstream, 64, device="cpu")
        assert seen == [None] and parallel_state._is_cpu is True
    finally:
        patching.undo_all()
    rope_hook(get_rope_upstream, 64, device="cpu")
    assert seen == [None, "cpu"] and parallel_state._is_cpu is False
    # applying again re-arms the same hook (SGLang's registry gets no second one)
    patching.register_all(emulated=False)
    try:
        assert patching.hook_of(patching.ROPE_WRAPPER.target) is rope_hook
        assert [r.target for r in patching.applied()] == [patching.ROPE_WRAPPER.target,
                                                          patching.FLASHINFER_MLA_FLAG.target]
        rope_hook(get_rope_upstream, 64, device="cpu")
        assert seen[-1] is None
    finally:
        patching.undo_all()


@pytest.mark.parametrize("cls", [MacaSRTPlatform, MacaEmulatedSRTPlatform])
def test_each_platform_applies_its_own_runtime_fixes(fresh_resolution, cls):
    """The real-device class applies the device fixes; the emulated subclass adds its own set."""
    fresh_resolution.setenv("MACA_INFER_DEVICE", "emulated")  # construction only: no device queried
    assert patching.applied() == [], "another test left runtime fixes applied"
    try:
        cls().register_runtime_fixes()
        got = [r.target for r in patching.applied()]
    finally:
        patching.undo_all()
    try:
        patching.register_all(emulated=cls.emulated)
        expected = [r.target for r in patching.applied()]
    finally:
        patching.undo_all()
    assert got == expected
    assert (patching.PARALLEL_STATE_IS_CPU.target in got) is (cls is MacaEmulatedSRTPlatform)
    # a fix of a name this SGLang lacks is left out, on every platform (compat.FIX_SINCE)
    assert (patching.DP_MEMCPY.target in got) is (cls is MacaEmulatedSRTPlatform and fix_applies(patching.DP_MEMCPY.target))


# ---------------------------------------------------------------- SGLang releases (compat.py)


def test_compat_answers_the_installed_sglang_interface(fresh_resolution):
    """The platform answers the interface of the installed SGLang: each hook its SRTPlatform
    declares (capabilities, pool getters, allocator) resolves to a working answer."""
    from sglang.srt.mem_cache import memory_pool
    from sglang.srt.platforms.interface import SRTPlatform

    from maca_infer.adapters.sglang import compat

    fresh_resolution.setenv("MACA_INFER_DEVICE", "emulated")
    platform = MacaEmulatedSRTPlatform()
    assert platform.capabilities.graph_capture is False and platform.capabilities.supports_triton is False
    if compat.has("capabilities"):
        assert platform.get_paged_allocator_cls() is None  # SGLang's own, torch-native without Triton
        assert platform.get_kv_pool_cls(kind="mha") is memory_pool.MHATokenToKVPool
    else:
        # the pre-0.5.22 names SGLang calls, from the same answers
        for name in ("support_cuda_graph", "get_mha_kv_pool_cls", "get_mla_kv_pool_cls", "get_paged_allocator_cls"):
            assert hasattr(SRTPlatform, name), f"SGLang {compat.sglang_version()} has no {name}"
        assert platform.support_cuda_graph() is False and platform.support_piecewise_cuda_graph() is False
        assert platform.get_mha_kv_pool_cls() is memory_pool.MHATokenToKVPool
        # built as SGLang < 0.5.22 builds an out-of-tree MLA pool (it passes index_head_dim)
        mla = platform.get_mla_kv_pool_cls()(
            16, page_size=1, dtype=torch.bfloat16, kv_lora_rank=32, qk_rope_head_dim=16, index_head_dim=None,
            layer_num=1, device="cpu", enable_memory_saver=False, start_layer=0, end_layer=0)
        assert type(mla) is memory_pool.MLATokenToKVPool and mla.get_key_buffer(0).shape[-1] == 32 + 16
        with pytest.raises(NotImplementedError, match="sparse attention"):
            platform.get_mla_kv_pool_cls()(16, index_head_dim=128)
        with pytest.raises(NotImplementedError, match="no dsa KV pool"):
            platform.get_dsa_kv_pool_cls()


def test_older_sglang_refuses_what_it_cannot_serve_naming_the_version(fresh_resolution):
    from maca_infer.adapters.sglang import compat

    if compat.has("emulated_paged_allocator"):
        pytest.skip(f"SGLang {compat.sglang_version()} serves pages > 1 on the emulated device (refused before "
                    f"{compat.FEATURES['emulated_paged_allocator'][0]})")
    fresh_resolution.setenv("MACA_INFER_DEVICE", "emulated")
    platform = MacaEmulatedSRTPlatform()
    make = platform.get_paged_allocator_cls()
    common = dict(dtype=torch.bfloat16, device="cpu", kvcache=None, need_sort=False)
    with pytest.raises(RuntimeError, match=rf"needs SGLang >= 0\.5\.22; this is SGLang {compat.sglang_version()}"):
        make(64, page_size=16, **common)
    assert make(64, page_size=1, **common).available_size() == 64  # one-token pages: torch only
    if not compat.has("emulated_dp_attention"):
        args = SimpleNamespace(enable_dp_attention=True, attention_backend="maca", tp_size=2, dp_size=2, pp_size=1)
        refused = r"--enable-dp-attention on the emulated.*needs SGLang >= 0\.5\.19; this is SGLang"
        with pytest.raises(RuntimeError, match=refused):
            platform.apply_server_args_defaults(args)
