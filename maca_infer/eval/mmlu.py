"""MMLU (Hendrycks et al.) in its original CSV layout.

``data_dir/dev/<subject>_dev.csv`` (few-shot examples) and
``data_dir/test/<subject>_test.csv``; no header; columns: question, A, B, C,
D, answer letter. The prompt is the paper's: a header naming the subject,
``ntrain`` solved dev examples, then the question ending in ``Answer:``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from maca_infer.eval.common import CHOICES, Question, format_item


def _read(path: Path, subject: str) -> list[Question]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row:
                continue
            if len(row) != 6:
                raise ValueError(f"{path}:{i + 1}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip().upper()
            if answer not in CHOICES:
                raise ValueError(f"{path}:{i + 1}: answer {row[5]!r} is not one of A, B, C, D")
            out.append(Question(subject, i, row[0], tuple(row[1:5]), answer))
    return out


def subjects(data_dir: Path) -> list[str]:
    test = Path(data_dir) / "test"
    if not test.is_dir():
        raise ValueError(f"--data-dir {str(data_dir)!r} has no test/ folder (expected MMLU's dev/ and test/ CSVs)")
    return sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))


def load(data_dir: Path, nsub: int | None = None) -> tuple[dict[str, list[Question]], list[Question]]:
    """(dev examples per subject, test questions) for the first ``nsub`` subjects."""
    data_dir = Path(data_dir)
    names = subjects(data_dir)
    if nsub is not None:
        names = names[:nsub]
    dev, test = {}, []
    for s in names:
        dev_path = data_dir / "dev" / f"{s}_dev.csv"
        dev[s] = _read(dev_path, s) if dev_path.exists() else []
        test += _read(data_dir / "test" / f"{s}_test.csv", s)
    return dev, test


def _pretty(subject: str) -> str:
    return subject.replace("_", " ")


def build_prompt(q: Question, dev: dict[str, list[Question]], ntrain: int) -> str:
    head = f"The following are multiple choice questions (with answers) about {_pretty(q.subject)}.\n\n"
    shots = "".join(format_item(d, "Answer:", True) for d in dev.get(q.subject, [])[:ntrain])
    return head + shots + format_item(q, "Answer:", False)
