"""Benchmark: the CIM codec per noun, and GetMeterReadings answered from the store, each against
plain lxml doing the same XML in the same run (the floor).

1. Per noun, encode and decode throughput (values per second) of the codec functions:
   MeterReadingsResponseMessage (the GetMeterReadings reply), CreatedMeterReadings (the
   published event), GetMeterReadings (the request, naming every meter). The encode floor is
   plain lxml building the same elements from the same Python values and serialising them; the
   decode floor is `etree.fromstring` of the same bytes (parsing alone, no validation).
2. GetMeterReadings from the store: 1,000 meters x 96 intervals x 2 reading types (192,000
   values) stored in SQLite by the head-end's own Store, then answered the way the door does
   (`stored_meter_readings` → `encode_meter_readings_response` → bytes), time to the last byte;
   the floor builds and serialises the same XML with plain lxml from the same rows fetched with
   one plain SQL query. Peak RSS of the process is printed after each phase (ru_maxrss).

    python bench/cim_nouns.py [--meters 1000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path

from lxml import etree

sys.path.insert(0, str(Path(__file__).parent))
from store_readings import END, PROFILES, fleet  # noqa: E402

from cimhes.cim.codec import (  # noqa: E402
    decode_created_meter_readings,
    decode_get_meter_readings,
    decode_meter_readings_response,
    encode_created_meter_readings,
    encode_get_meter_readings,
    encode_meter_readings_response,
)
from cimhes.cim.message import Header, Reply, ReplyResult, Verb  # noqa: E402
from cimhes.cim.meter_readings import (  # noqa: E402
    GetMeterReadings,
    IntervalBlock,
    MeterReading,
    MeterReadingsResponse,
)
from cimhes.engine.reading_sources import Slice, stored_meter_readings  # noqa: E402
from cimhes.engine.store import Store  # noqa: E402

MR = "http://iec.ch/TC57/2011/MeterReadings#"
MSG = "http://iec.ch/TC57/2011/schema/message"
WRAPPER = "http://iec.ch/TC57/2011/GetMeterReadingsMessage"


def best(repeat: int, work):
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times), result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stamp(value) -> str:
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def plain_lxml_reply(readings) -> bytes:
    """The floor: the same MeterReadingsResponseMessage built with bare lxml calls."""
    sub = etree.SubElement
    root = etree.Element(f"{{{WRAPPER}}}MeterReadingsResponseMessage",
                         nsmap={"msg": MSG, "gmr": WRAPPER, "mr": MR})
    header = sub(root, f"{{{WRAPPER}}}Header")
    sub(header, f"{{{MSG}}}Verb").text = "reply"
    sub(header, f"{{{MSG}}}Noun").text = "MeterReadings"
    sub(sub(root, f"{{{WRAPPER}}}Reply"), f"{{{MSG}}}Result").text = "OK"
    payload = sub(sub(root, f"{{{WRAPPER}}}Payload"), f"{{{MR}}}MeterReadings")
    stamps = {}
    for meter_reading in readings:
        node = sub(payload, f"{{{MR}}}MeterReading")
        for block in meter_reading.interval_blocks:
            block_node = sub(node, f"{{{MR}}}IntervalBlocks")
            for interval in block.readings:
                row = sub(block_node, f"{{{MR}}}IntervalReadings")
                stamp = stamps.get(interval.timestamp) or stamps.setdefault(
                    interval.timestamp, _stamp(interval.timestamp))
                sub(row, f"{{{MR}}}timeStamp").text = stamp
                sub(row, f"{{{MR}}}value").text = format(interval.value, "f")
            sub(block_node, f"{{{MR}}}ReadingType").set("ref", block.reading_type)
        sub(sub(node, f"{{{MR}}}Meter"), f"{{{MR}}}mRID").text = meter_reading.meter.mrid
        for reading in meter_reading.readings:
            row = sub(node, f"{{{MR}}}Readings")
            sub(row, f"{{{MR}}}timeStamp").text = _stamp(reading.timestamp)
            sub(row, f"{{{MR}}}value").text = format(reading.value, "f")
            sub(row, f"{{{MR}}}ReadingType").set("ref", reading.reading_type)
    return etree.tostring(root)


def values_of(readings) -> int:
    return sum(len(m.readings) + sum(len(b.readings) for b in m.interval_blocks) for m in readings)


def per_noun(readings, repeat: int) -> None:
    values = values_of(readings)
    header = Header(verb=Verb.REPLY, noun="MeterReadings", timestamp=END)
    response = MeterReadingsResponse(header, Reply(ReplyResult.OK), readings)
    request = GetMeterReadings(Header(verb=Verb.GET, noun="MeterReadings"),
                               end_devices=tuple(m.meter for m in readings),
                               reading_types=tuple(PROFILES), start=END - timedelta(days=1),
                               end=END)
    rows = []

    floor_encode, floor_bytes = best(repeat, lambda: plain_lxml_reply(readings))
    floor_parse, _ = best(repeat, lambda: etree.fromstring(floor_bytes))
    for name, count, encode, decode in (
            ("MeterReadingsResponse", values,
             lambda: etree.tostring(encode_meter_readings_response(response)),
             lambda data: decode_meter_readings_response(etree.fromstring(data))),
            ("CreatedMeterReadings", values,
             lambda: etree.tostring(encode_created_meter_readings(
                 Header(verb=Verb.CREATED, noun="MeterReadings"), readings)),
             lambda data: decode_created_meter_readings(etree.fromstring(data))),
            ("GetMeterReadings (request)", len(readings),
             lambda: etree.tostring(encode_get_meter_readings(request)),
             lambda data: decode_get_meter_readings(etree.fromstring(data)))):
        encode_s, data = best(repeat, encode)
        decode_s, _ = best(repeat, lambda: decode(data))
        rows.append((name, count, len(data), encode_s, decode_s))
    print(f"\n2. codec per noun, best of {repeat} (wall s); floor = plain lxml build+tostring / "
          f"fromstring of the same reply: {floor_encode:.3f} s / {floor_parse:.3f} s")
    print(f"{'noun':28}{'items':>8}{'MB':>6}{'encode s':>10}{'items/s':>11}{'decode s':>10}"
          f"{'items/s':>11}")
    for name, count, size, encode_s, decode_s in rows:
        print(f"{name:28}{count:8}{size / 1e6:6.1f}{encode_s:10.3f}{count / encode_s:11.0f}"
              f"{decode_s:10.3f}{count / decode_s:11.0f}")
    reply = rows[0]
    print(f"MeterReadingsResponse encode / floor: {reply[3] / floor_encode:.2f}x; "
          f"decode (validates, builds objects) / fromstring: {reply[4] / floor_parse:.1f}x")
    print(f"peak RSS so far: {peak_rss_mb():.0f} MB")


def from_store(devices, readings, repeat: int) -> None:
    profile_only = [MeterReading(m.meter, (), m.interval_blocks) for m in readings]
    with tempfile.TemporaryDirectory() as folder:
        store = Store(f"sqlite:///{Path(folder) / 'bench.sqlite'}")
        store.load_inventory(devices)
        store.save_meter_readings(profile_only, END)
        slices = [Slice(m.meter, END - timedelta(days=1), END) for m in profile_only]

        def answer():
            found = stored_meter_readings(store, slices, PROFILES)
            ordered = tuple(found[i] for i in sorted(found))
            return etree.tostring(encode_meter_readings_response(MeterReadingsResponse(
                Header(verb=Verb.REPLY, noun="MeterReadings"), Reply(ReplyResult.OK), ordered)))

        def floor():
            # One plain SQL query for the same rows, then bare lxml.
            from collections import defaultdict
            from decimal import Decimal

            from cimhes.cim.meter_readings import DeviceRef, IntervalReading
            rows = defaultdict(lambda: defaultdict(list))
            with store.engine.connect() as connection:
                for mrid, code, stamp, value in connection.exec_driver_sql(
                        "SELECT device.mrid, reading.reading_type, reading.timestamp, reading.value "
                        "FROM reading JOIN device ON device.id = reading.device_id "
                        "ORDER BY device.mrid, reading.reading_type, reading.timestamp"):
                    rows[mrid][code].append(IntervalReading(
                        END.replace(year=1970, month=1, day=1, hour=0, minute=0)
                        + timedelta(milliseconds=stamp), Decimal(value)))
            built = [MeterReading(DeviceRef(mrid=mrid), (), tuple(
                IntervalBlock(code, tuple(r)) for code, r in types.items()))
                for mrid, types in rows.items()]
            return plain_lxml_reply(built)

        rss_before = peak_rss_mb()
        cimhes_s, data = best(repeat, answer)
        rss_cimhes = peak_rss_mb()
        floor_s, floor_data = best(repeat, floor)
        store.close()
    values = values_of(profile_only)
    print(f"\n1. GetMeterReadings from the store: {len(devices)} meters x 96 intervals x 2 types = "
          f"{values} values, {len(data) / 1e6:.1f} MB; best of {repeat}, wall s to the last byte")
    print(f"cimhes (store query + encode + bytes): {cimhes_s:.3f} s "
          f"({values / cimhes_s:.0f} values/s)")
    print(f"floor (one SQL query + plain lxml):   {floor_s:.3f} s ({len(floor_data) / 1e6:.1f} MB)")
    print(f"cimhes / floor: {cimhes_s / floor_s:.2f}x (target <= 1.5x)")
    print(f"peak RSS: {rss_before:.0f} MB before, {rss_cimhes:.0f} MB after cimhes's answers, "
          f"{peak_rss_mb():.0f} MB after the floor's")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: Python {platform.python_version()}, lxml {version('lxml')}, "
          f"SQLAlchemy {version('sqlalchemy')}; command: {' '.join(sys.argv)}")
    devices, readings = fleet(args.meters)
    # The store phase first, so its peak RSS is its own, not the codec phase's.
    from_store(devices, readings, args.repeat)
    per_noun(readings, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
