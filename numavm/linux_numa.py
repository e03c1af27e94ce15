"""What a Linux guest makes of our tables, and what its kernel log says it made.

`expected_view` predicts, from the plan, what Linux will report: it numbers
nodes by first appearance in the SRAT (processor entries, in vCPU order,
before memory entries), merges each node's ranges, and orders each node's
zonelist fallback by distance with the kernel's tie-breaks
(mm/page_alloc.c: find_next_best_node).  `parse_kernel_log` reads the same
facts back from the guest's console, and `compare_kernel` lists every
difference.  The kernel stage of `numavm check` is these three.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from .layout import Layout

# find_next_best_node's constants (Debian's kernels: CONFIG_NODES_SHIFT=10).
MAX_NUMNODES = 1 << 10
# find_next_best_node also penalises nodes with CPUs (PENALTY_FOR_NODE_WITH_CPUS), but at boot
# the zonelists are built before any CPU is added to its node's cpumask, so the penalty never
# applies then: a 256-node guest (4 nodes with CPUs, equal distances) ordered every node it logged
# by id, CPU nodes included.


@dataclass
class KernelView:
    """The NUMA facts a guest kernel prints while it boots."""

    pxm_to_node: dict[int, int] = field(default_factory=dict)
    apic_to_node: dict[int, int] = field(default_factory=dict)
    srat_ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # node -> [start, end)
    initmem: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> [start, end)
    fallback: dict[int, list[int]] = field(default_factory=dict)
    zonelists: int | None = None
    warnings: list[str] = field(default_factory=list)
    numa_off: str | None = None  # why Linux fell back to one node, if it did

    @property
    def numa_ready(self) -> bool:
        """True once the kernel has printed its zonelists: NUMA setup is done."""
        return self.zonelists is not None


def node_numbering(domains: Iterable[tuple[int, bool, bool]]) -> dict[int, int]:
    """PXM -> node for (domain id, has vCPUs, has memory) triples.

    Linux numbers nodes by first appearance in the SRAT, processor entries
    first; ours list processors by domain id, so domains with vCPUs come
    first in id order, then memory-only domains in id order.
    """
    doms = sorted(domains)
    order = [i for i, cpus, _ in doms if cpus] + [i for i, cpus, mem in doms if not cpus and mem]
    return {pxm: node for node, pxm in enumerate(order)}


def expected_pxm_to_node(layout: Layout) -> dict[int, int]:
    return node_numbering((d.id, bool(d.apic_ids), bool(d.ranges)) for d in layout.domains)


def fallback_order(distances: list[list[int]], with_memory: set[int]) -> dict[int, list[int]]:
    """Each node's zonelist order, as Linux (5.19+) build_zonelists computes it.

    `node_load` is shared across nodes, as in the kernel, so earlier nodes'
    choices break later ties.
    """
    n = len(distances)
    load = [0] * n
    out: dict[int, list[int]] = {}
    for local in range(n):
        used: set[int] = set()
        order: list[int] = []
        prev = local
        while True:
            if local not in used:
                used.add(local)
                best = local
            else:
                best, best_val = -1, None
                for cand in sorted(with_memory):
                    if cand in used:
                        continue
                    val = distances[local][cand] + (cand < local)  # "prefer the next node"
                    val = val * MAX_NUMNODES + load[cand]
                    if best_val is None or val < best_val:
                        best, best_val = cand, val
                if best < 0:
                    break
                used.add(best)
            if distances[local][best] != distances[local][prev]:
                load[best] += 1  # round-robin among equally distant nodes
            order.append(best)  # the local node comes first even when memoryless
            prev = best
        out[local] = order
    return out


def expected_view(layout: Layout) -> KernelView:
    """The KernelView a correct guest kernel prints for this plan (node numbering included)."""
    p2n = expected_pxm_to_node(layout)
    v = KernelView(pxm_to_node=p2n)
    for d in layout.domains:
        node = p2n.get(d.id)
        if node is None:
            continue  # a domain with neither vCPUs nor memory cannot exist (topology forbids it)
        for apic in d.apic_ids:
            v.apic_to_node[apic] = node
        if d.ranges:
            v.srat_ranges[node] = [(r.start, r.end) for r in d.ranges]
    n = len(p2n)
    node_to_pxm = {node: pxm for pxm, node in p2n.items()}
    dist = [[layout.topology.distances[node_to_pxm[i]][node_to_pxm[j]] for j in range(n)] for i in range(n)]
    with_mem = {p2n[d.id] for d in layout.domains if d.ranges}
    v.fallback = fallback_order(dist, with_mem)
    v.zonelists = n
    return v


_RE = {
    "pxm_apic": re.compile(r"SRAT: PXM (\d+) -> (?:X2)?APIC 0x([0-9a-f]+) -> Node (\d+)"),
    "srat_mem": re.compile(r"ACPI: SRAT: Node (\d+) PXM (\d+) \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]"),
    "initmem": re.compile(r"Initmem setup node (\d+) \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]"),
    "fallback": re.compile(r"Fallback order for Node (\d+): ([\d ]*)"),
    "zonelists": re.compile(r"Built (\d+) zonelists"),
    "llc": re.compile(r"llc-sibling CPU #\d+ is not on the same node.*|sched: CPU #\d+'s .* is not on the same node.*"
                     # APIC ids >= 255 need the guest in x2APIC mode (interrupt remapping or KVM's
                     # extended destination ids); without it Linux drops those vCPUs:
                     r"|SRAT: PXM \d+ -> X2APIC 0x[0-9a-f]+ ignored"),
    "numa_off": re.compile(r"(NUMA: nodes only cover .*|No NUMA configuration found|SRAT: .*(?:invalid|bad|Not used).*|"
                           r"NUMA: Warning: invalid .*|ACPI: SLIT: .*invalid.*|NUMA turned off)"),
}


def parse_kernel_log(text: str) -> KernelView:
    v = KernelView()
    for line in text.splitlines():
        if m := _RE["pxm_apic"].search(line):
            pxm, apic, node = int(m[1]), int(m[2], 16), int(m[3])
            v.pxm_to_node.setdefault(pxm, node)
            v.apic_to_node[apic] = node
        elif m := _RE["srat_mem"].search(line):
            node, pxm = int(m[1]), int(m[2])
            v.pxm_to_node.setdefault(pxm, node)
            span = (int(m[3], 16), int(m[4], 16) + 1)
            ranges = v.srat_ranges.setdefault(node, [])
            if span not in ranges:  # the same log may reach the console twice (early and via dmesg)
                ranges.append(span)
        elif m := _RE["initmem"].search(line):
            v.initmem[int(m[1])] = (int(m[2], 16), int(m[3], 16) + 1)
        elif m := _RE["fallback"].search(line):
            v.fallback[int(m[1])] = [int(x) for x in m[2].split()]
        elif m := _RE["zonelists"].search(line):
            v.zonelists = int(m[1])
        elif m := _RE["llc"].search(line):
            v.warnings.append(m[0].strip())
        elif m := _RE["numa_off"].search(line):
            v.numa_off = v.numa_off or m[0].strip()
    return v


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def compare_kernel(expected: KernelView, seen: KernelView) -> list[str]:
    """Every difference between the predicted and the logged view, one line each."""
    bad: list[str] = []
    if seen.numa_off:
        bad.append(f"guest kernel rejected the NUMA tables: {seen.numa_off}")
    if not seen.numa_ready:
        bad.append("guest kernel did not reach its zonelists (NUMA setup not finished)")
    if seen.pxm_to_node != expected.pxm_to_node:
        bad.append(f"domain->node numbering: expected {expected.pxm_to_node}, guest {seen.pxm_to_node}")
    if seen.apic_to_node != expected.apic_to_node:
        bad.append(f"APIC->node: expected {expected.apic_to_node}, guest {seen.apic_to_node}")
    for node in sorted(set(expected.srat_ranges) | set(seen.srat_ranges)):
        want = _merge(expected.srat_ranges.get(node, []))
        got = _merge(seen.srat_ranges.get(node, []))
        if want != got:
            bad.append(f"node {node} SRAT ranges: expected {_fmt(want)}, guest {_fmt(got)}")
    for node, span in sorted(seen.initmem.items()):
        want = _merge(expected.srat_ranges.get(node, []))
        if not want or not (want[0][0] <= span[0] and span[1] <= want[-1][1]):
            bad.append(f"node {node} memory {_fmt([span])} lies outside its domain {_fmt(want)}")
    for node in sorted(expected.srat_ranges):
        if node not in seen.initmem and seen.numa_ready:
            bad.append(f"node {node} has memory in the SRAT but the guest set up none")
    if seen.zonelists is not None and seen.zonelists != expected.zonelists:
        bad.append(f"zonelists: expected {expected.zonelists}, guest built {seen.zonelists}")
    for node, order in sorted(seen.fallback.items()):
        if order != expected.fallback.get(node):
            bad.append(f"node {node} fallback order: expected {expected.fallback.get(node)}, guest {order}")
    if seen.numa_ready:
        missing = sorted(set(expected.fallback) - set(seen.fallback))
        if missing:
            bad.append(f"no fallback order in the guest log for node(s) {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}")
    bad.extend(f"guest warned: {w}" for w in seen.warnings)
    return bad


def _fmt(ranges: list[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{s:#x}-{e - 1:#x}" for s, e in ranges) + "]"
