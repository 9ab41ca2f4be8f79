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
from cimhes.drivers.errors import AssociationRefused, ConnectionFailed, Timeout, UnsupportedReadingType
from cimhes.drivers.idis import READING_TYPE_MAP, IdisMeterDriver, MeterReadResult, cim_value
from cimhes.fixtures import meter_model
from cimhes.fixtures.fleet import start_fleet

NOW = datetime(2024, 3, 1, 12, 7, 30, tzinfo=timezone.utc)
WINDOW = (NOW - timedelta(days=1), NOW)

# DLMS unit enumeration -> CIM UnitSymbol code, for the units this table uses.
CIM_UNIT_OF_DLMS_UNIT = {30: 72}  # Wh
# OBIS C (quantity) -> CIM flowDirection for the active energy registers.
FLOW_OF_OBIS_C = {1: 1, 2: 19}  # +A forward, -A reverse


# -- the table, row by row ---------------------------------------------------------------------

@pytest.mark.parametrize("mrid", sorted(READING_TYPE_MAP))
def test_reading_type_row_agrees_with_its_cosem_source(mrid):
    source = READING_TYPE_MAP[mrid]
    reading_type = ReadingType.parse(mrid)
    a, b, c, d, e, f = (int(part) for part in source.register_obis.split("."))
    assert (a, d, f) == (1, 8, 255)  # electricity, time integral 1 (energy register), no billing
    assert reading_type.measurement_kind == 12  # energy
    assert reading_type.accumulation == 1  # bulk quantity: the register reading itself
    assert reading_type.flow_direction == FLOW_OF_OBIS_C[c]
    assert reading_type.tou == e  # OBIS E = tariff (0 = total)
    assert reading_type.multiplier == source.cim_multiplier
    assert reading_type.unit == CIM_UNIT_OF_DLMS_UNIT[source.unit]
    if source.is_interval:
        assert reading_type.measuring_period == 2  # fifteen minutes: the load profile
        assert source.profile_obis == "1.0.99.1.0.255"
    else:
        assert reading_type.measuring_period == 0
    assert source.register_obis in meter_model.SCALER_UNIT


def test_the_table_holds_the_six_contract_reading_types():
    assert len(READING_TYPE_MAP) == 6
    assert sum(source.is_interval for source in READING_TYPE_MAP.values()) == 2


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


def expected_register(serial, mrid):
    source = READING_TYPE_MAP[mrid]
    scaler, _ = meter_model.SCALER_UNIT[source.register_obis]
    raw = meter_model.register_raw(serial, source.register_obis, NOW)
    return Decimal(raw).scaleb(scaler - 3)


def expected_block(serial, mrid, start, end):
    source = READING_TYPE_MAP[mrid]
    scaler, _ = meter_model.SCALER_UNIT[source.register_obis]
    column = 1 if source.register_obis == "1.0.1.8.0.255" else 2
    return [(row[0], Decimal(row[column]).scaleb(scaler - 3))
            for row in meter_model.profile_rows(serial, start, end)]


@pytest_twisted.ensureDeferred
async def test_read_all_six_reading_types_matches_the_meter_model(fleet):
    meter = address(fleet, 2)
    result = await driver_for(meter.device_type).read(
        reactor, meter, list(READING_TYPE_MAP), *WINDOW, limits=5.0)
    assert isinstance(result, MeterReadResult)
    assert result.errors == ()
    reading = result.meter_reading
    assert reading.meter == DeviceRef(meter.mrid, (Name(meter.name),))
    assert reading.values_interval == WINDOW
    registers = {r.reading_type: r for r in reading.readings}
    blocks = {b.reading_type: b for b in reading.interval_blocks}
    for mrid, source in READING_TYPE_MAP.items():
        if source.is_interval:
            got = [(r.timestamp, r.value) for r in blocks[mrid].readings]
            assert got == expected_block(meter.name, mrid, *WINDOW)
            assert len(got) == 96
        else:
            assert registers[mrid].value == expected_register(meter.name, mrid)
            assert registers[mrid].timestamp == NOW


@pytest.mark.parametrize("mrid", sorted(READING_TYPE_MAP))
@pytest_twisted.ensureDeferred
async def test_each_reading_type_alone(fleet, mrid):
    meter = address(fleet, 3)
    start, end = NOW - timedelta(hours=2), NOW
    result = await IdisMeterDriver().read(reactor, meter, [mrid], start, end, limits=5.0)
    reading = result.meter_reading
    if READING_TYPE_MAP[mrid].is_interval:
        assert reading.readings == ()
        [block] = reading.interval_blocks
        assert [(r.timestamp, r.value) for r in block.readings] == \
            expected_block(meter.name, mrid, start, end)
    else:
        assert reading.interval_blocks == ()
        assert [(r.reading_type, r.value) for r in reading.readings] == \
            [(mrid, expected_register(meter.name, mrid))]


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
        IdisMeterDriver().read(reactor, meter, list(READING_TYPE_MAP), *WINDOW, 5.0)
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
                       raw_values={"1.0.1.8.1.255": 1234, "1.0.1.8.2.255": DataAccessError(4)},
                       scaler_units={"1.0.1.8.1.255": (0, 30), "1.0.1.8.2.255": (0, 30)})
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
             "authentication": "low", "password": "12345678"}
    address = DeviceAddress.from_inventory(entry)
    assert address.password == "12345678" and "12345678" not in repr(address)
    with pytest.raises(ValueError, match="route"):
        DeviceAddress.from_inventory({**entry, "route": "x"})
