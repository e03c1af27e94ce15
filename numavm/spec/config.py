"""The machine as a TOML file (`-f/--config`), and the built-in example.

Schema, version 1 (the only one so far)::

    version = 1            # optional; a file without it is version 1
    cpus = 4               # optional, as -c
    memory = "2560M"       # optional, as -m (a string SIZE or bytes)
    distances = [[10, 20], [20, 10]]   # optional full matrix, or
    distance = ["0:1=20"]              # I:J=D entries as --distance
    hmat = ["0:2,latency=300,bandwidth=8000"]        # optional, entries as --hmat
    hmat_cache = ["2,size=256M,level=1,line=64,assoc=direct,policy=writeback"]  # as --hmat-cache

    [[domain]]             # one per guest NUMA domain, as -n
    id = 0
    size = "1G"            # optional; 0 makes a CPU-only domain
    cpus = "0-1"           # LIST string, or an array of integers
    policy = "bind:0"      # optional, as domain_policy=
    hugepages = "thp"      # optional: thp, hugetlbfs or none (default: --hugepages)

    [[disk]]               # optional, one per --disk
    path = "disk.img"      # a raw image (relative paths: from the current directory)
    domain = 1             # optional, default 0
    readonly = false       # optional
    initiator = false      # optional: also a generic initiator of its domain

(TOML puts keys written after a [[domain]] header into that domain, so the
top-level keys come first.)

A file holding only `cpus` and `memory` is the pre-NUMA form; every later
version must keep loading it with the same meaning (the classic machine).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from numavm.errors import ConfigError
from numavm.spec.devices import disk_from_table
from numavm.spec.policy import Policy, parse_policy
from numavm.spec.topology import MAX_CPUS, DomainSpec, MachineSpec, parse_distance, parse_hmat, parse_hmat_cache, parse_hugepages
from numavm.spec.units import parse_list, parse_size

SCHEMA_VERSION = 1
_TOP_KEYS = {"version", "cpus", "memory", "domain", "distances", "distance", "hmat", "hmat_cache", "disk"}
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


MAX_FILE_BYTES = 1 << 20  # numavm.host.files.MAX_CONFIG: a 256-domain machine with every distance is ~200 KiB
MAX_DEPTH = 16  # brackets and braces open at once; the schema needs 3 ([[domain]], a matrix row)
# What can hold a bracket that is not one: strings of the four kinds, and comments.
# tomllib's time grows with the cube of a dotted key's length (8000 parts: 1.2 s), so dots
# outside strings are limited per line too: the schema has no dotted keys and no fractions.
MAX_DOTS = 16
_TOKENS = re.compile(r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*|[\[\]{}.\n]',
                     re.DOTALL)


def load(path: str | Path) -> MachineSpec:
    """Read a TOML file: UTF-8, at most MAX_FILE_BYTES, a regular file or a pipe (`-f <(...)`),
    read with that bound (numavm.host.files)."""
    from numavm.host.files import read_input

    p = Path(path)
    field = f"-f/--config {p}"
    data = read_input(p, "-f/--config", MAX_FILE_BYTES, pipes=True)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{field}: not UTF-8 (TOML files are): byte {data[e.start]:#04x} at line {line}, "
                          f"offset {e.start}") from None
    return loads(text, str(p))


def example() -> MachineSpec:
    return loads(EXAMPLE_TOML, "built-in example")


def loads(text: str, name: str) -> MachineSpec:
    import tomllib  # here, not at the top: a machine given by options alone never loads it

    _check_shape(text, name)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{name}: not valid TOML: {e}") from None
    except RecursionError:  # the scan above should have refused it; never a traceback
        raise ConfigError(f"{name}: arrays or tables nested too deeply") from None
    except ValueError:  # int() of a decimal past Python's 4300 digits
        raise ConfigError(f"{name}: a number of more than 4300 digits; numavm's numbers fit 64 bits") from None
    _check_numbers(doc, name, name)
    return from_dict(doc, name)


MAX_BITS = 64


def _check_numbers(v: Any, where: str, name: str) -> None:
    """Refuse an integer past 64 bits anywhere in the document (a hex or binary one parses
    at any length, and would fail later where an error message prints it)."""
    if isinstance(v, dict):
        for k, x in v.items():
            _check_numbers(x, f"{where}.{k}" if where != name else f"{name}: {k}", name)
    elif isinstance(v, list):
        for k, x in enumerate(v):
            _check_numbers(x, f"{where}[{k}]", name)
    elif isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_BITS:
        raise ConfigError(f"{where}: a number of {v.bit_length()} bits; numavm's numbers fit {MAX_BITS}")


def _check_shape(text: str, name: str) -> None:
    """Refuse nesting and dotted keys deeper than any machine file needs, before tomllib
    (which recurses per level, and slows with the cube of a dotted key's length)."""
    depth = dots = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c == "\n":
            dots = 0
        elif c == ".":
            dots += 1
            if dots > MAX_DOTS:
                raise ConfigError(f"{name}: more than {MAX_DOTS} dots outside strings on line "
                                  f"{text.count(chr(10), 0, m.start()) + 1} (numavm's keys are not dotted, "
                                  f"and its numbers are whole)")
        elif c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{name}: arrays or tables nested more than {MAX_DEPTH} deep "
                                  f"(line {text.count(chr(10), 0, m.start()) + 1}); the schema needs 3")
        elif c in "]}":
            depth = max(depth - 1, 0)


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
    spec.domains = [domain_from_table(d, k, name) for k, d in enumerate(domains)]
    if "distances" in doc and "distance" in doc:
        raise ConfigError(f"{name}: give distances (a matrix) or distance (I:J=D entries), not both")
    if "distances" in doc:
        spec.distances = distance_matrix(doc["distances"], len(spec.domains), f"{name}: distances")
    entries = doc.get("distance", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{name}: distance must be an array of \"I:J=D\" strings, got {entries!r}")
    for k, entry in enumerate(entries):
        spec.distances.append(parse_distance(str(entry), f"{name}: distance[{k}]"))
    spec.hmat = [parse_hmat(e, f"{name}: hmat[{k}]") for k, e in enumerate(_strings(doc, "hmat", name))]
    spec.caches = [parse_hmat_cache(e, f"{name}: hmat_cache[{k}]")
                   for k, e in enumerate(_strings(doc, "hmat_cache", name))]
    disks = doc.get("disk", [])
    if not isinstance(disks, list):
        raise ConfigError(f"{name}: disk must be an array of tables ([[disk]])")
    spec.disks = [disk_from_table(d, k, name) for k, d in enumerate(disks)]
    return spec


def _strings(doc: dict[str, Any], key: str, name: str) -> list[str]:
    v = doc.get(key, [])
    if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
        raise ConfigError(f"{name}: {key} must be an array of strings, as the --{key.replace('_', '-')} "
                          f"option takes them, got {v!r}")
    return v


def _int(v: Any, field: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"{field}: expected a whole number, got {v!r}")
    return v


def domain_from_table(d: dict[str, Any], k: int, name: str) -> DomainSpec:
    """One [[domain]] table (or the API's keyword dict) as a DomainSpec; errors name `name`."""
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
    if "policy" in d and "domain_policy" in d:
        raise ConfigError(f"{origin}: policy and domain_policy are one key (two spellings); give one")
    pol = d.get("policy", d.get("domain_policy"))
    return DomainSpec(
        id=dom_id,
        size=parse_size(d["size"], f"{origin} size") if "size" in d else None,
        cpus=parse_list(d["cpus"], f"{origin} cpus", MAX_CPUS) if "cpus" in d else None,
        policy=parse_policy(str(pol), f"{origin} policy") if pol is not None else Policy(),
        hugepages=parse_hugepages(str(d["hugepages"]), f"{origin} hugepages") if "hugepages" in d else None,
        origin=origin,
    )


def distance_matrix(m: Any, domains: int, field: str) -> list[tuple[int, int, int, str]]:
    """A square distance matrix as (i, j, distance, where) entries, one row per domain."""
    if not isinstance(m, list) or not all(isinstance(r, list) and len(r) == len(m) for r in m):
        raise ConfigError(f"{field}: expected a square matrix (an array of equal-length rows)")
    if len(m) != domains:
        raise ConfigError(f"{field}: a {len(m)}x{len(m)} matrix for {domains} domains; "
                          f"give one row and column per domain")
    return [(i, j, _int(v, f"{field}[{i}][{j}]"), f"{field}[{i}][{j}]")
            for i, row in enumerate(m) for j, v in enumerate(row)]
