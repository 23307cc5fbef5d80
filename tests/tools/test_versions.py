"""Version ranges have one source (common/versions.py): pyproject and README state the same."""

from __future__ import annotations

import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from maca_infer.common import versions

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _pyproject_requirements() -> list[tuple[str, Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project["optional-dependencies"].items():
        found += [(f"[{extra}]", Requirement(r)) for r in reqs]
    return found


def _readme_table() -> dict[str, tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\S+) \| `([^`]+)` \| (\S+) \|$", section, flags=re.M)
    return {name: (spec, tested) for name, spec, tested in rows}


# (extra, package) -> why that extra asks a narrower range than common/versions.py's
NARROWER = {("[lmdeploy]", "transformers"): "lmdeploy 0.18 declares transformers>=4.56.0"}


def _inside(narrow: SpecifierSet, supported: SpecifierSet) -> bool:
    """Each lower bound of ``narrow`` lies in ``supported`` and both have the same upper bounds."""
    lower = [Version(s.version) for s in narrow if s.operator in (">=", ">", "==")]
    upper = {str(s) for s in narrow if s.operator in ("<", "<=")}
    return bool(lower) and all(v in supported for v in lower) and upper == {
        str(s) for s in supported if s.operator in ("<", "<=")}


def test_pyproject_states_the_supported_ranges():
    named = set()
    for where, req in _pyproject_requirements():
        if req.name in versions.SUPPORTED:
            named.add(req.name)
            if (where, req.name) in NARROWER:
                assert _inside(req.specifier, SpecifierSet(versions.SUPPORTED[req.name][0])), (where, str(req))
                continue
            assert req.specifier == SpecifierSet(versions.SUPPORTED[req.name][0]), (
                f"pyproject {where}: {req} but common/versions.py supports {req.name}{versions.SUPPORTED[req.name][0]}"
            )
    assert named == set(versions.SUPPORTED), f"not in pyproject: {set(versions.SUPPORTED) - named}"


def test_readme_table_states_the_supported_ranges_and_tested_versions_fall_in_them():
    table = _readme_table()
    assert set(table) == set(versions.SUPPORTED)
    for name, (spec, tested) in table.items():
        assert SpecifierSet(spec) == SpecifierSet(versions.SUPPORTED[name][0]), f"README {name}: {spec}"
        assert Version(tested) in SpecifierSet(spec), f"README {name}: tested {tested} outside {spec}"


def test_the_pinned_test_environment_is_the_tested_one():
    pins = {}
    for pinned in ("constraints.txt", "no-deps.txt"):  # what `make install` installs
        pins.update(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements" / pinned).read_text(), flags=re.M))
    for name, (_, tested) in _readme_table().items():
        assert pins.get(name) == tested, f"requirements/ pins {name}=={pins.get(name)}; README says {tested}"


def test_runtime_patches_state_the_supported_range():
    from maca_infer.adapters.lmdeploy import patching as lmdeploy_patching
    from maca_infer.adapters.sglang import patching as sglang_patching

    assert versions.SUPPORTED["lmdeploy"][0] in lmdeploy_patching.VERSIONS
    assert versions.SUPPORTED["sglang"][0] in sglang_patching.VERSIONS


# ---------------------------------------------------------------- the architecture page


def test_architecture_page_maps_every_package_dir_and_nothing_points_to_a_missing_design_doc():
    page = (ROOT / "docs" / "architecture.md").read_text()
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        assert f"| `{folder}/` | `{package}` |" in page, f"docs/architecture.md does not map {folder}/ -> {package}"
    stale = [p.relative_to(ROOT).as_posix() for folder in ("common", "adapters", "maca_infer", "bench", "patches")
             for p in (ROOT / folder).rglob("*.py") if "DESIGN.md" in p.read_text()]
    assert stale == [] and "DESIGN.md" not in (ROOT / "README.md").read_text()
