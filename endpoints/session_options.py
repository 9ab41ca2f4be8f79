"""The meter-session options of `cimhes serve` and `cimhes demo`, and the start-up check that
the process has file descriptors for them.

Each option sets one field of `HeadEndSettings` (limits in `cimhes.drivers.limits`); the
defaults shown in `--help` are the product's documented defaults.
"""
from __future__ import annotations

import argparse

from cimhes.drivers.limits import (
    DEFAULT_CONNECTIONS_PER_SECOND,
    DescriptorLimit,
    SessionLimits,
    raise_descriptor_limit,
)

_DEFAULTS = SessionLimits()


def add_session_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("meter sessions")
    group.add_argument("--sessions", type=int, default=200,
                       help="meter sessions open at once, over all requests (default 200)")
    group.add_argument("--connections-per-second", type=float,
                       default=DEFAULT_CONNECTIONS_PER_SECOND,
                       help="new meter connections per second, evenly spaced; 0 unpaced "
                            f"(default {DEFAULT_CONNECTIONS_PER_SECOND:g})")
    group.add_argument("--connect-timeout", type=float, default=_DEFAULTS.connect_timeout,
                       help=f"TCP connect timeout, s (default {_DEFAULTS.connect_timeout:g})")
    group.add_argument("--response-timeout", type=float, default=_DEFAULTS.response_timeout,
                       help="silence allowed after each request or block, s "
                            f"(default {_DEFAULTS.response_timeout:g})")
    group.add_argument("--session-deadline", type=float, default=_DEFAULTS.session_deadline,
                       help="whole session, connect to release, s "
                            f"(default {_DEFAULTS.session_deadline:g})")
    group.add_argument("--max-answer-bytes", type=int, default=_DEFAULTS.max_answer_bytes,
                       help=f"bytes of one answer (default {_DEFAULTS.max_answer_bytes})")
    group.add_argument("--max-answer-blocks", type=int, default=_DEFAULTS.max_answer_blocks,
                       help=f"blocks of one answer (default {_DEFAULTS.max_answer_blocks})")


def session_settings(args: argparse.Namespace) -> dict:
    """HeadEndSettings keyword arguments from the parsed options; ValueError if one is bad."""
    if args.sessions < 1:
        raise ValueError(f"--sessions must be at least 1, got {args.sessions}")
    if args.connections_per_second < 0:
        raise ValueError("--connections-per-second must be 0 or more")
    limits = SessionLimits(
        connect_timeout=args.connect_timeout, response_timeout=args.response_timeout,
        session_deadline=args.session_deadline, max_answer_bytes=args.max_answer_bytes,
        max_answer_blocks=args.max_answer_blocks)
    return {"read_concurrency": args.sessions, "session_limits": limits,
            "connections_per_second": args.connections_per_second}


def ensure_descriptors(sessions: int, spare: int) -> DescriptorLimit:
    """Raise the descriptor limit for `sessions` meter sockets plus `spare`; OSError saying
    why when they cannot fit (the CLI turns it into one line and exit code 2)."""
    limit = raise_descriptor_limit(sessions, spare)
    if not limit.sufficient:
        raise OSError(limit.explain())
    return limit
