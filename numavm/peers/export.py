"""The same machine in a peer's syntax (``numavm export --to FORMAT``).

Each exporter renders a validated `Topology` for one peer and lists, one line
each, what that peer cannot express; `export` returns both as an `Export`.
Nothing here runs the peer: `qemu_args` gives the QEMU options as a list so
that other code (the QEMU cross-check) can start it.

Guest-physical layout: QEMU's ``pc`` with ``max-ram-below-4g=3G`` puts the
domains one after the other from address 0, skipping the 3-4 GiB hole, as
numavm does (see layout.py).  vCPU packages: numavm gives each domain with
vCPUs its own package; a peer can say the same only with uniform sockets, so
sockets/cores are written only when every such domain holds the same number
of consecutive vCPUs in domain order (the r-th holding r*C .. r*C+C-1).
"""

from __future__ import annotations

import shlex
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

from numavm.errors import ConfigError
from numavm.plan.layout import LOW_RAM_LIMIT, QEMU_PC_MACHINE
from numavm.spec.policy import Mode, Policy
from numavm.spec.topology import DEFAULT_DISTANCE, HMAT_ATTRS, LOCAL_DISTANCE, Domain, MemoryCache, Topology
from numavm.spec.units import KiB, format_cpulist, format_list, format_size, ranges

FORMATS = ("qemu", "libvirt", "cloud-hypervisor", "bhyve", "toml")

QEMU_BINARY = "qemu-system-x86_64"
QEMU_MACHINE = QEMU_PC_MACHINE
CH_BINARY = "cloud-hypervisor"
BHYVE_BINARY = "bhyve"
VM_NAME = "numavm"  # libvirt's <name>, bhyve's vmname operand


@dataclass
class Export:
    text: str  # what goes to stdout
    warnings: list[str] = field(default_factory=list)  # one line each, for stderr


def export(topo: Topology, to: str) -> Export:
    try:
        render = _EXPORTERS[to]
    except (KeyError, TypeError):
        raise ConfigError(f"--to: must be one of {', '.join(FORMATS)}, got {to!r}") from None
    warnings: list[str] = []
    text = render(topo, warnings)
    if to in ("qemu", "libvirt", "cloud-hypervisor"):  # their policies live on memory, bhyve's on the domain
        warnings += [f"domain {d.id}: CPU-only, so its policy {d.policy} (which numavm uses to pin its vCPUs) "
                     "is not exported" for d in topo.domains if not d.size and d.policy.mode is not Mode.DEFAULT]
    if to != "toml":  # numavm's own per-domain page choice is not carried over
        warnings += [f"domain {d.id}: hugepages={d.hugepages} is not exported; set huge pages in the "
                     f"peer's own configuration" for d in topo.domains if d.hugepages]
    return Export(text if text.endswith("\n") else text + "\n", warnings)


# ---------------------------------------------------------------- shared


def _sockets(topo: Topology) -> tuple[int, int] | None:
    """(sockets, cores) when uniform sockets give each domain its own package."""
    with_cpus = [d for d in topo.domains if d.cpus]
    per = len(with_cpus[0].cpus)
    for r, d in enumerate(with_cpus):
        if d.cpus != tuple(range(r * per, (r + 1) * per)):
            return None
    return len(with_cpus), per


def _sockets_warning(topo: Topology, warnings: list[str], what: str) -> tuple[int, int] | None:
    s = _sockets(topo)
    if s is None and topo.numa and sum(1 for d in topo.domains if d.cpus) > 1:
        warnings.append(
            f"the domains do not hold equal runs of consecutive vCPUs, so {what} cannot give each "
            "domain its own package as numavm does; the guest's sockets may span domains")
    return s


def _default_distances(topo: Topology) -> bool:
    n = len(topo.domains)
    return all(topo.distances[i][j] == (LOCAL_DISTANCE if i == j else DEFAULT_DISTANCE)
               for i in range(n) for j in range(n))


def _symmetric(topo: Topology) -> bool:
    m = topo.distances
    return all(m[i][j] == m[j][i] for i in range(len(m)) for j in range(i))


_comma_list = format_cpulist  # Linux cpulist spelling (``0-1,4``), which QEMU, libvirt, CH and bhyve read


def _shell(lines: list[list[str]]) -> str:
    """One option (with its values) per line, joined by backslash-newline.

    The program stays on the first line and options are indented by four
    spaces; a line starting with `_MORE` holds further values of the option
    above (CH takes several after one flag) and is indented by eight.
    """
    out = [" ".join(shlex.quote(w) for w in lines[0])]
    for line in lines[1:]:
        indent, words = ("        ", line[1:]) if line[0] is _MORE else ("    ", line)
        out.append(indent + " ".join(shlex.quote(w) for w in words))
    return " \\\n".join(out) + "\n"


_MORE = "\x00more"  # marks a continuation line for _shell


def _no_local(d: Domain, peer: str) -> str:
    return (f"domain {d.id}: {peer} has no policy local; left at the default policy, which allocates "
            "locally unless the process has another")


def _nodes(p: Policy) -> str:
    return format_list(p.nodes)


# ---------------------------------------------------------------- QEMU


def _qemu_policy(dom: Domain, warnings: list[str]) -> Policy | None:
    """The policy to give QEMU's memory backend (policy default/local: none)."""
    p = dom.policy
    if p.mode is Mode.LOCAL:
        warnings.append(_no_local(dom, "QEMU"))
    if p.mode in (Mode.DEFAULT, Mode.LOCAL):
        return None
    if p.mode is Mode.PREFERRED_MANY:
        warnings.append(
            f"domain {dom.id}: QEMU has no preferred-many; wrote policy=preferred with host-nodes "
            f"{_nodes(p)} (QEMU 8.0+ built with libnuma applies that as preferred-many, "
            "older QEMU prefers the first node only)")
        return Policy(Mode.PREFERRED, p.nodes)
    if p.mode is Mode.WEIGHTED_INTERLEAVE:
        warnings.append(
            f"domain {dom.id}: QEMU has no weighted-interleave; wrote policy=interleave over host "
            f"nodes {_nodes(p)} (equal weights)")
        return Policy(Mode.INTERLEAVE, p.nodes)
    return p


def _qemu_lines(topo: Topology, warnings: list[str]) -> list[list[str]]:
    has_hmat = topo.has_hmat
    lines: list[list[str]] = [["-machine", QEMU_MACHINE + (",hmat=on" if has_hmat else "")]]
    smp = str(topo.cpus)
    if topo.numa:
        s = _sockets_warning(topo, warnings, "-smp")
        if s is not None:
            smp += f",sockets={s[0]},cores={s[1]}"
    lines += [["-smp", smp], ["-m", format_size(topo.memory)]]
    if not topo.numa:
        return lines
    for d in topo.domains:
        if not d.size:
            continue
        obj = f"memory-backend-ram,id=mem{d.id},size={format_size(d.size)}"
        pol = _qemu_policy(d, warnings)
        if pol is not None:
            # QEMU reads host-nodes as ranges, repeating the key for each run
            obj += "".join(f",host-nodes={a}" if a == b else f",host-nodes={a}-{b}"
                           for a, b in ranges(pol.nodes))
            obj += f",policy={pol.mode.label}"
        lines.append(["-object", obj])
    attached = _qemu_initiators(topo, warnings) if has_hmat else {}
    for d in topo.domains:
        node = f"node,nodeid={d.id}"
        node += "".join(f",cpus={a}" if a == b else f",cpus={a}-{b}" for a, b in ranges(d.cpus))
        if d.size:
            node += f",memdev=mem{d.id}"  # no memdev: a memoryless node
        if d.id in attached:
            node += f",initiator={attached[d.id]}"
        lines.append(["-numa", node])
    # QEMU wants a distance for every pair once any is given: one direction
    # per pair when the matrix is symmetric, both otherwise.
    n = len(topo.domains)
    sym = _symmetric(topo)
    for i in range(n):
        for j in range(n):
            if i != j and (i < j or not sym):
                lines.append(["-numa", f"dist,src={i},dst={j},val={topo.distances[i][j]}"])
    if has_hmat:
        lines += _qemu_hmat(topo, warnings)
    return lines


# QEMU's hmat-lb data types and hmat-cache words for numavm's
_QEMU_LB = {"read_latency": "read-latency", "write_latency": "write-latency",
            "read_bandwidth": "read-bandwidth", "write_bandwidth": "write-bandwidth"}
_QEMU_POLICY = {"none": "none", "writeback": "write-back", "writethrough": "write-through"}


def _linux_access(topo: Topology) -> dict[int, list[int]]:
    """Each memory domain's initiators as Linux picks them from numavm's HMAT (access0)."""
    from numavm.check.linux_numa import hmat_access
    from numavm.plan.render import hmat_document

    links = hmat_document(topo)["links"]
    access = hmat_access(links, [d.id for d in topo.domains if d.size], [d.id for d in topo.domains if d.cpus])
    return {t: acc[0]["initiators"] for t, acc in access.items()}


def _qemu_initiators(topo: Topology, warnings: list[str]) -> dict[int, int]:
    """initiator= for the memory-only domains, so that QEMU's HMAT links what numavm's lets Linux pick.

    QEMU attaches every node with vCPUs to itself ("initiator valid" in its HMAT), and
    attaches a memory-only node to the one initiator given; numavm attaches none, so Linux
    links each memory node to its best initiators (`linux_numa.hmat_access`).
    """
    picked = _linux_access(topo) if topo.hmat else {}
    out: dict[int, int] = {}
    for d in topo.domains:
        best = picked.get(d.id, [])
        if d.cpus and d.size and topo.hmat and best != [d.id]:
            warnings.append(f"domain {d.id}: QEMU attaches a node with vCPUs to itself in its HMAT; "
                            f"numavm's lets Linux link it to initiator domain(s) {format_list(best) or 'none'}, "
                            f"so the guest's access0/access1 for it will differ")
        elif not d.cpus and d.size:
            if len(best) == 1 and not topo.domains[best[0]].cpus:
                warnings.append(f"domain {d.id}: Linux links numavm's HMAT to generic initiator domain {best[0]}; "
                                f"QEMU takes no initiator without vCPUs: none attached")
            elif len(best) == 1:
                out[d.id] = best[0]
            elif best:
                warnings.append(f"domain {d.id}: QEMU attaches a memory-only node to one initiator; Linux "
                                f"links numavm's to initiator domains {format_list(best)}: none attached")
    return out


def _qemu_caches(topo: Topology, warnings: list[str]) -> list[MemoryCache]:
    """The caches QEMU takes: it refuses one for a node without latency and bandwidth figures."""
    out = []
    for c in topo.caches:
        kinds = {a.split("_")[1] for lk in topo.hmat if lk.target == c.domain for a in _QEMU_LB if lk.value(a)}
        if kinds != {"latency", "bandwidth"}:
            warnings.append(f"domain {c.domain}: QEMU takes a memory-side cache only for a node with latency "
                            f"and bandwidth figures (--hmat I:{c.domain},latency=...,bandwidth=...): its level "
                            f"{c.level} cache is left out")
        else:
            out.append(c)
    return out


def _qemu_hmat(topo: Topology, warnings: list[str]) -> list[list[str]]:
    lines: list[list[str]] = []
    for lk in topo.hmat:
        if not topo.domains[lk.initiator].cpus:  # QEMU: "it isn't an initiator proximity domain"
            warnings.append(f"--hmat {lk.initiator}:{lk.target}: QEMU takes no HMAT initiator without vCPUs "
                            f"(a generic initiator): left out")
            continue
        for attr, word in _QEMU_LB.items():
            v = lk.value(attr)
            if v is None:
                continue
            # latency in ns; bandwidth in bytes/s, whole MiB/s, which QEMU writes as MB/s
            val = f"latency={v}" if attr.endswith("latency") else f"bandwidth={v}M"
            lines.append(["-numa", f"hmat-lb,initiator={lk.initiator},target={lk.target},hierarchy=memory,"
                                   f"data-type={word},{val}"])
    for c in _qemu_caches(topo, warnings):
        lines.append(["-numa", f"hmat-cache,node-id={c.domain},size={format_size(c.size)},level={c.level},"
                               f"associativity={c.assoc},policy={_QEMU_POLICY[c.policy]},line={c.line}"])
    return lines


def qemu_args(topo: Topology, warnings: list[str] | None = None) -> list[str]:
    """QEMU's options for `topo` (without the program name).

    ``[QEMU_BINARY, *qemu_args(topo)]`` starts the same machine; what QEMU
    cannot express is appended to `warnings` when given.
    """
    return [w for line in _qemu_lines(topo, warnings if warnings is not None else []) for w in line]


def _qemu(topo: Topology, warnings: list[str]) -> str:
    return _shell([[QEMU_BINARY]] + _qemu_lines(topo, warnings))


# ---------------------------------------------------------------- libvirt

_LIBVIRT_MODE = {Mode.BIND: "strict", Mode.PREFERRED: "preferred", Mode.INTERLEAVE: "interleave"}


def _libvirt(topo: Topology, warnings: list[str]) -> str:
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = VM_NAME
    ET.SubElement(dom, "memory", unit="KiB").text = str(topo.memory // KiB)
    ET.SubElement(dom, "vcpu", placement="static").text = str(topo.cpus)
    memnodes = []
    if topo.numa:
        for d in topo.domains:
            mode = _libvirt_mode(d, warnings) if d.size else None
            if mode is not None:
                memnodes.append({"cellid": str(d.id), "mode": mode[0], "nodeset": mode[1]})
    if memnodes:
        tune = ET.SubElement(dom, "numatune")
        for attrs in memnodes:
            ET.SubElement(tune, "memnode", attrs)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    feats = ET.SubElement(dom, "features")
    ET.SubElement(feats, "acpi")  # without it libvirt turns ACPI off: no SRAT/SLIT
    ET.SubElement(feats, "apic")
    if topo.memory > LOW_RAM_LIMIT:
        warnings.append(
            "libvirt has no setting for QEMU's max-ram-below-4g=3G; with more than 3G of RAM "
            "the guest-physical ranges of the domains may differ from numavm's")
    if topo.numa:
        cpu = ET.SubElement(dom, "cpu")
        s = _sockets_warning(topo, warnings, "<topology>")
        if s is not None:
            ET.SubElement(cpu, "topology", sockets=str(s[0]), dies="1", cores=str(s[1]), threads="1")
        numa = ET.SubElement(cpu, "numa")
        n = len(topo.domains)
        # libvirt drives QEMU's HMAT: the same attachments, the same caches refused
        attached = _qemu_initiators(topo, warnings) if topo.hmat or topo.caches else {}
        caches = _qemu_caches(topo, warnings)
        for d in topo.domains:
            attrs = {"id": str(d.id)}
            if d.cpus:  # a memory-only cell leaves cpus out (libvirt 6.6+)
                attrs["cpus"] = _comma_list(d.cpus)
            attrs["memory"] = str(d.size // KiB)
            attrs["unit"] = "KiB"
            cell = ET.SubElement(numa, "cell", attrs)
            if not d.size:
                warnings.append(
                    f"domain {d.id} is CPU-only: written as a cell with memory='0', "
                    "which libvirt may refuse (it may want memory in every cell)")
            if n > 1:
                dist = ET.SubElement(cell, "distances")
                for j in range(n):
                    ET.SubElement(dist, "sibling", id=str(j), value=str(topo.distances[d.id][j]))
            for c in (c for c in caches if c.domain == d.id):
                cache = ET.SubElement(cell, "cache", level=str(c.level),
                                      associativity={"complex": "full"}.get(c.assoc, c.assoc), policy=c.policy)
                ET.SubElement(cache, "size", value=str(c.size // KiB), unit="KiB")
                ET.SubElement(cache, "line", value=str(c.line), unit="B")
        if topo.hmat:
            ic = ET.SubElement(numa, "interconnects")
            # libvirt attaches a cell without vCPUs to the initiator of the first <latency> naming it
            # (virDomainNumaGetNodeInitiator): the one numavm's HMAT lets Linux pick comes first
            first = sorted(topo.hmat, key=lambda lk: attached.get(lk.target) != lk.initiator)
            for kind in ("latency", "bandwidth"):
                for lk in first:
                    for rw in ("read", "write"):
                        v = lk.value(f"{rw}_{kind}")
                        if v is None:
                            continue
                        attrs = {"initiator": str(lk.initiator), "target": str(lk.target), "type": rw,
                                 "value": str(v if kind == "latency" else v * 1024)}  # ns; KiB/s
                        if kind == "bandwidth":
                            attrs["unit"] = "KiB"
                        ET.SubElement(ic, kind, attrs)
    ET.indent(dom, space="  ")
    return ET.tostring(dom, encoding="unicode") + "\n"


def _libvirt_mode(d: Domain, warnings: list[str]) -> tuple[str, str] | None:
    p = d.policy
    if p.mode is Mode.LOCAL:
        warnings.append(_no_local(d, "libvirt"))
    if p.mode in (Mode.DEFAULT, Mode.LOCAL):
        return None
    nodeset = _comma_list(p.nodes)
    if p.mode is Mode.PREFERRED_MANY:
        warnings.append(
            f"domain {d.id}: libvirt has no preferred-many; wrote mode='preferred' nodeset='{nodeset}' "
            "(QEMU 8.0+ built with libnuma applies that as preferred-many, older QEMU prefers the "
            "first node only, and some libvirt versions accept only one node)")
        return "preferred", nodeset
    if p.mode is Mode.WEIGHTED_INTERLEAVE:
        warnings.append(
            f"domain {d.id}: libvirt has no weighted-interleave; wrote mode='interleave' "
            f"nodeset='{nodeset}' (equal weights)")
        return "interleave", nodeset
    return _LIBVIRT_MODE[p.mode], nodeset


# ---------------------------------------------------------------- Cloud Hypervisor


def _ch_host_node(d: Domain, warnings: list[str]) -> int | None:
    """CH binds a memory zone to one host node (host_numa_node=) or to none."""
    p = d.policy
    if p.mode is Mode.LOCAL:
        warnings.append(_no_local(d, "Cloud Hypervisor"))
    if p.mode in (Mode.DEFAULT, Mode.LOCAL):
        return None
    if p.mode is Mode.BIND and len(p.nodes) == 1:
        return p.nodes[0]
    if p.mode in (Mode.BIND, Mode.PREFERRED, Mode.PREFERRED_MANY):
        what = {Mode.BIND: "binds to one host node only",
                Mode.PREFERRED: "cannot prefer a node, only bind to it",
                Mode.PREFERRED_MANY: "has no preferred-many"}[p.mode]
        warnings.append(
            f"domain {d.id}: Cloud Hypervisor {what}; policy {p} became host_numa_node={p.nodes[0]} "
            "(a strict bind to that node)")
        return p.nodes[0]
    warnings.append(
        f"domain {d.id}: Cloud Hypervisor cannot interleave; policy {p} dropped "
        "(the zone's memory follows the host's default policy)")
    return None


def _no_hmat(topo: Topology, warnings: list[str], peer: str) -> None:
    if topo.hmat:
        warnings.append(f"{peer} has no HMAT: the latency and bandwidth figures ({len(topo.hmat)} --hmat "
                        f"entries) are left out; the guest sees distances only, and no memory tiers from them")
    if topo.caches:
        warnings.append(f"{peer} has no HMAT: the memory-side caches of domain(s) "
                        f"{format_list(sorted({c.domain for c in topo.caches}))} are left out")


def _ch(topo: Topology, warnings: list[str]) -> str:
    _no_hmat(topo, warnings, "Cloud Hypervisor")
    cpus = f"boot={topo.cpus}"
    if not topo.numa:
        return _shell([[CH_BINARY], ["--cpus", cpus], ["--memory", f"size={format_size(topo.memory)}"]])
    s = _sockets_warning(topo, warnings, "--cpus topology=")
    if s is not None:
        # threads_per_core:cores_per_die:dies_per_package:packages
        cpus += f",topology=1:{s[1]}:1:{s[0]}"
    lines: list[list[str]] = [[CH_BINARY], ["--cpus", cpus], ["--memory", "size=0"]]
    zones = []
    for d in topo.domains:
        if not d.size:
            continue
        z = f"id=mem{d.id},size={format_size(d.size)}"
        host = _ch_host_node(d, warnings)
        if host is not None:
            z += f",host_numa_node={host}"
        zones.append(z)
    # One flag followed by all its values: older CH refuses a repeated flag.
    lines.append(["--memory-zone", zones[0]])
    lines += [[_MORE, z] for z in zones[1:]]
    n = len(topo.domains)
    nodes = []
    for d in topo.domains:
        node = f"guest_numa_id={d.id}"
        if d.cpus:
            node += f",cpus=[{_comma_list(d.cpus)}]"
        if n > 1:
            node += ",distances=[" + ",".join(
                f"{j}@{topo.distances[d.id][j]}" for j in range(n) if j != d.id) + "]"
        if d.size:
            node += f",memory_zones=mem{d.id}"
        nodes.append(node)
    lines.append(["--numa", nodes[0]])
    lines += [[_MORE, x] for x in nodes[1:]]
    return _shell(lines)


# ---------------------------------------------------------------- bhyve


def _bhyve_policy(d: Domain, warnings: list[str]) -> str | None:
    """A domainset(9) policy string, with bhyve's ``,``-separated node list."""
    p = d.policy
    nodes = _comma_list(p.nodes)
    if p.mode is Mode.DEFAULT:
        return None
    if p.mode is Mode.LOCAL:
        return "first-touch"
    if p.mode is Mode.PREFERRED:
        return f"prefer:{nodes}"
    if p.mode is Mode.INTERLEAVE:
        return f"round-robin:{nodes}"
    if p.mode is Mode.BIND:
        warnings.append(
            f"domain {d.id}: bhyve has no strict bind; {p} became first-touch:{nodes}, "
            "which allocates from those host domains, nearest first")
        return f"first-touch:{nodes}"
    if p.mode is Mode.PREFERRED_MANY:
        warnings.append(
            f"domain {d.id}: bhyve's prefer takes one host domain; {p} became prefer:{p.nodes[0]}")
        return f"prefer:{p.nodes[0]}"
    warnings.append(
        f"domain {d.id}: bhyve has no weighted-interleave; {p} became round-robin:{nodes} (equal weights)")
    return f"round-robin:{nodes}"


def _bhyve(topo: Topology, warnings: list[str]) -> str:
    _no_hmat(topo, warnings, "bhyve")
    if not topo.numa:
        return _shell([[BHYVE_BINARY], ["-c", str(topo.cpus)], ["-m", format_size(topo.memory)], [VM_NAME]])
    if not _default_distances(topo):
        warnings.append(
            f"cannot set NUMA distances in bhyve; the guest sees {LOCAL_DISTANCE} within a domain and "
            f"{DEFAULT_DISTANCE} between domains instead of the distances given")
    kept = [d for d in topo.domains if d.cpus]
    dropped = [d for d in topo.domains if not d.cpus]
    memory = sum(d.size for d in kept)
    sizes = {d.id: d.size for d in kept}
    if not memory:
        # every domain with vCPUs is CPU-only: `-m 0` is no machine (bhyve, and numavm's import, refuse
        # it), so the first takes the memory-only domains' memory
        first = kept[0]
        memory = sizes[first.id] = sum(d.size for d in dropped)
        warnings.append(
            f"bhyve wants cpus= in every domain and memory in the guest: the memory-only domains "
            f"{format_list([d.id for d in dropped])} ({format_size(memory)}) cannot be expressed, and their "
            f"memory goes to CPU-only domain {first.id}")
    else:
        for d in dropped:
            warnings.append(
                f"memory-only domain {d.id} ({format_size(d.size)}, no vCPUs) cannot be expressed: bhyve wants "
                f"cpus= in every domain; left out, so the guest gets {format_size(memory)} instead of "
                f"{format_size(topo.memory)}")
    if any(new != d.id for new, d in enumerate(kept)):
        warnings.append("bhyve's domain ids run 0.. without gaps: the domains with vCPUs are renumbered "
                        + ", ".join(f"{d.id}->{new}" for new, d in enumerate(kept) if new != d.id))
    lines: list[list[str]] = [[BHYVE_BINARY], ["-c", str(topo.cpus)], ["-m", format_size(memory)]]
    for new, d in enumerate(kept):
        # bhyve splits -n at every ',', so a list holding one is set with -o.
        opts = [f"id={new}", f"size={format_size(sizes[d.id])}"]
        extra: list[str] = []
        values = [("cpus", _comma_list(d.cpus)), ("domain_policy", _bhyve_policy(d, warnings))]
        for key, value in values:
            if value is None:
                continue
            if "," in value:
                extra.append(f"domains.{new}.{key}={value}")
            else:
                opts.append(f"{key}={value}")
        lines.append(["-n", ",".join(opts)])
        lines += [["-o", e] for e in extra]
    lines.append([VM_NAME])
    return _shell(lines)


# ---------------------------------------------------------------- numavm TOML


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml(topo: Topology, warnings: list[str]) -> str:
    out = ["version = 1", f"cpus = {topo.cpus}", f"memory = {_toml_str(format_size(topo.memory))}"]
    if not topo.numa:
        return "\n".join(out) + "\n"
    # Top-level keys first: after a [[domain]] header they would land in it.
    out.append("distances = [")
    out += [f"  [{', '.join(str(v) for v in row)}]," for row in topo.distances]
    out.append("]")
    if topo.hmat:
        out.append("hmat = [")
        for lk in topo.hmat:
            figs = ",".join(f"{a.replace('_', '-')}={lk.value(a)}" for a in HMAT_ATTRS if lk.value(a) is not None)
            out.append(f"  {_toml_str(f'{lk.initiator}:{lk.target},{figs}')},")
        out.append("]")
    if topo.caches:
        out.append("hmat_cache = [")
        out += [f"  {_toml_str(f'{c.domain},size={format_size(c.size)},level={c.level},line={c.line},assoc={c.assoc},policy={c.policy}')},"
                for c in topo.caches]
        out.append("]")
    for d in topo.domains:
        out += ["", "[[domain]]", f"id = {d.id}", f"size = {_toml_str(format_size(d.size))}"]
        if d.cpus:
            out.append(f"cpus = {_toml_str(format_list(d.cpus))}")
        if d.policy.mode is not Mode.DEFAULT:
            out.append(f"policy = {_toml_str(str(d.policy))}")
        if d.hugepages:
            out.append(f"hugepages = {_toml_str(d.hugepages)}")
    return "\n".join(out) + "\n"


_EXPORTERS: dict[str, Callable[[Topology, list[str]], str]] = {
    "qemu": _qemu,
    "libvirt": _libvirt,
    "cloud-hypervisor": _ch,
    "bhyve": _bhyve,
    "toml": _toml,
}
assert tuple(_EXPORTERS) == FORMATS
