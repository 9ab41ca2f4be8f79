"""A reactor turn handles at most EVENTS_PER_TURN ready sockets; the others are served by the
next turns, none forgotten."""
from __future__ import annotations

import socket

import pytest
from twisted.internet.epollreactor import EPollReactor

from cimhes.engine.ready_sockets import BoundedPoller, bound_events_per_turn


class Reader:
    """A socket with data waiting, as the reactor sees it: doRead drains it and says so."""

    def __init__(self, served: list, sock: socket.socket) -> None:
        self.served = served
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.sock.recv(100)
        self.served.append(self)

    def logPrefix(self) -> str:
        return "Reader"

    def connectionLost(self, reason) -> None:
        pass


@pytest.fixture
def ready_sockets():
    pairs = [socket.socketpair() for _ in range(12)]
    for _, writer in pairs:
        writer.send(b"x")
    yield [reader for reader, _ in pairs]
    for pair in pairs:
        for sock in pair:
            sock.close()


def _reactor_with(readers_of, served):
    reactor = EPollReactor()
    readers = [Reader(served, sock) for sock in readers_of]
    for reader in readers:
        reactor.addReader(reader)
    return reactor, readers


def test_one_turn_serves_at_most_the_bound_and_the_next_turns_the_rest(ready_sockets):
    served: list = []
    reactor, readers = _reactor_with(ready_sockets, served)
    try:
        assert bound_events_per_turn(reactor, 5)
        reactor.doIteration(0)
        assert len(served) == 5
        reactor.doIteration(0)
        reactor.doIteration(0)
        assert sorted(map(id, served)) == sorted(map(id, readers))  # each once, none left out
    finally:
        reactor._poller.close()


def test_without_the_bound_one_turn_serves_every_ready_socket(ready_sockets):
    served: list = []
    reactor, readers = _reactor_with(ready_sockets, served)
    try:
        reactor.doIteration(0)
        assert len(served) == len(readers)
    finally:
        reactor._poller.close()


def test_the_bound_can_be_set_again_and_must_be_positive(ready_sockets):
    reactor = EPollReactor()
    try:
        assert bound_events_per_turn(reactor, 3)
        assert bound_events_per_turn(reactor, 7)
        assert isinstance(reactor._poller, BoundedPoller) and reactor._poller.events == 7
        assert not isinstance(reactor._poller.poller, BoundedPoller)
        with pytest.raises(ValueError, match="at least 1"):
            bound_events_per_turn(reactor, 0)
    finally:
        reactor._poller.close()


def test_the_bound_applies_over_a_poller_another_part_already_wraps(ready_sockets):
    class Watching:
        """Another part's wrapper of the reactor's epoll (it counts polls, passes them on)."""

        def __init__(self, poller):
            self.wrapped, self.polls = poller, 0

        def poll(self, *args):
            self.polls += 1
            return self.wrapped.poll(*args)

        def __getattr__(self, name):
            return getattr(self.wrapped, name)

    served: list = []
    reactor, readers = _reactor_with(ready_sockets, served)
    watching = Watching(reactor._poller)
    reactor._poller = watching
    try:
        assert bound_events_per_turn(reactor, 4)
        reactor.doIteration(0)
        assert len(served) == 4 and watching.polls == 1
    finally:
        watching.wrapped.close()


def test_a_reactor_that_is_not_epoll_is_left_alone():
    class OtherReactor:
        _poller = object()

    other = OtherReactor()
    poller = other._poller
    assert not bound_events_per_turn(other)
    assert other._poller is poller
