"""--disk as a machine option, and the PCI topology planned from it (numavm.plan.pci)."""

from __future__ import annotations

import json

import pytest

from numavm import ConfigError, Machine
from numavm.plan.layout import E820Type, HIGH_RAM_BASE, LOW_RAM_LIMIT
from numavm.plan.pci import (BRIDGE_WINDOW, ECAM_BASE, ECAM_BUS_SIZE, MMIO_BASE, VIRTIO_BAR_SIZE, ecam_address,
                             plan_pci)
from numavm.spec.devices import MAX_DEVICES_PER_DOMAIN, MAX_DISKS, Disk, parse_disk
from numavm.spec.config import loads

TWO = ["id=0,size=256M,cpus=0", "id=1,size=256M,cpus=1"]


def test_parse_disk_forms() -> None:
    assert parse_disk("a.img") == Disk("a.img", 0, False, False, "--disk a.img")
    d = parse_disk("/x/b.img,domain=3,readonly,initiator")
    assert (d.path, d.domain, d.readonly, d.initiator) == ("/x/b.img", 3, True, True)
    assert parse_disk("a,,b.img,domain=1").path == "a,b.img"
    assert parse_disk("a.img,readonly=off").readonly is False
    assert parse_disk(d.option()) == d


@pytest.mark.parametrize("text, words", [
    ("", "the image first"),
    ("a.img,domain=-1", "domain: must be 0 or more"),
    ("a.img,domain=x", "domain"),
    ("a.img,bus=3", "unknown key 'bus=3'"),
    ("a.img,readonly,readonly", "readonly given twice"),
    ("a.img,domain=1,domain=2", "domain given twice"),
    ("x" * 5000, "longer than"),
])
def test_parse_disk_refuses(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_disk(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_machine_rules() -> None:
    with pytest.raises(ConfigError, match="no domain 2; the machine has domains 0..1"):
        Machine(cpus=2, domains=TWO, disks=["a.img,domain=2"])
    with pytest.raises(ConfigError, match="generic initiator needs NUMA domains"):
        Machine(disks=["a.img,initiator"])
    with pytest.raises(ConfigError, match="a domain needs memory .* or a generic initiator"):
        Machine(cpus=2, domains=TWO + ["id=2,size=0"], disks=["a.img,domain=2"])
    with pytest.raises(ConfigError, match=f"at most {MAX_DISKS} disks"):
        Machine(cpus=2, domains=TWO, disks=[f"d{k}.img,domain={k % 2}" for k in range(MAX_DISKS + 1)])
    with pytest.raises(ConfigError, match=f"at most {MAX_DEVICES_PER_DOMAIN} devices per domain"):
        Machine(cpus=2, domains=TWO, disks=[f"d{k}.img" for k in range(MAX_DEVICES_PER_DOMAIN + 1)])
    # an initiator-only domain: no memory, no vCPUs
    m = Machine(cpus=2, domains=TWO + ["id=2,size=0"], disks=["a.img,domain=2,initiator"])
    assert m.topology.initiators == {2}
    assert m.layout.domains[2].ranges == () and m.layout.domains[2].apic_ids == ()


def test_no_devices_no_pci() -> None:
    m = Machine(cpus=2, domains=TWO)
    assert not m.layout.pci and m.layout.pci.ecam is None
    assert all(not (LOW_RAM_LIMIT <= e.start < HIGH_RAM_BASE) for e in m.layout.e820)
    assert m.plan().to_dict()["pci"] == {"ecam": None, "bridges": [], "devices": []}


def test_bridges_per_domain_and_slots_in_order() -> None:
    m = Machine(cpus=2, domains=TWO + ["id=2,size=0"],
                disks=["a.img,domain=1", "b.img,domain=2,initiator", {"path": "c.img", "domain": 1, "readonly": True}])
    pci = m.layout.pci
    assert [(b.domain, b.bus, b.uid, b.pxm) for b in pci.bridges] == [(1, 2, 2, 1), (2, 4, 4, 2)]
    assert [(d.index, d.bdf, d.initiator) for d in pci.devices] == [
        (0, "0000:02:00.0", False), (1, "0000:04:00.0", True), (2, "0000:02:01.0", False)]
    for d in pci.devices:  # every BAR inside its bridge's window, none overlapping
        bridge = pci.bridge_of(d.domain)
        assert bridge is not None and d.bar0 in bridge.mmio and d.bar0 + VIRTIO_BAR_SIZE <= bridge.mmio.end
    bars = sorted(d.bar0 for d in pci.devices)
    assert all(b - a >= VIRTIO_BAR_SIZE for a, b in zip(bars, bars[1:]))
    assert pci.bridges[1].mmio.start == MMIO_BASE + BRIDGE_WINDOW
    assert pci.ecam is not None and (pci.ecam.start, pci.ecam.end) == (ECAM_BASE, ECAM_BASE + 5 * ECAM_BUS_SIZE)
    assert pci.devices[2].config_addr == ecam_address(2, 1, 0) == ECAM_BASE + (2 << 20) + (1 << 15)
    reserved = [e for e in m.layout.e820 if e.start == ECAM_BASE]
    assert reserved and reserved[0].type == E820Type.RESERVED and reserved[0].end == pci.ecam.end
    doc = json.loads(m.plan().to_json())["pci"]
    assert doc["devices"][1] == {"kind": "virtio-blk", "bdf": "0000:04:00.0", "domain": 2,
                                 "bar0": MMIO_BASE + BRIDGE_WINDOW, "initiator": True, "path": "b.img",
                                 "readonly": False}
    text = m.plan().text()
    assert "host bridge for domain 2: bus 0x04, _UID 4, _PXM 2" in text and "0000:02:01.0  virtio-blk  c.img, read-only" in text


def test_classic_machine_bridge_has_no_pxm() -> None:
    pci = plan_pci(Machine(disks=["a.img"]).topology)
    assert [(b.domain, b.bus, b.pxm) for b in pci.bridges] == [(0, 2, None)]


def test_toml_disks_and_cli_replace_them() -> None:
    spec = loads('cpus = 1\n[[domain]]\nid = 0\nsize = "64M"\ncpus = "0"\n'
                 '[[disk]]\npath = "a.img"\nreadonly = true\n', "t.toml")
    assert [(d.path, d.domain, d.readonly) for d in spec.disks] == [("a.img", 0, True)]
    with pytest.raises(ConfigError, match=r"t.toml: disk\[0\]: unknown key 'bus'"):
        loads('[[disk]]\npath = "a"\nbus = 1\n', "t.toml")
    with pytest.raises(ConfigError, match=r"disk\[0\].readonly: true or false"):
        loads('[[disk]]\npath = "a"\nreadonly = "yes"\n', "t.toml")
    m = Machine.from_options(["-n", "id=0,size=64M,cpus=0", "--disk", "b.img"])
    assert [d.path for d in m.topology.disks] == ["b.img"]


# ---------------------------------------------------------------- a run's shares (KVM engine)


def test_shares_after_the_disks_which_keep_their_addresses() -> None:
    """Shares go on the boot vCPU's domain's bridge, after its disks; a bridge made for them
    comes after every disk's bridge, so no disk's BDF or BAR moves (and the DSDT/MCFG follow)."""
    from numavm.plan.acpi import build_tables
    from numavm.plan.layout import with_shares
    from numavm.plan.pci import VIRTIO_9P, VIRTIO_BLK

    m = Machine(cpus=2, domains=TWO, disks=["a.img,domain=1", "b.img,domain=1"])
    lay = with_shares(m.layout, 2)
    assert lay.pci.devices[:2] == m.layout.pci.devices and lay.pci.bridges[0] == m.layout.pci.bridges[0]
    assert [(b.domain, b.bus, b.pxm) for b in lay.pci.bridges] == [(1, 2, 1), (0, 4, 0)]
    assert [(d.kind, d.index, d.bdf, d.domain, d.initiator) for d in lay.pci.of_kind(VIRTIO_9P)] == [
        (VIRTIO_9P, 0, "0000:04:00.0", 0, False), (VIRTIO_9P, 1, "0000:04:01.0", 0, False)]
    assert lay.pci.of_kind(VIRTIO_BLK) == m.layout.pci.devices
    assert lay.pci.devices[2].bar0 == MMIO_BASE + BRIDGE_WINDOW
    assert lay.pci.ecam is not None and lay.pci.ecam.end == ECAM_BASE + 5 * ECAM_BUS_SIZE
    assert [e for e in lay.e820 if e.start == ECAM_BASE][0].end == lay.pci.ecam.end
    assert lay.domains == m.layout.domains and lay.apic_ids == m.layout.apic_ids
    blobs = build_tables(lay).blobs()  # the DSDT has both bridges, the MCFG buses 0..4
    assert b"PC02" in blobs["DSDT"] and b"PC04" in blobs["DSDT"]
    assert with_shares(m.layout, 0) is m.layout


def test_shares_join_the_boot_domains_disks_and_skip_a_memory_only_domain_0() -> None:
    from numavm.plan.layout import with_shares

    m = Machine(cpus=2, domains=TWO, disks=["a.img,domain=0"])
    lay = with_shares(m.layout, 1)
    assert [(d.kind, d.bdf) for d in lay.pci.devices] == [("virtio-blk", "0000:02:00.0"), ("virtio-9p", "0000:02:01.0")]
    assert len(lay.pci.bridges) == 1
    mem0 = Machine(cpus=1, domains=["id=0,size=128M", "id=1,size=128M,cpus=0"])
    assert [(b.domain, b.bus) for b in with_shares(mem0.layout, 1).pci.bridges] == [(1, 2)]
    classic = with_shares(Machine().layout, 3)
    assert [(b.domain, b.bus, b.pxm) for b in classic.pci.bridges] == [(0, 2, None)]
    full = Machine(cpus=2, domains=TWO, disks=[f"d{k}.img" for k in range(MAX_DEVICES_PER_DOMAIN - 1)])
    assert len(with_shares(full.layout, 1).pci.devices) == MAX_DEVICES_PER_DOMAIN
    with pytest.raises(ValueError, match="2 shares do not fit domain 0's bus beside its 31 disks"):
        with_shares(full.layout, 2)


def test_a_layout_with_shares_renders_and_checks_its_disks_only() -> None:
    from numavm.check.compare import compare_devices
    from numavm.check.report import GuestReport
    from numavm.plan.layout import with_shares
    from numavm.plan.render import pci_document, pci_text

    m = Machine(cpus=2, domains=TWO, disks=["a.img,domain=1"])
    lay = with_shares(m.layout, 1)
    assert pci_document(lay)["devices"][1] == {"kind": "virtio-9p", "bdf": "0000:04:00.0", "domain": 0,
                                               "bar0": MMIO_BASE + BRIDGE_WINDOW, "initiator": False, "share": 0}
    assert "    0000:04:00.0  virtio-9p  share 0" in pci_text(lay)
    # the guest reports no 9p device at all: only the disk is compared
    report = GuestReport.from_document({"pci": {}})
    out = compare_devices(lay, report, {0: 0, 1: 1})
    assert [line for line in out if "0000:04" in line] == [] and any("disk 0 (0000:02:00.0" in o for o in out)


def test_the_kvm_engine_refuses_shares_that_do_not_fit_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from numavm.spec.shares import parse_shares
    from numavm.vmm.kvm.machine import shares_layout

    full = Machine(cpus=2, domains=TWO, disks=[f"d{k}.img" for k in range(MAX_DEVICES_PER_DOMAIN)])
    with pytest.raises(ConfigError, match=r"^--share: 1 shares do not fit domain 0's bus beside its 32 disks "
                                          r"\(32 slots\) on the KVM engine$"):
        shares_layout(full.layout, parse_shares([str(tmp_path)]))
    assert shares_layout(full.layout, ()) is full.layout
