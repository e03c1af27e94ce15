"""The Intel MultiProcessor table (MP spec 1.4): the pre-ACPI way to list CPUs.

Linux prefers the MADT and ignores this table when ACPI is on, but it looks
for the table's floating pointer before it reads ACPI, scanning the EBDA,
the top of base memory and the 64 KiB BIOS area; under an emulating KVM
that scan alone costs ~5 s (it remaps for every 16 bytes).  A valid pointer
in the first place it looks ends the scan, and with ``acpi=off`` the guest
still finds its vCPUs, IOAPIC and ISA interrupts here, as Firecracker's
guests do.  The table holds only xAPIC ids, so a machine with an APIC id past
254 gets none (`numavm.plan.acpi.build_tables`): it would contradict the MADT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from numavm.plan.layout import IOAPIC_ADDR, LAPIC_ADDR, MAX_XAPIC_ID, Layout
from numavm.plan.acpi.tables import IOAPIC_ID, NMI_LINT, TIMER_GSI, TIMER_IRQ

_FLOATING = struct.Struct("<4sIBBB5s")  # "_MP_", physptr, length/16, spec rev, checksum, features
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBx")  # "PCMP", length, rev, checksum, OEM, product, ...
_PROCESSOR = struct.Struct("<BBBBII8x")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INTERRUPT = struct.Struct("<BBHBBBB")
assert (_FLOATING.size, _HEADER.size, _PROCESSOR.size, _BUS.size, _IOAPIC.size, _INTERRUPT.size) == \
    (16, 44, 20, 8, 8, 8)

SPEC_REV = 4
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED, CPU_BSP = 1, 2
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = 0x201  # FPU, local APIC
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
ISA_IRQS = 16


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


@dataclass(frozen=True)
class MpTable:
    """The floating pointer (at `pointer_addr`) and the configuration table (at `table_addr`)."""

    apic_ids: tuple[int, ...]  # in vCPU order; the first is the boot CPU
    pointer_addr: int
    table_addr: int

    def table(self) -> bytes:
        entries = [
            _PROCESSOR.pack(0, apic, APIC_VERSION, CPU_ENABLED | (CPU_BSP if k == 0 else 0),
                            CPU_SIGNATURE, CPU_FEATURES)
            for k, apic in enumerate(self.apic_ids) if apic <= MAX_XAPIC_ID]
        entries.append(_BUS.pack(1, 0, b"ISA   "))
        entries.append(_IOAPIC.pack(2, IOAPIC_ID, IOAPIC_VERSION, 1, IOAPIC_ADDR))
        for irq in range(ISA_IRQS):  # ISA IRQ n on IOAPIC pin n, but the timer on pin 2 (as the MADT says)
            if irq == TIMER_GSI:
                continue
            pin = TIMER_GSI if irq == TIMER_IRQ else irq
            entries.append(_INTERRUPT.pack(3, MP_INT, 0, 0, irq, IOAPIC_ID, pin))
        entries.append(_INTERRUPT.pack(4, MP_EXTINT, 0, 0, 0, 0xFF, 0))  # LINT0: the 8259
        entries.append(_INTERRUPT.pack(4, MP_NMI, 0, 0, 0, 0xFF, NMI_LINT))
        body = b"".join(entries)
        length = _HEADER.size + len(body)
        head = _HEADER.pack(b"PCMP", length, SPEC_REV, 0, b"NUMAVM  ", b"NUMAVM      ", 0, 0,
                            len(entries), LAPIC_ADDR, 0, 0)
        raw = head + body
        return raw[:7] + bytes([_checksum(raw)]) + raw[8:]

    def pointer(self) -> bytes:
        raw = _FLOATING.pack(b"_MP_", self.table_addr, 1, SPEC_REV, 0, bytes(5))
        return raw[:10] + bytes([_checksum(raw)]) + raw[11:]

    def placements(self) -> list[tuple[int, bytes]]:
        return [(self.pointer_addr, self.pointer()), (self.table_addr, self.table())]


def table_size(layout: Layout) -> int:
    cpus = sum(1 for a in layout.apic_ids if a <= MAX_XAPIC_ID)
    return _HEADER.size + cpus * _PROCESSOR.size + _BUS.size + _IOAPIC.size + (ISA_IRQS - 1 + 2) * _INTERRUPT.size
