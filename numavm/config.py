"""The machine as a TOML file (`-f/--config`), and the built-in example.

Schema, version 1 (the only one so far)::

    version = 1            # optional; a file without it is version 1
    cpus = 4               # optional, as -c
    memory = "2560M"       # optional, as -m (a string SIZE or bytes)
    distances = [[10, 20], [20, 10]]   # optional full matrix, or
    distance = ["0:1=20"]              # I:J=D entries as --distance

    [[domain]]             # one per guest NUMA domain, as -n
    id = 0
    size = "1G"            # optional; 0 makes a CPU-only domain
    cpus = "0-1"           # LIST string, or an array of integers
    policy = "bind:0"      # optional, as domain_policy=
    hugepages = "thp"      # optional: thp, hugetlbfs or none (default: --hugepages)

(TOML puts keys written after a [[domain]] header into that domain, so the
top-level keys come first.)

A file holding only `cpus` and `memory` is the pre-NUMA form; every later
version must keep loading it with the same meaning (the classic machine).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .policy import Policy, parse_policy
from .topology import DomainSpec, MachineSpec, parse_distance, parse_hugepages
from .units import parse_list, parse_size

SCHEMA_VERSION = 1
_TOP_KEYS = {"version", "cpus", "memory", "domain", "distances", "distance"}
_DOMAIN_KEYS = {"id", "size", "cpus", "policy", "domain_policy", "hugepages"}

EXAMPLE_TOML = """\
# numavm's built-in example: two domains with vCPUs and a memory-only one.
version = 1
cpus = 4
# distances not given stay 20 (10 on the diagonal)
distance = ["0:1=20", "0:2=30", "1:2=20"]

[[domain]]
id = 0
size = "1G"
cpus = "0-1"

[[domain]]
id = 1
size = "1G"
cpus = "2-3"

[[domain]]
id = 2
size = "512M"   # memory-only: no cpus
"""


def load(path: str | Path) -> MachineSpec:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"-f/--config: cannot read {p}: {e.strerror}") from None
    return loads(text, str(p))


def example() -> MachineSpec:
    return loads(EXAMPLE_TOML, "built-in example")


def loads(text: str, name: str) -> MachineSpec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{name}: not valid TOML: {e}") from None
    return from_dict(doc, name)


def from_dict(doc: dict[str, Any], name: str) -> MachineSpec:
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{name}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(_TOP_KEYS))})")
    version = doc.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise ConfigError(f"{name}: version must be 1..{SCHEMA_VERSION}, got {version!r}")
    spec = MachineSpec()
    if "cpus" in doc:
        spec.cpus = _int(doc["cpus"], f"{name}: cpus")
    if "memory" in doc:
        spec.memory = parse_size(doc["memory"], f"{name}: memory")
    domains = doc.get("domain", [])
    if not isinstance(domains, list) or not all(isinstance(d, dict) for d in domains):
        raise ConfigError(f"{name}: domain must be an array of tables ([[domain]])")
    spec.domains = [_domain(d, k, name) for k, d in enumerate(domains)]
    if "distances" in doc and "distance" in doc:
        raise ConfigError(f"{name}: give distances (a matrix) or distance (I:J=D entries), not both")
    if "distances" in doc:
        spec.distances = _matrix(doc["distances"], len(spec.domains), f"{name}: distances")
    entries = doc.get("distance", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{name}: distance must be an array of \"I:J=D\" strings, got {entries!r}")
    for k, entry in enumerate(entries):
        spec.distances.append(parse_distance(str(entry), f"{name}: distance[{k}]"))
    return spec


def _int(v: Any, field: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"{field}: expected a whole number, got {v!r}")
    return v


def _domain(d: dict[str, Any], k: int, name: str) -> DomainSpec:
    where = f"{name}: domain[{k}]"
    unknown = sorted(set(d) - _DOMAIN_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: id, size, cpus, policy, hugepages)")
    if "id" not in d:
        raise ConfigError(f"{where}: id is required")
    dom_id = _int(d["id"], f"{where}.id")
    if dom_id < 0:
        raise ConfigError(f"{where}.id: must be 0 or more, got {dom_id}")
    origin = f"{name}: domain id={dom_id}"
    pol = d.get("policy", d.get("domain_policy"))
    return DomainSpec(
        id=dom_id,
        size=parse_size(d["size"], f"{origin} size") if "size" in d else None,
        cpus=parse_list(d["cpus"], f"{origin} cpus") if "cpus" in d else None,
        policy=parse_policy(str(pol), f"{origin} policy") if pol is not None else Policy(),
        hugepages=parse_hugepages(str(d["hugepages"]), f"{origin} hugepages") if "hugepages" in d else None,
        origin=origin,
    )


def _matrix(m: Any, domains: int, field: str) -> list[tuple[int, int, int, str]]:
    if not isinstance(m, list) or not all(isinstance(r, list) and len(r) == len(m) for r in m):
        raise ConfigError(f"{field}: expected a square matrix (an array of equal-length rows)")
    if len(m) != domains:
        raise ConfigError(f"{field}: a {len(m)}x{len(m)} matrix for {domains} domains; "
                          f"give one row and column per domain")
    return [(i, j, _int(v, f"{field}[{i}][{j}]"), f"{field}[{i}][{j}]")
            for i, row in enumerate(m) for j, v in enumerate(row)]
