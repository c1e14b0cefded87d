"""structlog to a file (JSON lines), shared by every process of a run.

Each process appends whole lines to the same file; the terminal is left to
the demo's progress bar and table.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import structlog

__all__ = ["setup_logging", "close_logging", "get_log"]

_file: Any = None


def setup_logging(path: str | None, level: str = "info", **bind: Any) -> Any:
    """Send every structlog event (aiote's own included) to ``path``; None: drop them."""
    global _file
    if path:
        _file = open(path, "a", buffering=1)  # line buffered: whole lines from each process
        factory: Any = structlog.WriteLoggerFactory(file=_file)
    else:
        factory = structlog.ReturnLoggerFactory()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=repr),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(pid=os.getpid(), **bind)
    return structlog.get_logger("kvcache")


def get_log() -> Any:
    return structlog.get_logger("kvcache")


def close_logging() -> None:
    """Undo setup_logging (structlog back to its defaults, the file closed)."""
    global _file
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    if _file is not None:
        _file.close()
        _file = None
