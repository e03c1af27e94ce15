"""ctypes bindings for the Linux KVM API: the only module in numavm that issues ioctls.

Objects: `Kvm` (the /dev/kvm system fd), `Vm` (one VM fd) and `Vcpu` (one
vCPU fd plus its mmap'ed `kvm_run` page). Each owns its fd and closes it
idempotently; closing a `Vm` closes its vCPUs.

Every ioctl goes through `fcntl.ioctl`, which drops the GIL for the call, so
one Python thread per vCPU can sit in KVM_RUN concurrently. Structures are
declared once, checked against the UAPI sizes (linux/kvm.h, asm/kvm.h), and
ioctl request numbers are computed from direction, size and number.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import functools
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar, cast

from numavm.vmm.kvm.cpu import CpuState, DescriptorTable, SegmentDescriptor
from numavm.host.libc import HostError
from numavm.errors import NumavmError

__all__ = [
    "KVM_API_VERSION", "KVM_PATH", "KvmError", "KvmIoctlError", "KvmCap", "KvmExit", "KvmIoDirection",
    "KvmInternalError", "KvmSystemEvent", "MpState", "REQUIRED_CAPS",
    "KvmRegs", "KvmSegment", "KvmDtable", "KvmSregs", "KvmFpu", "KvmLapicState",
    "KvmVcpuEvents", "KvmUserspaceMemoryRegion", "KvmCpuidEntry2", "KvmCpuid2",
    "KvmMsrEntry", "KvmMsrs", "KvmIrqLevel", "KvmPitConfig", "KvmMpState", "KvmEnableCap", "KvmRun",
    "KvmIoeventfd", "KvmIrqfd", "KvmIrqRoutingEntry", "KvmIrqRouting", "KvmMsi",
    "IrqchipRoute", "MsiRoute", "Route", "default_irq_routes", "DEVICE_CAPS", "IOAPIC_PINS", "FIRST_MSI_GSI",
    "X2APIC_API_FLAGS",
    "IoExit", "MmioExit", "InternalErrorExit", "SystemEventExit", "FailEntryExit",
    "Kvm", "Vm", "Vcpu", "host_address", "APIC_ID_OFFSET",
    "RUN_WORD_EXIT_REASON", "RUN_WORD_IO", "RUN_WORD_IO_COUNT", "RUN_WORD_IO_DATA_OFFSET",
    "RUN_WORD_MMIO_ADDR", "RUN_WORD_MMIO_LEN", "RUN_WORD_MMIO_IS_WRITE", "RUN_MMIO_DATA",
]

KVM_PATH = "/dev/kvm"
KVM_API_VERSION = 12  # the only stable version there has ever been


class KvmError(NumavmError):
    """A KVM problem reported in one line (missing capability, closed handle, ...)."""


class KvmIoctlError(KvmError, HostError):
    """A failed ioctl: "KVM_CREATE_VCPU: EEXIST (File exists)"; `errno` is set."""

    def __init__(self, err: int, what: str) -> None:
        HostError.__init__(self, err, what)


def _errno_text(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


# --- ioctl request numbers (include/uapi/asm-generic/ioctl.h) -------------

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
_IOC_SIZEMASK = (1 << 14) - 1
KVMIO = 0xAE

if TYPE_CHECKING:
    _CType = type[ctypes._SimpleCData[Any]] | type[ctypes.Structure] | type[ctypes.Union]


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    assert 0 <= size <= _IOC_SIZEMASK, size
    return (direction << _IOC_DIRSHIFT | size << _IOC_SIZESHIFT
            | type_ << _IOC_TYPESHIFT | nr << _IOC_NRSHIFT)


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, KVMIO, nr, 0)


def _IOW(nr: int, ctype: _CType) -> int:
    return _IOC(_IOC_WRITE, KVMIO, nr, ctypes.sizeof(ctype))


def _IOR(nr: int, ctype: _CType) -> int:
    return _IOC(_IOC_READ, KVMIO, nr, ctypes.sizeof(ctype))


def _IOWR(nr: int, ctype: _CType) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, KVMIO, nr, ctypes.sizeof(ctype))


# --- structures -----------------------------------------------------------

u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_ = ([(name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", KvmDtable), ("idt", KvmDtable)]
                + [(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))])


class KvmFpu(ctypes.Structure):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


KVM_APIC_REG_SIZE = 0x400
APIC_ID_OFFSET = 0x20  # xAPIC ID register; the id is in bits 24-31


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]

    def reg(self, offset: int) -> int:
        """The 32-bit APIC register at `offset` (e.g. APIC_ID_OFFSET)."""
        return int(struct.unpack_from("<I", self, offset)[0])

    def set_reg(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self, offset, value)

    @property
    def apic_id(self) -> int:
        """The xAPIC-mode id (bits 24-31 of the ID register)."""
        return self.reg(APIC_ID_OFFSET) >> 24


class _EventsException(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _EventsInterrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _EventsNmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _EventsSmi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _EventsTripleFault(ctypes.Structure):
    _fields_ = [("pending", u8)]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [("exception", _EventsException), ("interrupt", _EventsInterrupt),
                ("nmi", _EventsNmi), ("sipi_vector", u32), ("flags", u32),
                ("smi", _EventsSmi), ("triple_fault", _EventsTripleFault),
                ("reserved", u8 * 26), ("exception_has_payload", u8),
                ("exception_payload", u64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class KvmCpuid2(ctypes.Structure):
    """Header of kvm_cpuid2; `nent` KvmCpuidEntry2 follow it (see _FlexBuffer)."""

    _fields_ = [("nent", u32), ("padding", u32)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrs(ctypes.Structure):
    """Header of kvm_msrs; `nmsrs` KvmMsrEntry follow it."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class _IrqOrStatus(ctypes.Union):
    _fields_ = [("irq", u32), ("status", s32)]


class KvmIrqLevel(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("u", _IrqOrStatus), ("level", u32)]


KVM_PIT_SPEAKER_DUMMY = 1


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", ctypes.c_uint8 * 64)]



# Device plumbing: ioeventfd (a guest write signals an eventfd inside KVM, no exit), irqfd
# (an eventfd write injects a GSI), GSI routing (what each GSI means) and MSI injection.

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32),
                ("pad", u8 * 36)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0


class KvmIrqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class _RoutingIrqchip(ctypes.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class _RoutingMsi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _RoutingUnion(ctypes.Union):
    _fields_ = [("irqchip", _RoutingIrqchip), ("msi", _RoutingMsi), ("pad", u32 * 8)]


class KvmIrqRoutingEntry(ctypes.Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _RoutingUnion)]


class KvmIrqRouting(ctypes.Structure):
    """Header of kvm_irq_routing; `nr` KvmIrqRoutingEntry follow it."""

    _fields_ = [("nr", u32), ("flags", u32)]


class KvmMsi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32),
                ("devid", u32), ("pad", u8 * 12)]


# kvm_run and the exit union members numavm reads.

class _RunHw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _RunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _RunException(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _RunIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class _RunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _RunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _RunSystemEvent(ctypes.Structure):
    # The kernel overlays `__u64 flags` on data[0] (older ABI).
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _RunExit(ctypes.Union):
    _fields_ = [("hw", _RunHw), ("fail_entry", _RunFailEntry), ("ex", _RunException),
                ("io", _RunIo), ("mmio", _RunMmio), ("internal", _RunInternal),
                ("system_event", _RunSystemEvent), ("padding", ctypes.c_char * 256)]


SYNC_REGS_SIZE_BYTES = 2048


class KvmRun(ctypes.Structure):
    _anonymous_ = ("exit",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", _RunExit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
                ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES)]


# Sizes from the UAPI headers (x86-64): a mismatch means a wrong declaration.
assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSegment) == 24
assert ctypes.sizeof(KvmDtable) == 16
assert ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmFpu) == 416
assert ctypes.sizeof(KvmLapicState) == 1024
assert ctypes.sizeof(KvmVcpuEvents) == 64
assert KvmVcpuEvents.exception_payload.offset == 56
assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32
assert ctypes.sizeof(KvmCpuidEntry2) == 40
assert ctypes.sizeof(KvmEnableCap) == 104
assert ctypes.sizeof(KvmCpuid2) == 8
assert ctypes.sizeof(KvmMsrEntry) == 16
assert ctypes.sizeof(KvmMsrs) == 8
assert ctypes.sizeof(KvmIrqLevel) == 8
assert ctypes.sizeof(KvmPitConfig) == 64
assert ctypes.sizeof(KvmMpState) == 4
assert ctypes.sizeof(KvmIoeventfd) == 64
assert ctypes.sizeof(KvmIrqfd) == 32
assert ctypes.sizeof(KvmIrqRoutingEntry) == 48 and KvmIrqRoutingEntry.u.offset == 16
assert ctypes.sizeof(KvmIrqRouting) == 8
assert ctypes.sizeof(KvmMsi) == 32
assert ctypes.sizeof(_RunExit) == 256
assert ctypes.sizeof(KvmRun) == 2352
assert KvmRun.exit_reason.offset == 8 and KvmRun.exit.offset == 32 and KvmRun.s.offset == 304

_RUN_EXIT_OFFSET = KvmRun.exit.offset
_MMIO_DATA_OFFSET = _RUN_EXIT_OFFSET + _RunMmio.data.offset

# The exit hot path (numavm.vmm.kvm.machine) reads kvm_run as native 32-bit words
# (Vcpu.words) at these indices, derived from the declarations above: no
# ctypes field access and no object per exit.
#   RUN_WORD_EXIT_REASON     exit_reason
#   RUN_WORD_IO              exit.io's first word: direction | size << 8 | port << 16
#   RUN_WORD_IO_COUNT        exit.io.count
#   RUN_WORD_IO_DATA_OFFSET  exit.io.data_offset's low word (the offset lies
#                            inside the vCPU mapping, far below 4 GiB)
RUN_WORD_EXIT_REASON = KvmRun.exit_reason.offset // 4
RUN_WORD_IO = (_RUN_EXIT_OFFSET + _RunIo.direction.offset) // 4
RUN_WORD_IO_COUNT = (_RUN_EXIT_OFFSET + _RunIo.count.offset) // 4
RUN_WORD_IO_DATA_OFFSET = (_RUN_EXIT_OFFSET + _RunIo.data_offset.offset) // 4
#   RUN_WORD_MMIO_ADDR       exit.mmio.phys_addr's low word (the high word follows)
#   RUN_WORD_MMIO_LEN        exit.mmio.len
#   RUN_WORD_MMIO_IS_WRITE   the word holding exit.mmio.is_write in its low byte
#   RUN_MMIO_DATA            the byte offset of exit.mmio.data (8 bytes)
RUN_WORD_MMIO_ADDR = (_RUN_EXIT_OFFSET + _RunMmio.phys_addr.offset) // 4
RUN_WORD_MMIO_LEN = (_RUN_EXIT_OFFSET + _RunMmio.len.offset) // 4
RUN_WORD_MMIO_IS_WRITE = (_RUN_EXIT_OFFSET + _RunMmio.is_write.offset) // 4
RUN_MMIO_DATA = _MMIO_DATA_OFFSET
assert sys.byteorder == "little"
assert (_RunMmio.phys_addr.offset, _RunMmio.data.offset, _RunMmio.len.offset, _RunMmio.is_write.offset) == (0, 8, 16, 20)
assert (RUN_WORD_MMIO_ADDR, RUN_WORD_MMIO_LEN, RUN_WORD_MMIO_IS_WRITE, RUN_MMIO_DATA) == (8, 12, 13, 40)
assert KvmRun.exit_reason.offset % 4 == 0 and _RUN_EXIT_OFFSET % 8 == 0
assert (_RunIo.direction.offset, _RunIo.size.offset, _RunIo.port.offset) == (0, 1, 2)
assert (_RunIo.count.offset, _RunIo.data_offset.offset) == (4, 8)
assert (RUN_WORD_EXIT_REASON, RUN_WORD_IO, RUN_WORD_IO_COUNT, RUN_WORD_IO_DATA_OFFSET) == (2, 8, 9, 10)

# --- request numbers ------------------------------------------------------

KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, KvmCpuid2)
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, u64)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, KvmIrqLevel)
KVM_CREATE_PIT2 = _IOW(0x77, KvmPitConfig)
KVM_SET_BOOT_CPU_ID = _IO(0x78)
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, KvmRegs)
KVM_SET_REGS = _IOW(0x82, KvmRegs)
KVM_GET_SREGS = _IOR(0x83, KvmSregs)
KVM_SET_SREGS = _IOW(0x84, KvmSregs)
KVM_GET_MSRS = _IOWR(0x88, KvmMsrs)
KVM_SET_MSRS = _IOW(0x89, KvmMsrs)
KVM_GET_FPU = _IOR(0x8C, KvmFpu)
KVM_SET_FPU = _IOW(0x8D, KvmFpu)
KVM_GET_LAPIC = _IOR(0x8E, KvmLapicState)
KVM_SET_LAPIC = _IOW(0x8F, KvmLapicState)
KVM_SET_CPUID2 = _IOW(0x90, KvmCpuid2)
KVM_GET_CPUID2 = _IOWR(0x91, KvmCpuid2)
KVM_GET_MP_STATE = _IOR(0x98, KvmMpState)
KVM_SET_MP_STATE = _IOW(0x99, KvmMpState)
KVM_ENABLE_CAP = _IOW(0xA3, KvmEnableCap)
KVM_GET_VCPU_EVENTS = _IOR(0x9F, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _IOW(0xA0, KvmVcpuEvents)
KVM_SET_GSI_ROUTING = _IOW(0x6A, KvmIrqRouting)
KVM_IRQFD = _IOW(0x76, KvmIrqfd)
KVM_IOEVENTFD = _IOW(0x79, KvmIoeventfd)
KVM_SIGNAL_MSI = _IOW(0xA5, KvmMsi)

# --- constants ------------------------------------------------------------


class KvmCap(enum.IntEnum):
    IRQCHIP = 0
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    SET_BOOT_CPU_ID = 34
    PIT2 = 33
    SET_IDENTITY_MAP_ADDR = 37
    VCPU_EVENTS = 41
    INTERNAL_ERROR_DATA = 40
    MAX_VCPUS = 66
    X2APIC_API = 129
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    IRQ_ROUTING = 25
    IRQFD = 32
    IOEVENTFD = 36
    SIGNAL_MSI = 77
    IOEVENTFD_ANY_LENGTH = 122


# KVM_CAP_X2APIC_API flags: 32-bit x2APIC ids in MSI routes and the LAPIC state, and
# x2APIC destination 0xFF not treated as xAPIC broadcast (it is APIC id 255).
KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1
X2APIC_API_FLAGS = KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK

# What every numavm VM uses; Kvm() refuses a host lacking any of them.
REQUIRED_CAPS: tuple[KvmCap, ...] = (
    KvmCap.USER_MEMORY, KvmCap.IRQCHIP, KvmCap.PIT2, KvmCap.EXT_CPUID, KvmCap.VCPU_EVENTS,
    KvmCap.NR_VCPUS, KvmCap.MAX_VCPUS, KvmCap.SET_TSS_ADDR, KvmCap.SET_IDENTITY_MAP_ADDR,
    KvmCap.SET_BOOT_CPU_ID,
)

# What a machine with PCI devices uses on top (checked when it has some, so a machine without
# devices runs where it ran before): notify writes without exits, interrupts from an I/O
# thread without an ioctl, MSI routes, and len-0 ("any length") notify eventfds.
DEVICE_CAPS: tuple[KvmCap, ...] = (
    KvmCap.IOEVENTFD, KvmCap.IOEVENTFD_ANY_LENGTH, KvmCap.IRQFD, KvmCap.IRQ_ROUTING, KvmCap.SIGNAL_MSI,
)


class KvmExit(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37


class KvmIoDirection(enum.IntEnum):
    IN = 0
    OUT = 1


class KvmInternalError(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class KvmSystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


_EXITS: dict[int, KvmExit] = {int(e): e for e in KvmExit}


# --- GSI routes -------------------------------------------------------------

IOAPIC_PINS = 24  # KVM's in-kernel IOAPIC (KVM_IOAPIC_NUM_PINS)
PIC_PINS = 16  # two cascaded i8259s
FIRST_MSI_GSI = IOAPIC_PINS  # GSIs past the IOAPIC's pins are free for MSI routes


@dataclass(frozen=True, slots=True)
class IrqchipRoute:
    """GSI `gsi` drives pin `pin` of in-kernel chip `chip` (KVM_IRQCHIP_*)."""

    gsi: int
    chip: int
    pin: int


@dataclass(frozen=True, slots=True)
class MsiRoute:
    """GSI `gsi` sends the MSI (address, data): what a device writes to deliver it."""

    gsi: int
    address: int  # 64-bit; with KVM_X2APIC_API_USE_32BIT_IDS bits 40-63 are destination id bits 8-31
    data: int


Route = IrqchipRoute | MsiRoute


def default_irq_routes() -> list[IrqchipRoute]:
    """The routes KVM_CREATE_IRQCHIP installs (virt/kvm/irqchip.c's default table, x86's
    kvm_setup_default_irq_routing): GSI n is IOAPIC pin n (0-23) and, for 0-15, also pin n % 8
    of the master (n < 8) or slave PIC.  KVM_SET_GSI_ROUTING replaces the whole table, so a
    table with MSI routes starts from these, or the UARTs' KVM_IRQ_LINE would reach nothing."""
    out = []
    for gsi in range(IOAPIC_PINS):
        out.append(IrqchipRoute(gsi, KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < PIC_PINS:
            out.append(IrqchipRoute(gsi, KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE, gsi % 8))
    return out


# --- the one ioctl wrapper ------------------------------------------------

_Buffer = ctypes.Structure | ctypes.Array | ctypes.c_uint64 | bytearray  # type: ignore[type-arg]


def _ioctl(fd: int, name: str, request: int, arg: int | _Buffer = 0) -> int:
    """ioctl(fd, request, arg); a failure becomes KvmError naming `name` and the errno.

    A buffer `arg` is passed by address and filled in place by the kernel.
    """
    try:
        if isinstance(arg, int):
            if not -(1 << 31) <= arg < 1 << 32:
                raise KvmIoctlError(errno.EINVAL, f"{name} with argument {arg:#x}")
            # fcntl.ioctl takes a C int; the kernel reads these arguments as
            # 32-bit unsigned values (e.g. the TSS address), so wrap, not refuse.
            if arg >= 1 << 31:
                arg -= 1 << 32
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as e:
        raise KvmIoctlError(e.errno or 0, name) from None


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # already gone: closing is idempotent and must not mask the real error


_S = TypeVar("_S", bound=ctypes.Structure)


class _FlexBuffer:
    """A kernel header followed by `count` entries (kvm_cpuid2, kvm_msrs) in one buffer."""

    def __init__(self, header: type[_S], entry: type[ctypes.Structure], count: int) -> None:
        self.raw = bytearray(ctypes.sizeof(header) + count * ctypes.sizeof(entry))
        self.header = header.from_buffer(self.raw)
        self.entries = (entry * count).from_buffer(self.raw, ctypes.sizeof(header))


def _copy(struct_: _S) -> _S:
    """A standalone copy, so results never alias a shared buffer."""
    return type(struct_).from_buffer_copy(struct_)


def host_address(buf: mmap.mmap | bytearray | ctypes.Array) -> int:  # type: ignore[type-arg]
    """The host virtual address of a writable buffer (for set_user_memory_region)."""
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # drop the export at once so the mmap can still be closed


def _cpuid_list(buf: _FlexBuffer) -> list[KvmCpuidEntry2]:
    entries = cast("ctypes.Array[KvmCpuidEntry2]", buf.entries)
    return [_copy(e) for e in entries[: buf.header.nent]]


# --- exit data ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IoExit:
    """KVM_EXIT_IO. `data` views the run page: read it for OUT, fill it for IN.

    It holds `size * count` bytes and is valid until the next `run()`.
    """

    port: int
    size: int
    direction: KvmIoDirection
    count: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class MmioExit:
    """KVM_EXIT_MMIO. `data` views the run page (`length` bytes): fill it for reads."""

    phys_addr: int
    length: int
    is_write: bool
    data: memoryview


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    suberror: KvmInternalError | int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    type: KvmSystemEvent | int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FailEntryExit:
    hardware_entry_failure_reason: int
    cpu: int


def _enum_or_int(cls: type[enum.IntEnum], value: int) -> enum.IntEnum | int:
    try:
        return cls(value)
    except ValueError:
        return value


# --- objects --------------------------------------------------------------


class Kvm:
    """The KVM system fd: API version and capability checks, VM creation."""

    def __init__(self, path: str = KVM_PATH,
                 required_caps: Iterable[KvmCap] = REQUIRED_CAPS) -> None:
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NumavmError(f"{path} does not exist: KVM is not available on this host "
                              "(no kvm module loaded, or virtualization disabled)") from None
        except PermissionError:
            raise NumavmError(f"{path} is not accessible: permission denied "
                              "(run as root or join the group owning it)") from None
        except OSError as e:
            raise NumavmError(f"cannot open {path}: {_errno_text(e.errno or 0)}") from None
        try:
            version = _ioctl(self._fd, "KVM_GET_API_VERSION", KVM_GET_API_VERSION)
            if version != KVM_API_VERSION:
                raise KvmError(f"{path}: KVM API version {version}, numavm needs {KVM_API_VERSION}")
            for cap in required_caps:
                if self.check_extension(cap) <= 0:
                    raise KvmError(f"{path}: KVM lacks required capability KVM_CAP_{cap.name}")
            self.vcpu_mmap_size = _ioctl(self._fd, "KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            self.close()
            raise
        self.path = path

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmError("/dev/kvm handle is closed")
        return self._fd

    def check_extension(self, cap: KvmCap | int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else 1 or a capability-specific number."""
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, int(cap))

    def require(self, caps: Iterable[KvmCap], why: str) -> None:
        """Refuse, naming the first missing capability and what needed it."""
        for cap in caps:
            if self.check_extension(cap) <= 0:
                raise KvmError(f"{self.path}: KVM lacks capability KVM_CAP_{cap.name} ({why})")

    @property
    def recommended_vcpus(self) -> int:
        return self.check_extension(KvmCap.NR_VCPUS)

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(KvmCap.MAX_VCPUS) or self.recommended_vcpus

    @property
    def max_vcpu_id(self) -> int:
        """vCPU ids (= APIC ids) must be below this."""
        return self.check_extension(KvmCap.MAX_VCPU_ID) or self.max_vcpus

    def supported_cpuid(self) -> list[KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID: every leaf KVM can expose, as KVM reports it."""
        count = 128
        while True:
            buf = _FlexBuffer(KvmCpuid2, KvmCpuidEntry2, count)
            buf.header.nent = count
            try:
                _ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID, buf.raw)
                return _cpuid_list(buf)
            except KvmIoctlError as e:
                # E2BIG: the table has more leaves than we offered room for.
                if e.errno != errno.E2BIG or count >= 1 << 16:
                    raise
                count *= 2

    def create_vm(self) -> Vm:
        fd = _ioctl(self.fd, "KVM_CREATE_VM", KVM_CREATE_VM, 0)
        return Vm(self, fd)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _close_fd(fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    """One VM fd; created by `Kvm.create_vm()`. Owns the vCPUs it creates."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self._fd = fd
        self.vcpu_mmap_size = kvm.vcpu_mmap_size
        self.max_vcpu_id = kvm.max_vcpu_id
        self._vcpus: dict[int, Vcpu] = {}
        self._lock = threading.Lock()

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmError("VM is closed")
        return self._fd

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        return tuple(self._vcpus.values())

    def check_extension(self, cap: KvmCap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers for this VM's type)."""
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, int(cap))

    def set_user_memory_region(self, slot: int, guest_phys: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        """Map `size` bytes of host memory at `host_addr` to guest `guest_phys`; size 0 deletes."""
        region = KvmUserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=guest_phys,
                                          memory_size=size, userspace_addr=host_addr)
        _ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int = 0xFFFB_D000) -> None:
        """Three pages of guest-physical space Intel VMX needs for real mode; not RAM."""
        _ioctl(self.fd, "KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int = 0xFFFB_C000) -> None:
        """One page for VMX's real-mode identity page table; must not overlap the TSS."""
        _ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", KVM_SET_IDENTITY_MAP_ADDR, u64(addr))

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and per-vCPU LAPICs; call before creating vCPUs."""
        _ioctl(self.fd, "KVM_CREATE_IRQCHIP", KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        """In-kernel i8254 PIT; needs the irqchip. The dummy speaker keeps port 0x61 in-kernel."""
        _ioctl(self.fd, "KVM_CREATE_PIT2", KVM_CREATE_PIT2, KvmPitConfig(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        """Drive GSI `irq` (PIC 0-15 / IOAPIC 0-23) to `level` (0 or 1)."""
        _ioctl(self.fd, "KVM_IRQ_LINE", KVM_IRQ_LINE, KvmIrqLevel(irq=irq, level=level))

    def enable_cap(self, cap: KvmCap, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM with up to four arguments."""
        req = KvmEnableCap(cap=int(cap))
        for i, a in enumerate(args):
            req.args[i] = a
        _ioctl(self.fd, f"KVM_ENABLE_CAP({cap.name})", KVM_ENABLE_CAP, req)

    def enable_x2apic_api(self, flags: int = X2APIC_API_FLAGS) -> None:
        """KVM_CAP_X2APIC_API (what a guest with APIC ids past 254 needs); refused with the
        reason when this KVM lacks any of `flags` (the capability answers the flags it has)."""
        have = self.check_extension(KvmCap.X2APIC_API)
        if have & flags != flags:
            raise KvmError(f"this host's KVM lacks KVM_CAP_X2APIC_API flags {flags & ~have:#x} "
                           "(APIC ids past 254 need 32-bit x2APIC ids)")
        self.enable_cap(KvmCap.X2APIC_API, flags)

    def set_boot_cpu_id(self, apic_id: int) -> None:
        """Make `apic_id` the bootstrap processor; only before any vCPU exists."""
        _ioctl(self.fd, "KVM_SET_BOOT_CPU_ID", KVM_SET_BOOT_CPU_ID, apic_id)

    # -- device plumbing (numavm.vmm.kvm.pci): eventfds come from os.eventfd and stay the caller's

    @staticmethod
    def _ioeventfd_request(fd: int, addr: int, length: int, datamatch: int | None, pio: bool,
                           deassign: bool) -> KvmIoeventfd:
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length {length}: 0 (any), 1, 2, 4 or 8")
        if length == 0 and datamatch is not None:
            raise ValueError("an any-length ioeventfd cannot match data")
        flags = ((KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
                 | (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0))
        return KvmIoeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)

    def add_ioeventfd(self, fd: int, addr: int, length: int = 0, datamatch: int | None = None,
                      pio: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write of `length` bytes (0: any length) at MMIO (or, `pio`, port)
        `addr`, whose value is `datamatch` when given, signals eventfd `fd` inside KVM: the
        vCPU goes on without an exit to numavm.  EEXIST when the same match is registered."""
        req = self._ioeventfd_request(fd, addr, length, datamatch, pio, False)
        _ioctl(self.fd, f"KVM_IOEVENTFD({addr:#x})", KVM_IOEVENTFD, req)

    def remove_ioeventfd(self, fd: int, addr: int, length: int = 0, datamatch: int | None = None,
                         pio: bool = False) -> None:
        """Undo `add_ioeventfd` (the same arguments); ENOENT when it is not registered."""
        req = self._ioeventfd_request(fd, addr, length, datamatch, pio, True)
        _ioctl(self.fd, f"KVM_IOEVENTFD({addr:#x}, deassign)", KVM_IOEVENTFD, req)

    def add_irqfd(self, fd: int, gsi: int) -> None:
        """KVM_IRQFD: every write to eventfd `fd` injects GSI `gsi` as its route says (an MSI
        route: that MSI, from any thread, without an ioctl)."""
        _ioctl(self.fd, f"KVM_IRQFD(gsi {gsi})", KVM_IRQFD, KvmIrqfd(fd=fd, gsi=gsi))

    def remove_irqfd(self, fd: int, gsi: int) -> None:
        _ioctl(self.fd, f"KVM_IRQFD(gsi {gsi}, deassign)", KVM_IRQFD,
               KvmIrqfd(fd=fd, gsi=gsi, flags=KVM_IRQFD_FLAG_DEASSIGN))

    def set_gsi_routing(self, routes: Sequence[Route]) -> None:
        """KVM_SET_GSI_ROUTING: `routes` become the whole table (start from
        `default_irq_routes()`); irqfds follow the new table at once."""
        buf = _FlexBuffer(KvmIrqRouting, KvmIrqRoutingEntry, len(routes))
        buf.header.nr = len(routes)
        for entry, route in zip(buf.entries, routes):
            entry.gsi = route.gsi
            if isinstance(route, MsiRoute):
                entry.type = KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.address & 0xFFFF_FFFF
                entry.u.msi.address_hi = route.address >> 32
                entry.u.msi.data = route.data
            else:
                entry.type = KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.chip
                entry.u.irqchip.pin = route.pin
        _ioctl(self.fd, "KVM_SET_GSI_ROUTING", KVM_SET_GSI_ROUTING, buf.raw)

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: deliver one MSI now; > 0 delivered, 0 blocked by the guest (masked APIC)."""
        msi = KvmMsi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data)
        return _ioctl(self.fd, "KVM_SIGNAL_MSI", KVM_SIGNAL_MSI, msi)

    def create_vcpu(self, apic_id: int) -> Vcpu:
        """KVM_CREATE_VCPU with vcpu id = APIC id, and map its kvm_run page."""
        if not 0 <= apic_id < self.max_vcpu_id:
            raise KvmError(f"KVM_CREATE_VCPU: APIC id {apic_id} outside 0..{self.max_vcpu_id - 1}")
        with self._lock:
            fd = _ioctl(self.fd, "KVM_CREATE_VCPU", KVM_CREATE_VCPU, apic_id)
            try:
                vcpu = Vcpu(fd, apic_id, self.vcpu_mmap_size)
            except BaseException:
                _close_fd(fd)
                raise
            self._vcpus[apic_id] = vcpu
        return vcpu

    def close(self) -> None:
        with self._lock:
            vcpus, self._vcpus = list(self._vcpus.values()), {}
            fd, self._fd = self._fd, -1
        for vcpu in vcpus:
            vcpu.close()
        if fd >= 0:
            _close_fd(fd)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _closed_run(apic_id: int) -> None:
    raise KvmError(f"vCPU {apic_id} is closed")


_SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def _load_segment(dst: KvmSegment, seg: SegmentDescriptor) -> None:
    dst.base, dst.limit, dst.selector, dst.type = seg.base, seg.limit, seg.selector, seg.type
    dst.present, dst.dpl, dst.db, dst.s = seg.present, seg.dpl, seg.db, seg.s
    dst.l, dst.g, dst.avl = seg.l, seg.g, seg.avl
    dst.unusable = 0 if seg.present else 1


def _load_dtable(dst: KvmDtable, table: DescriptorTable) -> None:
    dst.base, dst.limit = table.base, table.limit


# Before Python 3.13 an mmap of a file keeps a dup() of its fd: two fds per
# vCPU, which matters against RLIMIT_NOFILE with hundreds of vCPUs.
_MMAP_NO_DUP: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
FDS_PER_VCPU = 1 if _MMAP_NO_DUP else 2


class Vcpu:
    """One vCPU fd (id = APIC id) and its mmap'ed kvm_run page; created by `Vm.create_vcpu`."""

    def __init__(self, fd: int, apic_id: int, mmap_size: int) -> None:
        self._fd = fd
        self.apic_id = apic_id
        self._mmap: mmap.mmap | None = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                                 mmap.PROT_READ | mmap.PROT_WRITE,
                                                 **_MMAP_NO_DUP)
        self._page: memoryview | None = memoryview(self._mmap)
        self._run: KvmRun | None = KvmRun.from_buffer(self._mmap)
        self._words: memoryview | None = self._page.cast("I")
        # `kvm_run()`: KVM_RUN, bare and pre-bound, for a vCPU loop's hot
        # path.  It returns nothing useful, raises InterruptedError when a
        # signal (or immediate_exit) cuts it short and OSError on failure; the
        # exit is then read from `words` / `page`.  run() is the checked form.
        # After close() it raises KvmError.  No third argument: given an int,
        # fcntl.ioctl (3.11) first tries it as a writable, then as a read-only
        # buffer, making and clearing a TypeError each time (about 1 us per
        # call here); omitted, the kernel gets 0 at once.
        self.kvm_run: Callable[[], object] = functools.partial(fcntl.ioctl, fd, KVM_RUN)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmError(f"vCPU {self.apic_id} is closed")
        return self._fd

    @property
    def page(self) -> memoryview:
        """The whole kvm_run mapping as bytes; port I/O data lies at exit.io.data_offset."""
        return self._page_view()

    @property
    def words(self) -> memoryview:
        """The same mapping as native 32-bit words, indexed by the RUN_WORD_* constants."""
        if self._words is None:
            raise KvmError(f"vCPU {self.apic_id} is closed")
        return self._words

    @property
    def run_state(self) -> KvmRun:
        """The live kvm_run structure (shared with the kernel)."""
        if self._run is None:
            raise KvmError(f"vCPU {self.apic_id} is closed")
        return self._run

    # -- registers --

    def _get(self, name: str, request: int, result: _S) -> _S:
        _ioctl(self.fd, name, request, result)
        return result

    def get_regs(self) -> KvmRegs:
        return self._get("KVM_GET_REGS", KVM_GET_REGS, KvmRegs())

    def set_regs(self, regs: KvmRegs) -> None:
        _ioctl(self.fd, "KVM_SET_REGS", KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        return self._get("KVM_GET_SREGS", KVM_GET_SREGS, KvmSregs())

    def set_sregs(self, sregs: KvmSregs) -> None:
        _ioctl(self.fd, "KVM_SET_SREGS", KVM_SET_SREGS, sregs)

    def get_fpu(self) -> KvmFpu:
        return self._get("KVM_GET_FPU", KVM_GET_FPU, KvmFpu())

    def set_fpu(self, fpu: KvmFpu) -> None:
        _ioctl(self.fd, "KVM_SET_FPU", KVM_SET_FPU, fpu)

    def get_lapic(self) -> KvmLapicState:
        """KVM_GET_LAPIC (needs the in-kernel irqchip)."""
        return self._get("KVM_GET_LAPIC", KVM_GET_LAPIC, KvmLapicState())

    def set_lapic(self, lapic: KvmLapicState) -> None:
        _ioctl(self.fd, "KVM_SET_LAPIC", KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self) -> KvmVcpuEvents:
        return self._get("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, KvmVcpuEvents())

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        _ioctl(self.fd, "KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> MpState | int:
        state = self._get("KVM_GET_MP_STATE", KVM_GET_MP_STATE, KvmMpState())
        return _enum_or_int(MpState, state.mp_state)

    def set_mp_state(self, state: MpState | int) -> None:
        """With the in-kernel irqchip, non-boot vCPUs wait for INIT/SIPI unless made RUNNABLE."""
        _ioctl(self.fd, "KVM_SET_MP_STATE", KVM_SET_MP_STATE, KvmMpState(mp_state=int(state)))

    def get_cpuid(self, max_entries: int = 256) -> list[KvmCpuidEntry2]:
        buf = _FlexBuffer(KvmCpuid2, KvmCpuidEntry2, max_entries)
        buf.header.nent = max_entries
        _ioctl(self.fd, "KVM_GET_CPUID2", KVM_GET_CPUID2, buf.raw)
        return _cpuid_list(buf)

    def set_cpuid(self, entries: Sequence[KvmCpuidEntry2]) -> None:
        """KVM_SET_CPUID2; before the first run() (KVM may refuse changes after it)."""
        buf = _FlexBuffer(KvmCpuid2, KvmCpuidEntry2, len(entries))
        buf.header.nent = len(entries)
        for dst, src in zip(buf.entries, entries):
            ctypes.memmove(ctypes.addressof(dst), ctypes.addressof(src), ctypes.sizeof(src))
        _ioctl(self.fd, "KVM_SET_CPUID2", KVM_SET_CPUID2, buf.raw)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        buf = _FlexBuffer(KvmMsrs, KvmMsrEntry, len(indices))
        buf.header.nmsrs = len(indices)
        for entry, index in zip(buf.entries, indices):
            entry.index = index
        done = _ioctl(self.fd, "KVM_GET_MSRS", KVM_GET_MSRS, buf.raw)
        if done != len(indices):
            raise KvmError(f"KVM_GET_MSRS: MSR {indices[done]:#x} is not supported")
        return {e.index: e.data for e in buf.entries}

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        buf = _FlexBuffer(KvmMsrs, KvmMsrEntry, len(msrs))
        buf.header.nmsrs = len(msrs)
        for entry, (index, value) in zip(buf.entries, msrs.items()):
            entry.index, entry.data = index, value
        # KVM_SET_MSRS returns how many it set, stopping at the first it refuses.
        done = _ioctl(self.fd, "KVM_SET_MSRS", KVM_SET_MSRS, buf.raw)
        if done != len(msrs):
            raise KvmError(f"KVM_SET_MSRS: MSR {buf.entries[done].index:#x} was refused")

    def load_cpu_state(self, state: CpuState) -> None:
        """Apply a `numavm.vmm.kvm.cpu.CpuState` (e.g. `long_mode_state(...)`) via SREGS then REGS."""
        if state.segments or state.gdt or state.idt or state.control:
            sregs = self.get_sregs()
            for name, seg in state.segments.items():
                if name not in _SEGMENT_NAMES:
                    raise ValueError(f"unknown segment register {name!r}")
                _load_segment(getattr(sregs, name), seg)
            if state.gdt is not None:
                _load_dtable(sregs.gdt, state.gdt)
            if state.idt is not None:
                _load_dtable(sregs.idt, state.idt)
            for name, value in state.control.items():
                if name not in _CONTROL_NAMES:
                    raise ValueError(f"unknown control register {name!r}")
                setattr(sregs, name, value)
            self.set_sregs(sregs)
        if state.regs:
            regs = KvmRegs()
            for name, value in state.regs.items():
                if not hasattr(regs, name):
                    raise ValueError(f"unknown register {name!r}")
                setattr(regs, name, value)
            self.set_regs(regs)

    # -- running --

    def run(self) -> KvmExit | int:
        """KVM_RUN until the next exit to userspace; returns the exit reason.

        Releases the GIL while the guest runs. A signal interrupting it is
        reported as KvmExit.INTR rather than raised.
        """
        try:
            self.kvm_run()
        except InterruptedError:
            return KvmExit.INTR
        except OSError as e:
            raise KvmIoctlError(e.errno or 0, "KVM_RUN") from None
        reason = self.words[RUN_WORD_EXIT_REASON]
        return _EXITS.get(reason, reason)

    @property
    def exit_reason(self) -> KvmExit | int:
        reason = int(self.run_state.exit_reason)
        return _EXITS.get(reason, reason)

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_state.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        """Set before signalling the vCPU thread so KVM_RUN returns EINTR at once."""
        self.run_state.immediate_exit = 1 if value else 0

    def _expect(self, reason: KvmExit) -> KvmRun:
        run = self.run_state
        if run.exit_reason != reason:
            raise KvmError(f"vCPU {self.apic_id}: last exit is {self.exit_reason!r}, not {reason.name}")
        return run

    def _page_view(self) -> memoryview:
        if self._page is None:
            raise KvmError(f"vCPU {self.apic_id} is closed")
        return self._page

    def io_exit(self) -> IoExit:
        io = self._expect(KvmExit.IO).io
        start = io.data_offset
        data = self._page_view()[start:start + io.size * io.count]
        return IoExit(io.port, io.size, KvmIoDirection(io.direction), io.count, data)

    def mmio_exit(self) -> MmioExit:
        mmio = self._expect(KvmExit.MMIO).mmio
        length = min(mmio.len, 8)
        data = self._page_view()[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + length]
        return MmioExit(mmio.phys_addr, length, bool(mmio.is_write), data)

    def internal_error(self) -> InternalErrorExit:
        internal = self._expect(KvmExit.INTERNAL_ERROR).internal
        ndata = min(internal.ndata, 16)
        return InternalErrorExit(_enum_or_int(KvmInternalError, internal.suberror),
                                 tuple(internal.data[:ndata]))

    def system_event(self) -> SystemEventExit:
        event = self._expect(KvmExit.SYSTEM_EVENT).system_event
        ndata = min(event.ndata, 16)
        return SystemEventExit(_enum_or_int(KvmSystemEvent, event.type), tuple(event.data[:ndata]))

    def fail_entry(self) -> FailEntryExit:
        fail = self._expect(KvmExit.FAIL_ENTRY).fail_entry
        return FailEntryExit(fail.hardware_entry_failure_reason, fail.cpu)

    def close(self) -> None:
        """Unmap the run page and close the fd; safe to call twice.

        If a caller still holds an exit `data` memoryview, the mapping stays
        alive until that view is dropped (closing it now would be unsafe).
        """
        fd, self._fd = self._fd, -1
        self.kvm_run = functools.partial(_closed_run, self.apic_id)  # never a reused fd number
        self._run = None
        words, self._words = self._words, None
        if words is not None:
            words.release()
        page, self._page = self._page, None
        if page is not None:
            page.release()
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a view is still held: the mapping goes when the last view does
        if fd >= 0:
            _close_fd(fd)

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
