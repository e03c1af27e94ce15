"""A guest domain's host memory: a window of a memfd, or private anonymous memory, under the domain's policy.

`Memfd` owns a memfd and its one shared mapping, for memory another process
maps too (QEMU, under the TCG engine); `Anonymous` owns a private anonymous
mapping, for memory only this process maps (the KVM engine).  `Segment` is a
window of either, mbind(2) over the window before any page is touched and
read back with get_mempolicy(2); `Segment.prefault` populates it from
threads on the policy's nodes.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from numavm.host import libc as _libc
from numavm.host.libc import HostError, rewrap as _rewrap
from numavm.errors import ConfigError, NumavmError
from numavm.spec.policy import Mode, Policy, host_online_nodes
from numavm.spec.units import GiB, MiB, format_size
from numavm.host.memory.audit import Placement, _human, range_placements
from numavm.host.memory.checks import (MPOL_F_ADDR, MPOL_MF_STRICT, MPOL_MODE_FLAGS, _check_hugepages, _mask_nodes, check_hugetlb,
                                       check_policy, nodemask)
from numavm.host.memory.host import (MODE_SINCE, POPULATE_SINCE, THP_DIR, _kernel_text, _possible_nodes_bits, _thp_mode,
                                     _thp_shmem_mode, hugetlb_page_size, kernel_version, policy_cpus)

# include/uapi/asm-generic/mman-common.h, mman.h (Python < 3.12 has no mmap.MAP_NORESERVE)
MADV_DONTFORK = 10
MADV_HUGEPAGE = 14
MAP_NORESERVE = 0x4000
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

# include/uapi/linux/memfd.h
MFD_CLOEXEC = 0x1
MFD_HUGETLB = 0x4
MEMFD_NAME_MAX = 249  # NAME_MAX - len("memfd:")
THP_PAGES = "4K + THP"  # how describe() names base pages with transparent huge pages
POPULATE_BEFORE_WRITE = 1 * MiB  # Segment.write: from this size on, the pages are mapped first

ProgressFn = Callable[[int, int], None]


class GuestAddressError(NumavmError, ValueError):
    """A guest-physical access outside RAM or across a memory slot boundary."""


# ---------------------------------------------------------------- memfd


class _Backing:
    """What `Memfd` and `Anonymous` share: one mapping of guest memory, owned, named
    ``numavm:<machine>:<id>``, made by `_create` and released by `close` (idempotent; a failed
    creation releases what was made)."""

    fd = -1

    def __init__(self, machine: str, id: str, size: int, hugepages: str | None, page_size: int,
                 what: str) -> None:
        self.id = id  # "domain<ID>" or "ram"
        self.name = _memory_name(machine, id)
        self.size = size
        self.hugepages = hugepages
        self.page_size = page_size
        self.what = what or id
        self.addr = 0
        self.map: mmap.mmap | None = None
        self.notes: list[str] = []
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self.map is None

    def close(self) -> None:
        """Unmap; idempotent.  Refused while views are alive."""
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                raise NumavmError(
                    f"{self.what}: cannot unmap {self.name}: memoryviews of it are "
                    "still alive; release them first") from None
            self.map = None
            self.addr = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Memfd(_Backing):
    """A memfd mapped once, shared, read-write: the object that owns host memory.

    Creation: memfd_create, ftruncate, mmap, and madvise(MADV_HUGEPAGE) over
    the mapping for THP.  Nothing is touched, so the memfd stays sparse.  It
    owns the fd and the mapping; a failure releases what was made.  Segments
    are windows of it and apply the policies.
    """

    def __init__(self, machine: str, id: str, size: int, *, hugepages: str | None = None,
                 page_size: int = mmap.PAGESIZE, what: str = "") -> None:
        self.fd = -1
        super().__init__(machine, id, size, hugepages, page_size, what)

    @property
    def kind(self) -> str:
        return f"memfd {self.name!r} fd {self.fd}"

    @property
    def pages(self) -> str:
        return {"hugetlbfs": f"hugetlbfs {format_size(self.page_size)}",
                "thp": THP_PAGES}.get(self.hugepages or "", format_size(mmap.PAGESIZE))

    def _create(self) -> None:
        what = self.what
        flags = MFD_CLOEXEC | (MFD_HUGETLB if self.hugepages == "hugetlbfs" else 0)
        try:
            self.fd = os.memfd_create(self.name, flags)
        except OSError as e:
            _libc.raise_from_oserror(e, f"{what}: memfd_create({self.name!r})")
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as e:
            _libc.raise_from_oserror(e, f"{what}: ftruncate({format_size(self.size)})")
        try:
            mapping = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            _libc.raise_from_oserror(e, f"{what}: mmap({format_size(self.size)})")
        self.map = mapping
        # The address stays valid for the mapping's life; the temporary
        # export ends with the expression.
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        if self.hugepages == "thp":
            try:
                _libc.madvise(self.addr, self.size, MADV_HUGEPAGE)
            except HostError as e:
                raise _rewrap(e, f"{what}: madvise(MADV_HUGEPAGE)") from None
            mode = _thp_shmem_mode()
            if mode in ("never", "deny"):
                self.notes.append(f"hugepages=thp has no effect: shmem THP is '{mode}' "
                                  f"({THP_DIR}/shmem_enabled); pages stay {format_size(mmap.PAGESIZE)}")

    def close(self) -> None:
        """Unmap and close the memfd; idempotent.  Refused while views are alive."""
        super().close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd} addr={self.addr:#x}"
        return f"<Memfd {self.name!r} {format_size(self.size)} {state}>"


class Anonymous(_Backing):
    """Private anonymous memory, mapped once, read-write: guest RAM that no other process maps.

    What QEMU and Cloud Hypervisor back guest RAM with by default, and for the same
    reason: transparent huge pages.  A memfd is shmem, whose THP follows
    /sys/kernel/mm/transparent_hugepage/shmem_enabled, which Debian leaves at
    'never'; anonymous memory follows `enabled`, 'madvise' or 'always' by default,
    and is advised here.  With 2 MiB pages the guest's first touch of its memory
    faults once per 2 MiB, not once per 4 KiB: in bench/l1bench.py's L1 the
    example guest reached its zonelists at 0.16 s instead of 0.82 s and devtmpfs
    at 1.4 s instead of 3.2-4.1 s (QEMU-KVM: 0.2-0.45 s and 2.5 s).

    MAP_NORESERVE keeps a large, sparse guest out of the commit charge, as a
    memfd is; MADV_DONTFORK keeps the pages out of any child this process forks
    (no copy-on-write under KVM's mappings).  The mapping is named
    ``numavm:<machine>:<id>`` in /proc/PID/maps where the kernel can name
    anonymous memory (``[anon:...]``).  Same interface as `Memfd`, with no fd.
    """

    def __init__(self, machine: str, id: str, size: int, *, hugepages: str | None = None,
                 what: str = "") -> None:
        if hugepages not in (None, "thp"):
            raise ValueError(f"{what or id}: anonymous memory takes hugepages=thp or none, not {hugepages}")
        self.thp = False  # whether the kernel took the MADV_HUGEPAGE advice
        super().__init__(machine, id, size, hugepages, mmap.PAGESIZE, what)

    @property
    def kind(self) -> str:
        return f"anonymous memory {self.name!r}"

    @property
    def pages(self) -> str:
        return THP_PAGES if self.thp else format_size(mmap.PAGESIZE)

    def _create(self) -> None:
        what = self.what
        try:
            mapping = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            _libc.raise_from_oserror(e, f"{what}: mmap({format_size(self.size)}, anonymous)")
        self.map = mapping
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        try:
            _libc.madvise(self.addr, self.size, MADV_DONTFORK)
        except HostError as e:
            raise _rewrap(e, f"{what}: madvise(MADV_DONTFORK)") from None
        mode = _thp_mode()
        if mode not in ("never", "unknown"):
            try:
                _libc.madvise(self.addr, self.size, MADV_HUGEPAGE)
                self.thp = True
            except HostError as e:  # EINVAL: a kernel built without THP
                self.notes.append(f"no transparent huge pages: madvise(MADV_HUGEPAGE): {e.strerror}")
        elif self.hugepages == "thp":
            self.notes.append(f"hugepages=thp has no effect: THP is '{mode}' ({THP_DIR}/enabled); "
                              f"pages stay {format_size(mmap.PAGESIZE)}")
        name = ctypes.create_string_buffer(self.name.encode())
        try:  # best effort: only a name in /proc/PID/maps
            _libc.prctl(_libc.PR_SET_VMA, _libc.PR_SET_VMA_ANON_NAME, self.addr, self.size,
                        ctypes.addressof(name))
        except HostError:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"addr={self.addr:#x}"
        return f"<Anonymous {self.name!r} {format_size(self.size)} {state}>"


def _memory_name(machine: str, id: str) -> str:
    """``numavm:<machine>:<id>``, cut to fit a memfd's name (/proc shows memfd:NAME or [anon:NAME])."""
    tail = f":{id}"
    room = MEMFD_NAME_MAX - len("numavm:") - len(tail)
    name = machine.encode()[:room].decode(errors="ignore")
    return f"numavm:{name}{tail}"


# ---------------------------------------------------------------- segment


@dataclass(frozen=True)
class PrefaultResult:
    bytes: int
    seconds: float
    threads: int
    cpus: tuple[int, ...]  # the host CPUs the threads were pinned to

    @property
    def gib_per_s(self) -> float:
        return self.bytes / GiB / self.seconds if self.seconds > 0 else float("inf")


class Segment:
    """One guest domain's host memory under its policy: a window of a `Memfd` or an `Anonymous`.

    Made alone, a segment has memory of its own, the whole of it, named
    ``numavm:<machine>:domain<ID>``: a memfd, or with `anonymous` (and no
    hugetlbfs) private anonymous memory; close() releases it.  Made `within`
    a Memfd at `offset` (GuestMemory's unified mode), it is that range of the
    shared memfd, whose owner releases it; the segment's close() leaves it alone.

    Creation order: checks (nodes online, mode known, huge pages reserved),
    the memfd when it is its own, mbind over the window, get_mempolicy readback
    at the window's start.  Nothing is touched.  Any failure releases what
    was made.
    """

    def __init__(self, size: int, policy: Policy = Policy(), *, domain: int = 0,
                 machine: str = "vm", hugepages: str | None = None,
                 online: tuple[int, ...] | None = None, within: Memfd | None = None,
                 offset: int = 0, anonymous: bool = False, _checked: bool = False) -> None:
        self.domain = domain
        self.size = size
        self.offset = offset  # of the window in its memory
        self.backing: Memfd | Anonymous | None = None
        self.owner = within is None  # whether close() releases the backing memory
        what = f"domain {domain}"
        if size <= 0 or size % mmap.PAGESIZE:
            raise ConfigError(f"{what}: segment size must be a positive multiple of "
                              f"{mmap.PAGESIZE}, got {size}")
        _check_hugepages(hugepages, what)
        self.policy = check_policy(policy, online if online is not None else host_online_nodes(),
                                   f"{what} domain_policy")
        if within is not None:
            if hugepages not in (None, within.hugepages):
                raise ValueError(f"{what}: hugepages={hugepages} inside a memfd made with "
                                 f"hugepages={within.hugepages}")
            if offset < 0 or offset % within.page_size or offset + size > within.size:
                raise ValueError(f"{what}: window +{offset:#x} of {format_size(size)} does not fit "
                                 f"{within.name} ({format_size(within.size)}, "
                                 f"{format_size(within.page_size)} pages)")
            self.backing = within
        elif anonymous and hugepages != "hugetlbfs":
            self.backing = Anonymous(machine, f"domain{domain}", size, hugepages=hugepages, what=what)
        else:
            page = mmap.PAGESIZE
            if hugepages == "hugetlbfs":
                page = (hugetlb_page_size() if _checked
                        else check_hugetlb({domain: size}, {domain: self.policy}))
            self.backing = Memfd(machine, f"domain{domain}", size, hugepages=hugepages,
                                 page_size=page, what=what)
        try:
            self._mbind()
            self.policy_readback = self._readback()
        except BaseException:
            self.close()
            raise
        if self.policy_readback != self.policy:
            pol, back = self.policy, self.policy_readback
            self.close()
            raise NumavmError(f"{what}: mbind({pol}) succeeded but the kernel reports {back}")

    # The backing memory's facts, as seen from the window.
    @property
    def closed(self) -> bool:
        return self.backing is None or self.backing.closed

    @property
    def addr(self) -> int:
        """Host address of the window's first byte (0 once closed)."""
        return 0 if self.backing is None or self.backing.closed else self.backing.addr + self.offset

    @property
    def fd(self) -> int:
        """The memfd the window lies in (in unified mode, shared by every domain); -1 for anonymous memory."""
        return -1 if self.backing is None else self.backing.fd

    @property
    def name(self) -> str:
        return "" if self.backing is None else self.backing.name

    @property
    def hugepages(self) -> str | None:
        return None if self.backing is None else self.backing.hugepages

    @property
    def page_size(self) -> int:
        return mmap.PAGESIZE if self.backing is None else self.backing.page_size

    @property
    def notes(self) -> list[str]:
        return [] if self.backing is None else self.backing.notes

    def _mbind(self) -> None:
        pol = self.policy
        mask, maxnode = nodemask(pol.nodes)
        flags = 0 if pol.mode is Mode.DEFAULT else MPOL_MF_STRICT
        try:
            _libc.mbind(self.addr, self.size, int(pol.mode), mask, maxnode, flags)
        except HostError as e:
            hint = ""
            since = MODE_SINCE.get(pol.mode)
            if e.errno == errno.EINVAL and since:
                hint = f" (mode {pol.mode.label} needs Linux {since[0]}.{since[1]}+; kernel {_kernel_text()})"
            raise _rewrap(e, f"domain {self.domain}: mbind({pol}){hint}") from None

    def _readback(self) -> Policy:
        mode = ctypes.c_int()
        bits = _possible_nodes_bits()
        mask = (ctypes.c_ulong * (bits // 64))()
        try:
            _libc.get_mempolicy(ctypes.byref(mode), mask, bits + 1, self.addr, MPOL_F_ADDR)
        except HostError as e:
            raise _rewrap(e, f"domain {self.domain}: get_mempolicy(MPOL_F_ADDR)") from None
        return Policy(Mode(mode.value & ~MPOL_MODE_FLAGS), _mask_nodes(mask))

    # ---- access

    def _check(self, offset: int, n: int) -> tuple[mmap.mmap, int]:
        """The mapping and the position of `offset` in it, or an error."""
        mapping = None if self.backing is None else self.backing.map
        if mapping is None:
            raise NumavmError(f"domain {self.domain}: segment {self.name} is closed")
        if n < 0 or offset < 0 or offset + n > self.size:
            raise GuestAddressError(
                f"domain {self.domain}: offset {offset:#x}+{n:#x} is outside the "
                f"{format_size(self.size)} segment")
        return mapping, self.offset + offset

    def view(self, offset: int, n: int) -> memoryview:
        """Zero-copy view of [offset, offset+n); close() waits for views to go."""
        mapping, at = self._check(offset, n)
        return memoryview(mapping)[at:at + n]

    def read(self, offset: int, n: int) -> bytes:
        mapping, at = self._check(offset, n)
        return mapping[at:at + n]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        mapping, at = self._check(offset, src.nbytes)
        if src.nbytes >= POPULATE_BEFORE_WRITE:
            # Pages allocated and mapped in one call, not one fault per page inside the copy: 10 %
            # of loading a kernel here, more where faults are dear (an emulated L1).  Best effort:
            # without it the copy faults the pages in, as before.
            page = self.page_size
            lo, hi = offset // page * page, min(self.size, -(-(offset + src.nbytes) // page) * page)
            try:
                self._populate(lo, hi - lo)
            except HostError:
                pass
        mapping[at:at + src.nbytes] = src

    def _populate(self, off: int, n: int) -> None:
        """Allocate and map [off, off + n) of the window (page-aligned) under its policy: with
        plain shmem pages fallocate(2) on the memfd first (see `prefault`), then
        madvise(MADV_POPULATE_WRITE), whose HostError is raised."""
        if self.hugepages is None and self.fd >= 0:
            try:
                _libc.fallocate(self.fd, 0, self.offset + off, n)
            except HostError:
                pass  # the madvise populates the range alone, or reports why not
        _libc.madvise(self.addr + off, n, MADV_POPULATE_WRITE)

    # ---- prefault

    def prefault_cpus(self) -> tuple[int, ...]:
        """The host CPUs first touch should run on: those of the policy's nodes
        that this process may use, else every CPU it may use."""
        return policy_cpus(self.policy.nodes) or tuple(sorted(os.sched_getaffinity(0)))

    def prefault(self, threads: int | None = None,
                 progress: ProgressFn | None = None) -> PrefaultResult:
        """Populate every page with madvise(MADV_POPULATE_WRITE), in chunks,
        from threads pinned to the CPUs of the policy's nodes; `progress`
        (bytes_done, total) runs in the calling thread after each chunk.

        With plain shmem pages, each chunk is first allocated with fallocate(2)
        on the memfd, then mapped by the madvise: the same pages under the same
        shared policy (shmem allocates for fallocate by the policy of each
        offset, as for a fault), and the two together take about 3/4 of the
        time of the madvise alone, which allocates page by page from its fault
        path.  The fallocate is only a head start: if it fails, the madvise
        does the work and its error is the one reported.  Not with huge pages:
        hugetlbfs allocates for fallocate by the task's policy, not the
        mapping's, and shmem THP only follows MADV_HUGEPAGE for faults.
        """
        what = f"domain {self.domain}: madvise(MADV_POPULATE_WRITE)"
        self._check(0, 0)
        if kernel_version() < POPULATE_SINCE:
            raise NumavmError(f"{what} needs Linux {POPULATE_SINCE[0]}.{POPULATE_SINCE[1]} or later "
                              f"to prefault; this kernel is {_kernel_text()}")
        cpus = self.prefault_cpus()
        align = max(self.page_size, 2 * MiB)
        nthreads = max(1, min(threads or len(cpus), -(-self.size // align)))
        chunk = min(256 * MiB, max(align, self.size // (nthreads * 8)))
        chunk = -(-chunk // align) * align
        work: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        for off in range(0, self.size, chunk):  # one item per chunk, not per page
            work.put((off, min(chunk, self.size - off)))
        done_q: queue.SimpleQueue[int | BaseException] = queue.SimpleQueue()
        stop = threading.Event()

        def worker() -> None:
            try:
                os.sched_setaffinity(0, cpus)  # this thread only
                while not stop.is_set():
                    try:
                        off, n = work.get_nowait()
                    except queue.Empty:
                        return
                    self._populate(off, n)
                    done_q.put(n)
            except BaseException as e:  # reported by the caller's thread
                done_q.put(e)

        start = time.monotonic()
        pool = [threading.Thread(target=worker, name=f"prefault-d{self.domain}-{i}", daemon=True)
                for i in range(nthreads)]
        for t in pool:
            t.start()
        done, error = 0, None
        try:
            while done < self.size:
                item = done_q.get()
                if isinstance(item, BaseException):
                    error = item
                    break
                done += item
                if progress is not None:
                    progress(done, self.size)
        finally:
            stop.set()
            for t in pool:
                t.join()
        if error is not None:
            if isinstance(error, HostError):
                hint = ""
                if error.errno == errno.EINVAL:
                    hint = f" (MADV_POPULATE_WRITE needs Linux 5.14+; kernel {_kernel_text()})"
                elif error.errno in (errno.ENOMEM, errno.EFAULT):
                    hint = f" (not enough memory under {self.policy} for {format_size(self.size)})"
                raise _rewrap(error, what + hint) from None
            raise error
        return PrefaultResult(self.size, time.monotonic() - start, nthreads, cpus)

    # ---- audit

    def placement(self) -> Placement:
        """The policy the kernel reports for the window and its resident pages per node."""
        self._check(0, 0)
        found = range_placements({0: (self.addr, self.size, self.page_size)}).get(0)
        if found is None:
            raise NumavmError(f"domain {self.domain}: no /proc/self/numa_maps line at {self.addr:#x}")
        return found

    def describe(self, placement: Placement | None = None) -> str:
        if self.closed:
            return f"domain {self.domain}: {self.name} (closed)"
        placement = placement or self.placement()
        assert self.backing is not None
        where = "" if self.owner else f"at +{self.offset:#x} of "
        lines = [f"domain {self.domain}: {format_size(self.size)} {where}{self.backing.kind}, "
                 f"mapped at {self.addr:#x}, {self.backing.pages} pages",
                 f"  policy {self.policy}, kernel reports {self.policy_readback} (get_mempolicy) "
                 f"and {placement.policy_text} (numa_maps)",
                 f"  resident {_human(placement.resident)}"
                 + "".join(f", N{n} {_human(c * placement.page_size)}"
                           for n, c in sorted(placement.pages.items()))]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    # ---- life

    def close(self) -> None:
        """Unmap (and close) the segment's own memory; idempotent.  Refused while
        views are alive.  A window of a memfd it does not own leaves it alone."""
        if self.owner and self.backing is not None:
            self.backing.close()

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd} addr={self.addr:#x}"
        where = "" if self.owner else f" at +{self.offset:#x}"
        return f"<Segment domain={self.domain} {format_size(self.size)}{where} {self.policy} {state}>"
