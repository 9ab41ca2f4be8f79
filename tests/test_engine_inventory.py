"""The inventory file's routes, groups and usage points, loaded into SQLite and PostgreSQL, and
what it refuses (naming the entry, loading nothing)."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cimhes.engine.inventory import Inventory, ServedPeriod
from cimhes.engine.store import Store

UTC = timezone.utc


def _meter(k: int, **extra) -> dict:
    return {"mrid": f"00000000-0000-5000-8000-{k:012d}", "name": f"M{k}",
            "device_type": "idis-meter", "host": f"127.13.1.{k}", **extra}


M1, M2, M3 = (_meter(k)["mrid"] for k in (1, 2, 3))
DOCUMENT = {
    "meters": [_meter(1, route="DC-7", groups=["feeder-12", "billing-day-1"]),
               _meter(2, route="DC-7", groups=["feeder-12"]),
               _meter(3)],
    "routes": [{"name": "DC-7", "kind": "concentrator"}],
    "groups": [{"name": "feeder-12", "mrid": "a0000000-0000-5000-8000-000000000012"}],
    "usage_points": [
        {"mrid": "UP-1", "name": "Main street 1", "meters": [
            {"meter": M1, "from": "2024-01-01T00:00:00Z", "to": "2025-06-01T10:00:00Z"},
            {"meter": M3, "from": "2025-06-01T10:00:00Z"}]},
        {"mrid": "UP-2", "meters": [{"meter": M2, "from": "2024-01-01T00:00:00+01:00"}]},
    ],
}


@pytest.fixture
def store(database_url):
    store = Store(database_url)
    yield store
    store.close()


def test_routes_groups_and_usage_points_are_stored_and_found(store):
    assert store.load_inventory(Inventory.from_json(DOCUMENT)) == 3
    assert store.routes_of([M1, M2, M3]) == {M1: "DC-7", M2: "DC-7", M3: None}
    assert [d.mrid for d in store.devices_in_group("feeder-12")] == [M1, M2]
    assert [d.mrid for d in store.devices_in_group("billing-day-1")] == [M1]
    assert store.devices_in_group("nowhere") == []

    exchange = datetime(2025, 6, 1, 10, tzinfo=UTC)
    both = [ServedPeriod(M1, datetime(2024, 1, 1, tzinfo=UTC), exchange),
            ServedPeriod(M3, exchange, None)]
    assert store.usage_point_meters("UP-1") == both
    # A window across the meter exchange names both meters, one on either side only its own.
    assert store.usage_point_meters("UP-1", datetime(2025, 5, 31, tzinfo=UTC),
                                    datetime(2025, 6, 2, tzinfo=UTC)) == both
    assert store.usage_point_meters("UP-1", exchange, datetime(2026, 1, 1, tzinfo=UTC)) == both[1:]
    assert store.usage_point_meters("UP-1", None, exchange) == both[:1]
    assert store.usage_point_meters("UP-2")[0].served_from == datetime(2023, 12, 31, 23, tzinfo=UTC)


def test_loading_again_makes_the_listed_entries_exactly_what_is_given(store):
    store.load_inventory(Inventory.from_json(DOCUMENT))
    changed = {
        "meters": [_meter(1, groups=["billing-day-1"])],  # off its route, out of feeder-12
        "usage_points": [{"mrid": "UP-1", "meters": [{"meter": M1, "from": "2024-01-01T00:00:00Z"}]}],
    }
    store.load_inventory(Inventory.from_json(changed))
    assert store.routes_of([M1, M2]) == {M1: None, M2: "DC-7"}
    assert [d.mrid for d in store.devices_in_group("feeder-12")] == [M2]
    assert [p.meter for p in store.usage_point_meters("UP-1")] == [M1]
    assert [p.meter for p in store.usage_point_meters("UP-2")] == [M2]  # not listed: kept


def test_a_usage_point_naming_an_unknown_meter_loads_nothing(store):
    document = {"meters": [_meter(5, route="DC-9")],
                "usage_points": [{"mrid": "UP-9", "meters": [
                    {"meter": "ffffffff-0000-5000-8000-000000000009", "from": "2025-01-01T00:00:00Z"}]}]}
    with pytest.raises(ValueError, match="UP-9 names meter ffffffff-.*neither in the inventory"):
        store.load_inventory(Inventory.from_json(document))
    assert store.routes_of([_meter(5)["mrid"]]) == {}


@pytest.mark.parametrize("change, says", [
    ({"meters": [_meter(1, rout="x")]}, "unknown keys ['rout']"),
    ({"meters": [_meter(1, groups="feeder")]}, "groups must be a list"),
    ({"routes": [{"name": "DC-7", "capacity": 3}]}, "a route has unknown keys ['capacity']"),
    ({"usage_points": [{"mrid": "UP-1", "meters": [{"meter": M1, "from": "2025-01-01T00:00:00"}]}]},
     "has no time zone"),
    ({"usage_points": [{"mrid": "UP-1", "meters": [
        {"meter": M1, "from": "2025-01-01T00:00:00Z"},
        {"meter": M2, "from": "2025-03-01T00:00:00Z"}]}]},
     "UP-1 is served by two meters at once"),
    ({"usage_points": [
        {"mrid": "UP-1", "meters": [{"meter": M1, "from": "2025-01-01T00:00:00Z"}]},
        {"mrid": "UP-2", "meters": [{"meter": M1, "from": "2024-01-01T00:00:00Z",
                                     "to": "2025-02-01T00:00:00Z"}]}]},
     f"meter {M1} serves two usage points at once"),
    ({"usage_points": [{"mrid": "UP-1", "meters": [
        {"meter": M1, "from": "2025-01-01T00:00:00Z", "to": "2024-01-01T00:00:00Z"}]}]},
     "not after its served_from"),
    ({"meters": [_meter(1), _meter(1)]}, f"device mRID {M1} twice"),
])
def test_an_inventory_that_cannot_be_stored_as_given_is_refused_naming_the_entry(change, says):
    with pytest.raises(ValueError) as refused:
        Inventory.from_json({**DOCUMENT, **change})
    assert says in str(refused.value)


def test_scheduled_jobs_carry_the_devices_route(store):
    """A schedule run's jobs get each device's route from the store (the dispatcher's pacing
    per route needs it); a device without one has None."""
    from cimhes.engine.schedule import ALL_DEVICES, GroupMembers, ScheduleConfig

    store.load_inventory(Inventory.from_json(
        {**DOCUMENT, "groups": [{"name": "two", "mrid": "G-2", "members": [M2, M3]}]}))
    members = GroupMembers(store)
    assert members(ALL_DEVICES) == [(M1, "DC-7"), (M2, "DC-7"), (M3, None)]
    # The schedules' groups are the inventory's, by name or mRID: one source of groups.
    assert members("two") == members("G-2") == [(M2, "DC-7"), (M3, None)]
    with pytest.raises(ValueError, match="no EndDeviceGroup 'three' in the inventory"):
        members("three")
    with pytest.raises(ValueError, match="device groups are the inventory's"):
        ScheduleConfig.from_dict({"groups": {"two": [M2]}, "schedules": []})


def test_main_spellings_mrid_periods_and_group_members_load_the_same(store):
    document = {"meters": [_meter(1, groups=["feeder-12"]), _meter(2), _meter(3)],
                "groups": [{"mrid": "G-7", "members": [M1, M2]},
                           {"name": "feeder-12", "members": [M3]}],
                "usage_points": [{"mrid": "UP-1", "meters": [
                    {"mrid": M1, "from": "2024-01-01T00:00:00Z"}]}]}
    store.load_inventory(Inventory.from_json(document))
    assert [d.mrid for d in store.devices_in_group("G-7")] == [M1, M2]
    assert [d.mrid for d in store.devices_in_group("feeder-12")] == [M1, M3]
    assert [p.meter for p in store.usage_point_meters("UP-1")] == [M1]
    with pytest.raises(ValueError, match="group G-8: meter nope is not in the inventory"):
        Inventory.from_json({**document, "groups": [{"mrid": "G-8", "members": ["nope"]}]})
    with pytest.raises(ValueError, match='needs "meter"'):
        Inventory.from_json({**document, "usage_points": [{"mrid": "UP-1", "meters": [
            {"mrid": M1, "meter": M2, "from": "2024-01-01T00:00:00Z"}]}]})
