"""The Heterogeneous Memory Attribute Table (HMAT, ACPI 6.3+ section 5.2.27), as a value.

Three kinds of structure follow a 4-byte reserved field:

* Memory Proximity Domain Attributes (type 0): one per domain with memory.
  numavm never sets "attached initiator valid", so Linux links each memory
  node to the initiators with the best figures in the tables below rather
  than to one fixed initiator (drivers/acpi/numa/hmat.c).
* System Locality Latency and Bandwidth Information (type 1): one table per
  data type (read/write latency, read/write bandwidth) that has a value,
  over the initiators and targets the machine names, at the "memory" level of
  the hierarchy.  Entries are 16 bits times the table's base unit
  (picoseconds, MB/s); 0 means "no value".  The topology layer has checked
  that every value is exact in that form (`topology.hmat_base_unit`).
* Memory Side Cache Information (type 2): one per cache, no SMBIOS handles.

Revision 2 (ACPI 6.3): Linux reads latencies as picoseconds only then.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Union

from numavm.spec.topology import CACHE_ASSOC, CACHE_POLICY, HMAT_ATTRS, Topology, hmat_base_unit
from numavm.plan.acpi.tables import _Table

_HMAT_HEAD = struct.Struct("<I")  # reserved
_MPDA = struct.Struct("<HHIHHIIIQQ")
_SLLBI = struct.Struct("<HHIBBBBIIIQ")
_MSCI = struct.Struct("<HHIIIQIHH")
assert (_MPDA.size, _SLLBI.size, _MSCI.size) == (40, 32, 32)

INITIATOR_VALID = 1  # type 0 flags bit 0: the attached initiator field is valid
MEMORY_HIERARCHY = 0  # type 1 flags bits 0-3: the memory itself (1..3: a memory-side cache level)

# type 1 data types (Table 5.147)
ACCESS_LATENCY, READ_LATENCY, WRITE_LATENCY = 0, 1, 2
ACCESS_BANDWIDTH, READ_BANDWIDTH, WRITE_BANDWIDTH = 3, 4, 5
DATA_TYPE = {"read_latency": READ_LATENCY, "write_latency": WRITE_LATENCY,
             "read_bandwidth": READ_BANDWIDTH, "write_bandwidth": WRITE_BANDWIDTH}
PS_PER_NS = 1000


@dataclass(frozen=True)
class MemoryDomainAttributes:
    """Memory Proximity Domain Attributes (type 0)."""

    memory_domain: int
    initiator: int | None = None  # the attached initiator, if any
    type: ClassVar[int] = 0

    def to_bytes(self) -> bytes:
        flags = INITIATOR_VALID if self.initiator is not None else 0
        return _MPDA.pack(self.type, 0, _MPDA.size, flags, 0, self.initiator or 0, self.memory_domain, 0, 0, 0)


@dataclass(frozen=True)
class LocalityInfo:
    """System Locality Latency and Bandwidth Information (type 1): entries[i][t] is what
    initiators[i] sees of targets[t], in `base` units (ps or MB/s); 0 = no value."""

    data_type: int
    initiators: tuple[int, ...]
    targets: tuple[int, ...]
    base: int
    entries: tuple[tuple[int, ...], ...]
    hierarchy: int = MEMORY_HIERARCHY
    type: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if len(self.entries) != len(self.initiators) or any(len(r) != len(self.targets) for r in self.entries):
            raise ValueError("HMAT locality entries must be initiators x targets")
        if any(not 0 <= e <= 0xFFFE for r in self.entries for e in r):
            raise ValueError("HMAT locality entries are 16 bits, 0xFFFF reserved")

    def to_bytes(self) -> bytes:
        ni, nt = len(self.initiators), len(self.targets)
        length = _SLLBI.size + 4 * (ni + nt) + 2 * ni * nt
        head = _SLLBI.pack(self.type, 0, length, self.hierarchy, self.data_type, 0, 0, ni, nt, 0, self.base)
        flat = [e for row in self.entries for e in row]
        return head + struct.pack(f"<{ni}I{nt}I{len(flat)}H", *self.initiators, *self.targets, *flat)


@dataclass(frozen=True)
class MemorySideCache:
    """Memory Side Cache Information (type 2), without SMBIOS handles."""

    memory_domain: int
    size: int
    total_levels: int
    level: int
    associativity: int  # 0 none, 1 direct mapped, 2 complex cache indexing
    write_policy: int  # 0 none, 1 write-back, 2 write-through
    line_size: int
    type: ClassVar[int] = 2

    def attributes(self) -> int:
        return (self.total_levels | self.level << 4 | self.associativity << 8 | self.write_policy << 12
                | self.line_size << 16)

    def to_bytes(self) -> bytes:
        return _MSCI.pack(self.type, 0, _MSCI.size, self.memory_domain, 0, self.size, self.attributes(), 0, 0)


HmatEntry = Union[MemoryDomainAttributes, LocalityInfo, MemorySideCache]


@dataclass(frozen=True)
class Hmat(_Table):
    entries: tuple[HmatEntry, ...]
    signature: ClassVar[bytes] = b"HMAT"
    revision: ClassVar[int] = 2

    def body(self) -> bytes:
        return _HMAT_HEAD.pack(0) + b"".join(e.to_bytes() for e in self.entries)


def build_hmat(topo: Topology) -> Hmat | None:
    """The HMAT for `topo`, or None when the machine describes no latency, bandwidth or cache."""
    if not topo.has_hmat:
        return None
    entries: list[HmatEntry] = [MemoryDomainAttributes(d.id) for d in topo.domains if d.size]
    inits = tuple(sorted({lk.initiator for lk in topo.hmat}))
    targs = tuple(sorted({lk.target for lk in topo.hmat}))
    for attr in HMAT_ATTRS:
        scale = PS_PER_NS if attr.endswith("latency") else 1
        vals = {(lk.initiator, lk.target): v * scale for lk in topo.hmat if (v := lk.value(attr)) is not None}
        if not vals:
            continue
        base = hmat_base_unit(vals.values())
        rows = tuple(tuple(vals.get((i, t), 0) // base for t in targs) for i in inits)
        entries.append(LocalityInfo(DATA_TYPE[attr], inits, targs, base, rows))
    for c in topo.caches:
        total = sum(1 for x in topo.caches if x.domain == c.domain)
        entries.append(MemorySideCache(c.domain, c.size, total, c.level, CACHE_ASSOC.index(c.assoc),
                                       CACHE_POLICY.index(c.policy), c.line))
    return Hmat(tuple(entries))
