"""What the user asked for: vCPUs, memory, NUMA domains, distances, policies.

Two steps: options (command line `-n id=...` or a TOML file) become a
`MachineSpec` of loosely filled `DomainSpec`s; `MachineSpec.build()` applies
every rule and returns a validated, immutable `Topology`, or raises one
`ConfigError` naming the field.  Nothing here touches the host beyond reading
which NUMA nodes are online.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from numavm.errors import ConfigError
from numavm.spec.devices import Disk, check_disks, initiator_domains
from numavm.spec.policy import Policy, host_online_nodes, parse_policy
from numavm.spec.units import Members, MiB, TiB, format_list, format_size, parse_int, parse_list, parse_size

MAX_CPUS = 1024
MAX_DOMAINS = 256
GRANULE = 2 * MiB  # domain sizes are whole 2 MiB pages (huge-page friendly)
MIN_DOMAIN = 4 * MiB  # Linux drops NUMA nodes smaller than this (NODE_MIN_SIZE)
DEFAULT_MEMORY = 512 * MiB
MAX_MEMORY = 64 * TiB  # 46 physical address bits, what common hosts can map

LOCAL_DISTANCE = 10
DEFAULT_DISTANCE = 20
UNREACHABLE = 255

HUGEPAGES = ("thp", "hugetlbfs")
NUMA_KEYS = "id, size, cpus, domain_policy, hugepages"

CPUS_OPT = "-c/--cpus"
MEMORY_OPT = "-m/--memory"
NUMA_OPT = "-n/--numa"
DISTANCE_OPT = "--distance"
HMAT_OPT = "--hmat"
HMAT_CACHE_OPT = "--hmat-cache"

# HMAT (ACPI 6.3+, 5.2.27): what the table's fields can hold, as Linux reads them back.
# Linux (drivers/acpi/numa/hmat.c, hmat_normalize) multiplies each 16-bit entry by the table's
# base unit in 32 bits and drops the value when that overflows: latencies are picoseconds there,
# so at most 4294967 ns; bandwidths MB/s, at most 2^32-1.  0 and 0xFFFF mean "no value".
HMAT_MAX_ENTRY = 0xFFFE
HMAT_MAX_LATENCY_NS = 0xFFFF_FFFF // 1000
HMAT_MAX_BANDWIDTH = 0xFFFF_FFFF
HMAT_KEYS = "latency, bandwidth, read-latency, write-latency, read-bandwidth, write-bandwidth"
HMAT_ATTRS = ("read_latency", "write_latency", "read_bandwidth", "write_bandwidth")
CACHE_KEYS = "size, level, line, assoc, policy"
CACHE_ASSOC = ("none", "direct", "complex")  # the HMAT's associativity codes 0, 1, 2
CACHE_POLICY = ("none", "writeback", "writethrough")  # write policy codes 0, 1, 2
CACHE_MAX_LEVEL = 3  # the HMAT knows memory-side cache levels 1..3
HMAT_MAX_BYTES = 65535  # QEMU's -acpitable refuses larger tables; it also bounds the table area's share


@dataclass
class DomainSpec:
    """One `-n` option (or TOML [[domain]] table) as written, not yet checked."""

    id: int
    size: int | None = None
    cpus: tuple[int, ...] | None = None
    policy: Policy = Policy()
    hugepages: str | None = None  # "thp" or "hugetlbfs"; None: the machine's --hugepages
    origin: str = NUMA_OPT  # names this domain in errors


@dataclass
class MachineSpec:
    """The machine options as written; `build()` checks them."""

    cpus: int | None = None
    memory: int | None = None
    domains: list[DomainSpec] = field(default_factory=list)
    # (i, j, d, origin) in the order given
    distances: list[tuple[int, int, int, str]] = field(default_factory=list)
    hmat: list["HmatLink"] = field(default_factory=list)
    caches: list["MemoryCache"] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)

    def build(self, host_nodes: tuple[int, ...] | None = None) -> "Topology":
        return _build(self, host_nodes if host_nodes is not None else host_online_nodes())


@dataclass(frozen=True)
class Domain:
    id: int
    size: int  # bytes; 0 = CPU-only (memoryless)
    cpus: tuple[int, ...]  # vCPU indices; () = memory-only
    policy: Policy = Policy()
    hugepages: str | None = None  # "thp", "hugetlbfs", or None for the machine's choice


@dataclass(frozen=True)
class Topology:
    """A validated machine.  `numa` is False for the classic machine (no `-n`):
    one domain holding everything, and the guest gets no SRAT and no SLIT."""

    cpus: int
    memory: int
    domains: tuple[Domain, ...]
    distances: tuple[tuple[int, ...], ...]
    numa: bool = True
    hmat: tuple["HmatLink", ...] = ()  # by (initiator, target)
    caches: tuple["MemoryCache", ...] = ()  # by (domain, level)
    disks: tuple[Disk, ...] = ()  # in --disk order; each on its domain's PCI host bridge

    @property
    def initiators(self) -> frozenset[int]:
        """Domains holding a generic initiator (a device that initiates memory accesses)."""
        return initiator_domains(self.disks)

    @property
    def has_hmat(self) -> bool:
        """Whether the guest gets an HMAT: a NUMA machine that describes latency, bandwidth or a cache."""
        return self.numa and bool(self.hmat or self.caches)

    def domain_of_cpu(self, cpu: int) -> Domain:
        for d in self.domains:
            if cpu in d.cpus:
                return d
        raise KeyError(cpu)


# ---------------------------------------------------------------- parsing


def parse_numa(text: str) -> DomainSpec:
    """Parse one ``-n id=I[,size=SIZE][,cpus=LIST][,domain_policy=POLICY][,hugepages=thp|hugetlbfs]``."""
    opt = NUMA_OPT
    keys: dict[str, str] = {}
    cpus = Members(f"{opt} cpus", "vCPU")
    seen_cpus = False
    for part in text.split(","):
        if not part.strip():
            continue
        k, eq, v = part.partition("=")
        k = k.strip().lower()
        if not eq:
            raise ConfigError(f"{opt}: expected key=value, got {part!r} (keys: {NUMA_KEYS})")
        if k == "cpus":  # may repeat, as in QEMU's -numa node,cpus=0,cpus=2
            seen_cpus = True
            cpus.add(parse_list(v, f"{opt} cpus", MAX_CPUS))
            continue
        if k == "policy":
            k = "domain_policy"
        if k not in ("id", "size", "domain_policy", "hugepages"):
            raise ConfigError(f"{opt}: unknown key {k!r} (keys: {NUMA_KEYS})")
        if k in keys:
            raise ConfigError(f"{opt}: {k} given twice in {text!r}")
        keys[k] = v.strip()
    if "id" not in keys:
        raise ConfigError(f"{opt}: id= is required, e.g. -n id=0,size=1G,cpus=0-1 (got {text!r})")
    dom_id = _parse_id(keys["id"], f"{opt} id")
    origin = f"{opt} id={dom_id}"
    return DomainSpec(
        id=dom_id,
        size=parse_size(keys["size"], f"{origin} size") if "size" in keys else None,
        cpus=cpus.sorted() if seen_cpus else None,
        policy=parse_policy(keys["domain_policy"], f"{origin} domain_policy")
        if "domain_policy" in keys else Policy(),
        hugepages=parse_hugepages(keys["hugepages"], f"{origin} hugepages") if "hugepages" in keys else None,
        origin=origin,
    )


def parse_hugepages(text: str, field: str) -> str | None:
    """``thp``, ``hugetlbfs``, or ``none`` (small pages even if the machine asks for huge ones)."""
    value = text.strip().lower()
    if value not in HUGEPAGES + ("none",):
        raise ConfigError(f"{field}: must be thp, hugetlbfs or none, got {text.strip()!r}")
    return value


def parse_distance(text: str, opt: str = DISTANCE_OPT) -> tuple[int, int, int, str]:
    """Parse ``I:J=D``."""
    pair, eq, d = text.partition("=")
    i, colon, j = pair.partition(":")
    if not (eq and colon):
        raise ConfigError(f"{opt}: expected I:J=D (e.g. 0:1=20), got {text!r}")
    # The argument is quoted in errors with its whitespace collapsed: one line.
    return (_parse_id(i, opt), _parse_id(j, opt), _parse_int(d, opt), f"{opt} {' '.join(text.split())}")


def _parse_int(text: str, field: str) -> int:
    return parse_int(text, field)


def _parse_id(text: str, field: str) -> int:
    n = _parse_int(text, field)
    if n < 0:
        raise ConfigError(f"{field}: must be 0 or more, got {n}")
    return n


# ---------------------------------------------------------------- rules


def _build(spec: MachineSpec, online: tuple[int, ...]) -> Topology:
    cpus = spec.cpus
    if cpus is not None and not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"{CPUS_OPT}: must be 1..{MAX_CPUS}, got {cpus}")
    memory = spec.memory
    if memory is not None:
        _check_size(memory, MEMORY_OPT, allow_zero=False)
        if memory > MAX_MEMORY:
            raise ConfigError(f"{MEMORY_OPT}: at most {format_size(MAX_MEMORY)}, got {format_size(memory)}")

    if not spec.domains:
        if spec.distances:
            raise ConfigError(f"{DISTANCE_OPT}: distances need NUMA domains (-n/--numa)")
        if spec.hmat or spec.caches:
            raise ConfigError(f"{(spec.hmat or spec.caches)[0].origin}: the HMAT needs NUMA domains (-n/--numa)")
        n = cpus or 1
        mem = memory if memory is not None else DEFAULT_MEMORY
        return Topology(n, mem, (Domain(0, mem, tuple(range(n))),), ((LOCAL_DISTANCE,),), numa=False,
                        disks=check_disks(spec.disks, 1, numa=False))

    doms = _check_ids(spec.domains)
    n = _check_cpus(doms, cpus)
    sizes = _assign_sizes(doms, memory)
    disks = check_disks(spec.disks, len(doms), numa=True)
    initiators = initiator_domains(disks)
    domains = []
    for d, size in zip(doms, sizes):
        if size == 0 and not d.cpus and d.id not in initiators:
            raise ConfigError(f"{d.origin}: a domain needs memory (size=) or vCPUs (cpus=), or a generic "
                              f"initiator (--disk FILE,domain={d.id},initiator)")
        pol = d.policy.resolve(online)
        pol.check_nodes(online, f"{d.origin} domain_policy")
        if d.hugepages not in (None, "none") and size == 0:
            raise ConfigError(f"{d.origin} hugepages: a CPU-only domain has no memory to back")
        domains.append(Domain(d.id, size, d.cpus or (), pol, d.hugepages))
    if not any(d.size for d in domains):
        raise ConfigError(f"{NUMA_OPT}: at least one domain needs memory (size=)")
    if not any(d.cpus for d in domains):  # _check_cpus guarantees, kept for clarity
        raise ConfigError(f"{NUMA_OPT}: at least one domain needs vCPUs (cpus=)")
    total = sum(sizes)
    if total > MAX_MEMORY:
        raise ConfigError(f"{NUMA_OPT}: domains total {format_size(total)}, at most {format_size(MAX_MEMORY)}")
    links, caches = _check_hmat(domains, spec.hmat, spec.caches, initiators)
    return Topology(n, total, tuple(domains), _distance_matrix(len(domains), spec.distances), True,
                    links, caches, disks)


def _check_ids(domains: list[DomainSpec]) -> list[DomainSpec]:
    if len(domains) > MAX_DOMAINS:
        raise ConfigError(f"{NUMA_OPT}: at most {MAX_DOMAINS} domains, got {len(domains)}")
    by_id: dict[int, DomainSpec] = {}
    for d in domains:
        if d.id in by_id:
            raise ConfigError(f"{d.origin}: domain id {d.id} given twice")
        by_id[d.id] = d
    for want in range(len(domains)):
        if want not in by_id:
            raise ConfigError(
                f"{NUMA_OPT}: domain ids must run 0..{len(domains) - 1} without gaps; id={want} is missing")
    return [by_id[i] for i in range(len(domains))]


def _check_cpus(doms: list[DomainSpec], cpus: int | None) -> int:
    owner: dict[int, int] = {}
    for d in doms:
        for c in d.cpus or ():
            if c in owner:
                raise ConfigError(f"{d.origin}: vCPU {c} is already in domain {owner[c]}")
            owner[c] = d.id
    if cpus is None:  # no -c: the domains' vCPUs say how many there are
        cpus = max(owner) + 1 if owner else 1
        if cpus > MAX_CPUS:
            raise ConfigError(f"{NUMA_OPT}: at most {MAX_CPUS} vCPUs (0..{MAX_CPUS - 1}), got vCPU {cpus - 1}")
    for d in doms:
        beyond = [c for c in d.cpus or () if c >= cpus]
        if beyond:
            raise ConfigError(f"{d.origin}: vCPU {beyond[0]} does not exist ({CPUS_OPT} {cpus}: vCPUs 0..{cpus - 1})")
    unplaced = [c for c in range(cpus) if c not in owner]
    if unplaced:
        raise ConfigError(f"{NUMA_OPT}: vCPUs {format_list(unplaced)} are in no domain; "
                          "every vCPU must be in exactly one domain's cpus=")
    return cpus


def _check_size(size: int, field: str, allow_zero: bool) -> None:
    if size == 0 and allow_zero:
        return
    if size % GRANULE:
        raise ConfigError(f"{field}: must be a multiple of 2M, got {size} bytes")
    if size < MIN_DOMAIN:
        raise ConfigError(f"{field}: must be at least 4M{' (or 0 for CPU-only)' if allow_zero else ''}, "
                          f"got {format_size(size)}")


def _assign_sizes(doms: list[DomainSpec], memory: int | None) -> list[int]:
    for d in doms:
        if d.size is not None:
            _check_size(d.size, f"{d.origin} size", allow_zero=True)
            if d.size > MAX_MEMORY:
                raise ConfigError(f"{d.origin} size: at most {format_size(MAX_MEMORY)}")
    given = sum(d.size for d in doms if d.size is not None)
    open_ = [d for d in doms if d.size is None]
    if not open_:
        if memory is not None and memory != given:
            raise ConfigError(f"{MEMORY_OPT}: {format_size(memory)} differs from the domains' sizes, "
                              f"which add up to {format_size(given)}")
        return [d.size or 0 for d in doms]
    if memory is None:
        raise ConfigError(f"{MEMORY_OPT}: needed when a domain has no size= ({open_[0].origin})")
    left = memory - given
    if left < 0:
        raise ConfigError(f"{MEMORY_OPT}: {format_size(memory)} is less than the sizes given "
                          f"({format_size(given)})")
    granules, extra = divmod(left // GRANULE, len(open_))
    split = {d.id: (granules + (1 if k < extra else 0)) * GRANULE for k, d in enumerate(open_)}
    for d in open_:
        if split[d.id] < MIN_DOMAIN:
            raise ConfigError(
                f"{MEMORY_OPT}: {format_size(left)} left for {len(open_)} domain(s) without size= "
                f"gives {d.origin} {format_size(split[d.id])}; each needs at least 4M")
    return [d.size if d.size is not None else split[d.id] for d in doms]


def _distance_matrix(n: int, given: Iterable[tuple[int, int, int, str]]) -> tuple[tuple[int, ...], ...]:
    m = [[LOCAL_DISTANCE if i == j else DEFAULT_DISTANCE for j in range(n)] for i in range(n)]
    explicit: dict[tuple[int, int], int] = {}
    for i, j, d, origin in given:
        for x in (i, j):
            if x >= n:
                raise ConfigError(f"{origin}: no domain {x} (domains 0..{n - 1})")
        if i == j:
            if d != LOCAL_DISTANCE:
                raise ConfigError(f"{origin}: a domain's distance to itself must be {LOCAL_DISTANCE}")
        elif not (LOCAL_DISTANCE < d <= UNREACHABLE):
            raise ConfigError(f"{origin}: distance must be 11..254, or 255 for unreachable; got {d}")
        if (i, j) in explicit and explicit[(i, j)] != d:
            raise ConfigError(f"{origin}: distance {i}:{j} already given as {explicit[(i, j)]}")
        explicit[(i, j)] = d
    for (i, j), d in explicit.items():
        m[i][j] = d
        if (j, i) not in explicit:  # symmetric unless both directions are given
            m[j][i] = d
    return tuple(tuple(row) for row in m)


# ---------------------------------------------------------------- HMAT


@dataclass(frozen=True)
class HmatLink:
    """What one initiator domain (vCPUs) sees of one target domain's memory: ns and MB/s;
    None where not given (the HMAT then says "no value")."""

    initiator: int
    target: int
    read_latency: int | None = None
    write_latency: int | None = None
    read_bandwidth: int | None = None
    write_bandwidth: int | None = None
    origin: str = HMAT_OPT

    def value(self, attr: str) -> int | None:
        return getattr(self, attr)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class MemoryCache:
    """A memory-side cache in front of one domain's memory (HMAT type 2)."""

    domain: int
    size: int  # bytes
    level: int = 1
    line: int = 64  # bytes
    assoc: str = "none"  # CACHE_ASSOC
    policy: str = "none"  # CACHE_POLICY
    origin: str = HMAT_CACHE_OPT


def _opts(text: str, opt: str, keys: str) -> tuple[str, dict[str, str]]:
    """``HEAD,key=value,...`` -> (HEAD, {key: value}); keys lower-case, '_' read as '-'."""
    head, *parts = text.split(",")
    out: dict[str, str] = {}
    for part in parts:
        if not part.strip():
            continue
        k, eq, v = part.partition("=")
        k = k.strip().lower().replace("_", "-")
        if not eq:
            raise ConfigError(f"{opt}: expected key=value, got {part.strip()!r} (keys: {keys})")
        if k in out:
            raise ConfigError(f"{opt}: {k} given twice in {' '.join(text.split())!r}")
        out[k] = v.strip()
    return head.strip(), out


def _positive(text: str, field: str, most: int, unit: str = "") -> int:
    n = parse_int(text, field)
    if not 1 <= n <= most:
        raise ConfigError(f"{field}: must be 1..{most}{' ' + unit if unit else ''}, got {n}")
    return n


def parse_hmat(text: str, opt: str = HMAT_OPT) -> HmatLink:
    """Parse ``I:T,latency=NS,bandwidth=MBPS`` (or read-/write- variants of each)."""
    head, kv = _opts(text, opt, HMAT_KEYS)
    i, colon, t = head.partition(":")
    if not colon:
        raise ConfigError(f"{opt}: expected I:T,latency=NS,bandwidth=MBPS (e.g. 0:2,latency=200,bandwidth=10000), "
                          f"got {text!r}")
    origin = f"{opt} {' '.join(head.split())}"
    ini, tgt = _parse_id(i, f"{opt} initiator"), _parse_id(t, f"{opt} target")
    vals: dict[str, int] = {}
    for k, v in kv.items():
        if k in ("latency", "read-latency", "write-latency"):
            n = _positive(v, f"{origin} {k}", HMAT_MAX_LATENCY_NS, "ns")
            attrs = ["read_latency", "write_latency"] if k == "latency" else [k.replace("-", "_")]
        elif k in ("bandwidth", "read-bandwidth", "write-bandwidth"):
            n = _positive(v, f"{origin} {k}", HMAT_MAX_BANDWIDTH, "MB/s")
            attrs = ["read_bandwidth", "write_bandwidth"] if k == "bandwidth" else [k.replace("-", "_")]
        else:
            raise ConfigError(f"{origin}: unknown key {k!r} (keys: {HMAT_KEYS})")
        for a in attrs:
            if a in vals:
                raise ConfigError(f"{origin}: {a.replace('_', '-')} given twice ({k}= sets "
                                  f"{' and '.join(x.replace('_', '-') for x in attrs)})")
            vals[a] = n
    if not vals:
        raise ConfigError(f"{origin}: give latency= (ns) and/or bandwidth= (MB/s) (keys: {HMAT_KEYS})")
    return HmatLink(ini, tgt, origin=origin, **vals)


def parse_hmat_cache(text: str, opt: str = HMAT_CACHE_OPT) -> MemoryCache:
    """Parse ``T,size=SIZE[,level=1..3][,line=BYTES][,assoc=none|direct|complex]
    [,policy=none|writeback|writethrough]``."""
    head, kv = _opts(text, opt, CACHE_KEYS)
    if not head:
        raise ConfigError(f"{opt}: expected T,size=SIZE[,level=L,line=BYTES,assoc=...,policy=...], got {text!r}")
    dom = _parse_id(head, f"{opt} domain")
    origin = f"{opt} {dom}"
    unknown = sorted(set(kv) - {"size", "level", "line", "assoc", "policy"})
    if unknown:
        raise ConfigError(f"{origin}: unknown key {unknown[0]!r} (keys: {CACHE_KEYS})")
    if "size" not in kv:
        raise ConfigError(f"{origin}: size= is required (a SIZE such as 256M)")
    size = parse_size(kv["size"], f"{origin} size")
    if size == 0:
        raise ConfigError(f"{origin} size: must be more than 0")
    if size > MAX_MEMORY:
        raise ConfigError(f"{origin} size: at most {format_size(MAX_MEMORY)}, got {format_size(size)}")
    level = _positive(kv["level"], f"{origin} level", CACHE_MAX_LEVEL) if "level" in kv else 1
    line = _positive(kv["line"], f"{origin} line", 0xFFFF, "bytes") if "line" in kv else 64
    assoc = kv.get("assoc", "none").lower()
    if assoc not in CACHE_ASSOC:
        raise ConfigError(f"{origin} assoc: must be {', '.join(CACHE_ASSOC)}, got {kv['assoc']!r}")
    policy = kv.get("policy", "none").lower()
    if policy not in CACHE_POLICY:
        raise ConfigError(f"{origin} policy: must be {', '.join(CACHE_POLICY)}, got {kv['policy']!r}")
    return MemoryCache(dom, size, level, line, assoc, policy, origin)


def hmat_base_unit(values: Iterable[int]) -> int:
    """The HMAT base unit for one table's values: their greatest common divisor, so that
    every entry is exact (values are picoseconds or MB/s)."""
    return math.gcd(*values)


def _check_hmat(domains: list[Domain], links: list[HmatLink], caches: list[MemoryCache],
                initiators: frozenset[int] = frozenset()) -> tuple[tuple[HmatLink, ...], tuple[MemoryCache, ...]]:
    """The HMAT's links and caches, checked.  An initiator is a domain with vCPUs or one holding a
    generic initiator (`initiators`): Linux lists every initiator in a target's access0, and
    only those with CPUs in access1 (numavm.check.linux_numa.hmat_access)."""
    n = len(domains)
    seen: dict[tuple[int, int], HmatLink] = {}
    for link in links:
        for x, role in ((link.initiator, "initiator"), (link.target, "target")):
            if x >= n:
                raise ConfigError(f"{link.origin}: no domain {x} (domains 0..{n - 1})")
        if not domains[link.initiator].cpus and link.initiator not in initiators:
            raise ConfigError(f"{link.origin}: initiator {link.initiator} has no vCPUs; an initiator is a "
                              f"domain with cpus= or a generic initiator (--disk FILE,domain="
                              f"{link.initiator},initiator)")
        if not domains[link.target].size:
            raise ConfigError(f"{link.origin}: target {link.target} has no memory; a target is a domain "
                              f"with size=")
        key = (link.initiator, link.target)
        if key in seen:
            raise ConfigError(f"{link.origin}: {key[0]}:{key[1]} already given ({seen[key].origin})")
        seen[key] = link
    # One table per attribute: 16-bit entries times one base unit each (see hmat_base_unit).
    for attr in HMAT_ATTRS:
        scale = 1000 if attr.endswith("latency") else 1  # latencies go in as picoseconds
        given = [(lk.value(attr), lk) for lk in seen.values() if lk.value(attr) is not None]
        if not given:
            continue
        base = hmat_base_unit(v * scale for v, _ in given)  # type: ignore[operator]
        worst_v, worst = max(given, key=lambda g: g[0])  # type: ignore[arg-type, return-value]
        if worst_v * scale // base > HMAT_MAX_ENTRY:  # type: ignore[operator]
            least_v, least = min(given, key=lambda g: g[0])  # type: ignore[arg-type, return-value]
            unit = "ns" if scale > 1 else "MB/s"
            raise ConfigError(
                f"{worst.origin} {attr.replace('_', '-')}: the HMAT cannot encode {worst_v} {unit} beside "
                f"{least_v} {unit} ({least.origin}): a table's 16-bit entries (at most {HMAT_MAX_ENTRY}) share "
                f"one base unit, here {base}{' ps' if scale > 1 else ' MB/s'}; use values with a larger common "
                f"divisor or a smaller spread")
    tables = sum(1 for a in HMAT_ATTRS if any(lk.value(a) is not None for lk in seen.values()))
    size = hmat_size(sum(1 for d in domains if d.size), len({k[0] for k in seen}), len({k[1] for k in seen}),
                     tables, len(caches))
    if size > HMAT_MAX_BYTES:
        raise ConfigError(f"{HMAT_OPT}: {len({k[0] for k in seen})} initiators x {len({k[1] for k in seen})} targets "
                          f"make an HMAT of {size} bytes; at most {HMAT_MAX_BYTES} (QEMU's -acpitable limit, "
                          f"and room in numavm's table area)")
    by_level: dict[tuple[int, int], MemoryCache] = {}
    for c in caches:
        if c.domain >= n:
            raise ConfigError(f"{c.origin}: no domain {c.domain} (domains 0..{n - 1})")
        if not domains[c.domain].size:
            raise ConfigError(f"{c.origin}: domain {c.domain} has no memory for a memory-side cache to front")
        if (c.domain, c.level) in by_level:
            raise ConfigError(f"{c.origin}: domain {c.domain} already has a level {c.level} cache "
                              f"({by_level[(c.domain, c.level)].origin})")
        by_level[(c.domain, c.level)] = c
    for d, lvl in by_level:
        for below in range(1, lvl):
            if (d, below) not in by_level:
                raise ConfigError(f"{by_level[(d, lvl)].origin} level: a level {lvl} cache needs level {below} "
                                  f"in domain {d} too (levels run from 1)")
    return (tuple(seen[k] for k in sorted(seen)), tuple(by_level[k] for k in sorted(by_level)))


def hmat_size(memory_domains: int, initiators: int, targets: int, tables: int, caches: int) -> int:
    """Bytes of the HMAT numavm writes (acpi/hmat.py): header, reserved field, one 40-byte
    structure per memory domain, `tables` locality tables, 32 bytes per cache."""
    return 40 + 40 * memory_domains + tables * (32 + 4 * (initiators + targets) + 2 * initiators * targets) \
        + 32 * caches
