"""Logging set-up of the `cimhes` command: level, and plain or JSON-lines format on stderr.

The JSON format writes one object per line with the time, level, logger, message and every field
a caller passed in ``extra`` (the request log's user, noun, result ...; a failed device's mRID
and error kind). Nothing here adds secrets: callers never pass passwords or keys.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message",
                                                                            "asctime"}


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc)
                 .isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (int, float, bool, type(None))) \
                    else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"log level is one of {', '.join(LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
