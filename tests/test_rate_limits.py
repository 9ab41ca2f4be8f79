"""Rate limits on controls: per user and per device group, sliding windows, and the gate a
control service calls, which refuses with one 3.2 Error per device and audits it."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from cimhes.cim.message import ErrorCode
from cimhes.endpoints.site import HeadEnd, HeadEndSettings
from cimhes.engine.rate_limits import ControlLimit, ControlRateLimiter


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_user_limit_admits_count_per_window_and_then_again_as_the_window_slides():
    clock = Clock()
    limiter = ControlRateLimiter([ControlLimit("disconnect", "user", 3, 60)], clock)
    devices = [(f"m{i}", "north") for i in range(5)]
    admitted, refused = limiter.admit("disconnect", "ann", devices)
    assert admitted == ["m0", "m1", "m2"]
    assert [r.mrid for r in refused] == ["m3", "m4"]
    assert refused[0].retry_after == pytest.approx(60)

    clock.now += 30
    assert limiter.admit("disconnect", "ann", [("m3", "north")])[0] == []
    assert limiter.admit("disconnect", "bob", [("m3", "north")])[0] == ["m3"]  # another user
    assert limiter.admit("connect", "ann", [("m3", "north")])[0] == ["m3"]  # another kind
    clock.now += 30  # the first three are a minute old now
    assert limiter.admit("disconnect", "ann", devices[3:])[0] == ["m3", "m4"]


def test_a_group_limit_counts_every_users_controls_in_that_group():
    clock = Clock()
    limiter = ControlRateLimiter([ControlLimit("disconnect", "user", 10, 60),
                                  ControlLimit("disconnect", "group", 2, 60)], clock)
    assert limiter.admit("disconnect", "ann", [("a", "north")])[0] == ["a"]
    assert limiter.admit("disconnect", "bob", [("b", "north"), ("c", "north"),
                                               ("d", "south")])[0] == ["b", "d"]
    (refusal,) = limiter.admit("disconnect", "cid", [("e", "north")])[1]
    assert refusal.limit.scope == "group"
    # A refused device is not counted: bob's user window holds two, not three.
    assert limiter.admit("disconnect", "bob", [(f"s{i}", "west") for i in range(9)])[0] == \
        ["s0", "s1"]


def test_limits_are_written_kind_scope_count_per_seconds():
    assert ControlLimit.parse("disconnect:user:10/60") == ControlLimit("disconnect", "user", 10, 60)
    assert ControlLimit.parse("load-limit:group:5/3600").window == 3600
    for bad in ("disconnect:city:1/60", "disconnect:user:0/60", "disconnect:user:ten/60", ""):
        with pytest.raises(ValueError):
            ControlLimit.parse(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        ControlLimit.from_config({"control": "connect", "scope": "user", "count": 1, "per": 2})


@pytest.fixture
def head_end(tmp_path):
    head_end = HeadEnd(reactor, HeadEndSettings(
        database_url=f"sqlite:///{tmp_path / 'cimhes.sqlite'}",
        secret_key_file=str(tmp_path / "secret.key"),
        control_limits=(ControlLimit("disconnect", "user", 2, 60),)), [])
    yield head_end
    head_end.store_runner.stop()
    head_end.store.close()


@pytest_twisted.inlineCallbacks
def test_the_gate_refuses_a_disconnect_beyond_the_limit_with_3_2_per_device_and_audits(head_end):
    gate = head_end.control_gate
    devices = [("m1", None), ("m2", None), ("m3", None)]
    admitted, errors = gate.admit("disconnect", "ops", devices, source="127.0.0.9",
                                  correlation_id="c-9")
    assert admitted == ["m1", "m2"]
    (error,) = errors
    assert error.code == ErrorCode.CONTROL_RATE_LIMITED.value
    assert (error.id, error.object_type) == ("m3", "EndDevice")
    assert "at most 2 disconnect controls per 60 s per user" in error.reason
    for mrid, outcome in (("m1", "success"), ("m2", "failure")):
        gate.record_outcome("disconnect", "ops", mrid, outcome, correlation_id="c-9")
    yield head_end.store_runner.call(lambda: None)
    trail = [(e.actor, e.action, e.outcome, e.subject, e.correlation_id)
             for e in head_end.users.audit_entries()]
    assert trail == [("ops", "control.disconnect", "refused", "m3", "c-9"),
                     ("ops", "control.disconnect", "success", "m1", "c-9"),
                     ("ops", "control.disconnect", "failure", "m2", "c-9")]
