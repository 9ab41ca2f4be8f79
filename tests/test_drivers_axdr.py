"""The client's A-XDR decoder: arrays of same-shaped elements (profile buffers) take a fast
path that must decode exactly what the general decoder does, and refuse exactly what it refuses.
The simulator's own encoder (fixtures/axdr.py, independent code) makes the inputs."""
import random

import pytest

from cimhes.drivers import axdr
from cimhes.fixtures import axdr as sim
from cimhes.fixtures.axdr import Data, Tag


def general(data: bytes):
    """decode_data with the fast path switched off."""
    saved, axdr._UNIFORM_MIN = axdr._UNIFORM_MIN, 10 ** 9
    try:
        return axdr.decode_data(data)
    finally:
        axdr._UNIFORM_MIN = saved


def outcome(decode, data: bytes):
    try:
        return "value", decode(data)
    except axdr.AxdrError:
        return "refused"


def element(rnd: random.Random, kind: int) -> Data:
    if kind == 0:  # a load profile row
        return Data(Tag.STRUCTURE, (Data(Tag.OCTET_STRING, rnd.randbytes(12)),
                                    Data(Tag.DOUBLE_LONG_UNSIGNED, rnd.randrange(2 ** 32)),
                                    Data(Tag.DOUBLE_LONG_UNSIGNED, rnd.randrange(2 ** 32))))
    if kind == 1:
        return Data(Tag.LONG_UNSIGNED, rnd.randrange(65536))
    if kind == 2:  # shapes that differ from one element to the next
        return rnd.choice([Data(Tag.UNSIGNED, 3), Data(Tag.LONG, -4),
                           Data(Tag.OCTET_STRING, b"ab" * rnd.randrange(3))])
    if kind == 3:  # scaler_unit-like
        return Data(Tag.STRUCTURE, (Data(Tag.INTEGER, rnd.randrange(-128, 128)),
                                    Data(Tag.ENUM, rnd.randrange(256))))
    return Data(Tag.STRUCTURE, (Data(Tag.LONG_UNSIGNED, 8), Data(Tag.OCTET_STRING, bytes(6)),
                                Data(Tag.INTEGER, 2), Data(Tag.LONG_UNSIGNED, 0)))


@pytest.mark.parametrize("kind", range(5))
def test_the_fast_path_decodes_and_refuses_as_the_general_decoder(kind):
    rnd = random.Random(kind)
    for _ in range(300):
        encoded = sim.encode(Data(Tag.ARRAY, tuple(element(rnd, kind)
                                                   for _ in range(rnd.randrange(40)))))
        assert axdr.decode_data(encoded) == general(encoded)
        damaged = bytearray(encoded)
        damaged[rnd.randrange(len(damaged))] = rnd.randrange(256)
        assert outcome(axdr.decode_data, bytes(damaged)) == outcome(general, bytes(damaged))
        assert outcome(axdr.decode_data, encoded[:-1]) == "refused"


def test_a_profile_buffer_takes_the_fast_path():
    rows = sim.encode(Data(Tag.ARRAY, tuple(element(random.Random(n), 0) for n in range(96))))
    fast = axdr._uniform_array(rows, 2, 96)
    assert fast is not None and fast[1] == len(rows)
    assert fast[0] == general(rows)
    assert all(isinstance(row, list) and len(row) == 3 for row in fast[0])
