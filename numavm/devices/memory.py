"""The narrow view of guest RAM that device models use.

A device that does DMA (virtio rings and buffers) needs exactly two things
from guest memory: a writable view of a guest-physical range, and the same
range split where the backing changes.  Guest RAM is contiguous across NUMA
domains, but each domain is its own host segment (its own mapping, under its
own memory policy), so a buffer that straddles two domains is two views.
Handing out views, not copies, is what lets a disk read land straight in the
guest's pages with ``os.preadv``: no bounce buffer, and the bytes sit in the
domain's memory because that is where the guest put the buffer.

`GuestRam` is that interface as a Protocol; ``numavm.host``'s GuestMemory
implements it for the engines (device models never import numavm.host).  A
bad range raises a `ValueError`: the engine's memory raises its
GuestAddressError (a ValueError), `SlotRam` raises `GuestRamError`, and
devices catch ValueError, so either works.

`SlotRam` is a small real implementation over anonymous mmaps, one per slot,
for tests and for pure users of the device models: real memory with real
slot boundaries, not a mock.
"""

from __future__ import annotations

import bisect
import mmap
from typing import Iterable, Protocol, runtime_checkable

__all__ = ["GuestRam", "GuestRamError", "SlotRam"]


class GuestRamError(ValueError):
    """A guest-physical range outside RAM, or (for `GuestRam.view`) across a slot boundary."""


@runtime_checkable
class GuestRam(Protocol):
    def view(self, gpa: int, n: int) -> memoryview:
        """Writable bytes ``[gpa, gpa + n)`` within one slot; ValueError otherwise."""
        ...

    def views(self, gpa: int, n: int) -> list[memoryview]:
        """``[gpa, gpa + n)`` split at slot boundaries; ValueError for a gap or the end of RAM.

        An empty range gives an empty list.
        """
        ...


class SlotRam:
    """Guest RAM as anonymous mappings at given guest-physical addresses.

    ``SlotRam([(0, 1 << 20), (1 << 20, 1 << 20)])`` is 2 MiB of contiguous RAM in
    two slots (like two domains); gaps between slots are holes.
    """

    def __init__(self, slots: Iterable[tuple[int, int]]) -> None:
        self._slots: list[tuple[int, int, mmap.mmap]] = []  # (start, end, mapping), ascending
        for start, size in sorted(slots):
            if size <= 0 or start < 0:
                raise ValueError(f"slot at {start:#x} of {size:#x} bytes")
            if self._slots and start < self._slots[-1][1]:
                raise ValueError(f"slot at {start:#x} overlaps the one before")
            self._slots.append((start, start + size, mmap.mmap(-1, size)))
        self._starts = [start for start, _, _ in self._slots]

    def _slot(self, gpa: int) -> tuple[int, int, mmap.mmap]:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._slots[i][1]:
            return self._slots[i]
        raise GuestRamError(f"guest address {gpa:#x} is outside RAM")

    def view(self, gpa: int, n: int) -> memoryview:
        if n < 0:
            raise GuestRamError(f"negative length {n} at {gpa:#x}")
        start, end, mapping = self._slot(gpa)
        if gpa + n > end:
            raise GuestRamError(f"guest range {gpa:#x}+{n:#x} crosses the slot end {end:#x}")
        return memoryview(mapping)[gpa - start:gpa - start + n]

    def views(self, gpa: int, n: int) -> list[memoryview]:
        if n < 0:
            raise GuestRamError(f"negative length {n} at {gpa:#x}")
        out: list[memoryview] = []
        while n > 0:
            start, end, mapping = self._slot(gpa)
            take = min(n, end - gpa)
            out.append(memoryview(mapping)[gpa - start:gpa - start + take])
            gpa += take
            n -= take
        return out

    def read(self, gpa: int, n: int) -> bytes:
        return b"".join(bytes(v) for v in self.views(gpa, n))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for v in self.views(gpa, src.nbytes):
            v[:] = src[pos:pos + v.nbytes]
            pos += v.nbytes

    def close(self) -> None:
        """Unmap the slots (fails while views are still alive, as mmap does)."""
        for _, _, mapping in self._slots:
            mapping.close()
        self._slots.clear()
        self._starts.clear()
