"""The whole test run of ``make test`` (and so CI): the main lane and every lane of tools/lane.py.

    python3 tools/test_all.py --main-python .venv/bin/python [-- pytest arguments for the main lane]

On a 2-core host the lanes cannot simply follow each other inside half an hour, and
most of their work does not compete: the main lane's pytest runs in the foreground
while, beside it, each lane builds its venv (downloads and unpacking) and the lanes'
stages that start no server (``Stage.beside``: ops, device and HF tests, one core)
run. The stages that start servers wait for the main lane, so no two servers race for
ports or memory. Each background job writes its own log, printed when it ends; the
exit status is the first failure's (the main lane's first).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lane as lanes  # noqa: E402  (tools/lane.py, standard library only)

ROOT = lanes.ROOT
LOG_DIR = ROOT / "build" / "lanes"


def _lane_cmd(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "lane.py"), name, *args]


def _stage_args(name: str, beside: bool) -> list[str]:
    lane = lanes.LANES[name]
    return [a for n, stage in enumerate(lane.stages, 1) if stage.beside == beside for a in ("--stage", str(n))]


def _beside(name: str) -> list[str]:
    """What lane ``name`` does beside the main lane: install, then its server-free stages."""
    return _lane_cmd(name, *(_stage_args(name, True) or ["--install-only"]))


def _after(name: str) -> list[str] | None:
    """The lane's server stages, after the main lane (None: it has none)."""
    args = _stage_args(name, False)
    return _lane_cmd(name, *args) if args else None


def main(argv: list[str]) -> int:
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main-python", default=sys.executable, help="the main lane's python (the project venv's)")
    args, main_args = parser.parse_args(argv[:cut]), argv[cut + 1:]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, tuple[int, float]] = {}

    def background(label: str, cmd: list[str]) -> None:
        t0 = time.monotonic()
        with open(LOG_DIR / f"{label}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        results[label] = (rc, time.monotonic() - t0)

    jobs = []
    for name in lanes.LANES:
        label = f"{name}-beside"
        print(f"[test-all] beside the main lane: {' '.join(_beside(name))} > {LOG_DIR / label}.log", flush=True)
        jobs.append((label, threading.Thread(target=background, args=(label, _beside(name)))))
        jobs[-1][1].start()

    t0 = time.monotonic()
    main_rc = subprocess.run([args.main_python, "-m", "pytest", *main_args], cwd=ROOT).returncode
    results["main"] = (main_rc, time.monotonic() - t0)

    for label, thread in jobs:
        thread.join()
        print(f"\n[test-all] ---- {label} log ----", flush=True)
        print((LOG_DIR / f"{label}.log").read_text(), flush=True)
    for name in lanes.LANES:
        cmd = _after(name)
        if cmd is None:
            continue
        t0 = time.monotonic()
        print(f"[test-all] after the main lane: {' '.join(cmd)}", flush=True)
        results[f"{name}-after"] = (subprocess.run(cmd, cwd=ROOT).returncode, time.monotonic() - t0)

    print("\n[test-all] summary", flush=True)
    for label, (rc, seconds) in results.items():
        print(f"[test-all]   {label}: {'ok' if rc == 0 else f'FAILED (rc={rc})'} in {seconds:.0f} s", flush=True)
    print(f"[test-all] total {time.monotonic() - started:.0f} s", flush=True)
    return next((rc for rc, _ in results.values() if rc != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
