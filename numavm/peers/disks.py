"""Disks in the peers' syntaxes, both ways (`numavm export` / `numavm import`).

numavm's `--disk FILE[,domain=N][,readonly][,initiator]` is a raw image as a virtio-blk PCI
device behind domain N's own host bridge (numavm.plan.pci), optionally also an ACPI generic
initiator of domain N.  Each peer says as much of that as it can:

- QEMU: a ``pxb`` expander bridge per domain that holds a disk (``numa_node=`` gives the
  root bus its ``_PXM``), each disk a ``-blockdev`` raw node and a ``virtio-blk-pci`` on
  its domain's pxb, an initiator an ``-object acpi-generic-initiator`` (QEMU 9.0+).  QEMU's
  (i440fx) pxb puts its devices behind an internal pci-bridge, so a pxb takes two bus
  numbers (its root bus and the bridge's) and a disk sits on bus ``bus_nr + 1``: the
  pxbs get bus_nr 1, 3, 5, ... (numavm.plan.pci.pxb_bus_nr) and the disks numavm's own buses.
- libvirt: a ``pci-expander-bus`` controller (model ``pxb``, ``<node>``) per such domain,
  each disk a ``<disk>`` addressed to its controller's index.  libvirt's generic initiator
  (``<acpi nodeset=.../>``) belongs to ``<hostdev>`` only: a disk cannot be one.
- Cloud Hypervisor: a PCI segment per such domain (bridge k -> segment k + 1, segment 0
  being CH's own, always on node 0), ``--numa ...,pci_segments=[S]``, ``--disk
  ...,pci_segment=S``; an initiator is a ``--numa`` node of its own with ``device_id=``
  (v51+), which takes neither vCPUs nor memory and names one device.
- bhyve: ``-s BUS:SLOT:0,virtio-blk,PATH[,ro]``, the i-th disk at bus 1 + i // 32, slot i % 32
  (numavm's own place when every disk is on domain 0); bhyve gives a bus no proximity domain,
  so the disks lose theirs, and it splits -s at every comma, so a path with one is left out.
- TOML: ``[[disk]]``.

What a peer cannot say is a warning on export; on import, a disk the peer places nowhere
numavm can tell is on domain 0 with a note, and what numavm cannot express is an error.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from typing import Callable

from numavm.errors import ConfigError
from numavm.plan.pci import plan_pci, pxb_bus_nr
from numavm.spec.devices import Disk
from numavm.spec.topology import Topology
from numavm.spec.units import format_list, parse_int

QEMU_GI_VERSION = "9.0"
CH_GI_VERSION = "v51"


def _placed(topo: Topology) -> list[tuple[int, Disk, int, int]]:
    """(index, disk, bridge k, slot) in --disk order; k counts the plan's bridges from 0."""
    pci = plan_pci(topo)
    k_of = {b.bus: k for k, b in enumerate(pci.bridges)}
    return [(dev.index, topo.disks[dev.index], k_of[dev.bus], dev.slot) for dev in pci.devices]


def _keep(topo: Topology, ok: Callable[[str], bool], warnings: list[str], why: str) -> Topology:
    """The machine with only the disks whose path the peer can write (the others warned about),
    so that buses and slots are those of what is written."""
    for i, d in enumerate(topo.disks):
        if not ok(d.path):
            warnings.append(f"disk {i} ({d.path!r}): {why}; left out")
    return replace(topo, disks=tuple(d for d in topo.disks if ok(d.path)))


def _lost_initiators(topo: Topology, warnings: list[str], peer: str, why: str) -> None:
    for i, d in enumerate(topo.disks):
        if d.initiator:
            warnings.append(f"disk {i} ({d.path}): {peer} {why}; it is not a generic initiator of domain "
                            f"{d.domain} there")


# ---------------------------------------------------------------- QEMU


def _qemu_value(s: str) -> str:
    return s.replace(",", ",,")


def qemu_lines(topo: Topology, warnings: list[str]) -> list[list[str]]:
    """-device pxb per domain holding a disk, then each disk's -blockdev and -device, then the
    generic initiators."""
    placed = _placed(topo)
    if not placed:
        return []
    lines: list[list[str]] = []
    for k, bridge in enumerate(plan_pci(topo).bridges):
        pxb = f"pxb,id=pxb{bridge.domain},bus_nr={pxb_bus_nr(bridge)},bus=pci.0"
        if topo.numa:
            pxb += f",numa_node={bridge.domain}"
        lines.append(["-device", pxb])
    for i, d, _, slot in placed:
        node = f"driver=raw,node-name=drive{i},file.driver=file,file.filename={_qemu_value(d.path)}"
        if d.readonly:
            node += ",read-only=on"
        lines.append(["-blockdev", node])
        lines.append(["-device", f"virtio-blk-pci,id=disk{i},drive=drive{i},bus=pxb{d.domain},addr={slot:#x}"])
    gis = [(i, d) for i, d, _, _ in placed if d.initiator]
    for i, d in gis:
        lines.append(["-object", f"acpi-generic-initiator,id=gi{i},pci-dev=disk{i},node={d.domain}"])
    if gis:
        warnings.append(f"-object acpi-generic-initiator (the generic initiator of disk(s) "
                        f"{format_list([i for i, _ in gis])}) needs QEMU {QEMU_GI_VERSION} or later; "
                        "older QEMU refuses the command line")
    return lines


_JSON_DEPTH = 8  # -blockdev's file.file.filename is 3; QEMU's options nest no deeper than a few


def _flat(obj: dict[str, object], prefix: str = "", depth: int = 0) -> dict[str, str]:
    """A JSON option object as QEMU's dotted keys (``{"file": {"driver": "file"}}`` ->
    ``file.driver``), values as text (``true`` -> ``on``)."""
    if depth > _JSON_DEPTH:
        raise ConfigError(f"{prefix.rstrip('.')}: nested more than {_JSON_DEPTH} objects deep")
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = prefix + str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key + ".", depth + 1))
        elif isinstance(v, bool):
            out[key] = "on" if v else "off"
        elif isinstance(v, (int, str)):
            out[key] = str(v)
        else:
            raise ConfigError(f"{key}: expected a string, number or object, got {json.dumps(v)[:40]}")
    return out


def _qemu_props(opt: str, value: str, implied: str) -> dict[str, str]:
    """An option's key=value,... (``,,`` a comma; values kept as written, spaces too, as QEMU
    does) or JSON object, as one dict; a key given twice is an error."""
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except RecursionError:  # Python's decoder recursed too deep (3.11 does so sooner than 3.13)
            raise ConfigError(f"{opt} {value[:60]}: nested more than {_JSON_DEPTH} objects deep") from None
        except ValueError as e:
            raise ConfigError(f"{opt} {value[:60]}: not a JSON object ({str(e)[:80]})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{opt} {value[:60]}: not a JSON object")
        return _flat(obj)
    out: dict[str, str] = {}
    for k, item in enumerate(value.replace(",,", "\0").split(",")):
        key, eq, v = item.replace("\0", ",").partition("=")
        if not eq:
            if k or not item:
                raise ConfigError(f"{opt} {value}: expected key=value, got {item!r}")
            key, v = implied, key
        if key in out:
            raise ConfigError(f"{opt} {value}: {key}= given twice")
        out[key] = v
    return out


_QEMU_VIRTIO_BLK = ("virtio-blk-pci", "virtio-blk-pci-non-transitional", "virtio-blk-pci-transitional")
_QEMU_PXB = ("pxb", "pxb-pcie")
_QEMU_ROOT_BUSES = ("pci.0", "pcie.0")
_QEMU_FILE_DRIVERS = ("file", "host_device")


def _on(value: str, where: str) -> bool:
    from numavm.peers import flag

    return flag(value, where)


@dataclass
class QemuDisks:
    """The -device, -drive, -blockdev and acpi-generic-initiator options of a QEMU command
    line, collected in order; `disks` resolves them once the -numa nodes are known."""

    devices: list[dict[str, str]] = field(default_factory=list)  # -device, with "driver"
    order: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # virtio-blk devices, if=virtio drives
    blockdevs: dict[str, dict[str, str]] = field(default_factory=dict)  # by node-name
    drives: dict[str, dict[str, str]] = field(default_factory=dict)  # -drive if=none, by id
    initiators: list[dict[str, str]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    @staticmethod
    def is_initiator(value: str) -> bool:
        """Whether an -object value (key=value or JSON) is an acpi-generic-initiator."""
        if value.lstrip().startswith("{"):
            return _qemu_props("-object", value, "qom-type").get("qom-type") == "acpi-generic-initiator"
        first = value.split(",", 1)[0]
        return first in ("acpi-generic-initiator", "qom-type=acpi-generic-initiator")

    def add(self, opt: str, value: str) -> None:
        if opt == "-device":
            p = _qemu_props(opt, value, "driver")
            self.devices.append(p)
            if p.get("driver") in _QEMU_VIRTIO_BLK:
                self.order.append(("-device", p))
            elif p.get("driver") not in _QEMU_PXB:
                self.left_out.append(f"-device {p.get('driver', '?')}")
        elif opt == "-blockdev":
            p = _qemu_props(opt, value, "driver")
            name = p.get("node-name")
            if not name:
                raise ConfigError(f"-blockdev {value}: needs node-name=")
            if name in self.blockdevs:
                raise ConfigError(f"-blockdev node-name={name}: given twice")
            self.blockdevs[name] = p
        elif opt == "-drive":
            p = _qemu_props(opt, value, "file")
            kind = p.get("if", "ide")  # QEMU's default interface on pc
            if p.get("media", "disk") != "disk" or kind not in ("none", "virtio"):
                self.left_out.append(f"-drive if={kind}" + (f",media={p['media']}" if "media" in p else ""))
            elif kind == "virtio":
                self.order.append(("-drive", p))
            else:
                if "id" not in p:
                    raise ConfigError(f"-drive {value}: if=none needs id=")
                if p["id"] in self.drives:
                    raise ConfigError(f"-drive id={p['id']}: given twice")
                self.drives[p["id"]] = p
        else:  # -object acpi-generic-initiator
            self.initiators.append(_qemu_props(opt, value, "qom-type"))

    def disks(self, nodes: set[int] | None, notes: list[str]) -> list[Disk]:
        """The disks, in the order of their virtio-blk devices; `nodes` the -numa node ids
        (None: no -numa, the classic machine)."""
        by_id = {p["id"]: p for p in self.devices if p.get("id")}
        out: list[tuple[str | None, Disk]] = []  # (device id, disk)
        unplaced: list[str] = []
        for opt, p in self.order:
            if opt == "-drive":  # if=virtio: a virtio-blk-pci on the main bus
                where = f"-drive file={p.get('file', '')},if=virtio"
                path, ro = self._drive(p, where)
                unplaced.append(where)
                out.append((None, Disk(path, 0, ro, False, where)))
                continue
            where = f"-device {p['driver']}" + (f",id={p['id']}" if p.get("id") else "")
            if "drive" not in p:
                raise ConfigError(f"{where}: needs drive= (a -blockdev node-name or a -drive id)")
            path, ro = self._backend(p["drive"], where)
            domain = self._domain(p.get("bus"), by_id, nodes, where)
            if domain is None:
                unplaced.append(where)
            out.append((p.get("id"), Disk(path, domain or 0, ro, False, where)))
        used = {p.get("drive") for p in self.devices if p.get("driver") in _QEMU_VIRTIO_BLK}
        self.left_out += [f"-drive id={i}" for i in self.drives if i not in used]
        if unplaced and nodes is not None:
            notes.append(f"{', '.join(unplaced)}: on no pxb with numa_node= (QEMU's main PCI bus); numavm "
                         "puts such a disk on domain 0")
        return self._initiators(out)

    def _backend(self, name: str, where: str) -> tuple[str, bool]:
        if name in self.drives:
            return self._drive(self.drives[name], f"-drive id={name}")
        if name in self.blockdevs:
            return self._blockdev(name, set())
        raise ConfigError(f"{where} drive={name}: no -blockdev node-name={name} or -drive id={name}")

    @staticmethod
    def _drive(p: dict[str, str], where: str) -> tuple[str, bool]:
        fmt = p.get("format", "raw")
        if fmt != "raw":
            raise ConfigError(f"{where} format={fmt}: numavm's disks are raw images")
        if not p.get("file"):
            raise ConfigError(f"{where}: needs file=")
        return p["file"], _on(p.get("readonly", "off"), f"{where} readonly")

    def _blockdev(self, name: str, seen: set[str]) -> tuple[str, bool]:
        p = self.blockdevs[name]
        where = f"-blockdev node-name={name}"
        if name in seen:
            raise ConfigError(f"{where}: its file= leads back to itself")
        seen.add(name)
        ro = _on(p.get("read-only", "off"), f"{where} read-only")
        driver = p.get("driver", "")
        if driver in _QEMU_FILE_DRIVERS:
            if not p.get("filename"):
                raise ConfigError(f"{where}: needs filename=")
            return p["filename"], ro
        if driver != "raw":
            raise ConfigError(f"{where} driver={driver}: numavm's disks are raw image files (driver=raw or "
                              f"driver=file)")
        for key in ("offset", "size"):
            if key in p:
                raise ConfigError(f"{where} {key}=: numavm gives the guest the whole image")
        if "file" in p:  # another node by name
            if p["file"] not in self.blockdevs:
                raise ConfigError(f"{where} file={p['file']}: no -blockdev node-name={p['file']}")
            path, child_ro = self._blockdev(p["file"], seen)
            return path, ro or child_ro
        child = {k[5:]: v for k, v in p.items() if k.startswith("file.")}
        if child.get("driver") not in _QEMU_FILE_DRIVERS or not child.get("filename"):
            raise ConfigError(f"{where}: expected file.driver=file and file.filename= (or file=NODE)")
        return child["filename"], ro or _on(child.get("read-only", "off"), f"{where} file.read-only")

    @staticmethod
    def _domain(bus: str | None, by_id: dict[str, dict[str, str]], nodes: set[int] | None,
                where: str) -> int | None:
        """The numa_node of the pxb the bus leads to (through bridges), None on the main bus."""
        seen: set[str] = set()
        while bus is not None and bus not in _QEMU_ROOT_BUSES:
            dev = by_id.get(bus)
            if dev is None or bus in seen:
                raise ConfigError(f"{where} bus={bus}: no -device with id={bus} on the way to a pxb or pci.0")
            seen.add(bus)
            if dev.get("driver") in _QEMU_PXB:
                node = dev.get("numa_node")
                if node is None:
                    return None
                n = parse_int(node, f"-device {dev['driver']},id={bus} numa_node")
                if nodes is None or n not in nodes:
                    raise ConfigError(f"-device {dev['driver']},id={bus} numa_node={n}: no -numa node,nodeid={n}")
                return n
            bus = dev.get("bus")
        return None

    def _initiators(self, out: list[tuple[str | None, Disk]]) -> list[Disk]:
        disks = [d for _, d in out]
        index = {dev_id: k for k, (dev_id, _) in enumerate(out) if dev_id}
        for p in self.initiators:
            where = f"-object acpi-generic-initiator,id={p.get('id', '')}"
            dev, node = p.get("pci-dev"), p.get("node")
            if dev is None or node is None:
                raise ConfigError(f"{where}: needs pci-dev= and node=")
            if dev not in index:
                raise ConfigError(f"{where} pci-dev={dev}: not a virtio-blk-pci disk's id; numavm's generic "
                                  "initiators are its disks")
            k = index[dev]
            n = parse_int(node, f"{where} node")
            d = disks[k]
            if d.initiator:
                raise ConfigError(f"{where}: disk {dev} is already a generic initiator (numavm's is one "
                                  "domain's)")
            if n != d.domain:
                raise ConfigError(f"{where} node={n}: disk {dev} sits on domain {d.domain}'s bridge; numavm "
                                  "makes a disk the initiator of its own domain")
            disks[k] = Disk(d.path, d.domain, d.readonly, True, d.origin)
        return disks


# ---------------------------------------------------------------- libvirt


def _xml_text_ok(s: str) -> bool:
    """Whether XML 1.0 can carry `s` (no control characters but tab, LF, CR; no surrogates)."""
    return all(c in "\t\n\r" or (" " <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd") or c >= "\U00010000"
               for c in s)


def _vd(n: int) -> str:
    """libvirt's target names: vda .. vdz, vdaa, ..."""
    name = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        name = chr(ord("a") + r) + name
    return "vd" + name


def libvirt_devices(topo: Topology, dom: ET.Element, warnings: list[str]) -> None:
    """<devices>: the pci-root, a pci-expander-bus per domain holding a disk, the disks."""
    topo = _keep(topo, _xml_text_ok, warnings, "its path has characters XML 1.0 cannot carry")
    placed = _placed(topo)
    if not placed:
        return
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "controller", type="pci", index="0", model="pci-root")
    for k, bridge in enumerate(plan_pci(topo).bridges):
        c = ET.SubElement(devices, "controller", type="pci", index=str(k + 1), model="pci-expander-bus")
        ET.SubElement(c, "model", name="pxb")
        target = ET.SubElement(c, "target", busNr=str(pxb_bus_nr(bridge)))
        if topo.numa:
            ET.SubElement(target, "node").text = str(bridge.domain)
    for i, d, k, slot in placed:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=d.path)
        ET.SubElement(disk, "target", dev=_vd(i), bus="virtio")
        if d.readonly:
            ET.SubElement(disk, "readonly")
        ET.SubElement(disk, "address", type="pci", domain="0x0000", bus=f"{k + 1:#04x}", slot=f"{slot:#04x}",
                      function="0x0")
    _lost_initiators(topo, warnings, "libvirt", "takes a generic initiator (<acpi nodeset=.../>) on <hostdev> "
                     "only, not on <disk>")


def _int(text: str | None, where: str) -> int:
    """libvirt's numbers: decimal or 0x hex."""
    t = (text or "").strip()
    try:
        if t.lower().startswith("0x") and len(t) <= 10:
            return int(t, 16)
        return parse_int(t, where)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {t!r}") from None


def libvirt_disks(root: ET.Element, nodes: set[int] | None, notes: list[str]) -> list[Disk]:
    """The virtio <disk>s of <devices>, each on the node of the pci-expander-bus it leads to."""
    controllers: dict[int, ET.Element] = {}
    for c in root.findall("devices/controller"):
        if c.get("type") == "pci":
            idx = _int(c.get("index"), "<controller type='pci'> index")
            if idx in controllers:
                raise ConfigError(f"<controller type='pci' index='{idx}'>: given twice")
            controllers[idx] = c
    disks: list[Disk] = []
    unplaced: list[str] = []
    left_out: list[str] = []
    for el in root.findall("devices/disk"):
        target = el.find("target")
        bus = target.get("bus") if target is not None else None
        dev = target.get("dev", "") if target is not None else ""
        where = f"<disk> <target dev='{dev}'>"
        if el.get("device", "disk") != "disk" or bus != "virtio":
            left_out.append(f"<disk device='{el.get('device', 'disk')}'"
                            + (f" bus='{bus}'" if bus else "") + ">")
            continue
        if el.get("type") not in ("file", "block"):
            raise ConfigError(f"{where} type='{el.get('type')}': numavm's disks are image files or block devices")
        src = el.find("source")
        path = (src.get("file") if el.get("type") == "file" else src.get("dev")) if src is not None else None
        if not path:
            raise ConfigError(f"{where}: needs <source {'file' if el.get('type') == 'file' else 'dev'}=...>")
        drv = el.find("driver")
        fmt = drv.get("type", "raw") if drv is not None else "raw"
        if fmt != "raw":
            raise ConfigError(f"{where} <driver type='{fmt}'>: numavm's disks are raw images")
        addr = el.find("address")
        domain = None
        if addr is not None:
            if addr.get("type") != "pci":
                raise ConfigError(f"{where} <address type='{addr.get('type')}'>: a virtio disk numavm can place "
                                  "is a PCI device")
            if _int(addr.get("domain", "0"), f"{where} <address domain>"):
                raise ConfigError(f"{where} <address domain='{addr.get('domain')}'>: numavm's PCI is segment 0")
            domain = _libvirt_node(_int(addr.get("bus", "0"), f"{where} <address bus>"), controllers, nodes,
                                   where)
        if domain is None:
            unplaced.append(where)
        disks.append(Disk(path, domain or 0, el.find("readonly") is not None, False, where))
    if root.find("devices/hostdev/acpi[@nodeset]") is not None:
        left_out.append("<hostdev> with <acpi nodeset> (a generic initiator numavm has no device for)")
    if unplaced and nodes is not None:
        notes.append(f"{', '.join(unplaced)}: on no pci-expander-bus with a <node>; numavm puts such a disk "
                     "on domain 0")
    if left_out:
        notes.append("left out, not numavm's disks: " + ", ".join(dict.fromkeys(left_out)))
    return disks


def _libvirt_node(index: int, controllers: dict[int, ET.Element], nodes: set[int] | None,
                  where: str) -> int | None:
    seen: set[int] = set()
    while True:
        c = controllers.get(index)
        if c is None:
            if index == 0:  # the pci-root libvirt adds by itself
                return None
            raise ConfigError(f"{where} <address bus='{index:#04x}'>: no <controller type='pci' index='{index}'>")
        if index in seen:
            raise ConfigError(f"<controller type='pci' index='{index}'>: its <address> leads back to itself")
        seen.add(index)
        model = c.get("model", "")
        if model in ("pci-root", "pcie-root"):
            return None
        if model in ("pci-expander-bus", "pcie-expander-bus"):
            node = c.find("target/node")
            if node is None:
                return None
            n = _int(node.text, f"<controller index='{index}'> <node>")
            if nodes is None or n not in nodes:
                raise ConfigError(f"<controller index='{index}'> <node>{n}</node>: no <cell id='{n}'>")
            return n
        addr = c.find("address")
        if addr is None:  # libvirt places a bridge itself, on the root unless told
            return None
        index = _int(addr.get("bus", "0"), f"<controller index='{index}'> <address bus>")


# ---------------------------------------------------------------- Cloud Hypervisor


def _ch_value(s: str) -> str:
    """A value as CH's option parser reads it back: quoted when it holds , " [ or ], a quote
    doubled."""
    if any(c in s for c in ',"[]'):
        return '"' + s.replace('"', '""') + '"'
    return s


def ch_disk_values(topo: Topology, warnings: list[str]) -> tuple[str, list[str]]:
    """--platform's num_pci_segments= and the --disk values ("" and [] without disks)."""
    placed = _placed(topo)
    if not placed:
        return "", []
    quoted = [i for i, d, _, _ in placed if _ch_value(d.path) != d.path]
    if quoted:
        warnings.append(f"the path of disk(s) {format_list(quoted)} is quoted (it holds , \" [ or ]), which Cloud "
                        "Hypervisor reads back as written from v48 on; older versions keep the quotes in the path")
    return (f"num_pci_segments={len(plan_pci(topo).bridges) + 1}",
            [f"path={_ch_value(d.path)}" + (",readonly=on" if d.readonly else "") + f",id=disk{i},pci_segment={k + 1}"
             for i, d, k, _ in placed])


def ch_numa_extra(topo: Topology, warnings: list[str]) -> dict[int, str]:
    """What each --numa node adds: its bridge's segment, and device_id= for a generic initiator
    where CH can say it (a node without vCPUs and memory, one device)."""
    extra: dict[int, str] = {}
    gi_done: set[int] = set()
    for i, d in enumerate(topo.disks):
        if not d.initiator:
            continue
        dom = next(x for x in topo.domains if x.id == d.domain)
        if dom.cpus or dom.size:
            warnings.append(f"disk {i} ({d.path}): Cloud Hypervisor's generic initiator is a --numa node of its "
                            f"own (device_id=, without cpus or memory_zones); domain {d.domain} has "
                            f"{'vCPUs' if dom.cpus else 'memory'}, so the disk is not an initiator there")
        elif d.domain in gi_done:
            warnings.append(f"disk {i} ({d.path}): a Cloud Hypervisor --numa node names one device_id; domain "
                            f"{d.domain}'s is another disk's, so this one is not an initiator there")
        else:
            gi_done.add(d.domain)
            extra[d.domain] = f",device_id=disk{i}"
    if gi_done:
        warnings.append(f"--numa device_id= (generic initiator domain(s) {format_list(sorted(gi_done))}) needs "
                        f"Cloud Hypervisor {CH_GI_VERSION} or later")
    for k, b in enumerate(plan_pci(topo).bridges):  # bridge k is segment k + 1, as in ch_disk_values
        extra[b.domain] = extra.get(b.domain, "") + f",pci_segments=[{k + 1}]"
    return extra


_CH_DISK_KEYS = {"path", "readonly", "direct", "iommu", "num_queues", "queue_size", "vhost_user", "socket",
                 "bw_size", "bw_one_time_burst", "bw_refill_time", "ops_size", "ops_one_time_burst",
                 "ops_refill_time", "id", "pci_segment", "pci_device_id", "rate_limit_group", "queue_affinity",
                 "serial", "backing_files", "sparse", "image_type", "lock_granularity"}


def _ch_split(text: str, where: str) -> dict[str, str]:
    """CH's option syntax with quotes (``path="a,b"``, ``""`` a quote) and [...] lists."""
    items: list[str] = []
    cur: list[str] = []
    depth, quoted = 0, False
    for c in text:
        if c == '"':
            quoted = not quoted
        elif not quoted and c == "[":
            depth += 1
        elif not quoted and c == "]":
            depth -= 1
        elif not quoted and c == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(c)
    items.append("".join(cur))
    if quoted or depth:
        raise ConfigError(f"{where} {text}: unbalanced quotes or brackets")
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"{where} {text}: expected key=value, got {item!r}")
        if key not in _CH_DISK_KEYS:
            raise ConfigError(f"{where} {text}: unknown key {key}= (keys: {', '.join(sorted(_CH_DISK_KEYS))})")
        if key in out:
            raise ConfigError(f"{where} {text}: {key}= given twice")
        out[key] = _dequote(value)
    return out


def _dequote(s: str) -> str:
    out: list[str] = []
    prev, quoted = "", False
    for c in s:
        if c == '"':
            if prev == '"' and not quoted:
                out.append('"')
            quoted = not quoted
        else:
            out.append(c)
        prev = c
    return "".join(out)


def ch_disks(values: list[str], platform: str | None, segments: dict[int, int], initiators: dict[str, int],
             numa: bool, notes: list[str]) -> list[Disk]:
    """--disk values; `segments`: PCI segment -> --numa node, `initiators`: device_id -> node."""
    from numavm.peers import flag

    nseg = 1
    if platform is not None:
        for item in platform.split(","):
            key, _, value = item.partition("=")
            if key.strip() == "num_pci_segments":
                nseg = parse_int(value, "--platform num_pci_segments")
    for seg in segments:
        if seg >= nseg:
            raise ConfigError(f"--numa pci_segments=[{seg}]: --platform num_pci_segments={nseg} gives segments "
                              f"0..{nseg - 1} (Cloud Hypervisor refuses it too)")
    disks: list[Disk] = []
    ids: dict[str, int] = {}
    unplaced: list[str] = []
    for v in values:
        o = _ch_split(v, "--disk")
        where = f"--disk path={o.get('path', '')}"
        if "path" not in o or not o["path"]:
            raise ConfigError(f"--disk {v}: needs path= (numavm's disks are image files)")
        if flag(o.get("vhost_user", "off"), f"{where} vhost_user") or "socket" in o:
            raise ConfigError(f"{where}: a vhost-user disk; numavm opens the image itself")
        if o.get("image_type", "raw") != "raw":
            raise ConfigError(f"{where} image_type={o['image_type']}: numavm's disks are raw images")
        seg = parse_int(o.get("pci_segment", "0"), f"{where} pci_segment")
        if seg >= nseg:
            raise ConfigError(f"{where} pci_segment={seg}: --platform num_pci_segments={nseg} gives segments "
                              f"0..{nseg - 1} (Cloud Hypervisor refuses it too)")
        if seg not in segments and numa and seg:
            unplaced.append(f"{where} (segment {seg})")
        if "id" in o:
            if o["id"] in ids:
                raise ConfigError(f"--disk id={o['id']}: given twice")
            ids[o["id"]] = len(disks)
        disks.append(Disk(o["path"], segments.get(seg, 0), flag(o.get("readonly", "off"), f"{where} readonly"),
                          False, where))
    for dev_id, node in initiators.items():
        where = f"--numa guest_numa_id={node},device_id={dev_id}"
        if dev_id not in ids:
            raise ConfigError(f"{where}: no --disk id={dev_id}; numavm's generic initiators are its disks")
        d = disks[ids[dev_id]]
        if d.domain != node:
            raise ConfigError(f"{where}: disk {dev_id} is on PCI segment of node {d.domain}; numavm makes a disk "
                              "the initiator of the domain whose bridge it sits on (give the node "
                              f"pci_segments=[its segment])")
        disks[ids[dev_id]] = Disk(d.path, d.domain, d.readonly, True, d.origin)
    if unplaced:
        notes.append(f"{', '.join(unplaced)}: on a PCI segment no --numa node lists, which Cloud Hypervisor puts "
                     "on node 0; so does numavm")
    return disks


# ---------------------------------------------------------------- bhyve


def bhyve_lines(topo: Topology, warnings: list[str]) -> list[list[str]]:
    """-s BUS:SLOT:0,virtio-blk,PATH[,ro], the i-th disk at bus 1 + i // 32, slot i % 32 (numavm's own
    place when every disk is on domain 0; bus 0 is left to bhyve's hostbridge, lpc, ...)."""
    kept = _keep(topo, lambda p: "," not in p, warnings, "bhyve splits -s at every comma, so this path "
                 "cannot be given").disks
    lines = [["-s", f"{1 + i // 32}:{i % 32}:0,virtio-blk,{d.path}" + (",ro" if d.readonly else "")]
             for i, d in enumerate(kept)]
    if topo.numa and kept:
        placed = sorted({d.domain for d in kept})
        warnings.append(f"bhyve cannot place a device on a NUMA domain: the disks (on domain(s) "
                        f"{format_list(placed)}) sit on PCI buses without a proximity domain")
    _lost_initiators(topo, warnings, "bhyve", "has no generic initiators")
    return lines


def bhyve_disk(value: str) -> Disk | None:
    """One -s value, a disk when its emulation is virtio-blk."""
    parts = value.split(",")
    if len(parts) < 2 or parts[1].strip() != "virtio-blk":
        return None
    where = f"-s {parts[0]},virtio-blk"
    if len(parts) < 3 or not parts[2]:
        raise ConfigError(f"{where}: needs the image path")
    path = parts[2][5:] if parts[2].startswith("path=") else parts[2]
    if not path:
        raise ConfigError(f"{where}: needs the image path")
    return Disk(path, 0, "ro" in (p.strip() for p in parts[3:]), False, f"{where},{path}")


# ---------------------------------------------------------------- numavm TOML


def _toml_string(s: str) -> str:
    """A TOML basic string for any text (control characters escaped)."""
    named = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    return '"' + "".join(named.get(c) or (f"\\u{ord(c):04X}" if c < " " or c == "\x7f" else c) for c in s) + '"'


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, as a command line can hold (surrogate escapes)
        return False
    return True


def toml_lines(topo: Topology, warnings: list[str]) -> list[str]:
    """[[disk]] tables; TOML is UTF-8, so a path that is not is left out (warned)."""
    out: list[str] = []
    for d in _keep(topo, _utf8_ok, warnings, "its path is not UTF-8, which a TOML file must be").disks:
        out += ["", "[[disk]]", f"path = {_toml_string(d.path)}", f"domain = {d.domain}"]
        if d.readonly:
            out.append("readonly = true")
        if d.initiator:
            out.append("initiator = true")
    return out
