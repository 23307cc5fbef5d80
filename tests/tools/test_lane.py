"""tools/lane.py (``make test-vendor``): every lane's setup is one ``maca-infer setup`` accepts on the
lane's own torch/triton, and every pytest selection names tests that exist. The lane itself runs in
``make test``."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from maca_infer import setup as msetup

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("lane", ROOT / "tools" / "lane.py")
lane_mod = importlib.util.module_from_spec(spec)
sys.modules["lane"] = lane_mod  # dataclasses look their module up
spec.loader.exec_module(lane_mod)
LANES = lane_mod.LANES


@pytest.mark.parametrize("name", sorted(LANES))
def test_each_stage_is_a_plan_setup_accepts_on_the_lane_host(monkeypatch, name):
    lane = LANES[name]
    host = {Requirement(r).name: str(Requirement(r).specifier).removeprefix("==") for r in lane.host}
    fake = {dist: host.get(dist) for dist in msetup.PROTECTED}
    monkeypatch.setattr(msetup, "installed_version", lambda dist: fake[dist] if dist in fake else None)
    for stage in lane.stages:
        plan = msetup.make_plan(list(stage.setup))  # SetupRefused names what does not fit
        for asked in stage.setup:
            if "==" in asked:
                assert asked in plan.pins


@pytest.mark.parametrize("name", sorted(LANES))
def test_each_pytest_selection_names_existing_tests(name):
    for stage in LANES[name].stages:
        for selection in stage.pytest:
            path, _, node = selection.partition("::")
            assert (ROOT / path).exists(), selection
            if node:
                function = node.split("[")[0]
                tree = ast.parse((ROOT / path).read_text())
                assert function in {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}, selection


def test_list_prints_the_steps_and_runs_nothing():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "lane.py"), "vendor", "--list"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lane = LANES["vendor"]
    setups = [line for line in out.splitlines() if line.startswith("stage ") and ": setup " in line]
    assert len(setups) == len(lane.stages)
    assert all(f"{lane.venv}/bin/maca-infer setup" in line for line in setups)


def test_test_all_runs_every_stage_once_server_stages_after_the_main_lane():
    spec = importlib.util.spec_from_file_location("test_all", ROOT / "tools" / "test_all.py")
    test_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_all)
    for name, lane in LANES.items():
        def stages(cmd):
            return [int(cmd[i + 1]) for i, a in enumerate(cmd or []) if a == "--stage"]
        beside, after = stages(test_all._beside(name)), stages(test_all._after(name))
        assert sorted(beside + after) == list(range(1, len(lane.stages) + 1)), name
        assert all(lane.stages[n - 1].beside for n in beside) and not any(lane.stages[n - 1].beside for n in after)
        if not beside:
            assert "--install-only" in test_all._beside(name)  # the venv still builds beside the main lane
