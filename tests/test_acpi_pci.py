"""What the guest is told about its PCI devices: MCFG, host bridges in the DSDT, SRAT generic
initiators (each table read back by `iasl -d`), and the node numbering Linux makes of them."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from numavm import Machine
from numavm.check.compare import pxm_to_node_from_plan, pxm_to_node_from_srat
from numavm.check.linux_numa import expected_pxm_to_node, expected_view, generic_initiator_nodes, node_numbering
from numavm.plan import acpi
from numavm.plan.layout import STREAM_UARTS, Layout
from test_acpi import _norm_asl, check_header, disassemble, hexval, iasl, srat_cpus, srat_mems

TWO = ["-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M,cpus=1"]


def layout(*opts: str) -> Layout:
    return Machine.from_options(list(opts)).plan().layout


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("acpi-pci")


def _digest(t: acpi.AcpiTables) -> str:
    return hashlib.sha256(b"".join(a.to_bytes(8, "little") + b for a, b in t.placements())).hexdigest()[:16]


# Every table (and where it goes) as main built them before devices existed (d818247):
# sha256 over (address, bytes) of every placement, for the console alone and with the streams' UARTs.
BEFORE_DEVICES = {
    "example": ((), "a9fbfd09cd9c7329", "d9e17b85bf46cf89"),
    "classic": (("-c", "2", "-m", "512M"), "1de1c9bac057a3ce", "390dce4a359a0015"),
    "two": (tuple(TWO), "ac725fa3009d8da4", "b556ffc234aa93a8"),
    "hmat": (("-f", "examples/cxl-tiered.toml"), "91530d281d22b533", "81ce71c3421c04b1"),
    "cpu-only": (("-c", "3", "-n", "id=0,size=256M,cpus=0-1", "-n", "id=1,size=0,cpus=2"),
                 "31202dfe10c86701", "6105fb2977754921"),
}


@pytest.mark.parametrize("name", sorted(BEFORE_DEVICES))
def test_machine_without_devices_keeps_its_tables(name: str) -> None:
    opts, console, streams = BEFORE_DEVICES[name]
    lay = Machine.example().plan().layout if not opts else layout(*opts)
    assert _digest(acpi.build_tables(lay)) == console
    assert _digest(acpi.build_tables(lay, STREAM_UARTS)) == streams


# ---------------------------------------------------------------- SRAT generic initiators


GI_MACHINE = ("-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=0", "-n", "id=2,size=256M",
              "-n", "id=3,size=128M,cpus=1", "--disk", "/x/a.img,domain=1,initiator",
              "--disk", "/x/b.img,domain=2,initiator", "--disk", "/x/c.img,domain=2",
              "--disk", "/x/d.img,domain=0")


def test_srat_generic_initiators_in_iasl(work: Path) -> None:
    lay = layout(*GI_MACHINE)
    d = disassemble(acpi.build_tables(lay).blobs()["SRAT"], work, "gi-SRAT")
    check_header(d, "SRAT", 48 + 2 * 16 + 2 * 32 + 3 * 40, 3)
    kinds = [hexval(s["Subtable Type"]) for s in d.subtables()]
    assert kinds == [0, 0, 5, 5, 1, 1, 1]  # processors, then initiators, then memory
    gis = [s for s in d.subtables() if hexval(s["Subtable Type"]) == 5]
    # bridges: domain 0 -> bus 2, domain 1 -> bus 4, domain 2 -> bus 6; a.img is bus 4's slot 0,
    # b.img bus 6's slot 0 (c.img, slot 1, is no initiator)
    assert [(hexval(s["Proximity Domain"]), hexval(s["Device Handle Type"]), s["Device Handle"].split()[:4],
             s["Enabled"]) for s in gis] == [(1, 1, ["00", "00", "00", "04"], "1"),
                                             (2, 1, ["00", "00", "00", "06"], "1")]
    assert srat_cpus(d) == [(0, 0, "lapic"), (1, 3, "lapic")]
    assert [m[0] for m in srat_mems(d)] == [0, 2, 3]


def test_generic_initiator_entry_bytes() -> None:
    e = acpi.GenericInitiatorAffinity(7, 0, 0x12, 3 << 3 | 1).to_bytes()
    assert len(e) == 32
    assert e[:4] == bytes((5, 32, 0, 1)) and e[4:8] == (7).to_bytes(4, "little")
    assert e[8:12] == bytes((0, 0, 0x19, 0x12))  # segment 0, BDF 12:03.1 little-endian
    assert e[12:24] == bytes(12) and e[24:28] == (1).to_bytes(4, "little") and e[28:] == bytes(4)


def test_numbering_with_generic_initiators() -> None:
    """vCPU domains by id, then initiator domains without vCPUs, then memory-only domains."""
    lay = layout(*GI_MACHINE)
    want = {0: 0, 3: 1, 1: 2, 2: 3}
    srat = acpi.build_tables(lay).blobs()["SRAT"]
    assert expected_pxm_to_node(lay) == pxm_to_node_from_srat(srat) == pxm_to_node_from_plan(lay) == want
    assert generic_initiator_nodes(lay) == {2, 3}
    # without the initiator flags domain 2 (memory) would follow 3 the same way, and domain 1
    # (neither) cannot exist; an initiator on a vCPU domain changes nothing
    assert node_numbering([(0, False, True), (1, True, False), (2, False, True, True)]) == {1: 0, 2: 1, 0: 2}
    assert node_numbering([(0, True, True, True), (1, True, True)]) == {0: 0, 1: 1}


def test_expected_view_counts_the_initiator_only_node() -> None:
    lay = layout(*GI_MACHINE)
    v = expected_view(lay)
    assert v.zonelists == 4 and sorted(v.fallback) == [0, 1, 2, 3]
    assert 2 not in v.srat_ranges  # domain 1: neither memory nor vCPUs
    assert v.fallback[2][0] == 2  # 6.1 puts even a memoryless node first in its own list


# ---------------------------------------------------------------- MCFG and the DSDT's host bridges


BRIDGES = ("-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=0", "-n", "id=2,size=256M,cpus=1",
           "--disk", "/x/a.img,domain=1,initiator", "--disk", "/x/b.img,domain=2", "--disk", "/x/c.img,domain=2")


def test_mcfg_in_iasl(work: Path) -> None:
    lay = layout(*BRIDGES)
    t = acpi.build_tables(lay)
    blobs = t.blobs()
    assert tuple(blobs) == ("RSDP", "XSDT", "FACP", "DSDT", "APIC", "SRAT", "SLIT", "MCFG")
    d = disassemble(blobs["MCFG"], work, "MCFG")
    check_header(d, "MCFG", 44 + 16, 1)
    assert (d.hex("Base Address"), d.hex("Segment Group Number"), d.hex("Start Bus Number"),
            d.hex("End Bus Number")) == (0xE000_0000, 0, 0, 4)
    x = disassemble(blobs["XSDT"], work, "mcfg-XSDT")
    assert t.address_of("MCFG") in [hexval(v) for n, v in x.fields if n.startswith("ACPI Table Address")]
    # what the MCFG names is reserved in the e820 map too
    ecam = lay.pci.ecam
    assert ecam is not None and any(e.start == ecam.start and e.end == ecam.end and e.type.label == "reserved"
                                    for e in lay.e820)


def test_dsdt_host_bridges_in_iasl(work: Path) -> None:
    lay = layout(*BRIDGES)
    d = disassemble(acpi.build_tables(lay).blobs()["DSDT"], work, "pci-DSDT")
    assert d.checksum_ok, d.log
    asl = re.sub(r"\s*,\s*", ",", _norm_asl(d.text))  # iasl versions space the empty fields apart differently
    for dev, bus, num, pxm, lo, hi in (("PC02", "0x02", 2, "One", "0xC0000000", "0xC01FFFFF"),
                                       ("PC04", "0x04", 4, "0x02", "0xC0200000", "0xC03FFFFF")):
        assert (f'Device ({dev}) {{ Name (_HID,EisaId ("PNP0A03")) Name (_UID,{bus}) Name (_SEG,Zero) '
                f"Name (_BBN,{bus}) Name (_PXM,{pxm}) Name (_CRS,ResourceTemplate () {{ "
                f"WordBusNumber (ResourceProducer,MinFixed,MaxFixed,PosDecode,0x0000,0x{num:04X},0x{num:04X},"
                f"0x0000,0x0001,,,) "
                f"DWordMemory (ResourceProducer,PosDecode,MinFixed,MaxFixed,NonCacheable,ReadWrite,"
                f"0x00000000,{lo},{hi},0x00000000,0x00200000,,,,AddressRangeMemory,TypeStatic) }}) }}") in asl, asl
    assert ('Device (MRES) { Name (_HID,EisaId ("PNP0C02")) Name (_UID,Zero) Name (_CRS,ResourceTemplate () { '
            "Memory32Fixed (ReadWrite,0xE0000000,0x00500000,) }) }") in asl, asl
    src = work / "pci-dsdt-again.dsl"
    src.write_text(d.text)
    res = subprocess.run([iasl(), src.name], cwd=work, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "0 Errors, 0 Warnings" in res.stdout, res.stdout + res.stderr


def test_bridge_without_numa_has_no_pxm(work: Path) -> None:
    lay = layout("-c", "1", "-m", "256M", "--disk", "/x/a.img")
    blobs = acpi.build_tables(lay).blobs()
    assert "SRAT" not in blobs and "MCFG" in blobs
    asl = _norm_asl(disassemble(blobs["DSDT"], work, "classic-pci-DSDT").text)
    assert "Device (PC02)" in asl and "_PXM" not in asl


def test_resource_descriptor_bytes() -> None:
    from numavm.plan.acpi import aml

    assert aml.word_bus_number(3, 3) == bytes.fromhex("880d00020c00" "0000" "0300" "0300" "0000" "0100")
    assert aml.dword_memory(0xC000_0000, 0xC020_0000) == bytes.fromhex(
        "871700000c01" "00000000" "000000c0" "ffff1fc0" "00000000" "00002000")
    assert aml.memory32_fixed(0xE000_0000, 0x10_0000) == bytes.fromhex("860900" "01" "000000e0" "00001000")
    with pytest.raises(ValueError):
        aml.word_bus_number(2, 1)
    with pytest.raises(ValueError):
        aml.dword_memory(0xFFFF_F000, 0x1_0000_1000)
