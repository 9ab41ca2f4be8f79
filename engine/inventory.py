"""The inventory a head-end is given: devices with their route and groups, and usage points with
the meters that served them and when. Read from the inventory JSON (README, "Inventory file"),
checked whole before anything is stored: an unknown key, a bad time or overlapping periods is a
ValueError naming the entry, never ignored.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cimhes.drivers import DeviceAddress
from cimhes.drivers.concentrator import DEFAULT_MAX_SESSIONS, ConcentratorRoute


@dataclass(frozen=True)
class InventoryDevice:
    address: DeviceAddress
    route: str | None = None  # the route's name; None: reached directly, no shared bottleneck
    groups: tuple[str, ...] = ()  # names of the EndDeviceGroups it belongs to
    # Low-voltage network position (engine/feeder_outages.py): the supplying transformer and feeder.
    transformer: str | None = None
    feeder: str | None = None


@dataclass(frozen=True)
class RouteEntry:
    name: str
    kind: str | None = None  # "concentrator", "cellular", "direct", ...
    # A concentrator's address and network id (kind "concentrator" only; its meters are
    # reached there, drivers/concentrator.py).
    host: str | None = None
    port: int | None = None
    network_id: int | None = None
    # Sessions open at once on the route (the engine's per-route bound; a concentrator's
    # default is drivers.concentrator.DEFAULT_MAX_SESSIONS, other routes' None:
    # EngineSettings.max_sessions_per_route).
    max_sessions: int | None = None

    def concentrator(self) -> ConcentratorRoute | None:
        """The concentrator its meters are reached through (a route of kind "concentrator"
        with a host); None for any other route, which only names a shared bottleneck."""
        if self.kind != "concentrator" or self.host is None:
            return None
        return ConcentratorRoute(self.name, self.host, self.port, self.network_id,
                                 self.max_sessions)


@dataclass(frozen=True)
class GroupEntry:
    name: str
    mrid: str | None = None


@dataclass(frozen=True)
class ServedPeriod:
    """A meter served a usage point from `served_from` until `served_to` (excluded; None: still)."""

    meter: str  # the device's mRID
    served_from: datetime
    served_to: datetime | None = None


@dataclass(frozen=True)
class UsagePointEntry:
    mrid: str
    name: str | None = None
    meters: tuple[ServedPeriod, ...] = ()


@dataclass(frozen=True)
class Inventory:
    devices: tuple[InventoryDevice, ...] = ()
    routes: tuple[RouteEntry, ...] = ()
    groups: tuple[GroupEntry, ...] = ()
    usage_points: tuple[UsagePointEntry, ...] = field(default=())

    @classmethod
    def of_devices(cls, addresses: Iterable[DeviceAddress]) -> "Inventory":
        """An inventory of devices alone (no route, no group, no usage point)."""
        return cls(devices=tuple(InventoryDevice(a) for a in addresses))

    @classmethod
    def from_json(cls, document: Any) -> "Inventory":
        """Read the inventory JSON document (already parsed)."""
        _only(document, {"meters", "routes", "groups", "usage_points"}, "the inventory")
        if "meters" not in document:
            raise ValueError('the inventory has no "meters" list')
        concentrators = {route.name: route.concentrator()
                         for route in map(_route, _list(document, "routes"))
                         if route.concentrator() is not None}
        devices = [_device(entry, concentrators) for entry in _list(document, "meters")]
        return cls._with(devices, document)

    @classmethod
    def with_links(cls, devices: "Inventory | Iterable[DeviceAddress]",
                   links: Mapping) -> "Inventory":
        """Devices already read, with the file's "routes", "groups" and "usage_points" added."""
        _only(links, {"routes", "groups", "usage_points"}, "the inventory's links")
        if isinstance(devices, Inventory):
            return cls._with(list(devices.devices), {
                "routes": [vars(r) for r in devices.routes] + list(links.get("routes", [])),
                "groups": [vars(g) for g in devices.groups] + list(links.get("groups", [])),
                "usage_points": list(links.get("usage_points", []))})
        return cls._with([InventoryDevice(a) for a in devices], links)

    @classmethod
    def _with(cls, devices: list[InventoryDevice], document: Mapping) -> "Inventory":
        routes = tuple(_route(e) for e in _list(document, "routes"))
        groups, members = [], {}
        for entry in _list(document, "groups"):
            group, listed = _group(entry)
            groups.append(group)
            members[group.name] = listed
        devices = _add_members(devices, members)
        usage_points = tuple(_usage_point(e) for e in _list(document, "usage_points"))
        inventory = cls(tuple(devices), routes, tuple(groups), usage_points)
        inventory.check()
        return inventory

    def check(self) -> None:
        """Refuse what cannot be stored as given: a device twice, a period ending before it
        starts, a usage point served by two meters at once, a meter serving two at once."""
        _unique([d.address.mrid for d in self.devices], "device mRID")
        _unique([r.name for r in self.routes], "route name")
        _unique([g.name for g in self.groups], "group name")
        _unique([u.mrid for u in self.usage_points], "usage point mRID")
        by_meter: dict[str, list[tuple[ServedPeriod, str]]] = {}
        for usage_point in self.usage_points:
            periods = sorted(usage_point.meters, key=lambda p: p.served_from)
            for period in periods:
                if period.served_to is not None and period.served_to <= period.served_from:
                    raise ValueError(f"usage point {usage_point.mrid}: meter {period.meter} is "
                                     f"served_to {period.served_to} not after its served_from")
                by_meter.setdefault(period.meter, []).append((period, usage_point.mrid))
            _no_overlap(periods, f"usage point {usage_point.mrid} is served by two meters at once")
        for meter, served in by_meter.items():
            served.sort(key=lambda item: item[0].served_from)
            _no_overlap([p for p, _ in served],
                        f"meter {meter} serves two usage points at once "
                        f"({', '.join(sorted({u for _, u in served}))})")


def _route(entry: Any) -> RouteEntry:
    """A route. One of kind "concentrator" with a host is a gateway to the meters behind it,
    with port 4059, network id 0 and `DEFAULT_MAX_SESSIONS` unless given; any other route
    (a concentrator without host included: the meters have addresses of their own) names no
    port or network id."""
    route = _entry(RouteEntry, entry, "route")
    if route.max_sessions is not None and (not isinstance(route.max_sessions, int)
                                           or route.max_sessions < 1):
        raise ValueError(f"route {route.name}: max_sessions must be a whole number >= 1")
    if route.kind != "concentrator" or route.host is None:
        if route.host is not None or route.port is not None or route.network_id is not None:
            raise ValueError(f"route {route.name}: host, port and network_id are for a route "
                             'of kind "concentrator" (with its host)')
        return route
    if not isinstance(route.host, str) or not route.host:
        raise ValueError(f"concentrator {route.name}: host must be an address")
    route = RouteEntry(route.name, route.kind, route.host,
                       4059 if route.port is None else route.port,
                       0 if route.network_id is None else route.network_id,
                       DEFAULT_MAX_SESSIONS if route.max_sessions is None else route.max_sessions)
    route.concentrator()  # checks port, network id and bound
    return route


def _device(entry: Any, concentrators: Mapping[str, ConcentratorRoute]) -> InventoryDevice:
    if not isinstance(entry, Mapping):
        raise ValueError(f"inventory meter entry {entry!r} is not an object")
    address_keys = {k: v for k, v in entry.items()
                    if k not in ("route", "groups", "transformer", "feeder")}
    concentrator = concentrators.get(entry.get("route"))
    if concentrator is not None or "physical_address" in address_keys:
        # Reached through a concentrator: its host, port and network id are the meter's.
        mrid = entry.get("mrid")
        if concentrator is None:
            raise ValueError(f"meter {mrid}: a physical_address needs a route of kind "
                             '"concentrator" with its host, listed under "routes"')
        if "physical_address" not in address_keys:
            raise ValueError(f"meter {mrid}: its route {concentrator.name} is a concentrator; "
                             "the meter needs its physical_address there")
        for key in ("host", "port", "network_id"):
            given, reached = address_keys.get(key), getattr(concentrator, key)
            if given is not None and given != reached:
                raise ValueError(f"meter {mrid}: {key} {given!r} is not its concentrator "
                                 f"{concentrator.name}'s ({reached!r})")
            address_keys[key] = reached
    address = DeviceAddress.from_inventory(address_keys)
    groups = entry.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise ValueError(f"meter {address.mrid}: groups must be a list of group names")
    route = entry.get("route")
    if route is not None and not (isinstance(route, str) and route):
        raise ValueError(f"meter {address.mrid}: route must be a route's name")
    network = {}
    for key in ("transformer", "feeder"):
        value = entry.get(key)
        if value is not None and not (isinstance(value, str) and 0 < len(value) <= 64):
            raise ValueError(f"meter {address.mrid}: {key} must be a name of 1 to 64 characters")
        network[key] = value
    return InventoryDevice(address, route, tuple(dict.fromkeys(groups)), **network)


def _group(entry: Any) -> tuple[GroupEntry, list[str]]:
    """A top-level group: {"name"?, "mrid"?, "members"?: [meter mRID, ...]}, one of name/mrid."""
    _only(entry, {"name", "mrid", "members"}, "a group")
    name = entry.get("name") or entry.get("mrid")
    if not isinstance(name, str) or not name:
        raise ValueError(f"group {entry!r} has neither name nor mrid")
    members = entry.get("members", [])
    if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
        raise ValueError(f"group {name}: members must be a list of meter mRIDs")
    return GroupEntry(name, entry.get("mrid")), members


def _add_members(devices: list[InventoryDevice], members: Mapping[str, list[str]]):
    """The devices with the groups that list them as members added to their own."""
    extra: dict[str, list[str]] = {}
    known = {d.address.mrid for d in devices}
    for name, listed in members.items():
        for mrid in listed:
            if mrid not in known:
                raise ValueError(f"group {name}: meter {mrid} is not in the inventory")
            extra.setdefault(mrid, []).append(name)
    return [InventoryDevice(d.address, d.route,
                            tuple(dict.fromkeys(d.groups + tuple(extra.get(d.address.mrid, ())))),
                            d.transformer, d.feeder)
            for d in devices]


def _usage_point(entry: Any) -> UsagePointEntry:
    _only(entry, {"mrid", "name", "meters"}, "a usage point")
    if not isinstance(entry.get("mrid"), str):
        raise ValueError(f"usage point {entry!r} has no mrid")
    meters = []
    for served in _list(entry, "meters"):
        where = f"usage point {entry['mrid']}"
        # "meter" and "mrid" are two spellings of the serving meter's mRID; one of them.
        _only(served, {"meter", "mrid", "from", "to"}, f"a meter of {where}")
        meter = served.get("meter", served.get("mrid"))
        if ("meter" in served) == ("mrid" in served) or not isinstance(meter, str) \
                or "from" not in served:
            raise ValueError(f"{where}: each meter needs \"meter\" (or \"mrid\", its mRID) "
                             f"and \"from\"")
        meters.append(ServedPeriod(meter, _time(served["from"], where),
                                   _time(served.get("to"), where)))
    return UsagePointEntry(entry["mrid"], entry.get("name"), tuple(meters))


def _entry(kind, entry: Any, what: str):
    names = set(kind.__dataclass_fields__)
    _only(entry, names, f"a {what}")
    if not isinstance(entry.get("name"), str):
        raise ValueError(f"{what} {entry!r} has no name")
    return kind(**entry)


def _time(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{where}: {value!r} has no time zone (write Z for UTC)")
    return parsed


def _list(document: Mapping, key: str) -> list:
    value = document.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f'the inventory\'s "{key}" is not a list')
    return value


def _only(entry: Any, known: set[str], what: str) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{what} is not an object: {entry!r}")
    unknown = set(entry) - known
    if unknown:
        raise ValueError(f"{what} has unknown keys {sorted(unknown)} (known: {sorted(known)})")


def _unique(values: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"the inventory lists {what} {value} twice")
        seen.add(value)


def _no_overlap(periods: Sequence[ServedPeriod], message: str) -> None:
    for before, after in zip(periods, periods[1:]):
        if before.served_to is None or before.served_to > after.served_from:
            raise ValueError(f"{message}: {before.served_from.isoformat()} .. "
                             f"{before.served_to.isoformat() if before.served_to else 'now'} "
                             f"overlaps {after.served_from.isoformat()}")
