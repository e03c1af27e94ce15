"""``--like-host``: a guest shaped like the host's NUMA topology.

One guest domain per online host node (in node order): its share of the
guest's memory in proportion to the node's MemTotal, its share of the vCPUs in
proportion to the node's CPUs, the host's distances (the sysfs SLIT rows), and
a bind to that node, so that numavm pins the domain's vCPUs on that node's
CPUs.  A node without memory gives a CPU-only domain, one without CPUs a
memory-only one.  The host's facts come from `root` (the sysfs node
directory), which tests point at a tree of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from numavm.errors import ConfigError
from numavm.host.memory import NODE_DIR, node_cpus, node_distances, node_total
from numavm.spec.policy import Mode, Policy, host_online_nodes
from numavm.spec.topology import DEFAULT_MEMORY, GRANULE, MIN_DOMAIN, CPUS_OPT, MEMORY_OPT, DomainSpec, MachineSpec
from numavm.spec.units import format_list, format_size

OPT = "--like-host"


@dataclass
class HostShape:
    spec: MachineSpec
    online: tuple[int, ...]  # the host nodes the policies name
    notes: list[str] = field(default_factory=list)  # one line each, for stderr


def like_host(cpus: int | None, memory: int | None, root: Path | None = None,
              given: list[DomainSpec] | None = None) -> HostShape:
    """The machine: `cpus` vCPUs (default: as many as the host has CPUs) and `memory`
    bytes (default numavm's 512M, or the sizes `given` when they name every domain with
    memory), shared out as the host's nodes share theirs.  `given` (``-n id=I,size=S``)
    sets a domain's size (and its page kind) instead of its share."""
    root = root if root is not None else NODE_DIR
    online = host_online_nodes(root / "online")
    fixed: dict[int, DomainSpec] = {}
    for d in given or []:
        if d.cpus is not None or d.policy != Policy():
            raise ConfigError(f"{d.origin}: with {OPT} the host gives each domain its vCPUs and its policy; "
                              "-n may set size= and hugepages= only")
        if d.id >= len(online):
            raise ConfigError(f"{d.origin}: no domain {d.id}: {OPT} makes domains 0..{len(online) - 1}, one per "
                              f"host node ({format_list(online)})")
        if d.id in fixed:
            raise ConfigError(f"{d.origin}: domain id {d.id} given twice")
        fixed[d.id] = d
    node_cpu = [node_cpus(n, root) for n in online]
    node_mem = [node_total(n, root) or 0 for n in online]
    notes: list[str] = []
    if len(online) == 1:
        notes.append(f"this host has one NUMA node (node {online[0]}): the guest gets one domain, bound to it")
    if cpus is None:
        cpus = sum(len(c) for c in node_cpu) or 1
    with_cpus = [k for k, c in enumerate(node_cpu) if c] or [0]
    cpu_weight = [max(len(node_cpu[k]), 1) if k in with_cpus else 0 for k in range(len(online))]
    with_mem = [k for k, m in enumerate(node_mem) if m] or list(range(len(online)))
    mem_weight = [max(node_mem[k], 1) if k in with_mem else 0 for k in range(len(online))]
    for k, d in fixed.items():  # a size given takes the domain out of the share
        if d.size is not None:
            mem_weight[k] = 0
    with_mem = [k for k in with_mem if mem_weight[k]]
    sized = sum(d.size or 0 for d in fixed.values())
    if memory is None:
        memory = sized if not with_mem else DEFAULT_MEMORY + sized
    if memory % GRANULE:
        raise ConfigError(f"{MEMORY_OPT}: must be a multiple of 2M, got {memory} bytes")
    if sized and memory < sized:
        raise ConfigError(f"{MEMORY_OPT}: {format_size(memory)} is less than the sizes given "
                          f"({format_size(sized)})")
    if cpus < len(with_cpus):
        raise ConfigError(f"{CPUS_OPT}: {OPT} needs a vCPU for each of the host's {len(with_cpus)} nodes with CPUs "
                          f"(nodes {format_list([online[k] for k in with_cpus])}), got {cpus}")
    least = len(with_mem) * MIN_DOMAIN
    if memory - sized < least:
        raise ConfigError(f"{MEMORY_OPT}: {OPT} needs at least 4M for each of the host's {len(with_mem)} nodes with "
                          f"memory{' and no size=' if fixed else ''}, {format_size(least)} in all; got "
                          f"{format_size(memory - sized)}")
    if memory - sized and not with_mem:
        raise ConfigError(f"{MEMORY_OPT}: {format_size(memory)} differs from the sizes given "
                          f"({format_size(sized)}), which name every domain")
    vcpus = _share(cpus, cpu_weight, 1)
    granules = _share((memory - sized) // GRANULE, mem_weight, MIN_DOMAIN // GRANULE)
    spec = MachineSpec(cpus=cpus, memory=memory)
    first = 0
    for k, node in enumerate(online):
        d = fixed.get(k)
        size = d.size if d is not None and d.size is not None else granules[k] * GRANULE
        spec.domains.append(DomainSpec(k, size, tuple(range(first, first + vcpus[k])), Policy(Mode.BIND, (node,)),
                                       d.hugepages if d is not None else None,
                                       origin=d.origin if d is not None else f"{OPT} (host node {node})"))
        first += vcpus[k]
    rows = [node_distances(n, root) for n in online]
    if any(r is None or len(r) != len(online) for r in rows):
        notes.append(f"the host's node distances are unreadable ({root}/node*/distance); the guest gets numavm's "
                     "default, 20 between domains")
    else:
        for i, row in enumerate(rows):
            assert row is not None
            spec.distances += [(i, j, d, f"{OPT} (host node{online[i]}/distance)")
                               for j, d in enumerate(row) if i != j]
    return HostShape(spec, online, notes)


def _share(total: int, weights: list[int], least: int) -> list[int]:
    """`total` units split in proportion to `weights` (largest remainders first), then each
    member with weight raised to `least`, taken from the largest shares; the caller checked
    that `total` holds `least` for each."""
    members = [k for k, w in enumerate(weights) if w]
    out = [0] * len(weights)
    if not members:
        return out
    whole = sum(weights)
    exact = {k: total * weights[k] / whole for k in members}
    for k in members:
        out[k] = int(exact[k])
    for k in sorted(members, key=lambda k: (-(exact[k] - int(exact[k])), k))[:total - sum(out)]:
        out[k] += 1
    for k in members:  # at most `least` units per member move: a loop is enough
        while out[k] < least:
            donor = max(members, key=lambda m: (out[m], -m))
            out[donor] -= 1
            out[k] += 1
    return out
