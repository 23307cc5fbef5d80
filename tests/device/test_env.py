"""Environment setup: toolkit paths, MetaX knobs, visible devices; the user's values win."""

from __future__ import annotations

import logging
import os

import pytest

from maca_infer.common.device import env as device_env
from maca_infer.common.log import get_logger


@pytest.fixture
def log_lines():
    """Messages logged by maca_infer.common.device.env (the logger does not propagate)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = get_logger(device_env.__name__)
    handler = Collect(level=logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _tree(root, rels):
    for rel in rels:
        (root / rel).mkdir(parents=True, exist_ok=True)
    return str(root)


def test_paths_only_existing_dirs_appended_after_user_entries(tmp_path):
    root = _tree(tmp_path / "maca", ["bin", "lib", "ompi/lib"])  # no mxgpu_llvm, no cu-bridge
    environ = {"PATH": "/usr/local/bin:/usr/bin", "LD_LIBRARY_PATH": f"/opt/mine:{root}/lib"}
    changes = device_env.compose_paths(environ, root)
    assert changes["PATH"].split(os.pathsep) == ["/usr/local/bin", "/usr/bin", f"{root}/bin"]
    # lib was already listed by the user: kept in place, not duplicated
    assert changes["LD_LIBRARY_PATH"].split(os.pathsep) == ["/opt/mine", f"{root}/lib", f"{root}/ompi/lib"]
    for entry in changes["PATH"].split(os.pathsep) + changes["LD_LIBRARY_PATH"].split(os.pathsep):
        assert os.path.isdir(entry) or entry in ("/usr/local/bin", "/usr/bin", "/opt/mine")


def test_full_tree_paths(maca_tree_factory, tmp_path):
    root = tmp_path / "maca"
    maca_tree_factory(root)
    found = device_env.toolkit_paths(str(root))
    assert found["PATH"] == [str(root / "bin"), str(root / "mxgpu_llvm/bin"), str(root / "tools/cu-bridge/bin")]
    assert found["LD_LIBRARY_PATH"] == [str(root / "lib"), str(root / "mxgpu_llvm/lib"), str(root / "ompi/lib")]


def test_no_tree_no_changes(tmp_path):
    environ = {"PATH": "/usr/bin"}
    assert device_env.compose_paths(environ, str(tmp_path / "absent")) == {}
    assert device_env.apply_env("lmdeploy", vendor_knobs=False, environ=environ, root=str(tmp_path / "absent")) == {}
    assert environ == {"PATH": "/usr/bin"}


@pytest.mark.parametrize("framework", device_env.FRAMEWORKS)
@pytest.mark.parametrize("graph_mode", [False, True])
def test_recommended_env_per_framework(framework, graph_mode):
    knobs = device_env.recommended_env(framework, graph_mode)
    assert knobs["MACA_SMALL_PAGESIZE_ENABLE"] == "1"
    assert knobs["PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM"] == "1"
    assert ("CUDA_GRAPH_DP_USE_SUM_BS" in knobs) == (framework == "sglang")
    assert ("MACA_GRAPH_LAUNCH_MODE" in knobs) == graph_mode
    if graph_mode:
        assert knobs["MACA_GRAPH_LAUNCH_MODE"] == "1"
    if framework == "sglang":
        assert knobs["CUDA_GRAPH_DP_USE_SUM_BS"] == "False"


def test_unknown_framework_is_a_value_error():
    with pytest.raises(ValueError, match=r"framework='vllm' is not known; use one of: lmdeploy, sglang, hf"):
        device_env.recommended_env("vllm", False)
    with pytest.raises(ValueError, match="vllm"):
        device_env.apply_env("vllm", environ={})


def test_apply_env_never_overwrites_user_values_and_logs_what_it_set(tmp_path, maca_tree_factory, log_lines):
    root = tmp_path / "maca"
    maca_tree_factory(root)
    environ = {
        "MACA_PATH": str(root),
        "MACA_SMALL_PAGESIZE_ENABLE": "0",  # the user's choice
        "CUDA_GRAPH_DP_USE_SUM_BS": "True",
        "PATH": "/usr/bin",
    }
    before = dict(environ)
    applied = device_env.apply_env("sglang", graph_mode=True, environ=environ)
    for name in ("MACA_SMALL_PAGESIZE_ENABLE", "CUDA_GRAPH_DP_USE_SUM_BS", "MACA_PATH"):
        assert environ[name] == before[name]
        assert name not in applied
    assert environ["PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM"] == "1"
    assert environ["MACA_GRAPH_LAUNCH_MODE"] == "1"
    assert environ["PATH"].startswith("/usr/bin" + os.pathsep)
    assert environ["CUCC_PATH"] == str(root / "tools/cu-bridge")
    # everything set is in the return value and in one log line with its reason
    assert set(applied) == {k for k in environ if environ[k] != before.get(k)}
    for name, value in applied.items():
        assert any(line.startswith(f"env: {name}={value} (") for line in log_lines), name
    # a second call has nothing left to do
    assert device_env.apply_env("sglang", graph_mode=True, environ=environ) == {}


def test_vendor_knobs_off_sets_none(tmp_path):
    environ: dict[str, str] = {}
    applied = device_env.apply_env("lmdeploy", vendor_knobs=False, environ=environ, root=str(tmp_path / "absent"))
    assert applied == {} and environ == {}


def test_default_maca_path_is_set_only_when_the_tree_exists(tmp_path, maca_tree_factory):
    root = tmp_path / "maca"
    maca_tree_factory(root)
    environ: dict[str, str] = {}
    applied = device_env.apply_env(None, environ=environ, root=str(root))
    assert applied["MACA_PATH"] == str(root)


@pytest.mark.parametrize(
    "given, added",
    [
        ({"MACA_VISIBLE_DEVICES": "4,5,6,7"}, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}),
        ({"CUDA_VISIBLE_DEVICES": "1,0"}, {"MACA_VISIBLE_DEVICES": "1,0"}),
        ({"CUDA_VISIBLE_DEVICES": "0,1", "MACA_VISIBLE_DEVICES": "0, 1"}, {}),
        ({}, {}),
    ],
)
def test_visible_devices_mapped_both_ways(given, added):
    environ = dict(given)
    applied = device_env.apply_env(None, environ=environ, root="/nonexistent-maca")
    assert applied == added
    assert environ == {**given, **added}


@pytest.mark.parametrize(
    "given, added",
    [
        # MetaX's guide: export MACA_VISIBLE_DEVICE=7,5,1,3,4,0,6,2 (singular)
        ({"MACA_VISIBLE_DEVICE": "7,5,1,3,4,0,6,2"},
         {"MACA_VISIBLE_DEVICES": "7,5,1,3,4,0,6,2", "CUDA_VISIBLE_DEVICES": "7,5,1,3,4,0,6,2"}),
        ({"MACA_VISIBLE_DEVICE": "1,0", "CUDA_VISIBLE_DEVICES": "1, 0"}, {"MACA_VISIBLE_DEVICES": "1,0"}),
        # both spellings: the plural wins
        ({"MACA_VISIBLE_DEVICE": "3,2", "MACA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "0,1"}),
        ({"MACA_VISIBLE_DEVICE": "0,1", "MACA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "0,1"}),
    ],
)
def test_singular_maca_visible_device_as_the_guide_spells_it(given, added):
    environ = dict(given)
    applied = device_env.apply_env(None, environ=environ, root="/nonexistent-maca")
    assert applied == added
    assert environ == {**given, **added}


def test_both_spellings_differing_warn_once_and_the_plural_wins(caplog):
    import logging

    environ = {"MACA_VISIBLE_DEVICE": "5,4", "MACA_VISIBLE_DEVICES": "2,3"}
    with caplog.at_level(logging.WARNING, logger="maca_infer"):
        assert device_env.maca_visible_devices(environ) == ("MACA_VISIBLE_DEVICES", "2,3")
        plan = device_env.plan_env(None, environ=environ, root="/nonexistent-maca")
    assert [(c.name, c.value) for c in plan] == [("CUDA_VISIBLE_DEVICES", "2,3")]
    assert "mirrors MACA_VISIBLE_DEVICES" in plan[0].why
    warnings = [r.getMessage() for r in caplog.records if "MACA_VISIBLE_DEVICE=5,4" in r.getMessage()]
    assert len(warnings) == 1 and "MACA_VISIBLE_DEVICES wins" in warnings[0]
    # no warning when they agree
    caplog.clear()
    device_env.maca_visible_devices({"MACA_VISIBLE_DEVICE": "1", "MACA_VISIBLE_DEVICES": "1"})
    assert not caplog.records


def test_singular_conflicting_with_cuda_is_a_clear_error():
    environ = {"CUDA_VISIBLE_DEVICES": "0,1", "MACA_VISIBLE_DEVICE": "2,3"}
    with pytest.raises(ValueError, match=r"MACA_VISIBLE_DEVICE='2,3' and CUDA_VISIBLE_DEVICES='0,1' disagree"):
        device_env.apply_env(None, environ=environ, root="/nonexistent-maca")


def test_conflicting_visible_devices_is_a_clear_error():
    environ = {"CUDA_VISIBLE_DEVICES": "0,1", "MACA_VISIBLE_DEVICES": "2,3"}
    with pytest.raises(ValueError) as info:
        device_env.apply_env(None, environ=environ, root="/nonexistent-maca")
    message = str(info.value)
    assert "MACA_VISIBLE_DEVICES='2,3'" in message and "CUDA_VISIBLE_DEVICES='0,1'" in message
    assert environ == {"CUDA_VISIBLE_DEVICES": "0,1", "MACA_VISIBLE_DEVICES": "2,3"}


def test_plan_matches_apply(tmp_path, maca_tree_factory):
    root = tmp_path / "maca"
    maca_tree_factory(root)
    environ = {"MACA_PATH": str(root), "MACA_VISIBLE_DEVICES": "3", "PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM": "0"}
    plan = device_env.plan_env("lmdeploy", False, environ=dict(environ))
    applied = device_env.apply_env("lmdeploy", False, environ=environ)
    assert {c.name: c.value for c in plan if c.applied} == applied
    kept = [c for c in plan if not c.applied]
    assert [(c.name, c.value) for c in kept] == [("PYTORCH_ENABLE_PG_HIGH_PRIORITY_STREAM", "0")]
