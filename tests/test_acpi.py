"""ACPI tables, checked with the real ACPICA disassembler (`iasl -d`).

Each blob is written to a temporary directory, disassembled, and the
``[offset] FieldName : Value`` lines are parsed back into (name, value)
pairs, so the assertions are about what iasl reads, not about our own bytes.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from numavm.plan import acpi
from numavm.plan.acpi import aml
from numavm.errors import NumavmError
from numavm.plan.layout import (COM1_IRQ, COM1_PORT, IOAPIC_ADDR, LAPIC_ADDR, RESET_PORT, RESET_VALUE,
                                SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, Layout, Range, plan_layout)
from numavm.spec.topology import MachineSpec, parse_distance, parse_numa
from numavm.spec.units import GiB, MiB

IASL = shutil.which("iasl")


def iasl() -> str:
    """The iasl binary; tests that need it skip without it (the AML unit tests do not)."""
    if IASL is None:
        pytest.skip("needs iasl (apt-get install acpica-tools)")
    return IASL


REFERENCE = Path("/work/shared/reference")
ALL_SIGS = ("RSDP", "XSDT", "FACP", "DSDT", "APIC", "SRAT", "SLIT")

# ---------------------------------------------------------------- iasl helper

# "[HexOffset DecimalOffset ByteLength]": ACPICA 2020 prints the length in decimal ("[000h 0000   4]"),
# 2025 (Debian 13) in hex ("[000h 0000 004h]").
_FIELD = re.compile(r"^\[([0-9A-Fa-f]+)h\s+(\d+)\s+(\d+|[0-9A-Fa-f]+h)\]\s*(.*?)\s*: (.*)$")
_DECODED = re.compile(r"^\s+(\S.*?)\s*: (\S.*)$")
_CONT = re.compile(r"^\s+((?:[0-9A-Fa-f]{2} )*[0-9A-Fa-f]{2})\s*\\?$")


def parse_fields(text: str) -> list[tuple[str, str]]:
    """(name, value) for every field line of a data-table disassembly, in order.

    Decoded flag lines (no offset) are kept too; continuation lines of long
    hex values (SLIT rows) are joined; the raw dump at the end is skipped.
    """
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("Raw Table Data"):
            break
        m = _FIELD.match(line)
        if m:
            out.append((m.group(4), m.group(5).strip()))
            continue
        if out and out[-1][1].endswith("\\"):
            c = _CONT.match(line)
            if c:
                name, value = out[-1]
                out[-1] = (name, value[:-1].rstrip() + " " + line.strip().rstrip("\\").strip()
                           + (" \\" if line.rstrip().endswith("\\") else ""))
                continue
        d = _DECODED.match(line)
        if d and not line.lstrip().startswith(("*", "/")):
            out.append((d.group(1), d.group(2).strip()))
    return out


def hexval(value: str) -> int:
    return int(value.split()[0], 16)


def strval(value: str) -> str:
    m = re.match(r'^"(.*?)"', value)
    assert m, value
    return m.group(1)


@dataclass
class Disasm:
    text: str  # the .dsl
    log: str  # iasl's stdout + stderr
    fields: list[tuple[str, str]]

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n == name]

    def one(self, name: str) -> str:
        vals = self.all(name)
        assert len(vals) == 1, (name, vals)
        return vals[0]

    def hex(self, name: str) -> int:
        return hexval(self.one(name))

    def after(self, name: str, count: int) -> list[tuple[str, str]]:
        """The `count` fields following the (only) field `name`, e.g. a GAS's parts."""
        idx = [i for i, (n, _) in enumerate(self.fields) if n == name]
        assert len(idx) == 1, (name, idx)
        return self.fields[idx[0] + 1: idx[0] + 1 + count]

    def subtables(self) -> list[dict[str, str]]:
        """Fields from each "Subtable Type" on, as dicts (first value wins)."""
        subs: list[dict[str, str]] = []
        for n, v in self.fields:
            if n == "Subtable Type":
                subs.append({})
            if subs:
                subs[-1].setdefault(n, v)
        return subs

    @property
    def checksum_ok(self) -> bool:
        return "incorrect checksum" not in (self.text + self.log).lower()


def disassemble(blob: bytes, workdir: Path, name: str = "table") -> Disasm:
    exe = iasl()
    dat = workdir / f"{name}.dat"
    dat.write_bytes(blob)
    dsl = dat.with_suffix(".dsl")
    dsl.unlink(missing_ok=True)
    res = subprocess.run([exe, "-d", dat.name], cwd=workdir, capture_output=True, text=True, timeout=60)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and dsl.exists(), log
    text = dsl.read_text()
    return Disasm(text, log, parse_fields(text))


def disassemble_reference(path: Path) -> Disasm:
    text = path.read_text()
    return Disasm(text, "", parse_fields(text))


def check_header(d: Disasm, sig: str, length: int, revision: int) -> None:
    assert strval(d.one("Signature")) == sig
    assert d.hex("Table Length") == length
    assert d.hex("Revision") == revision
    assert strval(d.one("Oem ID")) == "NUMAVM"
    assert strval(d.one("Oem Table ID")) == "NUMAVM  "
    assert strval(d.one("Asl Compiler ID")) == "NVMM"
    assert d.checksum_ok, d.log


# ---------------------------------------------------------------- machines


def machine(*numa: str, distances: tuple[str, ...] = (), cpus: int | None = None,
            memory: int | None = None) -> Layout:
    spec = MachineSpec(cpus=cpus, memory=memory, domains=[parse_numa(n) for n in numa],
                       distances=[parse_distance(d) for d in distances])
    return plan_layout(spec.build(host_nodes=(0,)))


@pytest.fixture(scope="module")
def example() -> Layout:
    """The reference topology (qemu-pc-3node)."""
    return machine("id=0,size=1G,cpus=0-1", "id=1,size=1G,cpus=2-3", "id=2,size=512M",
                   distances=("0:1=20", "0:2=30", "1:2=20"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("acpi")


@pytest.fixture(scope="module")
def example_dis(example: Layout, work: Path) -> dict[str, Disasm]:
    blobs = acpi.build_tables(example).blobs()
    return {sig: disassemble(b, work, f"ex-{sig}") for sig, b in blobs.items() if sig != "RSDP"}


def srat_cpus(d: Disasm) -> list[tuple[int, int, str]]:
    """(apic id, proximity, type) of each enabled processor entry."""
    out = []
    for s in d.subtables():
        t = hexval(s["Subtable Type"])
        if t == 0:
            assert s["Enabled"] == "1"
            pxm = hexval(s["Proximity Domain Low(8)"]) | hexval(s["Proximity Domain High(24)"]) << 8
            out.append((hexval(s["Apic ID"]), pxm, "lapic"))
        elif t == 2:
            assert s["Enabled"] == "1"
            out.append((hexval(s["Apic ID"]), hexval(s["Proximity Domain"]), "x2apic"))
    return out


def srat_mems(d: Disasm, enabled_only: bool = True) -> list[tuple[int, int, int]]:
    """(proximity, base, length) of each (enabled) memory entry."""
    out = []
    for s in d.subtables():
        if hexval(s["Subtable Type"]) == 1:
            if enabled_only and s["Enabled"] != "1":
                continue
            assert s["Hot Pluggable"] == "0" and s["Non-Volatile"] == "0"
            out.append((hexval(s["Proximity Domain"]), hexval(s["Base Address"]),
                        hexval(s["Address Length"])))
    return out


def expected_mems(layout: Layout) -> list[tuple[int, int, int]]:
    return [(dl.id, r.start, r.size) for dl in layout.domains for r in dl.ranges]


def expected_cpus(layout: Layout) -> set[tuple[int, int]]:
    return {(apic, dl.id) for dl in layout.domains for apic in dl.apic_ids}


def slit_matrix(d: Disasm) -> list[list[int]]:
    n = d.hex("Localities")
    rows = [d.one(f"Locality {i:3d}") for i in range(n)]
    return [[int(x, 16) for x in row.replace("\\", " ").split()] for row in rows]


def madt_procs(d: Disasm) -> list[tuple[str, int, int]]:
    """(kind, uid, apic id) of each processor entry, in table order."""
    out = []
    for s in d.subtables():
        t = hexval(s["Subtable Type"])
        if t == 0:
            assert s["Processor Enabled"] == "1"
            out.append(("lapic", hexval(s["Processor ID"]), hexval(s["Local Apic ID"])))
        elif t == 9:
            assert s["Processor Enabled"] == "1"
            out.append(("x2apic", hexval(s["Processor UID"]), hexval(s["Processor x2Apic ID"])))
    return out


def merge(ranges: list[tuple[int, int, int]], bridge: tuple[int, int] | None = None
          ) -> dict[int, list[tuple[int, int]]]:
    """Per proximity, [start, end) ranges with touching ones merged (and `bridge` ignored)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for pxm, base, length in sorted(ranges, key=lambda r: r[1]):
        if length == 0:
            continue
        lst = out.setdefault(pxm, [])
        if lst and (lst[-1][1] == base or (bridge and lst[-1][1] == bridge[0] and base == bridge[1])):
            lst[-1] = (lst[-1][0], base + length)
        else:
            lst.append((base, base + length))
    return out


# ---------------------------------------------------------------- the checker itself


def test_helper_notices_a_bad_checksum(example: Layout, work: Path) -> None:
    blob = bytearray(acpi.build_tables(example).blobs()["SRAT"])
    blob[9] ^= 0x01
    assert not disassemble(bytes(blob), work, "bad").checksum_ok


def test_parse_fields_joins_continuation_lines() -> None:
    text = ("[02Ch 0044 256]                 Locality   0 : 0A FF 14 \\\n"
            "                                               14 1E \\\n"
            "                                               28\n"
            "                                     Enabled : 1\n")
    assert parse_fields(text) == [("Locality   0", "0A FF 14 14 1E 28"), ("Enabled", "1")]


# ---------------------------------------------------------------- example topology: every table


def test_builder_gives_every_table_with_placement(example: Layout) -> None:
    t = acpi.build_tables(example)
    blobs = t.blobs()
    assert tuple(blobs) == ALL_SIGS
    places = t.placements()
    assert places[0] == (example.rsdp_addr, blobs["RSDP"])
    assert [b for _, b in places[1:-2]] == [blobs[n] for n, _ in t.addresses]
    assert t.mptable is not None and places[-2:] == t.mptable.placements()  # the MP table comes last
    end = 0
    for name, addr in t.addresses:
        assert addr % 16 == 0 and addr >= end
        end = addr + len(blobs[name])
        assert addr in example.table_area and end <= example.table_area.end
    assert t.addresses[0] == ("XSDT", example.table_area.start)
    assert {n for n, _ in t.addresses} == set(ALL_SIGS) - {"RSDP"}
    for name in ALL_SIGS:
        assert blobs[name] == (t.rsdp if name == "RSDP" else
                               {x.name: x for x in t.tables()}[name]).to_bytes()
    # every table but the RSDP sums to zero; the RSDP in both its parts
    for name, b in blobs.items():
        if name == "RSDP":
            assert sum(b[:20]) % 256 == 0 and sum(b) % 256 == 0
        else:
            assert sum(b) % 256 == 0
            assert struct.unpack_from("<I", b, 4)[0] == len(b)


def test_rsdp_matches_iasl_data_table_compiler(example: Layout, work: Path) -> None:
    """iasl -d does not take a lone RSDP, so let iasl compile one from our field
    values (it fills in both checksums itself) and compare the bytes."""
    t = acpi.build_tables(example)
    blob = t.blobs()["RSDP"]
    sig, csum, oem, rev, rsdt, length, xsdt, xcsum, _ = struct.unpack("<8sB6sBIIQB3s", blob)
    assert (sig, oem, rev, rsdt, length) == (b"RSD PTR ", b"NUMAVM", 2, 0, 36)
    assert xsdt == t.address_of("XSDT") == example.table_area.start
    src = work / "rsdp.asl"
    src.write_text(
        '[0008] Signature : "RSD PTR "\n[0001] Checksum : 00\n[0006] Oem ID : "NUMAVM"\n'
        "[0001] Revision : 02\n[0004] RSDT Address : 00000000\n[0004] Length : 00000024\n"
        f"[0008] XSDT Address : {xsdt:016X}\n[0001] Extended Checksum : 00\n[0003] Reserved : 000000\n")
    res = subprocess.run([iasl(), src.name], cwd=work, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (work / "rsdp.aml").read_bytes() == blob
    assert csum == (-sum(blob[:8] + blob[9:20])) & 0xFF and xcsum == (-sum(blob[:32] + blob[33:])) & 0xFF


def test_xsdt(example: Layout, example_dis: dict[str, Disasm]) -> None:
    t = acpi.build_tables(example)
    d = example_dis["XSDT"]
    check_header(d, "XSDT", 36 + 4 * 8, 1)
    addrs = [hexval(v) for n, v in d.fields if n.startswith("ACPI Table Address")]
    assert addrs == [t.address_of(s) for s in ("FACP", "APIC", "SRAT", "SLIT")]


def test_fadt(example: Layout, example_dis: dict[str, Disasm]) -> None:
    t = acpi.build_tables(example)
    d = example_dis["FACP"]
    check_header(d, "FACP", 276, 6)
    assert d.hex("FADT Minor Revision") == 0
    assert d.one("Hardware Reduced (V5)") == "1"
    assert d.one("Reset Register Supported (V2)") == "1"
    assert d.one("Control Method Power Button (V1)") == "0"
    assert d.hex("Flags (decoded below)") == (1 << 20) | (1 << 10)
    assert d.one("VGA Not Present (V4)") == "1"
    assert d.one("8042 Present on ports 60/64 (V2)") == "0"
    assert d.hex("SCI Interrupt") == 0
    # FACS none; DSDT only through the 64-bit X_DSDT
    assert [hexval(v) for v in d.all("FACS Address")] == [0, 0]
    assert [hexval(v) for v in d.all("DSDT Address")] == [0, t.address_of("DSDT")]

    def gas(name: str) -> dict[str, int]:
        return {n: hexval(v) for n, v in d.after(name, 5)}

    io8 = {"Space ID": 1, "Bit Width": 8, "Bit Offset": 0, "Encoded Access Width": 1}
    assert d.one("Reset Register").startswith("[Generic Address Structure]")
    assert gas("Reset Register") == {**io8, "Address": RESET_PORT}
    assert d.hex("Value to cause reset") == RESET_VALUE
    assert gas("Sleep Control Register") == {**io8, "Address": SLEEP_CONTROL_PORT}
    assert gas("Sleep Status Register") == {**io8, "Address": SLEEP_STATUS_PORT}
    assert "[SystemIO]" in dict(d.after("Sleep Control Register", 5))["Space ID"]
    assert gas("PM1A Control Block")["Address"] == 0
    assert d.hex("Hypervisor ID").to_bytes(8, "little") == b"NUMAVM\0\0"


def _norm_asl(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"\s+\)", ")", re.sub(r"\s+", " ", text))


def test_dsdt(example_dis: dict[str, Disasm], work: Path) -> None:
    d = example_dis["DSDT"]
    assert d.checksum_ok, d.log
    assert 'DefinitionBlock ("", "DSDT", 2, "NUMAVM", "NUMAVM  ", 0x00000001)' in d.text
    asl = _norm_asl(d.text)
    assert "Name (_S5, Package" in d.text
    assert f"Name (_S5, Package (0x04) {{ 0x{acpi.S5_SLP_TYP:02X}, Zero, Zero, Zero }})" in asl
    assert "Scope (\\_SB) { Device (COM1) {" in asl
    assert 'Name (_HID, EisaId ("PNP0501"))' in asl
    assert "PNP0501" in d.text
    assert "Name (_UID, Zero)" in asl
    assert "Name (_CRS, ResourceTemplate () {" in asl
    assert f"IO (Decode16, 0x{COM1_PORT:04X}, 0x{COM1_PORT:04X}, 0x01, 0x08,)" in asl
    assert "IO (Decode16, 0x03F8, 0x03F8," in asl
    assert f"IRQNoFlags () {{{COM1_IRQ}}}" in asl and "IRQNoFlags () {4}" in asl
    # and iasl compiles its own disassembly back without complaint
    src = work / "dsdt-again.dsl"
    src.write_text(d.text)
    res = subprocess.run([iasl(), src.name], cwd=work, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "0 Errors, 0 Warnings" in res.stdout, res.stdout + res.stderr


def test_dsdt_lists_every_uart_of_a_run(example: Layout, work: Path) -> None:
    """`run`'s machine has COM2 and COM3 for the command's streams: a hardware-reduced guest
    routes an ISA IRQ only for a device its DSDT describes, so the DSDT lists all three, and the
    console-only machine keeps its DSDT byte for byte."""
    from numavm.plan.layout import CONSOLE_UARTS, STREAM_UARTS

    assert acpi.build_tables(example, CONSOLE_UARTS).blobs()["DSDT"] == acpi.build_tables(example).blobs()["DSDT"]
    d = disassemble(acpi.build_tables(example, STREAM_UARTS).blobs()["DSDT"], work, "dsdt-streams")
    assert d.checksum_ok, d.log
    asl = _norm_asl(d.text)
    for uid, (name, port, irq) in enumerate([("COM1", 0x3F8, 4), ("COM2", 0x2F8, 3), ("COM3", 0x3E8, 4)]):
        uid_text = {0: "Zero", 1: "One"}.get(uid, f"0x{uid:02X}")
        assert (f'Device ({name}) {{ Name (_HID, EisaId ("PNP0501")) Name (_UID, {uid_text}) '
                f"Name (_CRS, ResourceTemplate () {{ IO (Decode16, 0x{port:04X}, 0x{port:04X}, 0x01, 0x08,) "
                f"IRQNoFlags () {{{irq}}}") in asl, asl


def test_madt(example: Layout, example_dis: dict[str, Disasm]) -> None:
    d = example_dis["APIC"]
    check_header(d, "APIC", 44 + 4 * 8 + 12 + 10 + 6, 4)
    assert d.hex("Local Apic Address") == LAPIC_ADDR
    assert d.one("PC-AT Compatibility") == "1"
    assert madt_procs(d) == [("lapic", cpu, apic) for cpu, apic in enumerate(example.apic_ids)]
    assert [apic for _, _, apic in madt_procs(d)] == [0, 1, 2, 3]
    subs = d.subtables()
    types = [hexval(s["Subtable Type"]) for s in subs]
    assert types == [0, 0, 0, 0, 1, 2, 4]  # no x2APIC entries, no x2APIC NMI
    ioapic = subs[4]
    assert hexval(ioapic["Address"]) == IOAPIC_ADDR
    assert hexval(ioapic["Interrupt"]) == 0  # GSI base
    assert hexval(ioapic["I/O Apic ID"]) == acpi.IOAPIC_ID
    iso = subs[5]
    assert (hexval(iso["Bus"]), hexval(iso["Source"]), hexval(iso["Interrupt"])) == (0, 0, 2)
    nmi = subs[6]
    assert hexval(nmi["Processor ID"]) == 0xFF and hexval(nmi["Interrupt Input LINT"]) == 1


def test_srat(example: Layout, example_dis: dict[str, Disasm]) -> None:
    d = example_dis["SRAT"]
    check_header(d, "SRAT", 48 + 4 * 16 + 3 * 40, 3)
    assert d.hex("Table Revision") == 1
    assert srat_cpus(d) == [(0, 0, "lapic"), (1, 0, "lapic"), (2, 1, "lapic"), (3, 1, "lapic")]
    assert srat_mems(d, enabled_only=False) == [(0, 0, 1 * GiB), (1, 1 * GiB, 1 * GiB),
                                                (2, 2 * GiB, 512 * MiB)]
    assert srat_mems(d) == expected_mems(example)


def test_slit(example_dis: dict[str, Disasm]) -> None:
    d = example_dis["SLIT"]
    check_header(d, "SLIT", 44 + 9, 1)
    assert d.hex("Localities") == 3
    assert slit_matrix(d) == [[10, 20, 30], [20, 10, 20], [30, 20, 10]]


@pytest.mark.parametrize("sig", ["SRAT", "SLIT"])
def test_example_means_what_qemu_says(example: Layout, example_dis: dict[str, Disasm], sig: str) -> None:
    """Same meaning as QEMU's tables for the same topology: proximity per APIC
    id, node ranges (modulo QEMU's 640K-1M hole and its disabled padding
    entry), the distance matrix."""
    ref_file = REFERENCE / "qemu-pc-3node" / f"{sig}.dsl"
    if not ref_file.exists():
        pytest.skip(f"no {ref_file}")
    ref = disassemble_reference(ref_file)
    ours = example_dis[sig]
    if sig == "SLIT":
        assert slit_matrix(ours) == slit_matrix(ref)
        return
    assert {(a, p) for a, p, _ in srat_cpus(ours)} == {(a, p) for a, p, _ in srat_cpus(ref)}
    assert merge(srat_mems(ours)) == merge(srat_mems(ref), bridge=(0xA_0000, 0x10_0000))
    # and QEMU's only extra memory entry is its disabled, empty padding
    extra = [m for m in srat_mems(ref, enabled_only=False) if m not in srat_mems(ref)]
    assert extra == [(0, 0, 0)]


def test_crossing_3g_matches_qemu(work: Path) -> None:
    """Domain 1 crosses the 3-4 GiB hole: two memory entries for proximity 1
    (the qemu-pc-5G-2+3 reference: node 0 2G, node 1 3G)."""
    lay = machine("id=0,size=2G,cpus=0-1", "id=1,size=3G,cpus=2-3")
    t = acpi.build_tables(lay)
    d = disassemble(t.blobs()["SRAT"], work, "cross-SRAT")
    check_header(d, "SRAT", 48 + 4 * 16 + 3 * 40, 3)
    assert srat_mems(d) == [(0, 0, 2 * GiB), (1, 2 * GiB, 1 * GiB), (1, 4 * GiB, 2 * GiB)]
    assert [m for m in srat_mems(d) if m[0] == 1] == [(1, 2 * GiB, 1 * GiB), (1, 4 * GiB, 2 * GiB)]
    ref_file = REFERENCE / "qemu-pc-5G-2+3" / "SRAT.dsl"
    if ref_file.exists():
        ref = disassemble_reference(ref_file)
        assert merge(srat_mems(d)) == merge(srat_mems(ref), bridge=(0xA_0000, 0x10_0000))
        assert {(a, p) for a, p, _ in srat_cpus(d)} == {(a, p) for a, p, _ in srat_cpus(ref)}


def test_memoryless_domain(work: Path) -> None:
    lay = machine("id=0,size=1G,cpus=0-1", "id=1,size=0,cpus=2-3", distances=("0:1=15",))
    blobs = acpi.build_tables(lay).blobs()
    d = disassemble(blobs["SRAT"], work, "ml-SRAT")
    check_header(d, "SRAT", 48 + 4 * 16 + 40, 3)
    assert {(a, p) for a, p, _ in srat_cpus(d)} == expected_cpus(lay)
    assert [p for _, p, _ in srat_cpus(d)] == [0, 0, 1, 1]
    assert srat_mems(d) == [(0, 0, 1 * GiB)]  # nothing for proximity 1
    s = disassemble(blobs["SLIT"], work, "ml-SLIT")
    assert slit_matrix(s) == [[10, 15], [15, 10]]


def test_classic_machine_has_no_srat_or_slit(work: Path) -> None:
    lay = machine(cpus=2, memory=512 * MiB)
    assert not lay.topology.numa
    t = acpi.build_tables(lay)
    blobs = t.blobs()
    assert tuple(blobs) == ("RSDP", "XSDT", "FACP", "DSDT", "APIC")
    assert t.srat is None and t.slit is None
    assert "SRAT" not in dict(t.addresses) and "SLIT" not in dict(t.addresses)
    x = disassemble(blobs["XSDT"], work, "classic-XSDT")
    check_header(x, "XSDT", 36 + 2 * 8, 1)
    assert [hexval(v) for n, v in x.fields if n.startswith("ACPI Table Address")] == [
        t.address_of("FACP"), t.address_of("APIC")]
    m = disassemble(blobs["APIC"], work, "classic-APIC")
    assert madt_procs(m) == [("lapic", 0, 0), ("lapic", 1, 1)]
    assert len(t.placements()) == 5 + 2  # RSDP, XSDT, FACP, DSDT, APIC; MP pointer and table


def test_asymmetric_and_unreachable_distances(work: Path) -> None:
    lay = machine("id=0,size=64M,cpus=0", "id=1,size=64M,cpus=1", "id=2,size=64M",
                  distances=("0:1=20", "1:0=40", "0:2=255", "1:2=254"))
    d = disassemble(acpi.build_tables(lay).blobs()["SLIT"], work, "asym-SLIT")
    check_header(d, "SLIT", 44 + 9, 1)
    assert slit_matrix(d) == [[10, 20, 255], [40, 10, 254], [255, 254, 10]]


# ---------------------------------------------------------------- big machines


@pytest.fixture(scope="module")
def many_domains() -> Layout:
    """256 domains of 4 vCPUs each: 1024 vCPUs, APIC ids 0..1023, a 64 KiB SLIT."""
    return machine(*(f"id={i},size=4M,cpus={4 * i}-{4 * i + 3}" for i in range(256)),
                   distances=("0:1=255", "2:3=40", "3:2=50", "255:254=11"))


def test_256_domain_slit(many_domains: Layout, work: Path) -> None:
    t = acpi.build_tables(many_domains)
    blob = t.blobs()["SLIT"]
    assert len(blob) == 44 + 256 * 256
    start = time.monotonic()
    d = disassemble(blob, work, "big-SLIT")
    assert time.monotonic() - start < 20
    check_header(d, "SLIT", 44 + 65536, 1)
    assert d.hex("Localities") == 256
    m = slit_matrix(d)
    assert len(m) == 256 and all(len(row) == 256 for row in m)
    assert m == [list(row) for row in many_domains.topology.distances]
    assert m[0][1] == m[1][0] == 255
    assert (m[2][3], m[3][2]) == (40, 50)
    assert (m[255][254], m[254][255]) == (11, 11)
    assert m[100][100] == 10 and m[100][200] == 20
    assert t.address_of("SLIT") + len(blob) <= many_domains.table_area.end


def test_256_domain_srat_and_madt(many_domains: Layout, work: Path) -> None:
    blobs = acpi.build_tables(many_domains).blobs()
    s = disassemble(blobs["SRAT"], work, "big-SRAT")
    check_header(s, "SRAT", 48 + 255 * 16 + 769 * 24 + 256 * 40, 3)
    cpus = srat_cpus(s)
    assert {(a, p) for a, p, _ in cpus} == expected_cpus(many_domains)
    assert all((kind == "x2apic") == (apic >= 255) for apic, _, kind in cpus)
    assert (255, 63, "x2apic") in cpus and (1023, 255, "x2apic") in cpus and (254, 63, "lapic") in cpus
    assert srat_mems(s) == expected_mems(many_domains)
    m = disassemble(blobs["APIC"], work, "big-APIC")
    procs = madt_procs(m)
    assert len(procs) == 1024
    assert [(uid, apic) for _, uid, apic in procs] == list(enumerate(many_domains.apic_ids))


@pytest.fixture(scope="module")
def wide() -> Layout:
    """1024 vCPUs in 4 domains: APIC ids 0..1023, domain 0 holds 0..255."""
    return machine(*(f"id={i},size=64M,cpus={256 * i}-{256 * i + 255}" for i in range(4)))


def test_1024_vcpus_madt(wide: Layout, work: Path) -> None:
    assert max(wide.apic_ids) == 1023
    d = disassemble(acpi.build_tables(wide).blobs()["APIC"], work, "wide-APIC")
    check_header(d, "APIC", 44 + 255 * 8 + 769 * 16 + 12 + 10 + 6 + 12, 4)
    procs = madt_procs(d)
    assert procs == [("lapic" if apic < 255 else "x2apic", cpu, apic) for cpu, apic in enumerate(wide.apic_ids)]
    assert sum(1 for p in procs if p[0] == "lapic") == 255
    assert sum(1 for p in procs if p[0] == "x2apic") == 769
    subs = d.subtables()
    x2nmi = [s for s in subs if hexval(s["Subtable Type"]) == 10]
    assert len(x2nmi) == 1
    assert hexval(x2nmi[0]["Processor UID"]) == 0xFFFFFFFF
    assert hexval(x2nmi[0]["Interrupt Input LINT"]) == 1
    assert len([s for s in subs if hexval(s["Subtable Type"]) == 4]) == 1
    assert hexval([s for s in subs if hexval(s["Subtable Type"]) == 1][0]["Address"]) == IOAPIC_ADDR


def test_1024_vcpus_srat(wide: Layout, work: Path) -> None:
    d = disassemble(acpi.build_tables(wide).blobs()["SRAT"], work, "wide-SRAT")
    check_header(d, "SRAT", 48 + 255 * 16 + 769 * 24 + 4 * 40, 3)
    cpus = srat_cpus(d)
    assert len(cpus) == 1024
    assert cpus[254] == (254, 0, "lapic")
    assert cpus[255] == (255, 0, "x2apic")
    assert cpus[256] == (256, 1, "x2apic")
    assert cpus[-1] == (1023, 3, "x2apic")
    assert {(a, p) for a, p, _ in cpus} == expected_cpus(wide)
    assert srat_mems(d) == [(i, i * 64 * MiB, 64 * MiB) for i in range(4)]


def test_vcpu_index_beyond_uid_byte_gets_x2apic_entry(work: Path) -> None:
    """vCPU 256 has APIC id 0 here; its UID does not fit the Local APIC entry."""
    lay = machine("id=0,size=64M,cpus=256-511", "id=1,size=64M,cpus=0-255")
    assert lay.apic_ids[256] == 0
    d = disassemble(acpi.build_tables(lay).blobs()["APIC"], work, "uid-APIC")
    procs = madt_procs(d)
    assert [(uid, apic) for _, uid, apic in procs] == list(enumerate(lay.apic_ids))
    assert len({uid for _, uid, _ in procs}) == 512
    assert all(kind == "lapic" for kind, uid, apic in procs if uid < 255 and apic < 255)
    assert ("x2apic", 256, 0) in procs


def test_tables_must_fit_the_table_area(example: Layout) -> None:
    small = dataclasses.replace(example, table_area=Range(example.table_area.start,
                                                          example.table_area.start + 512))
    with pytest.raises(NumavmError, match="do not fit"):
        acpi.build_tables(small)


# ---------------------------------------------------------------- AML encoder


def test_pkg_length_encoding() -> None:
    assert aml.pkg_length(0) == b"\x01"
    assert aml.pkg_length(62) == b"\x3f"
    assert aml.pkg_length(63) == bytes((0x40 | (65 & 0xF), 65 >> 4))
    assert aml.pkg_length(0xFFF - 2) == bytes((0x4F, 0xFF))
    assert aml.pkg_length(0xFFF - 1) == bytes((0x81, 0x00, 0x01))  # 3 bytes: 0x1001
    assert aml.pkg_length(0xFFFFF - 3) == bytes((0x8F, 0xFF, 0xFF))
    assert aml.pkg_length(0xFFFFF - 2) == bytes((0xC1, 0x00, 0x00, 0x01))  # 4 bytes: 0x100001
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)


def test_integer_and_name_encoding() -> None:
    assert aml.integer(0) == b"\x00" and aml.integer(1) == b"\x01"
    assert aml.integer(5) == b"\x0a\x05"
    assert aml.integer(0x3F8) == b"\x0b\xf8\x03"
    assert aml.integer(0x12345678) == b"\x0c\x78\x56\x34\x12"
    assert aml.integer(1 << 32) == b"\x0e" + (1 << 32).to_bytes(8, "little")
    assert aml.integer((1 << 64) - 1) == b"\xff"
    assert aml.string("ab") == b"\x0dab\x00"
    assert aml.name_seg("_S5") == b"_S5_"
    assert aml.name_string("\\_SB_.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("^FOO") == b"^FOO_"
    assert aml.eisa_id_value("PNP0501") == 0x0105D041
    with pytest.raises(ValueError):
        aml.name_seg("toolong")


def test_resource_template_checksum() -> None:
    rt = aml.resource_template(aml.io_port(0x3F8, 0x3F8, 1, 8), aml.irq_no_flags(4))
    assert rt[0] == aml.BUFFER_OP
    descriptors = rt[-(8 + 3 + 2):]
    assert descriptors[:8] == bytes((0x47, 1, 0xF8, 3, 0xF8, 3, 1, 8))
    assert descriptors[8:11] == bytes((0x22, 0x10, 0x00))
    assert descriptors[11] == 0x79 and sum(descriptors) % 256 == 0


def test_large_aml_objects_disassemble(work: Path) -> None:
    """Multi-byte PkgLengths (2 and 3 bytes) as iasl reads them."""
    body = (aml.name("BUF1", aml.buffer(bytes(range(256)) * 20))  # 2-byte PkgLength
            + aml.name("BUF2", aml.buffer(b"\x5a" * 70000))  # 3-byte PkgLength
            + aml.scope("\\_SB_", aml.device("DEV0", aml.name("_HID", aml.eisa_id("PNP0C02")),
                                             aml.method("_STA", 0, aml.return_(aml.integer(0x0F))),
                                             aml.name("PKG0", aml.package(*(aml.integer(i) for i in range(40)))))))
    d = disassemble(acpi.Dsdt(body).to_bytes(), work, "big-DSDT")
    assert d.checksum_ok, d.log
    asl = _norm_asl(d.text)
    assert "Name (BUF1, Buffer (0x1400) {" in asl
    assert "Name (BUF2, Buffer (0x00011170) {" in asl
    assert 'Device (DEV0) { Name (_HID, EisaId ("PNP0C02"))' in asl
    assert "Method (_STA, 0, NotSerialized) { Return (0x0F) }" in asl
    assert "Name (PKG0, Package (0x28) { Zero, One, 0x02," in asl
    assert "0x27 })" in asl


def test_power_off_contract() -> None:
    """What the power device must decode on SLEEP_CONTROL_PORT."""
    assert acpi.S5_SLP_TYP == 5
    assert acpi.S5_SLEEP_CONTROL_VALUE == 0x34 == 5 << 2 | 0x20
    v = acpi.S5_SLEEP_CONTROL_VALUE
    assert (v & acpi.SLP_TYP_MASK) >> acpi.SLP_TYP_SHIFT == acpi.S5_SLP_TYP
    assert v & acpi.SLP_EN


def _mp_entries(table: bytes) -> list[tuple[int, bytes]]:
    """(type, entry bytes) of an MP configuration table, by the spec's entry sizes."""
    out, off = [], 44
    while off < len(table):
        kind = table[off]
        size = 20 if kind == 0 else 8
        out.append((kind, table[off:off + size]))
        off += size
    return out


def test_mp_table_lists_xapic_cpus_ioapic_and_isa_irqs(example: Layout) -> None:
    """The MP floating pointer sits where Linux looks first and points at a valid table."""
    from numavm.plan.acpi.mptable import MpTable

    t = acpi.build_tables(example)
    mp = t.mptable
    assert isinstance(mp, MpTable)
    (paddr, ptr), (taddr, table) = mp.placements()
    assert paddr == 0x9FC00 and ptr[:4] == b"_MP_" and len(ptr) == 16 and sum(ptr) % 256 == 0
    assert struct.unpack_from("<I", ptr, 4)[0] == taddr and ptr[8] == 1 and ptr[9] == 4
    assert ptr[11] == 0  # feature byte 1: a configuration table is present, no default config
    assert taddr in example.table_area and taddr + len(table) <= example.table_area.end
    assert all(taddr >= a + len(t.blobs()[n]) or taddr + len(table) <= a for n, a in t.addresses)
    assert table[:4] == b"PCMP" and sum(table) % 256 == 0
    assert struct.unpack_from("<H", table, 4)[0] == len(table)
    assert struct.unpack_from("<I", table, 36)[0] == 0xFEE00000
    entries = _mp_entries(table)
    assert struct.unpack_from("<H", table, 34)[0] == len(entries)
    cpus = [(e[1], e[3]) for k, e in entries if k == 0]
    assert cpus == [(0, 3), (1, 1), (2, 1), (3, 1)]  # APIC ids in vCPU order; enabled, the first is the BSP
    assert [e for k, e in entries if k == 2] == [struct.pack("<BBBBI", 2, 0, 0x11, 1, 0xFEC00000)]
    irqs = {e[5]: e[7] for k, e in entries if k == 3}
    assert irqs[0] == 2 and 2 not in irqs and all(irqs[i] == i for i in range(3, 16)) and irqs[1] == 1


def test_no_mp_table_where_apic_ids_pass_254() -> None:
    """The MP table cannot list x2APIC ids: it would contradict the MADT, so there is none."""
    lay = machine(*(f"id={i},size=4M,cpus={i * 4}-{i * 4 + 3}" for i in range(128)))
    assert max(lay.apic_ids) > 254 and lay.needs_x2apic
    t = acpi.build_tables(lay)
    assert t.mptable is None
    places = t.placements()
    assert lay.mp_pointer_addr not in {a for a, _ in places}
    assert not any(blob[:4] in (b"_MP_", b"PCMP") for _, blob in places)
    # The ACPI tables sit where they would with an MP table: only its reservation went.
    assert [n for n, _ in t.addresses] == ["XSDT", "FACP", "DSDT", "APIC", "SRAT", "SLIT"]
    # One id below the limit keeps it.
    small = machine(*(f"id={i},size=4M,cpus={i * 4}-{i * 4 + 3}" for i in range(63)),
                    "id=63,size=4M,cpus=252-254")
    assert max(small.apic_ids) == 254 and not small.needs_x2apic
    assert acpi.build_tables(small).mptable is not None


@pytest.fixture(scope="module")
def past_255() -> Layout:
    """The issue's machine: 128, 1 and 1 vCPUs; vCPU 129 has APIC id 256 (core_bits 7)."""
    return machine("id=0,size=256M,cpus=0-127", "id=1,size=128M,cpus=128", "id=2,size=128M,cpus=129")


def test_x2apic_entries_for_ids_past_254_in_iasl(past_255: Layout, work: Path) -> None:
    """iasl reads the x2APIC MADT and SRAT entries of the one vCPU past the xAPIC range."""
    assert past_255.apic_ids[127:] == (127, 128, 256)
    blobs = acpi.build_tables(past_255).blobs()
    m = disassemble(blobs["APIC"], work, "p255-APIC")
    check_header(m, "APIC", 44 + 129 * 8 + 16 + 12 + 10 + 6 + 12, 4)
    procs = madt_procs(m)
    assert procs[:129] == [("lapic", cpu, apic) for cpu, apic in enumerate(past_255.apic_ids[:129])]
    assert procs[129] == ("x2apic", 129, 256)
    x2nmi = [s for s in m.subtables() if hexval(s["Subtable Type"]) == 10]
    assert len(x2nmi) == 1 and hexval(x2nmi[0]["Processor UID"]) == 0xFFFFFFFF
    s = disassemble(blobs["SRAT"], work, "p255-SRAT")
    check_header(s, "SRAT", 48 + 129 * 16 + 24 + 3 * 40, 3)
    cpus = srat_cpus(s)
    assert cpus[-1] == (256, 2, "x2apic") and cpus[-2] == (128, 1, "lapic")
    assert {(a, p) for a, p, _ in cpus} == expected_cpus(past_255)
    assert sum(1 for t in s.subtables() if hexval(t["Subtable Type"]) == 2) == 1
