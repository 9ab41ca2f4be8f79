"""`--amqp-url` of `cimhes serve` and `cimhes demo` (also from CIMHES_AMQP_URL): the RabbitMQ
broker for CIM requests over queues and events to the DMS (cimhes.queue). Without it AMQP is
off: events are still stored and wait in the outbox, and the process says so at start."""
from __future__ import annotations

import os
from urllib.parse import urlsplit

ENV = "CIMHES_AMQP_URL"


def _amqp_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("--amqp-url is amqp://user:pass@host:port/vhost")
    return value


def add_amqp_options(parser) -> None:
    parser.add_argument("--amqp-url", type=_amqp_url, default=os.environ.get(ENV) or None,
                        metavar="amqp://user:pass@host:port/vhost",
                        help=f"RabbitMQ broker for CIM over AMQP and alarms to the DMS "
                             f"(default ${ENV}; none: AMQP is off)")


def amqp_settings(args) -> dict:
    return {"amqp_url": getattr(args, "amqp_url", None)}
