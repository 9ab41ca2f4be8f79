"""Command-line options for GetMeterReadings replies (`serve` and `demo`): the synchronous time
limit, the values in one reply message, and the size beyond which a request's reply is built
from the store part by part. Each sets a `ReadingRequestLimits` field (README, "Limits")."""
from __future__ import annotations

import argparse

from cimhes.endpoints.meter_readings import ReadingRequestLimits


def add_reply_options(parser: argparse.ArgumentParser) -> None:
    defaults = ReadingRequestLimits()
    group = parser.add_argument_group("GetMeterReadings replies")
    group.add_argument("--sync-time-limit", type=float, default=defaults.sync_time_limit,
                       help="seconds a synchronous answer may take before it is FAILED 4.1 "
                            f"(the reads go on; default {defaults.sync_time_limit:g})")
    group.add_argument("--max-values-per-message", type=int,
                       default=defaults.max_values_per_message,
                       help="values in one reply message; more are split into parts "
                            f"(default {defaults.max_values_per_message})")
    group.add_argument("--stream-above-meters", type=int, default=defaults.stream_above_meters,
                       help="meters of a request answered from memory; beyond, each reply part "
                            f"is built from the store (default {defaults.stream_above_meters})")


def reply_settings(args: argparse.Namespace) -> dict:
    """HeadEndSettings keyword arguments; ValueError naming a value that is not positive."""
    if args.sync_time_limit <= 0:
        raise ValueError("--sync-time-limit must be more than 0")
    if args.max_values_per_message < 1:
        raise ValueError("--max-values-per-message must be at least 1")
    if args.stream_above_meters < 0:
        raise ValueError("--stream-above-meters must be 0 or more")
    return {"reading_requests": ReadingRequestLimits(
        sync_time_limit=args.sync_time_limit,
        max_values_per_message=args.max_values_per_message,
        stream_above_meters=args.stream_above_meters)}
