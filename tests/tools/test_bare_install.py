"""The base install (issue #17): `pip install maca-infer` with nothing but the
[project] dependencies of pyproject.toml must run the CLI.

Two guards:
- a fast scan in this venv: import every module of the base package and run
  the base commands in a fresh interpreter, then fail on any third-party
  module that is not a declared base dependency (or one of theirs). This
  venv holds every framework, so a module-level ``import requests`` would
  import fine here; only this check sees it.
- a bare venv (slow, about 2 minutes on 2 cores): the declared dependencies
  only (torch from a local wheel that satisfies the declared range, looked
  for in $BARE_INSTALL_TORCH_WHEELS, default /opt/wheels, so it stays fast;
  else from pip's index) plus a wheel of this working tree
  installed with --no-deps; ``maca-infer --help``, ``doctor`` (table and
  --json) and ``patches list|check|apply|revert`` must work there, and
  ``make-model`` / ``eval`` must name the extra to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# the declared dependencies that apply to this interpreter (environment markers evaluated)
DECLARED = [r for r in map(Requirement, PYPROJECT["project"]["dependencies"])
            if r.marker is None or r.marker.evaluate({"extra": ""})]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# folders of torch wheels to reuse for the bare venv (os.pathsep-separated)
TORCH_WHEEL_DIRS = [Path(p) for p in os.environ.get("BARE_INSTALL_TORCH_WHEELS", "/opt/wheels").split(os.pathsep) if p]

# Imports the declared dependencies (what they import themselves, optional
# packages included, is theirs), then every module of the base package (the
# adapters import their framework lazily and have their own tests), builds
# every parser and runs the base commands; prints the installed top-level
# modules imported after the declared dependencies.
SCAN = r"""
import contextlib, importlib, io, json, pkgutil, sys, sysconfig
declared, packages = json.loads(sys.argv[1])
for name in declared:
    importlib.import_module(name)
at_start = set(sys.modules)
for package in packages:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, package + "."):
        if not info.ispkg and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
from maca_infer import cli
runs = [["doctor"], ["doctor", "--json"], ["patches", "list"], ["patches", "list", "--json"], ["--help"]]
runs += [[name, "--help"] for name in cli.COMMANDS]
runs += [["bench", suite, "--help"] for suite in ("ops", "generation", "serving")]
runs += [["eval", name, "--help"] for name in ("mmlu", "ceval")]
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit:
            pass
site = tuple({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
new = {m.split(".")[0] for m in set(sys.modules) - at_start}
installed = [m for m in sorted(new) if (getattr(sys.modules.get(m), "__file__", None) or "").startswith(site)]
print(json.dumps({"installed": installed, "doctor_ran": "maca_infer.doctor" in sys.modules}))
"""


def _dependency_closure(requirements: list[Requirement]) -> set[str]:
    """Canonical names of the installed distributions these requirements pull in, transitively (no extras)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(req.name) or ()]
        except metadata.PackageNotFoundError:
            pass  # declared but not installed here: nothing of it can be imported either
    return seen


def _base_packages() -> list[str]:
    return [p for p in PYPROJECT["tool"]["setuptools"]["packages"] if not p.startswith("maca_infer.adapters")]


def test_base_commands_import_only_declared_dependencies(run_python):
    # import names of the declared distributions (the same for torch, numpy, packaging)
    declared = [r.name.replace("-", "_") for r in DECLARED]
    argv = json.dumps([declared, _base_packages()])
    result = run_python(SCAN.replace("sys.argv[1]", repr(argv)), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scan = json.loads(result.stdout.strip().splitlines()[-1])
    assert scan["doctor_ran"]
    imported = scan["installed"]
    allowed = _dependency_closure(DECLARED) | {"maca-infer"}
    owners = metadata.packages_distributions()
    undeclared = {
        module: sorted(owners.get(module, ["(no distribution)"]))
        for module in imported
        if not {canonicalize_name(d) for d in owners.get(module, ())} & allowed
    }
    assert not undeclared, (
        f"the base package imports {undeclared} (module: distributions), which are not [project] dependencies "
        f"of pyproject.toml ({', '.join(str(r) for r in DECLARED)}) nor theirs: import them inside the command "
        "that needs them (maca_infer.cli names the extra to install) or declare them"
    )


def test_missing_optional_package_names_an_extra_of_pyproject(monkeypatch):
    from maca_infer import cli

    for extra in {*cli.COMMAND_EXTRAS.values(), *cli.FRAMEWORK_EXTRAS.values()}:
        assert extra in EXTRAS, f"maca_infer.cli names extra {extra!r}, which pyproject.toml does not define"
    exc = ModuleNotFoundError("No module named 'no_such_pkg_x'", name="no_such_pkg_x.sub")
    hint = cli.missing_dependency_hint("eval", exc)
    assert hint is not None and "'no_such_pkg_x'" in hint and "pip install 'maca-infer[eval]'" in hint
    # a framework's own extra wins over the command's
    monkeypatch.setitem(cli.FRAMEWORK_EXTRAS, "no_such_framework_x", "lmdeploy")
    hint = cli.missing_dependency_hint("bench", ModuleNotFoundError(name="no_such_framework_x"))
    assert "pip install 'maca-infer[lmdeploy]'" in hint and "maca-infer[bench]" not in hint
    assert "maca-infer[bench]" in cli.missing_dependency_hint("bench", ModuleNotFoundError(name="PIL_x"))
    monkeypatch.setitem(cli.DISTRIBUTIONS, "PIL_x", "pillow_x")
    assert "pip install pillow_x" in cli.missing_dependency_hint("bench", ModuleNotFoundError(name="PIL_x"))
    # installed packages and our own modules are real errors, not install hints
    assert cli.missing_dependency_hint("eval", ModuleNotFoundError(name="json.nope")) is None
    assert cli.missing_dependency_hint("eval", ModuleNotFoundError(name="packaging.nope")) is None
    assert cli.missing_dependency_hint("eval", ModuleNotFoundError(name="maca_infer.nope")) is None
    assert cli.missing_dependency_hint("eval", ModuleNotFoundError()) is None


def test_main_turns_missing_optional_package_into_hint(monkeypatch, capsys):
    from maca_infer import cli
    from maca_infer.modelzoo import cli as modelzoo_cli

    monkeypatch.setattr(modelzoo_cli, "REQUIRES", ("no_such_tokenizer_pkg",))
    assert cli.main(["make-model", "llama", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "maca-infer make-model: needs the optional package 'no_such_tokenizer_pkg'" in err
    assert "pip install 'maca-infer[hf]'" in err
    assert not Path("/nonexistent/never-written").exists()


# ---------------------------------------------------------------- bare venv


def _torch_requirement() -> str:
    """A local torch wheel that satisfies the declared torch requirement, else the requirement itself."""
    (torch_req,) = [r for r in DECLARED if canonicalize_name(r.name) == "torch"]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in TORCH_WHEEL_DIRS:
        for wheel in sorted(folder.glob(f"torch-*-{tag}-{tag}-*.whl")) if folder.is_dir() else ():
            version = Version(wheel.name.split("-")[1])
            if torch_req.specifier.contains(version, prereleases=True):
                return str(wheel)
    return str(torch_req)


def _pip(python: Path, *args: str) -> None:
    # this venv's pip drives the bare one (--python), so the bare venv holds no pip of its own
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--python", str(python), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """(venv dir, env) of a venv holding the declared dependencies and a wheel of this working tree."""
    root = tmp_path_factory.mktemp("bare-install")
    # a copy of what the wheel is built from: building in the working tree
    # would leave build/ and *.egg-info beside other people's changes
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for folder in sorted({Path(d).parts[0] for d in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}):
        shutil.copytree(REPO_ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = root / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q", "--no-deps",
         "--no-build-isolation", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("maca_infer-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    deps = [_torch_requirement() if canonicalize_name(r.name) == "torch" else str(r) for r in DECLARED]
    _pip(python, "install", "-q", *deps)
    _pip(python, "install", "-q", "--no-deps", str(wheel))

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MACA_INFER_", "PYTHON", "VIRTUAL_ENV", "TRITON_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               MACA_INFER_MODEL_CACHE=str(root / "model-cache"), HOME=str(root))
    return venv, env


def _maca_infer(bare, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    venv, env = bare
    return subprocess.run([str(venv / "bin" / "maca-infer"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bare_venv_holds_only_the_declared_dependencies(bare, tmp_path):
    venv, env = bare
    code = ("import json, sys, maca_infer; from importlib import metadata\n"
            "print(json.dumps([maca_infer.__file__, sorted(d.metadata['Name'] for d in metadata.distributions())]))")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, dists = json.loads(proc.stdout)
    # the installed copy, not this repository nor the project venv's editable install
    assert Path(where).is_relative_to(venv), where
    names = {canonicalize_name(d) for d in dists}
    assert {canonicalize_name(r.name) for r in DECLARED} | {"maca-infer"} <= names
    for optional in ("requests", "transformers", "tokenizers", "safetensors", "triton", "lmdeploy", "pip"):
        assert optional not in names, f"{optional} is in the bare venv: the check would prove nothing"


@pytest.mark.slow
def test_help_and_doctor_on_bare_install(bare, tmp_path):
    top = _maca_infer(bare, "--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    for name in ("doctor", "make-model", "patches", "bench", "eval"):
        assert name in top.stdout
    # every subcommand's own parser is built, not a placeholder
    for argv, option in ((["make-model", "--help"], "--cached"), (["eval", "mmlu", "--help"], "--data-dir"),
                         (["bench", "serving", "--help"], "--request-rate"), (["patches", "--help"], "--target")):
        proc = _maca_infer(bare, *argv, cwd=tmp_path)
        assert proc.returncode == 0 and option in proc.stdout, (argv, proc.stdout, proc.stderr)

    table = _maca_infer(bare, "doctor", cwd=tmp_path)
    assert table.returncode == 0, table.stdout + table.stderr
    assert "== maca device ==" in table.stdout and "status: OK" in table.stdout
    as_json = _maca_infer(bare, "doctor", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["ok"] is True and report["device"]["kind"] == "emulated"
    versions = {v["name"]: v for v in report["versions"]}
    assert versions["torch"]["in_range"] and versions["transformers"]["installed"] is None
    assert not any(a["would_activate"] for a in report["adapters"])


@pytest.mark.slow
def test_optional_commands_name_their_extra_on_bare_install(bare, tmp_path):
    out = tmp_path / "model"
    make = _maca_infer(bare, "make-model", "llama", "--out", str(out), cwd=tmp_path)
    assert make.returncode == 2, make.stdout + make.stderr
    assert "maca-infer make-model: needs the optional package" in make.stderr
    assert "pip install 'maca-infer[hf]'" in make.stderr and "Traceback" not in make.stderr
    assert not out.exists()  # checked before anything is written

    data = tmp_path / "mmlu"
    for split, name in (("dev", "x_dev.csv"), ("test", "x_test.csv")):
        (data / split).mkdir(parents=True)
        (data / split / name).write_text("1+1?,1,2,3,4,B\n")
    ev = _maca_infer(bare, "eval", "mmlu", "--url", "http://127.0.0.1:9", "--model", "m",
                     "--data-dir", str(data), "--no-progress", "--output", str(tmp_path / "r.json"), cwd=tmp_path)
    assert ev.returncode == 2, ev.stdout + ev.stderr
    assert "needs the optional package 'requests'" in ev.stderr and "maca-infer[eval]" in ev.stderr
    assert "Traceback" not in ev.stderr


@pytest.mark.slow
def test_patches_on_bare_install(bare, tmp_path):
    from maca_infer import patches as engine

    listed = _maca_infer(bare, "patches", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)  # source diffs (from the installed ledger.toml), then runtime patches
    assert [e["file"] for e in rows if e.get("kind", "source") == "source"] == [e["file"] for e in engine.load_ledger()]
    table = _maca_infer(bare, "patches", "list", cwd=tmp_path)
    assert table.returncode == 0 and engine.load_ledger()[0]["file"] in table.stdout, table.stderr

    # an upstream tree holding the old side of one patch's hunks, apart by
    # filler lines; a patch with no alternative variants for its target
    patches = engine.load_patches()
    targets = [p.ledger["target"] for p in patches]
    patch = next(p for p in patches if targets.count(p.ledger["target"]) == 1)
    target = tmp_path / "upstream"
    for fp in patch.files:
        lines = [f"# upstream line {i}\n" for i in range(5)]
        for hunk in fp.hunks:
            lines += hunk.old_lines + [f"# filler {i}\n" for i in range(30)]
        (target / fp.target).parent.mkdir(parents=True, exist_ok=True)
        (target / fp.target).write_text("".join(lines))
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def run(action: str, *only: str) -> dict[str, str]:
        proc = _maca_infer(bare, "patches", action, "--target", str(target), *only, "--json", cwd=tmp_path)
        assert proc.returncode == 0, (action, proc.stdout, proc.stderr)
        return {r["patch"]: r["state"] for r in json.loads(proc.stdout)}

    assert run("check")[patch.name] == engine.APPLIES
    assert run("apply", "--patch", patch.name) == {patch.name: engine.APPLIED}
    assert {p: p.read_bytes() for p in before} != before
    assert run("check")[patch.name] == engine.APPLIED
    assert run("revert", "--patch", patch.name) == {patch.name: engine.APPLIES}
    assert {p: p.read_bytes() for p in before} == before
