"""The C parsers of bytes that come from other processes never crash and
accept exactly the well-formed inputs (hypothesis: >= 10,000 cases each)."""

import struct

from aiote._native import ffi, lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_NICS, ADDR_MAX = lib.AIOTE_MAX_NICS, 256
FUZZ = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_addrs(b: bytes) -> int:
    return lib.aiote_check_addrs(b, len(b))


def check_message(b: bytes):
    off, ln = ffi.new("uint64_t*"), ffi.new("uint64_t*")
    rc = lib.aiote_check_message(b, len(b), off, ln)
    return rc, int(off[0]), int(ln[0])


def addr_blob(addrs):
    return bytes([len(addrs)]) + b"".join(struct.pack("<H", len(a)) + a for a in addrs)


def message(addrs, payload):
    src = addr_blob(addrs)
    return struct.pack("<IIII", 0x6169 | (1 << 16), len(src), len(payload), 0) + src + payload


addresses = st.lists(st.binary(min_size=1, max_size=ADDR_MAX), min_size=1, max_size=MAX_NICS)


@FUZZ
@given(addresses)
def test_valid_address_lists(addrs):
    assert check_addrs(addr_blob(addrs)) == len(addrs)


@FUZZ
@given(addresses, st.binary(max_size=2048))
def test_valid_messages(addrs, payload):
    b = message(addrs, payload)
    rc, off, ln = check_message(b)
    assert rc == 0 and b[off:off + ln] == payload


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(b):
    assert check_addrs(b) < 0 or b[0] >= 1
    assert check_message(b)[0] <= 0


@FUZZ
@given(addresses, st.binary(max_size=64), st.data())
def test_mutated(addrs, payload, data):
    for good in (addr_blob(addrs), message(addrs, payload)):
        b = bytearray(good)
        for _ in range(data.draw(st.integers(1, 3))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(b)))
        for candidate in (bytes(b), bytes(b[:cut])):
            rc = check_addrs(candidate)
            assert rc < 0 or 1 <= rc <= MAX_NICS
            rc, off, ln = check_message(candidate)
            assert rc < 0 or off + ln == len(candidate)


def test_edge_cases():
    assert check_addrs(b"") < 0
    assert check_addrs(b"\x00") < 0  # no NICs
    assert check_addrs(bytes([MAX_NICS + 1])) < 0
    assert check_addrs(b"\x01\x00\x00") < 0  # zero-length address
    assert check_addrs(b"\x01" + struct.pack("<H", ADDR_MAX + 1) + bytes(ADDR_MAX + 1)) < 0
    assert check_addrs(b"\x01\x02\x00ab") == 1
    assert check_addrs(b"\x01\x02\x00abc") < 0  # trailing byte
    assert check_message(message([b"a"], b""))[0] == 0
    assert check_message(message([b"a"], b"x")[:-1])[0] < 0


# carried writes (native/src/carry.c): u32 magic, u32 count, u64 seq, u32 imm, u32 flags, then
# count x (u64 key, u64 remote address, u32 length), then the lengths' bytes
CARRY_MAGIC, CARRY_MAX = 0x59525243, 1024


def check_carry(b: bytes) -> int:
    n = ffi.new("uint32_t*")
    rc = lib.aiote_check_carry(b, len(b), n)
    return rc if rc < 0 else int(n[0])


def carried(writes, seq=1, imm=0, flags=1, count=None):
    ents = b"".join(struct.pack("<QQI", key, addr, len(data)) for key, addr, data in writes)
    return (struct.pack("<IIQII", CARRY_MAGIC, len(writes) if count is None else count, seq, imm, flags) + ents
            + b"".join(data for _, _, data in writes))


writes = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=64)),
                  min_size=1, max_size=40)


@FUZZ
@given(writes, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.sampled_from([0, 1]))
def test_valid_carried(ws, seq, imm, flags):
    assert check_carry(carried(ws, seq, imm, flags)) == len(ws)


@FUZZ
@given(writes, st.data())
def test_mutated_carried(ws, data):
    b = bytearray(carried(ws))
    for _ in range(data.draw(st.integers(1, 3))):
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(b)))
    for candidate in (bytes(b), bytes(b[:cut]), bytes(b) + b"\0"):
        rc = check_carry(candidate)
        assert rc < 0 or 1 <= rc <= CARRY_MAX
        if rc > 0:  # whatever parses accounts for every byte
            lens = [struct.unpack_from("<I", candidate, 24 + 20 * i + 16)[0] for i in range(rc)]
            assert 24 + 20 * rc + sum(lens) == len(candidate)


@FUZZ
@given(st.binary(max_size=300))
def test_random_carried(b):
    assert check_carry(b) < 0 or b[:4] == struct.pack("<I", CARRY_MAGIC)


def test_carried_edge_cases():
    one = [(1, 2, b"abc")]
    assert check_carry(carried(one)) == 1
    assert check_carry(carried(one)[:-1]) < 0  # a byte short
    assert check_carry(carried(one) + b"x") < 0  # a byte over
    assert check_carry(carried(one, flags=2)) < 0  # unknown flag
    assert check_carry(carried(one, count=0)) < 0
    assert check_carry(carried(one, count=2)) < 0  # more entries than bytes
    assert check_carry(carried([(1, 2, b"")] * CARRY_MAX)) == CARRY_MAX
    assert check_carry(carried([(1, 2, b"")] * (CARRY_MAX + 1))) < 0
    # lengths that sum past 2**32 must not wrap
    huge = struct.pack("<IIQII", CARRY_MAGIC, 2, 0, 0, 0) + struct.pack("<QQI", 0, 0, 2**32 - 1) * 2
    assert check_carry(huge + b"\0\0") < 0
    assert check_carry(b"") < 0
