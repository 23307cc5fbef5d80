"""The ``maca-infer`` command.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``; this file only maps names to modules, imported lazily
so that ``maca-infer doctor`` never imports a framework.

The base install (pyproject's [project] dependencies only) runs every
command's parser and help, ``doctor`` and ``patches``: subcommand modules
import nothing else at module level. What a command needs beyond that
(requests for ``eval``, transformers/tokenizers/safetensors for
``make-model``, a framework for ``bench generation``) is imported when it
runs; if it is missing, the command exits with status 2 naming the package
and the extra that installs it (tests/tools/test_bare_install.py checks both
in a bare venv).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("maca_infer.doctor", "report the maca device, toolkit, env knobs and framework versions"),
    "setup": ("maca_infer.setup", "install lmdeploy / sglang / hf beside the host's torch, triton and vendor kernels"),
    "make-model": ("maca_infer.modelzoo.cli", "build a tiny random Hugging Face checkpoint offline"),
    "patches": ("maca_infer.patches_cli", "list/check/apply/revert our patches to upstream scripts"),
    "bench": ("maca_infer.bench_cli", "benchmarks: ops, generation (LMDeploy pipeline), serving (OpenAI API)"),
    "eval": ("maca_infer.eval.cli", "accuracy: MMLU and C-Eval against an OpenAI-compatible server"),
    "precision": ("maca_infer.precision", "layer-by-layer accuracy of a Transformers LLM on the maca device vs float64 CPU"),
}


# The [project.optional-dependencies] extra of pyproject.toml that installs
# what a command imports beyond the base dependencies ...
COMMAND_EXTRAS: dict[str, str] = {"make-model": "hf", "bench": "bench", "eval": "eval", "precision": "hf"}
# ... except a framework, which comes with its own extra (e.g. bench generation: lmdeploy).
FRAMEWORK_EXTRAS: dict[str, str] = {
    "lmdeploy": "lmdeploy", "sglang": "sglang", "transformers": "hf", "diffusers": "hf", "triton": "triton",
}
# import name -> distribution name, where they differ
DISTRIBUTIONS: dict[str, str] = {"PIL": "pillow"}


def require(*modules: str) -> None:
    """Raise ModuleNotFoundError for the first of ``modules`` not installed.

    For a command to check its optional imports before it writes anything;
    ``main`` turns the error into the install hint.
    """
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def missing_dependency_hint(command: str, exc: ModuleNotFoundError) -> str | None:
    """The install hint for ``exc`` raised by ``command``, or None when it is not a missing optional package.

    None also when the top-level package is installed (a broken install or a
    missing submodule is a real error, not an install hint).
    """
    top = (exc.name or "").split(".")[0]
    if not top or top == "maca_infer" or top in sys.stdlib_module_names:
        return None
    if importlib.util.find_spec(top) is not None:
        return None
    dist = DISTRIBUTIONS.get(top, top)
    extra = FRAMEWORK_EXTRAS.get(top) or COMMAND_EXTRAS.get(command)
    how = f"pip install 'maca-infer[{extra}]' (or: pip install {dist})" if extra else f"pip install {dist}"
    return f"maca-infer {command}: needs the optional package {dist!r}, which is not installed here; install: {how}"


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
    try:
        return int(args._run(args) or 0)
    except ModuleNotFoundError as exc:
        hint = missing_dependency_hint(args.command, exc)
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
