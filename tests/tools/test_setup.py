"""maca-infer setup: the plan, the constraints, the refusals; no pip runs here."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from maca_infer import setup as msetup
from maca_infer.cli import main
from maca_infer.common import versions

REQ = Path(__file__).resolve().parents[2] / "requirements"
METAX_HOST = {
    "torch": "2.14.1+metax3.8.0.7", "torchvision": "0.29.1+metax3.8.0.7", "triton": "3.6.0+metax3.8.0.7",
    "flash_attn": "2.6.3+metax3.8.0.7", "flash_mla": None, "flashinfer": "0.2.6+metax", "mcoplib": "0.1.0", "apex": None,
}


@pytest.fixture(autouse=True)
def _no_toolkit(monkeypatch, tmp_path):
    # a CPU host: no MACA toolkit, so no vendor-build warnings unless a test builds one
    monkeypatch.setenv("MACA_PATH", str(tmp_path / "no-maca"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


def fake_host(monkeypatch, **overrides):
    table = dict(METAX_HOST, **overrides)
    real = msetup.installed_version
    monkeypatch.setattr(msetup, "installed_version", lambda name: table[name] if name in table else real(name))
    return table


def _names(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            out.append(canonicalize_name(Requirement(line).name))
    return out


def test_dry_run_on_this_env_lists_protected_with_versions_and_the_plan(capsys):
    assert main(["setup", "lmdeploy", "sglang", "hf", "--dry-run"]) == 0
    out = capsys.readouterr().out
    torch_version = metadata.version("torch")
    assert re.search(rf"^  torch\s+{re.escape(torch_version)}$", out, re.M)
    assert f"torch=={torch_version}" in out
    for name in msetup.PROTECTED:
        assert re.search(rf"^  {name}\s+\S", out, re.M), name
    pip_lines = [line.strip() for line in out.splitlines() if " -m pip install " in line]
    assert len(pip_lines) == 2
    first = shlex.split(pip_lines[0])
    assert "--no-deps" in first
    assert {"lmdeploy==0.18.0", "sglang==0.5.23", "transformers==5.19.0", "diffusers==0.42.1"} <= set(first)
    second = shlex.split(pip_lines[1])
    assert "--no-deps" not in second and "fastapi" in second and "transformers>=4.56,<6" in second
    for cmd in (first, second):
        assert cmd[cmd.index("-c") + 1] == "<constraints.txt>"
    assert "dry run: nothing installed" in out


def test_constraints_pin_installed_vendor_packages_and_forbid_absent_ones():
    text = msetup.constraints_text(METAX_HOST)
    lines = [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]
    reqs = {r.name: r for r in map(Requirement, lines)}
    assert set(reqs) == set(msetup.PROTECTED)
    assert str(reqs["torch"].specifier) == "==2.14.1+metax3.8.0.7"
    assert Version("2.14.1+metax3.8.0.7") in reqs["torch"].specifier
    assert Version("2.14.1") not in reqs["torch"].specifier  # the PyPI build cannot replace it
    assert Version("2.14.2") not in reqs["torch"].specifier
    for absent in ("flash_mla", "apex"):
        assert not any(Version(v) in reqs[absent].specifier for v in ("0.0.1", "1.0.0", "2.6.3"))


def test_refuses_sglang_on_a_torch_it_cannot_work_with(monkeypatch, capsys):
    fake_host(monkeypatch, torch="2.10.0+metax3.8.0.7")
    assert main(["setup", "sglang", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "sglang 0.5.23 cannot work with this host's torch 2.10.0+metax3.8.0.7" in err
    assert "torch==2.14.1" in err  # the reason
    # the others fit that torch
    assert main(["setup", "lmdeploy", "hf", "--dry-run"]) == 0
    assert "lmdeploy==0.18.0" in capsys.readouterr().out


@pytest.mark.parametrize("torch_version, needle", [
    (None, "torch is not installed"),
    ("2.5.1+metax2.29", "torch 2.5.1+metax2.29 is outside the supported range"),
])
def test_refuses_a_missing_or_unsupported_torch(monkeypatch, capsys, torch_version, needle):
    fake_host(monkeypatch, torch=torch_version)
    assert main(["setup", "hf", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0


def test_refuses_lmdeploy_and_sglang_without_triton_but_not_hf(monkeypatch, capsys):
    fake_host(monkeypatch, triton=None)
    assert main(["setup", "lmdeploy", "--dry-run"]) == 2
    assert "triton is not installed" in capsys.readouterr().err
    assert main(["setup", "hf", "--dry-run"]) == 0
    assert "triton<0" in capsys.readouterr().out


@pytest.mark.parametrize("arg, needle", [
    ("vllm", "unknown framework 'vllm'"),
    ("sglang==0.6.1", "sglang 0.6.1 is outside the supported range"),
    ("lmdeploy==banana", "is not a version"),
    ("hf==5.0", "give no version"),
    ("transformers", "name a version (transformers==V) or the framework hf"),
    ("diffusers==0.30.0", "diffusers 0.30.0 is outside the supported range"),
])
def test_bad_input_is_one_line(monkeypatch, capsys, arg, needle):
    fake_host(monkeypatch)
    assert main(["setup", arg, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0


def _pip_lines(out: str) -> list[list[str]]:
    return [shlex.split(line.strip()) for line in out.splitlines() if " -m pip install " in line]


def test_hf_package_versions_can_be_asked_for(monkeypatch, capsys):
    # the vendor CI lane: hf at the seed's versions, then lmdeploy with the lowest transformers it accepts
    fake_host(monkeypatch, torch="2.10.0+metax3.8.0.7")
    assert main(["setup", "hf", "transformers==4.56.0", "diffusers==0.31.0", "--dry-run"]) == 0
    first, second = _pip_lines(capsys.readouterr().out)
    assert "--no-deps" in first and {"transformers==4.56.0", "diffusers==0.31.0"} <= set(first)
    assert "transformers==5.19.0" not in first and "diffusers==0.42.1" not in first
    # their declared (pure-Python) requirements are resolved too: transformers pins its tokenizers
    assert {"transformers==4.56.0", "diffusers==0.31.0"} <= set(second)
    # a package version alone means its framework, the other package at the tested version
    assert main(["setup", "lmdeploy", "transformers==4.56.0", "--dry-run"]) == 0
    first, second = _pip_lines(capsys.readouterr().out)
    assert {"lmdeploy==0.18.0", "transformers==4.56.0", "diffusers==0.42.1"} <= set(first)
    assert {"transformers==4.56.0", "transformers>=4.56,<6"} <= set(second)
    assert "lmdeploy==0.18.0" not in second  # its declared pins (torch<=2.12.1, CUDA packages) never go to pip


def test_refuses_a_transformers_that_lmdeploy_does_not_accept(monkeypatch, capsys):
    fake_host(monkeypatch, torch="2.10.0+metax3.8.0.7")
    monkeypatch.setitem(versions.SUPPORTED, "transformers", (">=4.46,<6", "as the HF adapter may support"))
    assert main(["setup", "hf", "transformers==4.46.3", "--dry-run"]) == 0
    capsys.readouterr()
    assert main(["setup", "lmdeploy", "transformers==4.46.3", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "transformers 4.46.3 does not meet transformers<6,>=4.56" in err


def test_no_plan_uninstalls_upgrades_or_installs_a_protected_package(monkeypatch):
    protected = {canonicalize_name(n) for n in msetup.PROTECTED}
    for host in (METAX_HOST, dict(METAX_HOST, torch="2.14.1+cu130", triton="3.8.0")):
        fake_host(monkeypatch, **host)
        for k in range(1, 4):
            for targets in itertools.combinations(msetup.FRAMEWORKS, k):
                plan = msetup.make_plan(list(targets))
                for cmd in plan.commands("/tmp/c.txt"):
                    assert cmd[1:4] == ["-m", "pip", "install"]
                    assert not {"uninstall", "--upgrade", "-U", "--force-reinstall", "--ignore-installed", "-I"} & set(cmd)
                    assert "-c" in cmd
                    packages = [a for a in cmd[4:] if not a.startswith("-") and a != "/tmp/c.txt"]
                    assert packages
                    assert not {canonicalize_name(Requirement(p).name) for p in packages} & protected


def test_tested_pins_match_requirements_and_supported_ranges():
    pinned = {}
    for path in (REQ / "frameworks.txt", REQ / "no-deps.txt"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                req = Requirement(line)
                pinned[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    for dists in msetup.FRAMEWORKS.values():
        for dist, version in dists.items():
            assert pinned[canonicalize_name(dist)] == version, dist
            assert Version(version) in SpecifierSet(versions.SUPPORTED[dist][0]), dist


def test_deps_stay_in_step_with_requirements():
    known = set(_names(REQ / "frameworks.txt")) | set(_names(REQ / "constraints.txt"))
    ours = {canonicalize_name(Requirement(d).name) for deps in msetup.DEPS.values() for d in deps}
    assert ours - known == set()  # only packages the tested environment has
    # every runtime need frameworks.txt lists for LMDeploy/SGLang is one setup installs
    text = (REQ / "frameworks.txt").read_text()
    section = text.split("# LMDeploy's real runtime needs", 1)[1].split("# `maca-infer precision", 1)[0]
    listed = {canonicalize_name(Requirement(line).name)
              for line in section.splitlines()[1:] if line.strip() and not line.startswith("#")}
    assert listed - ours == set()


def test_a_run_calls_pip_with_the_constraints_and_reports(monkeypatch, capsys):
    fake_host(monkeypatch)
    calls = []

    def fake_run(cmd, **kwargs):
        path = cmd[cmd.index("-c") + 1]
        calls.append((cmd, Path(path).read_text()))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(msetup.subprocess, "run", fake_run)
    assert main(["setup", "hf"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 2
    assert all("torch==2.14.1+metax3.8.0.7" in constraints for _, constraints in calls)
    assert "--no-deps" in calls[0][0] and "transformers==5.19.0" in calls[0][0]
    assert "installed: nothing" in out
    left = next(line for line in out.splitlines() if line.startswith("left alone: "))
    assert "torch 2.14.1+metax3.8.0.7" in left and "flash_attn 2.6.3+metax3.8.0.7" in left


def test_a_pip_failure_stops_and_says_so(monkeypatch, capsys):
    fake_host(monkeypatch)
    monkeypatch.setattr(msetup.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    assert main(["setup", "lmdeploy"]) == 1
    assert "pip failed (1)" in capsys.readouterr().err


def test_setup_warns_about_a_pypi_torch_on_a_metax_host(fake_maca_host, monkeypatch, capsys):
    import torch

    monkeypatch.delattr(torch.version, "maca", raising=False)
    fake_host(monkeypatch, torch="2.14.1+cu130", triton="3.6.0+metax3.8.0.7")
    assert main(["setup", "hf", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning: torch 2.14.1+cu130 is not MetaX's build" in err
    assert "triton" not in err


def test_setup_trusts_torch_version_maca_and_names_a_pypi_triton(fake_maca_host, monkeypatch, capsys):
    # mcPyTorch sets torch.version.maca (the fixture does), whatever its version string says
    fake_host(monkeypatch, torch="2.14.1", triton="3.8.0")
    assert main(["setup", "sglang", "--dry-run"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and err[0].startswith("maca-infer setup: warning: triton 3.8.0 is not MetaX's build")
