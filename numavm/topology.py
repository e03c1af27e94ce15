"""What the user asked for: vCPUs, memory, NUMA domains, distances, policies.

Two steps: options (command line `-n id=...` or a TOML file) become a
`MachineSpec` of loosely filled `DomainSpec`s; `MachineSpec.build()` applies
every rule and returns a validated, immutable `Topology`, or raises one
`ConfigError` naming the field.  Nothing here touches the host beyond reading
which NUMA nodes are online.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .errors import ConfigError
from .policy import Policy, host_online_nodes, parse_policy
from .units import MiB, TiB, format_list, format_size, parse_int, parse_list, parse_size

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
    cpus: list[int] = []
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
            cpus.extend(parse_list(v, f"{opt} cpus"))
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
    if len(set(cpus)) != len(cpus):
        raise ConfigError(f"{origin}: cpus names a vCPU more than once")
    return DomainSpec(
        id=dom_id,
        size=parse_size(keys["size"], f"{origin} size") if "size" in keys else None,
        cpus=tuple(sorted(cpus)) if seen_cpus else None,
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
        n = cpus or 1
        mem = memory if memory is not None else DEFAULT_MEMORY
        return Topology(n, mem, (Domain(0, mem, tuple(range(n))),), ((LOCAL_DISTANCE,),), numa=False)

    doms = _check_ids(spec.domains)
    n = _check_cpus(doms, cpus)
    sizes = _assign_sizes(doms, memory)
    domains = []
    for d, size in zip(doms, sizes):
        if size == 0 and not d.cpus:
            raise ConfigError(f"{d.origin}: a domain needs memory (size=) or vCPUs (cpus=)")
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
    return Topology(n, total, tuple(domains), _distance_matrix(len(domains), spec.distances))


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
