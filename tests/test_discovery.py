"""aiote.nics(): what libfabric offers on this host (shm and tcp on loopback here)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

import aiote
from aiote import NicInfo
from aiote.errors import InvalidArgument

_spec = importlib.util.spec_from_file_location("aiote_sysfs_layouts",
                                               Path(__file__).parent / "fixtures" / "sysfs" / "layouts.py")
layouts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layouts)


@pytest.fixture(scope="module")
def all_nics() -> list[NicInfo]:
    return aiote.nics()


def test_lists_shm_and_tcp(all_nics):
    shm = [n for n in all_nics if n.provider == "shm"]
    assert len(shm) == 1 and shm[0].domain == "shm" and shm[0].fabric == "shm"
    assert shm[0].interface == "" and shm[0].pci is None  # no device under shared memory
    rxm = {n.domain: n for n in all_nics if n.provider == "tcp;ofi_rxm"}
    assert "lo" in rxm
    assert rxm["lo"].interface == "lo"
    assert rxm["lo"].layers == ("tcp", "ofi_rxm")
    # one entry per provider + domain: libfabric's per-address-family / per-endpoint-type entries are merged
    keys = [(n.provider, n.domain) for n in all_nics]
    assert len(keys) == len(set(keys))


def test_fields_are_typed(all_nics):
    assert all_nics and all(isinstance(n, NicInfo) for n in all_nics)
    for n in all_nics:
        for name in ("provider", "fabric", "domain", "interface", "driver", "network_type", "link_state",
                     "vendor_id", "device_id", "firmware"):
            assert isinstance(getattr(n, name), str), name
        assert n.provider and n.domain
        for name in ("caps_bits", "mr_mode_bits", "cq_data_size", "mr_key_size", "max_msg_size", "inject_size"):
            assert isinstance(getattr(n, name), int) and getattr(n, name) >= 0, name
        for name in ("pci", "numa_node", "link_speed", "mtu"):
            value = getattr(n, name)
            assert value is None or isinstance(value, str if name == "pci" else int), name
        if n.pci is not None:
            assert len(n.pci) == 12 and n.pci[4] == ":" and n.pci[7] == ":" and n.pci[10] == "."
        assert n.link_speed is None or n.link_speed > 0
        assert n.link_state in ("up", "down", "unknown")
        assert isinstance(n.hmem, bool) and isinstance(n.rma, bool)
        assert n.ep_types and n.ep_types <= {"rdm", "msg", "dgram"}
        assert isinstance(n.caps, frozenset) and all(c.startswith("FI_") for c in n.caps)
        assert all(m.startswith("FI_MR_") for m in n.mr_mode)
        # the names and booleans agree with the bits
        assert n.rma == ("FI_RMA" in n.caps) and n.hmem == ("FI_HMEM" in n.caps)
        assert bool(n.caps_bits) == bool(n.caps)
        hash(n)


def test_capabilities_of_the_providers_aiote_uses(all_nics):
    for n in all_nics:
        if n.provider in ("shm", "tcp;ofi_rxm"):
            assert n.rma and "rdm" in n.ep_types and n.cq_data_size >= 4
            assert {"FI_RMA", "FI_WRITE", "FI_REMOTE_WRITE", "FI_MSG"} <= n.caps
            assert n.supports_write_imm
    assert any(n.hmem for n in all_nics if n.provider == "shm")  # shm advertises FI_HMEM when asked
    assert not any(n.supports_write_imm for n in all_nics if n.provider == "udp")  # datagrams only


def test_provider_filter(all_nics):
    shm = aiote.nics("shm")
    assert [(n.provider, n.domain) for n in shm] == [("shm", "shm")]
    exact = aiote.nics("tcp;ofi_rxm")
    assert exact and {n.provider for n in exact} == {"tcp;ofi_rxm"}
    # a layer name matches the core provider and every stack built on it
    layer = aiote.nics("tcp")
    assert {"tcp", "tcp;ofi_rxm"} <= {n.provider for n in layer}
    assert all("tcp" in n.layers for n in layer)
    assert {n.provider for n in aiote.nics("ofi_rxm")} >= {"tcp;ofi_rxm"}
    assert all("ofi_rxm" in n.layers for n in aiote.nics("ofi_rxm"))
    # filtered lists are sublists of the full one, in the same order
    assert [n for n in all_nics if "tcp" in n.layers] == layer


def test_unknown_provider_gives_an_empty_list():
    assert aiote.nics("no-such-provider") == []
    assert aiote.nics("tcp;ofi_rx") == []  # names match whole layers, not prefixes
    assert aiote.nics("efa") == [] or all(n.provider.startswith("efa") for n in aiote.nics("efa"))


def test_bad_provider_type():
    with pytest.raises(InvalidArgument):
        aiote.nics(42)  # type: ignore[arg-type]


@pytest.mark.skipif(not os.path.exists("/sys/class/net/lo"), reason="needs sysfs")
def test_loopback_link_from_sysfs(all_nics):
    lo = next(n for n in all_nics if n.provider == "tcp;ofi_rxm" and n.domain == "lo")
    assert lo.link_state == "up"  # operstate "unknown" but carrier 1
    assert lo.mtu == int(Path("/sys/class/net/lo/mtu").read_text())
    assert lo.pci is None


def test_sysfs_facts_fill_what_libfabric_leaves_out(tmp_path):
    """tcp reports no fid_nic: link speed, state, PCI address and NUMA node come from the
    interface's sysfs entry (here a fixture that puts "lo" on a PCI NIC)."""
    layout = {"name": "fake", "nodes": {"0": "0-1", "1": "2-3"}, "devices": [
        {"path": "pci0000:80/0000:80:01.0/0000:81:00.0", "vendor": "0x15b3", "device": "0x1021",
         "class": "0x020000", "numa_node": 1, "driver": "mlx5_core",
         "net": {"lo": {"speed": 200000, "operstate": "up", "mtu": 9000}}}]}
    root = layouts.build(layout, tmp_path / "sys")
    lo = next(n for n in aiote.nics("tcp;ofi_rxm", sysfs_root=str(root)) if n.domain == "lo")
    assert (lo.interface, lo.pci, lo.numa_node, lo.driver) == ("lo", "0000:81:00.0", 1, "mlx5_core")
    assert (lo.link_speed, lo.link_state, lo.mtu) == (200_000_000_000, "up", 9000)


async def test_discovered_domains_open_an_engine():
    """The domain names nics() reports are what TransferEngine(nics=[...]) takes."""
    lo = [n.domain for n in aiote.nics("tcp;ofi_rxm") if n.domain == "lo"]
    assert lo == ["lo"]
    async with aiote.TransferEngine("tcp", host="127.0.0.1", nics=lo * 2) as eng:
        assert eng.info()["nics"] == 2
        assert eng.info()["domain"] == "lo"
