"""Command-line options of the CIM facade (``cimhes demo`` and ``cimhes serve``): where the WSDLs
say the service is, which ReplyAddresses asynchronous requests may name, and which MDM
endpoints published readings go to. Each becomes a HeadEndSettings field."""
from __future__ import annotations


def add_facade_options(parser) -> None:
    parser.add_argument("--public-base-url", default=None,
                        help="base URL written into served WSDLs, e.g. https://hes.example.com "
                             "(default: the request's own, proxies' Forwarded headers honoured)")
    parser.add_argument("--reply-address", action="append", default=[], metavar="URL",
                        help="a ReplyAddress prefix asynchronous requests may name (repeatable; "
                             "none: AsyncReplyFlag is refused)")


    parser.add_argument("--event-subscriber", action="append", default=[], metavar="NAME=URL",
                        help="an MDM's ReceiveEndDeviceEvents endpoint every new end-device "
                             "event is published to (repeatable)")
    parser.add_argument("--subscriber", action="append", default=[], metavar="NAME=URL",
                        help="an MDM's ReceiveMeterReadings endpoint every new reading is "
                             "published to (repeatable)")


def facade_settings(args) -> dict:
    from cimhes.endpoints.publisher import parse_subscriber

    return {"public_base_url": args.public_base_url,
            "reply_addresses": tuple(args.reply_address),
            "subscribers": tuple(parse_subscriber(s) for s in args.subscriber),
            "event_subscribers": tuple(parse_subscriber(s) for s in args.event_subscriber)}
