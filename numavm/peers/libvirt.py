"""A libvirt domain XML: ``<vcpu>``, ``<memory>``, ``<cpu><numa><cell>`` with
``<distances>``, ``<numatune>`` (``<memory>`` and ``<memnode>``) and
``<memoryBacking><hugepages/>``.

The XML is parsed by expat directly, with a DOCTYPE (and so any entity
declaration) refused: a domain XML has none, and this keeps entity expansion
out whatever the Python and expat versions (3.11's ElementTree would expand
internal entities, within expat's amplification limits).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.parsers import expat

from numavm.errors import ConfigError
from numavm.spec.policy import MAX_HOST_NODES, Mode, Policy
from numavm.spec.topology import MAX_CPUS, DomainSpec, HmatLink, MachineSpec, MemoryCache
from numavm.spec.units import format_list, parse_int
from numavm.peers import Imported, comma_list

FMT = "libvirt"
# libvirt's memory units (docs: formatdomain, "Memory Allocation"); the default is KiB
_UNITS = {"b": 1, "bytes": 1, "kb": 1000, "k": 1 << 10, "kib": 1 << 10, "mb": 1000**2, "m": 1 << 20,
          "mib": 1 << 20, "gb": 1000**3, "g": 1 << 30, "gib": 1 << 30, "tb": 1000**4, "t": 1 << 40,
          "tib": 1 << 40, "pb": 1000**5, "p": 1 << 50, "pib": 1 << 50, "eb": 1000**6, "e": 1 << 60,
          "eib": 1 << 60}
_MODES = {"strict": Mode.BIND, "preferred": Mode.PREFERRED, "interleave": Mode.INTERLEAVE}


def parse_xml(text: str) -> ET.Element:
    """The document's root element; a DOCTYPE or entity declaration is refused."""
    builder = ET.TreeBuilder()
    # the text was read as UTF-8: that is its encoding, whatever its declaration says (an
    # encoding Python does not know raised LookupError)
    parser = expat.ParserCreate("utf-8")

    def no_dtd(name: str, *_: object) -> None:
        raise ConfigError(f"the XML has a DOCTYPE ({name}); a domain XML has none, and numavm "
                          "expands no entities")

    def no_entity(name: str, *_: object) -> None:
        raise ConfigError(f"the XML declares an entity ({name}); numavm expands no entities")

    parser.StartDoctypeDeclHandler = no_dtd
    parser.EntityDeclHandler = no_entity
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = lambda tag, attrs: builder.start(tag, attrs)
    parser.EndElementHandler = lambda tag: builder.end(tag)
    parser.CharacterDataHandler = lambda data: builder.data(data)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"not UTF-8 text: {e.reason} at offset {e.start}") from None
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise ConfigError(f"not well-formed XML: {expat.ErrorString(e.code)} "
                          f"at line {e.lineno}, column {e.offset}") from None
    except LookupError as e:
        raise ConfigError(f"an XML encoding numavm does not read ({e}); domain XML is UTF-8") from None
    return builder.close()


def _memory(el: ET.Element, where: str) -> int:
    unit = el.get("unit", "KiB")
    mult = _UNITS.get(unit.lower())
    if mult is None:
        raise ConfigError(f"{where}: unknown unit {unit!r} (libvirt's: b, KiB, MiB, GiB, TiB, KB, MB, ...)")
    text = (el.text or "").strip() if el.tag != "cell" else el.get("memory", "")
    n = parse_int(text, where)
    if n < 0:
        raise ConfigError(f"{where}: cannot be negative, got {n}")
    return n * mult


def _policy(mode: str | None, nodeset: str | None, placement: str | None, where: str) -> Policy:
    if placement == "auto":
        raise ConfigError(f"{where} placement='auto': numad chooses the host nodes at start; name them "
                          "with nodeset=")
    mode = mode or "strict"
    if mode == "restrictive":
        raise ConfigError(f"{where} mode='restrictive': a cgroup-only limit with no memory policy; numavm "
                          "applies policies with mbind (use strict for bind)")
    if mode not in _MODES:
        raise ConfigError(f"{where} mode={mode!r}: libvirt's modes are strict, preferred, interleave, "
                          "restrictive")
    if not nodeset:
        raise ConfigError(f"{where}: needs nodeset=")
    nodes = comma_list(nodeset, f"{where} nodeset", MAX_HOST_NODES)
    m = _MODES[mode]
    if m is Mode.PREFERRED and len(nodes) > 1:
        m = Mode.PREFERRED_MANY  # what QEMU 8.0+ makes of several preferred nodes
    return Policy(m, nodes)


def read(text: str) -> Imported:
    root = parse_xml(text)
    if root.tag != "domain":
        raise ConfigError(f"the root element is <{root.tag}>, expected <domain>")
    notes: list[str] = []
    spec = MachineSpec()
    vcpu = root.find("vcpu")
    if vcpu is not None:
        spec.cpus = parse_int(vcpu.text or "", "<vcpu>")
        current = vcpu.get("current")
        if current is not None and parse_int(current, "<vcpu current>") != spec.cpus:
            raise ConfigError(f"<vcpu current='{current}'>: numavm has no vCPU hotplug; every vCPU is "
                              "present at boot")
        if vcpu.get("cpuset"):
            notes.append(f"<vcpu cpuset='{vcpu.get('cpuset')}'> left out: numavm pins each vCPU to the host "
                         "nodes of its domain's policy")
    mem = root.find("memory")
    if mem is not None:
        spec.memory = _memory(mem, "<memory>")
    if root.find("maxMemory") is not None:
        raise ConfigError("<maxMemory>: numavm has no memory hotplug; all memory is present at boot")
    huge = root.find("memoryBacking/hugepages") is not None
    tune = root.find("numatune")
    default = Policy()
    cell_policy: dict[int, Policy] = {}
    if tune is not None:
        m = tune.find("memory")
        if m is not None:
            default = _policy(m.get("mode"), m.get("nodeset"), m.get("placement"), "<numatune><memory>")
        for mn in tune.findall("memnode"):
            where = f"<memnode cellid='{mn.get('cellid')}'>"
            cid = parse_int(mn.get("cellid", ""), f"{where} cellid")
            if cid in cell_policy:
                raise ConfigError(f"{where}: given twice")
            cell_policy[cid] = _policy(mn.get("mode"), mn.get("nodeset"), None, where)
    cells = root.findall("cpu/numa/cell")
    if not cells:
        if default != Policy() or cell_policy:
            raise ConfigError("<numatune>: a policy for a guest without <numa> cells; numavm's classic "
                              "machine has none (give the guest one <cell>)")
        if huge:
            notes.append("<hugepages/>: numavm's classic machine has no per-domain pages; give --hugepages "
                         "hugetlbfs to run/check")
        return Imported(spec, notes)
    for pos, cell in enumerate(cells):
        cid = parse_int(cell.get("id", str(pos)), "<cell> id")
        where = f"<cell id='{cid}'>"
        cpus = comma_list(cell.get("cpus", ""), f"{where} cpus", MAX_CPUS) if cell.get("cpus") else ()
        dom = DomainSpec(cid, _memory(cell, f"{where} memory"), cpus,
                         cell_policy.pop(cid, default), "hugetlbfs" if huge else None, where)
        spec.domains.append(dom)
        for k, cache in enumerate(cell.findall("cache")):
            spec.caches.append(_cache(cache, cid, f"{where} <cache level='{cache.get('level')}'>"))
        for sib in cell.findall("distances/sibling"):
            swhere = f"{where} <sibling id='{sib.get('id')}'>"
            spec.distances.append((cid, parse_int(sib.get("id", ""), f"{swhere} id"),
                                   parse_int(sib.get("value", ""), f"{swhere} value"), swhere))
    if cell_policy:
        raise ConfigError(f"<memnode cellid='{min(cell_policy)}'>: no <cell id='{min(cell_policy)}'>")
    # the SLIT is a full matrix: a sibling list names every cell, the cell itself at 10
    rows: dict[int, set[int]] = {}
    for i, j, _, _ in spec.distances:
        rows.setdefault(i, set()).add(j)
    short = sorted(i for i, js in rows.items() if len(js) < len(cells))
    if short:
        notes.append(f"the <distances> of cells {format_list(short)} do not name every cell; the pairs left "
                     "out are 20 (numavm's default) unless the other cell names them")
    spec.hmat = _interconnects(root.findall("cpu/numa/interconnects/*"))
    return Imported(spec, notes)


_ASSOC = {"none": "none", "direct": "direct", "full": "complex"}  # libvirt's words -> numavm's
_CACHE_POLICY = {"none": "none", "writeback": "writeback", "writethrough": "writethrough"}


def _cache(el: ET.Element, cid: int, where: str) -> MemoryCache:
    """A cell's <cache level associativity policy><size/><line/></cache>: numavm's --hmat-cache."""
    from numavm.spec.topology import parse_hmat_cache

    assoc, policy = el.get("associativity", "none"), el.get("policy", "none")
    if assoc not in _ASSOC:
        raise ConfigError(f"{where} associativity={assoc!r}: libvirt's are none, direct, full")
    if policy not in _CACHE_POLICY:
        raise ConfigError(f"{where} policy={policy!r}: libvirt's are none, writeback, writethrough")
    size, line = el.find("size"), el.find("line")
    if size is None or line is None:
        raise ConfigError(f"{where}: needs <size> and <line>")
    nbytes = _value(size, f"{where} <size>", "KiB")
    line_bytes = _value(line, f"{where} <line>", "B")
    return parse_hmat_cache(f"{cid},size={nbytes},level={el.get('level', '')},line={line_bytes},"
                            f"assoc={_ASSOC[assoc]},policy={_CACHE_POLICY[policy]}", f"{where} (--hmat-cache)")


def _value(el: ET.Element, where: str, unit: str) -> int:
    """An element's value= in bytes, in its unit= (default `unit`)."""
    u = el.get("unit", unit)
    mult = _UNITS.get(u.lower())
    if mult is None:
        raise ConfigError(f"{where}: unknown unit {u!r} (libvirt's: b, KiB, MiB, GiB, KB, MB, ...)")
    return parse_int(el.get("value", ""), f"{where} value") * mult


def _interconnects(items: list[ET.Element]) -> list[HmatLink]:
    """<interconnects>' <latency> (ns) and <bandwidth> (per second, unit= default KiB) entries:
    numavm's --hmat figures, one link per initiator and target.  type='access' is both read
    and write; cache= (a figure for a cache level, not the memory) numavm cannot express."""
    from numavm.spec.topology import parse_hmat

    figures: dict[tuple[int, int], dict[str, int]] = {}
    for el in items:
        kind = el.tag
        where = (f"<interconnects><{kind} initiator='{el.get('initiator')}' target='{el.get('target')}' "
                 f"type='{el.get('type')}'>")
        if kind not in ("latency", "bandwidth"):
            raise ConfigError(f"<interconnects><{kind}>: expected <latency> or <bandwidth>")
        if el.get("cache") is not None:
            raise ConfigError(f"{where} cache='{el.get('cache')}': a figure for a memory-side cache level; "
                              "numavm's HMAT gives figures for memory only")
        rw = el.get("type", "")
        if rw not in ("access", "read", "write"):
            raise ConfigError(f"{where}: type must be access, read or write")
        key = (parse_int(el.get("initiator", ""), f"{where} initiator"),
               parse_int(el.get("target", ""), f"{where} target"))
        if kind == "latency":
            value = parse_int(el.get("value", ""), f"{where} value")  # ns
        else:
            per_second = _value(el, where, "KiB")
            if per_second % (1 << 20):
                raise ConfigError(f"{where}: {per_second} bytes/s is not a whole number of MiB/s, which "
                                  "numavm's --hmat bandwidth counts (as QEMU's HMAT does)")
            value = per_second >> 20
        fig = figures.setdefault(key, {})
        for side in (("read", "write") if rw == "access" else (rw,)):
            name = f"{side}-{kind}"
            if name in fig:
                raise ConfigError(f"{where}: the {side} {kind} of initiator {key[0]} and target {key[1]} "
                                  "given twice")
            fig[name] = value
    return [parse_hmat(f"{i}:{t}," + ",".join(f"{k}={v}" for k, v in fig.items()), "<interconnects>")
            for (i, t), fig in figures.items()]
