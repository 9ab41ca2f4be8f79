"""Command-line options for GetMeterReadings replies (`serve` and `demo`): the synchronous time
limit, the values in one reply message, and the size beyond which a request's reply is built
from the store part by part (each a `ReadingRequestLimits` field); and how every noun's owed
asynchronous replies are held and retried (`OwedReplySettings`). README, "Limits"."""
from __future__ import annotations

import argparse

from cimhes.endpoints.meter_readings import ReadingRequestLimits
from cimhes.endpoints.owed_replies import OwedReplySettings


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

    owed = OwedReplySettings()
    group = parser.add_argument_group("asynchronous replies owed (every noun)")
    group.add_argument("--reply-lease", type=float, default=owed.lease,
                       help="seconds a process holds an owed reply between renewals; another "
                            "process (or the next start) takes over one whose holder died once "
                            f"it runs out (default {owed.lease:g})")
    group.add_argument("--reply-first-retry", type=float, default=owed.first_retry,
                       help="seconds after a delivery round that failed before the next; "
                            f"doubled each round up to {owed.max_retry:g} s "
                            f"(default {owed.first_retry:g})")
    group.add_argument("--reply-give-up-after", type=float, default=owed.give_up_after,
                       help="seconds after the acknowledgment past which a failed round is the "
                            "last; the reply stays recorded (default "
                            f"{owed.give_up_after:g})")
    group.add_argument("--reply-max-interrupted", type=int, default=owed.max_interrupted,
                       help="interrupted runs after which a read request is answered FAILED "
                            f"5.3 instead of run again (default {owed.max_interrupted})")


def reply_settings(args: argparse.Namespace) -> dict:
    """HeadEndSettings keyword arguments; ValueError naming a value that is not positive."""
    if args.sync_time_limit <= 0:
        raise ValueError("--sync-time-limit must be more than 0")
    if args.max_values_per_message < 1:
        raise ValueError("--max-values-per-message must be at least 1")
    if args.stream_above_meters < 0:
        raise ValueError("--stream-above-meters must be 0 or more")
    owed = OwedReplySettings(lease=args.reply_lease, first_retry=args.reply_first_retry,
                             max_retry=max(OwedReplySettings.max_retry, args.reply_first_retry),
                             give_up_after=args.reply_give_up_after,
                             max_interrupted=args.reply_max_interrupted,
                             sweep_interval=min(OwedReplySettings.sweep_interval,
                                                args.reply_lease / 2)
                             if args.reply_lease > 0 else OwedReplySettings.sweep_interval)
    return {"owed_replies": owed, "reading_requests": ReadingRequestLimits(
        sync_time_limit=args.sync_time_limit,
        max_values_per_message=args.max_values_per_message,
        stream_above_meters=args.stream_above_meters)}
