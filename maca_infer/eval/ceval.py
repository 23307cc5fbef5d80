"""C-Eval (Huang et al.) from its CSV release or a JSONL file.

CSV layout: ``<dir>/dev/<subject>_dev.csv`` and ``<dir>/val/<subject>_val.csv``
(answers are public for val; test answers are not), header
``id,question,A,B,C,D,answer[,explanation]``. JSONL: one object per line with
``subject`` (or ``category``), ``question``, ``A``-``D``, ``answer`` and
optional ``id``/``split`` ("dev" rows become few-shot examples). The prompt
follows the official zero/few-shot answer-only format in Chinese.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from maca_infer.eval.common import CHOICES, Question, format_item


def _question(subject: str, index: int, row: dict, where: str) -> Question:
    missing = [k for k in ("question", "A", "B", "C", "D", "answer") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    answer = str(row["answer"]).strip().upper()
    if answer not in CHOICES:
        raise ValueError(f"{where}: answer {row['answer']!r} is not one of A, B, C, D")
    idx = int(row["id"]) if str(row.get("id", "")).strip().isdigit() else index
    return Question(subject, idx, row["question"], (row["A"], row["B"], row["C"], row["D"]), answer)


def _read_csv(path: Path, subject: str) -> list[Question]:
    with open(path, newline="", encoding="utf-8") as f:
        return [_question(subject, i, row, f"{path}:{i + 2}") for i, row in enumerate(csv.DictReader(f))]


def load(data: Path, split: str = "val", nsub: int | None = None) -> tuple[dict[str, list[Question]], list[Question]]:
    data = Path(data)
    dev: dict[str, list[Question]] = {}
    test: list[Question] = []
    if data.is_file():
        for n, line in enumerate(data.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            subject = row.get("subject") or row.get("category")
            if not subject:
                raise ValueError(f"{data}:{n + 1}: no 'subject' field")
            q = _question(subject, n, row, f"{data}:{n + 1}")
            (dev.setdefault(subject, []).append(q) if row.get("split") == "dev" else test.append(q))
    elif (data / split).is_dir():
        for path in sorted((data / split).glob(f"*_{split}.csv")):
            subject = path.name[: -len(f"_{split}.csv")]
            test += _read_csv(path, subject)
            dev_path = data / "dev" / f"{subject}_dev.csv"
            dev[subject] = _read_csv(dev_path, subject) if dev_path.exists() else []
    else:
        raise ValueError(f"--data {str(data)!r} is neither a JSONL file nor a C-Eval folder with {split}/*_{split}.csv")
    if nsub is not None:
        keep = sorted({q.subject for q in test})[:nsub]
        test = [q for q in test if q.subject in keep]
    return dev, test


def build_prompt(q: Question, dev: dict[str, list[Question]], ntrain: int) -> str:
    head = f"以下是中国关于{q.subject.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n"
    shots = "".join(format_item(d, "答案：", True) for d in dev.get(q.subject, [])[:ntrain])
    return head + shots + format_item(q, "答案：", False)
