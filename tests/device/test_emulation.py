"""The emulated maca device, in this process (each test installs and removes it).

Numbers are checked against the same computation written for the CPU.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from maca_infer.common.device import emulation
from maca_infer.common.device._patch import PATCHES

BUDGET = 1 << 30


@pytest.fixture(scope="module", autouse=True)
def _dynamo_sees_stock_torch():
    # `with torch.device(...)` imports torch._dynamo at its first op, and Dynamo
    # binds some torch.cuda names at import. Import it before these tests
    # install/uninstall the emulation, so later tests in this process (other
    # areas) find Dynamo bound to stock torch.
    if not emulation.is_installed():
        import torch._dynamo  # noqa: F401


@pytest.fixture
def emulated():
    """Two emulated devices with a 1 GiB budget; the process-wide one (if any) is put back after."""
    was_installed = emulation.is_installed()
    if was_installed:
        emulation.uninstall()
    emulation.install(device_count=2, memory_budget=BUDGET)
    try:
        yield emulation
    finally:
        emulation.uninstall()
        if was_installed:
            emulation.install()


def test_torch_cuda_answers_for_the_emulated_device(emulated):
    assert torch.cuda.is_available() is True
    assert torch.cuda.device_count() == 2
    assert torch.cuda.current_device() == 0
    name = torch.cuda.get_device_name()
    assert "MetaX" in name and "emulated" in name
    props = torch.cuda.get_device_properties(0)
    assert props.name == name
    assert props.total_memory == BUDGET
    assert (props.major, props.minor) == torch.cuda.get_device_capability()
    assert props.multi_processor_count >= 1 and props.warp_size > 0
    assert torch.cuda.is_bf16_supported()
    assert torch.accelerator.is_available() and torch.accelerator.device_count() == 2
    assert torch.get_device_module("cuda").is_available()


def test_set_device_is_validated(emulated):
    torch.cuda.set_device(1)
    assert torch.cuda.current_device() == 1
    with torch.cuda.device(0):
        assert torch.cuda.current_device() == 0
    assert torch.cuda.current_device() == 1
    torch.cuda.set_device("cuda:0")
    with pytest.raises(ValueError, match=r"device index 2 is out of range: .* 2 device\(s\) \(valid: 0..1\)"):
        torch.cuda.set_device(2)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.zeros(1, device="cuda:7")


def test_current_device_is_per_thread(emulated):
    torch.cuda.set_device(1)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(torch.cuda.current_device()))
    worker.start()
    worker.join()
    assert seen == [0]  # a new thread starts on device 0, as with CUDA
    torch.cuda.set_device(0)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 1), 0])
def test_device_arguments_land_on_cpu(emulated, device):
    before = torch.cuda.memory_allocated()
    t = torch.ones(256, device=device, dtype=torch.float32)
    assert t.device.type == "cpu"
    assert torch.equal(t, torch.ones(256))
    assert torch.cuda.memory_allocated() - before == 256 * 4


def test_factories_methods_and_modules(emulated):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    cases = {
        "empty_like": torch.empty_like(x, device="cuda").shape,
        "zeros_like": torch.zeros_like(x, device="cuda").sum().item(),
        "full": torch.full((2,), 7.0, device="cuda").tolist(),
        "tensor": torch.tensor([1, 2], device="cuda").tolist(),
        "as_tensor": torch.as_tensor([3, 4], device="cuda").tolist(),
        "new_zeros": x.new_zeros((2,), device="cuda").tolist(),
        "cuda": x.cuda().sum().item(),
        "to": x.to("cuda", torch.float16).dtype,
    }
    assert cases == {
        "empty_like": x.shape, "zeros_like": 0.0, "full": [7.0, 7.0], "tensor": [1, 2], "as_tensor": [3, 4],
        "new_zeros": [0.0, 0.0], "cuda": x.sum().item(), "to": torch.float16,
    }
    linear = torch.nn.Linear(4, 3)
    reference = linear(x)
    moved = linear.cuda()
    assert next(moved.parameters()).device.type == "cpu"
    assert torch.equal(moved(x.cuda()), reference)
    with torch.device("cuda"):
        assert torch.zeros(2).device.type == "cpu"
    empty_module = torch.nn.Linear(2, 2, device="meta").to_empty(device="cuda")
    assert next(empty_module.parameters()).device.type == "cpu"
    # storage-less layouts move too (not counted as device memory)
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (3,), check_invariants=True)
    assert torch.equal(sparse.cuda().to_dense(), torch.tensor([1.0, 0.0, 2.0]))


def test_default_device_contexts_still_apply_to_wrapped_factories(emulated):
    # Transformers builds models under `with torch.device("meta")`; the rope
    # buffers come out wrong if the context misses a factory. torch caches its
    # set of factories on first use: start from an empty cache, as in a fresh
    # process where the autoload hook installs the emulation during import.
    import torch.utils._device as device_util

    emulation.uninstall()
    device_util._device_constructors.cache_clear()
    emulation.install(device_count=2, memory_budget=BUDGET)
    builders = {
        "arange": lambda: torch.arange(0, 8, 2, dtype=torch.float),
        "empty": lambda: torch.empty(3),
        "zeros": lambda: torch.zeros(2, 2),
        "full": lambda: torch.full((2,), 1.5),
        "tensor": lambda: torch.tensor([1.0, 2.0]),
        "linear": lambda: torch.nn.Linear(2, 2).weight,
    }
    for name, build in builders.items():
        with torch.device("meta"):
            assert build().device.type == "meta", name
        with torch.device("cuda"):
            assert build().device.type == "cpu", name
    torch.set_default_device("cuda")
    try:
        assert torch.ones(2).device.type == "cpu"
    finally:
        torch.set_default_device(None)


def test_host_device_copies_keep_copy_semantics(emulated):
    host = torch.zeros(4)
    on_device = host.to("cuda", non_blocking=True)
    host += 1  # reusing the (pinned) host buffer must not touch the device copy
    assert torch.equal(on_device, torch.zeros(4))
    assert on_device.to("cuda") is on_device  # already there: no copy, as on CUDA
    assert on_device.cuda() is on_device
    back = on_device.cpu()
    on_device += 5
    assert torch.equal(back, torch.zeros(4))
    assert torch.equal(on_device.to("cpu"), torch.full((4,), 5.0))
    assert on_device.to("cpu") is not on_device
    # x.device of a device tensor reads "cpu": to(x.device) means "stay on x's device"
    assert on_device.device == torch.device("cpu")
    before = torch.cuda.memory_allocated()
    same_place = on_device.to(on_device.device)
    assert same_place is on_device
    as_int = on_device.to(device=on_device.device, dtype=torch.int32)
    assert as_int.dtype == torch.int32 and as_int.tolist() == [5, 5, 5, 5]
    assert torch.cuda.memory_allocated() - before == 4 * 4  # the converted copy is device memory


TO_FORMS = {
    "device": (lambda x, d: x.to("cuda"), torch.float32, True),
    "device copy=True": (lambda x, d: x.to("cuda", copy=True), torch.float32, True),
    "positional copy": (lambda x, d: x.to("cuda", torch.float64, False, True), torch.float64, True),
    "keywords": (lambda x, d: x.to(device="cuda", dtype=torch.half, non_blocking=True), torch.float16, True),
    "int ordinal": (lambda x, d: x.to(0), torch.float32, True),
    "like a device tensor": (lambda x, d: x.to(d), torch.float32, True),
    "dtype only": (lambda x, d: x.to(torch.float16), torch.float16, False),
    "memory format only": (lambda x, d: x.to(memory_format=torch.channels_last), torch.float32, False),
    "cuda(0)": (lambda x, d: x.cuda(0), torch.float32, True),
}


@pytest.mark.parametrize("form", list(TO_FORMS))
def test_tensor_to_forms(emulated, form):
    convert, dtype, to_device = TO_FORMS[form]
    x = torch.arange(120, dtype=torch.float32).reshape(2, 3, 4, 5)
    device_tensor = torch.zeros(1, device="cuda")
    before = torch.cuda.memory_allocated()
    out = convert(x, device_tensor)
    assert out.device.type == "cpu" and out.dtype == dtype
    assert torch.equal(out.to(torch.float64), x.to(torch.float64))
    if to_device:
        assert out.data_ptr() != x.data_ptr()  # host -> device is a copy
        assert torch.cuda.memory_allocated() - before == out.untyped_storage().nbytes()
    else:
        assert torch.cuda.memory_allocated() == before


def test_memory_figures_follow_live_device_tensors(emulated):
    base = torch.cuda.memory_allocated()
    free0, total = torch.cuda.mem_get_info()
    assert total == BUDGET and free0 == BUDGET - base
    torch.cuda.reset_peak_memory_stats()
    block = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    view = block[10:]
    assert torch.cuda.memory_allocated() == base + (1 << 20)
    assert torch.cuda.mem_get_info()[0] == free0 - (1 << 20)
    del block
    assert torch.cuda.memory_allocated() == base + (1 << 20)  # the view keeps the storage alive
    del view
    assert torch.cuda.memory_allocated() == base
    assert torch.cuda.max_memory_allocated() == base + (1 << 20)
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.max_memory_allocated() == base
    assert torch.cuda.memory_stats()["allocated_bytes.all.current"] == base
    host_only = torch.empty(1 << 20)  # not on the device: not counted
    assert torch.cuda.memory_allocated() == base
    del host_only
    # a model moved to the device, then converted: its new storages are device memory
    layer = torch.nn.Linear(64, 64).cuda()
    float_bytes = sum(p.numel() * 4 for p in layer.parameters())
    assert torch.cuda.memory_allocated() == base + float_bytes
    layer.half()
    assert torch.cuda.memory_allocated() == base + float_bytes // 2
    layer.to(torch.bfloat16)
    assert torch.cuda.memory_allocated() == base + float_bytes // 2
    del layer
    assert torch.cuda.memory_allocated() == base


def test_streams_and_events(emulated):
    side = torch.cuda.Stream()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    with torch.cuda.stream(side):
        assert torch.cuda.current_stream() == side
        x = torch.ones(8, device="cuda") * 2
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    side.wait_stream(torch.cuda.current_stream())
    x.record_stream(side)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    time.sleep(0.02)
    end.record(side)
    end.synchronize()
    assert start.query() and end.query() and side.query()
    elapsed = start.elapsed_time(end)
    assert 15.0 <= elapsed < 2000.0
    with pytest.raises(RuntimeError, match="enable_timing"):
        torch.cuda.Event().elapsed_time(torch.cuda.Event())
    torch.cuda.set_stream(side)
    assert torch.cuda.current_stream() == side
    torch.cuda.set_stream(torch.cuda.default_stream())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch._C._cuda_clearCublasWorkspaces()
    assert torch.cuda.is_current_stream_capturing() is False


def test_pin_memory_works_and_copies(emulated):
    host = torch.arange(4.0)
    pinned = host.pin_memory()
    assert torch.equal(pinned, host) and pinned.data_ptr() != host.data_ptr()
    staged = torch.empty(4, pin_memory=True)
    assert staged.shape == (4,)


def test_rng_seeding_is_the_cpu_generator(emulated):
    torch.cuda.manual_seed(1234)
    a = torch.randn(5, device="cuda")
    torch.manual_seed(1234)
    b = torch.randn(5)
    assert torch.equal(a, b)
    state = torch.cuda.get_rng_state()
    c = torch.rand(3, device="cuda")
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), c)


def test_autocast_cuda_casts_like_a_device_run(emulated):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = a.cuda() @ b.cuda()
    expected = (a.to(torch.bfloat16) @ b.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_torch_load_maps_the_device_to_host(emulated, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    for location in ("cuda", torch.device("cuda:0"), {"cpu": "cuda:0"}, None):
        loaded = torch.load(path, map_location=location)
        assert loaded["w"].device.type == "cpu" and torch.equal(loaded["w"], torch.arange(3.0))


def test_works_from_framework_threads(emulated):
    results = []

    def worker():
        t = torch.full((16,), 3.0, device="cuda")
        results.append((t.device.type, t.sum().item(), torch.cuda.is_available()))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [("cpu", 48.0, True)] * 3


# --------------------------------------------------------------------------- graphs


class DecodeStep(torch.nn.Module):
    """A decode step shaped like a framework's: embeddings, a cache written in place,
    attention over the cache (views), an out= add, logits."""

    def __init__(self, vocab=11, hidden=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, tokens, positions, cache, scratch):
        x = self.embed(tokens)
        h = torch.tanh(self.proj(x))
        cache.index_copy_(0, positions, h)
        scores = torch.softmax(h @ cache.transpose(0, 1), dim=-1)
        attended = scores @ cache
        torch.add(attended, h, out=scratch)
        return scratch @ self.embed.weight.t()


def _run_steps(model, steps, use_graph):
    cache = torch.zeros(6, 8, device="cuda" if use_graph else "cpu")
    tokens = torch.zeros(2, dtype=torch.long, device=cache.device)
    positions = torch.zeros(2, dtype=torch.long, device=cache.device)
    scratch = torch.empty(2, 8, device=cache.device)
    outputs = []
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        tokens.copy_(steps[0][0])
        positions.copy_(steps[0][1])
        # as LMDeploy's runner does: a warm-up call, then capture on the current stream
        model(tokens, positions, cache.clone(), scratch.clone())
        with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle(), stream=torch.cuda.current_stream()):
            logits = model(tokens, positions, cache, scratch)
        outputs.append(logits.clone())
        for tok, pos in steps[1:]:
            tokens.copy_(tok)
            positions.copy_(pos)
            graph.replay()
            outputs.append(logits.clone())
        return outputs, cache
    for tok, pos in steps:
        outputs.append(model(tok, pos, cache, scratch).clone())
    return outputs, cache


def test_graph_replay_matches_eager(emulated):
    torch.manual_seed(0)
    model = DecodeStep()
    steps = [
        (torch.tensor([1, 2]), torch.tensor([0, 1])),
        (torch.tensor([3, 4]), torch.tensor([2, 3])),
        (torch.tensor([5, 10]), torch.tensor([4, 5])),
        (torch.tensor([7, 7]), torch.tensor([1, 4])),
    ]
    with torch.no_grad():
        expected, expected_cache = _run_steps(model, steps, use_graph=False)
        got, cache = _run_steps(model, steps, use_graph=True)
    for step, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=f"step {step}")
    torch.testing.assert_close(cache, expected_cache, rtol=1e-6, atol=1e-6)
    # the replays really recomputed: outputs of different steps differ
    assert not torch.allclose(got[1], got[2])


def test_graph_capture_state_and_api(emulated):
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before a capture"):
        graph.replay()
    x = torch.ones(3, device="cuda")
    with torch.cuda.graph(graph):
        assert torch.cuda.is_current_stream_capturing()
        y = x * 2
    assert not torch.cuda.is_current_stream_capturing()
    assert len(graph.pool()) == 2
    x.fill_(5)
    graph.replay()
    assert torch.equal(y, torch.full((3,), 10.0))
    graph.reset()
    with pytest.raises(RuntimeError, match="before a capture"):
        graph.replay()


@pytest.mark.parametrize(
    "host_read",
    [
        lambda t: t.sum().item(),
        lambda t: t.tolist(),
        lambda t: t.cpu(),
        lambda t: (t * 2).max().item(),  # a value computed on the device during capture
        lambda t: torch.nonzero(t),
        lambda t: bool(t[0] > 0),
    ],
)
def test_host_reads_of_device_data_during_capture_raise(emulated, host_read):
    x = torch.tensor([1.0, 0.0, 2.0], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="while a graph is being captured"):
        with torch.cuda.graph(graph):
            host_read(x)
    assert not torch.cuda.is_current_stream_capturing()
    assert x.sum().item() == 3.0 and x.tolist() == [1.0, 0.0, 2.0]  # fine outside a capture


def test_graph_with_data_dependent_shape_fails_loudly_at_replay(emulated):
    host_mask = torch.tensor([1.0, 0.0, 2.0])  # host data may be read during capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.nonzero(host_mask)
    host_mask.zero_()
    with pytest.raises(RuntimeError, match="data-dependent shapes"):
        graph.replay()


# --------------------------------------------------------------------------- patch bookkeeping


def test_no_double_install_and_no_double_patch(emulated):
    with pytest.raises(RuntimeError, match="already installed"):
        emulation.install()
    with pytest.raises(RuntimeError, match="already patched"):
        PATCHES.patch(torch.cuda, "is_available", lambda: False, why="test")
    assert PATCHES.original(torch.cuda, "is_available")() is False  # the stock answer on this host
    assert all(record.why for record in PATCHES.records())


def test_uninstall_restores_stock_torch():
    was_installed = emulation.is_installed()
    if was_installed:
        emulation.uninstall()
    import torch.amp.autocast_mode as autocast_mode
    import torch.utils._device as device_util

    watched = [
        (torch, "empty"), (torch, "zeros_like"), (torch, "load"), (torch, "as_tensor"),
        (torch.cuda, "is_available"), (torch.cuda, "Stream"), (torch.cuda, "CUDAGraph"), (torch.cuda, "graph"),
        (torch.cuda.graphs, "CUDAGraph"), (torch.accelerator, "is_available"),
    ]
    stock = {(id(o), a): getattr(o, a) for o, a in watched}
    tensor_dict = {a: torch.Tensor.__dict__.get(a) for a in ("to", "cuda", "cpu", "pin_memory", "new_zeros")}
    init_stock = (device_util.DeviceContext.__dict__["__init__"], autocast_mode.autocast.__dict__["__init__"])
    had_clear = hasattr(torch._C, "_cuda_clearCublasWorkspaces")
    try:
        emulation.install(memory_budget=BUDGET)
        assert torch.cuda.is_available()
        assert any(getattr(o, a) is not stock[(id(o), a)] for o, a in watched)
        undone = emulation.uninstall()
        assert undone > 40
        for o, a in watched:
            assert getattr(o, a) is stock[(id(o), a)], f"{o.__name__}.{a} not restored"
        assert {a: torch.Tensor.__dict__.get(a) for a in tensor_dict} == tensor_dict
        init_now = (device_util.DeviceContext.__dict__["__init__"], autocast_mode.autocast.__dict__["__init__"])
        assert init_now == init_stock
        assert hasattr(torch._C, "_cuda_clearCublasWorkspaces") == had_clear
        assert PATCHES.records() == []
        if not PATCHES.original(torch.cuda, "is_available")():
            with pytest.raises(RuntimeError):
                torch.zeros(1, device="cuda")
    finally:
        if emulation.is_installed():
            emulation.uninstall()
        if was_installed:
            emulation.install()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_sees_wrapped_factories_as_aten_ops(emulated):
    from torch.jit import _builtins

    def ramp(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) + torch.arange(x.shape[0], device=x.device, dtype=x.dtype)

    scripted = torch.jit.script(ramp)
    x = torch.ones(5)
    torch.testing.assert_close(scripted(x), torch.arange(5.0))
    assert _builtins._find_builtin(torch.zeros_like) == "aten::zeros_like"
    wrapper = torch.zeros_like
    emulation.uninstall()
    try:
        assert _builtins._find_builtin(wrapper) is None  # no stale id left in TorchScript's table
    finally:
        emulation.install(device_count=2, memory_budget=BUDGET)


def test_device_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("MACA_INFER_EMU_DEVICE_COUNT", "3")
    assert emulation._configured_device_count() == 3
    monkeypatch.setenv("MACA_INFER_EMU_DEVICE_COUNT", "0")
    with pytest.raises(ValueError, match=r"MACA_INFER_EMU_DEVICE_COUNT='0' must be an integer >= 1"):
        emulation._configured_device_count()
    monkeypatch.delenv("MACA_INFER_EMU_DEVICE_COUNT")
    assert emulation._configured_device_count() == 1


def test_memory_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("MACA_INFER_EMU_MEMORY_GB", "0.5")
    assert emulation.default_memory_budget() == 1 << 29
    monkeypatch.setenv("MACA_INFER_EMU_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="MACA_INFER_EMU_MEMORY_GB='lots'"):
        emulation.default_memory_budget()
    monkeypatch.delenv("MACA_INFER_EMU_MEMORY_GB")
    assert 0 < emulation.default_memory_budget() <= emulation._host_memory_bytes() // 4


@pytest.mark.parametrize("bad", [0, -1, "2"])
def test_install_rejects_a_bad_device_count(bad):
    if emulation.is_installed():
        pytest.skip("the emulation is installed process-wide")
    with pytest.raises(ValueError, match="device_count"):
        emulation.install(device_count=bad, memory_budget=BUDGET)
    assert not emulation.is_installed() and PATCHES.records() == []


def test_activate_raises_env_errors_but_still_installs_the_emulation(monkeypatch):
    from maca_infer.common.device import activate, detect

    if emulation.is_installed():
        pytest.skip("the emulation is installed process-wide")
    monkeypatch.setenv("MACA_INFER_DEVICE", "emulated")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("MACA_VISIBLE_DEVICES", "1")
    detect.clear_cache()
    try:
        with pytest.raises(ValueError, match="disagree"):
            activate()
        assert emulation.is_installed() and torch.cuda.is_available()
    finally:
        emulation.uninstall()
        detect.clear_cache()
