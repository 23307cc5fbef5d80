"""How LMDeploy finds maca-infer: the dlinfer import hook, upstream registration,
the version gate and the patch ledger."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from lmdeploy_helpers import PYTHON

# An upstream-like dlinfer: vendor chosen "at build time" (maca), ops registered by
# name into dlinfer.vendor.vendor_ops_registry, dlinfer.ops looking names up there,
# and a maca vendor that lacks W4A16/MLA ops (like upstream's).
FAKE_UPSTREAM = {
    "dlinfer/__init__.py": """
        import dlinfer.vendor as vendor
        vendor.vendor_torch_init()
        __version__ = "0.2.8+fake-upstream"
    """,
    "dlinfer/vendor/__init__.py": """
        import importlib
        vendor_ops_registry = dict()
        vendor_name = "maca"
        dispatch_key = "CUDA"
        def vendor_torch_init():
            importlib.import_module(f".{vendor_name}", __package__)
    """,
    "dlinfer/vendor/maca/__init__.py": """
        from dlinfer.utils.registry import register_ops
        from dlinfer.vendor import vendor_ops_registry

        @register_ops(vendor_ops_registry)
        def rms_norm(hidden_states, weight, epsilon):
            return "upstream rms_norm"
    """,
    "dlinfer/utils/__init__.py": "",
    "dlinfer/utils/registry.py": """
        def register_ops(registry):
            def wrap(fn):
                registry[fn.__name__] = fn
                return fn
            return wrap
    """,
    "dlinfer/ops/__init__.py": """
        from dlinfer.vendor import vendor_ops_registry

        def rms_norm(hidden_states, weight, epsilon):
            return vendor_ops_registry["rms_norm"](hidden_states, weight, epsilon)

        def weight_quant_matmul(x1, x2, scale, offset=None, bias=None, all_reduce=False, group_size=0):
            return vendor_ops_registry["weight_quant_matmul"](x1, x2, scale, offset, bias, all_reduce, group_size)
    """,
}

PROBE = """
import json, torch  # importing torch runs maca-infer's torch.backends entry points
import dlinfer, dlinfer.ops
from dlinfer.vendor import vendor_ops_registry
report = {"file": getattr(dlinfer, "__file__", None), "provided_by": getattr(dlinfer, "provided_by", "upstream"),
          "registry": {k: v.__module__ for k, v in vendor_ops_registry.items()},
          "rms_norm": str(dlinfer.ops.rms_norm(torch.ones(2, 32), torch.ones(32), 1e-6))[:40]}
if "weight_quant_matmul" in vendor_ops_registry:
    from maca_infer.common import ops
    torch.manual_seed(0)
    q = torch.randint(0, 16, (48, 64), dtype=torch.uint8)
    scales = torch.rand(48, 2) * 0.1
    x = torch.randn(3, 64)
    out = dlinfer.ops.weight_quant_matmul(x, ops.pack_int4(q), scales, None, None, False, 32)
    w = (q.double() - 8) * scales.double().repeat_interleave(32, 1)
    report["w4a16_err"] = float((out.double() - x.double() @ w.T).abs().max())
print(json.dumps(report))
"""


def _write_fake_upstream(root) -> None:
    for rel, body in FAKE_UPSTREAM.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))


def _probe(mode: str, pythonpath: str | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACA_INFER_")}
    env.update(MACA_INFER_DLINFER=mode, MACA_INFER_DEVICE="emulated", OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([PYTHON, "-c", PROBE], capture_output=True, text=True, env=env, timeout=180)


def test_upstream_dlinfer_is_kept_and_its_registry_holds_our_ops(tmp_path):
    _write_fake_upstream(tmp_path)
    proc = _probe("auto", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(tmp_path)), "the installed dlinfer must be the one imported"
    assert report["provided_by"] == "upstream"
    # upstream's own op is replaced by ours (one path to MetaX's kernels: our dispatch's vendor tier) ...
    assert report["registry"]["rms_norm"] == "maca_infer.adapters.lmdeploy.dlinfer_ops"
    assert report["rms_norm"].startswith("tensor(")
    # ... and the gaps are filled by maca-infer
    for name in ("weight_quant_matmul", "fused_moe_w4a16", "w4a16_linear", "fill_mla_cache", "mla_decode",
                 "mla_prefill"):
        assert report["registry"][name] == "maca_infer.adapters.lmdeploy.dlinfer_ops", name
    assert report["w4a16_err"] < 1e-3


def test_ours_mode_serves_maca_infer_even_with_upstream_installed(tmp_path):
    _write_fake_upstream(tmp_path)
    proc = _probe("ours", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["provided_by"] == "maca-infer"
    assert report["registry"]["rms_norm"] == "maca_infer.adapters.lmdeploy.dlinfer_ops"
    assert report["rms_norm"].startswith("tensor(")


def test_upstream_mode_without_upstream_dlinfer_fails_clearly():
    proc = _probe("upstream", None)
    assert proc.returncode != 0
    assert "MACA_INFER_DLINFER=upstream but no dlinfer package is installed" in proc.stderr


def test_bad_dlinfer_switch_value_is_named():
    proc = _probe("sometimes", None)
    assert proc.returncode != 0
    assert "MACA_INFER_DLINFER='sometimes'" in proc.stderr and "auto, ours, upstream" in proc.stderr


def test_no_dlinfer_resolves_to_maca_infer_modules(dlinfer_ours):
    import dlinfer
    import dlinfer.framework.lmdeploy_ext  # what lmdeploy.utils.try_import_deeplink imports
    from dlinfer.utils.type_annotation import MoECommType, MoeMetadata
    from dlinfer.vendor import vendor_name

    from maca_infer.adapters.lmdeploy import dlinfer_ops

    assert vendor_name == "maca"
    assert dlinfer_ours is dlinfer_ops, "one module object under both names"
    assert MoeMetadata().router_n_groups == -1 and MoECommType.UNDEFINED
    with pytest.raises(ModuleNotFoundError):
        import dlinfer.vendor.ascend  # noqa: F401 - not provided: LMDeploy must not think it exists


def test_version_outside_supported_range_fails_clearly(monkeypatch):
    import maca_infer.adapters.lmdeploy as adapter
    from maca_infer.common import versions

    monkeypatch.setitem(versions.SUPPORTED, "lmdeploy", (">=0.19,<0.20", "test"))
    monkeypatch.setattr(adapter, "_active", False)
    with pytest.raises(RuntimeError, match=r"lmdeploy 0\.18\.\d+ is outside the supported range >=0\.19,<0\.20"):
        adapter.activate()


def test_patch_ledger_records_and_refuses_double_patching(maca_backend_loaded):
    from maca_infer.adapters.lmdeploy import patching

    keys = {r.key: r for r in patching.ledger()}
    fix = keys["lmdeploy.pytorch.backends.dlinfer.maca.op_backend.MacaOpsBackend.update_step_context"]
    assert "max_q_seq_len" in fix.why and "0.18" in fix.upstream_versions and fix.remove_when

    class Target:
        def hello(self):
            return "upstream"

    patching.patch(Target, "hello", lambda self: "patched", why="test", upstream_versions="test 1",
                   remove_when="never")
    try:
        assert Target().hello() == "patched"
        with pytest.raises(RuntimeError, match="already patched"):
            patching.patch(Target, "hello", lambda self: "again", why="test", upstream_versions="test 1",
                           remove_when="never")
        with pytest.raises(ValueError, match="why"):
            patching.patch(Target, "other", None, why=" ", upstream_versions="x", remove_when="y")
    finally:
        patching.revert(Target, "hello")
    assert Target().hello() == "upstream"


@pytest.fixture
def maca_backend_loaded(dlinfer_ours):
    from lmdeploy.pytorch.backends.dlinfer.maca import MacaOpsBackend

    return MacaOpsBackend
