"""What the guest's /init reported, as values: the userspace side of `numavm check`.

The /init (numavm.guest.initramfs) prints one JSON document of what sysfs and
/proc say; `GuestReport.from_document()` turns it into these types once, so
the comparisons (numavm.check.compare) and the verdict's table read fields,
not string keys.  The report is the guest's word, not ours: a field the guest
left out or wrote in an unexpected shape becomes None (or empty), and the
comparison then says the report lacks it.  `document` keeps the JSON as the
guest printed it, for `check --json` and `run`'s topology block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from numavm.check.linux_numa import kernel_version
from numavm.spec import units

HMAT_FIGURES = ("read_latency", "write_latency", "read_bandwidth", "write_bandwidth")


def parse_cpulist(text: str) -> frozenset[int]:
    """Linux's cpulist/nodelist syntax ("0-3,8,10-11"; "" is empty), as sysfs prints it."""
    return frozenset(units.parse_cpulist(text, "cpulist"))


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _mapping(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _keyed(m: Mapping[str, Any]) -> dict[int, Any]:
    """A JSON object keyed by decimal numbers (node, CPU, level, tier) -> {int: value}."""
    return {int(k): v for k, v in m.items() if isinstance(k, str) and k.isdigit()}


@dataclass(frozen=True)
class AccessClass:
    """nodeN/accessA: the best figures from its initiators, and those initiators' nodes."""

    read_latency: int | None
    write_latency: int | None
    read_bandwidth: int | None
    write_bandwidth: int | None
    initiators: tuple[int, ...]

    @classmethod
    def from_document(cls, d: Mapping[str, Any]) -> AccessClass:
        inits = d.get("initiators")
        return cls(*(_int(d.get(a)) for a in HMAT_FIGURES),
                   tuple(sorted(i for i in inits if _int(i) is not None)) if isinstance(inits, list) else ())


@dataclass(frozen=True)
class SideCache:
    """nodeN/memory_side_cache/indexL (Linux's enum values for indexing and write policy)."""

    size: int | None
    line_size: int | None
    indexing: int | None
    write_policy: int | None

    @classmethod
    def from_document(cls, d: Mapping[str, Any]) -> SideCache:
        return cls(_int(d.get("size")), _int(d.get("line_size")), _int(d.get("indexing")),
                   _int(d.get("write_policy")))


@dataclass(frozen=True)
class GuestNode:
    """One /sys/devices/system/node/nodeN."""

    cpulist: str
    memtotal_kb: int | None
    present_kb: int | None  # pages present in the node's ranges (/proc/zoneinfo), x 4
    distance: tuple[int, ...] | None
    access: dict[int, AccessClass] = field(default_factory=dict)
    memory_side_cache: dict[int, SideCache] = field(default_factory=dict)

    @property
    def cpus(self) -> frozenset[int]:
        return parse_cpulist(self.cpulist)

    @classmethod
    def from_document(cls, d: Mapping[str, Any]) -> GuestNode:
        dist = d.get("distance")
        return cls(_str(d.get("cpulist")) or "", _int(d.get("memtotal_kb")), _int(d.get("present_kb")),
                   tuple(dist) if isinstance(dist, list) and all(_int(x) is not None for x in dist) else None,
                   {a: AccessClass.from_document(_mapping(v)) for a, v in _keyed(_mapping(d.get("access"))).items()},
                   {lvl: SideCache.from_document(_mapping(v))
                    for lvl, v in _keyed(_mapping(d.get("memory_side_cache"))).items()})


@dataclass(frozen=True)
class BlockDevice:
    """A virtio disk's /sys/block/NAME as the guest saw it."""

    name: str
    sectors: int | None  # size in 512-byte sectors
    logical_block_size: int | None

    @classmethod
    def from_document(cls, d: Mapping[str, Any]) -> BlockDevice:
        return cls(_str(d.get("name")) or "", _int(d.get("sectors")), _int(d.get("logical_block_size")))


@dataclass(frozen=True)
class PciFunction:
    """One /sys/bus/pci/devices/SSSS:BB:DD.F: its ids, its node (-1: none), its disks."""

    vendor: int | None
    device: int | None
    pci_class: int | None
    numa_node: int | None
    block: tuple[BlockDevice, ...] = ()

    @classmethod
    def from_document(cls, d: Mapping[str, Any]) -> PciFunction:
        blk = d.get("block")
        return cls(_hex(d.get("vendor")), _hex(d.get("device")), _hex(d.get("class")), _int(d.get("numa_node")),
                   tuple(BlockDevice.from_document(_mapping(b)) for b in blk) if isinstance(blk, list) else ())


def _hex(v: Any) -> int | None:
    """sysfs's "0x1af4"."""
    try:
        return int(v, 16) if isinstance(v, str) else None
    except ValueError:
        return None


@dataclass(frozen=True)
class GuestReport:
    """The whole report: nodes, CPUs and their APIC ids, memory tiers, the kernel, the command's status,
    PCI devices with their nodes and disks, the generic initiator nodes, the modules /init loaded."""

    nodes: dict[int, GuestNode]
    cpu_apic_ids: dict[int, int] | None  # None: the report has none
    online_cpus: str | None
    online_nodes: str | None
    memory_tiers: dict[int, frozenset[int]] | None  # tier -> nodes; None: the kernel reports none
    kernel: str | None  # uname -r
    exit_status: int | None = None  # the command's; None when the guest never printed it
    streams: bool = True  # False: the command's output went to the console
    pci: dict[str, PciFunction] | None = None  # by Linux's address (0000:01:00.0); None: not reported
    generic_initiator_nodes: frozenset[int] | None = None  # None: the kernel has no such list
    modules: dict[str, int] | None = None  # each module /init loaded: insmod's status; None: none loaded
    document: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kernel_version(self) -> tuple[int, int] | None:
        return kernel_version(self.kernel or "")

    def node_of_cpu(self) -> dict[int, int]:
        return {cpu: node for node, n in self.nodes.items() for cpu in n.cpus}

    def apic_to_node(self) -> dict[int, int]:
        """APIC id -> node: each node's cpulist, each CPU's APIC id.  A source every kernel
        version has (Linux 6.12 stopped logging the SRAT's processor entries); CPUs the report
        gives no APIC id for are left out."""
        apics = self.cpu_apic_ids or {}
        return dict(sorted((apics[c], node) for c, node in self.node_of_cpu().items() if c in apics))

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> GuestReport:
        apics = doc.get("cpu_apic_ids")
        tiers = doc.get("memory_tiers")
        return cls(
            nodes={n: GuestNode.from_document(_mapping(v)) for n, v in _keyed(_mapping(doc.get("nodes"))).items()},
            cpu_apic_ids=({c: a for c, a in _keyed(apics).items() if _int(a) is not None}
                          if isinstance(apics, Mapping) else None),
            online_cpus=_str(doc.get("online_cpus")),
            online_nodes=_str(doc.get("online_nodes")),
            memory_tiers=({t: parse_cpulist(v) for t, v in _keyed(tiers).items() if isinstance(v, str)}
                          if isinstance(tiers, Mapping) else None),
            kernel=_str(doc.get("kernel")),
            exit_status=_int(doc.get("exit_status")),
            streams=doc.get("streams", True) is not False,
            pci=({a: PciFunction.from_document(_mapping(v)) for a, v in pci.items() if isinstance(a, str)}
                 if isinstance(pci := doc.get("pci"), Mapping) else None),
            generic_initiator_nodes=(parse_cpulist(gi) if isinstance(gi := doc.get("has_generic_initiator_nodes"),
                                                                    str) else None),
            modules=({m: st for m, st in mods.items() if isinstance(m, str) and _int(st) is not None}
                     if isinstance(mods := doc.get("modules"), Mapping) else None),
            document=doc,
        )
