"""What the guest is told: ACPI tables as values that serialize to bytes.

Each table is a frozen dataclass with `to_bytes()`; the standard 36-byte
header and its checksum are built in one place (`_sdt`).  Entry layouts are
`struct` formats whose sizes are asserted against the ACPI 6.x spec.

The machine is hardware-reduced ACPI (FADT flag HW_REDUCED_ACPI): no PM1/GPE
blocks, no SCI, no FACS.  Power-off goes through the FADT's sleep control
register: Linux writes ``SLP_TYP << 2 | SLP_EN`` there, with SLP_TYP taken
from the DSDT's ``\\_S5`` package (`S5_SLP_TYP`), so the power device sees
`S5_SLEEP_CONTROL_VALUE` on `layout.SLEEP_CONTROL_PORT`.  Before that, ACPICA
clears WAK_STS by writing `WAK_STS` to the sleep status port.
Reset is `layout.RESET_VALUE` written to `layout.RESET_PORT`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence, Union

from numavm.plan import layout as _lay
from numavm.errors import NumavmError
from numavm.plan.layout import S5_SLP_TYP, Layout
from numavm.plan.pci import ECAM_BASE, PCI_SEGMENT, PciLayout

if TYPE_CHECKING:  # mptable and hmat import this module
    from numavm.plan.acpi.hmat import Hmat
    from numavm.plan.acpi.mptable import MpTable
from numavm.plan.acpi import aml

OEM_ID = b"NUMAVM"
OEM_TABLE_ID = b"NUMAVM  "
OEM_REVISION = 1
CREATOR_ID = b"NVMM"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR_ID = b"NUMAVM"

HEADER = struct.Struct("<4sIBB6s8sI4sI")
assert HEADER.size == 36
CHECKSUM_OFFSET = 9

# ---- power management contract with the devices layer (hardware-reduced ACPI):
# the sleep registers' bits are numavm.plan.layout's (S5_SLP_TYP, SLP_EN, WAK_STS, ...)

# ---- interrupt wiring the MADT promises
IOAPIC_ID = 0
IOAPIC_GSI_BASE = 0
TIMER_IRQ = 0
TIMER_GSI = 2  # IRQ0 -> GSI 2, as on every PC
NMI_LINT = 1  # LINT1 of every local APIC carries NMI
ALL_PROCESSORS_UID = 0xFF  # in a Local APIC NMI entry
ALL_PROCESSORS_X2UID = 0xFFFF_FFFF  # in a Local x2APIC NMI entry
MAX_XAPIC_ID = _lay.MAX_XAPIC_ID  # 255 is the xAPIC broadcast id: from 255 on, x2APIC entries
MAX_XAPIC_UID = 254  # 255 in a Local APIC NMI entry means "all processors"

TABLE_ALIGN = 16


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with that byte zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the standard header, then `body`."""
    length = HEADER.size + len(body)
    head = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION,
                       CREATOR_ID, CREATOR_REVISION)
    csum = checksum(head) - sum(body)  # sum() of bytes runs in C
    return head[:CHECKSUM_OFFSET] + bytes((csum & 0xFF,)) + head[CHECKSUM_OFFSET + 1:] + body


class _Table:
    """Mixin: a table with a `signature` and `revision` and a `body()`."""

    signature: ClassVar[bytes]
    revision: ClassVar[int]

    def body(self) -> bytes:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return _sdt(self.signature, self.revision, self.body())

    @property
    def name(self) -> str:
        return self.signature.decode("ascii")


# ---------------------------------------------------------------- GAS


class AddressSpace:
    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1


class AccessSize:
    UNDEFINED = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4


_GAS = struct.Struct("<BBBBQ")
assert _GAS.size == 12


@dataclass(frozen=True)
class Gas:
    """Generic Address Structure (5.2.3.2)."""

    space: int = AddressSpace.SYSTEM_MEMORY
    bit_width: int = 0
    bit_offset: int = 0
    access_size: int = AccessSize.UNDEFINED
    address: int = 0

    @classmethod
    def io8(cls, port: int) -> "Gas":
        return cls(AddressSpace.SYSTEM_IO, 8, 0, AccessSize.BYTE, port)

    def to_bytes(self) -> bytes:
        return _GAS.pack(self.space, self.bit_width, self.bit_offset, self.access_size, self.address)


NULL_GAS = Gas()

# ---------------------------------------------------------------- RSDP

_RSDP = struct.Struct("<8sB6sBIIQB3s")
assert _RSDP.size == 36
RSDP_V1_LENGTH = 20


@dataclass(frozen=True)
class Rsdp:
    """Root System Description Pointer, revision 2 (5.2.5.3); no RSDT."""

    xsdt_addr: int
    signature: ClassVar[bytes] = b"RSD PTR "
    revision: ClassVar[int] = 2
    name: ClassVar[str] = "RSDP"

    def to_bytes(self) -> bytes:
        raw = _RSDP.pack(self.signature, 0, OEM_ID, self.revision, 0, _RSDP.size, self.xsdt_addr, 0, b"")
        raw = raw[:8] + bytes((checksum(raw[:RSDP_V1_LENGTH]),)) + raw[9:]
        return raw[:32] + bytes((checksum(raw),)) + raw[33:]


# ---------------------------------------------------------------- XSDT


@dataclass(frozen=True)
class Xsdt(_Table):
    entries: tuple[int, ...]  # guest-physical addresses of the tables
    signature: ClassVar[bytes] = b"XSDT"
    revision: ClassVar[int] = 1

    def body(self) -> bytes:
        return struct.pack(f"<{len(self.entries)}Q", *self.entries)


# ---------------------------------------------------------------- FADT

_FADT_BODY = struct.Struct(
    "<"
    "IIBBHI"  # FIRMWARE_CTRL, DSDT, reserved, Preferred_PM_Profile, SCI_INT, SMI_CMD
    "BBBB"  # ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
    "8I"  # PM1a/b_EVT, PM1a/b_CNT, PM2_CNT, PM_TMR, GPE0, GPE1 blocks
    "8B"  # PM1_EVT_LEN .. CST_CNT
    "4H"  # P_LVL2_LAT, P_LVL3_LAT, FLUSH_SIZE, FLUSH_STRIDE
    "5B"  # DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM, CENTURY
    "HBI"  # IAPC_BOOT_ARCH, reserved, Flags
    "12sBHB"  # RESET_REG, RESET_VALUE, ARM_BOOT_ARCH, FADT Minor Version
    "QQ"  # X_FIRMWARE_CTRL, X_DSDT
    "96s"  # X_PM1a_EVT .. X_GPE1 (8 GAS, all unused when hardware-reduced)
    "12s12sQ"  # SLEEP_CONTROL_REG, SLEEP_STATUS_REG, Hypervisor Vendor Identity
)
FADT_LENGTH = 276
assert HEADER.size + _FADT_BODY.size == FADT_LENGTH


class FadtFlags:
    WBINVD = 1 << 0
    PWR_BUTTON = 1 << 4  # set = no fixed-feature power button
    SLP_BUTTON = 1 << 5
    RESET_REG_SUP = 1 << 10
    HW_REDUCED_ACPI = 1 << 20


class BootArch:
    """IAPC_BOOT_ARCH bits (5.2.9.3)."""

    LEGACY_DEVICES = 1 << 0
    I8042 = 1 << 1
    VGA_NOT_PRESENT = 1 << 2
    MSI_NOT_SUPPORTED = 1 << 3
    PCIE_ASPM_CONTROLS = 1 << 4
    CMOS_RTC_NOT_PRESENT = 1 << 5


@dataclass(frozen=True)
class Fadt(_Table):
    """Fixed ACPI Description Table, revision 6, hardware-reduced."""

    dsdt_addr: int
    sleep_control: Gas = Gas.io8(_lay.SLEEP_CONTROL_PORT)
    sleep_status: Gas = Gas.io8(_lay.SLEEP_STATUS_PORT)
    reset_reg: Gas = Gas.io8(_lay.RESET_PORT)
    reset_value: int = _lay.RESET_VALUE
    flags: int = FadtFlags.HW_REDUCED_ACPI | FadtFlags.RESET_REG_SUP
    # No VGA, no i8042, no CMOS RTC device for the guest to probe.
    boot_arch: int = BootArch.VGA_NOT_PRESENT | BootArch.CMOS_RTC_NOT_PRESENT
    minor_revision: int = 0
    hypervisor_vendor: bytes = HYPERVISOR_VENDOR_ID
    signature: ClassVar[bytes] = b"FACP"
    revision: ClassVar[int] = 6

    def body(self) -> bytes:
        out = _FADT_BODY.pack(
            0, 0, 0, 0, 0, 0,  # no FACS; DSDT only through X_DSDT; no SCI, no SMI
            0, 0, 0, 0,
            *(0,) * 8,
            *(0,) * 8,
            *(0,) * 4,
            *(0,) * 5,
            self.boot_arch, 0, self.flags,
            self.reset_reg.to_bytes(), self.reset_value, 0, self.minor_revision,
            0, self.dsdt_addr,
            NULL_GAS.to_bytes() * 8,
            self.sleep_control.to_bytes(), self.sleep_status.to_bytes(),
            int.from_bytes(self.hypervisor_vendor.ljust(8, b"\0"), "little"),
        )
        return out


# ---------------------------------------------------------------- DSDT


@dataclass(frozen=True)
class Dsdt(_Table):
    """Differentiated System Description Table: raw AML."""

    aml: bytes
    signature: ClassVar[bytes] = b"DSDT"
    revision: ClassVar[int] = 2  # 64-bit AML integers

    def body(self) -> bytes:
        return self.aml


def build_dsdt(uarts: Sequence[tuple[int, int]] = ((_lay.COM1_PORT, _lay.COM1_IRQ),),
               pci: PciLayout = PciLayout()) -> Dsdt:
    """`\\_S5` for power-off and one 16550 UART (PNP0501) per (port, IRQ) in `uarts`, COM1 first;
    with devices, one PCI host bridge per `pci.bridges` entry and the ECAM's reservation.

    A hardware-reduced ACPI guest has no legacy PIC, so Linux routes an ISA IRQ
    only for a device the DSDT describes: every UART the machine has is listed.
    """
    coms = b"".join(
        aml.device(
            f"COM{i + 1}",
            aml.name("_HID", aml.eisa_id("PNP0501")),
            aml.name("_UID", aml.integer(i)),
            aml.name("_CRS", aml.resource_template(
                aml.io_port(port, port, 1, 8),
                aml.irq_no_flags(irq),
            )),
        )
        for i, (port, irq) in enumerate(uarts))
    s5 = aml.name("_S5_", aml.package(aml.integer(S5_SLP_TYP), aml.integer(0),
                                      aml.integer(0), aml.integer(0)))
    return Dsdt(s5 + aml.scope("\\_SB_", coms, *_pci_devices(pci)))


def host_bridge_name(bus: int) -> str:
    """The DSDT name of the host bridge that owns `bus`: PC01..PCFF (unique, one bus each)."""
    return f"PC{bus:02X}"


def _pci_devices(pci: PciLayout) -> list[bytes]:
    """One PNP0A03 host bridge per bridge (_UID = _BBN = its bus, _SEG 0, _PXM its domain, _CRS its
    bus and its memory window; MSI-X only, so no _PRT), and a PNP0C02 motherboard resource
    reserving the ECAM range the MCFG names (Linux trusts an MCFG region it finds reserved in
    the e820 map, where numavm reserves it too, or in a motherboard resource)."""
    out = []
    for b in pci.bridges:
        out.append(aml.device(
            host_bridge_name(b.bus),
            aml.name("_HID", aml.eisa_id("PNP0A03")),
            aml.name("_UID", aml.integer(b.uid)),
            aml.name("_SEG", aml.integer(PCI_SEGMENT)),
            aml.name("_BBN", aml.integer(b.bus)),
            *([aml.name("_PXM", aml.integer(b.pxm))] if b.pxm is not None else []),
            aml.name("_CRS", aml.resource_template(
                aml.word_bus_number(b.bus, b.bus),
                aml.dword_memory(b.mmio.start, b.mmio.end),
            )),
        ))
    ecam = pci.ecam
    if ecam is not None:
        out.append(aml.device(
            "MRES",
            aml.name("_HID", aml.eisa_id("PNP0C02")),
            aml.name("_UID", aml.integer(0)),
            aml.name("_CRS", aml.resource_template(aml.memory32_fixed(ecam.start, ecam.size))),
        ))
    return out


# ---------------------------------------------------------------- MCFG

_MCFG_HEAD = struct.Struct("<Q")  # reserved
_MCFG_ENTRY = struct.Struct("<QHBBI")
assert (_MCFG_HEAD.size, _MCFG_ENTRY.size) == (8, 16)


@dataclass(frozen=True)
class McfgEntry:
    """One configuration space base address allocation: `base` is bus 0's address even when
    `first_bus` is not 0 (PCI Firmware 3.2, 4.1.2)."""

    base: int
    segment: int
    first_bus: int
    last_bus: int

    def to_bytes(self) -> bytes:
        return _MCFG_ENTRY.pack(self.base, self.segment, self.first_bus, self.last_bus, 0)


@dataclass(frozen=True)
class Mcfg(_Table):
    """PCI Express memory-mapped configuration space base address description table."""

    entries: tuple[McfgEntry, ...]
    signature: ClassVar[bytes] = b"MCFG"
    revision: ClassVar[int] = 1

    def body(self) -> bytes:
        return _MCFG_HEAD.pack(0) + b"".join(e.to_bytes() for e in self.entries)


def build_mcfg(pci: PciLayout) -> Mcfg | None:
    """Segment 0, buses 0..the last bridge's bus, at ECAM_BASE; None without devices."""
    if pci.ecam is None:
        return None
    return Mcfg((McfgEntry(ECAM_BASE, PCI_SEGMENT, 0, pci.last_bus),))


# ---------------------------------------------------------------- MADT

_MADT_HEAD = struct.Struct("<II")
_LAPIC = struct.Struct("<BBBBI")
_IOAPIC = struct.Struct("<BBBBII")
_ISO = struct.Struct("<BBBBIH")
_LAPIC_NMI = struct.Struct("<BBBHB")
_X2APIC = struct.Struct("<BBHIII")
_X2APIC_NMI = struct.Struct("<BBHIB3s")
assert (_MADT_HEAD.size, _LAPIC.size, _IOAPIC.size, _ISO.size, _LAPIC_NMI.size, _X2APIC.size,
        _X2APIC_NMI.size) == (8, 8, 12, 10, 6, 16, 12)

MADT_PCAT_COMPAT = 1
ENABLED = 1


@dataclass(frozen=True)
class LocalApic:
    """Processor Local APIC (type 0)."""

    uid: int
    apic_id: int
    enabled: bool = True
    type: ClassVar[int] = 0

    def to_bytes(self) -> bytes:
        return _LAPIC.pack(self.type, _LAPIC.size, self.uid, self.apic_id, ENABLED if self.enabled else 0)


@dataclass(frozen=True)
class IoApic:
    """I/O APIC (type 1)."""

    id: int
    address: int
    gsi_base: int
    type: ClassVar[int] = 1

    def to_bytes(self) -> bytes:
        return _IOAPIC.pack(self.type, _IOAPIC.size, self.id, 0, self.address, self.gsi_base)


@dataclass(frozen=True)
class InterruptSourceOverride:
    """Interrupt Source Override (type 2); flags 0 = conforms to the bus (ISA: edge, high)."""

    source: int
    gsi: int
    flags: int = 0
    bus: int = 0
    type: ClassVar[int] = 2

    def to_bytes(self) -> bytes:
        return _ISO.pack(self.type, _ISO.size, self.bus, self.source, self.gsi, self.flags)


@dataclass(frozen=True)
class LocalApicNmi:
    """Local APIC NMI (type 4)."""

    uid: int = ALL_PROCESSORS_UID
    lint: int = NMI_LINT
    flags: int = 0
    type: ClassVar[int] = 4

    def to_bytes(self) -> bytes:
        return _LAPIC_NMI.pack(self.type, _LAPIC_NMI.size, self.uid, self.flags, self.lint)


@dataclass(frozen=True)
class LocalX2Apic:
    """Processor Local x2APIC (type 9)."""

    uid: int
    x2apic_id: int
    enabled: bool = True
    type: ClassVar[int] = 9

    def to_bytes(self) -> bytes:
        return _X2APIC.pack(self.type, _X2APIC.size, 0, self.x2apic_id,
                            ENABLED if self.enabled else 0, self.uid)


@dataclass(frozen=True)
class LocalX2ApicNmi:
    """Local x2APIC NMI (type 10)."""

    uid: int = ALL_PROCESSORS_X2UID
    lint: int = NMI_LINT
    flags: int = 0
    type: ClassVar[int] = 10

    def to_bytes(self) -> bytes:
        return _X2APIC_NMI.pack(self.type, _X2APIC_NMI.size, self.flags, self.uid, self.lint, b"")


MadtEntry = Union[LocalApic, IoApic, InterruptSourceOverride, LocalApicNmi, LocalX2Apic, LocalX2ApicNmi]


@dataclass(frozen=True)
class Madt(_Table):
    """Multiple APIC Description Table ("APIC")."""

    entries: tuple[MadtEntry, ...]
    lapic_addr: int = _lay.LAPIC_ADDR
    flags: int = MADT_PCAT_COMPAT
    signature: ClassVar[bytes] = b"APIC"
    revision: ClassVar[int] = 4  # ACPI 6.0

    def body(self) -> bytes:
        return _MADT_HEAD.pack(self.lapic_addr, self.flags) + b"".join(e.to_bytes() for e in self.entries)


def build_madt(layout: Layout) -> Madt:
    """One processor entry per vCPU, in vCPU order; UID = vCPU index.

    APIC ids up to 254 get a Local APIC entry, larger ones a Local x2APIC
    entry (ACPI 6.x 5.2.12.12).  A vCPU whose index does not fit the 8-bit
    UID (>= 255) also gets an x2APIC entry, whatever its APIC id.
    """
    procs: list[MadtEntry] = []
    for cpu, apic_id in enumerate(layout.apic_ids):
        if apic_id <= MAX_XAPIC_ID and cpu <= MAX_XAPIC_UID:
            procs.append(LocalApic(cpu, apic_id))
        else:
            procs.append(LocalX2Apic(cpu, apic_id))
    entries: list[MadtEntry] = [
        *procs,
        IoApic(IOAPIC_ID, _lay.IOAPIC_ADDR, IOAPIC_GSI_BASE),
        InterruptSourceOverride(TIMER_IRQ, TIMER_GSI),
        LocalApicNmi(),
    ]
    if any(isinstance(p, LocalX2Apic) for p in procs):
        entries.append(LocalX2ApicNmi())
    return Madt(tuple(entries))


# ---------------------------------------------------------------- SRAT

_SRAT_HEAD = struct.Struct("<IQ")
_SRAT_LAPIC = struct.Struct("<BBBBIB3sI")
_SRAT_MEM = struct.Struct("<BBIHQQIIQ")
_SRAT_X2APIC = struct.Struct("<BBHIIIII")
_SRAT_GI = struct.Struct("<BBBBIHH12sII")
assert (_SRAT_HEAD.size, _SRAT_LAPIC.size, _SRAT_MEM.size, _SRAT_X2APIC.size, _SRAT_GI.size) == (12, 16, 40, 24, 32)

SRAT_ENABLED = 1
SRAT_MEM_HOT_PLUGGABLE = 1 << 1
SRAT_MEM_NON_VOLATILE = 1 << 2


@dataclass(frozen=True)
class ProcessorAffinity:
    """Processor Local APIC/SAPIC Affinity (type 0)."""

    proximity: int
    apic_id: int
    enabled: bool = True
    clock_domain: int = 0
    type: ClassVar[int] = 0

    def to_bytes(self) -> bytes:
        return _SRAT_LAPIC.pack(self.type, _SRAT_LAPIC.size, self.proximity & 0xFF, self.apic_id,
                                SRAT_ENABLED if self.enabled else 0, 0,
                                (self.proximity >> 8).to_bytes(3, "little"), self.clock_domain)


@dataclass(frozen=True)
class MemoryAffinity:
    """Memory Affinity (type 1)."""

    proximity: int
    base: int
    length: int
    enabled: bool = True
    hot_pluggable: bool = False
    non_volatile: bool = False
    type: ClassVar[int] = 1

    def to_bytes(self) -> bytes:
        flags = ((SRAT_ENABLED if self.enabled else 0) | (SRAT_MEM_HOT_PLUGGABLE if self.hot_pluggable else 0)
                 | (SRAT_MEM_NON_VOLATILE if self.non_volatile else 0))
        return _SRAT_MEM.pack(self.type, _SRAT_MEM.size, self.proximity, 0, self.base, self.length, 0, flags, 0)


@dataclass(frozen=True)
class X2ApicAffinity:
    """Processor Local x2APIC Affinity (type 2)."""

    proximity: int
    x2apic_id: int
    enabled: bool = True
    clock_domain: int = 0
    type: ClassVar[int] = 2

    def to_bytes(self) -> bytes:
        return _SRAT_X2APIC.pack(self.type, _SRAT_X2APIC.size, 0, self.proximity, self.x2apic_id,
                                 SRAT_ENABLED if self.enabled else 0, self.clock_domain, 0)


GI_HANDLE_ACPI = 0
GI_HANDLE_PCI = 1


@dataclass(frozen=True)
class GenericInitiatorAffinity:
    """Generic Initiator Affinity (type 5, ACPI 6.3): a PCI device that initiates memory
    accesses from `proximity`.  Its handle is the PCI segment and the BDF as one 16-bit number
    (bus << 8 | device << 3 | function), as ACPICA and QEMU encode it."""

    proximity: int
    segment: int
    bus: int
    devfn: int
    enabled: bool = True
    type: ClassVar[int] = 5

    def to_bytes(self) -> bytes:
        return _SRAT_GI.pack(self.type, _SRAT_GI.size, 0, GI_HANDLE_PCI, self.proximity, self.segment,
                             self.bus << 8 | self.devfn, b"", SRAT_ENABLED if self.enabled else 0, 0)


SratEntry = Union[ProcessorAffinity, MemoryAffinity, X2ApicAffinity, GenericInitiatorAffinity]


@dataclass(frozen=True)
class Srat(_Table):
    """System Resource Affinity Table, revision 3."""

    entries: tuple[SratEntry, ...]
    signature: ClassVar[bytes] = b"SRAT"
    revision: ClassVar[int] = 3

    def body(self) -> bytes:
        # "Table Revision" is reserved and must be 1 (backward compatibility).
        return _SRAT_HEAD.pack(1, 0) + b"".join(e.to_bytes() for e in self.entries)


def build_srat(layout: Layout) -> Srat:
    """Processor entries by domain id then vCPU order, then one generic initiator entry per
    initiator device (in `--disk` order), then memory entries by domain id.

    Linux (drivers/acpi/numa/srat.c, acpi_numa_init, 5.10 to 6.12 at least) numbers nodes in
    the order proximity domains first appear in one pass over the processor, x2APIC and generic
    initiator entries in table order, then in a pass over the memory entries.  Listing
    processors by domain and the initiators after them gives: domains with vCPUs in id order,
    then domains with an initiator but no vCPUs, then memory-only domains
    (numavm.check.linux_numa.node_numbering).
    """
    procs: list[SratEntry] = []
    mems: list[SratEntry] = []
    for dl in sorted(layout.domains, key=lambda d: d.id):
        for apic_id in dl.apic_ids:
            if apic_id <= MAX_XAPIC_ID:
                procs.append(ProcessorAffinity(dl.id, apic_id))
            else:
                procs.append(X2ApicAffinity(dl.id, apic_id))
        for r in dl.ranges:
            mems.append(MemoryAffinity(dl.id, r.start, r.size))
    inits: list[SratEntry] = [GenericInitiatorAffinity(dev.domain, PCI_SEGMENT, dev.bus, dev.devfn)
                              for dev in layout.pci.devices if dev.initiator]
    return Srat(tuple(procs + inits + mems))


# ---------------------------------------------------------------- SLIT


@dataclass(frozen=True)
class Slit(_Table):
    """System Locality Information Table: an N x N matrix of distances."""

    distances: tuple[tuple[int, ...], ...]
    signature: ClassVar[bytes] = b"SLIT"
    revision: ClassVar[int] = 1

    def __post_init__(self) -> None:
        n = len(self.distances)
        if any(len(row) != n for row in self.distances):
            raise ValueError("SLIT distances must be a square matrix")

    def body(self) -> bytes:
        return struct.pack("<Q", len(self.distances)) + b"".join(bytes(row) for row in self.distances)


# ---------------------------------------------------------------- placement


def _align(addr: int, align: int = TABLE_ALIGN) -> int:
    return (addr + align - 1) & -align


Table = Union[Xsdt, Fadt, Dsdt, Madt, Srat, Slit, Mcfg, "Hmat"]


@dataclass(frozen=True)
class AcpiTables:
    """Every table the guest gets, and where each one goes in guest memory."""

    rsdp: Rsdp
    xsdt: Xsdt
    fadt: Fadt
    dsdt: Dsdt
    madt: Madt
    srat: Srat | None
    slit: Slit | None
    rsdp_addr: int
    # (name, guest-physical address) of every table but the RSDP, in memory order
    addresses: tuple[tuple[str, int], ...] = field(default=())
    mptable: "MpTable | None" = None  # not ACPI: the MP spec's table, for the pre-ACPI scan
    hmat: "Hmat | None" = None  # only when the machine describes latency, bandwidth or caches
    mcfg: Mcfg | None = None  # only when the machine has PCI devices

    def tables(self) -> tuple[Table, ...]:
        """The XSDT and the tables in memory order (RSDP excluded)."""
        by_name: dict[str, Table] = {t.name: t for t in
                                     (self.xsdt, self.fadt, self.dsdt, self.madt, self.srat, self.slit,
                                      self.hmat, self.mcfg)
                                     if t is not None}
        return tuple(by_name[n] for n, _ in self.addresses)

    def address_of(self, name: str) -> int:
        if name == "RSDP":
            return self.rsdp_addr
        for n, addr in self.addresses:
            if n == name:
                return addr
        raise KeyError(name)

    def blobs(self) -> dict[str, bytes]:
        """{"RSDP": ..., "XSDT": ..., "FACP": ..., "DSDT": ..., "APIC": ..., ["SRAT", "SLIT", ["HMAT"]], ["MCFG"]}."""
        out = {"RSDP": self.rsdp.to_bytes()}
        out.update((t.name, t.to_bytes()) for t in self.tables())
        return out

    def placements(self) -> list[tuple[int, bytes]]:
        """(guest-physical address, bytes) for every table, RSDP first."""
        blobs = self.blobs()
        out = [(self.rsdp_addr, blobs["RSDP"])] + [(addr, blobs[n]) for n, addr in self.addresses
                                                   if n in blobs]
        return out + (self.mptable.placements() if self.mptable is not None else [])


def build_tables(layout: Layout, uarts: Sequence[tuple[int, int]] = ((_lay.COM1_PORT, _lay.COM1_IRQ),)
                 ) -> AcpiTables:
    """All tables for `layout`, packed from `layout.table_area.start`; the DSDT describes `uarts`.

    The classic machine (``layout.topology.numa`` False) gets no SRAT/SLIT.
    Raises NumavmError if the tables do not fit the table area.
    """
    topo = layout.topology
    dsdt = build_dsdt(uarts, layout.pci)
    madt = build_madt(layout)
    mcfg = build_mcfg(layout.pci)
    srat = build_srat(layout) if topo.numa else None
    slit = Slit(topo.distances) if topo.numa else None
    # XSDT order: FADT first (by convention), then the others.
    pointed: list[tuple[str, int]] = [("FACP", FADT_LENGTH), ("DSDT", len(dsdt.to_bytes())),
                                      ("APIC", len(madt.to_bytes()))]
    if srat is not None and slit is not None:
        pointed += [("SRAT", len(srat.to_bytes())), ("SLIT", len(slit.to_bytes()))]
    hmat = None
    if topo.has_hmat:  # the module only when needed: imports are a start-up cost
        from numavm.plan.acpi.hmat import build_hmat

        hmat = build_hmat(topo)
    if hmat is not None:
        pointed.append(("HMAT", len(hmat.to_bytes())))
    if mcfg is not None:
        pointed.append(("MCFG", len(mcfg.to_bytes())))
    xsdt_len = HEADER.size + 8 * (len(pointed) - 1)  # the DSDT hangs off the FADT, not the XSDT

    area = layout.table_area
    addr = _align(area.start)
    addresses: list[tuple[str, int]] = []
    from numavm.plan.acpi.mptable import MpTable, table_size

    # An MP table can list only xAPIC ids: where a vCPU's id is >= 255 it would
    # contradict the MADT (a guest booted with acpi=off would lose those vCPUs), so
    # such machines get none, as with Cloud Hypervisor.
    mp = not layout.needs_x2apic
    for name, size in [("XSDT", xsdt_len)] + pointed + ([("MPTABLE", table_size(layout))] if mp else []):
        addresses.append((name, addr))
        end = addr + size
        if end > area.end:
            raise NumavmError(
                f"ACPI tables do not fit the table area {area} ({area.size} bytes): "
                f"{name} would end at {end:#x}")
        addr = _align(end)
    at = dict(addresses)
    if layout.rsdp_addr % 16 or layout.rsdp_addr in area:
        raise NumavmError(f"RSDP address {layout.rsdp_addr:#x} must be 16-byte aligned and outside {area}")

    fadt = Fadt(dsdt_addr=at["DSDT"])
    xsdt = Xsdt(tuple(at[n] for n, _ in pointed if n != "DSDT"))
    assert len(xsdt.to_bytes()) == xsdt_len
    return AcpiTables(
        rsdp=Rsdp(at["XSDT"]), xsdt=xsdt, fadt=fadt, dsdt=dsdt, madt=madt, srat=srat, slit=slit,
        rsdp_addr=layout.rsdp_addr, addresses=tuple(a for a in addresses if a[0] != "MPTABLE"),
        mptable=MpTable(layout.apic_ids, layout.mp_pointer_addr, at["MPTABLE"]) if mp else None,
        hmat=hmat, mcfg=mcfg,
    )

