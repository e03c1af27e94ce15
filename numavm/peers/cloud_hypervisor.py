"""Cloud Hypervisor's command line: ``--cpus``, ``--memory``, ``--memory-zone``
and ``--numa`` (several values may follow one flag).  Other options (kernel,
disks, network, sockets) do not describe the NUMA machine and are listed in a
note."""

from __future__ import annotations

from numavm.errors import ConfigError
from numavm.spec.policy import MAX_HOST_NODES, Mode, Policy
from numavm.spec.topology import MAX_CPUS, DomainSpec, MachineSpec
from numavm.spec.units import Members, format_list, parse_int, parse_list
from numavm.peers import Imported, command_words, flag, size

FMT = "cloud-hypervisor"
_CPUS_KEYS = {"boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features", "nested"}
_MEMORY_KEYS = {"size", "mergeable", "shared", "hugepages", "hugepage_size", "hotplug_method", "hotplug_size",
                "hotplugged_size", "prefault", "thp"}
_ZONE_KEYS = {"id", "size", "file", "shared", "hugepages", "hugepage_size", "host_numa_node", "hotplug_size",
              "hotplugged_size", "prefault", "mergeable"}
_NUMA_KEYS = {"guest_numa_id", "cpus", "distances", "memory_zones", "sgx_epc_sections", "pci_segments"}


def options(text: str, where: str, keys: set[str]) -> dict[str, str]:
    """CH's key=value,... with commas inside [...] kept (``cpus=[0-1,4]``)."""
    items: list[str] = []
    depth, start = 0, 0
    for k, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:k])
            start = k + 1
    items.append(text[start:])
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"{where} {text}: expected key=value, got {item!r}")
        if key not in keys:
            raise ConfigError(f"{where} {text}: unknown key {key}= (keys: {', '.join(sorted(keys))})")
        if key in out:
            raise ConfigError(f"{where} {text}: {key}= given twice")
        out[key] = value.strip()
    return out


def _bracketed(value: str) -> list[str]:
    v = value.strip()
    if v.startswith("[") and v.endswith("]"):
        v = v[1:-1]
    return [x.strip() for x in v.split(",")] if v.strip() else []


def read(text: str) -> Imported:
    words = command_words(text, FMT)
    values: dict[str, list[str]] = {}
    ignored: list[str] = []
    k = 0
    while k < len(words):
        name = words[k]
        if not name.startswith("-"):
            raise ConfigError(f"{name!r} is not an option")
        k += 1
        got = []
        while k < len(words) and not words[k].startswith("-"):
            got.append(words[k])
            k += 1
        if name in ("--cpus", "--memory", "--memory-zone", "--numa"):
            if not got:
                raise ConfigError(f"{name}: needs a value")
            if name in ("--cpus", "--memory") and (len(got) > 1 or name in values):
                raise ConfigError(f"{name}: given more than once")
            values.setdefault(name, []).extend(got)
        else:
            ignored.append(name)
    notes: list[str] = []
    spec = MachineSpec()
    c = options(values.get("--cpus", ["boot=1"])[0], "--cpus", _CPUS_KEYS)
    spec.cpus = parse_int(c.get("boot", "1"), "--cpus boot")
    if "max" in c and parse_int(c["max"], "--cpus max") > spec.cpus:
        raise ConfigError(f"--cpus max={c['max']}: numavm has no vCPU hotplug; every vCPU is present at boot")
    if "affinity" in c:
        notes.append("--cpus affinity= left out: numavm pins each vCPU to the host nodes of its domain's policy")
    m = options(values.get("--memory", ["size=512M"])[0], "--memory", _MEMORY_KEYS)
    for key in ("hotplug_size", "hotplugged_size"):
        if key in m:
            raise ConfigError(f"--memory {key}=: numavm has no memory hotplug")
    total = size(m.get("size", "512M"), "--memory size")
    prefault = flag(m.get("prefault", "off"), "--memory prefault")
    huge = flag(m.get("hugepages", "off"), "--memory hugepages")
    zones: dict[str, DomainSpec] = {}  # a zone's size, policy and pages, as a domain would hold them
    prefaulted: set[str] = set()
    for z in values.get("--memory-zone", []):
        o = options(z, "--memory-zone", _ZONE_KEYS)
        if "id" not in o or "size" not in o:
            raise ConfigError(f"--memory-zone {z}: needs id= and size=")
        where = f"--memory-zone id={o['id']}"
        if o["id"] in zones:
            raise ConfigError(f"{where}: id given twice")
        for key in ("file", "hotplug_size", "hotplugged_size"):
            if key in o:
                raise ConfigError(f"{where} {key}=: cannot be expressed (numavm backs each domain with its own "
                                  "memfd, present at boot)")
        pol = Policy()
        if "host_numa_node" in o:
            pol = Policy(Mode.BIND, (parse_int(o["host_numa_node"], f"{where} host_numa_node"),))
        zhuge = huge or flag(o.get("hugepages", "off"), f"{where} hugepages")
        zones[o["id"]] = DomainSpec(-1, size(o["size"], f"{where} size"), None, pol,
                                    "hugetlbfs" if zhuge else None, where)
        if prefault or flag(o.get("prefault", "off"), f"{where} prefault"):
            prefaulted.add(o["id"])
    nodes = values.get("--numa", [])
    if not nodes:
        if zones:
            if any(z.policy != Policy() for z in zones.values()):
                raise ConfigError("--memory-zone host_numa_node=: a policy for a guest without --numa "
                                  "nodes; numavm's classic machine has none (give the guest one --numa node)")
            total += sum(z.size or 0 for z in zones.values())
        spec.memory = total
        if huge or any(z.hugepages for z in zones.values()):
            notes.append("hugepages=on: numavm's classic machine has no per-domain pages; give --hugepages "
                         "hugetlbfs to run/check")
        if prefault or prefaulted:
            notes.append("prefault=on: numavm's machine file has no prefault; give --prefault to run/check")
    else:
        if total:
            raise ConfigError(f"--memory size={m['size']}: memory outside the --memory-zone options is in "
                              "no --numa node; with NUMA nodes give --memory size=0")
        _numa(nodes, zones, spec, prefaulted, notes)
    if ignored:
        notes.append("left out, not part of the NUMA machine: " + ", ".join(dict.fromkeys(ignored)))
    return Imported(spec, notes)


def _numa(nodes: list[str], zones: dict[str, DomainSpec], spec: MachineSpec, prefaulted: set[str],
          notes: list[str]) -> None:
    used: set[str] = set()
    prefault_doms = []
    for n in nodes:
        o = options(n, "--numa", _NUMA_KEYS)
        if "guest_numa_id" not in o:
            raise ConfigError(f"--numa {n}: needs guest_numa_id=")
        nid = parse_int(o["guest_numa_id"], "--numa guest_numa_id")
        where = f"--numa guest_numa_id={nid}"
        if "sgx_epc_sections" in o:
            raise ConfigError(f"{where} sgx_epc_sections=: numavm has no SGX enclave memory")
        if "pci_segments" in o:
            notes.append(f"{where} pci_segments= left out: numavm has no PCI")
        cpus = Members(f"{where} cpus", "vCPU")
        for item in _bracketed(o.get("cpus", "")):
            cpus.add(parse_list(item, f"{where} cpus", MAX_CPUS))
        dom = DomainSpec(nid, 0, cpus.sorted(), origin=where)
        mine = [zones[z] if z in zones else _no_zone(z, where) for z in _bracketed(o.get("memory_zones", ""))]
        for z, name in zip(mine, _bracketed(o.get("memory_zones", ""))):
            if name in used:
                raise ConfigError(f"{where} memory_zones: zone {name} is already another node's")
            used.add(name)
            if name in prefaulted:
                prefault_doms.append(nid)
        if mine:
            if len({z.policy for z in mine}) > 1 or len({z.hugepages for z in mine}) > 1:
                raise ConfigError(f"{where} memory_zones: its zones differ in host_numa_node or hugepages; "
                                  "a numavm domain has one policy and one kind of page")
            dom.size = sum(z.size or 0 for z in mine)
            dom.policy, dom.hugepages = mine[0].policy, mine[0].hugepages
        for item in _bracketed(o.get("distances", "")):
            dst, at, val = item.partition("@")
            if not at:
                raise ConfigError(f"{where} distances: expected NODE@DISTANCE, got {item!r}")
            spec.distances.append((nid, parse_int(dst, f"{where} distances"), parse_int(val, f"{where} distances"),
                                   f"{where} distances {item}"))
        spec.domains.append(dom)
    left = sorted(set(zones) - used)
    if left:
        raise ConfigError(f"--memory-zone id={left[0]}: in no --numa node's memory_zones")
    if prefault_doms:
        doms = format_list(sorted(set(prefault_doms)))
        notes.append(f"prefault=on (domains {doms}): numavm's machine file has no prefault; give --prefault {doms} "
                     "to run/check")


def _no_zone(name: str, where: str) -> DomainSpec:
    raise ConfigError(f"{where} memory_zones: no --memory-zone id={name}")
