"""The process's log: Python logging and Twisted's logger together on stderr, one line per event.

The drivers and twisted.web log through Twisted's logger, which nobody started, so what they said
(a meter that would not connect, "Too many open files") was lost. `start_logging` routes Twisted's
events into Python logging (twisted.logger.STDLibLogObserver) and formats every record on one
line: a message or traceback with line breaks keeps them as the two characters "\\n", so one event
is one line for grep, journald and log shippers alike.

With `json_lines` (`--log-format json`) each line is one JSON object instead: time, level,
logger, message, and every field the caller passed in ``extra`` as its own key (the request
log's user, noun, verb, result, duration_ms, correlation_id; a failed device's mrid and
error_kind). The message is the same text the plain format writes; nothing is added that the
plain line would not hold, so no secret either.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from twisted.logger import (
    FilteringLogObserver,
    PredicateResult,
    STDLibLogObserver,
    globalLogBeginner,
)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """A formatter whose every record, traceback included, is a single line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "").replace("\n", "\\n")


# A LogRecord's own attributes; anything else on a record came from ``extra``.
_RECORD_FIELDS = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {
    "message", "asctime", "log_failure", "log_format", "log_flattened", "log_text"}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ms), level, logger, message, the ``extra``
    fields, and a traceback as "exception"."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc)
                 .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith(("_", "log_")) \
                    and key not in entry:
                entry[key] = value if isinstance(value, (int, float, bool, type(None))) \
                    else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def start_logging(level: int | str = logging.INFO, stream=None,
                  json_lines: bool = False) -> logging.Handler:
    """Send Python logging and Twisted's log to `stream` (stderr), one line per event; `level`
    a logging level or its name (debug, info, ...)."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError("log level is one of debug, info, warning, error")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if json_lines else OneLineFormatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    # Twisted keeps events in memory until logging begins; it begins once per process. Its
    # warnings (a deprecation, a dirty reactor) go to the same place.
    observer = FilteringLogObserver(STDLibLogObserver(name="twisted"), [_not_factory_chatter])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=False)
    return handler


def _not_factory_chatter(event: dict) -> PredicateResult:
    # Twisted announces every client factory's start and stop: two lines per meter session.
    log_format = event.get("log_format") or ""
    if log_format.startswith(("Starting factory", "Stopping factory")):
        return PredicateResult.no
    return PredicateResult.maybe
