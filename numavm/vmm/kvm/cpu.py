"""Pure x86-64 CPU state for entering a guest: page tables, GDT, registers.

Nothing here touches KVM: it builds bytes to copy into guest memory and a
`CpuState` describing register values; `numavm.vmm.kvm.ioctls.Vcpu.load_cpu_state`
applies that state with ioctls.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PAGE_SIZE = 4 * KiB
ENTRIES_PER_TABLE = 512
# One PDPT spans 512 GiB; four-level paging reaches 256 TiB.
_PDPT_SPAN = ENTRIES_PER_TABLE * GiB
MAX_IDENTITY_TOP = ENTRIES_PER_TABLE * _PDPT_SPAN

# IA32_APIC_BASE (MSR 0x1B): where a vCPU's local APIC is and which mode it runs in.
MSR_IA32_APIC_BASE = 0x1B
APIC_BASE_BSP = 1 << 8
APIC_BASE_X2APIC = 1 << 10  # x2APIC mode: 32-bit ids through MSRs
APIC_BASE_ENABLE = 1 << 11
DEFAULT_LAPIC_ADDR = 0xFEE0_0000


def x2apic_base(bsp: bool, lapic_addr: int = DEFAULT_LAPIC_ADDR) -> int:
    """IA32_APIC_BASE of a vCPU whose firmware left it in x2APIC mode.

    A Linux guest parses the MADT and SRAT before it could switch to x2APIC
    itself, and then keeps APIC ids past 254 only if x2APIC is already on
    ("x2apic: enabled by BIOS, switching to x2apic ops"), as SeaBIOS leaves
    every CPU of a machine with such ids.
    """
    return lapic_addr | APIC_BASE_ENABLE | APIC_BASE_X2APIC | (APIC_BASE_BSP if bsp else 0)


# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_HUGE = 1 << 7  # PS: a 2 MiB leaf in a PD, a 1 GiB leaf in a PDPT

# Accessed/dirty are preset so the CPU (or KVM's emulator, which is what runs
# guest kernel code on hosts without hardware paging support) never has to
# write back into the tables on first touch.
_TABLE_FLAGS = PTE_PRESENT | PTE_WRITE | PTE_ACCESSED
_LEAF_FLAGS = PTE_PRESENT | PTE_WRITE | PTE_ACCESSED | PTE_DIRTY | PTE_HUGE

# Control-register and EFER bits.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as 1

# GDT layout of the Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst):
# __BOOT_CS = 0x10, __BOOT_DS = 0x18; the TSS follows at 0x20.
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
GDT_ENTRIES = 6  # null, unused, code, data, TSS (16 bytes: two slots)
GDT_SIZE = GDT_ENTRIES * 8

SEG_TYPE_CODE_XR_ACCESSED = 0xB
SEG_TYPE_DATA_RW_ACCESSED = 0x3
SEG_TYPE_TSS_BUSY = 0xB


def _le_bytes(table: array[int]) -> bytes:
    # array('Q') is native-endian; guest tables are little-endian.
    if sys.byteorder != "little":
        table.byteswap()
    return table.tobytes()


def _entries(first: int, count: int, step: int, flags: int) -> array[int]:
    """`count` consecutive entries first|flags, first+step|flags, ... built in C."""
    return array("Q", range(first | flags, first + count * step, step))


def _pad_table(table: array[int]) -> array[int]:
    table.frombytes(bytes(8 * (-len(table) % ENTRIES_PER_TABLE)))
    return table


def identity_top(top: int) -> int:
    """The top actually mapped: at least 4 GiB, rounded up to 1 GiB."""
    if top < 0 or top > MAX_IDENTITY_TOP:
        raise ValueError(f"identity map top {top:#x} outside 0..{MAX_IDENTITY_TOP:#x}")
    return max(4 * GiB, -(-top // GiB) * GiB)


def page_tables_size(top: int = 4 * GiB, *, huge_1g: bool = False) -> int:
    """Bytes `identity_page_tables(base, top, huge_1g=...)` returns."""
    top = identity_top(top)
    n_pdpt = -(-top // _PDPT_SPAN)
    n_pd = 0 if huge_1g else top // GiB
    return (1 + n_pdpt + n_pd) * PAGE_SIZE


def identity_page_tables(base: int, top: int = 4 * GiB, *, huge_1g: bool = False) -> bytes:
    """Four-level tables identity-mapping [0, top) for a copy at guest `base`.

    Layout from `base`: the PML4 (so CR3 = base), the PDPTs, then (with
    2 MiB pages) one PD per GiB. 1 GiB pages need CPUID pdpe1gb in the guest.
    """
    if base % PAGE_SIZE:
        raise ValueError(f"page tables base {base:#x} is not 4 KiB aligned")
    top = identity_top(top)
    n_pdpt = -(-top // _PDPT_SPAN)
    pdpt_base = base + PAGE_SIZE
    pml4 = _pad_table(_entries(pdpt_base, n_pdpt, PAGE_SIZE, _TABLE_FLAGS))
    if huge_1g:
        pdpts = _pad_table(_entries(0, top // GiB, GiB, _LEAF_FLAGS))
        return _le_bytes(pml4) + _le_bytes(pdpts)
    n_pd = top // GiB
    pd_base = pdpt_base + n_pdpt * PAGE_SIZE
    pdpts = _pad_table(_entries(pd_base, n_pd, PAGE_SIZE, _TABLE_FLAGS))
    pds = _entries(0, top // (2 * MiB), 2 * MiB, _LEAF_FLAGS)  # already whole tables
    return b"".join((_le_bytes(pml4), _le_bytes(pdpts), _le_bytes(pds)))


@dataclass(frozen=True)
class SegmentDescriptor:
    """A segment register as KVM holds it (limit is byte-granular, expanded)."""

    base: int
    limit: int
    selector: int
    type: int
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the kernel's field name
    g: int = 0
    avl: int = 0

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor (low half only for system descriptors)."""
        raw_limit = self.limit >> 12 if self.g else self.limit
        if raw_limit > 0xFFFFF:
            raise ValueError(f"segment limit {self.limit:#x} does not fit (g={self.g})")
        access = self.type | self.s << 4 | self.dpl << 5 | self.present << 7
        flags = self.avl | self.l << 1 | self.db << 2 | self.g << 3
        return (
            (raw_limit & 0xFFFF)
            | (self.base & 0xFFFFFF) << 16
            | access << 40
            | (raw_limit >> 16) << 48
            | flags << 52
            | ((self.base >> 24) & 0xFF) << 56
        )


@dataclass(frozen=True)
class DescriptorTable:
    base: int
    limit: int


CODE64 = SegmentDescriptor(base=0, limit=0xFFFFFFFF, selector=BOOT_CS,
                 type=SEG_TYPE_CODE_XR_ACCESSED, l=1, g=1)
DATA = SegmentDescriptor(base=0, limit=0xFFFFFFFF, selector=BOOT_DS,
               type=SEG_TYPE_DATA_RW_ACCESSED, db=1, g=1)


def tss_segment(base: int = 0) -> SegmentDescriptor:
    # A usable (busy) TR is required by VM entry even if the guest never
    # switches stacks through it.
    return SegmentDescriptor(base=base, limit=0x67, selector=BOOT_TSS, type=SEG_TYPE_TSS_BUSY, s=0)


def gdt_bytes(tss_base: int = 0) -> bytes:
    """The long-mode GDT matching `long_mode_state` (GDT_SIZE bytes)."""
    tss = tss_segment(tss_base)
    entries = array("Q", (0, 0, CODE64.descriptor(), DATA.descriptor(),
                          tss.descriptor(), tss_base >> 32))
    return _le_bytes(entries)


@dataclass(frozen=True)
class CpuState:
    """Register values to load into a vCPU; absent names are left as they are.

    `segments` keys are kvm_sregs segment names (cs, ds, es, fs, gs, ss, tr,
    ldt); `control` keys are cr0, cr3, cr4, efer; `regs` keys are kvm_regs
    names (rip, rsp, rsi, rflags, ...), unnamed general registers become 0.
    """

    segments: Mapping[str, SegmentDescriptor] = field(default_factory=dict)
    gdt: DescriptorTable | None = None
    idt: DescriptorTable | None = None
    control: Mapping[str, int] = field(default_factory=dict)
    regs: Mapping[str, int] = field(default_factory=dict)


def long_mode_state(pml4: int, gdt_base: int, rip: int, *, rsp: int = 0,
                    rsi: int = 0, tss_base: int = 0) -> CpuState:
    """64-bit long mode, paging on with CR3 = `pml4`, flat CS/DS at the boot selectors.

    `gdt_base` is where `gdt_bytes(tss_base)` was written; `rsi` carries the
    Linux boot_params pointer.
    """
    return CpuState(
        segments=MappingProxyType({
            "cs": CODE64, "ds": DATA, "es": DATA, "fs": DATA, "gs": DATA, "ss": DATA,
            "tr": tss_segment(tss_base),
        }),
        gdt=DescriptorTable(gdt_base, GDT_SIZE - 1),
        idt=DescriptorTable(0, 0),
        control=MappingProxyType({
            "cr0": CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG,
            "cr3": pml4,
            "cr4": CR4_PAE,
            "efer": EFER_LME | EFER_LMA,
        }),
        regs=MappingProxyType({"rip": rip, "rsp": rsp, "rsi": rsi, "rflags": RFLAGS_RESERVED}),
    )
