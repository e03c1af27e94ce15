"""Does a booted Linux guest see the machine numavm planned?

The guest's /init (see `initramfs`) reports what sysfs says: nodes, their
CPUs, MemTotal and distance rows, read into a `GuestReport`.
`compare_userspace()` holds that report against the plan (the `Layout`) and
returns one line per difference; `numavm check` and the QEMU oracle test both
use it.

Linux numbers its nodes by first appearance in the SRAT, processor entries
before memory entries, so node N is not necessarily proximity domain N.  The
comparison therefore takes the PXM -> node map explicitly: from the guest's
kernel log (`pxm_to_node_from_log`), or predicted from the SRAT bytes by
Linux's rule (`pxm_to_node_from_srat`); the two should agree.

MemTotal tolerance (`memory_bounds`)
------------------------------------
A node's MemTotal (its managed pages) is never more than its domain's size,
and is less by what the kernel keeps for itself on that node:

* the memory map: one 64-byte `struct page` per 4 KiB page, 1/64 of the
  node, allocated per 128 MiB section (2 MiB of map each) on the node that
  owns the section's first page -- so a small node may pay for a whole
  section, or for nothing.  Allowed: size/64 + 2 MiB.
* fixed per-node costs: pg_data_t (~170 KiB), page tables, early memblock
  allocations that go to the highest node (~3 MiB with 64 nodes), the
  first 1 MiB that x86 keeps.  Allowed: 8 MiB (`NODE_SLACK`), plus 512 KiB
  a vCPU of the domain for its per-CPU area (~250 KiB each measured).
* the kernel image: with ``nokaslr`` it sits at 16 MiB; Debian's 6.1 image is
  ~46 MiB (text, data, bss).  Allowed: the overlap of the node's RAM with the
  `KERNEL_WINDOW` [16 MiB, 80 MiB).
* swiotlb: when RAM reaches above 4 GiB, the kernel takes 64 MiB of bounce
  buffers as high as it can below 4 GiB, i.e. at the top of low RAM.
  Allowed: the overlap with [top of low RAM - 80 MiB, top of low RAM).

The tolerance is deliberately additive and per-range rather than a flat
percentage: it keeps a 32 MiB node honest (it must still show ~21 MiB
unless the kernel image sits on it; measured: 29-32 MiB) while letting the
node that holds the kernel or the bounce buffers lose what they cost.
Measured under QEMU with Debian's 6.1 kernel, what a node lost beyond its
memory map, the kernel image and swiotlb was at most ~3 MiB.

MemTotal alone cannot see a few MiB put in the wrong node, so the report's
``present_kb`` (pages the kernel found present in the node's ranges, from
/proc/zoneinfo) is held tighter: never above the domain's size and at most
`PRESENT_SLACK` (2 MiB) below it -- the e820 holes inside RAM: page 0, the
640 KiB-1 MiB hole, QEMU's 128 KiB of firmware tables at the top of low RAM.
"""

from __future__ import annotations

import re
import struct
from typing import Iterable, Mapping

from numavm.check.linux_numa import node_numbering
from numavm.check.report import GuestReport, parse_cpulist
from numavm.plan.layout import Layout
from numavm.spec import units

MiB = 1 << 20
GiB = 1 << 30
LOCAL_DISTANCE = 10

NODE_SLACK = 8 * MiB
CPU_SLACK = 512 * 1024
PRESENT_SLACK = 2 * MiB
MEMMAP_SECTION_SLACK = 2 * MiB
KERNEL_WINDOW = (16 * MiB, 80 * MiB)
SWIOTLB_SIZE = 64 * MiB
SWIOTLB_WINDOW = 80 * MiB  # below the top of low RAM: the buffers plus alignment and neighbours
FOUR_GIB = 4 * GiB


# ---------------------------------------------------------------- LIST syntax


format_cpulist = units.format_cpulist


# ---------------------------------------------------------------- PXM -> node


_PROC_LINE = re.compile(r"SRAT: PXM (\d+) -> (?:X2)?APIC 0x[0-9a-fA-F]+ -> Node (\d+)")
_MEM_LINE = re.compile(r"ACPI: SRAT: Node (\d+) PXM (\d+) \[mem")


def pxm_to_node_from_log(console_text: str) -> dict[int, int]:
    """The PXM -> node map in a Linux guest's kernel log.

    From ``SRAT: PXM P -> APIC 0xA -> Node N`` and ``ACPI: SRAT: Node N PXM P
    [mem ...]`` lines (printed at KERN_INFO/DEBUG: not on a ``quiet`` console,
    so numavm's /init copies them from dmesg).  Empty when there are none.
    """
    out: dict[int, int] = {}
    for m in _PROC_LINE.finditer(console_text):
        out.setdefault(int(m.group(1)), int(m.group(2)))
    for m in _MEM_LINE.finditer(console_text):
        out.setdefault(int(m.group(2)), int(m.group(1)))
    return out


def pxm_to_node_from_srat(srat: bytes) -> dict[int, int]:
    """The PXM -> node map Linux (x86) will make of an SRAT.

    Linux walks the processor entries (local APIC and x2APIC affinity) and the
    generic initiator entries, in table order, before the memory entries, and
    gives each proximity domain the next node number the first time an enabled
    entry names it.
    """
    procs: list[int] = []
    mems: list[int] = []
    pos = 48  # 36-byte header + 4 reserved + 8 reserved
    while pos + 2 <= len(srat):
        kind, length = srat[pos], srat[pos + 1]
        if length < 2:
            break
        e = srat[pos:pos + length]
        if kind == 0 and length >= 16:  # processor local APIC/SAPIC affinity
            flags, = struct.unpack_from("<I", e, 4)
            if flags & 1:
                procs.append(e[2] | e[9] << 8 | e[10] << 16 | e[11] << 24)
        elif kind == 2 and length >= 24:  # processor local x2APIC affinity
            pxm, _, flags = struct.unpack_from("<III", e, 4)
            if flags & 1:
                procs.append(pxm)
        elif kind == 5 and length >= 32:  # generic initiator affinity
            pxm, = struct.unpack_from("<I", e, 4)
            flags, = struct.unpack_from("<I", e, 24)
            if flags & 1:
                procs.append(pxm)
        elif kind == 1 and length >= 40:  # memory affinity
            pxm, = struct.unpack_from("<I", e, 2)
            size, = struct.unpack_from("<Q", e, 16)
            flags, = struct.unpack_from("<I", e, 28)
            if flags & 1 and size:
                mems.append(pxm)
        pos += length
    out: dict[int, int] = {}
    for pxm in procs + mems:
        if pxm not in out:
            out[pxm] = len(out)
    return out


def guest_pxm_to_node(layout: Layout, from_log: Mapping[int, int], report: GuestReport) -> dict[int, int]:
    """The guest's PXM -> node map: its log's, completed from its sysfs.

    Linux 6.12+ logs a PXM only with its memory ranges, so a CPU-only domain's
    node shows only where its vCPUs landed: the node holding every APIC id the
    plan gives that domain (none added when they are split or missing).
    """
    out = dict(from_log)
    a2n = report.apic_to_node()
    for d in layout.domains:
        if d.id in out or not d.apic_ids:
            continue
        nodes = {a2n.get(a) for a in d.apic_ids}
        if len(nodes) == 1 and None not in nodes:
            out[d.id] = nodes.pop()  # type: ignore[assignment]
    # A domain with only a generic initiator is in no log line (Linux logs its SRAT entry at debug
    # level): it is the node Linux's rule gives it when the guest lists that node among its
    # generic initiators and the node has neither CPUs nor memory; the distance rows and the
    # devices' numa_node are then held against that.
    gis = report.generic_initiator_nodes or frozenset()
    rule = pxm_to_node_from_plan(layout)
    for d in layout.domains:
        if d.id in out or d.apic_ids or d.ranges or d.id not in layout.topology.initiators:
            continue
        node = rule.get(d.id)
        n = report.nodes.get(node) if node is not None else None
        if node in gis and n is not None and not n.cpus and not n.memtotal_kb and node not in out.values():
            out[d.id] = node  # type: ignore[assignment]
    return out


def pxm_to_node_from_plan(layout: Layout) -> dict[int, int]:
    """The map for numavm's own SRAT order (domains with vCPUs by id, then those with only a
    generic initiator, then memory-only ones)."""
    if not layout.topology.numa:
        return {0: 0}
    gis = layout.topology.initiators
    return node_numbering((d.id, bool(d.domain.cpus), bool(d.segment_size), d.id in gis)
                          for d in layout.domains)


# ---------------------------------------------------------------- memory bounds


def _overlap(ranges: Iterable[tuple[int, int]], lo: int, hi: int) -> int:
    return sum(max(0, min(e, hi) - max(s, lo)) for s, e in ranges)


def memory_bounds(layout: Layout) -> dict[int, tuple[int, int, list[str]]]:
    """{domain id: (lowest, highest acceptable MemTotal in kB, what the allowance is made of)}."""
    ranges = {d.id: [(r.start, r.end) for r in d.ranges] for d in layout.domains}
    low_top = max((e for rs in ranges.values() for _, e in rs if e <= FOUR_GIB), default=0)
    high_ram = any(e > FOUR_GIB for rs in ranges.values() for _, e in rs)
    out: dict[int, tuple[int, int, list[str]]] = {}
    for d in layout.domains:
        size = d.segment_size
        if size == 0:
            out[d.id] = (0, 0, ["CPU-only" if d.domain.cpus else "no memory"])
            continue
        parts = [("memmap", size // 64 + MEMMAP_SECTION_SLACK),
                 ("node", NODE_SLACK + CPU_SLACK * len(d.domain.cpus))]
        k = _overlap(ranges[d.id], *KERNEL_WINDOW)
        if k:
            parts.append(("kernel image", k))
        if high_ram:
            s = _overlap(ranges[d.id], max(0, low_top - SWIOTLB_WINDOW), low_top)
            if s:
                parts.append(("swiotlb", min(s, SWIOTLB_WINDOW)))
        allowance = sum(v for _, v in parts)
        lo = max(0, size - allowance) // 1024
        out[d.id] = (lo, size // 1024, [f"{n} {v // 1024} kB" for n, v in parts])
    return out


# ---------------------------------------------------------------- the comparison


def compare_userspace(layout: Layout, report: GuestReport, pxm_to_node: Mapping[int, int] | None) -> list[str]:
    """Differences between the plan and the guest's report; an empty list means they match.

    `pxm_to_node` maps proximity domains (numavm's domain ids) to the guest's
    node numbers; None or empty means the identity map for the classic machine
    and Linux's SRAT rule (`pxm_to_node_from_plan`) otherwise.  Checked: the
    set of nodes, each node's CPUs and their APIC ids, MemTotal within
    `memory_bounds`, the distance matrix (permuted by the map), and the online
    CPUs.
    """
    out: list[str] = []
    doms = sorted(layout.domains, key=lambda d: d.id)
    numa = layout.topology.numa
    if not numa:  # one domain, no SRAT: Linux fakes node 0
        pmap = {0: 0}
    else:
        pmap = dict(pxm_to_node) if pxm_to_node else pxm_to_node_from_plan(layout)
    nodes = report.nodes
    seen = set(nodes)
    want_nodes = {pmap[d.id] for d in doms if d.id in pmap}

    for d in doms:
        if d.id not in pmap:
            out.append(f"domain {d.id}: the guest mapped PXM {d.id} to no node")
    if len(want_nodes) != len([d for d in doms if d.id in pmap]):
        out.append(f"PXM -> node map is not one-to-one: {dict(sorted(pmap.items()))}")
    if seen != want_nodes:
        out.append(f"nodes: guest has {format_cpulist(seen) or 'none'} ({len(seen)}), "
                   f"plan wants {format_cpulist(want_nodes)} ({len(want_nodes)})")
    online = report.online_nodes
    if online is not None and parse_cpulist(online) != want_nodes:
        out.append(f"online nodes: guest {online!r}, plan wants {format_cpulist(want_nodes)!r}")

    all_cpus = set(range(layout.topology.cpus))
    online_cpus = report.online_cpus
    if online_cpus is not None and parse_cpulist(online_cpus) != all_cpus:
        out.append(f"online CPUs: guest {online_cpus!r}, plan wants {format_cpulist(all_cpus)!r}")

    apics = report.cpu_apic_ids
    if apics is None:
        out.append("the guest's report has no APIC ids (cpu_apic_ids)")

    bounds = memory_bounds(layout)
    for d in doms:
        node = pmap.get(d.id)
        if node is None:
            continue
        n = nodes.get(node)
        where = f"domain {d.id} (node {node})"
        if n is None:
            out.append(f"{where}: not in the guest's sysfs")
            continue
        cpus = n.cpus
        if cpus != set(d.domain.cpus):
            out.append(f"{where}: CPUs {format_cpulist(cpus) or 'none'}, plan wants "
                       f"{format_cpulist(d.domain.cpus) or 'none'}")
        if apics is not None:
            got = {apics.get(c) for c in cpus}
            if got != set(d.apic_ids):
                names = sorted(a for a in got if a is not None)
                out.append(f"{where}: APIC ids {format_cpulist(names) or 'none'}"
                           f"{' (some CPUs without one)' if None in got else ''}, plan wants "
                           f"{format_cpulist(d.apic_ids) or 'none'}")
        mt = n.memtotal_kb
        lo, hi, why = bounds[d.id]
        if mt is None:
            out.append(f"{where}: no MemTotal in the report")
        elif not lo <= mt <= hi:
            out.append(f"{where}: MemTotal {mt} kB, plan wants {lo}..{hi} kB "
                       f"(size {d.segment_size // 1024} kB less at most {', '.join(why)})")
        if n.present_kb is not None:
            plo = max(0, d.segment_size - PRESENT_SLACK) // 1024
            if not plo <= n.present_kb <= d.segment_size // 1024:
                out.append(f"{where}: {n.present_kb} kB present in the node's ranges, plan wants "
                           f"{plo}..{d.segment_size // 1024} kB")
        row = list(n.distance or ())
        if numa:
            want = layout.topology.distances[d.id]
            # the guest's row is indexed by node: put the plan's row in node order
            by_node = {pmap[j]: want[j] for j in range(len(want)) if j in pmap}
            want_row = [by_node.get(k) for k in range(len(row))] if len(row) == len(by_node) else None
            if want_row is None or want_row != row:
                exp = [by_node[k] for k in sorted(by_node)]
                out.append(f"{where}: distances {row}, plan wants {exp} (in node order)")
        elif n.distance is not None and row != [LOCAL_DISTANCE]:
            out.append(f"{where}: distances {row}, the classic machine wants [10]")
    return out


# ---------------------------------------------------------------- HMAT


# Linux's enum cache_indexing and enum cache_write_policy (include/linux/node.h), as sysfs prints them
CACHE_INDEXING = {"direct": 0, "complex": 1, "none": 2}
CACHE_WRITE_POLICY = {"writeback": 0, "writethrough": 1, "none": 2}


def compare_hmat(layout: Layout, report: GuestReport, pxm_to_node: Mapping[int, int],
                 version: tuple[int, int] | None) -> tuple[list[str], list[str]]:
    """(mismatches, notes): the plan's HMAT against the guest's sysfs.

    Every memory node's access0 and access1 figures and initiator links
    (`linux_numa.hmat_access`), each memory-side cache, and, where the guest
    kernel has memory tiers, each memory node's tier (`linux_numa.memory_tiers`:
    from HMAT figures on 6.10+).  Without HMAT figures the guest must show no
    access classes at all.
    """
    from numavm.check.linux_numa import HMAT_TIERS_FROM, hmat_access, memory_tiers
    from numavm.plan.render import hmat_links

    topo = layout.topology
    links, caches = hmat_links(topo), topo.caches
    nodes = report.nodes
    mems = [d.id for d in topo.domains if d.size]
    cpus = [d.id for d in topo.domains if d.cpus]
    bad: list[str] = []
    notes: list[str] = []
    if not topo.numa:
        return bad, notes
    if not (links or caches):
        with_access = sorted(n for n, v in nodes.items() if v.access)
        if with_access:
            bad.append(f"HMAT: the plan has none, but the guest reports access classes for node(s) {with_access}")
    else:
        access = hmat_access(links, mems, cpus)
        for t in mems:
            node = pxm_to_node.get(t)
            if node is None:
                continue
            seen = nodes[node].access if node in nodes else {}
            for a in (0, 1):
                want = dict(access[t][a])
                want["initiators"] = tuple(sorted(pxm_to_node[i] for i in want["initiators"] if i in pxm_to_node))
                got = seen.get(a)
                where = f"domain {t} (node {node}) access{a}"
                if got is None:
                    bad.append(f"{where}: not in the guest's sysfs (nodeN/access{a}/initiators)")
                    continue
                for key, v in want.items():
                    g = getattr(got, key)
                    if g != v:
                        unit = " ns" if key.endswith("latency") else " MB/s" if key.endswith("bandwidth") else ""
                        shown = list(g) if key == "initiators" else g
                        bad.append(f"{where} {key}: guest {shown}{unit if g is not None else ''}, plan wants "
                                   f"{list(v) if key == 'initiators' else v}{unit}")
        for c in caches:
            node = pxm_to_node.get(c.domain)
            if node is None:
                continue
            where = f"domain {c.domain} (node {node}) memory-side cache level {c.level}"
            got_c = nodes[node].memory_side_cache.get(c.level) if node in nodes else None
            if got_c is None:
                bad.append(f"{where}: not in the guest's sysfs (memory_side_cache/index{c.level})")
                continue
            want_c = {"size": c.size, "line_size": c.line, "indexing": CACHE_INDEXING[c.assoc],
                      "write_policy": CACHE_WRITE_POLICY[c.policy]}
            for key, v in want_c.items():
                if getattr(got_c, key) != v:
                    bad.append(f"{where} {key}: guest {getattr(got_c, key)}, plan wants {v}")
        for n, gn in sorted(nodes.items()):
            for lvl in sorted(gn.memory_side_cache):
                dom = next((p for p, x in pxm_to_node.items() if x == n), None)
                if not any(c.domain == dom and c.level == lvl for c in caches):
                    bad.append(f"node {n}: the guest reports a memory-side cache at level {lvl} the plan lacks")
    if report.memory_tiers is None:
        if version is not None and version >= (6, 1):
            bad.append("memory tiers: the guest's report has none (/sys/devices/virtual/memory_tiering)")
        else:
            notes.append("memory tiers: this guest kernel reports none (Linux 6.1+ does)")
        return bad, notes
    access = hmat_access(links, mems, cpus) if links else {}
    want_tiers = memory_tiers(access, mems, cpus, version)
    got_tier = {node: tier for tier, members in report.memory_tiers.items() for node in members}
    for d in mems:
        node = pxm_to_node.get(d)
        if node is None:
            continue
        if got_tier.get(node) != want_tiers[d]:
            bad.append(f"domain {d} (node {node}): memory tier {got_tier.get(node)}, plan wants {want_tiers[d]}"
                       f"{'' if version is None or version >= HMAT_TIERS_FROM else ' (before 6.10 every node is DRAM)'}")
    return bad, notes


# ---------------------------------------------------------------- PCI devices


def disk_sectors(path: str) -> int | None:
    """The disk's size in 512-byte sectors as the device model reports it (the image's size,
    rounded down), or None when the host cannot say (then the size is not compared)."""
    import os

    try:
        return os.stat(path).st_size // 512
    except OSError:
        return None


def expected_device_nodes(layout: Layout, pxm_to_node: Mapping[int, int]) -> dict[str, int | None]:
    """{device address: the node its numa_node must show}: its domain through Linux's numbering;
    -1 without NUMA (no _PXM); None when the domain has no node in the map."""
    if not layout.topology.numa:
        return {dev.bdf: -1 for dev in layout.pci.devices}
    return {dev.bdf: pxm_to_node.get(dev.domain) for dev in layout.pci.devices}


def compare_devices(layout: Layout, report: GuestReport, pxm_to_node: Mapping[int, int] | None) -> list[str]:
    """The plan's PCI devices against the guest's report: each device at its address with
    virtio-blk's modern ids (1af4:1042; QEMU's transitional device, 1af4:1001, is not it), on
    its domain's node, one virtio disk of the image's size with 512-byte logical blocks,
    read-only exactly when the plan's disk is; every module /init loaded; the generic initiator
    nodes.  A machine without devices is checked only for having no generic initiator node."""
    # The class is reported, not compared: QEMU's virtio-blk-pci says 0x010000 (SCSI), numavm's 0x018000.
    from numavm.plan.pci import VIRTIO_BLK, VIRTIO_IDS, VIRTIO_PCI_DEVICE_BASE, VIRTIO_VENDOR

    out: list[str] = []
    topo = layout.topology
    pmap = dict(pxm_to_node) if pxm_to_node else pxm_to_node_from_plan(layout)
    for name, st in sorted((report.modules or {}).items()):
        if st != 0:
            out.append(f"module {name}: insmod failed in the guest (status {st})")
    want_gi = {pmap[d] for d in topo.initiators if d in pmap}
    got_gi = report.generic_initiator_nodes
    if got_gi is None:
        if topo.initiators:
            out.append("generic initiators: the guest's report has no has_generic_initiator list "
                       "(Linux 5.10+ has /sys/devices/system/node/has_generic_initiator)")
    elif set(got_gi) != want_gi:
        out.append(f"generic initiator nodes: guest {format_cpulist(got_gi) or 'none'}, plan wants "
                   f"{format_cpulist(want_gi) or 'none'}")
    if not layout.pci:
        return out
    if report.pci is None:
        out.append("the guest's report has no PCI devices (pci)")
        return out
    nodes = expected_device_nodes(layout, pmap)
    # the disks, by their own index: a run's 9p shares (KVM engine) are PCI functions too, with
    # no disk to compare them with; their node and ids are the same bridge's and transport's
    for dev in layout.pci.of_kind(VIRTIO_BLK):
        disk = topo.disks[dev.index]
        where = f"disk {dev.index} ({dev.bdf}, domain {dev.domain})"
        got = report.pci.get(dev.bdf)
        if got is None:
            out.append(f"{where}: not among the guest's PCI devices "
                       f"({', '.join(sorted(a for a in report.pci if not a.startswith('0000:00:'))) or 'none off bus 0'})")
            continue
        want_ids = (VIRTIO_VENDOR, VIRTIO_PCI_DEVICE_BASE + VIRTIO_IDS[dev.kind])
        if (got.vendor, got.device) != want_ids:
            out.append(f"{where}: ids {_ids(got.vendor, got.device)}, plan wants {_ids(*want_ids)}")
        want_node = nodes[dev.bdf]
        if want_node is None:
            out.append(f"{where}: domain {dev.domain} has no node in the guest's numbering")
        elif got.numa_node != want_node:
            out.append(f"{where}: numa_node {got.numa_node}, plan wants {want_node}"
                       f"{'' if want_node < 0 else f' (domain {dev.domain})'}")
        if len(got.block) != 1:
            out.append(f"{where}: {len(got.block)} block devices ({', '.join(b.name for b in got.block) or 'none'}), "
                       f"plan wants one (virtio_blk not loaded?)")
            continue
        # Its name (vda...) is reported, not compared: virtio_blk names disks in PCI probe order,
        # which follows the host bridges' order in the DSDT (numavm's: by bus; QEMU's pxb
        # bridges came in reverse under the TCG engine).
        b = got.block[0]
        if not b.name.startswith("vd"):
            out.append(f"{where}: block device {b.name!r}, plan wants a virtio disk (vd...)")
        sectors = disk_sectors(disk.path)
        if sectors is not None and b.sectors != sectors:
            out.append(f"{where}: {b.sectors} sectors, the image {disk.path} has {sectors}")
        if b.logical_block_size != 512:
            out.append(f"{where}: logical block size {b.logical_block_size}, plan wants 512")
        if b.ro is not None and b.ro != disk.readonly:
            out.append(f"{where}: the guest's {b.name} is {'read-only' if b.ro else 'writable'}, plan wants "
                       f"{'read-only' if disk.readonly else 'writable'}")
    return out


def _ids(vendor: int | None, device: int | None) -> str:
    return f"{vendor if vendor is None else f'{vendor:04x}'}:{device if device is None else f'{device:04x}'}"
