"""``maca-infer patches list|check|apply|revert --target <upstream checkout>``."""

from __future__ import annotations

import argparse
import json

from maca_infer import patches as engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "check", "apply", "revert"])
    parser.add_argument("--target", help="root of the upstream checkout (e.g. a clone of InternLM/lmdeploy)")
    parser.add_argument("--framework", help="only the patches of this framework (e.g. lmdeploy)")
    parser.add_argument("--patch", action="append", dest="names", metavar="FILE",
                        help="only this patch (path as listed; repeatable)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        entries = [e for e in engine.load_ledger() if not args.framework or e["framework"] == args.framework]
        if args.json:
            print(json.dumps(entries, indent=2))
            return 0
        for e in entries:
            print(f"{e['file']}\n  target:       {e['target']}\n  changes:      {e['changes']}\n"
                  f"  why:          {e['why']}\n  made against: {e['made_against']}\n"
                  f"  applies to:   {e['applies_to']}\n  remove when:  {e['remove_when']}\n")
        return 0
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
