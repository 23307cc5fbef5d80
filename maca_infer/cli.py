"""The ``maca-infer`` command.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``; this file only maps names to modules, imported lazily
so that ``maca-infer doctor`` never imports a framework.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("maca_infer.doctor", "report the maca device, toolkit, env knobs and framework versions"),
    "make-model": ("maca_infer.modelzoo.cli", "build a tiny random Hugging Face checkpoint offline"),
    "patches": ("maca_infer.patches_cli", "list/check/apply/revert our patches to upstream scripts"),
    "bench": ("maca_infer.bench_cli", "benchmarks: ops, generation (LMDeploy pipeline), serving (OpenAI API)"),
    "eval": ("maca_infer.eval.cli", "accuracy: MMLU and C-Eval against an OpenAI-compatible server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maca-infer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not exc.name or not module.startswith(exc.name):
                raise
            p.set_defaults(_missing=f"maca-infer {name}: not available in this build ({module} missing)")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
