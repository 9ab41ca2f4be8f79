"""The store's thread gives way to the reactor's turns (engine/reactor_turns.py): a unit of work
waits while the reactor is between two polls, and starts once it polls again."""
from __future__ import annotations

import socket
import threading

import pytest
from twisted.internet import reactor as process_reactor
from twisted.internet.epollreactor import EPollReactor

from cimhes.engine.reactor_turns import FIRST_LANE_BUDGET, ReactorTurns
from cimhes.engine.ready_sockets import bound_events_per_turn
from cimhes.engine.store import Store, StoreRunner

from .test_ready_sockets import Reader


class Poller:
    """A reactor's poller whose poll returns when the test lets it."""

    def __init__(self):
        self.release = threading.Event()
        self.registered = []

    def poll(self, timeout=-1, maxevents=-1):
        self.release.wait(10)
        self.release.clear()
        return []

    def register(self, fd, events):
        self.registered.append((fd, events))


class PollingReactor:
    def __init__(self):
        self._poller = Poller()


def test_a_thread_waits_while_the_reactor_is_in_a_turn_and_goes_on_when_it_polls():
    fake = PollingReactor()
    poller = fake._poller
    turns = ReactorTurns.of(fake)
    assert ReactorTurns.of(fake) is turns  # one watcher per reactor
    fake._poller.register(3, 1)  # the reactor's other uses of its poller pass through
    assert poller.registered == [(3, 1)]

    turns.give_way(10)  # the reactor has not polled yet: not in a turn, nobody waits
    assert turns.waits == 0

    # The reactor's loop: its poll returns (a turn begins), the turn runs, it polls again.
    poller.release.set()
    first = threading.Thread(target=fake._poller.poll)
    first.start()
    first.join(10)
    assert turns.in_turn

    gave_way = threading.Event()
    store = threading.Thread(target=lambda: (turns.give_way(10), gave_way.set()))
    store.start()
    store.join(0.3)
    assert not gave_way.is_set()  # still in the reactor's turn
    assert turns.waits == 1

    second = threading.Thread(target=fake._poller.poll)  # the turn ends: the reactor polls
    second.start()
    store.join(10)
    assert gave_way.is_set()
    assert not turns.in_turn
    poller.release.set()
    second.join(10)


def test_the_wait_is_bounded_when_the_reactor_never_polls():
    fake = PollingReactor()
    turns = ReactorTurns.of(fake)
    fake._poller.release.set()
    fake._poller.poll()  # a turn begins and never ends
    assert turns.in_turn
    turns.give_way(0.01)  # returns: the store's thread is never held for good
    assert turns.waits == 1


def test_a_reactor_without_a_poller_is_not_watched():
    assert ReactorTurns.of(object()) is None


def test_the_store_runner_watches_the_running_reactor(tmp_path):
    # The process's reactor (epoll on Linux): StoreRunner's units give way to its turns.
    store = Store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    runner = StoreRunner(process_reactor, store)
    try:
        assert runner._turns is ReactorTurns.of(process_reactor) is not None
    finally:
        runner.stop()
        store.engine.dispose()


def _in_a_turn(fake) -> ReactorTurns:
    turns = ReactorTurns.of(fake)
    fake._poller.release.set()
    fake._poller.poll()  # a turn begins (and, in these tests, never ends)
    return turns


def test_a_bulk_unit_always_gives_way_a_first_lane_one_only_past_the_budget():
    turns = _in_a_turn(PollingReactor())
    turns.before_work(bulk=False)  # nothing done in this turn yet: a request's lookup goes
    assert turns.waits == 0
    turns.after_work(turns.turn, FIRST_LANE_BUDGET / 2)
    turns.before_work(bulk=False)  # still within the budget
    assert turns.waits == 0
    turns.after_work(turns.turn, FIRST_LANE_BUDGET / 2)
    turns.before_work(bulk=False)  # the store's thread had its share of this turn
    assert turns.waits == 1
    turns.before_work(bulk=True)  # a bulk unit gives way whatever was done before it
    assert turns.waits == 2


def test_the_budget_is_per_turn():
    fake = PollingReactor()
    turns = _in_a_turn(fake)
    turns.after_work(turns.turn, FIRST_LANE_BUDGET * 3)
    fake._poller.release.set()
    fake._poller.poll()  # the reactor polled and began another turn
    turns.before_work(bulk=False)
    assert turns.waits == 0


@pytest.mark.parametrize("watched_first", [True, False])
def test_the_watch_and_the_ready_socket_bound_compose_in_either_order(watched_first):
    pairs = [socket.socketpair() for _ in range(12)]
    reactor = EPollReactor()
    served: list = []
    try:
        for reader, writer in pairs:
            writer.send(b"x")
            reactor.addReader(Reader(served, reader))
        if watched_first:
            turns = ReactorTurns.of(reactor)
            assert bound_events_per_turn(reactor, 5)
        else:
            assert bound_events_per_turn(reactor, 5)
            turns = ReactorTurns.of(reactor)
        reactor.doIteration(0)
        assert len(served) == 5  # bounded
        assert turns.in_turn and turns.turn == 1  # and watched
        reactor.doIteration(0)
        reactor.doIteration(0)
        assert len(served) == 12 and turns.turn == 3
    finally:
        reactor._poller.close()
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_a_poll_that_returns_at_once_does_not_end_the_wait():
    # Sockets ready: the reactor's poll returns at once (16 of them a turn, engine/ready_sockets.py)
    # and the next turn begins; the store's thread waits on for a poll that waits.
    fake = PollingReactor()
    poller = fake._poller
    turns = _in_a_turn(fake)
    gave_way = threading.Event()
    store = threading.Thread(target=lambda: (turns.give_way(10), gave_way.set()))
    store.start()
    store.join(0.2)
    for _ in range(3):  # three turns back to back, each poll returning at once
        poller.release.set()
        fake._poller.poll()
        store.join(0.1)
        assert not gave_way.is_set()
    waiting = threading.Thread(target=fake._poller.poll)  # this poll waits: the reactor is idle
    waiting.start()
    store.join(10)
    assert gave_way.is_set()
    poller.release.set()
    waiting.join(10)
