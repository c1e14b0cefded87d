"""aiote.topology(): GPU ↔ NIC ↔ CPU mapping from sysfs, on fixture trees of real layouts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

import aiote
from aiote.errors import InvalidArgument
from aiote.topology import Affinity, NicDevice, parse_cpulist

_spec = importlib.util.spec_from_file_location("aiote_sysfs_layouts",
                                               Path(__file__).parent / "fixtures" / "sysfs" / "layouts.py")
layouts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layouts)
_spec = importlib.util.spec_from_file_location("aiote_sysfs_capture",
                                               Path(__file__).parent / "fixtures" / "sysfs" / "capture.py")
capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capture)


def build(tmp_path: Path, layout: dict) -> str:
    return str(layouts.build(layout, tmp_path / "sys"))


# ---------------------------------------------------------------- the fixture trees themselves


def test_fixture_tree_looks_like_sysfs(tmp_path):
    root = Path(build(tmp_path, layouts.p5_48xlarge()))
    link = root / "bus" / "pci" / "devices" / "0000:53:00.0"
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert os.path.realpath(link).endswith("pci0000:4c/0000:4c:01.0/0000:4d:00.0/0000:4e:04.0/0000:53:00.0")
    ib = root / "class" / "infiniband" / "rdmap79s0"
    assert ib.is_symlink()
    assert os.path.realpath(ib / "device") == os.path.realpath(root / "bus" / "pci" / "devices" / "0000:4f:00.0")
    assert os.path.basename(os.path.realpath(ib / "device" / "driver")) == "efa"
    assert os.path.realpath(root / "class" / "net" / "ens32" / "device").endswith("pci0000:00/0000:00:05.0")


# ---------------------------------------------------------------- (a) p5.48xlarge: 8 GPUs, 4 EFA behind each


def _p5_efa(i: int) -> list[str]:
    g = 0x53 + 0x11 * i
    return [f"rdmap{g - 4 + j}s0" for j in range(4)]


def test_p5_gpus_in_pci_order_without_nvswitches(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.p5_48xlarge()))
    assert [g.pci for g in topo.gpus] == [f"0000:{0x53 + 0x11 * i:02x}:00.0" for i in range(8)]
    assert [g.index for g in topo.gpus] == list(range(8))
    assert {g.device for g in topo.gpus} == {"0x2330"}
    assert [g.numa_node for g in topo.gpus] == [0] * 4 + [1] * 4
    assert topo.numa_nodes == 2


def test_p5_nics(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.p5_48xlarge()))
    rdma = [n for n in topo.nics if n.kind == "rdma"]
    assert len(rdma) == 32
    assert {n.driver for n in rdma} == {"efa"}
    assert all(n.interfaces == () for n in rdma)  # EFA has no netdev
    # the ENA is the one network device; lo and docker0 are virtual and left out, NVMe is no NIC
    net = [n for n in topo.nics if n.kind == "net"]
    assert [(n.name, n.pci, n.driver, n.interfaces) for n in net] == [("ens32", "0000:00:05.0", "ena", ("ens32",))]
    assert topo.nic("rdmap79s0").pci == "0000:4f:00.0"
    assert topo.nic("rdmap79s0").numa_node == 0
    assert isinstance(topo.nic("rdmap79s0"), NicDevice)
    with pytest.raises(KeyError):
        topo.nic("mlx5_0")


def test_p5_each_gpu_gets_the_four_efa_behind_its_switch(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.p5_48xlarge()))
    for i, g in enumerate(topo.gpus):
        mine = _p5_efa(i)
        assert topo.nics_for_gpu(i) == mine
        assert list(g.nics[:4]) == mine
        assert [g.affinity(n) for n in mine] == [Affinity.SWITCH] * 4
        assert {hops for _n, _a, hops in g.links[:4]} == {4}  # up to the switch and down again
        # then the other EFA NICs of its socket, then the other socket's
        same_socket = {n for j in range(8) if (j < 4) == (i < 4) and j != i for n in _p5_efa(j)}
        other_socket = {n for j in range(8) if (j < 4) != (i < 4) for n in _p5_efa(j)}
        assert all(g.affinity(n) == Affinity.NUMA for n in same_socket)
        assert all(g.affinity(n) == Affinity.SYSTEM for n in other_socket)
        assert g.affinity("ens32") == (Affinity.NUMA if i < 4 else Affinity.SYSTEM)
        assert [a for _n, a, _h in g.links] == sorted(a for _n, a, _h in g.links)
        with pytest.raises(KeyError):
            g.affinity("nope")


def test_p5_k_and_provider_names(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.p5_48xlarge()))
    assert topo.nics_for_gpu(2, k=2) == _p5_efa(2)[:2]
    assert topo.nics_for_gpu(2, k=1) == _p5_efa(2)[:1]
    # k beyond the best level continues with the next nearest (same socket)
    six = topo.nics_for_gpu(0, k=6)
    assert six[:4] == _p5_efa(0) and all(topo.gpus[0].affinity(n) == Affinity.NUMA for n in six[4:])
    assert len(topo.nics_for_gpu(0, k=100)) == 32
    # libfabric's efa domain names carry the endpoint type
    assert topo.nics_for_gpu(5, provider="efa") == [f"{n}-rdm" for n in _p5_efa(5)]
    assert topo.nics_for_gpu(5, provider="verbs;ofi_rxm") == _p5_efa(5)
    # tcp runs over network interfaces only: the ENA
    assert topo.nics_for_gpu(0, provider="tcp") == ["ens32"]
    assert topo.nics_for_gpu(7, provider="tcp;ofi_rxm") == ["ens32"]
    assert topo.nics_for_gpu(0, provider="shm") == []


def test_p5_cpus(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.p5_48xlarge()))
    node0 = tuple(range(0, 48)) + tuple(range(96, 144))
    node1 = tuple(range(48, 96)) + tuple(range(144, 192))
    assert [g.cpus for g in topo.gpus] == [node0] * 4 + [node1] * 4


def test_bad_arguments(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.p5_48xlarge()))
    with pytest.raises(IndexError):
        topo.nics_for_gpu(8)
    with pytest.raises(IndexError):
        topo.nics_for_gpu(-1)
    for k in (0, -1, 1.5):
        with pytest.raises(InvalidArgument):
            topo.nics_for_gpu(0, k=k)


# ---------------------------------------------------------------- (b) 2 sockets, 2 ConnectX per socket


def test_two_socket_numa_only_affinity(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.two_socket_cx7()))
    assert len(topo.gpus) == 8  # 7 3D controllers + 1 VGA-class NVIDIA part; the BMC's VGA is not NVIDIA
    assert topo.gpus[7].device == "0x26b1"
    assert [n.name for n in topo.nics if n.kind == "rdma"] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    assert topo.nic("mlx5_0").interfaces == ("ibp17s0",)
    assert topo.nic("mlx5_2").interfaces == ("ens145np0",)
    assert topo.nic("mlx5_0").driver == "mlx5_core"
    for i, g in enumerate(topo.gpus):
        local, remote = (["mlx5_0", "mlx5_1"], ["mlx5_2", "mlx5_3"]) if i < 4 else (["mlx5_2", "mlx5_3"],
                                                                                   ["mlx5_0", "mlx5_1"])
        assert sorted(topo.nics_for_gpu(i)) == local
        assert all(g.affinity(n) == Affinity.NUMA for n in local)
        assert all(g.affinity(n) == Affinity.SYSTEM for n in remote)
        assert g.cpus == parse_cpulist("0-31,64-95" if i < 4 else "32-63,96-127")


def test_two_socket_gpus_sharing_nics_spread_over_them(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.two_socket_cx7()))
    assert [topo.nics_for_gpu(i, k=1)[0] for i in range(8)] == [
        "mlx5_0", "mlx5_1", "mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_2", "mlx5_3"]
    assert topo.nics_for_gpu(1) == ["mlx5_1", "mlx5_0"]
    assert topo.nics_for_gpu(1, k=3) == ["mlx5_1", "mlx5_0", topo.nics_for_gpu(1, k=3)[2]]
    # each GPU's own list is a plain nearest-first list (ties in PCI order), over every NIC
    assert topo.gpus[1].nics[:3] == ("eno1", "mlx5_0", "mlx5_1")


def test_two_socket_tcp_prefers_the_nic_on_the_gpus_root_complex(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.two_socket_cx7()))
    # GPU 0 sits on host bridge pci0000:00 with the onboard eno1: nearer than any ConnectX
    assert topo.gpus[0].affinity("eno1") == Affinity.HOST_BRIDGE
    assert topo.nics_for_gpu(0, provider="tcp") == ["eno1"]
    # GPU 1 is on its own root complex: the onboard NIC is as near as the ConnectX (distance, not speed)
    assert topo.nics_for_gpu(1, provider="tcp") == ["eno1", "ibp17s0", "ibp49s0"]
    assert topo.nics_for_gpu(4, provider="tcp") == ["ens145np0", "ens177np0"]
    assert topo.nics_for_gpu(5, provider="tcp") == ["ens177np0", "ens145np0"]
    assert topo.nics_for_gpu(0, provider="verbs") == ["mlx5_0", "mlx5_1"]


# ---------------------------------------------------------------- (c) no GPU


def test_no_gpu(tmp_path):
    topo = aiote.topology(build(tmp_path, layouts.no_gpu()))
    assert topo.gpus == ()
    assert [(n.name, n.kind, n.pci, n.numa_node) for n in topo.nics] == [("eth0", "net", "0000:00:03.0", None)]
    assert topo.numa_nodes == 1
    with pytest.raises(IndexError):
        topo.nics_for_gpu(0)


def test_empty_or_missing_sysfs(tmp_path):
    for root in (tmp_path, tmp_path / "absent"):
        topo = aiote.topology(str(root))
        assert topo.gpus == () and topo.nics == ()


# ---------------------------------------------------------------- captured from a real host


def test_captured_h200_vm(tmp_path):
    """A 4×H200 cloud VM (captured with capture.py): flat PCI, one virtio NIC, no NUMA info."""
    (layout,) = [lay for lay in layouts.captured() if lay["name"] == "h200x4_vm"]
    topo = aiote.topology(build(tmp_path, layout))
    assert [g.pci for g in topo.gpus] == ["0000:00:06.0", "0000:00:07.0", "0000:00:08.0", "0000:00:09.0"]
    assert {g.device for g in topo.gpus} == {"0x2335"}
    assert all(g.numa_node is None and g.cpus == tuple(range(64)) for g in topo.gpus)
    assert [n.name for n in topo.nics] == ["eth0"]
    for i, g in enumerate(topo.gpus):
        assert g.links == (("eth0", Affinity.HOST_BRIDGE, 2),)
        assert topo.nics_for_gpu(i) == ["eth0"]


@pytest.mark.parametrize("layout", layouts.all_layouts(), ids=lambda lay: lay["name"])
def test_every_layout_is_consistent(tmp_path, layout):
    topo = aiote.topology(build(tmp_path, layout))
    names = {n.name for n in topo.nics}
    for g in topo.gpus:
        assert sorted(g.nics) == sorted(names)
        assert [n for n, _a, _h in g.links] == list(g.nics)
        assert [(a, h) for _n, a, h in g.links] == sorted((a, h) for _n, a, h in g.links)
        assert g.cpus
    hash(topo)  # frozen all the way down


def _shape(topo):
    """A topology without its (root-dependent) sysfs paths."""
    return ([(g.pci, g.numa_node, g.links, g.cpus, g.device) for g in topo.gpus],
            [(n.name, n.kind, n.pci, n.numa_node, n.driver, n.interfaces, n.vendor) for n in topo.nics])


@pytest.mark.parametrize("layout", [layouts.p5_48xlarge(), layouts.no_gpu()], ids=["p5_48xlarge", "no_gpu"])
def test_capture_round_trip(tmp_path, layout):
    """capture.py (how real layouts are recorded) reads back what layouts.build wrote."""
    first = build(tmp_path / "a", layout)
    again = layouts.build(capture.capture("again", first), tmp_path / "b")
    assert _shape(aiote.topology(str(again))) == _shape(aiote.topology(first))


def test_capture_of_this_machine_round_trips(tmp_path):
    again = layouts.build(capture.capture("here"), tmp_path / "sys")
    assert _shape(aiote.topology(str(again))) == _shape(aiote.topology())


# ---------------------------------------------------------------- smaller layouts for the distance rules


def _dev(path, vendor="0x10de", cls="0x030200", numa=0, **kw):
    return {"path": path, "vendor": vendor, "device": "0x0001", "class": cls, "numa_node": numa, **kw}


def _nic(path, name, numa=0):
    return _dev(path, vendor="0x15b3", cls="0x020700", numa=numa, driver="mlx5_core", infiniband=[name])


def test_deeper_common_switch_wins_but_the_level_groups(tmp_path):
    # top switch 0000:01 → leaf switches on 0000:02:00.0 and 0000:02:01.0
    top = "pci0000:00/0000:00:01.0/0000:01:00.0"
    layout = {"name": "cascade", "nodes": {"0": "0-7"}, "cpus_online": "0-7", "devices": [
        _dev(f"{top}/0000:02:00.0/0000:03:00.0/0000:04:00.0/0000:05:00.0"),
        _nic(f"{top}/0000:02:01.0/0000:06:00.0/0000:07:00.0/0000:08:00.0", "mlx5_far"),
        _nic(f"{top}/0000:02:00.0/0000:03:00.0/0000:04:01.0/0000:09:00.0", "mlx5_near"),
        _nic("pci0000:00/0000:00:02.0/0000:0a:00.0", "mlx5_phb"),
        _nic("pci0000:80/0000:80:01.0/0000:81:00.0", "mlx5_node"),
    ]}
    topo = aiote.topology(build(tmp_path, layout))
    g = topo.gpus[0]
    assert g.nics == ("mlx5_near", "mlx5_far", "mlx5_phb", "mlx5_node")
    assert [a for _n, a, _h in g.links] == [Affinity.SWITCH, Affinity.SWITCH, Affinity.HOST_BRIDGE, Affinity.NUMA]
    assert topo.nics_for_gpu(0) == ["mlx5_near", "mlx5_far"]
    assert topo.nics_for_gpu(0, k=1) == ["mlx5_near"]


def test_unknown_numa_counts_as_same_node_only_on_single_node_hosts(tmp_path):
    devices = [_dev("pci0000:00/0000:00:01.0/0000:01:00.0", numa=-1),
               _nic("pci0000:80/0000:80:01.0/0000:81:00.0", "mlx5_0", numa=-1)]
    one = aiote.topology(build(tmp_path / "one", {"name": "one", "nodes": {"0": "0-3"}, "devices": devices}))
    assert one.gpus[0].affinity("mlx5_0") == Affinity.NUMA
    two = aiote.topology(build(tmp_path / "two", {"name": "two", "nodes": {"0": "0-1", "1": "2-3"},
                                                  "devices": devices}))
    assert two.gpus[0].affinity("mlx5_0") == Affinity.SYSTEM
    assert two.gpus[0].numa_node is None


def test_cpus_fall_back_to_the_numa_node(tmp_path):
    layout = {"name": "nocpulist", "nodes": {"0": "0-3", "1": "4-7"}, "cpus_online": "0-7",
              "devices": [_dev("pci0000:00/0000:00:01.0/0000:01:00.0", numa=1)]}
    assert aiote.topology(build(tmp_path, layout)).gpus[0].cpus == (4, 5, 6, 7)


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpulist("") == ()
    assert parse_cpulist("0-6:2") == (0, 2, 4, 6)
    assert parse_cpulist("5,1") == (1, 5)


# ---------------------------------------------------------------- this machine


def _nvidia_gpus_in(sysfs: Path) -> int:
    count = 0
    for d in (sysfs / "bus" / "pci" / "devices").glob("*"):
        try:
            vendor = (d / "vendor").read_text().strip()
            cls = int((d / "class").read_text(), 16)
        except OSError:
            continue
        count += vendor == "0x10de" and (cls >> 8) in (0x0302, 0x0300)
    return count


def test_real_sysfs():
    topo = aiote.topology()
    assert len(topo.gpus) == _nvidia_gpus_in(Path("/sys"))  # 0 on the CI machine: no crash, empty list
    assert topo.numa_nodes >= 1
    for n in topo.nics:
        assert n.kind in ("rdma", "net") and n.name
        assert os.path.exists(f"/sys/class/{'infiniband' if n.kind == 'rdma' else 'net'}/{n.name}")
    for g in topo.gpus:
        assert g.cpus and isinstance(topo.nics_for_gpu(g.index), list)
