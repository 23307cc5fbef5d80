"""One env-var reader: no module reads os.environ except common/envs.py (and device/env.py, which
applies vendor knobs to a given environment mapping)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = ("common", "adapters", "maca_infer", "bench", "patches")
ALLOWED = {"common/envs.py", "common/device/env.py"}


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
        and node.value.id == "os"


def env_reads(source: str) -> list[int]:
    """Lines that read the environment: os.getenv(...), os.environ.get(...), `in os.environ`, os.environ[k]."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if func.attr == "getenv" and isinstance(func.value, ast.Name) and func.value.id == "os":
                lines.append(node.lineno)
            elif func.attr == "get" and _is_environ(func.value):
                lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
            lines.append(node.lineno)
    return lines


def test_the_detector_sees_every_kind_of_read():
    source = ("import os\na = os.getenv('X')\nb = os.environ.get('X')\nc = 'X' in os.environ\n"
              "d = os.environ['X']\nos.environ['Y'] = '1'\ne = dict(os.environ)\n")
    assert env_reads(source) == [2, 3, 4, 5]


def test_only_envs_reads_the_environment():
    offenders = []
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            offenders += [f"{rel}:{line}" for line in env_reads(path.read_text())]
    assert offenders == [], "read these through maca_infer.common.envs: " + ", ".join(offenders)


def test_temporarily_sets_and_restores(monkeypatch):
    from maca_infer.common import envs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("DLINFER_LINEAR_USE_NN_LAYOUT", raising=False)
    with envs.temporarily(TRITON_INTERPRET="1", DLINFER_LINEAR_USE_NN_LAYOUT="1"):
        assert envs.triton_interpret() and envs.dlinfer_linear_nn_layout()
    assert not envs.triton_interpret() and envs.external("TRITON_INTERPRET") == "0"
    assert envs.external("DLINFER_LINEAR_USE_NN_LAYOUT") is None and not envs.dlinfer_linear_nn_layout()
