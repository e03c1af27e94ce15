"""Where everything goes in guest-physical space.

RAM runs from 0 up to at most 3 GiB; the rest starts at 4 GiB (bhyve's
lowmem limit, and QEMU's `pc` with ``max-ram-below-4g=3G``, so the same
tables can be checked under QEMU).  Domains follow each other in ascending
id from address 0; one that crosses 3 GiB keeps one host segment but gets two
guest ranges.  Below 1 MiB the usual PC conventions hold, and the ACPI
tables live in the legacy area (sized for 256 domains and 1024 vCPUs), so
every byte of each domain's size stays usable RAM.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from numavm.plan.pci import PciLayout, plan_pci
from numavm.spec.topology import Domain, Topology
from numavm.spec.units import GiB, KiB, MiB

LOW_RAM_LIMIT = 3 * GiB
HIGH_RAM_BASE = 4 * GiB
# QEMU's machine with this RAM layout (the TCG engine, `numavm export --to qemu`)
QEMU_PC_MACHINE = f"pc,max-ram-below-4g={LOW_RAM_LIMIT // GiB}G"
# xAPIC ids are 8 bits and 255 is their broadcast id: a vCPU whose APIC id is above
# this one exists for the guest only in x2APIC mode.
MAX_XAPIC_ID = 254
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

EBDA_START = 0x9_FC00  # top 1 KiB of conventional memory, as BIOSes leave it
MP_POINTER_ADDR = EBDA_START  # the MP floating pointer: the first place Linux scans after 0-1K
TABLE_AREA_START = 0xA_0000  # ACPI tables: XSDT, FADT, DSDT, MADT, SRAT, SLIT
RSDP_ADDR = 0xE_0000  # inside the 0xE0000-0xFFFFF range Linux scans for "RSD PTR "
LEGACY_END = 1 * MiB

# Platform I/O ports the FADT points at (hardware-reduced ACPI registers).
SLEEP_CONTROL_PORT = 0x600
SLEEP_STATUS_PORT = 0x601
RESET_PORT = 0x602
RESET_VALUE = 0x1
# The sleep registers' bits, which the DSDT's \_S5 package (numavm.plan.acpi) and the
# power device (numavm.devices.power) both follow: Linux writes SLP_TYP << 2 | SLP_EN.
S5_SLP_TYP = 5  # SLP_TYPa in the DSDT's \_S5 package
SLP_TYP_SHIFT = 2  # sleep control register bits 4:2
SLP_TYP_MASK = 0x1C
SLP_EN = 0x20  # sleep control register bit 5
WAK_STS = 0x80  # sleep status register bit 7, write 1 to clear
S5_SLEEP_CONTROL_VALUE = S5_SLP_TYP << SLP_TYP_SHIFT | SLP_EN  # 0x34: power off
COM1_PORT = 0x3F8
COM1_IRQ = 4
# The guest command's stdout and stderr (`numavm run`): COM2 and COM3 at the PC's
# standard ports and IRQs, described in the DSDT (a hardware-reduced guest has no legacy PIC, so
# Linux routes an ISA IRQ only for a device ACPI describes).
COM2_PORT = 0x2F8
COM2_IRQ = 3
COM3_PORT = 0x3E8
COM3_IRQ = 4  # shared with COM1, as on every PC: the 8250 driver chains the ports of one IRQ
# Every UART as (port, IRQ): the console alone, or with the command's streams (the DSDT lists each).
CONSOLE_UARTS = ((COM1_PORT, COM1_IRQ),)
STREAM_UARTS = CONSOLE_UARTS + ((COM2_PORT, COM2_IRQ), (COM3_PORT, COM3_IRQ))


class E820Type(enum.IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Range:
    """Guest-physical [start, end), end exclusive."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.start <= addr < self.end

    def __str__(self) -> str:
        return f"{self.start:#011x}-{self.end:#011x}"


@dataclass(frozen=True)
class E820Entry:
    start: int
    end: int
    type: E820Type


@dataclass(frozen=True)
class Slot:
    """One guest range of a domain and where it lies in the domain's segment."""

    guest: Range
    offset: int  # into the domain's host segment


@dataclass(frozen=True)
class DomainLayout:
    domain: Domain
    slots: tuple[Slot, ...]  # () for a CPU-only domain
    apic_ids: tuple[int, ...]  # one per vCPU of the domain, in vCPU order

    @property
    def id(self) -> int:
        return self.domain.id

    @property
    def ranges(self) -> tuple[Range, ...]:
        return tuple(s.guest for s in self.slots)

    @property
    def segment_size(self) -> int:
        return self.domain.size


@dataclass(frozen=True)
class Layout:
    topology: Topology
    domains: tuple[DomainLayout, ...]
    apic_ids: tuple[int, ...]  # indexed by vCPU
    core_bits: int  # APIC id = package << core_bits | core; package = domain's rank
    e820: tuple[E820Entry, ...]
    table_area: Range  # XSDT and the tables it points to
    rsdp_addr: int
    ram_top: int  # highest guest-physical RAM address + 1
    mp_pointer_addr: int = MP_POINTER_ADDR
    pci: PciLayout = PciLayout()  # empty without devices

    @property
    def needs_x2apic(self) -> bool:
        """Some vCPU's APIC id is past MAX_XAPIC_ID: the guest must run its APICs in x2APIC mode."""
        return max(self.apic_ids) > MAX_XAPIC_ID

    def domain_at(self, addr: int) -> DomainLayout | None:
        for d in self.domains:
            if any(addr in r for r in d.ranges):
                return d
        return None


def plan_layout(topo: Topology) -> Layout:
    slots, ram_top = _place_ranges(topo)
    apic_ids, core_bits = _apic_ids(topo)
    pci = plan_pci(topo)
    return Layout(
        topology=topo,
        domains=tuple(DomainLayout(d, s, tuple(apic_ids[c] for c in d.cpus))
                      for d, s in zip(topo.domains, slots)),
        apic_ids=apic_ids,
        core_bits=core_bits,
        e820=_e820(topo.memory, pci),
        table_area=Range(TABLE_AREA_START, RSDP_ADDR),
        rsdp_addr=RSDP_ADDR,
        ram_top=ram_top,
        pci=pci,
    )


def with_shares(layout: Layout, shares: int) -> Layout:
    """`layout` plus `shares` virtio-9p devices on the KVM engine's bridges (numavm.plan.pci):
    the PCI layout and the e820 map (its ECAM reservation) change, nothing else; the ACPI
    tables built from the result (MCFG, DSDT bridges) follow.  The layout itself without
    shares.  ValueError when they do not fit."""
    if not shares:
        return layout
    pci = plan_pci(layout.topology, shares)
    return dataclasses.replace(layout, pci=pci, e820=_e820(layout.topology.memory, pci))


def _place_ranges(topo: Topology) -> tuple[list[tuple[Slot, ...]], int]:
    """Each domain's guest ranges, in ascending id from 0, skipping the hole."""
    out = []
    addr = 0
    for dom in topo.domains:
        slots: list[Slot] = []
        offset = 0
        while offset < dom.size:
            if addr == LOW_RAM_LIMIT:
                addr = HIGH_RAM_BASE
            left = dom.size - offset
            end = min(addr + left, LOW_RAM_LIMIT) if addr < LOW_RAM_LIMIT else addr + left
            slots.append(Slot(Range(addr, end), offset))
            offset += end - addr
            addr = end
        out.append(tuple(slots))
    return out, addr


def _apic_ids(topo: Topology) -> tuple[tuple[int, ...], int]:
    """APIC ids with one package per domain that has vCPUs.

    Packages never span domains, so the CPUID topology built from the same
    numbers can keep every shared cache inside one domain.
    """
    with_cpus = [d for d in topo.domains if d.cpus]
    widest = max(len(d.cpus) for d in with_cpus)
    core_bits = (widest - 1).bit_length()
    ids = [0] * topo.cpus
    for package, d in enumerate(with_cpus):
        for core, cpu in enumerate(d.cpus):
            ids[cpu] = package << core_bits | core
    return tuple(ids), core_bits


def _e820(memory: int, pci: PciLayout = PciLayout()) -> tuple[E820Entry, ...]:
    low = min(memory, LOW_RAM_LIMIT)
    entries = [
        E820Entry(0, EBDA_START, E820Type.RAM),
        E820Entry(EBDA_START, TABLE_AREA_START, E820Type.RESERVED),
        E820Entry(TABLE_AREA_START, RSDP_ADDR, E820Type.ACPI),
        E820Entry(RSDP_ADDR, LEGACY_END, E820Type.RESERVED),
        E820Entry(LEGACY_END, low, E820Type.RAM),
    ]
    ecam = pci.ecam
    if ecam is not None:  # Linux uses the MCFG's ECAM only where the firmware reserved it
        entries.append(E820Entry(ecam.start, ecam.end, E820Type.RESERVED))
    if memory > low:
        entries.append(E820Entry(HIGH_RAM_BASE, HIGH_RAM_BASE + memory - low, E820Type.RAM))
    return tuple(entries)


# The area's capacity, checked by the ACPI builder: 256 KiB holds a 256-domain
# SLIT (64 KiB + 44 bytes), a 1024-vCPU MADT (~16 KiB) and SRAT (~35 KiB).
TABLE_AREA_SIZE = RSDP_ADDR - TABLE_AREA_START
assert TABLE_AREA_SIZE == 256 * KiB
