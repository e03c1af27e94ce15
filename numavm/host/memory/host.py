"""Facts about the host's memory, read from sysfs and /proc: nothing here changes anything.

The running kernel's version and what it supports, each node's CPUs and
free memory, /proc/meminfo, the shmem THP setting, the huge page pool, and
the room memory cgroups leave this process.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from numavm.errors import NumavmError
from numavm.spec.policy import Mode
from numavm.spec.units import KiB, format_size, parse_cpulist

# The first kernel that knows each mode (MPOL_PREFERRED_MANY: 5.15, b27abaccf8e8;
# MPOL_WEIGHTED_INTERLEAVE: 6.9, fa3bea4e1f82) and MADV_POPULATE_WRITE (5.14).
MODE_SINCE: dict[Mode, tuple[int, int]] = {
    Mode.PREFERRED_MANY: (5, 15),
    Mode.WEIGHTED_INTERLEAVE: (6, 9),
}
POPULATE_SINCE = (5, 14)

NODE_DIR = Path("/sys/devices/system/node")
MEMINFO = Path("/proc/meminfo")
THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")
READBACK_BITS = 1024  # MAX_NUMNODES at its largest (NODES_SHIFT 10)


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
    return parse_cpulist(text, f"node{node}/cpulist")


def policy_cpus(nodes: tuple[int, ...]) -> tuple[int, ...]:
    """The host CPUs of `nodes` this process may run on (sorted; () when none or no nodes).

    Where the threads that touch a domain's memory belong: the prefault pool,
    and under the KVM engine the domain's vCPU threads."""
    cpus = {c for n in nodes for c in node_cpus(n)} & os.sched_getaffinity(0)
    return tuple(sorted(cpus))


def _possible_nodes_bits() -> int:
    try:
        text = (NODE_DIR / "possible").read_text().strip()
        top = max(parse_cpulist(text, "possible")) + 1
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


def _thp_setting(name: str) -> str:
    """The effective THP setting `name` ("enabled" for anonymous memory, "shmem_enabled")
    for 2 MiB pages: "never", "madvise", "advise", "always", ...; "unknown" without THP."""

    def selected(path: Path) -> str | None:
        try:
            m = re.search(r"\[([^\]]+)\]", path.read_text())
        except OSError:
            return None
        return m.group(1) if m else None

    per_size = selected(THP_DIR / "hugepages-2048kB" / name)
    if per_size not in (None, "inherit"):
        return per_size
    return selected(THP_DIR / name) or "unknown"


def _thp_shmem_mode() -> str:
    """The effective shmem THP setting for 2 MiB pages ("never", "advise", ...)."""
    return _thp_setting("shmem_enabled")


def _thp_mode() -> str:
    """The effective THP setting of anonymous memory for 2 MiB pages ("never", "madvise", "always")."""
    return _thp_setting("enabled")


def hugetlb_page_size() -> int:
    """The default hugetlbfs page size (what MFD_HUGETLB uses), in bytes."""
    return meminfo().get("Hugepagesize", 2048) * KiB


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


def _node_free_hugepages(node: int, page: int) -> int:
    path = NODE_DIR / f"node{node}" / "hugepages" / f"hugepages-{page // KiB}kB" / "free_hugepages"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0
