"""GPU-path logic that needs no GPU: descriptor extension, chunking, commit parsing."""

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiote
from aiote import cuda
from aiote.descriptor import CudaExt
from aiote.gpu import Element, _merge, check_elements, chunk_elements


def ext(**kw):
    base = dict(mode="staged", device=1, token=0xDEADBEEF12345678, host=b"h" * 16, pid=1234,
                device_uuid=b"u" * 16, ipc_handle=b"\x01" * 64, ipc_offset=4096)
    base.update(kw)
    return CudaExt(**base)


def desc(cuda_ext=None, length=1 << 20):
    return aiote.MrDescriptor("shm", (b"fi_shm://1:0:0",), 0x1000, length, (42,), cuda_ext)


def test_cuda_descriptor_round_trip():
    d = desc(ext())
    b = d.to_bytes()
    assert b[4] == 2  # version 2: the CUDA extension follows
    assert aiote.MrDescriptor.from_bytes(b) == d
    assert desc().to_bytes()[4] == 1  # host regions keep version 1
    assert "cuda=staged:1" in repr(d) and "deadbeef" not in repr(d).lower()
    assert ext(ipc_handle=bytes(64)).has_ipc is False
    # a pooled region (no mirror: the bounce pools) says so on the wire, mode byte 3
    p = desc(ext(mode="pooled"))
    assert aiote.MrDescriptor.from_bytes(p.to_bytes()).cuda.mode == "pooled"
    assert p.to_bytes() != d.to_bytes()


@pytest.mark.parametrize("bad", [dict(mode="weird"), dict(device=300), dict(host=b"x"), dict(ipc_handle=b"1"),
                                 dict(token=-1), dict(pid=1 << 33)])
def test_cuda_ext_checks_fields(bad):
    with pytest.raises(aiote.DescriptorError):
        ext(**bad)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 140))
def test_forged_cuda_descriptors_are_typed_errors(junk, cut):
    good = desc(ext()).to_bytes()
    for data in (good[:cut] + junk, good[:cut], good + junk[:3]):
        try:
            aiote.MrDescriptor.from_bytes(data)
        except aiote.DescriptorError:
            pass


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=40), st.integers(1, 4096))
def test_chunks_cover_every_byte_once(lengths, chunk):
    d = desc()
    es, off = [], 0
    for n in lengths:
        es.append(Element(d, off, off * 2, n))
        off += n
    chunks = chunk_elements(es, chunk)
    got = sorted((s, dd, n) for c in chunks for (s, dd, n, _, _) in c if n)
    want = []
    for e in es:
        if e.length <= chunk:
            want.append((e.src_off, e.dst_off, e.length))
        else:
            want += [(e.src_off + o, e.dst_off + o, min(chunk, e.length - o)) for o in range(0, e.length, chunk)]
    assert got == sorted(w for w in want if w[2])
    # exactly one "last part" per element: that is where its imm is counted
    assert sum(1 for c in chunks for p in c if p[4]) == len(es)
    for c in chunks:
        assert sum(p[2] for p in c) <= max(chunk, max(lengths)) and len(c) <= 2000


def test_merge_joins_contiguous_ranges():
    assert _merge([(0, 100, 10), (10, 110, 5), (20, 200, 1), (21, 201, 0), (21, 201, 4)]) == [
        (0, 100, 15), (20, 200, 5)]


def test_element_bounds():
    d = desc(length=100)
    check_elements(100, [Element(d, 0, 0, 100)])
    with pytest.raises(aiote.OutOfBounds) as ei:
        check_elements(100, [Element(d, 0, 0, 10), Element(d, 95, 0, 10)])
    assert ei.value.index == 1
    with pytest.raises(aiote.OutOfBounds):
        check_elements(100, [Element(d, 0, 91, 10)])


def test_host_buffers_are_not_cuda():
    assert cuda.cuda_pointer(bytearray(8)) is None
    assert len(cuda.boot_id()) == 16


async def test_bad_gpu_options():
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine("shm", gpu="fast")
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine("shm", gpu_chunk=10)


async def test_forged_commits_are_dropped(aiote_engine_pair):
    """A commit message for no region, or out of bounds, changes nothing and counts nothing."""
    a, b = aiote_engine_pair
    import struct

    for body in (b"junk", struct.pack("<4sQIII", b"AGC1", 1, 5, 1, 0),
                 struct.pack("<4sQIII", b"AGC1", 1, 5, 1, 1) + struct.pack("<QQ", 0, 1 << 40)):
        await a._send_ctrl(b.address if isinstance(b.address, aiote.EngineAddress)
                           else aiote.EngineAddress.from_bytes(b.address), body)
    # a normal message after them arrives; the forged ones never reach recv() or the counter
    await a.send(b.address, b"after")
    assert (await b.recv())[0] == b"after"
    assert b.imms.pending(5) == 0


@pytest.mark.skipif(cuda.available(), reason="checks the machine without a CUDA driver")
async def test_native_cuda_calls_without_driver_are_typed_errors(aiote_engine):
    """The C core's CUDA entry points refuse cleanly where libcuda.so.1 is missing."""
    from aiote._core import error_for, ffi, lib

    assert lib.aiote_cuda_load() == -lib.AIOTE_E_CUDA
    assert b"libcuda" in ffi.string(lib.aiote_last_error())
    h = aiote_engine._handle()
    bad = ffi.new("uint64_t*")
    cps = ffi.new("aiote_copy[1]")
    rc = lib.aiote_submit_cuda(h, 1, 1, 1, 0, 0, cps, 1, 0, ffi.NULL, 0, 0, 0, bad)
    assert rc == -lib.AIOTE_E_CUDA
    assert isinstance(error_for(rc, "x"), cuda.CudaError)
    assert lib.aiote_cuda_arrive(h, 1, 1, cps, 1, 5, 1) == -lib.AIOTE_E_CUDA
    assert aiote_engine.imms.pending(5) == 0


async def test_native_cuda_bad_arguments_are_refused(aiote_engine):
    """Null contexts, streams, lists and addresses are refused before the driver sees them
    (or, without a driver, refused as CUDA errors); nothing is queued, nothing crashes."""
    from aiote._core import ffi, lib

    h = aiote_engine._handle()
    bad = ffi.new("uint64_t*")
    mr = aiote_engine.register(bytearray(64))
    ok = {-lib.AIOTE_E_INVAL} if cuda.available() else {-lib.AIOTE_E_CUDA}
    cps = ffi.new("aiote_copy[1]")  # null addresses
    assert lib.aiote_submit_cuda(h, 1, 0, 1, 0, 0, ffi.NULL, 0, mr._mr_id(), ffi.NULL, 0, 0, 0, bad) in ok
    assert lib.aiote_submit_cuda(h, 1, 1, 0, 0, 0, ffi.NULL, 0, mr._mr_id(), ffi.NULL, 0, 0, 0, bad) in ok
    assert lib.aiote_submit_cuda(h, 1, 1, 1, 0, 0, ffi.NULL, 3, mr._mr_id(), ffi.NULL, 0, 0, 0, bad) in ok
    assert lib.aiote_submit_cuda(h, 1, 1, 1, 0, 0, ffi.NULL, 0, mr._mr_id(), ffi.NULL, 2, 0, 0, bad) in ok
    assert lib.aiote_cuda_arrive(h, 1, 1, cps, 1, 5, 1) in ok
    assert lib.aiote_cuda_arrive(h, 0, 1, ffi.NULL, 0, 5, 1) in ok
    # the one-copy entry point: same checks (null context, stream, address)
    assert lib.aiote_submit_cuda_one(h, 1, 0, 1, 0, 0, 1, 1, 8, mr._mr_id(), 0, 0, 0) in ok
    assert lib.aiote_submit_cuda_one(h, 1, 1, 0, 0, 0, 1, 1, 8, mr._mr_id(), 0, 0, 0) in ok
    assert lib.aiote_submit_cuda_one(h, 1, 1, 1, 0, 0, 0, 1, 8, mr._mr_id(), 0, 0, 0) in ok
    assert lib.aiote_submit_cuda_one(h, 1, 1, 1, 0, 0, 1, 0, 8, mr._mr_id(), 0, 0, 0) in ok
    mr.close()  # no reference was left behind
    assert aiote_engine.stats()["ops_submitted"] == 0


def test_vmm_kind_round_trips_and_is_checked():
    d = desc(ext(ipc_kind=1))
    back = aiote.MrDescriptor.from_bytes(d.to_bytes())
    assert back == d and back.cuda.ipc_kind == 1
    assert aiote.MrDescriptor.from_bytes(desc(ext()).to_bytes()).cuda.ipc_kind == 0  # legacy handles
    with pytest.raises(aiote.DescriptorError):
        ext(ipc_kind=2)
    raw = bytearray(d.to_bytes())
    i = raw.index(d.cuda.pack())
    raw[i + 2] = 7  # the kind: unknown
    with pytest.raises(aiote.DescriptorError):
        aiote.MrDescriptor.from_bytes(bytes(raw))


def test_vmm_handle_and_segment_list_parsing():
    h = cuda.VMM_HANDLE.pack(cuda.VMM_MAGIC, 9, 2, 6 << 20, 77).ljust(64, b"\0")
    assert cuda.vmm_parse_handle(h) == (9, 2, 6 << 20)
    segs = [(0, 2 << 20, 11), (2 << 20, 4 << 20, 12)]
    data = b"".join(cuda.VMM_SEG.pack(*sg) for sg in segs)
    assert cuda.vmm_parse_segments(data, 2, 6 << 20) == segs
    for bad in (b"\1" * 64, h[:63], h[:-1] + b"\1", cuda.VMM_HANDLE.pack(cuda.VMM_MAGIC, 9, 0, 1, 5).ljust(64, b"\0"),
                cuda.VMM_HANDLE.pack(cuda.VMM_MAGIC, 9, 1, 0, 5).ljust(64, b"\0")):
        with pytest.raises(ValueError):
            cuda.vmm_parse_handle(bad)
    for bad_segs, n, span in (([(0, 2, 1), (3, 1, 2)], 2, 4),   # a gap
                              ([(0, 2, 1), (1, 3, 2)], 2, 4),   # an overlap
                              ([(0, 2, 1)], 1, 4),              # short of the span
                              ([(0, 8, 1)], 1, 4),              # past it
                              ([(0, 0, 1), (0, 4, 2)], 2, 4),   # empty
                              ([(0, 4, -1)], 1, 4)):            # no fd
        with pytest.raises(ValueError):
            cuda.vmm_parse_segments(b"".join(cuda.VMM_SEG.pack(*sg) for sg in bad_segs), n, span)
    with pytest.raises(ValueError):
        cuda.vmm_parse_segments(data + b"x", 2, 6 << 20)


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.integers(1, 5), st.integers(1, 1 << 30))
def test_forged_vmm_segment_lists_are_value_errors(junk, n, span):
    try:
        segs = cuda.vmm_parse_segments(junk, n, span)
    except ValueError:
        return
    assert sum(sz for _, sz, _ in segs) == span


async def test_native_cuda_lanes_bad_arguments_are_refused(aiote_engine):
    """``aiote_submit_cuda_lanes`` (ipc_batch's copies on one stream per destination GPU)
    refuses a copy whose lane doesn't exist, a null lane list, stream or event, and a wait
    without a fork event, before anything is queued."""
    from aiote._core import ffi, lib

    h = aiote_engine._handle()
    bad = ffi.new("uint64_t*")
    mr = aiote_engine.register(bytearray(64))
    cps = ffi.new("aiote_copy[2]", [(1, 1, 8), (2, 2, 8)])
    lanes = ffi.new("uint64_t[4]", [11, 12, 13, 14])
    inval = -lib.AIOTE_E_INVAL

    def call(lane_of, arr, nlanes, wait=0, fork=0):
        return lib.aiote_submit_cuda_lanes(h, 1, 1, 1, wait, 5, cps, lane_of, 2, arr, nlanes, fork, mr._mr_id(),
                                           ffi.NULL, 0, 0, 0, bad)

    assert call(bytes([0, 2]), lanes, 2) == inval
    assert int(bad[0]) == 1 and b"lane 2" in ffi.string(lib.aiote_last_error())
    assert call(bytes([0, 1]), ffi.NULL, 2) == inval
    assert call(bytes([0, 1]), lanes, 0) == inval
    assert call(ffi.NULL, lanes, 2) == inval
    assert call(bytes([0, 1]), ffi.new("uint64_t[4]", [11, 0, 13, 14]), 2) == inval
    assert call(bytes([0, 1]), lanes, 2, wait=1) == inval  # no fork event
    mr.close()
    assert aiote_engine.stats()["ops_submitted"] == 0


def _copy_buffers():
    """A 64-byte source of a known pattern and a zeroed 64-byte destination, with their
    addresses (the fake driver's copies are memcpys between host addresses)."""
    import ctypes

    src, dst = bytearray(b"abcdefgh" * 8), bytearray(64)
    addr = [ctypes.addressof((ctypes.c_char * 64).from_buffer(b)) for b in (src, dst)]
    return src, dst, addr[0], addr[1]


async def test_lanes_batch_copies_then_writes_with_fake_cuda(aiote_engine):
    """The lanes path end to end on the fake driver (copies are memcpys): every copy lands,
    whatever its lane, and the write with the imm is posted after them."""
    from aiote.testing import fake_cuda

    fake_cuda.enable()
    try:
        from aiote._core import ffi

        src, dst, s_addr, d_addr = _copy_buffers()
        target = bytearray(32)
        tmr = aiote_engine.register(target)
        smr = aiote_engine.register(bytearray(b"X" * 32))
        lanes = ffi.new("uint64_t[6]", [101, 102, 103, 104, 105, 106])
        copies = [(d_addr + 16 * i, s_addr + 8 * i, 8) for i in range(4)]
        fut = aiote_engine._submit_cuda_to(1, 7, (0, 0), copies, smr, [(tmr.descriptor, 0, 4, 8)], 33,
                                           (bytes([0, 1, 2, 1]), lanes, 3, 99))
        await asyncio.wait_for(fut, 30)
        await asyncio.wait_for(aiote_engine.imms.wait(33, 1), 30)
        assert [bytes(dst[16 * i:16 * i + 8]) for i in range(4)] == [bytes(src[8 * i:8 * i + 8]) for i in range(4)]
        assert bytes(target[4:12]) == b"X" * 8
        tmr.close()
        smr.close()
    finally:
        fake_cuda.disable()


def test_cuda_copy_entry_point_with_fake_cuda():
    """aiote_cuda_copy (copies on a caller's stream, no op): on the fake driver every copy
    lands; null addresses and overlapping ranges are refused, nothing copied."""
    import ctypes

    from aiote._core import ffi, lib
    from aiote.testing import fake_cuda

    fake_cuda.enable()
    try:
        buf = bytearray(b"0123456789abcdef" + bytes(48))
        base = ctypes.addressof((ctypes.c_char * 64).from_buffer(buf))
        cps = ffi.new("aiote_copy[2]")
        cps[0].dst, cps[0].src, cps[0].len = base + 16, base, 8
        cps[1].dst, cps[1].src, cps[1].len = base + 32, base + 8, 8
        assert lib.aiote_cuda_copy(1, 0, cps, 2) == 0
        assert bytes(buf[16:24]) == b"01234567" and bytes(buf[32:40]) == b"89abcdef"
        before = bytes(buf)
        cps[1].dst, cps[1].src = base + 4, base  # overlaps its source
        assert lib.aiote_cuda_copy(1, 0, cps, 2) == -lib.AIOTE_E_INVAL
        assert b"overlap" in ffi.string(lib.aiote_last_error())
        cps[1].dst = 0
        assert lib.aiote_cuda_copy(1, 0, cps, 2) == -lib.AIOTE_E_INVAL
        assert lib.aiote_cuda_copy(0, 0, cps, 1) == -lib.AIOTE_E_INVAL
        assert bytes(buf) == before
    finally:
        fake_cuda.disable()


async def test_batch_plan_submit_with_fake_cuda(aiote_engine):
    """IpcBatchPlan.submit (ipc_batch with its destinations resolved ahead) on the fake driver,
    its plan filled in by hand (no GPU to map): copies to two "GPUs" go over two lanes, an
    empty copy is skipped, the writes with the imm follow; out-of-bounds offsets are refused
    typed before anything is queued."""
    from aiote._core import ffi
    from aiote.errors import OutOfBounds
    from aiote.gpu import IpcBatchPlan
    from aiote.testing import fake_cuda

    class Paths:  # what submit reads of GpuPaths
        copy_lanes = True
        stats = {"ipc_writes": 0, "lane_batches": 0}
        _lanes = {0: (ffi.new("uint64_t[4]", [101, 102, 103, 104]), [2], 99)}

        def _torch_stream(self, device):
            return 0, 0

    fake_cuda.enable()
    try:
        src, dst, s_addr, d_addr = _copy_buffers()
        target, meta = bytearray(32), bytearray(b"M" * 32)
        tmr, smr = aiote_engine.register(target), aiote_engine.register(meta)
        plan = object.__new__(IpcBatchPlan)
        plan._paths, plan._eng, plan._device, plan._src = Paths(), aiote_engine, 0, smr
        plan._bases, plan._lens, plan._lane_ids = [d_addr, d_addr + 32, d_addr + 48], [32, 16, 16], [0, 1, 1]
        plan._rds, plan._wlens, plan._src_len = [aiote_engine._rdesc(tmr.descriptor)] * 2, [32, 32], 32
        plan._ctx, plan._stream, plan._wfmt, plan._bad = 1, 7, {}, ffi.new("uint64_t*")
        with pytest.raises(OutOfBounds):
            plan.submit([(30, s_addr, 8), (0, s_addr, 0), (0, s_addr, 0)], [(0, 0, 4), (0, 4, 4)], 33)
        with pytest.raises(OutOfBounds):
            plan.submit([(0, s_addr, 8), (0, s_addr, 0), (0, s_addr, 0)], [(0, 0, 4), (30, 4, 4)], 33)
        assert aiote_engine.stats()["ops_submitted"] == 0
        fut = plan.submit([(0, s_addr, 8), (0, s_addr + 8, 8), (8, s_addr + 16, 0)], [(0, 0, 4), (4, 8, 4)], 33)
        await asyncio.wait_for(fut, 30)
        await asyncio.wait_for(aiote_engine.imms.wait(33, 2), 30)
        assert bytes(dst[:8]) == b"abcdefgh" and bytes(dst[32:40]) == b"abcdefgh" and not any(dst[56:64])
        assert bytes(target[:4]) == b"MMMM" and bytes(target[8:12]) == b"MMMM"
        assert Paths.stats == {"ipc_writes": 1, "lane_batches": 1}
        tmr.close()
        smr.close()
    finally:
        fake_cuda.disable()
