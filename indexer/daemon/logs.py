"""The daemon's log: one line a person can read, or one JSON object a machine can, per record."""

from __future__ import annotations

import json
import logging
import sys
import time

from indexer.errors import printable


class TextFormatter(logging.Formatter):
    """``2026-11-27 17:30:01.123 INFO indexed 3 layouts``: one line a person can read."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        """The standard line with control characters taken from layouts escaped.

        The message is one line whatever it holds: a newline in a path stays ``\\x0a``. Only a
        traceback (our own text) spans lines, each escaped and indented below the message.
        """
        record.message = printable(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for text in extra:
            line += "".join("\n    " + printable(part) for part in text.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` and any ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        document: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=True, default=str)


def setup_logging(log_format: str) -> logging.Handler:
    """Send our records to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a record: *values* become keys of its JSON line."""
    return {"fields": values}
