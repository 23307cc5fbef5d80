"""The torch.backends autoload path, in fresh interpreters: a script written for CUDA
runs unchanged with only MACA_INFER_DEVICE=emulated set, and gives the CPU's numbers."""

from __future__ import annotations

import json

import pytest
import torch
from packaging.version import Version

pytestmark = pytest.mark.slow  # each test starts interpreters that import torch

CUDA_SCRIPT = r"""
import json
import torch

assert torch.cuda.is_available()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).cuda().eval()
free, total = torch.cuda.mem_get_info()

static_in = torch.zeros(4, 16, device="cuda")
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.no_grad(), torch.cuda.stream(side):
    for _ in range(2):  # warm-up on a side stream, as the CUDA-graph docs do
        model(static_in)
torch.cuda.current_stream().wait_stream(side)

graph = torch.cuda.CUDAGraph()
with torch.no_grad(), torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle()):
    static_out = model(static_in)

host = torch.empty(4, 16).pin_memory()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
results = []
start.record()
for step in range(3):
    host.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + step)))
    static_in.copy_(host.cuda(non_blocking=True))
    graph.replay()
    out = static_out.clone()
    out.record_stream(torch.cuda.current_stream())
    results.append(out.cpu().tolist())
end.record()
torch.cuda.synchronize()


def compiled_step(x):  # torch.compile traces through the emulated names
    torch.cuda.current_stream()
    with torch.no_grad():
        return model(x.to("cuda", non_blocking=True)) * 2


compiled = torch.compile(compiled_step, backend="eager")
compiled_out = compiled(torch.ones(4, 16)).cpu().tolist()
torch.cuda.empty_cache()
torch._C._cuda_clearCublasWorkspaces()
print(json.dumps({
    "results": results, "free": free, "total": total, "elapsed_ms": start.elapsed_time(end),
    "device_name": torch.cuda.get_device_name(0), "tensor_device": static_in.device.type,
    "compiled": compiled_out,
}))
"""


def _cpu_reference():
    """The same computation written for the CPU, eager, no emulation."""
    with torch.random.fork_rng(devices=[]):  # leave this process's RNG as it was
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    outputs = []
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + step))
            outputs.append(model(x))
        compiled = model(torch.ones(4, 16)) * 2
    return outputs, compiled, param_bytes


def test_cuda_script_runs_unchanged_and_matches_cpu(run_python):
    done = run_python(CUDA_SCRIPT, env={"MACA_INFER_DEVICE": "emulated", "MACA_INFER_EMU_MEMORY_GB": "2"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected, compiled, param_bytes = _cpu_reference()
    for step, (got, want) in enumerate(zip(report["results"], expected)):
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-6, atol=1e-6, msg=f"step {step}")
    torch.testing.assert_close(torch.tensor(report["compiled"]), compiled, rtol=1e-6, atol=1e-6)
    assert report["total"] == 2 << 30
    assert report["free"] == report["total"] - param_bytes
    assert report["elapsed_ms"] >= 0
    assert report["tensor_device"] == "cpu" and "emulated" in report["device_name"]
    emulation_lines = [line for line in done.stderr.splitlines() if "EMULATED" in line]
    assert len(emulation_lines) == 1, done.stderr


SPAWN_SCRIPT = r"""
import json
import multiprocessing as mp


def child(queue):
    import torch
    t = torch.ones(3, device="cuda")
    queue.put([torch.cuda.is_available(), t.device.type, torch.cuda.get_device_name(), t.sum().item()])


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    print(json.dumps(queue.get(timeout=100)))
    proc.join(timeout=100)
    print(proc.exitcode)
"""


def test_spawned_children_get_the_emulation(run_python, tmp_path):
    script = tmp_path / "spawn_check.py"  # spawn re-imports __main__: it must be a file
    script.write_text(SPAWN_SCRIPT)
    done = run_python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
                      env={"MACA_INFER_DEVICE": "emulated"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    available, device_type, name, total = json.loads(lines[-2])
    assert (available, device_type, total) == (True, "cpu", 3.0)
    assert "emulated" in name
    assert lines[-1] == "0"


def test_without_the_variable_torch_is_untouched(run_python):
    done = run_python(
        """
        import sys, torch
        emulation = sys.modules.get("maca_infer.common.device.emulation")
        print(torch.cuda.is_available.__module__, emulation is not None and emulation.is_installed())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch.cuda", "False"]
    assert "EMULATED" not in done.stderr


def test_bad_value_is_logged_at_import_and_raised_on_use(run_python):
    done = run_python(
        """
        import torch
        from maca_infer.common.device import resolve
        print("imported")
        try:
            resolve()
        except ValueError as exc:
            print("ValueError:", exc)
        """,
        env={"MACA_INFER_DEVICE": "bogus"},
    )
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout
    expected = "MACA_INFER_DEVICE='bogus' is not allowed; use one of: auto, maca, cuda, emulated"
    assert expected in done.stderr  # logged by the autoload hook during `import torch`
    assert f"ValueError: {expected}" in done.stdout


def test_activate_is_idempotent_and_deactivate_restores(run_python):
    done = run_python(
        """
        import torch
        stock = (torch.empty, torch.Tensor.to, torch.cuda.is_available, torch.cuda.CUDAGraph)
        from maca_infer.common.device import activate, deactivate, is_emulated, torch_device
        first = activate()
        again = activate()
        assert first is again and is_emulated() and torch_device() == torch.device("cpu")
        assert torch.cuda.is_available() and torch.zeros(1, device="cuda").device.type == "cpu"
        undone = deactivate()
        assert (torch.empty, torch.Tensor.to, torch.cuda.is_available, torch.cuda.CUDAGraph) == stock
        try:
            torch.zeros(1, device="cuda")
            raised = False
        except (RuntimeError, AssertionError):
            raised = True
        print(undone, torch.cuda.is_available(), raised)
        """,
        env={"MACA_INFER_DEVICE": "emulated", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"},
    )
    assert done.returncode == 0, done.stderr
    undone, available, raised = done.stdout.split()
    assert int(undone) > 40 and available == "False" and raised == "True"


HF_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **{sys.argv[2]: torch.float32}).cuda()
ids = torch.tensor([[1, 5, 9, 100, 31]], device="cuda")
with torch.no_grad():
    logits = model(ids).logits[0, -1]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
print(json.dumps({"tokens": out.tolist(), "logits": logits.cpu().tolist()}))
"""


def test_transformers_model_written_for_cuda_matches_cpu(run_python, tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = tmp_path / "tiny-llama"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        transformers.LlamaForCausalLM(config).save_pretrained(ckpt)
    # reference: this process, on the CPU
    # transformers 4.56 renamed torch_dtype to dtype (the vendor lane runs 4.46.3)
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, **{dtype_kw: torch.float32})
    ids = torch.tensor([[1, 5, 9, 100, 31]])
    with torch.no_grad():
        want_logits = model(ids).logits[0, -1]
        want_tokens = model.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    script = tmp_path / "hf_check.py"
    script.write_text(HF_SCRIPT)
    done = run_python(
        f"import runpy, sys; sys.argv = ['hf_check', {str(ckpt)!r}, {dtype_kw!r}]; runpy.run_path({str(script)!r})",
        env={"MACA_INFER_DEVICE": "emulated"},
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # from_pretrained builds under `with torch.device("meta")`: rope buffers included
    torch.testing.assert_close(torch.tensor(got["logits"]), want_logits, rtol=1e-5, atol=1e-5)
    assert got["tokens"] == want_tokens


def test_resolve_before_torch_is_imported_does_not_wait_on_itself(run_python):
    """resolve() imports torch; torch's autoload resolves too: the first call must not hold the lock then."""
    done = run_python(
        """
        import sys
        from maca_infer.common.device import resolve
        assert "torch" not in sys.modules
        print(resolve().kind)
        """,
        env={"MACA_INFER_DEVICE": "emulated"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["emulated"]
