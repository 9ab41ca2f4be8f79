"""`cimhes serve` options of the scale-out roles (endpoints/scale.py; docs/architecture.md,
"Scale-out"): --role, --job-prefetch, --remote-wait, --route-lease."""
from __future__ import annotations

import argparse

from cimhes.endpoints.scale import ROLES, ScaleSettings


def add_scale_options(parser: argparse.ArgumentParser) -> None:
    defaults = ScaleSettings()
    group = parser.add_argument_group("scale-out (several processes over RabbitMQ and PostgreSQL)")
    group.add_argument("--role", choices=ROLES, default=defaults.role,
                       help="all: doors and engine in one process (default); api: doors and "
                            "schedules, jobs handed out over RabbitMQ; engine: runs jobs from "
                            "RabbitMQ (both need --amqp-url and a shared PostgreSQL --db)")
    group.add_argument("--job-prefetch", type=int, default=defaults.job_prefetch,
                       help=f"engine: job messages held unacknowledged at once (default "
                            f"{defaults.job_prefetch})")
    group.add_argument("--remote-wait", type=float, default=defaults.remote_wait,
                       help=f"api: seconds a waiting request waits for an engine to finish a "
                            f"job before cancelling it (default {defaults.remote_wait:g})")
    group.add_argument("--route-lease", type=float, default=defaults.route_lease_seconds,
                       help=f"engine: seconds a route session slot is held without renewal "
                            f"(longer than a session; default {defaults.route_lease_seconds:g})")


def scale_settings(args: argparse.Namespace) -> dict:
    """HeadEndSettings keyword arguments; ValueError naming a bad option."""
    return {"scale": ScaleSettings(role=getattr(args, "role", "all"),
                                   job_prefetch=getattr(args, "job_prefetch",
                                                        ScaleSettings.job_prefetch),
                                   remote_wait=getattr(args, "remote_wait",
                                                       ScaleSettings.remote_wait),
                                   route_lease_seconds=getattr(args, "route_lease",
                                                               ScaleSettings.route_lease_seconds))}
