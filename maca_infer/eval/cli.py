"""``maca-infer eval mmlu|ceval``: accuracy against an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maca_infer.eval import ceval, mmlu
from maca_infer.eval.common import Client, ResultStore, run_questions, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in ("mmlu", "ceval"):
        p = sub.add_parser(name, help=f"{name.upper()} accuracy")
        p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:23333")
        p.add_argument("--model", help="model name (default: the first of /v1/models)")
        if name == "mmlu":
            p.add_argument("--data-dir", required=True, help="MMLU folder with dev/*_dev.csv and test/*_test.csv")
        else:
            p.add_argument("--data", required=True, help="C-Eval folder (dev/, val/) or a JSONL file")
            p.add_argument("--split", default="val", help="C-Eval split with answers (default val)")
        p.add_argument("--ntrain", type=int, default=5, help="few-shot examples per prompt (default 5)")
        p.add_argument("--nsub", type=int, help="only the first N subjects (sorted)")
        p.add_argument("--concurrency", type=int, default=8)
        p.add_argument("--output", default=f"{name}_results.json", help="summary JSON (answers go to <output>.answers.jsonl)")
        p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.ntrain < 0:
        raise SystemExit(f"--ntrain {args.ntrain}: must be >= 0")
    if args.benchmark == "mmlu":
        dev, questions = mmlu.load(Path(args.data_dir), args.nsub)
        builder = mmlu.build_prompt
    else:
        dev, questions = ceval.load(Path(args.data), args.split, args.nsub)
        builder = ceval.build_prompt
    if not questions:
        raise SystemExit("no questions found in the data given")
    out = Path(args.output)
    store = ResultStore(out.with_name(out.name + ".answers.jsonl"))
    client = Client(args.url, args.model)
    run_questions(client, questions, lambda q: builder(q, dev, args.ntrain), store,
                  args.concurrency, progress=not args.no_progress)
    summary = summarize(questions, store)
    summary.update(benchmark=args.benchmark, model=client.model, ntrain=args.ntrain, url=args.url)
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    width = max(len(s) for s in summary["subjects"])
    for s, r in summary["subjects"].items():
        print(f"{s:<{width}}  {r['correct']:>4}/{r['n']:<4}  {r['accuracy']:.3f}")
    print(f"{'average (macro)':<{width}}  {summary['macro_accuracy']:.3f}   "
          f"micro {summary['micro_accuracy']:.3f} over {summary['n_questions']} questions; results: {out}")
    return 0
