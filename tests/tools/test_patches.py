"""patches/: our unified-diff engine against GNU patch, on fixture trees.

The fixture trees reproduce the upstream lines each patch touches (the hunks'
old side, as in the upstream file), separated by filler lines that stand for
the rest of the script, so hunks sit at realistic, shifted positions.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maca_infer import patches as engine

FILLER = [f"# upstream line {i}\n" for i in range(40)]


def _upstream_file(fp: engine.FilePatch, shift: int = 7) -> str:
    """Text with each hunk's old lines, separated by filler (moved by ``shift``)."""
    parts = FILLER[:shift]
    for hunk in fp.hunks:
        parts += hunk.old_lines + FILLER
    return "".join(parts)


def _tree(tmp_path: Path, variant_of: dict[str, str]) -> Path:
    """An upstream checkout holding one variant per target (target -> patch name)."""
    root = tmp_path / "upstream"
    for patch in engine.load_patches():
        if variant_of.get(patch.ledger["target"]) != patch.name:
            continue
        for fp in patch.files:
            path = root / fp.target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_upstream_file(fp))
    return root


NEW_TREE = {  # lmdeploy v0.12+ : no profile_generation.py, newer restful script
    "benchmark/profile_restful_api.py": "lmdeploy/profile_restful_api-v0.16.patch",
}
OLD_TREE = {  # lmdeploy v0.7 - v0.10
    "benchmark/profile_generation.py": "lmdeploy/profile_generation.patch",
    "benchmark/profile_restful_api.py": "lmdeploy/profile_restful_api-v0.10.patch",
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ledger_entries_complete_and_files_exist():
    entries = engine.load_ledger()
    assert entries
    for e in entries:
        for key in ("file", "framework", "target", "changes", "why", "made_against", "applies_to", "remove_when"):
            assert e.get(key), f"{e['file']}: ledger field {key} empty"
        assert (engine.PATCH_ROOT / e["file"]).is_file()
        files = engine.parse_unified_diff((engine.PATCH_ROOT / e["file"]).read_text())
        assert [f.target for f in files] == [e["target"]]


@pytest.mark.parametrize("layout", [OLD_TREE, NEW_TREE], ids=["lmdeploy-0.10", "lmdeploy-0.16"])
def test_apply_matches_gnu_patch_and_reverts_exactly(tmp_path, layout):
    root = _tree(tmp_path, layout)
    before = _snapshot(root)
    assert {r.state for r in engine.check(root)} <= {engine.APPLIES, engine.MISSING}

    # independent reference: GNU patch on a copy
    ref = tmp_path / "ref"
    shutil.copytree(root, ref)
    for name in layout.values():
        subprocess.run(["patch", "-p1", "-s", "--no-backup-if-mismatch", "-i", str(engine.PATCH_ROOT / name)], cwd=ref, check=True)

    reports = engine.apply(root)
    assert {r.patch for r in reports if r.state == engine.APPLIED} == set(layout.values())
    assert _snapshot(root) == _snapshot(ref)

    # idempotent: a second apply changes nothing and says so
    again = engine.apply(root)
    assert all(r.detail in ("already applied",) or r.state == engine.MISSING for r in again)
    assert _snapshot(root) == _snapshot(ref)
    assert {r.state for r in engine.check(root)} <= {engine.APPLIED, engine.MISSING}

    engine.revert(root)
    assert _snapshot(root) == before


def test_newer_script_gets_the_variant_that_patches_every_payload(tmp_path):
    root = _tree(tmp_path, NEW_TREE)
    engine.apply(root)
    text = (root / "benchmark/profile_restful_api.py").read_text()
    assert "'temperature': 0.0," not in text
    assert text.count("'temperature': args.temperature,") == 3
    assert "'--temperature'" in text


def test_changed_upstream_is_a_conflict_and_nothing_is_written(tmp_path):
    root = _tree(tmp_path, OLD_TREE)
    gen = root / "benchmark/profile_generation.py"
    # upstream renamed the variable the hunk's context mentions
    gen.write_text(gen.read_text().replace("dtype=args.dtype,", "dtype=args.data_type,"))
    before = _snapshot(root)
    states = {r.patch: r.state for r in engine.check(root)}
    assert states["lmdeploy/profile_generation.patch"] == engine.CONFLICT
    reports = engine.apply(root)
    conflict = [r for r in reports if r.state == engine.CONFLICT]
    assert conflict and "made against lmdeploy v0.10.1" in conflict[0].detail
    assert all(r.detail.startswith("nothing written") for r in conflict)
    assert _snapshot(root) == before  # the restful script was not half-patched either


def test_half_applied_tree_is_completed(tmp_path):
    root = _tree(tmp_path, OLD_TREE)
    engine.apply(root, names=["lmdeploy/profile_restful_api-v0.10.patch"])
    states = {r.patch: r.state for r in engine.check(root)}
    assert states == {"lmdeploy/profile_generation.patch": engine.APPLIES,
                      "lmdeploy/profile_restful_api-v0.10.patch": engine.APPLIED}
    engine.apply(root)
    assert {r.state for r in engine.check(root)} == {engine.APPLIED}


def test_missing_script_is_skipped_unless_named(tmp_path):
    root = _tree(tmp_path, NEW_TREE)
    reports = {r.patch: r for r in engine.apply(root)}
    assert reports["lmdeploy/profile_generation.patch"].state == engine.MISSING
    named = engine.apply(root, names=["lmdeploy/profile_generation.patch"])
    assert named[0].state == engine.MISSING and named[0].detail.startswith("nothing written")


def test_bad_target_and_unknown_patch_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        engine.check(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown patch"):
        engine.apply(tmp_path, names=["lmdeploy/nope.patch"])
    with pytest.raises(ValueError, match="not a unified diff"):
        engine.parse_unified_diff("hello\n")


def test_cli_exit_codes(tmp_path):
    root = _tree(tmp_path, OLD_TREE)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "maca_infer", "patches", *args],
                              capture_output=True, text=True, timeout=120)

    listed = cli("list")
    assert listed.returncode == 0 and "remove when" in listed.stdout
    assert cli("check", "--target", str(root)).returncode == 0
    assert cli("apply", "--target", str(root)).returncode == 0
    gen = root / "benchmark/profile_generation.py"
    engine.revert(root)
    gen.write_text(gen.read_text().replace("ArgumentHelper.eager_mode(pt_group)", "ArgumentHelper.eager(pt_group)"))
    res = cli("apply", "--target", str(root))
    assert res.returncode == 1 and "conflict" in res.stdout
