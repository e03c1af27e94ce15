"""The port I/O bus: x86 I/O ports (0..0xFFFF) mapped to device models.

A device is anything with ``read(offset, size) -> int`` and
``write(offset, size, value) -> None`` (`Device`); `IoBus.register` gives it
``length`` ports from ``base`` and the bus passes it ``port - base``.

Dispatch is on the hot path of every KVM_EXIT_IO, so registration builds one
dict per direction from every port to ``(bound method, offset)``: an access
costs a dict lookup and one call, whatever the number of devices.

An access is routed by its first port only: a 2- or 4-byte access at the
last port of a device goes to that device, which decides what the ports past
its end mean (the UART splits wide accesses into byte accesses, as the ISA
bus would).  Sizes are what KVM reports (1, 2 or 4); the bus does not check
them.

Nothing answers at an unregistered port: a read returns all-ones for the
access size (a floating ISA bus) and a write is dropped; both are counted per
port in `IoBus.unhandled_reads` / `IoBus.unhandled_writes` so the machine can
report what the guest poked at.

The bus and the devices are plain state machines without locks: the machine
serializes accesses (one vCPU thread at a time in the bus).

A vCPU loop may dispatch by itself (`lookups`: the live per-port tables),
taking its lock only around a device call: an access to an unregistered port
touches no device, so the loop counts it in counters of its own and hands the
counts over with `count_unhandled` when it ends.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Mapping, Optional, Protocol, runtime_checkable

PORT_LIMIT = 0x1_0000  # x86 I/O space: ports 0..0xFFFF

ReadEntry = tuple[Callable[[int, int], int], int]  # (device.read, offset)
WriteEntry = tuple[Callable[[int, int, int], None], int]  # (device.write, offset)


@runtime_checkable
class Device(Protocol):
    """A port-I/O device model; ``offset`` is relative to its registered base."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


def all_ones(size: int) -> int:
    """What a read of ``size`` bytes from a floating bus returns."""
    return (1 << (size << 3)) - 1


class IoBus:
    """Port ranges mapped to devices; overlapping registrations are refused."""

    __slots__ = ("_readers", "_writers", "_ranges", "unhandled_reads", "unhandled_writes")

    def __init__(self) -> None:
        self._readers: dict[int, ReadEntry] = {}
        self._writers: dict[int, WriteEntry] = {}
        self._ranges: list[tuple[int, int, Device]] = []  # (base, length, device), ascending base
        self.unhandled_reads: Counter[int] = Counter()
        self.unhandled_writes: Counter[int] = Counter()

    def register(self, base: int, length: int, device: Device) -> None:
        """Give ``device`` the ports ``base .. base + length - 1``.

        Raises ValueError if the range is empty, leaves the I/O space, or
        overlaps a range registered before (nothing is changed then).
        """
        if length < 1:
            raise ValueError(f"port range at {base:#x} must have a length >= 1, not {length}")
        if base < 0 or base + length > PORT_LIMIT:
            raise ValueError(f"ports {base:#x}+{length:#x} fall outside the I/O space 0x0-0xffff")
        end = base + length
        for b, n, other in self._ranges:
            if b < end and base < b + n:
                raise ValueError(
                    f"ports {base:#x}-{end - 1:#x} for {type(device).__name__} overlap "
                    f"ports {b:#x}-{b + n - 1:#x} of {type(other).__name__}"
                )
        read, write = device.read, device.write
        for port in range(base, end):
            self._readers[port] = (read, port - base)
            self._writers[port] = (write, port - base)
        self._ranges.append((base, length, device))
        self._ranges.sort(key=lambda r: r[0])

    def read(self, port: int, size: int) -> int:
        """An ``in`` of ``size`` bytes at ``port``."""
        entry = self._readers.get(port)
        if entry is None:
            self.unhandled_reads[port] += 1
            return (1 << (size << 3)) - 1
        return entry[0](entry[1], size)

    def write(self, port: int, size: int, value: int) -> None:
        """An ``out`` of ``size`` bytes at ``port``."""
        entry = self._writers.get(port)
        if entry is None:
            self.unhandled_writes[port] += 1
            return
        entry[0](entry[1], size, value)

    def lookups(self) -> tuple[Callable[[int], Optional[ReadEntry]], Callable[[int], Optional[WriteEntry]]]:
        """The dispatch tables' lookups, port -> ``(device.read, offset)`` and
        port -> ``(device.write, offset)``, or None where nothing is registered.

        Live (later registrations show), for a caller that dispatches by itself
        in a hot loop: it calls ``entry[0](entry[1], size[, value])`` as read()
        and write() do, answers a miss as they do (all-ones for a read, nothing
        for a write) and reports the misses with `count_unhandled`.
        """
        return self._readers.get, self._writers.get

    def count_unhandled(self, reads: Mapping[int, int], writes: Mapping[int, int]) -> None:
        """Add accesses to unregistered ports counted outside read()/write(), per port."""
        self.unhandled_reads.update(reads)
        self.unhandled_writes.update(writes)

    def device_at(self, port: int) -> Device | None:
        for base, length, device in self._ranges:
            if base <= port < base + length:
                return device
        return None

    def __contains__(self, port: object) -> bool:
        return port in self._readers

    @property
    def ranges(self) -> tuple[tuple[int, int, Device], ...]:
        """Every registration as ``(base, length, device)``, by ascending base."""
        return tuple(self._ranges)
