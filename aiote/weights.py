"""RL weight updates: trainer ranks write their shards straight into inference memory.

A :class:`Schedule` is computed once from two :class:`Layout` s — how the trainer
ranks hold each parameter (e.g. FSDP: dim 0 split across ranks) and how the
inference ranks hold it (e.g. tensor parallel: column/row splits, fused QKV) —
as byte runs ``(trainer staging offset, inference offset, length)``, merged
where both sides are contiguous and grouped into paged writes (one C call per
group, no Python per run).

Every update is a *round* with a version number:

1. each inference rank (:class:`WeightReceiver`) picks its idle buffer (it keeps
   two; the other one is serving) and tells every trainer that sends to it "ready
   for version v, write into buffer b" (a 16-byte write with an imm);
2. each trainer rank (:class:`WeightSender`) waits for that word from its
   receivers, casts its shards chunk by chunk into a registered staging buffer
   (bf16, or fp8 e4m3 with a per-tensor scale agreed between the trainers),
   posting each chunk's writes while the next chunk is cast;
3. an inference rank waits for the exact number of writes each trainer sends it
   (imm per (kind, version, trainer)) and only then swaps to the new buffer.

A receiver never lets a trainer into its serving buffer (it names the buffer),
so serving keeps the old weights until the round is complete, and a failed round
(trainer died, timeout) leaves them in service; the next round reuses the same
idle buffer.  A round can't start on a rank while its previous one is in flight
(:class:`~aiote.errors.UpdateInProgress`), and trainers can't start round v+1
before every receiver has finished round v (they wait for its "ready" word), so
rounds are never mixed.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .descriptor import MrDescriptor
from .errors import AioteError, InvalidArgument, UpdateFailed, UpdateInProgress
from .memory import host_buffer

if TYPE_CHECKING:
    import torch

    from .engine import TransferEngine
    from .memory import MemoryRegion

__all__ = [
    "Param", "Shard", "Replicate", "Piece", "LocalTensor", "Layout", "Schedule",
    "SenderBuffers", "ReceiverBuffers", "WeightSender", "WeightReceiver", "FP8_MAX",
]

#: Largest finite float8 e4m3fn value: fp8 scales map each tensor's absolute maximum onto it.
FP8_MAX = 448.0
_ALIGN = 64
_KIND_DATA, _KIND_READY, _KIND_AMAX = 0, 1, 2
_MAX_PAGES = 1 << 16  # pages per paged write: bounds one C submission's size


# ---------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Param:
    """A model parameter: its name and global shape."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise InvalidArgument(f"{self.name}: negative dimension in {self.shape}")


@dataclass(frozen=True)
class Shard:
    """Split along ``dim`` like ``torch.chunk``: rank r gets rows ``[r*c, (r+1)*c)``, ``c = ceil(n/world)``."""

    dim: int = 0


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole parameter."""


Box = tuple[tuple[int, int], ...]  # [lo, hi) per dimension


@dataclass(frozen=True)
class Piece:
    """Part ``box`` of parameter ``param``, placed at ``at`` (its origin) in a local tensor."""

    param: str
    box: Box
    at: tuple[int, ...]


@dataclass(frozen=True)
class LocalTensor:
    """A contiguous tensor one rank holds, made of pieces of parameters."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Layout:
    """What each rank holds: ``ranks[r]`` is rank r's list of local tensors."""

    ranks: tuple[tuple[LocalTensor, ...], ...]

    @property
    def world(self) -> int:
        return len(self.ranks)

    @classmethod
    def sharded(cls, params: Sequence[Param], world: int,
                placements: Mapping[str, Shard | Replicate] | None = None,
                fused: Mapping[str, Sequence[str]] | None = None, default: Shard | Replicate = Shard(0)) -> Layout:
        """Each parameter placed by ``placements`` (``default`` for the rest) across ``world`` ranks.

        ``fused`` maps a local tensor name to parameters concatenated along dim 0 on every
        rank, each part placed on its own (tensor parallel QKV: ``{"qkv": ["q", "k", "v"]}``
        with each of q, k, v ``Shard(0)`` gives rank r ``cat(q_r, k_r, v_r)``).
        FSDP-like trainer layouts: ``Layout.sharded(params, world)``.
        """
        if not isinstance(world, int) or world < 1:
            raise InvalidArgument(f"world must be a positive int, got {world!r}")
        placements = dict(placements or {})
        fused = {k: list(v) for k, v in (fused or {}).items()}
        by_name = {p.name: p for p in params}
        if len(by_name) != len(params):
            raise InvalidArgument("parameter names must be unique")
        for name in placements:
            if name not in by_name:
                raise InvalidArgument(f"placement for unknown parameter {name!r}")
        in_fused: dict[str, str] = {}
        for fname, parts in fused.items():
            if not parts:
                raise InvalidArgument(f"fused tensor {fname!r} has no parts")
            for part in parts:
                if part not in by_name:
                    raise InvalidArgument(f"fused tensor {fname!r}: unknown parameter {part!r}")
                if part in in_fused:
                    raise InvalidArgument(f"parameter {part!r} is fused twice")
                in_fused[part] = fname
        ranks = []
        for r in range(world):
            local: list[LocalTensor] = []
            done: set[str] = set()
            for p in params:
                if p.name in done:
                    continue
                group = fused[in_fused[p.name]] if p.name in in_fused else [p.name]
                boxes = [_place(by_name[n], placements.get(n, default), r, world) for n in group]
                shapes = [tuple(hi - lo for lo, hi in b) for b in boxes]
                if len(group) > 1:
                    rest = {s[1:] for s in shapes}
                    if any(len(s) == 0 for s in shapes) or len(rest) != 1:
                        raise InvalidArgument(f"fused tensor {in_fused[p.name]!r}: parts must agree beyond dim 0, "
                                              f"got local shapes {shapes}")
                pieces, row = [], 0
                for n, b, s in zip(group, boxes, shapes):
                    pieces.append(Piece(n, b, (row,) + (0,) * (len(s) - 1)))
                    row += s[0] if s else 1
                shape = (row,) + shapes[0][1:] if len(group) > 1 else shapes[0]
                local.append(LocalTensor(in_fused.get(p.name, p.name), shape, tuple(pieces)))
                done.update(group)
            ranks.append(tuple(local))
        return cls(tuple(ranks))


def _chunk(n: int, world: int, r: int) -> tuple[int, int]:
    c = -(-n // world) if n else 0
    lo = min(r * c, n)
    return lo, min(lo + c, n)


def _place(p: Param, placement: Shard | Replicate, r: int, world: int) -> Box:
    box = [(0, d) for d in p.shape]
    if isinstance(placement, Shard):
        if not 0 <= placement.dim < len(p.shape):
            raise InvalidArgument(f"{p.name}: can't shard dim {placement.dim} of shape {p.shape}")
        box[placement.dim] = _chunk(p.shape[placement.dim], world, r)
    elif not isinstance(placement, Replicate):
        raise InvalidArgument(f"{p.name}: placement must be Shard or Replicate, got {placement!r}")
    return tuple(box)


def _volume(box: Box) -> int:
    return math.prod(hi - lo for lo, hi in box)


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(al, bl), min(ah, bh)) for (al, ah), (bl, bh) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def _runs(ext: tuple[int, ...], src_shape: tuple[int, ...], src_at: tuple[int, ...], dst_shape: tuple[int, ...],
          dst_at: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """Element offsets (src, dst) of the contiguous runs copying box ``ext`` between two row-major
    tensors, and the run length in elements."""
    n = len(ext)
    k = n - 1
    while k > 0 and ext[k] == src_shape[k] == dst_shape[k]:
        k -= 1  # dims k+1.. are whole in both tensors: runs extend over them
    run = math.prod(ext[k:])

    def strides(shape: tuple[int, ...]) -> list[int]:
        s, acc = [0] * n, 1
        for d in range(n - 1, -1, -1):
            s[d] = acc
            acc *= shape[d]
        return s

    ss, ds = strides(src_shape), strides(dst_shape)
    src = np.array([sum(a * s for a, s in zip(src_at, ss))], np.int64)
    dst = np.array([sum(a * s for a, s in zip(dst_at, ds))], np.int64)
    for d in range(k):  # outer dims: a grid of runs
        steps = np.arange(ext[d], dtype=np.int64)
        src = (src[:, None] + steps[None, :] * ss[d]).reshape(-1)
        dst = (dst[:, None] + steps[None, :] * ds[d]).reshape(-1)
    return src, dst, run


# ---------------------------------------------------------------------------- schedule


@dataclass
class _Write:
    """One paged write of a trainer: ``len(src)`` pages of ``page_len`` bytes to one receiver."""

    receiver: int
    page_len: int
    src: np.ndarray  # byte offsets in the source: staging, or the trainer's local tensor ``source``
    dst: np.ndarray  # byte offsets in the receiver's buffer
    source: int = -1  # -1: staging; k: the trainer's k-th local tensor (written from it directly)


@dataclass(frozen=True)
class _Segment:
    """A box of one of the trainer's local tensors, cast into staging as one contiguous block
    (or, ``direct``, contiguous in the local tensor already and written from there)."""

    tensor: str
    at: tuple[int, ...]   # origin of the box in the local tensor
    ext: tuple[int, ...]  # its extent
    param: str
    offset: int           # bytes into staging (direct: into the local tensor)
    nbytes: int
    direct: bool = False


@dataclass
class _TrainerPlan:
    staging_bytes: int
    chunks: list[list[_Segment]]          # cast one chunk after another
    writes: list[list[_Write]]            # per chunk
    counts: dict[int, int] = field(default_factory=dict)  # receiver -> pages this trainer sends it
    direct: list[_Write] = field(default_factory=list)   # zero-copy writes, posted before any cast
    direct_tensors: set[str] = field(default_factory=set)


class Schedule:
    """Which trainer bytes go to which inference rank and offset: computed once, reused every round.

    ``dtype`` is the inference dtype (trainers cast into it); parameters named in
    ``fp8`` are sent as float8 e4m3fn with a per-tensor scale (see :class:`WeightSender`).
    ``chunk_bytes`` is the casting granularity: a chunk's writes are posted while the
    next chunk is cast.  Each inference byte comes from exactly one trainer rank: the
    trainer layout must partition every parameter.

    ``source_dtype`` is the dtype the trainers hold their shards in, if known.  Where it
    is a parameter's wire dtype already (bf16 shards, bf16 inference, not fp8), blocks
    that are contiguous in the shard are written straight from it (zero copy: no staging,
    no cast; the sender registers those shards); the rest is staged as usual.
    """

    def __init__(self, params: Sequence[Param], trainers: Layout, inference: Layout, dtype: Any = None,
                 fp8: Iterable[str] = (), chunk_bytes: int = 32 << 20, source_dtype: Any = None):
        import torch

        self.source_dtype = source_dtype
        self.params = list(params)
        self.trainers, self.inference = trainers, inference
        self.dtype = dtype or torch.bfloat16
        by_name = {p.name: p for p in self.params}
        self.fp8 = [p.name for p in self.params if p.name in set(fp8)]
        unknown = set(fp8) - set(by_name)
        if unknown:
            raise InvalidArgument(f"fp8: unknown parameters {sorted(unknown)}")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise InvalidArgument(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        if trainers.world > 256 or inference.world > 256:
            raise InvalidArgument("at most 256 trainer ranks and 256 inference ranks (8 bits of the imm)")
        self.chunk_bytes = chunk_bytes
        self._fp8_index = {n: i for i, n in enumerate(self.fp8)}
        self._check(trainers, by_name, partition=True)
        self._check(inference, by_name, partition=False)

        # receivers' buffers: local tensors, aligned, then the fp8 scales (float32)
        self.receiver_offsets: list[dict[str, int]] = []
        self.receiver_bytes: list[int] = []
        self.scales_offset: list[int] = []
        for tensors in inference.ranks:
            offs, pos = self._offsets(tensors)
            self.receiver_offsets.append(offs)
            self.scales_offset.append(pos)
            self.receiver_bytes.append(max(_ALIGN, pos + 4 * len(self.fp8)))

        self._plans: dict[int, _TrainerPlan] = {}
        self._expected: list[dict[int, int]] | None = None

    # -- plans (computed on first use: a trainer needs only its own) ----------------------

    def plan(self, t: int) -> _TrainerPlan:
        """Trainer rank t's staging layout and writes."""
        if t not in self._plans:
            self._plans[t] = self._plan(t)
        return self._plans[t]

    @property
    def plans(self) -> list[_TrainerPlan]:
        return [self.plan(t) for t in range(self.trainers.world)]

    @property
    def expected(self) -> list[dict[int, int]]:
        """receiver -> trainer -> writes (imms) that receiver awaits each round (needs every plan)."""
        if self._expected is None:
            exp: list[dict[int, int]] = [{} for _ in range(self.inference.world)]
            for t in range(self.trainers.world):
                for i, n in self.plan(t).counts.items():
                    exp[i][t] = n
            if self.fp8:  # trainer 0 writes the scales to every receiver
                for i in range(self.inference.world):
                    exp[i][0] = exp[i].get(0, 0) + 1
            self._expected = exp
        return self._expected

    # -- public facts ----------------------------------------------------------------

    def dtype_of(self, tensor_or_param: str) -> Any:
        """The wire/inference dtype of a parameter or a local tensor (named by its first part)."""
        import torch

        return torch.float8_e4m3fn if tensor_or_param in self._fp8_index else self.dtype

    def summary(self) -> dict[str, int]:
        """Totals: bytes, writes (pages) and paged-write calls per round."""
        ws = [w for p in self.plans for w in itertools.chain(p.direct, *p.writes)]
        direct = [w for p in self.plans for w in p.direct]
        return {"bytes": sum(int(w.page_len) * len(w.src) for w in ws), "writes": sum(len(w.src) for w in ws),
                "calls": len(ws), "direct_bytes": sum(int(w.page_len) * len(w.src) for w in direct),
                "staging_bytes": sum(p.staging_bytes for p in self.plans),
                "trainers": self.trainers.world, "receivers": self.inference.world}

    # -- construction ------------------------------------------------------------------

    def _tensor_dtype(self, lt: LocalTensor) -> Any:
        kinds = {self.dtype_of(p.param) for p in lt.pieces}
        if len(kinds) != 1:
            raise InvalidArgument(f"local tensor {lt.name!r} mixes fp8 and non-fp8 parameters")
        return kinds.pop()

    def _itemsize(self, lt: LocalTensor) -> int:
        import torch

        return torch.empty(0, dtype=self._tensor_dtype(lt)).element_size()

    def _offsets(self, tensors: Sequence[LocalTensor]) -> tuple[dict[str, int], int]:
        offs, pos = {}, 0
        for lt in tensors:
            offs[lt.name] = pos
            pos += -(-math.prod(lt.shape) * self._itemsize(lt) // _ALIGN) * _ALIGN
        return offs, pos

    def _check(self, layout: Layout, by_name: dict[str, Param], partition: bool) -> None:
        side = "trainer" if partition else "inference"
        covered = {n: 0 for n in by_name}
        boxes: dict[str, list[Box]] = {n: [] for n in by_name}
        for r, tensors in enumerate(layout.ranks):
            names = [lt.name for lt in tensors]
            if len(set(names)) != len(names):
                raise InvalidArgument(f"{side} rank {r}: local tensor names must be unique")
            for lt in tensors:
                self._tensor_dtype(lt)
                for pc in lt.pieces:
                    p = by_name.get(pc.param)
                    if p is None:
                        raise InvalidArgument(f"{side} rank {r}: unknown parameter {pc.param!r}")
                    if len(pc.box) != len(p.shape) or len(pc.at) != len(lt.shape) or len(lt.shape) != len(p.shape):
                        raise InvalidArgument(f"{side} rank {r}: piece of {pc.param!r} has the wrong rank")
                    if any(not 0 <= lo <= hi <= d for (lo, hi), d in zip(pc.box, p.shape)):
                        raise InvalidArgument(f"{side} rank {r}: piece {pc.box} outside {pc.param!r} {p.shape}")
                    if any(a + hi - lo > d or a < 0 for a, (lo, hi), d in zip(pc.at, pc.box, lt.shape)):
                        raise InvalidArgument(f"{side} rank {r}: piece of {pc.param!r} outside {lt.name!r}")
                    covered[pc.param] += _volume(pc.box)
                    if _volume(pc.box):
                        boxes[pc.param].append(pc.box)
        for n, p in by_name.items():
            total = math.prod(p.shape)
            if partition:
                overlap = any(_intersect(a, b) for i, a in enumerate(boxes[n]) for b in boxes[n][i + 1:])
                if covered[n] != total or overlap:
                    raise InvalidArgument(f"the trainer layout must partition every parameter: {n!r} has "
                                          f"{covered[n]} of {total} elements{' (overlapping)' if overlap else ''}")
            elif covered[n] == 0 and total:
                raise InvalidArgument(f"no inference rank holds parameter {n!r}")

    def _plan(self, t: int) -> _TrainerPlan:
        """Trainer t's staging layout and writes.

        Staging holds what the receivers need *in their layout*: each intersection of a
        trainer piece with a receiver piece is cast into a contiguous block (a segment),
        so a block lands with as few writes as the receiver's layout allows (a
        row-parallel shard of full trainer rows is one write, not one per row).  The
        same block wanted by several receivers (replicated parameters) is staged once.
        """
        mine: dict[str, list[tuple[LocalTensor, Piece]]] = {}
        for lt in self.trainers.ranks[t]:
            for pc in lt.pieces:
                mine.setdefault(pc.param, []).append((lt, pc))
        segments: dict[tuple[str, tuple[int, ...], tuple[int, ...]], _Segment] = {}
        needs: list[tuple[_Segment, int, LocalTensor, tuple[int, ...]]] = []
        pos = 0
        index = {lt.name: k for k, lt in enumerate(self.trainers.ranks[t])}

        def direct_ok(param: str) -> bool:
            return self.source_dtype is not None and param not in self._fp8_index and self.source_dtype == self.dtype

        for i, rtensors in enumerate(self.inference.ranks):
            for dl in rtensors:
                isz = self._itemsize(dl)
                for dp in dl.pieces:
                    for sl, sp in mine.get(dp.param, ()):
                        x = _intersect(dp.box, sp.box)
                        if x is None:
                            continue
                        ext = tuple(hi - lo for lo, hi in x)
                        s_at = tuple(a + lo - blo for a, (lo, _), (blo, _) in zip(sp.at, x, sp.box))
                        d_at = tuple(a + lo - blo for a, (lo, _), (blo, _) in zip(dp.at, x, dp.box))
                        # slabs along dim 0 of at most chunk_bytes: a chunk is cast, then sent
                        row = math.prod(ext[1:]) * isz
                        step = max(1, self.chunk_bytes // max(row, 1)) if ext else 1
                        for r0 in range(0, ext[0] if ext else 1, step):
                            sub = (min(step, ext[0] - r0),) + ext[1:] if ext else ()
                            so = (s_at[0] + r0,) + s_at[1:] if ext else ()
                            do = (d_at[0] + r0,) + d_at[1:] if ext else ()
                            key = (sl.name, so, sub)
                            seg = segments.get(key)
                            if seg is None and direct_ok(dp.param):
                                s_run, _, n_run = _runs(sub, sl.shape, so, sub, (0,) * len(sub))
                                if len(s_run) == 1:  # contiguous in the shard: no staging needed
                                    seg = _Segment(sl.name, so, sub, dp.param, int(s_run[0]) * isz,
                                                   n_run * isz, direct=True)
                                    segments[key] = seg
                            if seg is None:
                                pos = -(-pos // isz) * isz
                                seg = _Segment(sl.name, so, sub, dp.param, pos, math.prod(sub) * isz)
                                segments[key] = seg
                                pos += seg.nbytes
                            needs.append((seg, i, dl, do))
        plan = _TrainerPlan(pos, [], [])
        chunk_of: dict[_Segment, int] = {}
        size = 0
        for seg in segments.values():  # in staging order
            if seg.direct:
                chunk_of[seg] = -1
                plan.direct_tensors.add(seg.tensor)
                continue
            if not plan.chunks or (size + seg.nbytes > self.chunk_bytes and size):
                plan.chunks.append([])
                size = 0
            plan.chunks[-1].append(seg)
            chunk_of[seg] = len(plan.chunks) - 1
            size += seg.nbytes
        plan.writes = [[] for _ in plan.chunks]
        if not needs:
            return plan
        src_l, dst_l, len_l, rcv_l, chk_l, srcid_l = [], [], [], [], [], []
        for seg, i, dl, do in needs:
            isz = self._itemsize(dl)
            s, d, run = _runs(seg.ext, seg.ext, (0,) * len(seg.ext), dl.shape, do)
            src_l.append(seg.offset + s * isz)
            dst_l.append(self.receiver_offsets[i][dl.name] + d * isz)
            len_l.append(np.full(len(s), run * isz, np.int64))
            rcv_l.append(np.full(len(s), i, np.int64))
            chk_l.append(np.full(len(s), chunk_of[seg], np.int64))
            srcid_l.append(np.full(len(s), index[seg.tensor] if seg.direct else -1, np.int64))
        cols = [np.concatenate(x) for x in (src_l, dst_l, len_l, rcv_l, chk_l, srcid_l)]
        src, dst, ln, rcv, chunk, sid = _merge(*cols)
        order = np.lexsort((src, ln, rcv, sid, chunk))
        src, dst, ln, rcv, chunk, sid = (x[order] for x in (src, dst, ln, rcv, chunk, sid))
        keys = np.stack([chunk, sid, rcv, ln], axis=1)
        starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)])
        ends = np.r_[starts[1:], len(src)]
        for a, b in zip(starts, ends):
            c, k, i, n = int(chunk[a]), int(sid[a]), int(rcv[a]), int(ln[a])
            for lo in range(a, b, _MAX_PAGES):
                hi = min(lo + _MAX_PAGES, b)
                w = _Write(i, n, np.ascontiguousarray(src[lo:hi]), np.ascontiguousarray(dst[lo:hi]), k)
                (plan.direct if c < 0 else plan.writes[c]).append(w)
            plan.counts[i] = plan.counts.get(i, 0) + int(b - a)
        return plan


def _merge(src: np.ndarray, dst: np.ndarray, ln: np.ndarray, rcv: np.ndarray, chunk: np.ndarray,
           sid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Join runs that continue each other on both sides (same receiver, chunk and source)."""
    order = np.lexsort((src, sid, rcv, chunk))
    src, dst, ln, rcv, chunk, sid = (x[order] for x in (src, dst, ln, rcv, chunk, sid))
    cont = np.r_[False, (src[:-1] + ln[:-1] == src[1:]) & (dst[:-1] + ln[:-1] == dst[1:])
                 & (rcv[:-1] == rcv[1:]) & (chunk[:-1] == chunk[1:]) & (sid[:-1] == sid[1:])]
    starts = np.flatnonzero(~cont)
    return src[starts], dst[starts], np.add.reduceat(ln, starts), rcv[starts], chunk[starts], sid[starts]


# ---------------------------------------------------------------------------- imms


def _imm(tag: int, kind: int, version: int, rank: int) -> int:
    # 28 usable bits: tag (4) | kind (2) | version mod 2**14 (14) | rank (8)
    return tag << 24 | kind << 22 | (version & 0x3FFF) << 8 | rank


def _check_tag(tag: int) -> int:
    if not isinstance(tag, int) or not 0 <= tag < 16:
        raise InvalidArgument(f"imm_tag must be an int in 0..15, got {tag!r}")
    return tag


def _check_version(version: Any, last: int | None) -> int:
    if not isinstance(version, int) or version < 0:
        raise InvalidArgument(f"version must be a non-negative int, got {version!r}")
    if last is not None and version <= last:
        raise InvalidArgument(f"version {version} is not newer than version {last} (versions only go up)")
    return version


def _buffer(nbytes: int, dtype: Any, device: Any) -> torch.Tensor:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.zeros(nbytes, dtype=torch.uint8, device=device).view(dtype)
    return torch.frombuffer(host_buffer(max(nbytes, 1)), dtype=torch.uint8)[:nbytes].view(dtype)


def _view(raw: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
    import torch

    n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    return raw[offset:offset + n].view(dtype).view(shape)


async def _settle(futs: Sequence[asyncio.Future[Any]]) -> list[BaseException | None]:
    """Wait for every future; their exceptions (None for success), in order.  Cancelling the
    caller doesn't cancel them (a posted write can't be taken back)."""
    out = await asyncio.shield(asyncio.gather(*futs, return_exceptions=True))
    return [x if isinstance(x, BaseException) else None for x in out]


# ---------------------------------------------------------------------------- the two sides


@dataclass(frozen=True)
class SenderBuffers:
    """What a trainer rank hands the others (plain data: pickles)."""

    rank: int
    ready: MrDescriptor   # receivers write "(version, buffer)" here, 16 bytes per receiver
    amax: MrDescriptor    # trainers write their fp8 amax rows here


@dataclass(frozen=True)
class ReceiverBuffers:
    """What an inference rank hands the trainers (plain data: pickles)."""

    rank: int
    slots: tuple[MrDescriptor, MrDescriptor]  # its two weight buffers


class WeightSender:
    """A trainer rank's side of the updates.

    ``shards`` maps each of this rank's local tensor names (see the trainer
    :class:`Layout`; for FSDP the parameter names) to its tensor — the trainer's
    own parameters, read at every :meth:`push` (updated in place by the optimizer
    between rounds, or passed again to ``push``).  The staging buffer is allocated
    on the shards' device.

    fp8 parameters are sent as ``clamp(x / scale, ±448).to(float8_e4m3fn)`` with
    ``scale = amax / 448`` (1.0 when amax is 0), amax over the *whole* parameter:
    the trainers exchange their shards' amax (fp32) before casting; trainer 0 writes
    the scales (float32) to every receiver.
    """

    def __init__(self, engine: TransferEngine, schedule: Schedule, rank: int,
                 shards: Mapping[str, torch.Tensor], imm_tag: int = 0xB):
        import torch

        if not 0 <= rank < schedule.trainers.world:
            raise InvalidArgument(f"rank must be in 0..{schedule.trainers.world - 1}, got {rank!r}")
        self.engine, self.schedule, self.rank = engine, schedule, rank
        self._tag = _check_tag(imm_tag)
        self._plan = schedule.plan(rank)
        self._tensors = {lt.name: lt for lt in schedule.trainers.ranks[rank]}
        self._shards = self._check_shards(shards)
        first = next(iter(self._shards.values()), None)
        device = first.device if first is not None and first.is_cuda else None
        self._staging = _buffer(self._plan.staging_bytes, torch.uint8, device)
        self._staging_mr = engine.register(self._staging) if self._plan.staging_bytes else None
        self._direct_mrs: dict[str, tuple[torch.Tensor, MemoryRegion]] = {}
        self._register_direct()
        self._names = [lt.name for lt in schedule.trainers.ranks[rank]]
        nr, nt, nf = schedule.inference.world, schedule.trainers.world, len(schedule.fp8)
        self._ready = _buffer(16 * nr, torch.int64, None).view(nr, 2)
        self._ready_mr = engine.register(self._ready)
        self._amax = _buffer(4 * 2 * nt * max(nf, 1), torch.float32, None).view(2, nt, max(nf, 1))
        self._amax_mr = engine.register(self._amax)
        self._scales = _buffer(4 * max(nf, 1), torch.float32, None)
        self._scales_mr = engine.register(self._scales)
        self._receivers: list[ReceiverBuffers] = []
        self._senders: list[SenderBuffers] = []
        self._busy = False
        self._last: int | None = None
        self._inflight: list[asyncio.Future[None]] = []  # writes of a push that was cancelled
        #: timings of the last successful push (seconds): waiting for the receivers' "ready"
        #: (and the fp8 scales), casting (summed over chunks, in a thread), and the whole push
        self.last_stats: dict[str, float] = {}
        # receivers this rank waits a "ready" from: those it writes to
        self._targets = sorted(set(self._plan.counts) | (set(range(nr)) if schedule.fp8 and rank == 0 else set()))

    def _check_shards(self, shards: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, lt in self._tensors.items():
            t = shards.get(name)
            if t is None:
                raise InvalidArgument(f"trainer rank {self.rank}: no shard for {name!r}")
            if tuple(t.shape) != lt.shape:
                raise InvalidArgument(f"trainer rank {self.rank}: {name!r} has shape {tuple(t.shape)}, "
                                      f"the layout says {lt.shape}")
            if not t.is_floating_point():
                raise InvalidArgument(f"{name!r}: weights must be floating point, got {t.dtype}")
            if name in self._plan.direct_tensors and (t.dtype != self.schedule.source_dtype or
                                                      not t.is_contiguous()):
                raise InvalidArgument(f"{name!r}: the schedule writes it straight from the shard, which must be "
                                      f"a contiguous {self.schedule.source_dtype} tensor (got {t.dtype})")
            out[name] = t
        extra = set(shards) - set(self._tensors)
        if extra:
            raise InvalidArgument(f"trainer rank {self.rank}: shards not in the layout: {sorted(extra)}")
        return out

    def _register_direct(self) -> None:
        """Register the shards that zero-copy writes read (again if a push brought new tensors)."""
        for name in self._plan.direct_tensors:
            t = self._shards[name]
            old = self._direct_mrs.get(name)
            if old is not None and old[0] is t:
                continue
            if old is not None:
                old[1].close()
            self._direct_mrs[name] = (t, self.engine.register(t))

    @property
    def buffers(self) -> SenderBuffers:
        """This rank's descriptors, for every receiver's and trainer's ``connect``."""
        return SenderBuffers(self.rank, self._ready_mr.descriptor, self._amax_mr.descriptor)

    def connect(self, receivers: Sequence[ReceiverBuffers], senders: Sequence[SenderBuffers]) -> None:
        """Every inference rank's buffers and every trainer rank's (indexed by rank; a restarted
        peer is connected again with its new buffers)."""
        _check_ranks("receivers", receivers, self.schedule.inference.world)
        _check_ranks("senders", senders, self.schedule.trainers.world)
        self._receivers, self._senders = list(receivers), list(senders)

    async def push(self, version: int, shards: Mapping[str, torch.Tensor] | None = None,
                   timeout: float | None = None) -> None:
        """Send this rank's part of weights version ``version``.

        Waits until every receiver it writes to said "ready for this version" (so it
        waits for them to finish the previous round), then casts and writes.  Returns
        once all its writes are in the receivers' memory.  Raises UpdateInProgress
        if a push is in flight here, InvalidArgument for a version not newer than the
        last one pushed, UpdateFailed (``.peer`` the receiver or trainer rank,
        ``__cause__`` why: PeerUnreachable, ImmTimeout, ...) if a peer is gone or
        ``timeout`` seconds pass waiting for one.  A receiver that is gone (or never
        asks within ``timeout``) doesn't hold the others back: they still get their
        writes, then the push raises naming it.  A failed version is not pushed
        again: continue with a newer one.
        """
        if self._busy:
            raise UpdateInProgress(f"trainer rank {self.rank}: a push is in flight")
        if not self._receivers:
            raise InvalidArgument("connect() first")
        _check_version(version, self._last)
        if shards is not None:
            self._shards = self._check_shards(shards)
            self._register_direct()
        self._busy = True
        self._last = version
        try:
            if self._inflight:  # a cancelled push's writes still read staging: let them finish first
                await _settle(self._inflight)
                self._inflight = []
            await self._push(version, timeout)
        finally:
            self._busy = False

    async def _push(self, version: int, timeout: float | None) -> None:
        eng, sched, tag = self.engine, self.schedule, self._tag
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cast_s = 0.0
        ready_waits = [eng.imms.wait(_imm(tag, _KIND_READY, version, i), 1, timeout=timeout,
                                     peer=self._receivers[i].slots[0].address) for i in self._targets]
        try:
            scales = await self._agree_scales(version, timeout) if sched.fp8 else None
            # every receiver's word (or its failure): the ready ones get their writes even if
            # another one is dead, so one lost receiver doesn't stall the rest
            ready = await _settle(ready_waits)
        except BaseException:
            for f in ready_waits:
                f.cancel()
            raise
        slots: dict[int, MrDescriptor] = {}
        failed: list[tuple[int, BaseException]] = []
        for i, err in zip(self._targets, ready):
            v, slot = (int(x) for x in self._ready[i])
            if err is None and (v != version or slot not in (0, 1)):
                err = UpdateFailed(f"receiver {i} said ready for version {v}, buffer {slot}", version=version, peer=i)
            if err is None:
                slots[i] = self._receivers[i].slots[slot]
            else:
                failed.append((i, err))
        t_ready = loop.time()
        writes: list[asyncio.Future[None]] = []
        self._inflight = writes
        whom: list[int] = []
        imm = _imm(tag, _KIND_DATA, version, self.rank)
        try:
            if scales is not None and self.rank == 0:
                self._scales[:len(scales)] = scales
                for i in slots:
                    writes.append(eng.write(self._scales_mr, slots[i], 4 * len(scales), 0,
                                            sched.scales_offset[i], imm=imm))
                    whom.append(i)
            for w in self._plan.direct:  # zero copy: straight from the shards, before any cast
                if w.receiver in slots:
                    mr = self._direct_mrs[self._names[w.source]][1]
                    writes.append(eng.write_paged(mr, slots[w.receiver], w.page_len, w.src, w.dst, 1, 1, imm=imm))
                    whom.append(w.receiver)
            for c, segments in enumerate(self._plan.chunks):
                todo = [w for w in self._plan.writes[c] if w.receiver in slots]
                if not todo:
                    continue
                c0 = loop.time()
                await asyncio.to_thread(self._cast, segments, scales)
                cast_s += loop.time() - c0
                for w in todo:
                    writes.append(eng.write_paged(self._staging_mr, slots[w.receiver], w.page_len, w.src, w.dst,
                                                  1, 1, imm=imm))
                    whom.append(w.receiver)
        except AioteError as e:
            await _settle(writes)
            raise UpdateFailed(f"version {version}: posting writes failed: {e}", version=version) from e
        errors = await _settle(writes)
        self._inflight = []
        failed += [(i, err) for i, err in zip(whom, errors) if err is not None]
        if failed:
            i, err = failed[0]
            raise UpdateFailed(f"version {version}: receiver {i}: {type(err).__name__}: {err} "
                               f"(receivers that failed: {sorted({j for j, _ in failed})})",
                               version=version, peer=i) from err
        self.last_stats = {"ready_s": t_ready - t0, "cast_s": cast_s, "total_s": loop.time() - t0}

    def _cast(self, segments: Sequence[_Segment], scales: torch.Tensor | None) -> None:
        """Cast one chunk's segments from the shards into staging (runs in a thread: torch
        releases the GIL)."""
        import torch

        sched = self.schedule
        for seg in segments:
            dt = sched.dtype_of(seg.param)
            src = self._shards[seg.tensor]
            for d, (a, n) in enumerate(zip(seg.at, seg.ext)):
                src = src.narrow(d, a, n)
            dst = self._staging[seg.offset:seg.offset + seg.nbytes].view(dt).view(seg.ext)
            if scales is not None and seg.param in sched._fp8_index:
                s = scales[sched._fp8_index[seg.param]]
                dst.copy_(torch.clamp(src.float() / s, -FP8_MAX, FP8_MAX).to(dt))
            else:
                dst.copy_(src)

    async def _agree_scales(self, version: int, timeout: float | None) -> torch.Tensor:
        """Every trainer's shard amax → the per-tensor scales (same on every trainer)."""
        import torch

        sched, eng, nt = self.schedule, self.engine, self.schedule.trainers.world
        row = torch.zeros(len(sched.fp8), dtype=torch.float32)
        for name, lt in self._tensors.items():
            for pc in lt.pieces:
                if pc.param in sched._fp8_index and self._shards[name].numel():
                    row[sched._fp8_index[pc.param]] = torch.maximum(
                        row[sched._fp8_index[pc.param]], self._shards[name].detach().abs().max().float().cpu())
        par = version % 2  # two tables: a fast trainer's next round can't overwrite this one
        self._amax[par, self.rank, :len(row)] = row
        others = [u for u in range(nt) if u != self.rank]
        waits = [eng.imms.wait(_imm(self._tag, _KIND_AMAX, version, u), 1, timeout=timeout,
                               peer=self._senders[u].amax.address) for u in others]
        rowbytes = 4 * self._amax.shape[2]
        off = (par * nt + self.rank) * rowbytes
        sends = [eng.write(self._amax_mr, self._senders[u].amax, 4 * len(row), off, off,
                           imm=_imm(self._tag, _KIND_AMAX, version, self.rank)) for u in others]
        try:
            await _first_failure(waits + sends, version, "trainer", others + others)
        except BaseException:
            for f in waits:
                f.cancel()
            raise
        amax = self._amax[par, :, :len(row)].max(dim=0).values
        return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


class WeightReceiver:
    """An inference rank's side: two weight buffers, one serving, one being written.

    :attr:`weights` maps local tensor names to views of the serving buffer (None
    until the first round completed); :attr:`scales` the fp8 parameters' scales.
    Buffers are allocated on ``device`` (host huge-page memory by default).
    """

    def __init__(self, engine: TransferEngine, schedule: Schedule, rank: int, device: Any = None,
                 imm_tag: int = 0xB):
        import torch

        if not 0 <= rank < schedule.inference.world:
            raise InvalidArgument(f"rank must be in 0..{schedule.inference.world - 1}, got {rank!r}")
        self.engine, self.schedule, self.rank = engine, schedule, rank
        self._tag = _check_tag(imm_tag)
        nbytes = schedule.receiver_bytes[rank]
        self._slots = [_buffer(nbytes, torch.uint8, device) for _ in range(2)]
        self._slot_mrs: list[MemoryRegion] = [engine.register(s) for s in self._slots]
        self._tensors = schedule.inference.ranks[rank]
        self._views = [self._views_of(s) for s in self._slots]
        nf = len(schedule.fp8)
        self._scale_views = [s[schedule.scales_offset[rank]:schedule.scales_offset[rank] + 4 * nf].view(torch.float32)
                             for s in self._slots]
        self._word = _buffer(16, torch.int64, None)
        self._word_mr = engine.register(self._word)
        self._senders: list[SenderBuffers] = []
        self._serving: int | None = None
        self._busy = False
        self._last: int | None = None
        self.version: int | None = None
        self._expected = schedule.expected[rank]

    def _views_of(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        offs = self.schedule.receiver_offsets[self.rank]
        out = {}
        for lt in self._tensors:
            dt = self.schedule.dtype_of(lt.pieces[0].param) if lt.pieces else self.schedule.dtype
            out[lt.name] = _view(raw, offs[lt.name], lt.shape, dt)
        return out

    @property
    def buffers(self) -> ReceiverBuffers:
        """This rank's descriptors, for every trainer's ``connect``."""
        return ReceiverBuffers(self.rank, (self._slot_mrs[0].descriptor, self._slot_mrs[1].descriptor))

    def connect(self, senders: Sequence[SenderBuffers]) -> None:
        """Every trainer rank's buffers, indexed by rank (again after a trainer restarted)."""
        _check_ranks("senders", senders, self.schedule.trainers.world)
        self._senders = list(senders)

    @property
    def weights(self) -> dict[str, torch.Tensor] | None:
        """The weights in service: local tensor name → tensor (views; don't keep them across rounds
        if you need the old values, they are overwritten two rounds later)."""
        return None if self._serving is None else self._views[self._serving]

    @property
    def scales(self) -> dict[str, float]:
        """fp8 parameters' scales in service (empty without fp8 or before the first round)."""
        if self._serving is None:
            return {}
        v = self._scale_views[self._serving]
        return {n: float(v[i]) for i, n in enumerate(self.schedule.fp8)}

    async def receive(self, version: int, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """Take in weights version ``version``; return the new weights once every byte is in.

        Serving continues from the other buffer meanwhile, and stays there if the round
        fails: UpdateFailed (``.peer`` = the trainer rank, ``__cause__`` the reason:
        PeerUnreachable for a dead trainer, ImmTimeout after ``timeout`` s).  Raises
        UpdateInProgress if a receive is in flight, InvalidArgument for a version not
        newer than the last one received or attempted.  Cancelling it fails the round
        the same way (the trainers' writes may still land in the idle buffer).
        """
        if self._busy:
            raise UpdateInProgress(f"inference rank {self.rank}: a receive is in flight")
        if not self._senders:
            raise InvalidArgument("connect() first")
        _check_version(version, self._last)
        self._busy = True
        self._last = version
        try:
            slot = 0 if self._serving is None else 1 - self._serving
            await self._receive(version, slot, timeout)
            self._serving, self.version = slot, version
            return self._views[slot]
        finally:
            self._busy = False

    async def _receive(self, version: int, slot: int, timeout: float | None) -> None:
        eng, tag = self.engine, self._tag
        trainers = sorted(self._expected)
        waits = [eng.imms.wait(_imm(tag, _KIND_DATA, version, t), self._expected[t], timeout=timeout,
                               peer=self._senders[t].ready.address) for t in trainers]
        self._word[0], self._word[1] = version, slot
        ready = [eng.write(self._word_mr, self._senders[t].ready, 16, 0, 16 * self.rank,
                           imm=_imm(tag, _KIND_READY, version, self.rank)) for t in trainers]
        try:
            await _first_failure(waits + ready, version, "trainer", trainers + trainers)
        except BaseException:
            for f in waits:
                f.cancel()
            await _settle(ready)  # the word buffer is reused next round
            raise


def _check_ranks(what: str, items: Sequence[Any], world: int) -> None:
    if len(items) != world or any(getattr(x, "rank", None) != r for r, x in enumerate(items)):
        raise InvalidArgument(f"{what}: need one entry per rank, in rank order ({world})")


async def _first_failure(futs: Sequence[asyncio.Future[Any]], version: int, role: str, who: Sequence[int]) -> None:
    """Await all; on the first failure raise UpdateFailed naming that peer (the rest are left to the caller)."""
    pending = set(futs)
    index = {id(f): w for f, w in zip(futs, who)}
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for f in done:
            if not f.cancelled() and f.exception() is not None:
                err = f.exception()
                peer = index[id(f)]
                raise UpdateFailed(f"version {version}: {role} {peer}: {type(err).__name__}: {err}",
                                   version=version, peer=peer) from err
