"""The split virtqueue (virtio 1.x, section 2.7): descriptor table, driver
("available") ring and device ("used") ring in guest memory.

The guest owns these structures and may write anything into them at any
time, so everything read from them is checked before it is used: ring and
buffer addresses go through `GuestRam` (a range outside RAM is an error, not
a crash), descriptor indices are bounded by the table they index, a chain
may not be longer than its table (which also catches loops: a loop never
ends, so it exceeds the bound), an indirect table may not hold another
indirect descriptor, readable buffers may not follow writable ones, and the
driver's index may not run more than a queue's worth ahead of the device.
Every violation raises `VirtqueueError`; the transport turns that into
DEVICE_NEEDS_RESET.  Nothing here loops more than ``size`` (+ an indirect
table's length) times per chain.

A chain's buffers come out as memoryviews into guest RAM (split where the
guest's memory changes slots), so a device moves data with ``os.preadv`` /
``os.pwritev`` straight between a file and the guest's pages.

The rings themselves must each lie within one memory slot (`GuestRam.view`):
a slot is a NUMA domain's whole segment, domains are MiB-aligned, and Linux
allocates each ring as one naturally aligned block far smaller than that, so
only a hostile driver straddles; it gets a device error.  Indirect tables
(small kmallocs) are read through `GuestRam.views` and may straddle.

16-bit ring indices wrap (``& 0xFFFF``); the ring position is ``index %
size``, which is why sizes are powers of two.  VIRTIO_F_EVENT_IDX is not
offered, so suppression is the avail ring's NO_INTERRUPT flag only.
"""

from __future__ import annotations

import itertools
import struct
import threading
from dataclasses import dataclass, field

from numavm.devices.memory import GuestRam

__all__ = [
    "VirtioError", "VirtqueueError", "Chain", "Virtqueue",
    "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_AVAIL_F_NO_INTERRUPT", "VIRTQ_USED_F_NO_NOTIFY", "NO_VECTOR", "MAX_QUEUE_SIZE",
    "MAX_INDIRECT", "DESC_SIZE",
]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

NO_VECTOR = 0xFFFF  # VIRTIO_MSI_NO_VECTOR
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT = 1024  # entries in one indirect table (QEMU's bound too; Linux uses seg_max + 2)
DESC_SIZE = 16

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_F_NEXT_WRITE = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE


# Below this many entries the loop in `_walk` is as fast as `_in_order`'s fixed cost (measured:
# 3 entries, a 4 KiB request, take ~2.8 us in the loop and ~4.7 us in `_in_order`).
_IN_ORDER_FROM = 8
_TABLES: dict[int, tuple[struct.Struct, tuple[int, ...]]] = {}  # at most MAX_INDIRECT entries


def _table(n: int) -> tuple[struct.Struct, tuple[int, ...]]:
    """A Struct unpacking an indirect table of ``n`` descriptors in one call, and the ``next``
    fields of a table laid out in order (1, 2, ..., n - 1), as Linux lays out every table."""
    found = _TABLES.get(n)
    if found is None:
        found = _TABLES[n] = (struct.Struct("<" + "QIHH" * n), tuple(range(1, n)))
    return found


class VirtioError(Exception):
    """The driver broke the virtio rules: the device stops and asks for a reset."""


class VirtqueueError(VirtioError):
    """A virtqueue the device cannot use: bad addresses, indices, chains or sizes."""


@dataclass(slots=True)
class Chain:
    """One descriptor chain: what the driver gave (``readable``) and what it wants back (``writable``)."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    descriptors: int = 0  # data descriptors (an indirect one counts its table's entries)

    @property
    def readable_len(self) -> int:
        return sum(v.nbytes for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(v.nbytes for v in self.writable)


class Virtqueue:
    """One split virtqueue, as the transport's common configuration programs it.

    The transport writes ``size``, ``desc``, ``driver``, ``device``,
    ``msix_vector`` while the queue is disabled, sets ``indirect`` from the
    negotiated features, then calls `enable`.  ``max_segment`` bounds one
    descriptor's length (the device's SIZE_MAX, say).
    """

    def __init__(self, ram: GuestRam, index: int, max_size: int, *, max_segment: int = 1 << 32) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.ram = ram
        self.index = index
        self.max_size = max_size
        self.max_segment = max_segment
        self._fence = threading.Lock()  # a memory barrier, not mutual exclusion: see needs_interrupt
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.desc = self.driver = self.device = 0
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.indirect = False
        self.last_avail = 0  # the next avail ring entry the device reads (free-running, 16 bits)
        self.used_idx = 0  # the device's used index (free-running, 16 bits)
        self._avail_idx = 0  # the driver's index when last read
        self._desc_ring = self._avail_ring = self._used_ring = memoryview(b"")

    # ---- setup

    def enable(self) -> None:
        """Check the programmed ring and start using it (VirtqueueError: unusable)."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtqueueError(f"queue {self.index}: size {size} is not a power of two in 1..{self.max_size}")
        for name, addr, align in (("descriptor table", self.desc, 16), ("driver ring", self.driver, 2),
                                  ("device ring", self.device, 4)):
            if addr % align:
                raise VirtqueueError(f"queue {self.index}: {name} at {addr:#x} is not {align}-byte aligned")
        try:
            self._desc_ring = self.ram.view(self.desc, DESC_SIZE * size)
            self._avail_ring = self.ram.view(self.driver, 4 + 2 * size)
            self._used_ring = self.ram.view(self.device, 4 + 8 * size)
        except ValueError as e:
            self._desc_ring = self._avail_ring = self._used_ring = memoryview(b"")
            raise VirtqueueError(f"queue {self.index}: ring outside RAM: {e}") from None
        self.last_avail = self.used_idx = self._avail_idx = 0
        self.enabled = True

    # ---- the device's side

    def pending(self) -> int:
        """Chains the driver has made available and the device has not popped (VirtqueueError: nonsense)."""
        self._avail_idx = _U16.unpack_from(self._avail_ring, 2)[0]
        ahead = (self._avail_idx - self.last_avail) & 0xFFFF
        if ahead > self.size:
            raise VirtqueueError(f"queue {self.index}: driver index {self._avail_idx} is {ahead} entries "
                                 f"ahead of {self.last_avail} in a ring of {self.size}")
        return ahead

    def pop(self) -> Chain | None:
        """The next available chain, or None when the driver has given nothing more."""
        if not self.enabled:
            raise VirtqueueError(f"queue {self.index} is not enabled")
        last = self.last_avail
        if self._avail_idx == last:  # `pending`, inline: this runs twice per request at queue depth 1
            self._avail_idx = _U16.unpack_from(self._avail_ring, 2)[0]
            if self._avail_idx == last:
                return None
            self.pending()  # the driver's index moved: check how far
        head = _U16.unpack_from(self._avail_ring, 4 + 2 * (last % self.size))[0]
        self.last_avail = (last + 1) & 0xFFFF
        try:
            return self._walk(head)
        except ValueError as e:  # GuestRam: a buffer outside RAM
            raise VirtqueueError(f"queue {self.index}: chain {head}: {e}") from None

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise VirtqueueError(f"queue {self.index}: head {head} is past the table of {size}")
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        chain = Chain(head, readable, writable)
        ram, max_segment = self.ram, self.max_segment
        table: memoryview | bytes = self._desc_ring
        limit = size  # descriptors this table may contribute to the chain
        indirect = False
        i, count = head, 0
        while True:
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
                if indirect:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"queue {self.index}: indirect table of {length} bytes")
                pieces = ram.views(addr, length)
                table = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                limit = length // DESC_SIZE
                if limit >= _IN_ORDER_FROM and self._in_order(chain, table, limit):
                    return chain
                indirect = True
                i, count = 0, 0
                continue
            count += 1
            if count > limit:
                raise VirtqueueError(f"queue {self.index}: chain {head} is longer than its table of {limit} "
                                     "(a descriptor loop?)")
            if length > max_segment:
                raise VirtqueueError(f"queue {self.index}: descriptor of {length} bytes (at most {max_segment})")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.extend(ram.views(addr, length))
            elif writable:
                raise VirtqueueError(f"queue {self.index}: chain {head} has a readable buffer after a writable one")
            else:
                readable.extend(ram.views(addr, length))
            chain.descriptors += 1
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= limit:
                raise VirtqueueError(f"queue {self.index}: next {nxt} is past the table of {limit}")
            i = nxt

    def _in_order(self, chain: Chain, table: memoryview | bytes, n: int) -> bool:
        """Fill ``chain`` from an indirect table of ``n`` descriptors in one pass, if it is laid out
        as Linux lays out every table: entry k's next is k + 1, NEXT on all but the last, none
        indirect, the readable entries before the writable ones, none longer than
        ``max_segment``.  False (``chain`` untouched) for anything else, which `_walk`'s
        descriptor-by-descriptor loop then checks and refuses or serves.

        Why: a request's descriptors cost a Python loop turn each in `_walk`, about 1 us
        natively; this checks the table with C-level tuple operations (one unpack, slices, set
        and max over them), so a 1 MiB request of 256 pages costs one view per page and little
        else."""
        unpack, nexts = _table(n)
        t = unpack.unpack_from(table)
        flags, lengths = t[2::4], t[1::4]
        last = flags[-1]
        if t[3::4][:-1] != nexts or last & ~VIRTQ_DESC_F_WRITE or max(lengths) > self.max_segment:
            return False
        body = set(flags[:-1])  # every entry but the last: NEXT, with or without WRITE
        if not body <= {VIRTQ_DESC_F_NEXT, _F_NEXT_WRITE}:
            return False
        # where the writable entries start (n: none); they must run to the end
        if _F_NEXT_WRITE in body:
            first_write = flags.index(_F_NEXT_WRITE)
            if VIRTQ_DESC_F_NEXT in flags[first_write:-1] or not last:
                return False
        else:
            first_write = n - 1 if last else n
        addrs = t[0::4]
        if first_write:
            chain.readable = self._buffers(addrs[:first_write], lengths[:first_write])
        if first_write < n:
            chain.writable = self._buffers(addrs[first_write:], lengths[first_write:])
        chain.descriptors = n
        return True

    def _buffers(self, addrs: tuple[int, ...], lengths: tuple[int, ...]) -> list[memoryview]:
        """The views of these buffers: in one call where the memory offers it (GuestMemory's
        `views_many`, without a Python call per buffer), else `GuestRam.views` per buffer."""
        many = getattr(self.ram, "views_many", None)
        if many is not None:
            return many(addrs, lengths)
        return list(itertools.chain.from_iterable(map(self.ram.views, addrs, lengths)))

    def push(self, head: int, written: int) -> None:
        """Give chain ``head`` back, ``written`` bytes written into its writable buffers."""
        used = self._used_ring
        _USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx % self.size), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(used, 2, self.used_idx)  # after the element: the driver reads idx, then the element

    def needs_interrupt(self) -> bool:
        """False while the driver asks for no interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT).

        Call it after the `push`es it is about: a full memory barrier first orders the used
        index store before the flags load.  The driver clears the flag, barriers, and reads the
        used index; without ours an x86 CPU may satisfy our load of the old flag while our store
        still sits in its store buffer, both sides miss each other and the guest waits for an
        interrupt that never comes (QEMU's smp_mb() in virtio_should_notify).  An uncontended
        Lock round trip is a locked instruction, which is the x86 full barrier.
        """
        with self._fence:
            pass
        return not _U16.unpack_from(self._avail_ring, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
