"""NIC discovery and GPU↔NIC↔CPU topology.

Two views of the same hardware:

* :func:`nics` asks libfabric (``fi_getinfo``, in C: ``native/src/discovery.c``)
  what it offers — one :class:`NicInfo` per provider + domain — and adds what
  sysfs knows about the interface under it (link speed and state, PCI
  address, NUMA node) where libfabric leaves that out (tcp, udp, sockets).
* :func:`topology` reads sysfs only: the NVIDIA GPUs and the NICs on the PCI
  bus, and for each GPU its NICs nearest first by PCIe distance (same PCIe
  switch, then same root complex, then same NUMA node, then the rest) and
  the CPU cores local to it.  :meth:`Topology.nics_for_gpu` turns that into
  the domain names ``TransferEngine(nics=[...])`` takes.

Neither needs a GPU, a CUDA runtime or an RDMA NIC: on a host without them
the lists are simply empty.  See docs/nics.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .errors import InvalidArgument

__all__ = ["NicInfo", "NicDevice", "GpuInfo", "Topology", "Affinity", "nics", "topology", "parse_cpulist"]

_NVIDIA = 0x10DE
#: PCI classes of GPUs (class >> 8): 3D controller (data-centre parts), VGA (workstation parts)
_GPU_CLASSES = (0x0302, 0x0300)
_BDF = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_HOST_BRIDGE = re.compile(r"^pci[0-9a-f]{4,}:[0-9a-f]{2}$")
_EP_TYPES = {1: "msg", 2: "rdm", 4: "dgram"}
_LINK_STATES = {0: "unknown", 1: "down", 2: "up"}


# --------------------------------------------------------------------------------------
# libfabric's view


@dataclass(frozen=True)
class NicInfo:
    """One provider + domain that libfabric offers.

    ``domain`` is the name ``TransferEngine(provider=..., nics=[domain, ...])``
    takes.  Device facts come from libfabric's ``fid_nic`` where the provider
    fills it (efa, verbs, cxi), else from sysfs for the interface the domain
    names (tcp, udp, sockets: the domain *is* the interface); they are empty
    / None where neither knows (shm).
    """

    provider: str
    """Provider name, layers joined by ';' ("efa", "verbs;ofi_rxm", "tcp;ofi_rxm", "shm")."""
    fabric: str
    """Fabric name ("efa", "shm"; for tcp the interface's subnet, e.g. "127.0.0.1/32")."""
    domain: str
    """Domain name: what ``TransferEngine(nics=[...])`` takes ("rdmap16s27-rdm", "mlx5_0", "eth0")."""
    interface: str
    """Device or network interface under the domain ("rdmap16s27", "mlx5_0", "eth0", "lo"); "" if none."""
    driver: str
    """Kernel driver ("efa", "mlx5_core", "virtio_net"); "" if unknown."""
    pci: str | None
    """PCI address "dddd:bb:dd.f" of the device, None if unknown or not on PCI."""
    numa_node: int | None
    """NUMA node of the device, None if unknown."""
    link_speed: int | None
    """Link speed in bits/s, None if unknown."""
    link_state: str
    """"up", "down" or "unknown"."""
    mtu: int | None
    network_type: str
    """libfabric's network type ("Ethernet", "InfiniBand"); "" if not reported."""
    ep_types: frozenset[str]
    """Endpoint types offered: subset of {"rdm", "msg", "dgram"}."""
    caps: frozenset[str]
    """Capability flags, as libfabric names them ("FI_RMA", "FI_HMEM", "FI_REMOTE_WRITE", ...)."""
    caps_bits: int
    mr_mode: frozenset[str]
    """Memory-registration modes the provider needs ("FI_MR_LOCAL", "FI_MR_PROV_KEY", ...)."""
    mr_mode_bits: int
    hmem: bool
    """Device memory (FI_HMEM: GPU buffers registered directly) is advertised."""
    rma: bool
    """One-sided RMA (FI_RMA) is advertised."""
    cq_data_size: int
    """Bytes of remote CQ data (the imm) a write can carry; aiote needs 4."""
    mr_key_size: int
    max_msg_size: int
    inject_size: int
    vendor_id: str = ""
    device_id: str = ""
    firmware: str = ""

    @property
    def layers(self) -> tuple[str, ...]:
        """The provider's layers, core first: "tcp;ofi_rxm" → ("tcp", "ofi_rxm")."""
        return tuple(self.provider.split(";"))

    @property
    def supports_write_imm(self) -> bool:
        """It offers what aiote's engine asks for: a reliable datagram endpoint
        with RMA writes and messages, carrying at least 4 bytes of CQ data.

        A capability check, not a promise that every mode the engine asks for
        (mr_mode, threading) will be granted."""
        return "rdm" in self.ep_types and self.rma and "FI_MSG" in self.caps and self.cq_data_size >= 4


def _names(text: str) -> frozenset[str]:
    """Split fi_tostr's "FI_MSG, FI_RMA" (older releases: "FI_MSG | FI_RMA")."""
    return frozenset(p.strip() for p in re.split(r"[,|]", text) if p.strip())


def nics(provider: str | None = None, *, sysfs_root: str = "/sys") -> list[NicInfo]:
    """List what libfabric offers on this host: one :class:`NicInfo` per provider + domain.

    ``provider`` filters by the provider's full name ("tcp;ofi_rxm") or one
    of its layers ("tcp" matches both "tcp" and "tcp;ofi_rxm"; "ofi_rxm" every
    rxm stack).  A provider that matches nothing (not installed, misspelt, no
    device) gives an empty list, not an error, so callers can probe:
    ``if aiote.nics("efa"): ...``.  Entries come in libfabric's order of
    preference.  Raises ProviderError only if libfabric itself fails.

    ``sysfs_root`` is where interface facts are read (a fixture tree in tests).
    """
    if provider is not None and not isinstance(provider, str):
        raise InvalidArgument(f"provider must be a str or None, got {provider!r}")
    from ._core import check, ffi, lib  # the native module; topology() needs none

    prov = ffi.new("char[]", provider.encode()) if provider else ffi.NULL
    cap = 64
    while True:
        out = ffi.new("aiote_nic_info[]", cap)
        n = check(lib.aiote_list_nics(prov, out, cap), "listing NICs")
        if n <= cap:
            break
        cap = n
    sysfs = _Sysfs(sysfs_root)
    return [_nic_info(out[i], ffi, sysfs) for i in range(n)]


def _nic_info(o: Any, ffi: Any, sysfs: _Sysfs) -> NicInfo:
    def s(field: str) -> str:
        return ffi.string(getattr(o, field)).decode(errors="replace")

    ep_types = frozenset(name for bit, name in _EP_TYPES.items() if o.ep_types & bit)
    domain, device = s("domain"), s("device")
    pci = s("pci") or None
    speed = int(o.link_speed) or None
    mtu = int(o.mtu) or None
    state = _LINK_STATES.get(int(o.link_state), "unknown")
    driver = s("driver")
    # sockets-style providers name the interface as the domain and fill no fid_nic
    interface = device or (domain if sysfs.is_net(domain) or sysfs.is_rdma(domain) else "")
    if interface:
        facts = sysfs.interface_facts(interface)
        pci = pci or facts.get("pci")
        driver = driver or facts.get("driver", "")
        speed = speed or facts.get("speed")
        mtu = mtu or facts.get("mtu")
        if state == "unknown":
            state = facts.get("state", "unknown")
    numa = sysfs.numa_of_pci(pci) if pci else None
    return NicInfo(
        provider=s("provider"),
        fabric=s("fabric"),
        domain=domain,
        interface=interface,
        driver=driver,
        pci=pci,
        numa_node=numa,
        link_speed=speed,
        link_state=state,
        mtu=mtu,
        network_type=s("network_type"),
        ep_types=ep_types,
        caps=_names(s("caps_str")),
        caps_bits=int(o.caps),
        mr_mode=_names(s("mr_mode_str")),
        mr_mode_bits=int(o.mr_mode),
        hmem=bool(o.hmem),
        rma=bool(o.rma),
        cq_data_size=int(o.cq_data_size),
        mr_key_size=int(o.mr_key_size),
        max_msg_size=int(o.max_msg_size),
        inject_size=int(o.inject_size),
        vendor_id=s("vendor_id"),
        device_id=s("device_id"),
        firmware=s("firmware"),
    )


# --------------------------------------------------------------------------------------
# sysfs


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a kernel cpulist ("0-3,8,10-11") into sorted CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        step = 1
        if ":" in hi:  # "0-31:2" (stride) is legal cpulist syntax
            hi, _, st = hi.partition(":")
            step = int(st)
        cpus.update(range(int(lo), int(hi or lo) + 1, step))
    return tuple(sorted(cpus))


class _Sysfs:
    """Reads a sysfs tree rooted at ``root`` ("/sys", or a fixture copy)."""

    def __init__(self, root: str):
        self.root = root

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @staticmethod
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:  # absent, or unreadable (a down link's "speed" gives EINVAL)
            return None

    @staticmethod
    def listdir(path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def read_int(self, path: str, base: int = 10) -> int | None:
        text = self.read(path)
        if text is None:
            return None
        try:
            return int(text, base)
        except ValueError:
            return None

    def is_net(self, name: str) -> bool:
        return bool(name) and "/" not in name and os.path.isdir(self.p("class", "net", name))

    def is_rdma(self, name: str) -> bool:
        return bool(name) and "/" not in name and os.path.isdir(self.p("class", "infiniband", name))

    def numa_of_pci(self, pci: str) -> int | None:
        node = self.read_int(self.p("bus", "pci", "devices", pci, "numa_node"))
        return node if node is not None and node >= 0 else None

    @staticmethod
    def pci_of(device_path: str) -> str | None:
        """The PCI function a resolved device path sits on (its last BDF component)."""
        parts = [c for c in device_path.split(os.sep) if _BDF.match(c)]
        return parts[-1] if parts else None

    def driver_of(self, device_dir: str) -> str:
        link = os.path.join(device_dir, "driver")
        return os.path.basename(os.path.realpath(link)) if os.path.islink(link) else ""

    def interface_facts(self, name: str) -> dict[str, Any]:
        """Link facts of a net interface or RDMA device: pci, driver, speed (bits/s), mtu, state."""
        facts: dict[str, Any] = {}
        if self.is_net(name):
            d = self.p("class", "net", name)
            speed = self.read_int(os.path.join(d, "speed"))  # Mb/s; -1 when unknown
            if speed and speed > 0:
                facts["speed"] = speed * 1_000_000
            mtu = self.read_int(os.path.join(d, "mtu"))
            if mtu:
                facts["mtu"] = mtu
            oper = self.read(os.path.join(d, "operstate"))
            if oper == "up":
                facts["state"] = "up"
            elif oper in ("down", "lowerlayerdown", "notpresent"):
                facts["state"] = "down"
            elif self.read(os.path.join(d, "carrier")) == "1":  # "unknown": lo, some virtual NICs
                facts["state"] = "up"
        elif self.is_rdma(name):
            d = self.p("class", "infiniband", name)
            port = os.path.join(d, "ports", "1")
            state = self.read(os.path.join(port, "state")) or ""  # "4: ACTIVE"
            if state:
                facts["state"] = "up" if "ACTIVE" in state else "down"
            rate = re.match(r"\s*([\d.]+)\s*Gb/sec", self.read(os.path.join(port, "rate")) or "")
            if rate:
                facts["speed"] = int(float(rate.group(1)) * 1e9)
        else:
            return facts
        dev = os.path.join(d, "device")
        if os.path.exists(dev):
            real = os.path.realpath(dev)
            pci = self.pci_of(real)
            if pci:
                facts["pci"] = pci
                facts["driver"] = self.driver_of(self.p("bus", "pci", "devices", pci))
            if not facts.get("driver"):
                facts["driver"] = self.driver_of(real)
        return facts


# --------------------------------------------------------------------------------------
# topology


class Affinity(IntEnum):
    """How close a NIC is to a GPU; lower is closer.  nvidia-smi topo's names in brackets."""

    SWITCH = 0
    """They share a PCIe bridge below the root complex (a switch, or one card): peer-to-peer
    traffic never crosses the CPU (PIX/PXB)."""
    HOST_BRIDGE = 1
    """Same PCIe root complex / host bridge, different root ports (PHB)."""
    NUMA = 2
    """Same NUMA node, different root complexes (NODE)."""
    SYSTEM = 3
    """Across the inter-socket link, or unknown (SYS)."""


@dataclass(frozen=True)
class NicDevice:
    """A NIC on the PCI bus, as sysfs shows it: one PCI function.

    ``kind`` is "rdma" for devices under /sys/class/infiniband (EFA,
    ConnectX in InfiniBand or RoCE mode), where ``name`` is the RDMA device
    name ("rdmap16s27", "mlx5_0"); "net" for plain network devices, where
    ``name`` is the interface ("eth0").
    """

    name: str
    kind: str
    pci: str | None
    numa_node: int | None
    driver: str
    interfaces: tuple[str, ...]
    """Network interfaces on the same PCI function ("ibp12s0", "ens1f0np0"); () for EFA."""
    vendor: str
    """PCI vendor id ("0x1d0f" Amazon, "0x15b3" Mellanox); "" when not on PCI."""
    device: str
    path: str
    """Resolved sysfs device path (its PCIe ancestry)."""

    def domain_name(self, provider: str | None = None) -> str | None:
        """The libfabric domain name of this NIC for ``provider``, or None if it has none.

        efa: "<device>-rdm" (the RDM domain); verbs: the RDMA device name;
        tcp / udp / sockets / net: the network interface; None/other: ``name``.
        """
        layers = set((provider or "").split(";"))
        if "efa" in layers:
            return f"{self.name}-rdm" if self.kind == "rdma" else None
        if "verbs" in layers:
            return self.name if self.kind == "rdma" else None
        if "shm" in layers:
            return None  # shared memory has one domain, "shm", on no NIC
        if layers & {"tcp", "udp", "sockets", "net"}:
            return self.interfaces[0] if self.interfaces else None
        return self.name


@dataclass(frozen=True)
class GpuInfo:
    """An NVIDIA GPU and what is near it.

    ``index`` counts GPUs in PCI bus order: nvidia-smi's numbering and CUDA's
    with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA_VISIBLE_DEVICES not applied).
    """

    index: int
    pci: str
    numa_node: int | None
    nics: tuple[str, ...]
    """Every NIC (:attr:`NicDevice.name`), nearest first."""
    links: tuple[tuple[str, Affinity, int], ...]
    """(NIC name, affinity, PCIe hops) for every NIC, nearest first; hops break ties."""
    cpus: tuple[int, ...]
    """CPU cores local to the GPU (its local_cpulist, else its NUMA node's, else all)."""
    device: str
    """PCI device id ("0x2330": H100 SXM5)."""
    path: str

    def affinity(self, nic: str) -> Affinity:
        """How close NIC ``nic`` is to this GPU."""
        for name, aff, _hops in self.links:
            if name == nic:
                return aff
        raise KeyError(nic)


@dataclass(frozen=True)
class Topology:
    """GPUs and NICs of a host, from sysfs.  See :func:`topology`."""

    gpus: tuple[GpuInfo, ...]
    nics: tuple[NicDevice, ...]
    numa_nodes: int
    """NUMA nodes the host has (1 on hosts without NUMA information)."""

    def nic(self, name: str) -> NicDevice:
        for n in self.nics:
            if n.name == name:
                return n
        raise KeyError(name)

    def nics_for_gpu(self, gpu: int, k: int | None = None, *, provider: str | None = None) -> list[str]:
        """Names of GPU ``gpu``'s nearest NICs, nearest first, for ``TransferEngine(nics=...)``.

        ``k=None``: every NIC at the best affinity level (the 4 EFA NICs
        behind an H100's PCIe switch on a p5; the 2 ConnectX of its socket on
        a NUMA-only box).  ``k=n``: the n nearest (fewer if the host has
        fewer).  Among equally near NICs the order rotates from GPU to GPU, so
        GPUs sharing NICs spread over them (``k=1`` on 4 GPUs sharing 2 NICs
        gives NIC a, b, a, b).

        ``provider`` picks which NICs count and how they are named, as
        libfabric names the domain: "efa" → "rdmap16s27-rdm", "verbs" →
        "mlx5_0", "tcp" → the network interface.  Without it: RDMA devices if
        the host has any, else network interfaces, by :attr:`NicDevice.name`.
        """
        if not 0 <= gpu < len(self.gpus):
            raise IndexError(f"GPU {gpu} out of range: this host has {len(self.gpus)}")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise InvalidArgument(f"k must be a positive int or None, got {k!r}")
        ordered = [self._ordered(g, provider) for g in self.gpus[: gpu + 1]]
        mine = ordered[gpu]
        if not mine:
            return []
        # rotate each group of equally near NICs by how many earlier GPUs had that same group
        # (the same NICs at the same distance: GPUs of one socket share their socket's NICs)
        out: list[tuple[str, Affinity]] = []
        earlier = [{tuple(g) for g in _groups(other)} for other in ordered[:gpu]]
        for group in _groups(mine):
            seen = sum(1 for groups in earlier if tuple(group) in groups)
            r = seen % len(group)
            out.extend((n, a) for n, a, _h in group[r:] + group[:r])
        if k is None:
            best = out[0][1]
            out = [x for x in out if x[1] == best]
        else:
            out = out[:k]
        by_name = {n.name: n for n in self.nics}
        return [by_name[n].domain_name(provider) or n for n, _a in out]

    def _ordered(self, g: GpuInfo, provider: str | None) -> list[tuple[str, Affinity, int]]:
        by_name = {n.name: n for n in self.nics}
        if provider:
            keep = {n.name for n in self.nics if n.domain_name(provider) is not None}
        else:
            kind = "rdma" if any(n.kind == "rdma" for n in self.nics) else "net"
            keep = {n.name for n in self.nics if n.kind == kind}
        return [link for link in g.links if link[0] in keep and link[0] in by_name]


def _groups(links: list[tuple[str, Affinity, int]]) -> list[list[tuple[str, Affinity, int]]]:
    """Split an ordered link list into runs of equal (affinity, hops)."""
    groups: list[list[tuple[str, Affinity, int]]] = []
    for link in links:
        if groups and groups[-1][0][1:] == link[1:]:
            groups[-1].append(link)
        else:
            groups.append([link])
    return groups


@dataclass(frozen=True)
class _Dev:
    """A PCI device's place in the hierarchy."""

    pci: str | None
    host_bridge: str | None  # "pci0000:00"
    chain: tuple[str, ...]  # BDFs from the root port down to the device
    numa: int | None


def _place(path: str, pci: str | None, numa: int | None) -> _Dev:
    parts = path.split(os.sep)
    host = next((i for i, c in enumerate(parts) if _HOST_BRIDGE.match(c)), None)
    if host is None:
        return _Dev(pci, None, (), numa)
    chain = tuple(c for c in parts[host + 1 :] if _BDF.match(c))
    if pci and pci in chain:
        chain = chain[: chain.index(pci) + 1]
    return _Dev(pci, parts[host], chain, numa)


def _distance(a: _Dev, b: _Dev, single_node: bool) -> tuple[Affinity, int]:
    if a.host_bridge is not None and a.host_bridge == b.host_bridge:
        common = 0
        for x, y in zip(a.chain, b.chain):
            if x != y:
                break
            common += 1
        hops = len(a.chain) + len(b.chain) - 2 * common
        return (Affinity.SWITCH if common else Affinity.HOST_BRIDGE), hops
    na = a.numa if a.numa is not None else (0 if single_node else None)
    nb = b.numa if b.numa is not None else (0 if single_node else None)
    if na is not None and na == nb:
        return Affinity.NUMA, 0
    return Affinity.SYSTEM, 0


def _bdf_key(pci: str) -> tuple[int, ...]:
    dom, bus, rest = pci.split(":")
    dev, fn = rest.split(".")
    return int(dom, 16), int(bus, 16), int(dev, 16), int(fn, 16)


def topology(sysfs_root: str = "/sys") -> Topology:
    """Map each NVIDIA GPU to its nearest NICs and CPU cores, from sysfs.

    GPUs: PCI devices of vendor 0x10de and class 0x0302xx (3D controller) or
    0x0300xx (VGA), so NVSwitches and other NVIDIA functions are left out.
    NICs: RDMA devices (/sys/class/infiniband: EFA, ConnectX) and network
    interfaces backed by a device (/sys/class/net/*/device; lo, bridges and
    other virtual interfaces are left out), one :class:`NicDevice` per PCI
    function.  Distance: the deepest common ancestor in the resolved
    /sys/devices/pci… paths (:class:`Affinity`), then PCIe hops.

    ``sysfs_root`` points at a copy of /sys for tests.  A host without GPUs
    (or without a readable sysfs) gives an empty ``gpus``.
    """
    sysfs = _Sysfs(sysfs_root)
    node_dirs = [n for n in sysfs.listdir(sysfs.p("devices", "system", "node")) if re.fullmatch(r"node\d+", n)]
    numa_nodes = max(1, len(node_dirs))
    single_node = numa_nodes == 1
    pci_root = sysfs.p("bus", "pci", "devices")

    def pci_dir(pci: str) -> str:
        return os.path.join(pci_root, pci)

    def numa_of(pci: str | None) -> int | None:
        return sysfs.numa_of_pci(pci) if pci else None

    # NICs: group RDMA devices and net interfaces by the PCI function they sit on
    rdma: dict[str, list[str]] = {}  # PCI address (else resolved path) -> RDMA device names
    nets: dict[str, list[str]] = {}  # PCI address (else resolved path) -> interfaces
    paths: dict[str, str] = {}
    for cls, into in (("infiniband", rdma), ("net", nets)):
        for name in sysfs.listdir(sysfs.p("class", cls)):
            dev = sysfs.p("class", cls, name, "device")
            if not os.path.exists(dev):
                continue  # virtual: lo, bridges, veth, ifb
            real = os.path.realpath(dev)
            key = sysfs.pci_of(real) or real
            into.setdefault(key, []).append(name)
            paths.setdefault(key, real)
    nic_devs: list[NicDevice] = []
    for key in sorted(set(rdma) | set(nets)):
        path = paths[key]
        pci = sysfs.pci_of(path)
        names = rdma.get(key) or nets[key]
        base = pci_dir(pci) if pci else path
        for name in names:
            nic_devs.append(
                NicDevice(
                    name=name,
                    kind="rdma" if key in rdma else "net",
                    pci=pci,
                    numa_node=numa_of(pci),
                    driver=sysfs.driver_of(base),
                    interfaces=tuple(nets.get(key, ())),
                    vendor=(sysfs.read(os.path.join(base, "vendor")) or "") if pci else "",
                    device=(sysfs.read(os.path.join(base, "device")) or "") if pci else "",
                    path=path,
                )
            )
    nic_devs.sort(key=lambda n: (_bdf_key(n.pci) if n.pci else (1 << 32,), n.name))
    nic_places = [_place(n.path, n.pci, n.numa_node) for n in nic_devs]

    # GPUs, in PCI bus order
    gpu_pcis = []
    for pci in sysfs.listdir(pci_root):
        if not _BDF.match(pci):
            continue
        vendor = sysfs.read_int(os.path.join(pci_dir(pci), "vendor"), 16)
        klass = sysfs.read_int(os.path.join(pci_dir(pci), "class"), 16)
        if vendor == _NVIDIA and klass is not None and (klass >> 8) in _GPU_CLASSES:
            gpu_pcis.append(pci)
    gpu_pcis.sort(key=_bdf_key)

    all_cpus = parse_cpulist(sysfs.read(sysfs.p("devices", "system", "cpu", "online")) or "")
    gpus = []
    for index, pci in enumerate(gpu_pcis):
        d = pci_dir(pci)
        path = os.path.realpath(d)
        numa = numa_of(pci)
        place = _place(path, pci, numa)
        links = []
        for nic, np_ in zip(nic_devs, nic_places):
            aff, hops = _distance(place, np_, single_node)
            links.append((nic.name, aff, hops))
        order = {n.name: i for i, n in enumerate(nic_devs)}  # PCI order breaks remaining ties
        links.sort(key=lambda x: (x[1], x[2], order[x[0]]))
        cpus = parse_cpulist(sysfs.read(os.path.join(d, "local_cpulist")) or "")
        if not cpus and numa is not None:
            cpus = parse_cpulist(sysfs.read(sysfs.p("devices", "system", "node", f"node{numa}", "cpulist")) or "")
        gpus.append(
            GpuInfo(
                index=index,
                pci=pci,
                numa_node=numa,
                nics=tuple(n for n, _a, _h in links),
                links=tuple(links),
                cpus=cpus or all_cpus,
                device=sysfs.read(os.path.join(d, "device")) or "",
                path=path,
            )
        )
    return Topology(gpus=tuple(gpus), nics=tuple(nic_devs), numa_nodes=numa_nodes)
