import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiote import DescriptorError, EngineAddress, MrDescriptor


def make(**kw):
    args = dict(provider="tcp;ofi_rxm", addrs=(b"\x02\x00" + bytes(14),), base=0x7F0000001000, length=4096,
                keys=(0xDEADBEEFCAFEF00D,))
    args.update(kw)
    return MrDescriptor(**args)


def test_roundtrip_and_pickle():
    d = make()
    assert MrDescriptor.from_bytes(d.to_bytes()) == d
    assert pickle.loads(pickle.dumps(d)) == d
    a = d.address
    assert EngineAddress.from_bytes(a.to_bytes()) == a


def test_repr_hides_key():
    assert "deadbeef" not in repr(make()).lower()


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"x", "trailing"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + b"\x09" + b[5:], "version"),
    (lambda b: b[:5] + b"\x00" + b[6:], "NIC count"),
    (lambda b: b[:5] + b"\x20" + b[6:], "NIC count"),
    (lambda b: b"", "truncated"),
])
def test_malformed_bytes_raise_descriptor_error(mutate, match):
    with pytest.raises(DescriptorError, match=match):
        MrDescriptor.from_bytes(mutate(make().to_bytes()))


def test_wrong_types():
    with pytest.raises(DescriptorError):
        MrDescriptor.from_bytes("not bytes")  # type: ignore[arg-type]
    with pytest.raises(DescriptorError):
        MrDescriptor.from_bytes(make().address.to_bytes())  # an address is not a descriptor
    with pytest.raises(DescriptorError):
        make(length=0)
    with pytest.raises(DescriptorError):
        make(keys=(1, 2))


@settings(max_examples=5000, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    for parse in (MrDescriptor.from_bytes, EngineAddress.from_bytes):
        try:
            parse(data)
        except DescriptorError:
            pass


@settings(max_examples=5000, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid(data):
    raw = bytearray(make().to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        d = MrDescriptor.from_bytes(bytes(raw))
    except DescriptorError:
        return
    assert MrDescriptor.from_bytes(d.to_bytes()) == d
