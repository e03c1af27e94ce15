"""What is checked before a byte of guest memory is allocated.

Policies against the host's online nodes and the kernel's modes, the
nodemask encoding mbind(2) takes, huge pages against the pool, and whether
the host has room for what will be prefaulted.
"""
from __future__ import annotations

import collections
import ctypes
from pathlib import Path
from typing import Mapping

from numavm.errors import ConfigError
from numavm.plan.layout import DomainLayout, Layout
from numavm.spec.policy import Mode, Policy, host_online_nodes
from numavm.spec.units import GiB, KiB, format_list, format_size
from numavm.host.memory.host import (MODE_SINCE, NODE_DIR, Room, _kernel_text, _node_free_hugepages, kernel_version, meminfo,
                   memory_rooms, node_free)

# include/uapi/linux/mempolicy.h
MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1
MPOL_MF_STRICT = 1 << 0
MPOL_F_NUMA_BALANCING = 1 << 13
MPOL_F_RELATIVE_NODES = 1 << 14
MPOL_F_STATIC_NODES = 1 << 15
MPOL_MODE_FLAGS = MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING

HUGEPAGES = ("thp", "hugetlbfs")
_NEEDS_NODES = {Mode.PREFERRED, Mode.BIND, Mode.INTERLEAVE, Mode.PREFERRED_MANY,
                Mode.WEIGHTED_INTERLEAVE}

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


def _check_hugepages(hugepages: str | None, what: str) -> None:
    if hugepages is not None and hugepages not in HUGEPAGES:
        raise ConfigError(f"{what}: hugepages must be one of {', '.join(HUGEPAGES)} (or none), "
                          f"got {hugepages!r}")
