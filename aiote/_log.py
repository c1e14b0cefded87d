"""Logging through structlog; the library never prints.

If the application configured structlog, aiote's events go through that
configuration.  Otherwise they go to the standard ``logging`` logger
"aiote" (silent below WARNING unless the application sets it up), rendered as
key=value pairs with the bound engine/NIC/peer ids.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["get_logger"]

_fallback_processors = [
    structlog.stdlib.filter_by_level,
    structlog.processors.TimeStamper(fmt="iso"),
    structlog.processors.KeyValueRenderer(key_order=["timestamp", "event"]),
]


def get_logger(**bound: Any) -> Any:
    if structlog.is_configured():
        return structlog.get_logger("aiote").bind(**bound)
    return structlog.wrap_logger(
        logging.getLogger("aiote"),
        processors=_fallback_processors,
        wrapper_class=structlog.stdlib.BoundLogger,
    ).bind(**bound)
