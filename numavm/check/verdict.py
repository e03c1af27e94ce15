"""`numavm check`: boot the built-in guest and hold what it saw against the plan.

Stage `kernel` reads the guest kernel's own log (SRAT node ranges, APIC to
node, node count, zonelist fallback order, which must agree with the
distances); stage `userspace` adds the guest's sysfs view (CPUs and their
APIC ids, MemTotal and distances per node; each PCI device's node and disk,
the generic initiator nodes) reported by numavm's /init.
Linux 6.12+ no longer logs APIC to node: its kernel stage says so in
`notes`, and its userspace stage proves that fact (and the node of a
CPU-only domain) from sysfs alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from numavm.check.compare import (compare_devices, compare_hmat, compare_userspace, disk_sectors,
                                  expected_device_nodes, guest_pxm_to_node)
from numavm.check.linux_numa import (KernelView, compare_kernel, expected_view, hmat_access,
                                     memory_tiers, parse_kernel_log, unlogged)
from numavm.check.report import GuestReport
from numavm.guest.initramfs import parse_guest_report
from numavm.plan.layout import Layout
from numavm.plan.pci import VIRTIO_BLK
from numavm.plan.render import hmat_links, plan_document
from numavm.spec.units import format_list, format_size


@dataclass
class CheckReport:
    """The verdict and the values it was reached from: the plan, the guest kernel's log, and
    (stage userspace) the guest's own report with its PXM -> node map."""

    stage: str
    engine: str
    layout: Layout
    kernel: KernelView  # what the guest kernel logged
    guest: GuestReport | None = None  # what the guest's /init reported (stage userspace)
    pxm_to_node: dict[int, int] = field(default_factory=dict)  # the guest's: its log's, completed from sysfs
    mismatches: list[str] = field(default_factory=list)
    boot: str = ""  # how the boot ended
    notes: list[str] = field(default_factory=list)  # what this stage could not see, and why

    @property
    def match(self) -> bool:
        return not self.mismatches

    @property
    def expected(self) -> KernelView | None:
        """What Linux should make of the plan's tables (None: the classic machine, no SRAT)."""
        return expected_view(self.layout, self.kernel.version) if self.layout.topology.numa else None

    def document(self) -> dict[str, Any]:
        """`check --json`: the plan document, what was observed, the verdict.  Keys only get added."""
        observed: dict[str, Any] = {"kernel": _view_doc(self.kernel)}
        if self.guest is not None:
            observed["userspace"] = dict(
                self.guest.document, pxm_to_node={str(p): n for p, n in self.pxm_to_node.items()},
                apic_to_node={str(a): n for a, n in self.guest.apic_to_node().items()})
        doc = {"match": self.match, "stage": self.stage, "engine": self.engine, "boot": self.boot,
               "expected": plan_document(self.layout), "observed": observed, "mismatches": self.mismatches,
               "notes": self.notes}
        if self.layout.pci or self.layout.topology.initiators:
            doc["devices"] = self.devices()
        return doc

    def devices(self) -> dict[str, Any]:
        """Each device's node and disk, expected beside observed, and the generic initiator nodes."""
        exp = self.expected
        p2n = exp.pxm_to_node if exp is not None else {0: 0}
        want_nodes = expected_device_nodes(self.layout, p2n)
        pci = (self.guest.pci or {}) if self.guest is not None else {}
        rows = []
        for dev in self.layout.pci.of_kind(VIRTIO_BLK):  # disks only: a run's 9p shares have no disk
            disk = self.layout.topology.disks[dev.index]
            got = pci.get(dev.bdf)
            rows.append({"address": dev.bdf, "kind": dev.kind, "domain": dev.domain,
                         "node": {"expected": want_nodes[dev.bdf], "observed": got.numa_node if got else None},
                         "block": {"expected": {"sectors": disk_sectors(disk.path), "logical_block_size": 512,
                                                "ro": disk.readonly},
                                   "observed": dataclasses.asdict(got.block[0]) if got and got.block else None}})
        gi = self.guest.generic_initiator_nodes if self.guest is not None else None
        return {"pci": rows,
                "generic_initiator_nodes": {"expected": sorted(p2n[d] for d in self.layout.topology.initiators
                                                               if d in p2n),
                                            "observed": sorted(gi) if gi is not None else None},
                "modules": self.guest.modules if self.guest is not None else None}


def _view_doc(v: KernelView) -> dict[str, Any]:
    d = dataclasses.asdict(v)
    d["srat_ranges"] = {str(k): [{"start": s, "end": e} for s, e in r] for k, r in v.srat_ranges.items()}
    d["initmem"] = {str(k): {"start": s, "end": e} for k, (s, e) in v.initmem.items()}
    for key in ("pxm_to_node", "apic_to_node", "fallback"):
        d[key] = {str(k): val for k, val in d[key].items()}
    return d


def evaluate(layout: Layout, stage: str, engine: str, console_text: str, boot_ok: bool,
             boot_detail: str) -> CheckReport:
    seen = parse_kernel_log(console_text)
    doc = parse_guest_report(console_text) if stage == "userspace" else None
    guest = GuestReport.from_document(doc) if doc is not None else None
    if seen.version is None and guest is not None:
        seen.version = guest.kernel_version  # a quiet console has no "Linux version" line
    report = CheckReport(stage, engine, layout, seen, guest, boot=boot_detail)
    if not boot_ok:
        report.mismatches.append(f"boot: {boot_detail}")
        if "Linux version" not in console_text:  # nothing booted: the rest would only repeat it
            return report
    expected = report.expected
    if expected is not None:
        report.mismatches += compare_kernel(expected, seen)
        report.notes += unlogged(expected, seen) if stage == "kernel" else []
    elif seen.numa_off is None and len(seen.fallback) > 1:
        report.mismatches.append(f"the classic machine should have one node, the guest built {len(seen.fallback)}")
    if stage == "userspace":
        if guest is None:
            report.mismatches.append("the guest's /init printed no topology report")
        else:
            pmap = guest_pxm_to_node(layout, seen.pxm_to_node, guest) if seen.pxm_to_node else {}
            report.pxm_to_node = pmap
            if expected is not None and not seen.logs_cpu_affinity and pmap != expected.pxm_to_node:
                report.mismatches.append(f"domain->node numbering (log and sysfs): expected "
                                         f"{expected.pxm_to_node}, guest {pmap}")
            report.mismatches += compare_userspace(layout, guest, pmap or None)
            report.mismatches += compare_devices(layout, guest, pmap or None)
            if layout.topology.numa:
                bad, notes = compare_hmat(layout, guest, pmap or expected_view(layout).pxm_to_node, seen.version)
                report.mismatches += bad
                report.notes += notes
    return report


def render(report: CheckReport) -> str:
    """Expected beside observed, one row per fact."""
    layout, kern, guest = report.layout, report.kernel, report.guest
    rows: list[tuple[str, str, str]] = [("", "expected", "observed")]
    exp = report.expected
    p2n = report.pxm_to_node or kern.pxm_to_node
    a2n = kern.apic_to_node or (guest.apic_to_node() if guest else {})  # Linux 6.12+: sysfs only
    for d in layout.domains:
        node = exp.pxm_to_node.get(d.id) if exp else 0
        seen_node: Any = p2n.get(d.id, "-" if layout.topology.numa else 0)
        # a domain with only a generic initiator: Linux logs its SRAT entry at debug level, so the
        # kernel stage knows its node only from the zonelists, which are compared by node number
        gi_only = not d.apic_ids and not d.ranges and d.id in layout.topology.initiators
        zonelist_node = node if gi_only and seen_node == "-" else seen_node
        rows.append((f"domain {d.id}: node", str(node), "not logged" if gi_only and seen_node == "-" else str(seen_node)))
        ranges = ", ".join(f"{r.start:#x}-{r.end - 1:#x}" for r in d.ranges) or "none"
        got = kern.srat_ranges.get(seen_node, []) if isinstance(seen_node, int) else []
        got_text = ", ".join(f"{s:#x}-{e - 1:#x}" for s, e in got) or (
            "-" if layout.topology.numa else "(no SRAT)")
        rows.append(("  memory ranges", ranges, got_text))
        apics = [a for a, n in a2n.items() if n == seen_node]
        unseen = "not logged" if report.notes else "none" if layout.topology.numa else "-"
        rows.append(("  APIC ids", format_list(d.apic_ids) or "none", format_list(apics) or unseen))
        gn = guest.nodes.get(seen_node) if guest and isinstance(seen_node, int) else None
        if guest:
            rows.append(("  vCPUs", format_list(d.domain.cpus) or "none",
                         (gn.cpulist or "none") if gn else "-"))
            mt = gn.memtotal_kb if gn else None
            rows.append(("  MemTotal", f"<= {format_size(d.segment_size) if d.segment_size else '0'}",
                         f"{mt // 1024} MiB" if mt is not None else "-"))
            if layout.topology.numa and exp is not None:
                # the guest's rows are indexed by node number, so show the plan's that way too
                row = layout.topology.distances[d.id]
                by_node = sorted((exp.pxm_to_node[j], row[j]) for j in exp.pxm_to_node)
                rows.append(("  distances (by node)", " ".join(str(v) for _, v in by_node),
                             " ".join(map(str, (gn.distance if gn else None) or []))))
        if guest and layout.topology.numa and d.segment_size:
            _hmat_rows(rows, report, d.id, seen_node, guest)
        if exp is not None:
            rows.append(("  fallback order", " ".join(map(str, exp.fallback.get(node if node is not None else -1, []))),
                         " ".join(map(str, kern.fallback.get(zonelist_node, []))) or "-"))
    if layout.pci or layout.topology.initiators:
        _device_rows(rows, report)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.append("")
    lines.append(f"stage {report.stage}, engine {report.engine}: {report.boot}")
    lines += [f"note: {n}" for n in report.notes]
    if report.match:
        lines.append("MATCH: the guest saw the planned topology")
    else:
        lines.append(f"MISMATCH ({len(report.mismatches)}):")
        lines += [f"  - {m}" for m in report.mismatches]
    return "\n".join(lines) + "\n"


def _device_rows(rows: list[tuple[str, str, str]], report: CheckReport) -> None:
    """Each disk's address, node and block device, and the generic initiator nodes."""
    d = report.devices()
    for dev, row in zip(report.layout.pci.of_kind(VIRTIO_BLK), d["pci"]):
        rows.append((f"disk {dev.index} ({dev.bdf}): node", str(row["node"]["expected"]),
                     "-" if row["node"]["observed"] is None else str(row["node"]["observed"])))
        b = row["block"]["observed"]
        want = row["block"]["expected"]
        rows.append(("  block device", f"vd? {want['sectors'] if want['sectors'] is not None else '?'} sectors, "
                                       f"logical block {want['logical_block_size']} B{', read-only' * want['ro']}",
                     f"{b['name']} {b['sectors']} sectors, logical block {b['logical_block_size']} B"
                     f"{', read-only' * bool(b['ro'])}" if b else "-"))
    gi = d["generic_initiator_nodes"]
    rows.append(("generic initiator nodes", format_list(gi["expected"]) or "none",
                 "-" if gi["observed"] is None else format_list(gi["observed"]) or "none"))
    if d["modules"]:
        rows.append(("modules loaded", "", " ".join(f"{m}" if st == 0 else f"{m}(failed {st})"
                                                    for m, st in d["modules"].items())))


def _hmat_rows(rows: list[tuple[str, str, str]], report: CheckReport, dom: int, node: Any,
               guest: GuestReport) -> None:
    """access0 figures and links, caches and memory tier of one memory domain, plan beside guest."""
    topo = report.layout.topology
    gn = guest.nodes.get(node) if isinstance(node, int) else None
    links = hmat_links(topo)
    mems = [d.id for d in topo.domains if d.size]
    cpus = [d.id for d in topo.domains if d.cpus]

    def figs(lat_r: Any, lat_w: Any, bw_r: Any, bw_w: Any, nodes: Any) -> str:
        return f"{lat_r}/{lat_w} ns {bw_r}/{bw_w} MB/s <- node {','.join(map(str, nodes)) or 'none'}"
    if links or topo.caches:
        want = hmat_access(links, mems, cpus)[dom][0]
        got = gn.access.get(0) if gn else None
        rows.append(("  HMAT access0",
                     figs(want["read_latency"], want["write_latency"], want["read_bandwidth"],
                          want["write_bandwidth"], [report.pxm_to_node.get(i, "?") for i in want["initiators"]]),
                     figs(got.read_latency, got.write_latency, got.read_bandwidth, got.write_bandwidth,
                          got.initiators) if got else "-"))
    for c in topo.caches:
        if c.domain == dom:
            gc = gn.memory_side_cache.get(c.level) if gn else None
            rows.append((f"  memory-side cache L{c.level}", f"{c.size >> 20} MiB line {c.line}",
                         f"{(gc.size or 0) >> 20} MiB line {gc.line_size}" if gc else "-"))
    if guest.memory_tiers is not None:
        got_t = next((str(t) for t, members in guest.memory_tiers.items() if node in members), "-")
        access = hmat_access(links, mems, cpus) if links else {}
        want_t = memory_tiers(access, mems, cpus, guest.kernel_version).get(dom)
        rows.append(("  memory tier", str(want_t), got_t))
