"""Our patches to upstream benchmark scripts, and a small unified-diff engine.

``patches/<framework>/<script>.patch`` are unified diffs we wrote; each has an
entry in ``patches/ledger.toml`` (what, why, which upstream versions, when to
drop it). This module applies them to an upstream checkout:

- ``check``: per patch, ``applies`` | ``applied`` (already in) | ``conflict``
  (neither the old nor the new lines are where the hunk says, even allowing
  for moved lines) | ``missing`` (target file absent);
- ``apply``: idempotent and all-or-nothing: every file is computed in memory
  first; if any patch conflicts nothing is written;
- ``revert``: the exact inverse (a file returns byte for byte).

The engine is ours (no ``patch`` or ``git`` binary needed): hunks are located
by their context lines, exact match, searching outward from the recorded line
number so upstream edits elsewhere in the file do not matter.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a declared dependency there)
    import tomli as tomllib

PATCH_ROOT = Path(__file__).resolve().parent

APPLIES = "applies"
APPLIED = "applied"
CONFLICT = "conflict"
MISSING = "missing"


@dataclass
class Hunk:
    old_start: int  # 1-based line number in the original file
    old_lines: list[str]
    new_lines: list[str]


@dataclass
class FilePatch:
    old_path: str
    new_path: str
    hunks: list[Hunk] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.new_path


@dataclass
class Patch:
    name: str  # path relative to PATCH_ROOT
    files: list[FilePatch]
    ledger: dict


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip_prefix(path: str) -> str:
    path = path.split("\t", 1)[0].strip()
    return path[2:] if path[:2] in ("a/", "b/") else path


def parse_unified_diff(text: str) -> list[FilePatch]:
    """Parse a unified diff (as ``diff -u`` or ``git diff`` writes it)."""
    files: list[FilePatch] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            files.append(FilePatch(_strip_prefix(line[4:]), _strip_prefix(lines[i + 1][4:])))
            i += 2
            continue
        m = _HUNK.match(line)
        if m:
            if not files:
                raise ValueError(f"hunk before any file header at line {i + 1}")
            n_old = int(m.group(2)) if m.group(2) is not None else 1
            n_new = int(m.group(4)) if m.group(4) is not None else 1
            old, new = [], []
            i += 1
            while (len(old) < n_old or len(new) < n_new) and i < len(lines):
                body = lines[i]
                tag, content = body[:1], body[1:]
                if tag == "\\":  # "\ No newline at end of file"
                    i += 1
                    continue
                if tag == " " or body in ("\n", "\r\n"):
                    content = content if tag == " " else body
                    old.append(content)
                    new.append(content)
                elif tag == "-":
                    old.append(content)
                elif tag == "+":
                    new.append(content)
                else:
                    raise ValueError(f"bad hunk line {i + 1}: {body!r}")
                i += 1
            if len(old) != n_old or len(new) != n_new:
                raise ValueError(f"hunk at line {m.group(0)} is truncated")
            files[-1].hunks.append(Hunk(int(m.group(1)), old, new))
            continue
        i += 1
    if not files:
        raise ValueError("no file headers (---/+++) found: not a unified diff")
    return files


def _find(lines: list[str], block: list[str], hint: int) -> int | None:
    """Index where ``block`` occurs in ``lines``, nearest to ``hint``."""
    n = len(block)
    if n == 0:
        return min(max(hint, 0), len(lines))
    starts = [i for i in range(len(lines) - n + 1) if lines[i:i + n] == block]
    return min(starts, key=lambda i: abs(i - hint)) if starts else None


def _transform(lines: list[str], hunks: list[Hunk], reverse: bool) -> list[str] | None:
    """Apply hunks (or their inverse); None when some hunk does not match."""
    out = list(lines)
    offset = 0
    for hunk in hunks:
        src, dst = (hunk.new_lines, hunk.old_lines) if reverse else (hunk.old_lines, hunk.new_lines)
        pos = _find(out, src, hunk.old_start - 1 + offset)
        if pos is None:
            return None
        out[pos:pos + len(src)] = dst
        offset = pos - (hunk.old_start - 1) + len(dst) - len(src)
    return out


def file_state(text: str, fp: FilePatch) -> str:
    lines = text.splitlines(keepends=True)
    if _transform(lines, fp.hunks, reverse=False) is not None:
        return APPLIES
    if _transform(lines, fp.hunks, reverse=True) is not None:
        return APPLIED
    return CONFLICT


def load_ledger() -> list[dict]:
    with open(PATCH_ROOT / "ledger.toml", "rb") as f:
        return tomllib.load(f)["patch"]


def load_patches(framework: str | None = None) -> list[Patch]:
    patches = []
    for entry in load_ledger():
        if framework and entry["framework"] != framework:
            continue
        text = (PATCH_ROOT / entry["file"]).read_text()
        patches.append(Patch(entry["file"], parse_unified_diff(text), entry))
    return patches


@dataclass
class Report:
    patch: str
    state: str  # applies | applied | conflict | missing | mixed
    detail: str


def _variant_state(target: Path, patch: Patch) -> str:
    states = []
    for fp in patch.files:
        path = target / fp.target
        if not path.is_file():
            return MISSING
        states.append(file_state(path.read_text(), fp))
    if all(s == APPLIES for s in states):
        return APPLIES
    if all(s == APPLIED for s in states):
        return APPLIED
    return CONFLICT


def _groups(patches: list[Patch]) -> list[list[Patch]]:
    """Patches with the same target are alternatives (variants per upstream version)."""
    by_target: dict[str, list[Patch]] = {}
    for p in patches:
        by_target.setdefault(p.ledger["target"], []).append(p)
    return list(by_target.values())


def _group_state(target: Path, variants: list[Patch]) -> tuple[Patch | None, Report]:
    """The variant that matches the checkout (already applied first), and its report."""
    states = [(_variant_state(target, v), v) for v in variants]
    for wanted, detail in ((APPLIED, "already applied"), (APPLIES, "applies cleanly")):
        for state, v in states:
            if state == wanted:
                return v, Report(v.name, state, detail)
    names = " | ".join(v.name for v in variants)
    if all(state == MISSING for state, _ in states):
        return None, Report(names, MISSING, f"{variants[0].ledger['target']} not found under {target}")
    made = "; ".join(f"{v.name}: made against {v.ledger['made_against']}, applies to {v.ledger['applies_to']}"
                     for v in variants)
    return None, Report(names, CONFLICT, f"upstream differs from what the patch expects ({made})")


def check(target: str | Path, framework: str | None = None) -> list[Report]:
    target = Path(target)
    if not target.is_dir():
        raise ValueError(f"--target {str(target)!r} is not a directory (expected an upstream checkout)")
    return [_group_state(target, g)[1] for g in _groups(load_patches(framework))]


def _rewrite(target: Path, framework: str | None, reverse: bool, names: list[str] | None) -> list[Report]:
    """Shared by apply/revert: compute every file first, write only if all succeed."""
    if not target.is_dir():
        raise ValueError(f"--target {str(target)!r} is not a directory (expected an upstream checkout)")
    want, done = (APPLIED, APPLIES) if reverse else (APPLIES, APPLIED)
    every = load_patches(framework)
    if names:
        unknown = set(names) - {p.name for p in every}
        if unknown:
            raise ValueError(f"unknown patch(es) {sorted(unknown)}; known: {[p.name for p in every]}")
        every = [p for p in every if p.name in names]
    chosen: list[tuple[Patch | None, Report]] = [_group_state(target, g) for g in _groups(every)]
    active, skipped = [], []
    for variant, rep in chosen:
        # a script absent from this upstream version is skipped unless asked for by name
        if rep.state == MISSING and not names:
            rep.detail = "skipped: " + rep.detail
            skipped.append(rep)
        else:
            active.append((variant, rep))
    blocked = [r for _, r in active if r.state not in (want, done)]
    if blocked:
        for r in blocked:
            r.detail = "nothing written: " + r.detail
        return [r for _, r in active] + skipped
    new_text: dict[Path, str] = {}
    for variant, rep in active:
        if rep.state == done:
            rep.detail = "already reverted" if reverse else "already applied"
            continue
        for fp in variant.files:
            path = target / fp.target
            current = new_text.get(path, path.read_text())
            out = _transform(current.splitlines(keepends=True), fp.hunks, reverse)
            assert out is not None  # the state check above guarantees a match
            new_text[path] = "".join(out)
        rep.state = done
        rep.detail = "reverted" if reverse else "applied"
    for path, text in new_text.items():
        tmp = path.with_suffix(path.suffix + ".maca-infer-tmp")
        tmp.write_text(text)
        shutil.copymode(path, tmp)
        tmp.replace(path)
    return [r for _, r in active] + skipped


def apply(target: str | Path, framework: str | None = None, names: list[str] | None = None) -> list[Report]:
    return _rewrite(Path(target), framework, reverse=False, names=names)


def revert(target: str | Path, framework: str | None = None, names: list[str] | None = None) -> list[Report]:
    return _rewrite(Path(target), framework, reverse=True, names=names)
