"""What an internal failure may say outside the process: a summary without SQL, parameters or
secrets.

SQLAlchemy's exceptions carry the statement and its bound parameters in their text (a failed
inventory load listed the meters' credentials; a store failure during a request sent SQL to the
caller). `summary` keeps the kind of failure and the database's own one-line reason;
`log_line` adds where it happened (file, line, function of each frame) without any value.
Every log line and reply about an unexpected failure goes through one of the two.
"""
from __future__ import annotations

import uuid

from sqlalchemy.exc import SQLAlchemyError, StatementError
from twisted.python.failure import Failure


def summary(exc: BaseException) -> str:
    """`exc` as "Kind: reason", with no SQL text, bound parameters or values."""
    if isinstance(exc, StatementError):
        if exc.orig is not None:  # the driver's own reason: "database is locked", ...
            return f"database error {type(exc.orig).__name__}: {_first_line(exc.orig)}"
        return f"database error {type(exc).__name__}"
    if isinstance(exc, SQLAlchemyError):
        return f"database error {type(exc).__name__}: {_first_line(exc).split('[SQL:')[0].strip()}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def reference() -> str:
    """A short random reference that ties a reply to its log line."""
    return uuid.uuid4().hex[:12]


def log_line(failure: Failure, ref: str | None = None) -> str:
    """A failure as one line for the log: summary, reference, and the frames it passed through
    (file:line function), innermost last; no locals, no source text, no exception text."""
    frames = " < ".join(f"{_short(file)}:{line} {function}"
                        for function, file, line, *_ in reversed(failure.frames[-8:]))
    ref_part = f" (ref {ref})" if ref else ""
    return f"{summary(failure.value)}{ref_part} at {frames or '?'}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _short(path: str) -> str:
    return "/".join(path.rsplit("/", 2)[-2:])
