"""A PCI function: its 4 KiB configuration space, memory BARs and MSI-X.

The engine reaches a function through ECAM or ports CF8/CFC as
``config_read(offset, size)`` / ``config_write(offset, size, value)``, and
through its BARs as ``mmio_read(bar, offset, size)`` /
``mmio_write(bar, offset, size, value)``; subclasses (a virtio transport)
answer their BAR registers in `_bar_read` / `_bar_write`.  Anything the
engine mirrors in KVM (where a BAR is, the MSI-X routes) is announced through
``on_change(change)`` after the write that changed it, with `Change`
``"bars"``, ``"msix"`` or ``"reset"``.

Configuration space, type 0 header, as firmware would leave it for Linux:

* writable: command (MEMORY, BUS_MASTER, INTX_DISABLE only; no I/O BARs, no
  SERR or parity), cache line size, latency timer, interrupt line, the BARs'
  address bits, the MSI-X enable and function-mask bits; status bits are
  read-only (nothing here reports errors), CAP_LIST set when there are
  capabilities; everything else reads as built and ignores writes.
* BARs are 32-bit non-prefetchable memory BARs of power-of-two sizes: the
  bits below the size read 0, so writing all-ones and reading back gives the
  size (Linux's ``__pci_read_base``); unimplemented BARs and the expansion
  ROM read 0.  A BAR decodes (and `bars` reports its address) only while
  COMMAND.MEMORY is set.
* The interrupt pin is 0: MSI-X only, no INTx.
* Capabilities are a linked list from 0x40 (`add_capability`); MSI-X is one
  of them when the function has vectors.  The extended space (0x100..) is
  all zero: a conventional function.

Accesses must be 1, 2 or 4 bytes, naturally aligned and inside the 4 KiB
(what CF8/CFC and Linux's ECAM accessors produce); anything else reads
all-ones and writes are dropped.

Like every model in numavm.devices, a function is a plain state machine
without locks: the engine serializes the calls (per device lock).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

from numavm.devices.pci.msix import MsixEntry, MsixTable

__all__ = [
    "Bar", "BarKind", "Change", "PciFunction", "CONFIG_SPACE_SIZE",
    "VENDOR_ID", "DEVICE_ID", "COMMAND", "STATUS", "REVISION_ID", "CLASS_CODE", "CACHE_LINE_SIZE",
    "LATENCY_TIMER", "HEADER_TYPE", "BAR0", "SUBSYSTEM_VENDOR_ID", "SUBSYSTEM_ID", "ROM_ADDRESS",
    "CAPABILITIES_POINTER", "INTERRUPT_LINE", "INTERRUPT_PIN",
    "COMMAND_MEMORY", "COMMAND_BUS_MASTER", "COMMAND_INTX_DISABLE", "STATUS_CAP_LIST",
    "CAP_ID_VENDOR", "CAP_ID_MSIX", "MSIX_CONTROL_ENABLE", "MSIX_CONTROL_MASKALL",
]

CONFIG_SPACE_SIZE = 0x1000

# type 0 header offsets (include/uapi/linux/pci_regs.h)
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: programming interface, subclass, class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10  # six BARs, 4 bytes each
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
STATUS_CAP_LIST = 1 << 4

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11
MSIX_CONTROL_ENABLE = 1 << 15
MSIX_CONTROL_MASKALL = 1 << 14

_CAP_START = 0x40
_CAP_END = 0x100
_BAR_COUNT = 6
_BAR_FLAG_BITS = 0xF  # memory BAR: bit 0 = 0 (memory), bits 2:1 type 00 (32-bit), bit 3 prefetchable = 0


class BarKind(enum.StrEnum):
    MEM32 = "mem32"  # 32-bit non-prefetchable memory


@dataclass(frozen=True, slots=True)
class Bar:
    """A BAR as the engine maps it (a dataclass, not a NamedTuple: ``index`` would shadow tuple.index)."""

    index: int
    address: int  # 0 while unassigned or while COMMAND.MEMORY is clear
    size: int
    kind: BarKind


Change = Literal["bars", "msix", "reset"]


def _ignore_change(change: Change) -> None:
    pass


def _ones(size: int) -> int:
    return (1 << (size * 8)) - 1


class PciFunction:
    """A type 0 PCI function; subclasses answer their BARs' registers.

    ``bar_sizes`` maps BAR index -> size (a power of two >= 16); with
    ``msix_vectors`` > 0 the MSI-X table and PBA sit in BAR ``msix_bar`` at
    ``msix_table_offset`` / ``msix_pba_offset`` (8-byte aligned, inside the BAR).
    """

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        bar_sizes: Mapping[int, int] | None = None,
        msix_vectors: int = 0,
        msix_bar: int = 0,
        msix_table_offset: int = 0,
        msix_pba_offset: int = 0,
    ) -> None:
        self.on_change: Callable[[Change], None] = _ignore_change
        self._cfg = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)  # bits the guest may write
        self._bar_sizes: dict[int, int] = dict(bar_sizes or {})
        self._put(VENDOR_ID, 2, vendor_id)
        self._put(DEVICE_ID, 2, device_id)
        self._put(REVISION_ID, 1, revision)
        self._put(CLASS_CODE, 3, class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, subsystem_id)
        self._put(HEADER_TYPE, 1, 0)
        self._put(INTERRUPT_PIN, 1, 0)
        self._put_mask(COMMAND, 2, COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE)
        self._put_mask(CACHE_LINE_SIZE, 1, 0xFF)
        self._put_mask(LATENCY_TIMER, 1, 0xFF)
        self._put_mask(INTERRUPT_LINE, 1, 0xFF)
        for index, size in self._bar_sizes.items():
            if not 0 <= index < _BAR_COUNT:
                raise ValueError(f"BAR index {index} is not 0..5")
            if size < 16 or size & (size - 1) or size > 1 << 31:
                raise ValueError(f"BAR{index} size {size:#x} is not a power of two in 16..2 GiB")
            self._put_mask(BAR0 + 4 * index, 4, ~(size - 1) & 0xFFFF_FFFF & ~_BAR_FLAG_BITS)
        self._next_cap = _CAP_START
        self._last_cap = -1  # offset of the last capability's header, -1: none yet
        self.msix: MsixTable | None = None
        self._msix_cap = -1
        if msix_vectors:
            self.msix = MsixTable(msix_vectors, self._msix_changed)
            size = self._bar_sizes.get(msix_bar, 0)
            for what, off, n in (("table", msix_table_offset, self.msix.table_size),
                                 ("PBA", msix_pba_offset, self.msix.pba_size)):
                if off % 8 or off + n > size:
                    raise ValueError(f"MSI-X {what} at {off:#x}+{n:#x} does not fit BAR{msix_bar} ({size:#x})")
            self._msix_bar = msix_bar
            self._msix_table = (msix_table_offset, msix_table_offset + self.msix.table_size)
            self._msix_pba = (msix_pba_offset, msix_pba_offset + self.msix.pba_size)
            body = ((msix_vectors - 1).to_bytes(2, "little")
                    + (msix_table_offset | msix_bar).to_bytes(4, "little")
                    + (msix_pba_offset | msix_bar).to_bytes(4, "little"))
            self._msix_cap = self.add_capability(CAP_ID_MSIX, body)
            self._put_mask(self._msix_cap + 2, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASKALL)

    # ---- building

    def _put(self, offset: int, size: int, value: int) -> None:
        self._cfg[offset:offset + size] = (value & _ones(size)).to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._cfg[offset:offset + size], "little")

    def _put_mask(self, offset: int, size: int, mask: int) -> None:
        self._wmask[offset:offset + size] = (mask & _ones(size)).to_bytes(size, "little")

    def add_capability(self, cap_id: int, body: bytes) -> int:
        """Append a capability (``body``: its bytes after the ID and next pointer); its offset.

        Read-only as built; a subclass makes parts writable with `_put_mask`.
        """
        offset = self._next_cap
        end = offset + 2 + len(body)
        if end > _CAP_END:
            raise ValueError("capabilities overflow the 256-byte configuration header")
        self._put(offset, 1, cap_id)
        self._cfg[offset + 2:end] = body
        if self._last_cap < 0:
            self._put(CAPABILITIES_POINTER, 1, offset)
            self._put(STATUS, 2, self._get(STATUS, 2) | STATUS_CAP_LIST)
        else:
            self._put(self._last_cap + 1, 1, offset)
        self._last_cap = offset
        self._next_cap = (end + 3) & ~3
        return offset

    # ---- configuration space

    def config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= CONFIG_SPACE_SIZE - size:
            return _ones(size)
        return self._get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= CONFIG_SPACE_SIZE - size:
            return
        before = self.bars() if offset < BAR0 + 4 * _BAR_COUNT and offset + size > COMMAND else None
        old = self._get(offset, size)
        mask = int.from_bytes(self._wmask[offset:offset + size], "little")
        new = (old & ~mask) | (value & mask)
        if new != old:
            self._put(offset, size, new)
        if before is not None and self.bars() != before:
            self.on_change("bars")
        if self._msix_cap >= 0 and offset < self._msix_cap + 4 and offset + size > self._msix_cap + 2:
            control = self._get(self._msix_cap + 2, 2)
            assert self.msix is not None
            self.msix.set_control(bool(control & MSIX_CONTROL_ENABLE), bool(control & MSIX_CONTROL_MASKALL))
        self._config_written(offset, size)

    def function_reset(self) -> None:
        """Back to power-on state (a machine reset): every guest-writable bit 0, as built (decoding
        off, BARs unassigned, MSI-X off and every vector masked); the engine assigns the BARs
        again as it did at start.  Announced as ``"bars"`` and ``"msix"`` changes."""
        before = self.bars()
        for i, mask in enumerate(self._wmask):
            if mask:
                self._cfg[i] &= ~mask
        if self.msix is not None:
            self.msix.reset()
        if self.bars() != before:
            self.on_change("bars")

    def _config_written(self, offset: int, size: int) -> None:
        """A subclass's hook after every config write (its own capabilities)."""

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    # ---- BARs

    def bars(self) -> list[Bar]:
        decode = bool(self._get(COMMAND, 2) & COMMAND_MEMORY)
        return [Bar(index, (self._get(BAR0 + 4 * index, 4) & ~_BAR_FLAG_BITS) if decode else 0, size, BarKind.MEM32)
                for index, size in sorted(self._bar_sizes.items())]

    def assign_bar(self, index: int, address: int) -> None:
        """Firmware's assignment before the guest starts (``address`` aligned to the size)."""
        size = self._bar_sizes[index]
        if address % size or not 0 < address <= (1 << 32) - size:
            raise ValueError(f"BAR{index} ({size:#x} bytes) cannot sit at {address:#x}")
        self._put(BAR0 + 4 * index, 4, address)
        self.on_change("bars")

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        if not 0 <= offset <= self._bar_sizes.get(bar, 0) - size:
            return _ones(size)
        if self.msix is not None and bar == self._msix_bar:
            lo, hi = self._msix_table
            if lo <= offset < hi:
                return self.msix.table_read(offset - lo, size)
            lo, hi = self._msix_pba
            if lo <= offset < hi:
                return self.msix.pba_read(offset - lo, size)
        return self._bar_read(bar, offset, size)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if not 0 <= offset <= self._bar_sizes.get(bar, 0) - size:
            return
        if self.msix is not None and bar == self._msix_bar:
            lo, hi = self._msix_table
            if lo <= offset < hi:
                self.msix.table_write(offset - lo, size, value)
                return
            lo, hi = self._msix_pba
            if lo <= offset < hi:
                return  # the PBA is read-only
        self._bar_write(bar, offset, size, value & _ones(size))

    def _bar_read(self, bar: int, offset: int, size: int) -> int:
        return 0

    def _bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        pass

    # ---- MSI-X, for the engine

    def _msix_changed(self) -> None:
        self.on_change("msix")

    @property
    def signal_msi(self) -> Callable[[int], None]:
        """``signal_msi(vector)``, set by the engine: deliver the vector's message now."""
        return self.msix.signal_msi if self.msix is not None else _ignore_vector

    @signal_msi.setter
    def signal_msi(self, callback: Callable[[int], None]) -> None:
        if self.msix is not None:
            self.msix.signal_msi = callback

    def msix_entries(self) -> list[MsixEntry]:
        return self.msix.entries() if self.msix is not None else []

    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled

    @property
    def function_masked(self) -> bool:
        return self.msix is not None and self.msix.function_masked

    @property
    def enabled(self) -> bool:
        """MSI-X enabled (the design's name for the engine)."""
        return self.msix_enabled


def _ignore_vector(vector: int) -> None:
    pass
