"""The guest's PCI topology: a host bridge per domain that holds a device, as values.

One PCI segment (0).  Every domain holding a device gets its own host bridge (an ACPI
``PNP0A03`` device: ``_UID`` and ``_BBN`` its bus number, ``_PXM`` the domain), in ascending
domain order; the k-th bridge owns bus ``2k + 2``.  The buses below each (0, 1, 3, ...) stay
free so that the same bus/device/function numbers hold under QEMU (numavm.vmm.tcg), whose bus 0
is its i440fx root and whose ``pxb`` expander bridge is not where its devices sit: a ``pxb``
with ``bus_nr=B`` is a root bus B whose slot 0 always holds a PCI-to-PCI bridge of QEMU's own,
and the devices given to the ``pxb`` sit behind that, on bus B + 1 as firmware numbers it
(QEMU 7.2 and 10.0 alike).  A generic initiator's SRAT entry names its device by segment and
BDF, one table for both engines.

Devices sit directly on their bridge's bus, function 0, slots 0, 1, ... in ``--disk`` order.
A run's shares (``--share``, ``--host-root``: virtio-9p, numavm.spec.shares) are not part of
the machine (`plan` never shows them); the KVM engine, which has no other bus to put them on,
plans them with `plan_pci(topo, shares=N)`: on the bridge of the boot vCPU's domain
(`share_domain`), after that bus's disks, and that bridge, when no disk made one, after every
disk's bridge, so that the disks' bus/device/function numbers never move.
Config space is reached through ECAM (MCFG; 1 MiB per bus from `ECAM_BASE`, which is bus 0's
address, reserved in the e820 map because Linux uses MCFG only then) and through ports
0xCF8/0xCFC.  Each bridge has one 32-bit memory window in the 3-4 GiB hole; numavm assigns
every BAR in it before the guest starts, as firmware would (the guest may move them).
Interrupts are MSI-X only: no INTx, so no ``_PRT``.

A machine without devices has an empty `PciLayout`: no bridge, no MCFG, no e820 entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from numavm.spec.devices import MAX_DISKS
from numavm.spec.topology import Topology

KiB, MiB = 1 << 10, 1 << 20

PCI_SEGMENT = 0
FIRST_BUS = 2
BUS_STRIDE = 2  # bridge k's bus is FIRST_BUS + BUS_STRIDE * k: QEMU's pxb takes the bus below it
ECAM_BASE = 0xE000_0000  # bus 0's config space; 256 buses end at 0xF000_0000, below the IOAPIC
ECAM_BUS_SIZE = 1 * MiB  # 32 devices x 8 functions x 4 KiB
ECAM_FUNCTION_SIZE = 4 * KiB
CONFIG_ADDRESS_PORT = 0xCF8  # configuration mechanism #1
CONFIG_DATA_PORT = 0xCFC
MMIO_BASE = 0xC000_0000  # the start of the 3-4 GiB hole (layout.LOW_RAM_LIMIT)
BRIDGE_WINDOW = 2 * MiB  # each bridge's memory window: room for 32 devices' BARs, moved or not
SLOTS_PER_BUS = 32

# The virtio-pci device's one BAR (BAR0, 32-bit memory), its regions at fixed offsets.
VIRTIO_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040  # + the virtio device id (modern devices)
VIRTIO_BAR_SIZE = 0x8000
VIRTIO_COMMON_CFG = 0x0000
VIRTIO_ISR_CFG = 0x1000
VIRTIO_DEVICE_CFG = 0x2000
VIRTIO_NOTIFY_CFG = 0x3000
VIRTIO_NOTIFY_MULTIPLIER = 4  # queue q notifies at VIRTIO_NOTIFY_CFG + 4 * q
VIRTIO_MSIX_TABLE = 0x4000
VIRTIO_MSIX_PBA = 0x5000
VIRTIO_REGION_SIZE = 0x1000

VIRTIO_BLK = "virtio-blk"
VIRTIO_9P = "virtio-9p"  # a shared host directory (numavm.devices.virtio.p9)
VIRTIO_IDS = {VIRTIO_BLK: 2, VIRTIO_9P: 9}
PCI_CLASS = {VIRTIO_BLK: 0x01_80_00,  # mass storage, other
             VIRTIO_9P: 0x00_02_00}  # QEMU's virtio-9p-pci value (class_id 0x0002); Linux does not look


@dataclass(frozen=True)
class Window:
    """Guest-physical [start, end)."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.start <= addr < self.end


@dataclass(frozen=True)
class HostBridge:
    domain: int
    bus: int
    mmio: Window
    pxm: int | None  # the domain, or None on a machine without NUMA (no SRAT for a _PXM to name)

    @property
    def uid(self) -> int:
        return self.bus


@dataclass(frozen=True)
class PciDevice:
    kind: str  # VIRTIO_BLK or VIRTIO_9P
    index: int  # its position among the machine's disks (VIRTIO_BLK) or the run's shares (VIRTIO_9P)
    domain: int
    bus: int
    slot: int
    bar0: int  # the guest address numavm assigns to BAR0
    initiator: bool  # also an ACPI generic initiator of its domain

    @property
    def devfn(self) -> int:
        return self.slot << 3

    @property
    def bdf(self) -> str:
        """Linux's name for it: ``0000:02:00.0``."""
        return f"{PCI_SEGMENT:04x}:{self.bus:02x}:{self.slot:02x}.0"

    @property
    def config_addr(self) -> int:
        """Its config space in ECAM."""
        return ecam_address(self.bus, self.slot, 0)


@dataclass(frozen=True)
class PciLayout:
    bridges: tuple[HostBridge, ...] = ()
    devices: tuple[PciDevice, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.devices)

    @property
    def last_bus(self) -> int:
        return max((b.bus for b in self.bridges), default=0)

    @property
    def ecam(self) -> Window | None:
        """The ECAM range the MCFG names (buses 0..last_bus), None without devices."""
        if not self.devices:
            return None
        return Window(ECAM_BASE, ECAM_BASE + (self.last_bus + 1) * ECAM_BUS_SIZE)

    def bridge_of(self, domain: int) -> HostBridge | None:
        return next((b for b in self.bridges if b.domain == domain), None)

    def of_kind(self, kind: str) -> tuple[PciDevice, ...]:
        """The devices of one kind, in their order (a disk's position is its `index`)."""
        return tuple(d for d in self.devices if d.kind == kind)


def pxb_bus_nr(bridge: HostBridge) -> int:
    """The root bus number of the QEMU expander bridge (``pxb``) standing for `bridge`.

    A pxb is a root bus with QEMU's own PCI-to-PCI bridge in slot 0, and the devices given to the
    pxb sit behind that bridge, on the bus firmware numbers next: the plan's bus is that one (the
    bus below each bridge's is kept free for this).  Used by the TCG engine and `export`."""
    return bridge.bus - 1


def ecam_address(bus: int, slot: int, function: int, offset: int = 0) -> int:
    return ECAM_BASE + (bus << 20 | slot << 15 | function << 12 | offset)


def share_domain(topo: Topology) -> int:
    """The domain whose bridge carries the run's shares: the boot vCPU's (vCPU 0).

    Not simply domain 0, which may be a memory-only domain (a CXL-like tier without CPUs):
    the boot vCPU's domain always has CPUs, is where /init mounts the shares and starts the
    command, and on most machines it is domain 0 anyway.  The device's I/O thread is pinned
    where that domain's vCPUs run (numavm.vmm.kvm.pci)."""
    return next((d.id for d in topo.domains if 0 in d.cpus), topo.domains[0].id)


def plan_pci(topo: Topology, shares: int = 0) -> PciLayout:
    """Bridges and devices for the machine's disks (`Topology.disks`), then for `shares`
    virtio-9p devices (a run's --share/--host-root on the KVM engine; see the module docstring).
    ValueError when the shares do not fit their bus beside its disks."""
    if not topo.disks and not shares:
        return PciLayout()
    holding = sorted({d.domain for d in topo.disks})
    bridges = {dom: HostBridge(dom, FIRST_BUS + BUS_STRIDE * k,
                               Window(MMIO_BASE + k * BRIDGE_WINDOW, MMIO_BASE + (k + 1) * BRIDGE_WINDOW),
                               dom if topo.numa else None)
               for k, dom in enumerate(holding)}
    used: dict[int, int] = {}
    devices = []
    for index, disk in enumerate(topo.disks):
        bridge = bridges[disk.domain]
        slot = used.get(disk.domain, 0)
        used[disk.domain] = slot + 1
        devices.append(PciDevice(VIRTIO_BLK, index, disk.domain, bridge.bus, slot,
                                 bridge.mmio.start + slot * VIRTIO_BAR_SIZE, disk.initiator))
    if shares:
        dom = share_domain(topo)
        if dom not in bridges:  # after the disks' bridges: their buses and windows stay
            k = len(bridges)
            bridges[dom] = HostBridge(dom, FIRST_BUS + BUS_STRIDE * k,
                                      Window(MMIO_BASE + k * BRIDGE_WINDOW, MMIO_BASE + (k + 1) * BRIDGE_WINDOW),
                                      dom if topo.numa else None)
            holding.append(dom)
        first = used.get(dom, 0)
        if first + shares > SLOTS_PER_BUS:
            raise ValueError(f"{shares} shares do not fit domain {dom}'s bus beside its {first} disks "
                             f"({SLOTS_PER_BUS} slots)")
        bridge = bridges[dom]
        for index in range(shares):
            slot = first + index
            devices.append(PciDevice(VIRTIO_9P, index, dom, bridge.bus, slot,
                                     bridge.mmio.start + slot * VIRTIO_BAR_SIZE, False))
    return PciLayout(tuple(bridges[d] for d in holding), tuple(devices))


# The windows never reach the ECAM range, nor it the IOAPIC (0xFEC00000); a bridge per disk fits the buses
# (and one more bridge for the shares).
assert FIRST_BUS + BUS_STRIDE * MAX_DISKS <= 255
assert MMIO_BASE + 255 * BRIDGE_WINDOW <= ECAM_BASE
assert ECAM_BASE + 256 * ECAM_BUS_SIZE <= 0xFEC0_0000
assert SLOTS_PER_BUS * VIRTIO_BAR_SIZE <= BRIDGE_WINDOW
