"""Benchmark: encoding a MeterReadingsResponseMessage for 1,000 full meter reads.

The reply to a GetMeterReadings naming 1,000 meters carries 196,000 values (4 registers and two
96-interval blocks each). This times `cim.codec.encode_meter_readings_response` building the lxml
tree, and, in the same run, `etree.tostring` of that tree (writing the bytes: the floor below
which no tree-building encoder goes), and prints the ratio. It also measures how long the
reactor thread is held when the door encodes such a reply: the longest gap between ticks of a
1 ms LoopingCall while the door's encoding runs.

    python bench/encode_response.py [--meters 1000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from lxml import etree

sys.path.insert(0, str(Path(__file__).parent))
from store_readings import END, fleet  # noqa: E402  (the same rows as the store benchmark)

from cimhes.cim.codec import encode_meter_readings_response  # noqa: E402
from cimhes.cim.message import Header, Reply, ReplyResult  # noqa: E402
from cimhes.cim.meter_readings import MeterReadingsResponse  # noqa: E402


def longest_reactor_stall(response) -> float:
    """Seconds of the longest gap between 1 ms ticks while the door encodes `response`."""
    from twisted.internet import reactor, task

    from cimhes.endpoints.meter_readings import encode_off_the_reactor

    ticks: list[float] = []
    ticker = task.LoopingCall(lambda: ticks.append(time.perf_counter()))

    def finish(_):
        # A few more ticks after the encoding, so the gap it caused is closed and counted.
        reactor.callLater(0.01, lambda: (ticker.stop(), reactor.stop()))

    def encode():
        encode_off_the_reactor(response).addBoth(finish)

    ticker.start(0.001)
    reactor.callLater(0.01, encode)
    reactor.run(installSignalHandlers=False)
    return max(b - a for a, b in zip(ticks, ticks[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is shown")
    args = parser.parse_args()

    _, readings = fleet(args.meters)
    values = sum(len(m.readings) + sum(len(b.readings) for b in m.interval_blocks)
                 for m in readings)
    response = MeterReadingsResponse(Header(verb="reply", noun="MeterReadings", timestamp=END),
                                     Reply(ReplyResult.OK), readings)
    print(f"machine: Python {platform.python_version()}, lxml {version('lxml')}; "
          f"command: {' '.join(sys.argv)}")
    encode = write = float("inf")
    for _ in range(args.repeat):
        started = time.process_time()
        tree = encode_meter_readings_response(response)
        middle = time.process_time()
        data = etree.tostring(tree)
        encode = min(encode, middle - started)
        write = min(write, time.process_time() - middle)
    print(f"{args.meters} meters, {values} values, {len(data) / 1e6:.1f} MB of XML; "
          f"best of {args.repeat}, CPU seconds")
    print(f"{'':24}{'CPU s':>8}{'us/value':>10}")
    print(f"{'cimhes encode (tree)':24}{encode:8.3f}{encode / values * 1e6:10.2f}")
    print(f"{'etree.tostring (floor)':24}{write:8.3f}{write / values * 1e6:10.2f}")
    print(f"encode / tostring: {encode / write:.1f}x")
    print(f"longest reactor stall while the door encodes it: "
          f"{longest_reactor_stall(response) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
