"""A QEMU command line: ``-smp``, ``-m``, ``-numa node|dist|cpu`` and the
``-object memory-backend-*`` the nodes name (``size``, ``host-nodes``,
``policy``, ``prealloc``, ``hugetlb``).  Other options (devices, disks, the
accelerator) do not describe the NUMA machine and are listed in a note."""

from __future__ import annotations

import itertools

from numavm.errors import ConfigError
from numavm.spec.policy import MAX_HOST_NODES, Mode, Policy
from numavm.spec.topology import MAX_CPUS, DomainSpec, HmatLink, MachineSpec, MemoryCache
from numavm.spec.units import Members, MiB, format_list, parse_int, parse_list
from numavm.peers import Imported, command_words, flag, size

FMT = "qemu"
_BACKENDS = ("memory-backend-ram", "memory-backend-memfd", "memory-backend-file")
_POLICIES = {"default": Mode.DEFAULT, "preferred": Mode.PREFERRED, "bind": Mode.BIND,
             "interleave": Mode.INTERLEAVE}
# backend properties that change nothing numavm models (sharing, dumps, KSM, reservations)
_BACKEND_HARMLESS = {"id", "qom-type", "size", "host-nodes", "policy", "prealloc", "prealloc-threads",
                     "prealloc-context", "merge", "dump", "share", "reserve", "hugetlb", "hugetlbsize",
                     "seal", "x-use-canonical-path-for-ramblock-id"}
# QEMU options without a value (the others take the next word)
_NO_VALUE = {"-enable-kvm", "-nographic", "-no-reboot", "-no-shutdown", "-S", "-snapshot", "-daemonize",
             "-no-hpet", "-no-acpi", "-no-user-config", "-nodefaults", "-mem-prealloc", "-s", "-full-screen",
             "-no-fd-bootchk", "-win2k-hack", "-no-quit", "-enable-fips", "-old-param", "-only-migratable"}


def opts(text: str, implied: str, where: str) -> list[tuple[str, str]]:
    """QEMU's key=value,... syntax: a first item without '=' is the `implied` key, ',,' is a comma."""
    out = []
    for k, item in enumerate(text.replace(",,", "\0").split(",")):
        item = item.replace("\0", ",")
        key, eq, value = item.partition("=")
        if not eq:
            if k or not item:
                raise ConfigError(f"{where} {text}: expected key=value, got {item!r}")
            key, value = implied, item
        out.append((key.strip(), value.strip()))
    return out


def _one(pairs: list[tuple[str, str]], where: str) -> dict[str, str]:
    d: dict[str, str] = {}
    for k, v in pairs:
        if k in d:
            raise ConfigError(f"{where}: {k}= given twice")
        d[k] = v
    return d


def read(text: str) -> Imported:
    words = command_words(text, FMT)
    smp: dict[str, str] = {}
    mem: dict[str, str] = {}
    backends: dict[str, dict[str, str | list[str]]] = {}
    nodes: list[list[tuple[str, str]]] = []
    dists: list[dict[str, str]] = []
    cpu_maps: list[dict[str, str]] = []
    lbs: list[dict[str, str]] = []
    hmat_caches: list[dict[str, str]] = []
    ignored: list[str] = []
    notes: list[str] = []
    k = 0
    while k < len(words):
        opt = words[k]
        if not opt.startswith("-"):
            raise ConfigError(f"{opt!r} is not an option (a QEMU command line is options and their values)")
        name = "-" + opt.lstrip("-")
        if name in _NO_VALUE:
            if name == "-mem-prealloc":
                notes.append("-mem-prealloc: numavm's machine file has no prefault; give --prefault to run/check")
            elif name not in ("-enable-kvm",):
                ignored.append(name)
            k += 1
            continue
        if k + 1 >= len(words):
            raise ConfigError(f"{name}: needs a value")
        value = words[k + 1]
        k += 2
        if name == "-smp":
            smp = _one(opts(value, "cpus", "-smp"), f"-smp {value}")
        elif name == "-m":
            mem = _one(opts(value, "size", "-m"), f"-m {value}")
        elif name == "-numa":
            pairs = opts(value, "type", "-numa")
            kind = pairs[0][1] if pairs[0][0] == "type" else ""
            if kind == "node":
                nodes.append(pairs[1:])
            elif kind == "dist":
                dists.append(_one(pairs[1:], f"-numa {value}"))
            elif kind == "cpu":
                cpu_maps.append(_one(pairs[1:], f"-numa {value}"))
            elif kind == "hmat-lb":
                lbs.append(_one(pairs[1:], f"-numa {value}"))
            elif kind == "hmat-cache":
                hmat_caches.append(_one(pairs[1:], f"-numa {value}"))
            else:
                raise ConfigError(f"-numa {value}: expected node, dist, cpu, hmat-lb or hmat-cache")
        elif name == "-object":
            pairs = opts(value, "qom-type", "-object")
            props = dict(pairs)
            if props.get("qom-type") in _BACKENDS:
                b: dict[str, str | list[str]] = {}
                for key, v in pairs:
                    if key == "host-nodes":  # repeated for each range
                        hn = b.setdefault("host-nodes", [])
                        assert isinstance(hn, list)
                        hn.append(v)
                    elif key in b:
                        raise ConfigError(f"-object {value}: {key}= given twice")
                    else:
                        b[key] = v
                if "id" not in b:
                    raise ConfigError(f"-object {value}: a memory backend needs id=")
                if b["id"] in backends:
                    raise ConfigError(f"-object {value}: id={b['id']} is already another backend's")
                backends[str(b["id"])] = b
            else:
                ignored.append(f"-object {props.get('qom-type', '?')}")
        elif name in ("-machine", "-M"):
            m = dict(opts(value, "type", name))
            low = m.get("max-ram-below-4g")
            if low is not None and size(low, f"{name} max-ram-below-4g") != 3 << 30:
                notes.append(f"{name} max-ram-below-4g={low}: numavm puts RAM below 3G and the rest from 4G; "
                             "guest-physical addresses differ, the topology is the same")
        elif name == "-mem-path":
            raise ConfigError(f"-mem-path {value}: numavm backs guest memory with its own memfds, not a "
                              "file; for huge pages use hugepages=hugetlbfs")
        else:
            ignored.append(name)
    cpus, topo = _smp(smp)
    spec = MachineSpec(cpus=cpus)
    if mem:
        total = size(mem.get("size", "128"), "-m", plain=MiB)
        maxmem = mem.get("maxmem")
        if maxmem is not None and size(maxmem, "-m maxmem") > total:
            raise ConfigError(f"-m maxmem={maxmem}: numavm has no memory hotplug; all memory is present "
                              "at boot")
        spec.memory = total
    used: set[str] = set()
    prealloc: list[int] = []
    for pos, pairs in enumerate(nodes):
        spec.domains.append(_node(pairs, pos, backends, used, prealloc))
    by_id = {d.id: d for d in spec.domains}
    if len(cpu_maps) > (cpus or 1):  # each names a vCPU at least; the cost stays linear in the input
        raise ConfigError(f"-numa cpu: {len(cpu_maps)} of them for {cpus or 1} vCPUs; at most one per vCPU")
    mapped: dict[int, set[int]] = {}
    for c in cpu_maps:
        _cpu_map(c, by_id, topo, mapped)
    for node, found in mapped.items():
        by_id[node].cpus = tuple(sorted(found))
    for d in dists:
        where = f"-numa dist,src={d.get('src')},dst={d.get('dst')},val={d.get('val')}"
        if set(d) != {"src", "dst", "val"}:
            raise ConfigError(f"{where}: expected src=, dst= and val=")
        spec.distances.append((parse_int(d["src"], f"{where} src"), parse_int(d["dst"], f"{where} dst"),
                               parse_int(d["val"], f"{where} val"), where))
    if not spec.domains and (dists or cpu_maps or lbs or hmat_caches):
        raise ConfigError("-numa: dist, cpu, hmat-lb and hmat-cache need -numa node options")
    spec.hmat = _hmat_lb(lbs)
    spec.caches = [_hmat_cache(c) for c in hmat_caches]
    for bid in sorted(set(backends) - used):
        notes.append(f"-object {backends[bid]['qom-type']},id={bid}: no -numa node uses it; left out")
    if prealloc:
        notes.append(f"prealloc=on (domains {format_list(prealloc)}): numavm's machine file has no prefault; "
                     f"give --prefault {format_list(prealloc)} to run/check")
    if ignored:
        notes.append("left out, not part of the NUMA machine: " + ", ".join(dict.fromkeys(ignored)))
    return Imported(spec, notes)


def _smp(smp: dict[str, str]) -> tuple[int | None, tuple[int, int, int, int, int]]:
    """vCPUs, and (sockets, dies, clusters, cores, threads) for -numa cpu."""
    where = "-smp"
    known = {"cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus", "books", "drawers"}
    bad = sorted(set(smp) - known)
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]}= (keys: {', '.join(sorted(known))})")
    n = {k: parse_int(v, f"{where} {k}") for k, v in smp.items()}
    if any(v < 1 for k, v in n.items() if k != "cpus") or n.get("cpus", 1) < 0:
        raise ConfigError(f"{where}: counts must be 1 or more")
    dies, clusters, threads = n.get("dies", 1), n.get("clusters", 1), n.get("threads", 1)
    cores, sockets = n.get("cores"), n.get("sockets")
    cpus = n.get("cpus") or None
    if cpus is None and (cores or sockets):
        cpus = (sockets or 1) * dies * clusters * (cores or 1) * threads
    if cpus is None:
        return (1 if smp else None), (1, 1, 1, 1, 1)
    per = dies * clusters * threads
    if cores is None:
        cores = max(cpus // (per * (sockets or 1)), 1)
    if sockets is None:
        sockets = max(cpus // (per * cores), 1)
    if cpus > MAX_CPUS:
        raise ConfigError(f"{where}: at most {MAX_CPUS} vCPUs, got {cpus}")
    if sockets * per * cores != cpus:
        raise ConfigError(f"{where}: sockets*dies*clusters*cores*threads = {sockets * per * cores}, not {cpus} "
                          "(QEMU refuses it too)")
    maxcpus = n.get("maxcpus", cpus)
    if maxcpus > cpus:
        raise ConfigError(f"{where} maxcpus={maxcpus}: numavm has no vCPU hotplug; every vCPU is present at boot "
                          f"(give {cpus})")
    return cpus, (sockets, dies, clusters, cores, threads)


def _policy(b: dict[str, str | list[str]], where: str) -> Policy:
    raw = b.get("host-nodes", [])
    assert isinstance(raw, list)
    members = Members(f"{where} host-nodes", "node")
    for r in raw:
        members.add(parse_list(r.replace(",", "+"), f"{where} host-nodes", MAX_HOST_NODES))
    nodes = members.sorted()
    name = str(b.get("policy", "default"))
    if name not in _POLICIES:
        raise ConfigError(f"{where} policy={name}: QEMU's policies are {', '.join(_POLICIES)}")
    mode = _POLICIES[name]
    if mode is Mode.DEFAULT:
        if nodes:
            raise ConfigError(f"{where}: host-nodes with policy=default (QEMU refuses it too)")
        return Policy()
    if not nodes:
        raise ConfigError(f"{where} policy={name}: needs host-nodes=")
    if mode is Mode.PREFERRED and len(nodes) > 1:
        mode = Mode.PREFERRED_MANY  # what QEMU 8.0+ makes of several preferred nodes
    return Policy(mode, tuple(sorted(nodes)))


def _node(pairs: list[tuple[str, str]], pos: int, backends: dict[str, dict[str, str | list[str]]],
          used: set[str], prealloc: list[int]) -> DomainSpec:
    cpus = Members("-numa node cpus", "vCPU")
    keys: dict[str, str] = {}
    for k, v in pairs:
        if k == "cpus":  # repeatable, a number or a range each
            cpus.add(parse_list(v, "-numa node cpus", MAX_CPUS))
        elif k in ("nodeid", "mem", "memdev", "initiator"):
            if k in keys:
                raise ConfigError(f"-numa node: {k}= given twice")
            keys[k] = v
        else:
            raise ConfigError(f"-numa node: unknown key {k}= (keys: nodeid, cpus, memdev, mem, initiator)")
    nid = parse_int(keys["nodeid"], "-numa node nodeid") if "nodeid" in keys else pos
    where = f"-numa node,nodeid={nid}"
    if "mem" in keys and "memdev" in keys:
        raise ConfigError(f"{where}: mem= and memdev= together (QEMU refuses it too)")
    dom = DomainSpec(nid, 0, cpus.sorted(), origin=where)
    if "mem" in keys:
        dom.size = size(keys["mem"], f"{where} mem", plain=MiB)
    elif "memdev" in keys:
        bid = keys["memdev"]
        b = backends.get(bid)
        if b is None:
            raise ConfigError(f"{where} memdev={bid}: no -object memory-backend-*,id={bid}")
        if bid in used:
            raise ConfigError(f"{where} memdev={bid}: already another node's memory")
        used.add(bid)
        bwhere = f"-object {b['qom-type']},id={bid}"
        if b["qom-type"] == "memory-backend-file":
            raise ConfigError(f"{bwhere}: numavm backs guest memory with its own memfds, not a file "
                              f"(mem-path={b.get('mem-path', '')}); for huge pages use hugepages=hugetlbfs")
        other = sorted(set(b) - _BACKEND_HARMLESS)
        if other:
            raise ConfigError(f"{bwhere}: {other[0]}= cannot be expressed in numavm's machine")
        if "size" not in b:
            raise ConfigError(f"{bwhere}: needs size=")
        dom.size = size(str(b["size"]), f"{bwhere} size")
        dom.policy = _policy(b, bwhere)
        if flag(str(b.get("hugetlb", "off")), f"{bwhere} hugetlb"):
            dom.hugepages = "hugetlbfs"
        if flag(str(b.get("prealloc", "off")), f"{bwhere} prealloc"):
            prealloc.append(nid)
    return dom


_LB_TYPES = {"access-latency": ("read-latency", "write-latency"), "read-latency": ("read-latency",),
             "write-latency": ("write-latency",),
             "access-bandwidth": ("read-bandwidth", "write-bandwidth"), "read-bandwidth": ("read-bandwidth",),
             "write-bandwidth": ("write-bandwidth",)}


def _hmat_lb(lbs: list[dict[str, str]]) -> list[HmatLink]:
    """``-numa hmat-lb``: numavm's --hmat figures, one link per initiator and target.  QEMU's
    latency is in ns, its bandwidth in bytes/s with a size suffix (``16000M``: MiB/s, which
    numavm's MB/s count, as QEMU's HMAT does)."""
    from numavm.spec.topology import parse_hmat

    figures: dict[tuple[int, int], dict[str, int]] = {}
    for lb in lbs:
        where = "-numa hmat-lb," + ",".join(f"{k}={v}" for k, v in lb.items())
        bad = sorted(set(lb) - {"initiator", "target", "hierarchy", "data-type", "latency", "bandwidth"})
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]}= (keys: initiator, target, hierarchy, data-type, "
                              "latency, bandwidth)")
        if lb.get("hierarchy", "memory") != "memory":
            raise ConfigError(f"{where}: hierarchy={lb['hierarchy']} gives figures for a cache level; numavm's "
                              "HMAT gives figures for memory only")
        kind = lb.get("data-type", "")
        if kind not in _LB_TYPES:
            raise ConfigError(f"{where}: data-type must be one of {', '.join(_LB_TYPES)}")
        if "initiator" not in lb or "target" not in lb:
            raise ConfigError(f"{where}: needs initiator= and target=")
        key = (parse_int(lb["initiator"], f"{where} initiator"), parse_int(lb["target"], f"{where} target"))
        if kind.endswith("latency"):
            if "latency" not in lb or "bandwidth" in lb:
                raise ConfigError(f"{where}: data-type={kind} takes latency= (ns)")
            value = parse_int(lb["latency"], f"{where} latency")
        else:
            if "bandwidth" not in lb or "latency" in lb:
                raise ConfigError(f"{where}: data-type={kind} takes bandwidth= (bytes/s, e.g. 16000M)")
            per_second = size(lb["bandwidth"], f"{where} bandwidth")
            if per_second % MiB:
                raise ConfigError(f"{where}: {per_second} bytes/s is not a whole number of MiB/s, which "
                                  "numavm's --hmat bandwidth counts")
            value = per_second // MiB
        fig = figures.setdefault(key, {})
        for name in _LB_TYPES[kind]:
            if name in fig:
                raise ConfigError(f"{where}: the {name.replace('-', ' ')} of initiator {key[0]} and target "
                                  f"{key[1]} given twice")
            fig[name] = value
    return [parse_hmat(f"{i}:{t}," + ",".join(f"{k}={v}" for k, v in fig.items()), "-numa hmat-lb")
            for (i, t), fig in figures.items()]


_QEMU_CACHE_POLICY = {"none": "none", "write-back": "writeback", "write-through": "writethrough"}


def _hmat_cache(c: dict[str, str]) -> MemoryCache:
    """``-numa hmat-cache,node-id,size,level,associativity,policy,line``: numavm's --hmat-cache."""
    from numavm.spec.topology import parse_hmat_cache

    where = "-numa hmat-cache," + ",".join(f"{k}={v}" for k, v in c.items())
    bad = sorted(set(c) - {"node-id", "size", "level", "associativity", "policy", "line"})
    if bad or "node-id" not in c or "size" not in c:
        raise ConfigError(f"{where}: expected node-id=, size= and level=, associativity=, policy=, line=")
    policy = c.get("policy", "none")
    if policy not in _QEMU_CACHE_POLICY:
        raise ConfigError(f"{where}: policy must be none, write-back or write-through")
    node = parse_int(c["node-id"], f"{where} node-id")
    nbytes = size(c["size"], f"{where} size")
    text = (f"{node},size={nbytes},level={c.get('level', '1')},line={c.get('line', '64')},"
            f"assoc={c.get('associativity', 'none')},policy={_QEMU_CACHE_POLICY[policy]}")
    return parse_hmat_cache(text, "-numa hmat-cache")


def _cpu_map(c: dict[str, str], by_id: dict[int, DomainSpec], topo: tuple[int, int, int, int, int],
             mapped: dict[int, set[int]]) -> None:
    """One ``-numa cpu``: the vCPUs it names join node-id's, in `mapped` (node -> vCPUs)."""
    where = "-numa cpu," + ",".join(f"{k}={v}" for k, v in c.items())
    keys = ("socket-id", "die-id", "cluster-id", "core-id", "thread-id")
    bad = sorted(set(c) - set(keys) - {"node-id"})
    if bad or "node-id" not in c:
        raise ConfigError(f"{where}: expected node-id= and socket-id/die-id/cluster-id/core-id/thread-id")
    node = parse_int(c["node-id"], f"{where} node-id")
    if node not in by_id:
        raise ConfigError(f"{where}: no -numa node,nodeid={node}")
    ids = [parse_int(c[k], f"{where} {k}") if k in c else None for k in keys]
    for k, v, top in zip(keys, ids, topo):
        if v is not None and not 0 <= v < top:
            raise ConfigError(f"{where}: {k} {v} does not exist (-smp gives 0..{top - 1})")
    # only the CPUs it names are visited: the ids given are fixed, the others run over their range
    _, dies, clusters, cores, threads = topo
    found = mapped.setdefault(node, set(by_id[node].cpus or ()))
    for s, d, cl, co, t in itertools.product(*((v,) if v is not None else range(top) for v, top in zip(ids, topo))):
        found.add(((((s * dies) + d) * clusters + cl) * cores + co) * threads + t)
