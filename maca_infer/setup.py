"""``maca-infer setup``: install the frameworks beside the vendor stack.

``maca-infer setup lmdeploy sglang hf`` (any subset; ``--dry-run`` prints
the plan) installs into the current environment without replacing or
upgrading what the host already has among the vendor packages (PROTECTED:
MetaX's torch, triton, flash_attn, ...):

- a constraints file pins every installed protected package to its installed
  version (``torch==2.10.0+metax3.8.0.7``), and forbids the absent ones
  (``flashinfer<0``), so pip can neither replace a vendor build nor bring in
  a PyPI one;
- each framework goes in with ``--no-deps`` (their declared pins ask for
  other torch/triton builds and CUDA-only kernel packages), pinned to the
  version tested here (or the one asked for: ``sglang==0.5.22``; for hf,
  ``transformers==4.46.3`` / ``diffusers==0.31.0``), then the pure-Python
  packages it imports, resolved by pip under the constraints.

Before pip runs, it refuses with one line naming the reason: torch missing,
a host torch outside common/versions.py's range, a framework version outside
its range, or one that cannot work with the host's torch (COMPAT). Nothing
is ever uninstalled by this command itself, and no pip line carries
``--upgrade``. Afterwards it prints what changed and what it left alone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from maca_infer.common import versions

# What a MetaX host brings (MetaX's index: vLLM-metax requirements/maca_private.txt,
# see /work/shared/MACA_TARGET.md). setup never installs, replaces or upgrades these.
PROTECTED = ("torch", "torchvision", "triton", "flash_attn", "flash_mla", "flashinfer", "mcoplib", "apex")

# framework name on the command line -> the distributions installed with --no-deps, at the tested version
# (tests/tools/test_setup.py: equal to requirements/*.txt's pins and inside common/versions.py's ranges)
FRAMEWORKS: dict[str, dict[str, str]] = {
    "lmdeploy": {"lmdeploy": "0.18.0"},
    "sglang": {"sglang": "0.5.23"},
    "hf": {"transformers": "5.19.0", "diffusers": "0.42.1"},
}

# What each framework imports at run time on the maca path (not its declared pins:
# no torch/triton, no CUDA kernel packages). The one list; requirements/frameworks.txt
# installs the same for the test environment (tests/tools/test_setup.py keeps them in step).
_TRANSFORMERS = f"transformers{versions.SUPPORTED['transformers'][0]}"
DEPS: dict[str, tuple[str, ...]] = {
    # transformers: lmdeploy 0.18 declares >=4.56.0; prometheus-client: its engine builds a metrics
    # logger (pipeline and api_server alike)
    "lmdeploy": (
        "transformers>=4.56,<6", "accelerate", "cloudpickle", "einops", "fastapi", "fire", "mmengine-lite", "openai",
        "openai_harmony", "partial_json_parser", "pillow", "prometheus-client", "protobuf", "pybase64", "pydantic",
        "pyzmq", "safetensors", "sentencepiece", "shortuuid", "tiktoken", "uvicorn", "xgrammar==0.2.7",
    ),
    "sglang": (
        _TRANSFORMERS, "tokenizers", "aiohttp", "blobfile", "compressed_tensors", "datasets", "dill", "einops",
        "fastapi", "gguf", "interegular", "IPython", "jsonschema", "llguidance", "msgspec", "openai",
        "openai_harmony", "orjson", "packaging", "partial_json_parser", "pillow", "prometheus-client", "psutil",
        "pybase64", "pydantic", "python-multipart", "pyzmq", "regex", "requests", "scipy", "sentencepiece",
        "setproctitle", "soundfile", "tiktoken", "tqdm", "uvicorn", "uvloop", "watchfiles", "xgrammar==0.2.7",
    ),
    "hf": (
        "huggingface_hub", "tokenizers", "safetensors", "regex", "pyyaml", "tqdm", "typer", "packaging",
        "filelock", "requests", "importlib_metadata", "pillow", "accelerate", "gguf",
    ),
}

# Frameworks whose own declared requirements are pure Python: their pins also go into the
# dependency line, so pip installs what that version asks for (transformers 4.46.3: tokenizers<0.21).
OWN_DEPS_RESOLVED = ("hf",)

# (distribution, its versions, the host torch they need, why). First match per distribution decides.
COMPAT: tuple[tuple[str, str, str, str], ...] = (
    ("sglang", "==0.5.23", ">=2.14,<2.15", "sglang 0.5.23 is built against torch 2.14 (it declares torch==2.14.1)"),
    ("sglang", ">=0.5.22", ">=2.14", "sglang 0.5.22 on declare torch==2.14.1"),
    ("sglang", ">=0.5.18", ">=2.13", "sglang 0.5.18 to 0.5.21 declare torch==2.13.0"),
    ("sglang", ">=0.5.11", ">=2.11", "sglang 0.5.11 to 0.5.17 declare torch==2.11.0"),
    ("lmdeploy", ">=0.18.0,<0.19", ">=2.0", "lmdeploy 0.18 declares torch>=2.0.0"),
    ("transformers", ">=5", ">=2.5", "transformers 5 declares torch>=2.5"),
    ("diffusers", ">=0.42", ">=2.6", "diffusers 0.42 declares torch>=2.6"),
)


class SetupRefused(Exception):
    """Refused before pip ran; the message is the one line to print."""


def installed_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (the seam tests replace)."""
    return versions.installed_version(name)


def _release(version: str) -> Version:
    # 2.10.0+metax3.8.0.7 and 2.14.1+cu130 count as their release
    return Version(Version(version).base_version)


def is_metax_build(version: str) -> bool:
    """A vendor package's version string says MetaX built it (``+metax3.8.0.7``, ``maca``)."""
    return "metax" in version.lower() or "maca" in version.lower()


def _torch_version_maca() -> str | None:
    import torch

    return getattr(torch.version, "maca", None) or None


def protected_installed() -> dict[str, str | None]:
    return {name: installed_version(name) for name in PROTECTED}


def constraints_text(protected: dict[str, str | None]) -> str:
    lines = ["# maca-infer setup: the vendor stack of this host stays as it is"]
    for name, version in protected.items():
        if version is None:
            lines.append(f"{name}<0  # not installed here: no dependency may bring in a PyPI build")
        else:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def parse_target(text: str) -> tuple[str, dict[str, str]]:
    """``sglang``, ``sglang==0.5.22`` or ``transformers==4.46.3`` -> (framework, {distribution: version asked});
    SetupRefused on bad input."""
    name, _, version = text.partition("==")
    name = name.strip().lower()
    owner = {dist: fw for fw, dists in FRAMEWORKS.items() for dist in dists if dist != fw}
    if name in owner:
        if not version:
            raise SetupRefused(f"maca-infer setup: {text!r}: name a version ({name}==V) or the framework {owner[name]}")
        framework, dist = owner[name], name
    elif name in FRAMEWORKS:
        if version and len(FRAMEWORKS[name]) != 1:
            raise SetupRefused(f"maca-infer setup: {name} installs {', '.join(FRAMEWORKS[name])}; give no version "
                               f"(ask for {' / '.join(d + '==V' for d in FRAMEWORKS[name])} instead)")
        framework, dist = name, name
    else:
        raise SetupRefused(f"maca-infer setup: unknown framework {text!r}; choose from {', '.join(FRAMEWORKS)} "
                           f"(or {', '.join(d + '==V' for d in owner)})")
    if not version:
        return framework, {}
    try:
        Version(version)
    except InvalidVersion:
        raise SetupRefused(f"maca-infer setup: {text!r}: {version!r} is not a version") from None
    return framework, {dist: version}


def check_torch(torch_version: str | None) -> None:
    if torch_version is None:
        raise SetupRefused(
            "maca-infer setup: torch is not installed; install MetaX's mcPyTorch wheel (torch x.y.z+metax...) "
            "first: setup never installs torch"
        )
    spec = versions.SUPPORTED["torch"][0]
    if _release(torch_version) not in SpecifierSet(spec):
        raise SetupRefused(
            f"maca-infer setup: torch {torch_version} is outside the supported range {spec}; "
            "install a MetaX torch build in that range first"
        )


def check_compat(dist: str, version: str, torch_version: str) -> None:
    spec = versions.SUPPORTED[dist][0] if dist in versions.SUPPORTED else None
    if spec is not None and Version(version) not in SpecifierSet(spec):
        raise SetupRefused(
            f"maca-infer setup: {dist} {version} is outside the supported range {spec}; "
            f"ask for a version in it (e.g. maca-infer setup {dist})"
        )
    for name, framework_spec, torch_spec, why in COMPAT:
        if name == dist and Version(version) in SpecifierSet(framework_spec):
            if _release(torch_version) not in SpecifierSet(torch_spec):
                raise SetupRefused(
                    f"maca-infer setup: {dist} {version} cannot work with this host's torch {torch_version} "
                    f"(needs torch{torch_spec}: {why}); keep torch and choose another {dist} version, "
                    "or install a MetaX torch build that fits"
                )
            return


def check_pins_meet_deps(pins: list[str], deps: list[str]) -> None:
    """A pinned version that another framework's requirement excludes (lmdeploy with transformers==4.46.3)."""
    for pin in map(Requirement, pins):
        version = str(pin.specifier).removeprefix("==")
        for dep in map(Requirement, deps):
            if canonicalize_name(dep.name) == canonicalize_name(pin.name) and version not in dep.specifier:
                raise SetupRefused(
                    f"maca-infer setup: {pin.name} {version} does not meet {dep} (needed by another framework "
                    "asked for); ask for a version that meets it"
                )


@dataclass
class Plan:
    frameworks: list[str]
    pins: list[str]  # dist==version, installed with --no-deps
    deps: list[str]
    protected: dict[str, str | None]
    constraints: str
    warnings: list[str] = field(default_factory=list)

    def commands(self, constraints_path: str) -> list[list[str]]:
        pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
        out = [pip + ["--no-deps", "-c", constraints_path] + self.pins]
        if self.deps:
            out.append(pip + ["-c", constraints_path] + self.deps)
        return out


def vendor_warnings(protected: dict[str, str | None]) -> list[str]:
    """One line per vendor build that is not MetaX's, on a host with the MACA toolkit and mx-smi."""
    from maca_infer.common.device.detect import find_mx_smi, maca_path

    root = maca_path()
    if not (os.path.isdir(root) and find_mx_smi(root)):
        return []
    out = []
    for name in ("torch", "triton"):
        version = protected.get(name)
        if name == "torch" and version is not None and _torch_version_maca():
            continue  # mcPyTorch sets torch.version.maca whatever its version string says
        if version is None:
            out.append(f"{name} is not installed on this MetaX host; fix: install MetaX's {name} build from MetaX's index")
        elif not is_metax_build(version):
            out.append(
                f"{name} {version} is not MetaX's build: a PyPI build sees no MetaX device; fix: reinstall "
                f"MetaX's {name} wheel (+metax) from MetaX's index (setup keeps what is installed)"
            )
    return out


def make_plan(targets: list[str]) -> Plan:
    """The plan for ``targets`` (``["lmdeploy", "sglang==0.5.22"]``); SetupRefused with one line otherwise."""
    if not targets:
        raise SetupRefused(f"maca-infer setup: name at least one framework: {', '.join(FRAMEWORKS)}")
    protected = protected_installed()
    check_torch(protected["torch"])
    torch_version = protected["torch"]
    assert torch_version is not None
    chosen: dict[str, dict[str, str]] = {}
    for text in targets:
        name, asked = parse_target(text)
        chosen.setdefault(name, {}).update(asked)
    if any(name in ("lmdeploy", "sglang") for name in chosen) and protected["triton"] is None:
        raise SetupRefused(
            "maca-infer setup: triton is not installed; lmdeploy and sglang need it: install MetaX's triton "
            "build (triton x.y.z+metax...) first: setup never installs triton"
        )
    pins: list[str] = []
    deps: list[str] = []
    for name, asked in chosen.items():
        own = []
        for dist, tested in FRAMEWORKS[name].items():
            version = asked.get(dist, tested)
            check_compat(dist, version, torch_version)
            own.append(f"{dist}=={version}")
        pins += own
        for dep in (own if name in OWN_DEPS_RESOLVED else []) + list(DEPS[name]):
            if dep not in deps:
                deps.append(dep)
    check_pins_meet_deps(pins, deps)
    protected_names = {canonicalize_name(n) for n in PROTECTED}
    for item in pins + deps:
        if canonicalize_name(Requirement(item).name) in protected_names:
            raise AssertionError(f"maca-infer setup: plan would install protected {item}")  # a bug here, not input
    return Plan(list(chosen), pins, deps, protected, constraints_text(protected), vendor_warnings(protected))


def _snapshot() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def render_plan(plan: Plan, constraints_path: str) -> str:
    lines = ["protected (kept exactly as installed):"]
    for name, version in plan.protected.items():
        lines.append(f"  {name:12s} {version if version else 'not installed (may not be brought in)'}")
    lines.append(f"constraints file {constraints_path}:")
    lines += ["  " + line for line in plan.constraints.splitlines()]
    lines.append("pip commands:")
    lines += ["  " + shlex.join(cmd) for cmd in plan.commands(constraints_path)]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "frameworks", nargs="*", metavar="FRAMEWORK",
        help=f"any of {', '.join(FRAMEWORKS)} (lmdeploy==V / sglang==V / transformers==V / diffusers==V "
             "for another version in range)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the protected set, constraints and pip lines; install nothing")


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(list(args.frameworks))
    except SetupRefused as exc:
        print(str(exc), file=sys.stderr)
        return 2
    for line in plan.warnings:
        print(f"maca-infer setup: warning: {line}", file=sys.stderr)
    if args.dry_run:
        print(render_plan(plan, "<constraints.txt>"))
        print("dry run: nothing installed")
        return 0
    before = _snapshot()
    with tempfile.TemporaryDirectory(prefix="maca-infer-setup-") as tmp:
        path = os.path.join(tmp, "constraints.txt")
        with open(path, "w") as fh:
            fh.write(plan.constraints)
        print(render_plan(plan, path), flush=True)
        for cmd in plan.commands(path):
            done = subprocess.run(cmd)
            if done.returncode != 0:
                print(f"maca-infer setup: pip failed ({done.returncode}) running: {' '.join(cmd)}; "
                      "nothing protected was changed", file=sys.stderr)
                return 1
    after = _snapshot()
    changed = {n: (before.get(n), v) for n, v in after.items() if before.get(n) != v}
    print("installed:" if changed else "installed: nothing (all already present)")
    for name, (old, new) in sorted(changed.items()):
        print(f"  {name} {new}" + (f" (was {old})" if old else ""))
    kept = [f"{n} {v}" for n, v in plan.protected.items() if v]
    kept += [r for r in (Requirement(x).name for x in plan.pins + plan.deps)
             if canonicalize_name(r) not in changed and canonicalize_name(r) in after]
    print("left alone: " + ", ".join(dict.fromkeys(kept)))  # hf's pins are in both pip lines
    broken = [n for n in PROTECTED if before.get(canonicalize_name(n)) != after.get(canonicalize_name(n))]
    if broken:
        print(f"maca-infer setup: protected packages changed: {', '.join(broken)}; this is a bug", file=sys.stderr)
        return 1
    return 0
