"""What a Linux guest makes of our tables, and what its kernel log says it made.

`expected_view` predicts, from the plan, what Linux will report: it numbers
nodes by first appearance in the SRAT (processor and generic initiator entries,
in table order, before memory entries), merges each node's ranges, and orders each node's
zonelist fallback by distance with the kernel's tie-breaks
(mm/page_alloc.c: find_next_best_node).  `parse_kernel_log` reads the same
facts back from the guest's console, and `compare_kernel` lists every
difference.  The kernel stage of `numavm check` is these three.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from numavm.plan.layout import Layout

# Linux 6.12 (commit 830a0d12943f, "x86/mm: Don't print out SRAT table information") prints the
# SRAT's processor entries ("SRAT: PXM P -> APIC 0xA -> Node N") with pr_debug, so from then on
# the boot log names a PXM only with its memory ranges and no APIC id at all; sysfs and
# /proc/cpuinfo still have the APIC -> node map (numavm's /init reports them).
CPU_AFFINITY_UNLOGGED_FROM = (6, 12)
# Linux 6.7 ("mm: page_alloc: skip memoryless nodes entirely") leaves a memoryless node out of
# its own zonelist: 6.1 logs "Fallback order for Node 0: 0 1 2" for a memoryless node 0, 6.12
# "Fallback order for Node 0: 1 2".
MEMORYLESS_LOCAL_SKIPPED_FROM = (6, 7)

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
    version: tuple[int, int] | None = None  # the kernel's (major, minor), from "Linux version"

    @property
    def logs_cpu_affinity(self) -> bool:
        """Whether this kernel logs the SRAT's processor entries (unknown version: assume so)."""
        return bool(self.apic_to_node) or self.version is None or self.version < CPU_AFFINITY_UNLOGGED_FROM

    @property
    def numa_ready(self) -> bool:
        """True once the kernel has printed its zonelists: NUMA setup is done."""
        return self.zonelists is not None


def node_numbering(domains: Iterable[tuple[int, bool, bool] | tuple[int, bool, bool, bool]]) -> dict[int, int]:
    """PXM -> node for (domain id, has vCPUs, has memory[, has a generic initiator]) tuples.

    Linux (acpi_numa_init) numbers nodes by first appearance in the SRAT: one pass over the
    processor, x2APIC and generic initiator entries in table order, then one over the memory
    entries.  numavm's SRAT lists processors by domain id, then the initiators, then memory
    (numavm.plan.acpi.tables.build_srat), so: domains with vCPUs in id order, then domains
    with a generic initiator but no vCPUs in id order, then memory-only domains in id order.
    A domain with only a generic initiator is a node with neither CPUs nor memory (online, in
    /sys/devices/system/node/has_generic_initiator).
    """
    doms = sorted((t[0], t[1], t[2], len(t) > 3 and bool(t[3])) for t in domains)  # type: ignore[misc]
    order = ([i for i, cpus, _, _ in doms if cpus] + [i for i, cpus, _, gi in doms if not cpus and gi]
             + [i for i, cpus, mem, gi in doms if not cpus and not gi and mem])
    return {pxm: node for node, pxm in enumerate(order)}


def expected_pxm_to_node(layout: Layout) -> dict[int, int]:
    gis = layout.topology.initiators
    return node_numbering((d.id, bool(d.apic_ids), bool(d.ranges), d.id in gis) for d in layout.domains)


def generic_initiator_nodes(layout: Layout) -> frozenset[int]:
    """The nodes Linux lists in /sys/devices/system/node/has_generic_initiator."""
    p2n = expected_pxm_to_node(layout)
    return frozenset(p2n[d] for d in layout.topology.initiators if d in p2n)


def fallback_order(distances: list[list[int]], with_memory: set[int],
                   skip_memoryless_local: bool = False) -> dict[int, list[int]]:
    """Each node's zonelist order, as Linux (5.19+) build_zonelists computes it.

    `node_load` is shared across nodes, as in the kernel, so earlier nodes'
    choices break later ties.  `skip_memoryless_local`: Linux 6.7+, where a
    memoryless node does not head its own list (see MEMORYLESS_LOCAL_SKIPPED_FROM).
    """
    n = len(distances)
    load = [0] * n
    out: dict[int, list[int]] = {}
    for local in range(n):
        used: set[int] = set()
        order: list[int] = []
        prev = local
        while True:
            if local not in used and (local in with_memory or not skip_memoryless_local):
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
            order.append(best)  # before 6.7 the local node comes first even when memoryless
            prev = best
        out[local] = order
    return out


def expected_view(layout: Layout, version: tuple[int, int] | None = None) -> KernelView:
    """The KernelView a correct guest kernel prints for this plan (node numbering included);
    `version`: the guest kernel's (major, minor), where its behaviour changed (None: 6.1's)."""
    p2n = expected_pxm_to_node(layout)
    v = KernelView(pxm_to_node=p2n)
    for d in layout.domains:
        node = p2n.get(d.id)
        if node is None:
            continue  # a domain with neither vCPUs, memory nor an initiator cannot exist (topology forbids it)
        for apic in d.apic_ids:
            v.apic_to_node[apic] = node
        if d.ranges:
            v.srat_ranges[node] = [(r.start, r.end) for r in d.ranges]
    n = len(p2n)
    node_to_pxm = {node: pxm for pxm, node in p2n.items()}
    dist = [[layout.topology.distances[node_to_pxm[i]][node_to_pxm[j]] for j in range(n)] for i in range(n)]
    with_mem = {p2n[d.id] for d in layout.domains if d.ranges}
    v.fallback = fallback_order(dist, with_mem, version is not None and version >= MEMORYLESS_LOCAL_SKIPPED_FROM)
    v.zonelists = n
    return v


_RE = {
    "pxm_apic": re.compile(r"SRAT: PXM (\d+) -> (?:X2)?APIC 0x([0-9a-f]+) -> Node (\d+)"),
    "srat_mem": re.compile(r"ACPI: SRAT: Node (\d+) PXM (\d+) \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]"),
    "initmem": re.compile(r"Initmem setup node (\d+) \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]"),
    "fallback": re.compile(r"Fallback order for Node (\d+): ([\d ]*)"),
    "zonelists": re.compile(r"Built (\d+) zonelists"),
    "version": re.compile(r"Linux version (\d+)\.(\d+)"),
    "llc": re.compile(r"llc-sibling CPU #\d+ is not on the same node.*|sched: CPU #\d+'s .* is not on the same node.*"
                     # APIC ids >= 255 need the guest in x2APIC mode with KVM's extended
                     # destination ids (numavm's KVM engine gives both); without it Linux
                     # drops those vCPUs:
                     r"|SRAT: PXM \d+ -> X2APIC 0x[0-9a-f]+ ignored"),
    "numa_off": re.compile(r"(NUMA: nodes only cover .*|No NUMA configuration found|SRAT: .*(?:invalid|bad|Not used).*|"
                           r"NUMA: Warning: invalid .*|ACPI: SLIT: .*invalid.*|NUMA turned off)"),
}


# A console message the kernel printed in the middle of another line (the guest's dmesg copy
# shares the console with live printk), as CI saw: "Initmem setup node 0 [mem 0x000000000[
# 21.202320] hrtimer: interrupt took 23926354 ns\n0001000-0x000000001fffffff]".
# One at a time: a message may split the "numavm-dmesg: " prefix itself ("numavm-dmes[ 20.02]
# hrtimer: ...\ng: [ 0.05] ACPI: SRAT: Node 1 ..."), and only once it is out does the rest
# of the line read as the copy it is rather than as another message.
_INJECTED = re.compile(r"(?<=[^\n])(?<!numavm-dmesg: )\[ *\d+\.\d+\] [^\n]*\n")


def _without_injected(text: str) -> str:
    pos = 0
    while m := _INJECTED.search(text, pos):  # the lookbehind sees the text as rejoined so far
        text = text[:m.start()] + text[m.end():]
        pos = m.start()
    return text


def parse_kernel_log(text: str) -> KernelView:
    v = KernelView()
    for line in _without_injected(text).splitlines():
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
        elif v.version is None and (m := _RE["version"].search(line)):
            v.version = (int(m[1]), int(m[2]))
    return v


def kernel_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release string such as uname -r prints (6.12.118+deb13-amd64)."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m[1]), int(m[2])) if m else None


def unlogged(expected: KernelView, seen: KernelView) -> list[str]:
    """The expected facts `seen`'s kernel version does not log (so `compare_kernel` skips them)."""
    if seen.logs_cpu_affinity or not expected.apic_to_node:
        return []
    return [f"APIC->node: Linux {seen.version[0]}.{seen.version[1]} does not log the SRAT's "  # type: ignore[index]
            "processor entries (6.12 made them debug messages); the userspace stage reads "
            "it from the guest's sysfs and /proc/cpuinfo"]


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
    want_p2n = expected.pxm_to_node
    if not seen.logs_cpu_affinity:  # only domains with memory get a log line (see `unlogged`)
        want_p2n = {p: n for p, n in want_p2n.items() if n in expected.srat_ranges}
    else:  # a generic initiator's entry is logged at debug level only: a domain with neither
        # vCPUs nor memory has no line (its node shows in the zonelists and in sysfs)
        logged = set(expected.srat_ranges) | set(expected.apic_to_node.values())
        want_p2n = {p: n for p, n in want_p2n.items() if n in logged}
    if seen.pxm_to_node != want_p2n:
        bad.append(f"domain->node numbering: expected {want_p2n}, guest {seen.pxm_to_node}")
    if seen.logs_cpu_affinity and seen.apic_to_node != expected.apic_to_node:
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


# ---------------------------------------------------------------- HMAT: access classes and memory tiers

# drivers/acpi/numa/hmat.c walks the locality types in this order (enum locality_types) when it
# picks a target's best initiators; the order matters, each type narrowing the candidates.
HMAT_WALK = ("write_latency", "read_latency", "write_bandwidth", "read_bandwidth")
HMAT_TIERS_FROM = (6, 10)  # "memory tier: create CPUless memory tiers after obtaining HMAT info"
MEMORY_TIERS_FROM = (6, 1)  # mm/memory-tiers.c and /sys/devices/virtual/memory_tiering
MEMTIER_CHUNK_BITS = 7
MEMTIER_ADISTANCE_DRAM = (4 << MEMTIER_CHUNK_BITS) + (1 << (MEMTIER_CHUNK_BITS - 1))  # 576: tier 4
_U32 = 0xFFFF_FFFF


def _better(attr: str, value: int, best: int) -> bool:
    """hmat_update_best: a value of 0 is "none"; lower latency, higher bandwidth wins."""
    if not value:
        return False
    return not best or (value < best if attr.endswith("latency") else value > best)


def hmat_access(links: list[dict[str, Any]], targets: Iterable[int], cpu_domains: Iterable[int]
                ) -> dict[int, dict[int, dict[str, Any]]]:
    """{target domain: {access class: {read_latency..write_bandwidth, "initiators": [domains]}}}.

    What Linux (hmat.c, __hmat_register_target_initiators) reports in
    nodeN/access0 (every initiator) and access1 (initiators with CPUs) for an
    HMAT that names no attached initiator: candidates are the tables'
    initiators, sorted; each locality type in `HMAT_WALK` order keeps only the
    candidates with that type's best value (a better one drops every lower
    numbered candidate, a worse or missing one drops itself), and the target
    reports each type's best among the candidates left at that point.
    `links`: the plan document's ``hmat.links``.
    """
    cpus = set(cpu_domains)
    inits = sorted({lk["initiator"] for lk in links})
    value = {(lk["initiator"], lk["target"], a): lk.get(a) or 0 for lk in links for a in HMAT_WALK}
    present = [a for a in HMAT_WALK if any(lk.get(a) for lk in links)]
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for t in sorted(targets):
        out[t] = {}
        for access in (0, 1):
            cand = set(inits)
            attrs: dict[str, Any] = {a: 0 for a in ("read_latency", "write_latency", "read_bandwidth",
                                                    "write_bandwidth")}
            for a in present:
                best = 0
                for i in inits:
                    if access == 1 and i not in cpus:
                        cand.discard(i)
                        continue
                    if i not in cand:
                        continue
                    v = value.get((i, t, a), 0)
                    if _better(a, v, best):
                        best = v
                        cand = {c for c in cand if c >= i}
                    if v != best:
                        cand.discard(i)
                attrs[a] = best
            attrs["initiators"] = sorted(cand) if present else []  # no localities: no links
            out[t][access] = attrs
    return out


def memory_tiers(access: dict[int, dict[int, dict[str, Any]]], memory_domains: Iterable[int],
                 cpu_domains: Iterable[int], version: tuple[int, int] | None) -> dict[int, int]:
    """{domain with memory: memory tier id} as mm/memory-tiers.c sets them at boot.

    Nodes with CPUs are DRAM (tier 4, abstract distance 576).  From 6.10 a
    CPU-less node's abstract distance comes from its access1 figures against
    the DRAM nodes' (`mt_perf_to_adistance`, in the kernel's 32-bit unsigned
    arithmetic), unless a DRAM node lacks figures or differs from the first by
    more than 10%, or the node itself lacks figures; before 6.10 every node is DRAM.  The tier is the distance
    in chunks of 128.
    """
    cpus = set(cpu_domains)
    dram_tier = MEMTIER_ADISTANCE_DRAM >> MEMTIER_CHUNK_BITS
    mems = sorted(memory_domains)
    tiers = {d: dram_tier for d in mems}
    if version is None or version < HMAT_TIERS_FROM:
        return tiers
    ref: dict[str, int] | None = None
    # hmat_set_default_dram_perf: each DRAM node in node order goes to mt_set_default_dram_perf, and
    # the first refusal (no figures, or >10% off the first node's) leaves HMAT's abstract distance
    # algorithm unregistered: every node stays DRAM.
    for d in (d for d in mems if d in cpus):
        p = access.get(d, {}).get(1)
        if p is None or not (p["read_latency"] + p["write_latency"]) or \
                not (p["read_bandwidth"] + p["write_bandwidth"]):
            return tiers
        if ref is None:
            ref = p
        elif any(abs(p[a] - ref[a]) * 10 > ref[a] for a in HMAT_WALK):
            return tiers  # "performance of DRAM node ... mismatches": no HMAT-based distances
    if ref is None:
        return tiers
    for d in (d for d in mems if d not in cpus):
        p = access.get(d, {}).get(1)
        if p is None:
            continue
        lat, bw = p["read_latency"] + p["write_latency"], p["read_bandwidth"] + p["write_bandwidth"]
        if not lat or not bw:
            continue
        adist = (MEMTIER_ADISTANCE_DRAM * lat) & _U32
        adist //= ref["read_latency"] + ref["write_latency"]
        adist = (adist * (ref["read_bandwidth"] + ref["write_bandwidth"])) & _U32
        adist //= bw
        tiers[d] = adist >> MEMTIER_CHUNK_BITS
    return tiers
