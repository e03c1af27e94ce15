"""Where guest memory really is: /proc/self/numa_maps, and move_pages(2) where it must.

A `Placement` is the kernel's policy for a range and its resident pages per
host node; `range_placements` reads them for ranges of this process's memory.
"""
from __future__ import annotations

import array
import collections
import ctypes
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from numavm.host import libc as _libc
from numavm.host.libc import HostError
from numavm.spec.policy import Mode, Policy
from numavm.spec.units import GiB, KiB, MiB, parse_cpulist

NUMA_MAPS = Path("/proc/self/numa_maps")
MAPS = Path("/proc/self/maps")
MOVE_PAGES_BATCH = 65536  # pages per call: 512 KiB of addresses

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
        nodes = parse_cpulist(nodes_text, "numa_maps nodes") if nodes_text else ()
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


# mincore's vector -> b"\x01" per resident page, b"\x00" otherwise; runs of b"\x01"
_RESIDENT = bytes(i & 1 for i in range(256))
_RUN = re.compile(rb"\x01+")


def resident_runs(addr: int, size: int, page: int) -> Iterator[tuple[int, int]]:
    """(first page, page count) of each run of resident pages in [addr, addr + size), by
    mincore(2); the runs are found by the regex engine, not by a Python loop per page."""
    vec = ctypes.create_string_buffer(size // page)
    _libc.mincore(addr, size, vec)
    for m in _RUN.finditer(vec.raw.translate(_RESIDENT)):
        yield m.start(), m.end() - m.start()


def pages_per_node(addr: int, size: int, page_size: int = mmap.PAGESIZE) -> dict[int, int]:
    """Pages of [addr, addr+size) mapped in this process, per host node.

    move_pages(2) with no target nodes only reports each page's node; pages
    not mapped here (never touched, or touched only by another process) are
    not counted, as in numa_maps.  One call per batch of pages, not per page,
    and with base pages only over what mincore(2) reports resident: a guest
    that touched little of a large range costs little.
    """
    counts: collections.Counter[int] = collections.Counter()
    step = MOVE_PAGES_BATCH * page_size
    if page_size == mmap.PAGESIZE:
        spans = [(addr + first * page_size, addr + (first + n) * page_size)
                 for first, n in resident_runs(addr, size, page_size)]
    else:  # mincore counts base pages; huge pages are few enough to ask about all
        spans = [(addr, addr + size)]
    for lo, hi in spans:
        for start in range(lo, hi, step):
            _node_counts(counts, array.array("Q", range(start, min(start + step, hi), page_size)))
    return {n: c for n, c in sorted(counts.items()) if n >= 0}


def _node_counts(counts: collections.Counter[int], pages: array.array) -> None:
    """Add the node of each page at the addresses `pages` (one move_pages(2) call) to `counts`."""
    status = array.array("i", bytes(4 * len(pages)))
    try:
        _libc.move_pages(0, len(pages), pages.buffer_info()[0], None, status.buffer_info()[0], 0)
    except HostError as e:
        raise _libc.rewrap(e, f"move_pages({pages[0]:#x}, {len(pages)} pages)") from None
    counts.update(status)  # a node, or -ENOENT / -EFAULT for a page not mapped


def _human(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n} B"
