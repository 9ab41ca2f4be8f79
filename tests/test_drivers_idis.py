"""The IDIS meter driver: its reading-type table row by row, and whole reads over real TCP
against the simulated fleet (and against meters that are dead or silent)."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from cimhes.cim.meter_readings import DeviceRef, Name
from cimhes.cim.reading_type import ReadingType
from cimhes.drivers import DeviceAddress, driver_for
from cimhes.drivers.errors import (
    AssociationRefused,
    ConnectionFailed,
    HistoryShortfall,
    Timeout,
    UnsupportedReadingType,
)
from cimhes.drivers.idis import (
    DEFAULT_READING_TYPES,
    READING_TYPE_MAP,
    IdisMeterDriver,
    MeterReadResult,
    cim_value,
)
from cimhes.drivers.idis_catalogue import Derivation, Period
from cimhes.fixtures import meter_model
from cimhes.fixtures.cosem_objects import PROFILES, object_model
from cimhes.fixtures.fleet import start_fleet

NOW = datetime(2024, 6, 15, 12, 7, 30, tzinfo=timezone.utc)
WINDOW = (NOW - timedelta(days=1), NOW)
UTC = timezone.utc

# DLMS unit enumeration -> CIM UnitSymbol code, for the units this table uses.
CIM_UNIT_OF_DLMS_UNIT = {30: 72, 27: 38, 35: 29, 33: 5}  # Wh, W, V, A
# OBIS C (quantity) -> CIM flowDirection for the active energy registers.
FLOW_OF_OBIS_C = {1: 1, 2: 19}  # +A forward, -A reverse
# OBIS C of instantaneous values -> (CIM measurementKind, phases, flowDirection).
INSTANTANEOUS_OF_OBIS_C = {
    32: (54, 129, 0), 52: (54, 65, 0), 72: (54, 33, 0),      # voltage L1-N .. L3-N
    31: (4, 128, 0), 51: (4, 64, 0), 71: (4, 32, 0),         # current L1 .. L3
    21: (37, 128, 1), 41: (37, 64, 1), 61: (37, 32, 1), 1: (37, 0, 1),  # +P L1 .. L3, sum
}
# Profile period -> (macroPeriod, measuringPeriod) of the reading type.
PERIOD_PARTS = {Period.QUARTER_HOUR: (0, 2), Period.DAY: (11, 0), Period.MONTH: (13, 0)}
PROFILE_OF_PERIOD = {Period.QUARTER_HOUR: "1.0.99.1.0.255", Period.DAY: "1.0.99.2.0.255",
                     Period.MONTH: "0.0.98.1.0.255"}
OBJECTS = object_model()


def obis_parts(obis):
    return tuple(int(part) for part in obis.split("."))


# -- the table, row by row ---------------------------------------------------------------------

@pytest.mark.parametrize("mrid", list(READING_TYPE_MAP))
def test_reading_type_row_agrees_with_its_cosem_source(mrid):
    source = READING_TYPE_MAP[mrid]
    rt = ReadingType.parse(mrid)
    assert rt.mrid == mrid and source.source and source.meaning
    a, b, c, d, e, f = obis_parts(source.obis)
    if source.unit is not None:
        assert rt.unit == CIM_UNIT_OF_DLMS_UNIT[source.unit]
        assert rt.multiplier == source.cim_multiplier
    assert rt.commodity in (0, 1)
    if d == 8:  # energy register (time integral 1), or a profile column capturing one
        assert (a, f, source.class_id) == (1, 255, 3)
        assert (rt.measurement_kind, rt.unit, rt.multiplier) == (12, 72, 3)
        assert rt.flow_direction == FLOW_OF_OBIS_C[c]
        assert rt.tou == e  # OBIS E = tariff (0 = total)
        assert rt.accumulation == (4 if source.derivation is Derivation.DELTA else 1)
        if source.is_interval:
            assert (rt.macro_period, rt.measuring_period) == PERIOD_PARTS[source.period]
            assert source.profile_obis == PROFILE_OF_PERIOD[source.period]
        else:
            assert (rt.macro_period, rt.measuring_period) == (0, 0)
            assert source.history_profile == "1.0.99.2.0.255"
    elif d == 7:  # instantaneous value
        assert source.class_id == 3 and not source.is_interval
        assert (rt.measurement_kind, rt.phases, rt.flow_direction) == INSTANTANEOUS_OF_OBIS_C[c]
        assert rt.accumulation == 12 and rt.multiplier == 0
    elif d == 6:  # maximum demand: class 4, stamped with its capture_time
        assert (c, source.class_id, source.timestamp_attribute) == (1, 4, 5)
        assert (rt.aggregate, rt.measurement_kind, rt.macro_period, rt.measuring_period) == (8, 8, 8, 2)
        assert (rt.flow_direction, rt.unit, rt.multiplier) == (1, 38, 3)
    else:  # the disconnector
        assert (source.obis, source.class_id, source.attribute) == ("0.0.96.3.10.255", 70, 3)
        assert (rt.measurement_kind, rt.accumulation, rt.unit) == (43, 6, 0)
        assert source.unit is None
    # The simulator has the object (same class), and the profile captures the column.
    obj = OBJECTS[bytes(obis_parts(source.obis))]
    assert obj.class_id == source.class_id and source.attribute in obj.attributes
    if source.is_interval:
        profile = OBJECTS[bytes(obis_parts(source.profile_obis))]
        assert profile.class_id == 7
        spec = next(p for p in PROFILES if p.obis == source.profile_obis)
        assert (source.class_id, bytes(obis_parts(source.obis)), source.attribute, 0) in spec.captures


def test_the_default_set_is_the_contract_six():
    assert len(DEFAULT_READING_TYPES) == 6
    assert set(DEFAULT_READING_TYPES) <= set(READING_TYPE_MAP)
    assert len(READING_TYPE_MAP) == 31


@pytest.mark.parametrize("raw, scaler, multiplier, text", [
    (3436292, 0, 3, "3436.292"),
    (19564, 1, 3, "195.64"),
    (1, 0, 3, "0.001"),
    (0, 0, 3, "0.000"),
    (5, 4, 3, "50"),
    (4294967295, -2, 3, "42949.67295"),
])
def test_cim_value_is_exact(raw, scaler, multiplier, text):
    assert str(cim_value(raw, scaler, multiplier)) == text


def test_driver_registry():
    assert isinstance(driver_for("idis-meter"), IdisMeterDriver)
    with pytest.raises(KeyError, match="idis-meter"):
        driver_for("toaster")


# -- whole reads over TCP ----------------------------------------------------------------------

@pytest.fixture
def fleet():
    running = start_fleet(reactor, 3, clock=lambda: NOW, port=0)
    yield running
    pytest_twisted.blockon(running.stop_all())


def address(fleet, k) -> DeviceAddress:
    return DeviceAddress.from_inventory(fleet.inventory()["meters"][k - 1])


def kwh_or_unit(source, raw):
    """The CIM value of a raw COSEM value as the model's scaler and the row's multiplier make it."""
    if source.unit is None:
        return Decimal(raw)
    scaler, _ = {**meter_model.SCALER_UNIT, **meter_model.EXTENDED_SCALER_UNIT}[source.obis]
    return Decimal(raw).scaleb(scaler - source.cim_multiplier)


def capture_instants(period, start, end, include_start=False):
    """Every capture instant of a profile in the window, walked out independently of the driver."""
    step = {Period.QUARTER_HOUR: timedelta(minutes=15), Period.DAY: timedelta(days=1)}.get(period)
    at = datetime(start.year, start.month, 1, tzinfo=UTC) if step is None else \
        datetime(start.year, start.month, start.day, tzinfo=UTC)
    found = []
    while at <= end:
        if at > start or (include_start and at == start):
            found.append(at)
        if step is None:
            at = datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)
        else:
            at += step
    return found


def expected_for(serial, mrid, start, end):
    """What the meter model says a read of `mrid` over [start, end] at NOW must give: a list of
    (timestamp, value) in order."""
    source = READING_TYPE_MAP[mrid]
    raw = lambda at: meter_model.register_raw(serial, source.obis, at)  # noqa: E731
    if source.is_interval:
        instants = [at for at in capture_instants(source.period, start, end) if at >= meter_model.EPOCH]
        if source.derivation is Derivation.DELTA:
            previous = [capture_instants(source.period, at - timedelta(days=32), at)[-2] for at in instants]
            return [(at, kwh_or_unit(source, raw(at) - raw(before)))
                    for at, before in zip(instants, previous) if before >= meter_model.EPOCH]
        return [(at, kwh_or_unit(source, raw(at))) for at in instants]
    if source.class_id == 4:
        value, captured = meter_model.max_demand(serial, NOW)
        return [(captured, kwh_or_unit(source, value))]
    if source.class_id == 70:
        return [(NOW, Decimal(1))]  # connected, as every simulated meter starts
    if end < NOW:  # a past window: the daily billing values inside it
        return [(at, kwh_or_unit(source, raw(at)))
                for at in capture_instants(Period.DAY, start, end, include_start=True)]
    return [(NOW, kwh_or_unit(source, raw(NOW)))]


# A window per kind of row: long enough to hold several values, inside the meter's history.
WINDOW_OF_PERIOD = {Period.QUARTER_HOUR: timedelta(hours=3), Period.DAY: timedelta(days=5),
                    Period.MONTH: timedelta(days=100)}


@pytest.mark.parametrize("mrid", list(READING_TYPE_MAP))
@pytest_twisted.ensureDeferred
async def test_each_catalogue_row_read_alone_over_dlms_matches_the_meter_model(fleet, mrid):
    meter = address(fleet, 3)
    source = READING_TYPE_MAP[mrid]
    start = NOW - WINDOW_OF_PERIOD.get(source.period, timedelta(hours=2))
    result = await IdisMeterDriver().read(reactor, meter, [mrid], start, NOW, limits=5.0)
    assert result.errors == ()
    reading = result.meter_reading
    want = expected_for(meter.name, mrid, start, NOW)
    assert want  # the window holds values
    if source.is_interval:
        assert reading.readings == ()
        [block] = reading.interval_blocks
        assert block.reading_type == mrid
        assert [(r.timestamp, r.value) for r in block.readings] == want
    else:
        assert reading.interval_blocks == ()
        assert [(r.reading_type, r.timestamp, r.value) for r in reading.readings] == \
            [(mrid, at, value) for at, value in want]


@pytest.mark.parametrize("mrid", [m for m, s in READING_TYPE_MAP.items() if s.history_profile])
@pytest_twisted.ensureDeferred
async def test_a_register_asked_over_a_past_window_gives_the_billing_values_inside_it(fleet, mrid):
    meter = address(fleet, 2)
    start, end = datetime(2024, 6, 11, 0, 0, tzinfo=UTC), datetime(2024, 6, 13, 18, 0, tzinfo=UTC)
    result = await IdisMeterDriver().read(reactor, meter, [mrid], start, end, limits=5.0)
    assert result.errors == ()
    got = [(r.timestamp, r.value) for r in result.meter_reading.readings]
    assert [at for at, _ in got] == [datetime(2024, 6, d, tzinfo=UTC) for d in (11, 12, 13)]
    assert got == expected_for(meter.name, mrid, start, end)
    assert all(r.timestamp != NOW for r in result.meter_reading.readings)  # never today's value


@pytest_twisted.ensureDeferred
async def test_read_the_default_set_matches_the_meter_model(fleet):
    meter = address(fleet, 2)
    result = await driver_for(meter.device_type).read(reactor, meter, [], *WINDOW, limits=5.0)
    assert isinstance(result, MeterReadResult)
    assert result.errors == ()
    reading = result.meter_reading
    assert reading.meter == DeviceRef(meter.mrid, (Name(meter.name),))
    assert reading.values_interval == WINDOW
    got = {r.reading_type: [(r.timestamp, r.value)] for r in reading.readings}
    got.update({b.reading_type: [(r.timestamp, r.value) for r in b.readings]
                for b in reading.interval_blocks})
    assert list(got) == list(DEFAULT_READING_TYPES)
    for mrid in DEFAULT_READING_TYPES:
        assert got[mrid] == expected_for(meter.name, mrid, *WINDOW)
    assert [len(b.readings) for b in reading.interval_blocks] == [96, 96]


@pytest.mark.parametrize("mrid, days, missing", [
    # The 15-minute profile keeps 35 days: a 40-day window lacks the 5 oldest days.
    ("0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", 40, 5 * 96),
    # ...and a delta also lacks the first kept interval, whose start the meter no longer has.
    ("0.0.2.4.1.1.12.0.0.0.0.0.0.0.0.3.72.0", 40, 5 * 96 + 1),
    # The daily profile keeps 62 days; a 70-day window lacks 8 midnights.
    ("11.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0", 70, 8),
])
@pytest_twisted.ensureDeferred
async def test_a_window_longer_than_the_history_gives_what_exists_and_says_so(fleet, mrid, days, missing):
    meter = address(fleet, 1)
    start = NOW - timedelta(days=days)
    result = await IdisMeterDriver().read(reactor, meter, [mrid], start, NOW, limits=10.0)
    [block] = result.meter_reading.interval_blocks
    spanned = capture_instants(READING_TYPE_MAP[mrid].period, start, NOW)
    assert len(block.readings) == len(spanned) - missing
    assert [(r.timestamp, r.value) for r in block.readings] == \
        expected_for(meter.name, mrid, start, NOW)[-len(block.readings):]
    [warning] = result.errors
    assert isinstance(warning, HistoryShortfall)
    assert (warning.reading_type, warning.missing, warning.first_missing) == (mrid, missing, spanned[0])
    assert "missing" in warning.reason and meter.mrid == warning.device_mrid


@pytest_twisted.ensureDeferred
async def test_a_monthly_window_before_the_meter_existed_says_so(fleet):
    meter = address(fleet, 1)
    mrid = "13.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
    start = datetime(2023, 10, 15, tzinfo=UTC)  # before EPOCH (2024-01-01)
    result = await IdisMeterDriver().read(reactor, meter, [mrid], start, NOW, limits=5.0)
    [block] = result.meter_reading.interval_blocks
    assert [r.timestamp.month for r in block.readings] == [1, 2, 3, 4, 5, 6]
    [warning] = result.errors
    assert warning.missing == 2 and warning.first_missing == datetime(2023, 11, 1, tzinfo=UTC)


@pytest_twisted.ensureDeferred
async def test_unsupported_types_are_reported_and_the_rest_still_read(fleet):
    meter = address(fleet, 1)
    plus_a = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
    reactive = "0.0.0.1.1.1.12.0.0.0.0.0.0.0.0.3.73.0"
    result = await IdisMeterDriver().read(reactor, meter, [plus_a, reactive], None, None, 5.0)
    assert [r.reading_type for r in result.meter_reading.readings] == [plus_a]
    [error] = result.errors
    assert isinstance(error, UnsupportedReadingType)
    assert (error.device_mrid, error.reading_type) == (meter.mrid, reactive)


@pytest_twisted.ensureDeferred
async def test_interval_types_without_a_window_give_no_block(fleet):
    meter = address(fleet, 1)
    profile_type = "0.0.2.1.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
    result = await IdisMeterDriver().read(reactor, meter, [profile_type], None, None, 5.0)
    assert result.meter_reading.interval_blocks == ()
    assert result.meter_reading.values_interval is None
    assert result.errors == ()


@pytest_twisted.ensureDeferred
async def test_window_end_defaults_to_the_meter_clock(fleet):
    meter = address(fleet, 1)
    profile_type = "0.0.2.1.19.1.12.0.0.0.0.0.0.0.0.3.72.0"
    start = NOW - timedelta(minutes=50)
    result = await IdisMeterDriver().read(reactor, meter, [profile_type], start, None, 5.0)
    assert result.meter_reading.values_interval == (start, NOW)
    [block] = result.meter_reading.interval_blocks
    assert [r.timestamp for r in block.readings] == [
        NOW.replace(minute=0, second=0) - timedelta(minutes=15 * n) for n in (2, 1, 0)]


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_association_refused_for_that_meter(fleet):
    meter = address(fleet, 1)
    wrong = DeviceAddress(**{**meter.__dict__, "password": "00000000"})
    with pytest.raises(AssociationRefused) as refused:
        await IdisMeterDriver().read(reactor, wrong, list(READING_TYPE_MAP), None, None, 5.0)
    assert refused.value.device_mrid == meter.mrid


@pytest_twisted.ensureDeferred
async def test_dead_meter_is_connection_failed_naming_it(fleet):
    meter = address(fleet, 3)
    await fleet.stop(3)
    with pytest.raises((ConnectionFailed, Timeout)) as failed:
        await IdisMeterDriver().read(reactor, meter, list(READING_TYPE_MAP), None, None, 2.0)
    assert failed.value.device_mrid == meter.mrid
    assert meter.host in failed.value.reason


@pytest_twisted.ensureDeferred
async def test_many_meters_read_concurrently(fleet):
    meters = [address(fleet, k) for k in (1, 2, 3)] * 4
    results = await gatherResults([
        IdisMeterDriver().read(reactor, meter, [], *WINDOW, 5.0)
        for meter in meters])
    for meter, result in zip(meters, results):
        assert result.meter_reading.meter.mrid == meter.mrid
        assert len(result.meter_reading.readings) == 4
        assert [len(b.readings) for b in result.meter_reading.interval_blocks] == [96, 96]


def test_an_object_the_meter_refuses_is_an_error_for_its_reading_type_only():
    from cimhes.drivers.dlms_session import DataAccessError
    from cimhes.drivers.errors import ObjectUnavailable
    from cimhes.drivers.idis import _Answers, _meter_read_result

    meter = DeviceAddress("mrid-x", "CIMHES000099", "idis-meter", "127.0.0.1")
    t1, t2 = "0.0.0.1.1.1.12.0.0.0.0.1.0.0.0.3.72.0", "0.0.0.1.1.1.12.0.0.0.0.2.0.0.0.3.72.0"
    driver = IdisMeterDriver()
    plan = driver._plan(meter, [t1, t2], with_profile=False)
    answers = _Answers(NOW, None,
                       values={(3, "1.0.1.8.1.255", 2): 1234, (3, "1.0.1.8.2.255", 2): DataAccessError(4)},
                       scaler_units={(3, "1.0.1.8.1.255"): (0, 30), (3, "1.0.1.8.2.255"): (0, 30)})
    result = _meter_read_result(meter, plan, answers)
    assert [(r.reading_type, r.value) for r in result.meter_reading.readings] == \
        [(t1, Decimal("1.234"))]
    [error] = result.errors
    assert isinstance(error, ObjectUnavailable)
    assert (error.reading_type, error.data_access_result) == (t2, 4)
    assert "object-undefined" in error.reason


def test_inventory_entry_becomes_an_address_without_showing_its_password():
    entry = {"mrid": "m", "name": "CIMHES000001", "device_type": "idis-meter",
             "host": "127.0.1.1", "port": 4059, "client_address": 1, "server_address": 1,
             "security": "low", "password": "12345678"}
    address = DeviceAddress.from_inventory(entry)
    assert address.password == "12345678" and "12345678" not in repr(address)
    with pytest.raises(ValueError, match="route"):
        DeviceAddress.from_inventory({**entry, "route": "x"})
