"""Host memory for the guest: memfds, one per guest NUMA domain or one for all.

Host memory is a `Memfd`: a memfd mapped once, shared, which owns the fd and
the mapping.  Each domain with memory gets a `Segment`, a window of a memfd
under the domain's host policy.  Per domain (the default) each segment has a
memfd of its own (``numavm:<machine>:domain<ID>``); unified (for QEMU, whose
``pc`` machine takes its RAM from one memory backend) one memfd
(``numavm:<machine>:ram``) holds the domains end to end, in QEMU's RAM offset
order, and each segment is its domain's range of it.  The policy is applied
with mbind(2) over the window before any page is touched, then read back with
get_mempolicy(2) at the window's start so what the kernel holds is on record.
A policy on a shared memory object holds for every mapping of it (shmem keeps
it per range of the object), so another process mapping the memfd allocates
under it too.  A policy naming offline host nodes, a mode the kernel lacks,
or huge pages the host has not reserved are refused before anything is
allocated.

`GuestMemory` builds the segments of a `Layout` and routes guest-physical
accesses to them; `regions()` gives KVM its memory slots (a domain split by
the 3-4 GiB hole keeps one segment and gets two slots) and `backing_fds()`
the memfds for another process.  `Segment.prefault` populates pages from
threads pinned to the CPUs of the policy's nodes, and `placement()` /
`audit()` report where the pages really are, from /proc/self/numa_maps (and
move_pages(2) where the kernel merged neighbouring windows into one VMA).

No access loops over pages or bytes in Python: copies are slice assignments
on memoryviews, population is fallocate(2) then madvise(MADV_POPULATE_WRITE)
over large chunks.
"""
from __future__ import annotations

import array
import bisect
import collections
import ctypes
import errno
import mmap
import os
import platform
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple

from . import _libc
from ._libc import HostError
from .errors import ConfigError, NumavmError
from .layout import HIGH_RAM_BASE, LOW_RAM_LIMIT, DomainLayout, Layout
from .policy import Mode, Policy, host_online_nodes
from .units import GiB, KiB, MiB, format_list, format_size, parse_list

# include/uapi/linux/mempolicy.h
MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1
MPOL_MF_STRICT = 1 << 0
MPOL_F_NUMA_BALANCING = 1 << 13
MPOL_F_RELATIVE_NODES = 1 << 14
MPOL_F_STATIC_NODES = 1 << 15
MPOL_MODE_FLAGS = MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING

# include/uapi/asm-generic/mman-common.h
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

# include/uapi/linux/memfd.h
MFD_CLOEXEC = 0x1
MFD_HUGETLB = 0x4
MEMFD_NAME_MAX = 249  # NAME_MAX - len("memfd:")

# The first kernel that knows each mode (MPOL_PREFERRED_MANY: 5.15, b27abaccf8e8;
# MPOL_WEIGHTED_INTERLEAVE: 6.9, fa3bea4e1f82) and MADV_POPULATE_WRITE (5.14).
MODE_SINCE: dict[Mode, tuple[int, int]] = {
    Mode.PREFERRED_MANY: (5, 15),
    Mode.WEIGHTED_INTERLEAVE: (6, 9),
}
POPULATE_SINCE = (5, 14)

# move_pages(2), only to report pages' nodes (glibc leaves it to libnuma);
# arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h.
_MOVE_PAGES = {"x86_64": 279, "aarch64": 239}
MOVE_PAGES_BATCH = 65536  # pages per call: 512 KiB of addresses

# fallocate(2) itself: os.posix_fallocate may fall back to writing every block.
_fallocate = _libc.declare("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
                           ctypes.c_long)

HUGEPAGES = ("thp", "hugetlbfs")
_NEEDS_NODES = {Mode.PREFERRED, Mode.BIND, Mode.INTERLEAVE, Mode.PREFERRED_MANY,
                Mode.WEIGHTED_INTERLEAVE}
READBACK_BITS = 1024  # MAX_NUMNODES at its largest (NODES_SHIFT 10)

NODE_DIR = Path("/sys/devices/system/node")
MEMINFO = Path("/proc/meminfo")
NUMA_MAPS = Path("/proc/self/numa_maps")
MAPS = Path("/proc/self/maps")
THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")

ProgressFn = Callable[[int, int], None]


class GuestAddressError(NumavmError, ValueError):
    """A guest-physical access outside RAM or across a memory slot boundary."""


# ---------------------------------------------------------------- host facts


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel, from uname's release string."""
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _kernel_text() -> str:
    return os.uname().release


def node_cpus(node: int, root: Path = NODE_DIR) -> tuple[int, ...]:
    """Host CPUs of `node` (its sysfs cpulist); () for a memory-only node."""
    try:
        text = (root / f"node{node}" / "cpulist").read_text().strip()
    except OSError:
        return ()
    return parse_list(text.replace(",", "+"), f"node{node}/cpulist") if text else ()


def _possible_nodes_bits() -> int:
    try:
        text = (NODE_DIR / "possible").read_text().strip()
        top = max(parse_list(text.replace(",", "+"), "possible")) + 1
    except (OSError, ValueError, NumavmError):
        top = 1
    return max(READBACK_BITS, -(-top // 64) * 64)


def meminfo(path: Path = MEMINFO) -> dict[str, int]:
    """/proc/meminfo as numbers (kB fields stay in kB, counts stay counts)."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def _thp_shmem_mode() -> str:
    """The effective shmem THP setting for 2 MiB pages ("never", "advise", ...)."""

    def selected(path: Path) -> str | None:
        try:
            m = re.search(r"\[([^\]]+)\]", path.read_text())
        except OSError:
            return None
        return m.group(1) if m else None

    per_size = selected(THP_DIR / "hugepages-2048kB" / "shmem_enabled")
    if per_size not in (None, "inherit"):
        return per_size
    return selected(THP_DIR / "shmem_enabled") or "unknown"


# ---------------------------------------------------------------- nodemasks


def nodemask(nodes: tuple[int, ...] | list[int]) -> tuple[ctypes.Array[ctypes.c_ulong], int]:
    """A nodemask for mbind: the c_ulong array and its `maxnode` (bits + 1).

    The kernel decrements `maxnode` before reading that many bits, so a mask
    of 64 bits is passed as 65; passing 64 would silently drop node 63.
    """
    words = max(nodes) // 64 + 1 if nodes else 1
    mask = (ctypes.c_ulong * words)()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    return mask, words * 64 + 1


def _mask_nodes(mask: ctypes.Array[ctypes.c_ulong]) -> tuple[int, ...]:
    return tuple(w * 64 + b for w, word in enumerate(mask) if word
                 for b in range(64) if word >> b & 1)


# ---------------------------------------------------------------- checks


def check_policy(policy: Policy, online: tuple[int, ...], what: str) -> Policy:
    """The policy resolved against `online`, or a ConfigError naming `what`.

    Everything that can be said before a byte is allocated: nodes online,
    nodes present when the mode needs them, the mode known to this kernel.
    """
    policy = policy.resolve(online)
    if policy.mode in _NEEDS_NODES and not policy.nodes:
        raise ConfigError(f"{what}: {policy.mode.label} needs host nodes, e.g. {policy.mode.label}:0")
    if policy.mode not in _NEEDS_NODES and policy.nodes:
        raise ConfigError(f"{what}: {policy.mode.label} takes no nodes, got {policy}")
    policy.check_nodes(online, what)
    since = MODE_SINCE.get(policy.mode)
    if since and kernel_version() < since:
        raise ConfigError(
            f"{what}: policy {policy.mode.label} needs Linux {since[0]}.{since[1]} or later; "
            f"this kernel is {_kernel_text()}")
    return policy


def hugetlb_page_size() -> int:
    """The default hugetlbfs page size (what MFD_HUGETLB uses), in bytes."""
    return meminfo().get("Hugepagesize", 2048) * KiB


def check_hugetlb(sizes: Mapping[int, int], policies: Mapping[int, Policy]) -> int:
    """Refuse hugetlbfs backing the host cannot give; returns the page size.

    `sizes` and `policies` are per domain.  Counts the pool's free, unreserved
    pages (/proc/meminfo), and for bound domains the free pages on the bound
    nodes, before anything is allocated.
    """
    info = meminfo()
    page = info.get("Hugepagesize", 2048) * KiB
    for dom, size in sizes.items():
        if size % page:
            raise ConfigError(
                f"domain {dom}: size {format_size(size)} is not a multiple of the "
                f"{format_size(page)} huge page size (hugepages=hugetlbfs)")
    need = sum(sizes.values()) // page
    free = info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0)
    if free < need:
        doms = format_list(sorted(sizes))
        raise ConfigError(
            f"domain{'s' if len(sizes) > 1 else ''} {doms}: hugepages=hugetlbfs needs {need} free "
            f"{format_size(page)} huge pages, the host has {max(free, 0)} "
            f"(HugePages_Total {info.get('HugePages_Total', 0)}, HugePages_Free "
            f"{info.get('HugePages_Free', 0)}, HugePages_Rsvd {info.get('HugePages_Rsvd', 0)} in "
            f"/proc/meminfo); reserve them first, e.g. sysctl vm.nr_hugepages={need}")
    for dom, size in sizes.items():
        pol = policies.get(dom, Policy())
        if pol.mode is not Mode.BIND:
            continue
        on_nodes = sum(_node_free_hugepages(n, page) for n in pol.nodes)
        if on_nodes < size // page:
            raise ConfigError(
                f"domain {dom}: hugepages=hugetlbfs under {pol} needs {size // page} free "
                f"{format_size(page)} huge pages on node{'s' if len(pol.nodes) > 1 else ''} "
                f"{format_list(pol.nodes)}, which have {on_nodes} "
                f"(/sys/devices/system/node/nodeN/hugepages/)")
    return page


def domain_hugepages(d: DomainLayout, machine: str | None) -> str | None:
    """The page kind backing domain `d`: its own hugepages=, else the machine's (`none`: small)."""
    own = d.domain.hugepages
    return None if own == "none" else (own or machine)


# ---------------------------------------------------------------- room to commit memory

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
_UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX


@dataclass(frozen=True)
class Room:
    """How much more memory one limit lets this process commit, and which limit it is."""

    bytes: int
    where: str  # e.g. "the host (MemAvailable)", "memory cgroup /a/b (memory.max 3G)"


def memory_rooms(proc_cgroup: Path = PROC_CGROUP, mountinfo: Path = MOUNTINFO,
                 meminfo_path: Path = MEMINFO) -> list[Room]:
    """The host's MemAvailable and the room under every memory cgroup limit above this process.

    cgroup v2 (memory.max - memory.current) or v1 (memory.limit_in_bytes -
    memory.usage_in_bytes), for this process's cgroup and each ancestor up to
    the mount's root: a parent's limit binds its children.  Page cache the
    cgroup can drop (inactive_file) counts as room.
    """
    rooms = []
    try:
        rooms.append(Room(meminfo(meminfo_path)["MemAvailable"] * KiB, "the host (MemAvailable)"))
    except (OSError, KeyError):
        pass
    for path, v2 in _memory_cgroups(proc_cgroup, mountinfo):
        room = _cgroup_room(path, v2)
        if room is not None:
            rooms.append(room)
    return rooms


def _memory_cgroups(proc_cgroup: Path, mountinfo: Path) -> list[tuple[Path, bool]]:
    """(directory, is v2) of this process's memory cgroup and its limited ancestors."""
    try:
        lines = proc_cgroup.read_text().splitlines()
        mounts = mountinfo.read_text().splitlines()
    except OSError:
        return []
    v1 = v2 = None
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and line.startswith("0::"):
            v2 = rel
        elif "memory" in controllers.split(","):
            v1 = rel
    out = []
    for m in mounts:  # "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPEROPTS"
        left, _, right = m.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) < 5 or len(r) < 3:
            continue
        root, point, fstype = f[3], f[4], r[0]
        rel = v1 if fstype == "cgroup" and "memory" in r[2].split(",") else (
            v2 if fstype == "cgroup2" and v1 is None else None)
        if rel is None or not (rel + "/").startswith(root.rstrip("/") + "/"):
            continue
        here = Path(point) / rel[len(root.rstrip("/")):].lstrip("/")
        top = Path(point)
        while True:
            out.append((here, fstype == "cgroup2"))
            if here == top:
                break
            here = here.parent
    return out


def _cgroup_room(path: Path, v2: bool) -> Room | None:
    names = ("memory.max", "memory.current") if v2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
    try:
        limit_text = (path / names[0]).read_text().strip()
        if limit_text == "max" or int(limit_text) >= _UNLIMITED:
            return None
        limit, used = int(limit_text), int((path / names[1]).read_text())
    except (OSError, ValueError):
        return None
    try:
        stat = dict(line.split() for line in (path / "memory.stat").read_text().splitlines())
        droppable = int(stat.get("inactive_file" if v2 else "total_inactive_file", 0))
    except (OSError, ValueError):
        droppable = 0
    return Room(max(limit - used + droppable, 0),
                f"memory cgroup {path} ({names[0]} {format_size(limit)}, {format_size(used)} in use)")


def node_free(node: int, root: Path = NODE_DIR) -> int | None:
    """Free memory on host node `node` (its meminfo MemFree), in bytes; None if unknown."""
    return _node_meminfo(node, "MemFree:", root)


def node_total(node: int, root: Path = NODE_DIR) -> int | None:
    """Memory of host node `node` (its meminfo MemTotal), in bytes; None if unknown."""
    return _node_meminfo(node, "MemTotal:", root)


def _node_meminfo(node: int, key: str, root: Path) -> int | None:
    try:
        for line in (root / f"node{node}" / "meminfo").read_text().splitlines():
            if key in line:
                return int(line.split()[-2]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def node_distances(node: int, root: Path = NODE_DIR) -> tuple[int, ...] | None:
    """Host node `node`'s row of the SLIT (its sysfs distance: one number per online node,
    in node order); None if unreadable."""
    try:
        return tuple(int(x) for x in (root / f"node{node}" / "distance").read_text().split())
    except (OSError, ValueError):
        return None


def check_memory(layout: Layout, prefault: frozenset[int] | None, hugepages: str | None,
                 rooms: list[Room] | None = None, node_root: Path = NODE_DIR,
                 online: tuple[int, ...] | None = None) -> list[str]:
    """Refuse (ConfigError) a prefault the host cannot give; warnings for a guest that could outgrow it.

    `prefault` is the domains to populate (None: all).  Prefaulted small- and
    THP-page domains must fit the host's MemAvailable, every memory cgroup
    limit above us, and (domains bound to some of the host's nodes) those
    nodes' MemFree; bound to every node, MemAvailable is the better measure
    (it counts reclaimable memory; a node's MemFree does not).  hugetlbfs
    domains must fit the huge page pool (`check_hugetlb`), prefaulted or not.
    Nothing is allocated here: this is the check before the commitment.
    """
    doms = [d for d in layout.domains if d.segment_size]
    kind = {d.id: domain_hugepages(d, hugepages) for d in doms}
    tlb = {d.id: d.segment_size for d in doms if kind[d.id] == "hugetlbfs"}
    if tlb:
        check_hugetlb(tlb, {d.id: d.domain.policy for d in doms if d.id in tlb})
    small = [d for d in doms if kind[d.id] != "hugetlbfs"]
    now = [d for d in small if prefault is None or d.id in prefault]
    rooms = memory_rooms() if rooms is None else rooms
    need = sum(d.segment_size for d in now)
    by_nodes: dict[tuple[int, ...], list[DomainLayout]] = collections.defaultdict(list)
    for d in now:
        if d.domain.policy.mode is Mode.BIND:
            by_nodes[d.domain.policy.nodes].append(d)
    every = set(online if online is not None else host_online_nodes())
    for nodes, group in by_nodes.items():
        if every <= set(nodes):
            continue
        free = [node_free(n, node_root) for n in nodes]
        if None in free:
            continue
        size = sum(d.segment_size for d in group)
        if size > sum(free):  # type: ignore[arg-type]
            ids = format_list([d.id for d in group])
            raise ConfigError(
                f"--prefault: domain{'s' if len(group) > 1 else ''} {ids} bound to node"
                f"{'s' if len(nodes) > 1 else ''} {format_list(nodes)} need{'' if len(group) > 1 else 's'} "
                f"{format_size(size)}, and {'they have' if len(nodes) > 1 else 'it has'} "
                f"{_gib(sum(free))} free (MemFree in {node_root}/nodeN/meminfo)")  # type: ignore[arg-type]
    tight = min(rooms, key=lambda r: r.bytes, default=None)
    if tight is not None and need > tight.bytes:
        raise ConfigError(f"--prefault: the guest's memory to populate is {format_size(need)}, and "
                          f"{tight.where} leaves room for {_gib(tight.bytes)}; give less memory or "
                          f"prefault fewer domains")
    warnings = []
    total = sum(d.segment_size for d in small)
    if tight is not None and total > tight.bytes:
        warnings.append(f"the guest can use up to {format_size(total)}, more than {tight.where} leaves room "
                        f"for ({_gib(tight.bytes)}): it may be OOM-killed as it touches its memory "
                        f"(--prefault checks this before the guest starts)")
    return warnings


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _node_free_hugepages(node: int, page: int) -> int:
    path = NODE_DIR / f"node{node}" / "hugepages" / f"hugepages-{page // KiB}kB" / "free_hugepages"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _check_hugepages(hugepages: str | None, what: str) -> None:
    if hugepages is not None and hugepages not in HUGEPAGES:
        raise ConfigError(f"{what}: hugepages must be one of {', '.join(HUGEPAGES)} (or none), "
                          f"got {hugepages!r}")


def _rewrap(exc: HostError, what: str) -> HostError:
    return HostError(exc.errno or 0, what)


# ---------------------------------------------------------------- numa_maps

_KERNEL_MODES = {
    "default": Mode.DEFAULT,
    "prefer": Mode.PREFERRED,
    "bind": Mode.BIND,
    "interleave": Mode.INTERLEAVE,
    "local": Mode.LOCAL,
    "prefer (many)": Mode.PREFERRED_MANY,
    "weighted interleave": Mode.WEIGHTED_INTERLEAVE,
}
# mpol_to_str(): MODE[=static|relative[|balancing]][:NODELIST]; two modes hold a space.
_NUMA_MAPS_RE = re.compile(
    r"^([0-9a-f]+) (prefer \(many\)|weighted interleave|[a-z]+)(=[a-z|]+)?(?::([0-9,\-]+))?(?= |$)(.*)$")
_NODE_PAGES_RE = re.compile(r"N(\d+)=(\d+)")


@dataclass(frozen=True)
class Placement:
    """Where a segment's pages are, as /proc/self/numa_maps tells it."""

    policy_text: str  # as the kernel writes it, e.g. "bind:0", "prefer (many):0"
    policy: Policy | None  # the same, parsed; None for a word numavm does not know
    pages: Mapping[int, int]  # host node -> resident pages
    page_size: int  # bytes per counted page (kernelpagesize_kB)

    @property
    def resident(self) -> int:
        """Resident bytes, all nodes."""
        return sum(self.pages.values()) * self.page_size

    def bytes_on(self, node: int) -> int:
        return self.pages.get(node, 0) * self.page_size

    def __str__(self) -> str:
        nodes = " ".join(f"N{n}={_human(c * self.page_size)}" for n, c in sorted(self.pages.items()))
        return f"{self.policy_text}, resident {_human(self.resident)}" + (f" ({nodes})" if nodes else "")


def parse_numa_maps_line(line: str) -> tuple[int, Placement]:
    """(start address, Placement) of one numa_maps line."""
    m = _NUMA_MAPS_RE.match(line.rstrip("\n"))
    if not m:
        raise ValueError(f"unexpected numa_maps line: {line!r}")
    start, word, flags, nodes_text, rest = m.groups()
    mode = _KERNEL_MODES.get(word)
    policy = None
    if mode is not None:
        nodes = parse_list(nodes_text.replace(",", "+"), "numa_maps nodes") if nodes_text else ()
        policy = Policy(mode, nodes)
    pages: dict[int, int] = {}
    page_size = mmap.PAGESIZE
    for token in rest.split():
        key, _, value = token.partition("=")
        if key == "kernelpagesize_kB" and value.isdigit():
            page_size = int(value) * KiB
        elif _NODE_PAGES_RE.fullmatch(token):
            pages[int(key[1:])] = int(value)
    text = word + (flags or "") + (f":{nodes_text}" if nodes_text else "")
    return int(start, 16), Placement(text, policy, pages, page_size)


def read_numa_maps(addrs: set[int] | None = None, path: Path = NUMA_MAPS) -> dict[int, Placement]:
    """Placement of the mappings starting at `addrs` (all mappings if None)."""
    out: dict[int, Placement] = {}
    for line in path.read_text().splitlines():
        head = line.split(" ", 1)[0]
        try:
            start = int(head, 16)
        except ValueError:
            continue
        if addrs is None or start in addrs:
            out[start] = parse_numa_maps_line(line)[1]
    return out


def _vmas(path: Path = MAPS) -> list[tuple[int, int]]:
    """[start, end) of every mapping of this process, in address order."""
    out = []
    for line in path.read_text().splitlines():
        start, _, end = line.split(" ", 1)[0].partition("-")
        out.append((int(start, 16), int(end, 16)))
    return out


def range_placements(ranges: Mapping[int, tuple[int, int, int]]) -> dict[int, Placement]:
    """Placement of each (address, size, page size) range of this process's memory.

    mbind(2) splits a mapping into one VMA, and one numa_maps line, per range
    whose policy differs from its neighbour's, and the kernel merges adjacent
    ranges under equal policies back into one VMA.  A range made of whole VMAs
    is read from their numa_maps lines; when a VMA reaches past the range (a
    neighbouring domain under the same policy), its pages are counted per node
    with move_pages(2) over the range, and the policy still comes from numa_maps.
    A key whose range has no mapping is left out.
    """
    lines = read_numa_maps()
    vmas = _vmas()
    out: dict[int, Placement] = {}
    for key, (addr, size, page_size) in ranges.items():
        end = addr + size
        mine = [(s, e) for s, e in vmas if s < end and e > addr and s in lines]
        if not mine:
            continue
        found = [lines[s] for s, _ in mine]
        texts = list(dict.fromkeys(p.policy_text for p in found))
        policy = found[0].policy if len(texts) == 1 else None
        if mine[0][0] < addr or mine[-1][1] > end:
            pages, unit = pages_per_node(addr, size, page_size), page_size
        else:
            counts: collections.Counter[int] = collections.Counter()
            for p in found:
                counts.update(p.pages)
            pages, unit = dict(counts), found[0].page_size
        out[key] = Placement(" + ".join(texts), policy, pages, unit)
    return out


def pages_per_node(addr: int, size: int, page_size: int = mmap.PAGESIZE) -> dict[int, int]:
    """Pages of [addr, addr+size) mapped in this process, per host node.

    move_pages(2) with no target nodes only reports each page's node; pages
    not mapped here (never touched, or touched only by another process) are
    not counted, as in numa_maps.  One call per batch of pages, not per page.
    """
    number = _MOVE_PAGES.get(platform.machine())
    if number is None:
        raise HostError(errno.ENOSYS, "move_pages (no system call number known for this architecture)")
    counts: collections.Counter[int] = collections.Counter()
    step = MOVE_PAGES_BATCH * page_size
    for start in range(addr, addr + size, step):
        pages = array.array("Q", range(start, min(start + step, addr + size), page_size))
        status = array.array("i", bytes(4 * len(pages)))
        try:
            _libc.syscall(ctypes.c_long(number), ctypes.c_int(0), ctypes.c_ulong(len(pages)),
                          ctypes.c_void_p(pages.buffer_info()[0]), None,
                          ctypes.c_void_p(status.buffer_info()[0]), ctypes.c_int(0))
        except HostError as e:
            raise _rewrap(e, f"move_pages({start:#x}, {len(pages)} pages)") from None
        counts.update(status)  # a node, or -ENOENT / -EFAULT for a page not mapped
    return {n: c for n, c in sorted(counts.items()) if n >= 0}


# ---------------------------------------------------------------- memfd


class Memfd:
    """A memfd mapped once, shared, read-write: the object that owns host memory.

    Creation: memfd_create, ftruncate, mmap, and madvise(MADV_HUGEPAGE) over
    the mapping for THP.  Nothing is touched, so the memfd stays sparse.  It
    owns the fd and the mapping; a failure releases what was made.  Segments
    are windows of it and apply the policies.
    """

    def __init__(self, machine: str, id: str, size: int, *, hugepages: str | None = None,
                 page_size: int = mmap.PAGESIZE, what: str = "") -> None:
        self.id = id  # "domain<ID>" or "ram"; the memfd is named numavm:<machine>:<id>
        self.name = _memfd_name(machine, id)
        self.size = size
        self.hugepages = hugepages
        self.page_size = page_size
        self.what = what or id
        self.fd = -1
        self.addr = 0
        self.map: mmap.mmap | None = None
        self.notes: list[str] = []
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self.map is None

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
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                raise NumavmError(
                    f"{self.what}: cannot unmap {self.name}: memoryviews of it are "
                    "still alive; release them first") from None
            self.map = None
            self.addr = 0
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd} addr={self.addr:#x}"
        return f"<Memfd {self.name!r} {format_size(self.size)} {state}>"


def _memfd_name(machine: str, id: str) -> str:
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
    """One guest domain's host memory under its policy: a window of a `Memfd`.

    Made alone, a segment has a memfd of its own (``numavm:<machine>:domain<ID>``)
    and is the whole of it; close() releases it.  Made `within` a Memfd at
    `offset` (GuestMemory's unified mode), it is that range of the shared
    memfd, whose owner releases it; the segment's close() leaves it alone.

    Creation order: checks (nodes online, mode known, huge pages reserved),
    the memfd when it is its own, mbind over the window, get_mempolicy readback
    at the window's start.  Nothing is touched.  Any failure releases what
    was made.
    """

    def __init__(self, size: int, policy: Policy = Policy(), *, domain: int = 0,
                 machine: str = "vm", hugepages: str | None = None,
                 online: tuple[int, ...] | None = None, within: Memfd | None = None,
                 offset: int = 0, _checked: bool = False) -> None:
        self.domain = domain
        self.size = size
        self.offset = offset  # of the window in its memfd
        self.memfd: Memfd | None = None
        self.owner = within is None  # whether close() releases the memfd
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
            self.memfd = within
        else:
            page = mmap.PAGESIZE
            if hugepages == "hugetlbfs":
                page = (hugetlb_page_size() if _checked
                        else check_hugetlb({domain: size}, {domain: self.policy}))
            self.memfd = Memfd(machine, f"domain{domain}", size, hugepages=hugepages,
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

    # The memfd's facts, as seen from the window.
    @property
    def closed(self) -> bool:
        return self.memfd is None or self.memfd.closed

    @property
    def addr(self) -> int:
        """Host address of the window's first byte (0 once closed)."""
        return 0 if self.memfd is None or self.memfd.closed else self.memfd.addr + self.offset

    @property
    def fd(self) -> int:
        """The memfd the window lies in (in unified mode, shared by every domain)."""
        return -1 if self.memfd is None else self.memfd.fd

    @property
    def name(self) -> str:
        return "" if self.memfd is None else self.memfd.name

    @property
    def hugepages(self) -> str | None:
        return None if self.memfd is None else self.memfd.hugepages

    @property
    def page_size(self) -> int:
        return mmap.PAGESIZE if self.memfd is None else self.memfd.page_size

    @property
    def notes(self) -> list[str]:
        return [] if self.memfd is None else self.memfd.notes

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
        mapping = None if self.memfd is None else self.memfd.map
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
        mapping[at:at + src.nbytes] = src

    # ---- prefault

    def prefault_cpus(self) -> tuple[int, ...]:
        """The host CPUs first touch should run on: those of the policy's nodes
        that this process may use, else every CPU it may use."""
        allowed = os.sched_getaffinity(0)
        cpus = {c for n in self.policy.nodes for c in node_cpus(n)} & allowed
        return tuple(sorted(cpus or allowed))

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
        addr = self.addr
        fd, base = (self.fd, self.offset) if self.hugepages is None else (-1, 0)

        def worker() -> None:
            try:
                os.sched_setaffinity(0, cpus)  # this thread only
                while not stop.is_set():
                    try:
                        off, n = work.get_nowait()
                    except queue.Empty:
                        return
                    if fd >= 0:
                        try:
                            _fallocate(fd, 0, base + off, n)
                        except HostError:
                            pass  # the madvise populates the chunk alone, or reports why not
                    _libc.madvise(addr + off, n, MADV_POPULATE_WRITE)
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
        pages = {"hugetlbfs": f"hugetlbfs {format_size(self.page_size)}",
                 "thp": "4K + THP"}.get(self.hugepages or "", format_size(mmap.PAGESIZE))
        where = "" if self.owner else f"at +{self.offset:#x} of "
        lines = [f"domain {self.domain}: {format_size(self.size)} {where}memfd {self.name!r} fd {self.fd}, "
                 f"mapped at {self.addr:#x}, {pages} pages",
                 f"  policy {self.policy}, kernel reports {self.policy_readback} (get_mempolicy) "
                 f"and {placement.policy_text} (numa_maps)",
                 f"  resident {_human(placement.resident)}"
                 + "".join(f", N{n} {_human(c * placement.page_size)}"
                           for n, c in sorted(placement.pages.items()))]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    # ---- life

    def close(self) -> None:
        """Unmap and close the segment's own memfd; idempotent.  Refused while
        views are alive.  A window of a memfd it does not own leaves it alone."""
        if self.owner and self.memfd is not None:
            self.memfd.close()

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd} addr={self.addr:#x}"
        where = "" if self.owner else f" at +{self.offset:#x}"
        return f"<Segment domain={self.domain} {format_size(self.size)}{where} {self.policy} {state}>"


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


def qemu_ram_offset(gpa: int) -> int:
    """Offset in QEMU pc's main RAM (``max-ram-below-4g=3G``) of guest RAM
    address `gpa`: [0, 3 GiB) is RAM [0, 3 GiB), the rest comes from 4 GiB."""
    return gpa - (HIGH_RAM_BASE - LOW_RAM_LIMIT) if gpa >= HIGH_RAM_BASE else gpa


@dataclass(frozen=True)
class _Route:
    start: int
    end: int
    segment: Segment
    offset: int
    slot: int


# mincore's vector -> b"\x01" per resident page, b"\x00" otherwise; runs of b"\x01"
_RESIDENT = bytes(i & 1 for i in range(256))
_RUN = re.compile(rb"\x01+")


@dataclass(eq=False)
class GuestMemory:
    """Every domain's segment, and the map from guest-physical RAM to them.

    Per domain (the default), each domain has a memfd of its own.  With
    `unified`, one memfd (``numavm:<machine>:ram``) holds all guest RAM with
    the domains end to end in domain order, which is QEMU pc's RAM offset
    order, and each domain's segment is its window of it, under its own
    policy: what QEMU's single ``memory-backend-file`` needs.
    """

    layout: Layout
    machine: str = "vm"
    hugepages: str | None = None
    online: tuple[int, ...] | None = None  # host nodes; None reads sysfs
    unified: bool = False
    segments: dict[int, Segment] = field(default_factory=dict, init=False)
    memfd: Memfd | None = field(default=None, init=False)  # the one memfd when unified
    _routes: list[_Route] = field(default_factory=list, init=False, repr=False)
    _starts: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
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
                              offset=offsets.get(d.id, 0), _checked=True)
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
        seg, off = self.locate(gpa, n)
        return seg.view(off, n)

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
        when unified, else ("domain<ID>", fd, size) per domain in domain order."""
        memfds = [self.memfd] if self.memfd is not None else [s.memfd for s in self.segments.values()]
        return [BackingFd(m.id, m.fd, m.size) for m in memfds if m is not None and not m.closed]

    def fds(self) -> dict[int, int]:
        """Domain id -> memfd, for handing the segments to another process
        (per-domain mode; a unified guest has one memfd: `backing_fds`)."""
        if self.unified:
            raise NumavmError("unified guest memory has one memfd for every domain: "
                              "use backing_fds()")
        return {d: s.fd for d, s in self.segments.items() if not s.closed}

    # ---- prefault and audit

    def prefault(self, threads: int | None = None,
                 progress: ProgressFn | None = None) -> dict[int, PrefaultResult]:
        """Prefault each segment in turn; `progress` sees totals across all."""
        total = sum(s.size for s in self.segments.values())
        base = 0
        out = {}
        for d, seg in self.segments.items():
            cb = None
            if progress is not None:
                cb = (lambda b: lambda done, _t: progress(b + done, total))(base)
            out[d] = seg.prefault(threads, cb)
            base += seg.size
        return out

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
            if seg.closed or seg.hugepages == "hugetlbfs":
                continue  # hugetlbfs pages are always mapped where they were made
            page = seg.page_size
            vec = ctypes.create_string_buffer(seg.size // page)
            _libc.mincore(seg.addr, seg.size, vec)
            # runs of resident pages (bit 0), found by the regex engine, not a Python loop per page
            flags = vec.raw.translate(_RESIDENT)
            for m in _RUN.finditer(flags):
                start, n = m.start() * page, (m.end() - m.start()) * page
                _libc.madvise(seg.addr + start, n, MADV_POPULATE_READ)
                total += n
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
    """Each domain's offset in the one memfd: the domains end to end, in order.

    Checked against QEMU pc's RAM order, so that the memfd's offsets are
    QEMU's and each domain's policy covers its own guest ranges under QEMU.
    """
    out, base = {}, 0
    for d in domains:
        for s in d.slots:
            if qemu_ram_offset(s.guest.start) != base + s.offset:
                raise NumavmError(
                    f"domain {d.id}: guest range {s.guest} is at RAM offset "
                    f"{qemu_ram_offset(s.guest.start):#x}, not {base + s.offset:#x} as the "
                    "domains end to end would put it; unified memory needs the layout's order")
        out[d.id] = base
        base += d.segment_size
    return out


def _human(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n} B"
