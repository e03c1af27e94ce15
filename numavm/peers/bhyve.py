"""A bhyve command line: ``-c``, ``-m``, ``-n`` (FreeBSD 15's NUMA domains,
whose syntax numavm's ``-n`` follows) and ``-o domains.N.KEY=VALUE``.  bhyve
has no distances and no memory-only domains; its domainset(9) policies map to
Linux's as numavm's own ``domain_policy=`` does, except that ``first-touch``
over named domains (which allocates only from them, nearest first) is a bind.
"""

from __future__ import annotations

import getopt

from numavm.errors import ConfigError
from numavm.spec.policy import MAX_HOST_NODES, Mode, Policy, parse_policy
from numavm.spec.topology import MAX_CPUS, DomainSpec, MachineSpec
from numavm.spec.units import MiB, parse_int
from numavm.peers import Imported, comma_list, command_words, size, whole

FMT = "bhyve"
# bhyve(8)'s getopt string (FreeBSD 15): the letters with ':' take a value
_OPTSTRING = "aehuwxABCDHIPSWYk:f:o:p:G:c:s:m:l:K:U:r:n:g:"
_DOMAIN_KEYS = ("id", "size", "cpus", "domain_policy")


def _size(text: str, field: str) -> int:
    """bhyve's vm_parse_memsize: a bare number below 1 MiB counts MiB, else bytes."""
    t = text.strip()
    if t.isascii() and t.isdigit():
        n = whole(t, field)
        return n * MiB if n < MiB else n
    return size(t, field)


def _policy(text: str, where: str) -> Policy:
    name, sep, nodes = text.partition(":")
    if name.strip().lower() in ("first-touch", "ft") and sep:
        return Policy(Mode.BIND, comma_list(nodes, f"{where} nodes", MAX_HOST_NODES))
    if sep:
        return parse_policy(f"{name}:{'+'.join(str(n) for n in comma_list(nodes, f'{where} nodes', MAX_HOST_NODES))}", where)
    return parse_policy(name, where)


def read(text: str) -> Imported:
    words = command_words(text, FMT)
    try:
        found, operands = getopt.getopt(words, _OPTSTRING)
    except getopt.GetoptError as e:
        raise ConfigError(f"{e.msg}") from None
    spec = MachineSpec()
    raw: dict[int, dict[str, str]] = {}  # domain -> key -> value, -n and -o domains.N.KEY merged
    origin: dict[int, str] = {}
    ignored: list[str] = []
    notes: list[str] = []
    for opt, value in found:
        if opt == "-c":
            spec.cpus = _cpus(value)
        elif opt == "-m":
            spec.memory = _size(value, "-m")
        elif opt == "-n":
            keys: dict[str, str] = {}
            for part in value.split(","):
                key, eq, v = part.partition("=")
                if not eq or key not in _DOMAIN_KEYS:
                    raise ConfigError(f"-n {value}: expected {', '.join(k + '=' for k in _DOMAIN_KEYS)}, "
                                      f"got {part!r}")
                if key in keys:
                    raise ConfigError(f"-n {value}: {key}= given twice")
                keys[key] = v
            if "id" not in keys:
                raise ConfigError(f"-n {value}: needs id=")
            did = parse_int(keys.pop("id"), f"-n {value} id")
            if did in raw:
                raise ConfigError(f"-n id={did}: given twice")
            raw[did] = keys
            origin[did] = f"-n id={did}"
        elif opt == "-o":
            key, eq, v = value.partition("=")
            parts = key.split(".")
            if parts[0] == "domains" and len(parts) == 3 and parts[2] in _DOMAIN_KEYS[1:] and eq:
                did = parse_int(parts[1], f"-o {key}")
                raw.setdefault(did, {})[parts[2]] = v
                origin.setdefault(did, f"-o domains.{did}")
            elif parts[0] == "domains":
                raise ConfigError(f"-o {value}: expected domains.N.size|cpus|domain_policy=VALUE")
            else:
                ignored.append(f"-o {key}")
        elif opt == "-p":
            notes.append(f"-p {value} left out: numavm pins each vCPU to the host nodes of its domain's policy")
        else:
            ignored.append(opt)
    for did in sorted(raw):
        keys, where = raw[did], origin[did]
        if "cpus" not in keys:
            raise ConfigError(f"{where}: needs cpus= (bhyve has no memory-only domains)")
        spec.domains.append(DomainSpec(
            did,
            _size(keys["size"], f"{where} size") if "size" in keys else None,
            comma_list(keys["cpus"], f"{where} cpus", MAX_CPUS),
            _policy(keys["domain_policy"], f"{where} domain_policy") if "domain_policy" in keys else Policy(),
            origin=where))
    if ignored:
        notes.append("left out, not part of the NUMA machine: " + ", ".join(dict.fromkeys(ignored)))
    if len(operands) > 1:
        raise ConfigError(f"one VM name after the options, got {' '.join(operands)!r}")
    return Imported(spec, notes)


def _cpus(value: str) -> int:
    """-c N, or -c [cpus=]N[,sockets=S,cores=C,threads=T,maxcpus=M]."""
    where = f"-c {value}"
    n: dict[str, int] = {}
    for k, part in enumerate(value.split(",")):
        key, eq, v = part.partition("=")
        if not eq:
            if k:
                raise ConfigError(f"{where}: expected key=value, got {part!r}")
            key, v = "cpus", part
        if key not in ("cpus", "sockets", "cores", "threads", "maxcpus"):
            raise ConfigError(f"{where}: unknown key {key}= (cpus, sockets, cores, threads, maxcpus)")
        if key in n:
            raise ConfigError(f"{where}: {key} given twice")
        n[key] = parse_int(v, f"{where} {key}")
    cpus = n.get("cpus") or n.get("sockets", 1) * n.get("cores", 1) * n.get("threads", 1)
    if n.get("maxcpus", cpus) > cpus:
        raise ConfigError(f"{where} maxcpus: numavm has no vCPU hotplug; every vCPU is present at boot")
    return cpus
