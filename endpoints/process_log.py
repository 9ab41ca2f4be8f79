"""The process's log: Python logging and Twisted's logger together on stderr, one line per event.

The drivers and twisted.web log through Twisted's logger, which nobody started, so what they said
(a meter that would not connect, "Too many open files") was lost. `start_logging` routes Twisted's
events into Python logging (twisted.logger.STDLibLogObserver) and formats every record on one
line: a message or traceback with line breaks keeps them as the two characters "\\n", so one event
is one line for grep, journald and log shippers alike.
"""
from __future__ import annotations

import logging
import sys

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


def start_logging(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Send Python logging and Twisted's log to `stream` (stderr), one line per event."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
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
