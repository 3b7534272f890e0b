"""Structured logs: one JSON object per line (``--log-format json``).

Every record carries ``ts`` (Unix seconds), ``level``, ``logger`` and ``msg``; records logged with
``extra={"job": ..., "rank": ..., "generation": ..., "event": ...}`` (as ``recovery.coordinator``
does) carry those fields too, so a log pipeline can filter by job, rank and generation.
"""

from __future__ import annotations

import json
import logging

__all__ = ["JsonFormatter", "CONTEXT_FIELDS"]

#: the structured fields copied from a record's ``extra`` when present
CONTEXT_FIELDS = ("job", "rank", "generation", "event", "step")


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON (exceptions in an ``exc`` field)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        for k in CONTEXT_FIELDS:
            v = getattr(record, k, None)
            if v is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)
