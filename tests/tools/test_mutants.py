"""tools/mutants.py stays runnable: every snippet still matches, and mutants reach a scratch copy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("maca_mutants", REPO_ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mutants = _load()


def test_every_snippet_occurs_once_and_the_set_is_broad():
    assert mutants.check_snippets(mutants.MUTANTS) == []
    assert len(mutants.MUTANTS) >= 30
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    files = {m.path for m in mutants.MUTANTS}
    assert any(f.startswith("common/ops/") for f in files)
    assert {"adapters/sglang", "adapters/lmdeploy", "adapters/hf"} <= {str(Path(f).parent) for f in files}
    for m in mutants.MUTANTS:
        assert m.replacement != m.original and m.tests
        for t in m.tests:
            assert (REPO_ROOT / t.split("::")[0]).exists(), t


def test_package_dirs_match_pyproject():
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {k.split(".", 1)[1]: v for k, v in setuptools["package-dir"].items() if k != "maca_infer"}
    assert mapped == mutants.PACKAGE_DIRS


def test_a_mutant_is_imported_from_the_scratch_copy(tmp_path):
    repo = mutants.make_scratch(tmp_path)
    env = mutants.scratch_env(repo)
    mutant = next(m for m in mutants.MUTANTS if m.name == "rmsnorm-drops-gemma")
    assert (mutants.check_resolves(repo, env, mutant)
            == f"{repo / 'maca_infer/common/ops/_triton_helpers.py'} does not hold the mutation")
    original = mutants.apply(repo, mutant)
    assert mutants.check_resolves(repo, env, mutant) is None
    # the checkout itself is untouched
    assert (REPO_ROOT / mutant.path).read_text() == original
