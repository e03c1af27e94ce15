"""`numavm plan`: the layout as a readable table and as one stable JSON document."""

from __future__ import annotations

from typing import Any

from numavm.plan.layout import MAX_XAPIC_ID, Layout
from numavm.plan.pci import VIRTIO_BLK
from numavm.check.linux_numa import HMAT_TIERS_FROM, hmat_access, memory_tiers
from numavm.spec.topology import HMAT_ATTRS, Topology
from numavm.spec.units import format_list, format_size

PLAN_SCHEMA = 1


def plan_document(layout: Layout) -> dict[str, Any]:
    """The plan as plain data; `end` is exclusive.  Keys only ever get added."""
    topo = layout.topology
    return {
        "schema": PLAN_SCHEMA,
        "numa": topo.numa,
        "cpus": topo.cpus,
        "memory": topo.memory,
        "domains": [
            {
                "id": d.id,
                "size": d.segment_size,
                "cpus": list(d.domain.cpus),
                "apic_ids": list(d.apic_ids),
                "policy": {"mode": d.domain.policy.mode.label, "nodes": list(d.domain.policy.nodes)},
                "hugepages": d.domain.hugepages,
                "ranges": [{"start": r.start, "end": r.end} for r in d.ranges],
            }
            for d in layout.domains
        ],
        "distances": [list(row) for row in topo.distances],
        "e820": [{"start": e.start, "end": e.end, "type": e.type.label} for e in layout.e820],
        "acpi": {"rsdp": layout.rsdp_addr,
                 "tables": {"start": layout.table_area.start, "end": layout.table_area.end}},
        "hmat": hmat_document(topo),
        "pci": pci_document(layout),
    }


def pci_document(layout: Layout) -> dict[str, Any]:
    """The host bridges (one per domain that holds a device) and the devices behind them."""
    pci = layout.pci
    disks = layout.topology.disks
    return {
        "ecam": None if pci.ecam is None else {"start": pci.ecam.start, "end": pci.ecam.end},
        "bridges": [{"domain": b.domain, "bus": b.bus, "uid": b.uid, "pxm": b.pxm,
                     "mmio": {"start": b.mmio.start, "end": b.mmio.end}} for b in pci.bridges],
        # a plan's devices are its disks; a KVM run's layout adds its shares (numavm.plan.layout.with_shares)
        "devices": [{"kind": d.kind, "bdf": d.bdf, "domain": d.domain, "bar0": d.bar0,
                     "initiator": d.initiator, "path": disks[d.index].path,
                     "readonly": disks[d.index].readonly} if d.kind == VIRTIO_BLK else
                    {"kind": d.kind, "bdf": d.bdf, "domain": d.domain, "bar0": d.bar0, "initiator": False,
                     "share": d.index} for d in pci.devices],
    }


def hmat_document(topo: Topology) -> dict[str, Any]:
    """The HMAT's figures as asked (ns, MB/s, bytes; None = not given), and what Linux makes of
    them: each target's access classes (`linux_numa.hmat_access`) and, from Linux 6.10, each
    memory node's memory tier (`linux_numa.memory_tiers`)."""
    links = hmat_links(topo)
    caches = [{"domain": c.domain, "size": c.size, "level": c.level, "line": c.line, "assoc": c.assoc,
               "policy": c.policy} for c in topo.caches]
    doc: dict[str, Any] = {"links": links, "caches": caches}
    if links or caches:
        mems = [d.id for d in topo.domains if d.size]
        cpus = [d.id for d in topo.domains if d.cpus]
        access = hmat_access(links, mems, cpus)
        doc["linux"] = {
            "access": {str(t): {str(a): v for a, v in acc.items()} for t, acc in access.items()},
            "memory_tiers": {str(d): t for d, t in memory_tiers(access, mems, cpus, HMAT_TIERS_FROM).items()},
        }
    return doc


def hmat_links(topo: Topology) -> list[dict[str, Any]]:
    """The HMAT's links as `linux_numa.hmat_access` reads them (and the plan document shows them)."""
    return [{"initiator": lk.initiator, "target": lk.target, **{a: lk.value(a) for a in HMAT_ATTRS}}
            for lk in topo.hmat]


def _hex_range(start: int, end: int) -> str:
    return f"{start:#012x}-{end - 1:#012x}"


def plan_text(layout: Layout) -> str:
    topo = layout.topology
    lines: list[str] = []
    kind = (f"{len(topo.domains)} NUMA domain{'s' * (len(topo.domains) != 1)}" if topo.numa
            else "no NUMA (classic machine: no SRAT, no SLIT)")
    lines.append(f"machine: {topo.cpus} vCPU{'s' * (topo.cpus != 1)}, "
                 f"{format_size(topo.memory)} memory, {kind}")
    lines.append("")
    rows = [("domain", "size", "guest-physical ranges", "vCPUs", "APIC ids", "host policy")]
    for d in layout.domains:
        ranges = [_hex_range(r.start, r.end) for r in d.ranges] or ["-"]
        kind = ("" if d.domain.cpus and d.segment_size else " (memory-only)" if d.segment_size
                else " (CPU-only)" if d.domain.cpus else " (generic initiator)")
        rows.append((f"{d.id}{kind}", format_size(d.segment_size) if d.segment_size else "0",
                     ranges[0], format_list(d.domain.cpus) or "-", format_list(d.apic_ids) or "-",
                     str(d.domain.policy) + (f", {d.domain.hugepages} pages" if d.domain.hugepages else "")))
        rows.extend(("", "", r, "", "", "") for r in ranges[1:])
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if topo.numa:
        lines.append("")
        lines.append("distances (SLIT)")
        n = len(topo.domains)
        w = max(3, len(str(n - 1)) + 1)
        lines.append(" " * w + "".join(f"{j:>{w + 1}}" for j in range(n)))
        for i, row in enumerate(topo.distances):
            lines.append(f"{i:>{w}}" + "".join(f"{d:>{w + 1}}" for d in row))
    if topo.has_hmat:
        lines += [""] + hmat_text(topo)
    if layout.pci:
        lines += [""] + pci_text(layout)
    lines.append("")
    lines.append("e820 map")
    for e in layout.e820:
        lines.append(f"  {_hex_range(e.start, e.end)}  {e.type.label:<8} {format_size(e.end - e.start)}")
    lines.append("")
    lines.append(f"ACPI tables at {_hex_range(layout.table_area.start, layout.table_area.end)}, "
                 f"RSDP at {layout.rsdp_addr:#x}")
    x2 = [cpu for cpu, apic in enumerate(layout.apic_ids) if apic > MAX_XAPIC_ID]
    if x2:
        lines.append(f"note: vCPUs {format_list(x2)} have APIC ids >= {MAX_XAPIC_ID + 1}: the KVM engine starts "
                     "every vCPU in x2APIC mode with KVM's extended destination ids (device interrupts on "
                     "vCPU 0); the TCG engine cannot run this machine")
    return "\n".join(lines) + "\n"


def pci_text(layout: Layout) -> list[str]:
    """The PCI section of `plan_text`: each host bridge and its devices."""
    pci, disks = layout.pci, layout.topology.disks
    assert pci.ecam is not None
    lines = [f"PCI (segment 0, ECAM at {_hex_range(pci.ecam.start, pci.ecam.end)})"]
    for b in pci.bridges:
        pxm = f"_PXM {b.pxm}" if b.pxm is not None else "no _PXM (no NUMA)"
        lines.append(f"  host bridge for domain {b.domain}: bus {b.bus:#04x}, _UID {b.uid}, {pxm}, "
                     f"window {_hex_range(b.mmio.start, b.mmio.end)}")
        for d in pci.devices:
            if d.bus == b.bus and d.kind != VIRTIO_BLK:
                lines.append(f"    {d.bdf}  {d.kind}  share {d.index}")
            elif d.bus == b.bus:
                disk = disks[d.index]
                flags = "".join(f", {f}" for f, on in (("read-only", disk.readonly),
                                                      ("generic initiator", d.initiator)) if on)
                lines.append(f"    {d.bdf}  {d.kind}  {disk.path}{flags}")
    return lines


def _fig(v: int | None) -> str:
    return "-" if v is None else str(v)


def hmat_text(topo: Topology) -> list[str]:
    """The HMAT section of `plan_text`: the figures asked, the caches, and what Linux makes of them."""
    doc = hmat_document(topo)
    lines: list[str] = []
    if doc["links"]:
        lines.append("HMAT latency (ns) and bandwidth (MB/s), read/write")
        rows = [("initiator", "target", "latency", "bandwidth")]
        rows += [(str(lk["initiator"]), str(lk["target"]),
                  f"{_fig(lk['read_latency'])}/{_fig(lk['write_latency'])}",
                  f"{_fig(lk['read_bandwidth'])}/{_fig(lk['write_bandwidth'])}") for lk in doc["links"]]
        widths = [max(len(r[k]) for r in rows) for k in range(4)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if doc["caches"]:
        lines.append("memory-side caches")
        lines += [f"  domain {c['domain']}: level {c['level']}, {format_size(c['size'])}, line {c['line']} B, "
                  f"associativity {c['assoc']}, write policy {c['policy']}" for c in doc["caches"]]
    lines.append("what Linux makes of it (nodeN/access0 = access1 here: every initiator has vCPUs)")
    linux = doc["linux"]
    for t, acc in linux["access"].items():
        a = acc["0"]
        ini = format_list(a["initiators"]) or "none"
        figs = (f"{a['read_latency']}/{a['write_latency']} ns, {a['read_bandwidth']}/{a['write_bandwidth']} MB/s"
                if any(a[k] for k in HMAT_ATTRS) else "no figures")
        lines.append(f"  domain {t}: {figs} from initiator domain(s) {ini}; memory tier "
                     f"{linux['memory_tiers'][t]} on Linux 6.10+ (4 before)")
    return lines
