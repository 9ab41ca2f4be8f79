"""Command-line options for the HTTP door's and the requests' limits (`serve` and `demo`).

Defaults are `DoorLimits` and `RequestLimits` (README.md, "Limits")."""
from __future__ import annotations

import argparse

from cimhes.endpoints.http_door import DoorLimits
from cimhes.engine.admission import RequestLimits


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    door, requests = DoorLimits(), RequestLimits()
    group = parser.add_argument_group("HTTP and request limits")
    group.add_argument("--max-connections", type=int, default=door.max_connections,
                       help=f"HTTP connections open at once (default {door.max_connections})")
    group.add_argument("--max-body-bytes", type=int, default=door.max_body_bytes,
                       help=f"bytes of one request body (default {door.max_body_bytes})")
    group.add_argument("--headers-timeout", type=float, default=door.headers_timeout,
                       help=f"seconds for request line and headers (default "
                            f"{door.headers_timeout:g})")
    group.add_argument("--max-devices-per-request", type=int,
                       default=requests.max_devices_per_request,
                       help=f"devices one synchronous request may name (default "
                            f"{requests.max_devices_per_request})")
    group.add_argument("--max-pending-per-caller", type=int,
                       default=requests.max_pending_per_caller,
                       help=f"requests one caller may have in progress (default "
                            f"{requests.max_pending_per_caller})")


def limit_settings(args: argparse.Namespace) -> dict:
    """HeadEndSettings keyword arguments; ValueError naming a limit that is not positive."""
    return {
        "door_limits": DoorLimits(max_connections=args.max_connections,
                                  max_body_bytes=args.max_body_bytes,
                                  headers_timeout=args.headers_timeout),
        "request_limits": RequestLimits(max_devices_per_request=args.max_devices_per_request,
                                        max_pending_per_caller=args.max_pending_per_caller),
    }
