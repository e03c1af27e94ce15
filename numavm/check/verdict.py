"""`numavm check`: boot the built-in guest and hold what it saw against the plan.

Stage `kernel` reads the guest kernel's own log (SRAT node ranges, APIC to
node, node count, zonelist fallback order, which must agree with the
distances); stage `userspace` adds the guest's sysfs view (CPUs and their
APIC ids, MemTotal and distances per node) reported by numavm's /init.
Linux 6.12+ no longer logs APIC to node: its kernel stage says so in
`notes`, and its userspace stage proves that fact (and the node of a
CPU-only domain) from sysfs alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from numavm.check.compare import apic_to_node_from_report, compare_hmat, compare_userspace, guest_pxm_to_node, parse_cpulist
from numavm.guest.initramfs import parse_guest_report
from numavm.plan.layout import Layout
from numavm.check.linux_numa import KernelView, compare_kernel, expected_view, kernel_version, parse_kernel_log, unlogged
from numavm.plan.render import plan_document
from numavm.spec.units import format_list, format_size

STAGES = ("kernel", "userspace")


@dataclass
class CheckReport:
    stage: str
    engine: str
    expected: dict[str, Any]
    observed: dict[str, Any]
    mismatches: list[str] = field(default_factory=list)
    boot: str = ""  # how the boot ended
    notes: list[str] = field(default_factory=list)  # what this stage could not see, and why

    @property
    def match(self) -> bool:
        return not self.mismatches

    def document(self) -> dict[str, Any]:
        return {"match": self.match, "stage": self.stage, "engine": self.engine, "boot": self.boot,
                "expected": self.expected, "observed": self.observed, "mismatches": self.mismatches,
                "notes": self.notes}


def _view_doc(v: KernelView) -> dict[str, Any]:
    d = dataclasses.asdict(v)
    d["srat_ranges"] = {str(k): [{"start": s, "end": e} for s, e in r] for k, r in v.srat_ranges.items()}
    d["initmem"] = {str(k): {"start": s, "end": e} for k, (s, e) in v.initmem.items()}
    for key in ("pxm_to_node", "apic_to_node", "fallback"):
        d[key] = {str(k): val for k, val in d[key].items()}
    return d


def evaluate(layout: Layout, stage: str, engine: str, console_text: str, boot_ok: bool,
             boot_detail: str) -> CheckReport:
    plan = plan_document(layout)
    seen = parse_kernel_log(console_text)
    guest = parse_guest_report(console_text) if stage == "userspace" else None
    if seen.version is None and guest is not None and isinstance(guest.get("kernel"), str):
        seen.version = kernel_version(guest["kernel"])  # a quiet console has no "Linux version" line
    observed: dict[str, Any] = {"kernel": _view_doc(seen)}
    report = CheckReport(stage, engine, plan, observed, boot=boot_detail)
    if not boot_ok:
        report.mismatches.append(f"boot: {boot_detail}")
        if "Linux version" not in console_text:  # nothing booted: the rest would only repeat it
            return report
    expected = expected_view(layout, seen.version) if layout.topology.numa else None
    if expected is not None:
        report.mismatches += compare_kernel(expected, seen)
        report.notes += unlogged(expected, seen) if stage == "kernel" else []
    elif seen.numa_off is None and len(seen.fallback) > 1:
        report.mismatches.append(f"the classic machine should have one node, the guest built {len(seen.fallback)}")
    if stage == "userspace":
        if guest is None:
            report.mismatches.append("the guest's /init printed no topology report")
        else:
            pmap = guest_pxm_to_node(plan, seen.pxm_to_node, guest) if seen.pxm_to_node else {}
            observed["userspace"] = dict(
                guest, pxm_to_node={str(p): n for p, n in pmap.items()},
                apic_to_node={str(a): n for a, n in apic_to_node_from_report(guest).items()})
            if expected is not None and not seen.logs_cpu_affinity and pmap != expected.pxm_to_node:
                report.mismatches.append(f"domain->node numbering (log and sysfs): expected "
                                         f"{expected.pxm_to_node}, guest {pmap}")
            report.mismatches += compare_userspace(plan, guest, pmap or None)
            if layout.topology.numa:
                bad, notes = compare_hmat(plan, guest, pmap or expected_view(layout).pxm_to_node, seen.version)
                report.mismatches += bad
                report.notes += notes
    return report


def render(report: CheckReport, layout: Layout) -> str:
    """Expected beside observed, one row per fact."""
    rows: list[tuple[str, str, str]] = [("", "expected", "observed")]
    kern = report.observed["kernel"]
    user = report.observed.get("userspace") or {}
    version = tuple(kern["version"]) if kern.get("version") else None
    exp = expected_view(layout, version) if layout.topology.numa else None  # type: ignore[arg-type]
    p2n = {int(k): v for k, v in (user.get("pxm_to_node") or kern["pxm_to_node"]).items()}
    for d in layout.domains:
        node = exp.pxm_to_node.get(d.id) if exp else 0
        seen_node = p2n.get(d.id, "-" if layout.topology.numa else 0)
        rows.append((f"domain {d.id}: node", str(node), str(seen_node)))
        ranges = ", ".join(f"{r.start:#x}-{r.end - 1:#x}" for r in d.ranges) or "none"
        got = kern["srat_ranges"].get(str(seen_node), [])
        got_text = ", ".join(f"{r['start']:#x}-{r['end'] - 1:#x}" for r in got) or (
            "-" if layout.topology.numa else "(no SRAT)")
        rows.append(("  memory ranges", ranges, got_text))
        a2n = kern["apic_to_node"] or user.get("apic_to_node") or {}  # Linux 6.12+: sysfs only
        apics = [a for a, n in a2n.items() if n == seen_node]
        unseen = "not logged" if report.notes else "none" if layout.topology.numa else "-"
        rows.append(("  APIC ids", format_list(d.apic_ids) or "none", format_list([int(a) for a in apics]) or unseen))
        if user:
            n = (user.get("nodes") or {}).get(str(seen_node), {})
            rows.append(("  vCPUs", format_list(d.domain.cpus) or "none", n.get("cpulist", "-") or "none"))
            mt = n.get("memtotal_kb")
            rows.append(("  MemTotal", f"<= {format_size(d.segment_size) if d.segment_size else '0'}",
                         f"{mt // 1024} MiB" if isinstance(mt, int) else "-"))
            if layout.topology.numa and exp is not None:
                # the guest's rows are indexed by node number, so show the plan's that way too
                row = layout.topology.distances[d.id]
                by_node = sorted((exp.pxm_to_node[j], row[j]) for j in exp.pxm_to_node)
                rows.append(("  distances (by node)", " ".join(str(v) for _, v in by_node),
                             " ".join(map(str, n.get("distance") or []))))
        if user and layout.topology.numa and d.segment_size:
            _hmat_rows(rows, report, d.id, seen_node, user)
        if exp is not None:
            rows.append(("  fallback order", " ".join(map(str, exp.fallback.get(node if node is not None else -1, []))),
                         " ".join(map(str, kern["fallback"].get(str(seen_node), []))) or "-"))
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


def _hmat_rows(rows: list[tuple[str, str, str]], report: CheckReport, dom: int, node: Any,
               user: dict[str, Any]) -> None:
    """access0 figures and links, caches and memory tier of one memory domain, plan beside guest."""
    hm = report.expected.get("hmat") or {}
    n = (user.get("nodes") or {}).get(str(node), {})
    p2n = {int(k): v for k, v in (user.get("pxm_to_node") or {}).items()}

    def figs(a: dict[str, Any] | None, to_node: bool) -> str:
        if not a:
            return "-"
        ini = [p2n.get(i, "?") for i in a["initiators"]] if to_node else a["initiators"]
        return (f"{a['read_latency']}/{a['write_latency']} ns {a['read_bandwidth']}/{a['write_bandwidth']} MB/s"
                f" <- node {','.join(map(str, ini)) or 'none'}")
    if "linux" in hm:
        want = hm["linux"]["access"].get(str(dom), {}).get("0")
        rows.append(("  HMAT access0", figs(want, True), figs((n.get("access") or {}).get("0"), False)))
    for c in hm.get("caches") or []:
        if c["domain"] == dom:
            got = (n.get("memory_side_cache") or {}).get(str(c["level"]))
            rows.append((f"  memory-side cache L{c['level']}", f"{c['size'] >> 20} MiB line {c['line']}",
                         f"{got['size'] >> 20} MiB line {got['line_size']}" if got else "-"))
    tiers = user.get("memory_tiers")
    if tiers is not None:
        got_t = next((t for t, lst in tiers.items() if node in parse_cpulist(lst)), "-")
        version = kernel_version(str(user.get("kernel", "")))
        from numavm.check.linux_numa import hmat_access, memory_tiers
        mems = [d["id"] for d in report.expected["domains"] if d["size"]]
        cpus = [d["id"] for d in report.expected["domains"] if d["cpus"]]
        links = hm.get("links") or []
        want_t = memory_tiers(hmat_access(links, mems, cpus) if links else {}, mems, cpus, version).get(dom)
        rows.append(("  memory tier", str(want_t), str(got_t)))
