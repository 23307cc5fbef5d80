"""The one logger factory of maca-infer.

``get_logger(__name__)`` gives a child of the ``maca_infer`` logger, which
prints ``[maca-infer] LEVEL message`` to stderr at the level named by
``MACA_INFER_LOG_LEVEL`` (default INFO). ``log_once`` keeps fallback notices
to one line per process.
"""

from __future__ import annotations

import logging
import sys

from maca_infer.common import envs

_ROOT = "maca_infer"
_configured = False
_seen: set[str] = set()


def _configure() -> None:
    global _configured
    if _configured:
        return
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[maca-infer] %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(envs.log_level())
    root.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    _configure()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def log_once(logger: logging.Logger, level: int, msg: str, *args) -> None:
    """Log ``msg`` at most once per process (keyed by the formatted text)."""
    text = msg % args if args else msg
    if text in _seen:
        return
    _seen.add(text)
    logger.log(level, text)
