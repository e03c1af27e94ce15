"""Guest-physical RAM: every domain's segment, and the routes from guest addresses to them.

`GuestMemory` builds the segments of a `Layout` (each domain's memfd, or with
`unified` one memfd holding the domains end to end), routes guest-physical
accesses to them, gives KVM its memory slots (`regions`) and another process
the memfds (`backing_fds`), and audits where the pages are.
"""
from __future__ import annotations

import bisect
import mmap
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from numavm.host import libc as _libc
from numavm.errors import ConfigError, NumavmError
from numavm.plan.layout import HIGH_RAM_BASE, LOW_RAM_LIMIT, DomainLayout, Layout
from numavm.spec.policy import host_online_nodes
from numavm.spec.units import format_size
from numavm.host.memory.audit import Placement, range_placements, resident_runs
from numavm.host.memory.checks import _check_hugepages, check_hugetlb, check_policy, domain_hugepages
from numavm.host.memory.segment import MADV_POPULATE_READ, GuestAddressError, Memfd, Segment

# ---------------------------------------------------------------- guest memory


class Region(NamedTuple):
    """One KVM memory slot."""

    slot: int
    guest_phys: int
    size: int
    host_addr: int


class BackingFd(NamedTuple):
    """One memfd holding guest RAM, for handing to another process."""

    id: str  # "ram" (unified) or "domain<ID>"; the memfd is numavm:<machine>:<id>
    fd: int
    size: int


@dataclass(frozen=True)
class _Route:
    start: int
    end: int
    segment: Segment
    offset: int
    slot: int


@dataclass(eq=False)
class GuestMemory:
    """Every domain's segment, and the map from guest-physical RAM to them.

    Per domain (the default), each domain has a memfd of its own.  With
    `unified`, one memfd (``numavm:<machine>:ram``) holds all guest RAM with
    the domains end to end in domain order, which is QEMU pc's RAM offset
    order, and each domain's segment is its window of it, under its own
    policy: what QEMU's single ``memory-backend-file`` needs.  With `shared`
    False (per domain only), each domain's memory is private anonymous
    memory instead (`Anonymous`: transparent huge pages where the host's
    default allows them, which shmem's does not), which no other process can
    map: the KVM engine's choice; hugetlbfs domains keep their memfd.
    """

    layout: Layout
    machine: str = "vm"
    hugepages: str | None = None
    online: tuple[int, ...] | None = None  # host nodes; None reads sysfs
    unified: bool = False
    shared: bool = True  # False: per-domain private anonymous memory (see above)
    segments: dict[int, Segment] = field(default_factory=dict, init=False)
    memfd: Memfd | None = field(default=None, init=False)  # the one memfd when unified
    _routes: list[_Route] = field(default_factory=list, init=False, repr=False)
    _starts: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.unified and not self.shared:
            raise ValueError("unified guest memory is one memfd for another process: it is always shared")
        online = self.online if self.online is not None else host_online_nodes()
        with_memory = [d for d in self.layout.domains if d.segment_size and d.slots]
        # Every check first, for every domain, then the first allocation.
        policies = {}
        huge: dict[int, str | None] = {}  # per domain: its own choice, else the machine's
        for d in with_memory:
            what = f"domain {d.id}"
            huge[d.id] = domain_hugepages(d, self.hugepages)
            _check_hugepages(huge[d.id], what)
            policies[d.id] = check_policy(d.domain.policy, online, f"{what} domain_policy")
        if self.unified and len(set(huge.values())) > 1:
            raise ConfigError("hugepages: the TCG engine backs all guest RAM with one memfd, so every "
                              "domain needs the same hugepages= (use --accel kvm for a mix)")
        tlb = {d.id: d.segment_size for d in with_memory if huge[d.id] == "hugetlbfs"}
        page = check_hugetlb(tlb, {i: policies[i] for i in tlb}) if tlb else mmap.PAGESIZE
        offsets = _ram_offsets(with_memory) if self.unified else {}
        try:
            if self.unified and with_memory:
                self.memfd = Memfd(self.machine, "ram", sum(d.segment_size for d in with_memory),
                                   hugepages=huge[with_memory[0].id], page_size=page, what="guest RAM")
            for d in with_memory:
                seg = Segment(d.segment_size, policies[d.id], domain=d.id, machine=self.machine,
                              hugepages=huge[d.id], online=online, within=self.memfd,
                              offset=offsets.get(d.id, 0), anonymous=not self.shared, _checked=True)
                self.segments[d.id] = seg
                for s in d.slots:
                    self._routes.append(_Route(s.guest.start, s.guest.end, seg, s.offset, 0))
        except BaseException:
            self.close()
            raise
        self._routes.sort(key=lambda r: r.start)
        self._routes = [_Route(r.start, r.end, r.segment, r.offset, i) for i, r in enumerate(self._routes)]
        self._starts = [r.start for r in self._routes]

    # ---- routing

    def locate(self, gpa: int, n: int = 1) -> tuple[Segment, int]:
        """(segment, offset) of guest range [gpa, gpa+n); one slot or an error."""
        if n < 0:
            raise GuestAddressError(f"negative length {n} at guest address {gpa:#x}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self._routes[i].end:
            raise GuestAddressError(f"guest address {gpa:#x} is outside RAM{self._where(gpa)}")
        r = self._routes[i]
        if gpa + n > r.end:
            nxt = self._routes[i + 1] if i + 1 < len(self._routes) else None
            if nxt is not None and nxt.start == r.end:
                why = (f"spans two memory slots (slot {r.slot} of domain {r.segment.domain} ends at "
                       f"{r.end:#x}, slot {nxt.slot} of domain {nxt.segment.domain} follows)")
            else:
                why = f"runs past the end of RAM at {r.end:#x}{self._where(r.end)}"
            raise GuestAddressError(f"guest range {gpa:#x}-{gpa + n:#x} ({n} bytes) {why}")
        return r.segment, r.offset + gpa - r.start

    def _where(self, gpa: int) -> str:
        if LOW_RAM_LIMIT <= gpa < HIGH_RAM_BASE:
            return " (in the 3-4 GiB hole)"
        if gpa >= self.layout.ram_top:
            return f" (RAM ends at {self.layout.ram_top:#x})"
        return ""

    def _pieces(self, gpa: int, n: int) -> list[tuple[Segment, int, int, int]]:
        """(segment, offset, length, position in the access) for [gpa, gpa+n).

        Guest-physical RAM is contiguous across domains (domain 0 ends where
        domain 1 starts), so a loader's image may straddle two segments; it
        is split at slot boundaries.  A gap (the 3-4 GiB hole, the end of RAM)
        is an error, raised before anything is touched.
        """
        if n < 0:
            raise GuestAddressError(f"negative length {n} at guest address {gpa:#x}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self._routes[i].end:
            raise GuestAddressError(f"guest address {gpa:#x} is outside RAM{self._where(gpa)}")
        pieces = []
        done = 0
        while True:
            r = self._routes[i]
            take = min(n - done, r.end - (gpa + done))
            pieces.append((r.segment, r.offset + gpa + done - r.start, take, done))
            done += take
            if done >= n:
                return pieces
            i += 1
            if i == len(self._routes) or self._routes[i].start != r.end:
                raise GuestAddressError(f"guest range {gpa:#x}-{gpa + n:#x} ({n} bytes) runs past the end "
                                        f"of RAM at {r.end:#x}{self._where(r.end)}")

    def read(self, gpa: int, n: int) -> bytes:
        return b"".join(seg.read(off, take) for seg, off, take, _ in self._pieces(gpa, n))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        for seg, off, take, pos in self._pieces(gpa, src.nbytes):
            seg.write(off, src[pos:pos + take])

    def view(self, gpa: int, n: int) -> memoryview:
        """Writable bytes of RAM [gpa, gpa+n) within one slot (else GuestAddressError)."""
        seg, off = self.locate(gpa, n)
        return seg.view(off, n)

    def views(self, gpa: int, n: int) -> list[memoryview]:
        """The same range as views split at slot boundaries, in order: what a device's buffer
        becomes (numavm.devices.memory.GuestRam), since a guest buffer may straddle two domains.
        A gap (the 3-4 GiB hole, the end of RAM) is a GuestAddressError before any view is made.
        An empty range is an empty list.  A view pins its segment's mapping: drop it before `close()`."""
        if n == 0:
            return []
        # A device's buffers are almost always inside one slot: one bisect, one view (the I/O
        # thread calls this per descriptor buffer).  Anything else, errors too, takes _pieces.
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and n > 0:
            r = self._routes[i]
            if gpa + n <= r.end:
                return [r.segment.view(r.offset + gpa - r.start, n)]
        return [seg.view(off, take) for seg, off, take, _ in self._pieces(gpa, n)]

    # ---- for KVM and QEMU

    def regions(self) -> Iterator[Region]:
        """KVM memory slots in guest-physical order (host addresses into the
        domain memfds, or into the one memfd when unified)."""
        for r in self._routes:
            if r.segment.closed:
                raise NumavmError(f"domain {r.segment.domain}: segment is closed")
            yield Region(r.slot, r.start, r.end - r.start, r.segment.addr + r.offset)

    def backing_fds(self) -> list[BackingFd]:
        """The memfds holding guest RAM, in either mode: [("ram", fd, total)]
        when unified, else ("domain<ID>", fd, size) per domain in domain order
        (none for anonymous memory, which has no fd)."""
        owners = [self.memfd] if self.memfd is not None else [s.backing for s in self.segments.values()]
        return [BackingFd(m.id, m.fd, m.size) for m in owners if m is not None and not m.closed and m.fd >= 0]

    # ---- audit

    def map_resident(self) -> int:
        """Map into numavm's own mapping every page another process put in the memfds.

        The audit reads this process's page tables (numa_maps, move_pages).
        Under the KVM engine the guest faults pages through them; under QEMU
        the pages are QEMU's, in the shared memfd, and not mapped here.
        mincore(2) on a shared mapping reports what the memfd holds, and
        MADV_POPULATE_READ maps exactly those runs (a read fault on a page
        that exists allocates nothing).  Returns the bytes now mapped.
        """
        total = 0
        for seg in self.segments.values():
            if seg.closed or seg.hugepages == "hugetlbfs" or seg.fd < 0:
                continue  # hugetlbfs pages are always mapped where they were made; anonymous ones are ours
            page = seg.page_size
            for first, count in resident_runs(seg.addr, seg.size, page):
                _libc.madvise(seg.addr + first * page, count * page, MADV_POPULATE_READ)
                total += count * page
        return total

    def audit(self) -> dict[int, Placement]:
        """Per domain: the kernel's policy and resident pages per host node."""
        live = {d: s for d, s in self.segments.items() if not s.closed}
        found = range_placements({d: (s.addr, s.size, s.page_size) for d, s in live.items()})
        for d, seg in live.items():
            if d not in found:
                raise NumavmError(f"domain {d}: no /proc/self/numa_maps line at {seg.addr:#x}")
        return found

    def describe(self) -> str:
        placements = self.audit()
        lines = []
        if self.memfd is not None and not self.memfd.closed:
            lines.append(f"guest RAM: {format_size(self.memfd.size)} memfd {self.memfd.name!r} "
                         f"fd {self.memfd.fd}, mapped at {self.memfd.addr:#x}, domains end to end")
        for d, seg in self.segments.items():
            lines.append(seg.describe(placements.get(d)))
            lines += [f"  slot {r.slot}: guest {r.start:#011x}-{r.end:#011x} -> segment +{r.offset:#x}"
                      for r in self._routes if r.segment is seg]
        return "\n".join(lines)

    # ---- life

    def close(self) -> None:
        """Release every mapping and fd; idempotent.  The first error is raised
        after every memfd has been tried."""
        first: BaseException | None = None
        owners: list[Segment | Memfd] = [*self.segments.values()]
        if self.memfd is not None:
            owners.append(self.memfd)
        for owner in owners:
            try:
                owner.close()
            except BaseException as e:  # keep closing the others
                first = first or e
        if first is not None:
            raise first

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ram_offsets(domains: list[DomainLayout]) -> dict[int, int]:
    """Each domain's offset in the one memfd: the domains end to end, in order
    (QEMU's RAM order: numavm.vmm.tcg checks that before the memory is made)."""
    out, base = {}, 0
    for d in domains:
        out[d.id] = base
        base += d.segment_size
    return out
