"""``maca-infer bench ops|generation|serving``."""

from __future__ import annotations

import argparse
import importlib

# subcommand -> (module with add_arguments/run, help)
SUITES = {
    "ops": ("maca_infer.bench.ops", "op suite: bytes/FLOPs floors vs measured, Markdown table + PNG plot"),
    "generation": ("maca_infer.bench.generation", "static-inference profile through the LMDeploy pipeline"),
    "serving": ("maca_infer.bench.serving", "OpenAI-API load generator against a running server"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (module, help_text) in SUITES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_suite_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if not exc.name or not module.startswith(exc.name):
                raise
            p.set_defaults(_suite_missing=f"maca-infer bench {name}: {module} is not available in this build")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_suite_missing", None):
        raise SystemExit(args._suite_missing)
    return importlib.import_module(args._suite_module).run(args)
