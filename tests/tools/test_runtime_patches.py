"""The one runtime-patch helper (common/patching.py), its ledger and `maca-infer patches list --runtime`."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from maca_infer.common.patching import LEDGER, Ledger

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _record(ledger: Ledger, target: str = "pkg.Target.hello"):
    return ledger.declare(target, owner="hf", why="test why", how="test how", versions="pkg 1.0",
                          remove_when="never")


class Target:
    def hello(self):
        return "upstream"


class Child(Target):
    pass


def test_set_attr_keeps_the_original_refuses_twice_and_undoes():
    ledger = Ledger()
    record = _record(ledger)
    ledger.set_attr(record, Target, "hello", lambda self: "patched")
    try:
        assert Target().hello() == "patched"
        assert ledger.original(Target, "hello")(Target()) == "upstream"
        assert ledger.is_applied(record.target) and ledger.applied() == [record]
        with pytest.raises(RuntimeError, match="already patched"):
            ledger.set_attr(record, Target, "hello", lambda self: "again")
        # the same attribute under another record is refused too
        with pytest.raises(RuntimeError, match="already patched"):
            ledger.set_attr(_record(ledger, "other.name"), Target, "hello", lambda self: "again")
    finally:
        ledger.undo(record.target)
    assert Target().hello() == "upstream" and not ledger.is_applied(record.target)
    with pytest.raises(KeyError):
        ledger.undo(record.target)


def test_an_inherited_attribute_is_undone_by_deleting_the_override():
    ledger = Ledger()
    record = _record(ledger, "tests.Child.hello")
    ledger.set_attr(record, Child, "hello", lambda self: "patched")
    assert Child().hello() == "patched" and ledger.original(Child, "hello") is Target.hello
    ledger.undo_all()
    assert "hello" not in Child.__dict__ and Child().hello() == "upstream"


def test_apply_runs_the_change_and_keeps_its_undo():
    ledger = Ledger()
    state = {"on": False}
    record = _record(ledger, "switch")

    def do():
        state["on"] = True
        return lambda: state.update(on=False)

    ledger.apply(record, do)
    assert state["on"]
    with pytest.raises(RuntimeError, match="already patched"):
        ledger.apply(record, do)
    assert ledger.undo_all("hf") == 1 and state["on"] is False
    with pytest.raises(TypeError, match="undoes"):
        ledger.apply(record, lambda: None)


@pytest.mark.parametrize("field", ["why", "how", "versions", "remove_when"])
def test_every_record_field_is_required(field):
    fields = dict(owner="hf", why="w", how="h", versions="v", remove_when="r")
    fields[field] = "  "
    with pytest.raises(ValueError, match=field):
        Ledger().declare("x.y", **fields)


def test_a_target_is_declared_once():
    ledger = Ledger()
    first = _record(ledger)
    assert _record(ledger) is not None and ledger.declared() == [first]  # same record again: fine
    with pytest.raises(ValueError, match="already declared"):
        ledger.declare(first.target, owner="sglang", why="another fix", how="h", versions="v", remove_when="r")
    with pytest.raises(ValueError, match="owner"):
        ledger.declare("a.b", owner="nobody", why="w", how="h", versions="v", remove_when="r")


def test_entries_show_declared_sets_with_their_applied_parts():
    ledger = Ledger()
    whole = _record(ledger, "pkg.* (a set)")
    ledger.set_attr(ledger.part(whole, "tests.Target.hello", why="part why"), Target, "hello", lambda self: 1)
    try:
        (row,) = ledger.entries()
        assert row["target"] == "pkg.* (a set)" and row["applied"] and row["applied_parts"] == 1
        assert ledger.applied()[0].why == "part why" and ledger.applied()[0].part_of == whole.target
    finally:
        assert ledger.undo_all(part_of=whole.target) == 1
    assert ledger.entries()[0]["applied"] is False


def test_emulation_patches_are_parts_of_the_device_record():
    pytest.importorskip("torch")
    import torch

    from maca_infer.common.device import _patch, emulation

    was_installed = emulation.is_installed()
    if not was_installed:
        emulation.install(memory_budget=1 << 30)
    try:
        parts = _patch.PATCHES.records()
        assert len(parts) > 40 and all(p.part_of == _patch.EMULATION.target for p in parts)
        assert "torch.cuda.is_available" in {p.target for p in parts}
        row = next(e for e in LEDGER.entries("device") if e["target"] == _patch.EMULATION.target)
        assert row["applied"] and row["applied_parts"] == len(parts)
        assert LEDGER.original(torch.cuda, "is_available") is _patch.PATCHES.original(torch.cuda, "is_available")
    finally:
        if not was_installed:
            emulation.uninstall()
    if not was_installed:
        assert _patch.PATCHES.records() == [] and not _patch.PATCHES.is_patched(torch.cuda, "is_available")


# ---------------------------------------------------------------- one helper for the whole project


def _calls_in(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            names.add(node.func.attr)
    return names


def test_every_module_that_declares_runtime_patches_is_listed():
    """`patches list --runtime` imports RUNTIME_PATCH_MODULES: a module that declares patches
    and is not in that list would hide its patches from the listing."""
    from maca_infer import patches_cli

    listed = set(patches_cli.RUNTIME_PATCH_MODULES)
    mapping = {"common": "maca_infer.common", "adapters": "maca_infer.adapters"}
    declaring = set()
    for folder, package in mapping.items():
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "patching.py" and path.parent.name == "common":
                continue
            if "declare" in _calls_in(path):
                module = ".".join(path.relative_to(ROOT / folder).with_suffix("").parts)
                declaring.add(f"{package}.{module}")
    assert declaring and declaring <= listed, f"not listed: {sorted(declaring - listed)}"


def test_no_private_patch_helpers_left():
    """Runtime patches go through common/patching.py: nothing else keeps originals in its own table."""
    offenders = []
    for folder in ("common", "adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if path.relative_to(ROOT).as_posix() == "common/patching.py":
                continue
            if "_MISSING = object()" in text or "class PatchSet" in text or "HookRegistry._hooks" in text:
                offenders.append(path.relative_to(ROOT).as_posix())
    assert offenders == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MACA_INFER_DEVICE"}  # no emulation in that process
    return subprocess.run([sys.executable, "-m", "maca_infer", "patches", "list", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_patches_list_runtime_json_lists_every_framework_without_loading_them():
    out = _cli("--runtime", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    owners = [r["owner"] for r in rows]
    assert owners[0] == "device" and {"device", "lmdeploy", "sglang", "hf"} <= set(owners)
    for r in rows:
        assert r["kind"] == "runtime" and r["why"] and r["how"] and r["versions"] and r["remove_when"]
        assert r["applied"] is False  # nothing is applied in a plain `patches list` process
    targets = {r["target"] for r in rows}
    assert "lmdeploy.pytorch.backends.dlinfer.maca.op_backend.MacaOpsBackend.update_step_context" in targets
    assert "sglang.srt.models.deepseek_v2.get_rope_wrapper" in targets
    assert "torch.backends.cuda.enable_cudnn_sdp" in targets


def test_patches_list_shows_source_diffs_and_runtime_patches_together():
    out = _cli()
    assert out.returncode == 0, out.stderr
    assert "profile_generation.patch" in out.stdout  # a source diff (patches/ledger.toml)
    assert "MacaOpsBackend.update_step_context" in out.stdout and "remove when" in out.stdout
    only_runtime = _cli("--runtime")
    assert "profile_generation.patch" not in only_runtime.stdout
    assert "get_rope_wrapper" in only_runtime.stdout
