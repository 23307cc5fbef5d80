"""``maca-infer patches list|check|apply|revert --target <upstream checkout>``.

``list`` prints both kinds of patch maca-infer carries: the source diffs to
upstream scripts (``patches/ledger.toml``) and the runtime patches of the one
patch helper (``maca_infer.common.patching.LEDGER``). Runtime patches are
declared when the module that owns them is imported (the modules in
:data:`RUNTIME_PATCH_MODULES`, none of which imports a framework) and applied
later, inside the framework's processes; the listing shows whether each one
is applied in *this* process. ``--runtime`` lists only those, ``--json``
prints machine-readable rows (``kind`` is ``source`` or ``runtime``).
"""

from __future__ import annotations

import argparse
import importlib
import json

from maca_infer import patches as engine

# every module that declares runtime patches (tests/tools/test_runtime_patches.py keeps this complete)
RUNTIME_PATCH_MODULES = (
    "maca_infer.common.device._patch",
    "maca_infer.common.device.maca_fixes",
    "maca_infer.adapters.lmdeploy.patching",
    "maca_infer.adapters.sglang.patching",
    "maca_infer.adapters.hf._patches",
)


def runtime_ledger(owner: str | None = None) -> list[dict]:
    """Every runtime patch (declared or applied in this process), as rows with ``kind: runtime``."""
    for module in RUNTIME_PATCH_MODULES:
        importlib.import_module(module)
    from maca_infer.common.patching import LEDGER, OWNERS

    rows = sorted(LEDGER.entries(owner), key=lambda row: OWNERS.index(row["owner"]))  # stable: device first
    return [{"kind": "runtime", **row} for row in rows]


def _print_runtime(rows: list[dict]) -> None:
    for r in rows:
        state = "yes" if r["applied"] else "no"
        if r.get("applied_parts"):
            state += f" ({r['applied_parts']} parts)"
        print(f"{r['target']}\n  owner:        {r['owner']}\n  applied here: {state}\n"
              f"  why:          {r['why']}\n  how:          {r['how']}\n  written for:  {r['versions']}\n"
              f"  remove when:  {r['remove_when']}\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "check", "apply", "revert"])
    parser.add_argument("--target", help="root of the upstream checkout (e.g. a clone of InternLM/lmdeploy)")
    parser.add_argument("--framework", help="only the patches of this framework (e.g. lmdeploy)")
    parser.add_argument("--patch", action="append", dest="names", metavar="FILE",
                        help="only this patch (path as listed; repeatable)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--runtime", action="store_true",
                        help="list: only the runtime patches (device, lmdeploy, sglang, hf), not the source diffs")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        entries = [] if args.runtime else [
            {"kind": "source", **e} for e in engine.load_ledger() if not args.framework or e["framework"] == args.framework
        ]
        runtime = runtime_ledger(args.framework)
        if args.json:
            print(json.dumps(entries + runtime, indent=2))
            return 0
        if entries:
            print("# source diffs to upstream scripts (patches/ledger.toml; apply with `patches apply`)\n")
        for e in entries:
            print(f"{e['file']}\n  target:       {e['target']}\n  changes:      {e['changes']}\n"
                  f"  why:          {e['why']}\n  made against: {e['made_against']}\n"
                  f"  applies to:   {e['applies_to']}\n  remove when:  {e['remove_when']}\n")
        if runtime:
            print("# runtime patches (common/patching.py; applied inside the framework's processes)\n")
        _print_runtime(runtime)
        return 0
    if args.runtime:
        raise SystemExit("--runtime is for list; runtime patches are applied by the adapters, not by this command")
    if not args.target:
        raise SystemExit(f"maca-infer patches {args.action}: --target DIR (an upstream checkout) is required")
    if args.action == "check":
        if args.names:
            raise SystemExit("--patch is for apply/revert; check reports every patch")
        reports = engine.check(args.target, args.framework)
    else:
        reports = getattr(engine, args.action)(args.target, args.framework, args.names)
    if args.json:
        print(json.dumps([r.__dict__ for r in reports], indent=2))
    else:
        width = max(len(r.patch) for r in reports) if reports else 0
        for r in reports:
            print(f"{r.patch:<{width}}  {r.state:<9} {r.detail}")
    ok_states = {"check": {engine.APPLIES, engine.APPLIED, engine.MISSING},
                 "apply": {engine.APPLIED, engine.MISSING},
                 "revert": {engine.APPLIES, engine.MISSING}}[args.action]
    return 0 if all(r.state in ok_states for r in reports) else 1
