"""The PCI platform of a KvmMachine: what connects the pure PCI function models to KVM.

numavm.plan.pci says where everything is (bridges, buses, slots, each BAR0's first address);
numavm.devices.pci / numavm.devices.virtio model the functions (`PciFunction`,
`VirtioPciDevice`) without locks and without knowing KVM.  `PciPlatform` is the rest:

- Configuration space, by bus/device/function from the plan, through both mechanisms Linux
  uses: ports 0xCF8/0xCFC (mechanism #1, registered on the machine's IoBus) and ECAM
  (KVM_EXIT_MMIO inside the MCFG's range).  An absent function reads all-ones and ignores
  writes, as a PCI bus with nothing at that address does.
- BAR MMIO: an exit inside a BAR goes to the function whose BAR holds the address.  BARs move
  (the guest sizes them with all-ones, reassigns them, turns decoding off): the function says
  so through `on_change("bars")` and the platform re-reads `bars()`.  The map the vCPU loops
  read is one tuple, replaced whole under a lock, read without one.
- Queue notifications: one eventfd per virtqueue, an ioeventfd on BAR0 + `notify_offset(q)`
  (any write length, as QEMU registers its modern notify area), moved with BAR0 and removed
  while BAR0 does not decode.  The notify write then never leaves KVM: no exit, no vCPU
  thread, no GIL.  Where KVM refuses one (two devices' BARs overlapped by the guest) the
  write exits and the model's `mmio_write` runs the queue instead.
- MSI-X: one GSI and one irqfd per vector, for the machine's life.  `signal_msi(vector)` is an
  eventfd write (from any thread, no ioctl); KVM delivers it as the GSI's route says.  Routes
  follow the guest's MSI-X table (`on_change("msix")`): the table KVM holds is KVM's default
  IOAPIC/PIC routes (the UARTs still use KVM_IRQ_LINE) plus one MSI route per programmed
  vector, set again only when it changes.  The transport itself keeps masked vectors pending.
- One I/O thread per device, named ``<machine>-<kind><index>``, pinned to the CPUs of its
  domain's policy nodes (as the domain's vCPUs are), polling its queue eventfds and a stop
  eventfd, calling `queue_notify(q)` under the device's lock.  The vCPUs take the same lock
  around that device's config and MMIO accesses; a device never waits on the machine's port
  I/O lock, nor the UARTs on a disk.
- Lock order: the machine's port-I/O lock (CF8/CFC come through the IoBus), then one device's
  lock, then the platform's BAR-map or routing lock, each held only around its own work;
  nothing takes them the other way, and no device lock is taken while another is held.
- Teardown (`close`, idempotent, on every path): threads stopped and joined, ioeventfds and
  irqfds removed, every eventfd closed, each function reset to its power-on state (which drops
  the guest memory views its rings held, so the machine can unmap guest memory next) and then
  closed (`close()`, where the model has one: a 9p share's fids are descriptors).  The
  routes go with the VM.
"""

from __future__ import annotations

import bisect
import os
import select
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from numavm.plan.pci import (CONFIG_ADDRESS_PORT, ECAM_BASE, ECAM_BUS_SIZE, ECAM_FUNCTION_SIZE, PciDevice,
                             PciLayout)
from numavm.vmm.kvm.ioctls import FIRST_MSI_GSI, KvmIoctlError, MsiRoute, Route, Vm, default_irq_routes

__all__ = ["PciPlatform", "PciModel", "ConfigPorts", "msi_route_address", "COMMAND", "COMMAND_MEMORY"]

COMMAND = 0x04  # the type 0 header's command register (include/uapi/linux/pci_regs.h)
COMMAND_MEMORY = 1 << 1
_BAR0 = 0x10
_CONFIG_ENABLE = 1 << 31  # CONFIG_ADDRESS bit 31: the next CONFIG_DATA access is a config cycle
_MSI_ADDRESS_BASE = 0xFEE0_0000  # x86 MSIs are writes to the LAPIC's window (0xFEExxxxx)
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


class PciModel(Protocol):
    """What the platform uses of a function model (numavm.devices.pci.function.PciFunction; a
    virtio transport adds `num_queues`, `notify_offset` and `queue_notify`)."""

    on_change: Callable[[str], None]
    signal_msi: Callable[[int], None]

    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def bars(self) -> Sequence[object]: ...  # Bar(index, address, size, kind)
    def mmio_read(self, bar: int, offset: int, size: int) -> int: ...
    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None: ...
    def msix_entries(self) -> Sequence[object]: ...  # MsixEntry(address, data, masked)


def msi_route_address(address: int, x2apic: bool) -> int | None:
    """The MSI address as KVM's route takes it, or None for a vector KVM must not route.

    An unprogrammed vector (address 0), or one whose address is not the LAPIC window, delivers
    nothing.  With KVM_X2APIC_API (`x2apic`), KVM reads destination bits 8-31 from the high
    address word and refuses a route with its low byte set; a Linux guest told of
    KVM_FEATURE_MSI_EXT_DEST_ID writes destination bits 8-14 into address bits 5-11 instead
    (what QEMU's kvm_arch_fixup_msi_route moves too), which KVM itself does not read."""
    if address & 0xFFF0_0000 != _MSI_ADDRESS_BASE:
        return None
    high = address >> 32
    if not x2apic:
        return address & 0xFFFF_FFFF  # KVM ignores the high word outside the x2APIC format
    if high & 0xFF:
        return None
    ext = address >> 5 & 0x7F
    if ext and not high:
        return (address & 0xFFFF_F01F) | ext << 40
    return address


@dataclass(eq=False)
class _Device:
    """The engine's side of one function."""

    plan: PciDevice
    fn: PciModel
    lock: threading.Lock
    gsi_base: int
    vector_fds: list[int] = field(default_factory=list)  # one irqfd eventfd per MSI-X vector
    queue_fds: list[int] = field(default_factory=list)  # one ioeventfd eventfd per virtqueue
    notify_offsets: list[int] = field(default_factory=list)
    notify_at: int = 0  # BAR0's address the ioeventfds are registered at; 0: none
    notify_fallback: int = 0  # queues whose ioeventfd KVM refused (their writes exit instead)
    bars: tuple[tuple[int, int, int], ...] = ()  # (start, end, BAR index) of decoding BARs
    routes: tuple[MsiRoute, ...] = ()
    thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"{self.plan.kind}{self.plan.index}"


class ConfigPorts:
    """Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 (a 32-bit latch), CONFIG_DATA at
    0xCFC-0xCFF; an IoBus device over the 8 ports (numavm.devices.bus).  Only a 32-bit
    access reaches the latch (0xCF9's byte is a chipset's reset register elsewhere: here,
    nothing); CONFIG_DATA at 0xCFC + k reaches the latched register + k."""

    def __init__(self, platform: PciPlatform) -> None:
        self._platform = platform
        self.address = 0

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return self.address if offset == 0 and size == 4 else (1 << (size << 3)) - 1
        latch = self.address
        if not latch & _CONFIG_ENABLE:
            return (1 << (size << 3)) - 1
        return self._platform.config_read(latch >> 16 & 0xFF, latch >> 8 & 0xFF, (latch & 0xFC) + offset - 4, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value & 0x80FF_FFFC  # reserved bits 30:24 and 1:0 read 0
            return
        latch = self.address
        if latch & _CONFIG_ENABLE:
            self._platform.config_write(latch >> 16 & 0xFF, latch >> 8 & 0xFF, (latch & 0xFC) + offset - 4,
                                        size, value)


class PciPlatform:
    """Config space, BAR MMIO, notify ioeventfds, MSI-X irqfds and I/O threads for the
    functions of `layout` (see the module docstring).  `functions[k]` models
    `layout.devices[k]`.  Build it after the VM's irqchip; `start()` the I/O threads when the
    vCPUs start; `close()` always."""

    def __init__(self, vm: Vm, layout: PciLayout, functions: Sequence[PciModel], *, name: str = "numavm",
                 x2apic: bool = False, cpus_of: Callable[[int], Sequence[int]] = lambda domain: (),
                 on_error: Callable[[str], None] | None = None) -> None:
        if len(functions) != len(layout.devices):
            raise ValueError(f"{len(functions)} function models for {len(layout.devices)} planned devices")
        self.vm = vm
        self.layout = layout
        self.name = name
        self.x2apic = x2apic
        self._cpus_of = cpus_of
        self._on_error = on_error or (lambda line: None)
        ecam = layout.ecam
        self.ecam_start, self.ecam_end = (ecam.start, ecam.end) if ecam is not None else (0, 0)
        self.devices: list[_Device] = []
        self._by_bdf: dict[tuple[int, int], _Device] = {}
        self._map_lock = threading.Lock()
        self._routing_lock = threading.Lock()
        self._bar_map: tuple[list[int], list[tuple[int, int, int, _Device]]] = ([], [])
        self._routes_set: tuple[Route, ...] | None = None
        self.routing_errors = 0  # route tables KVM refused (a guest's nonsense MSI-X entries)
        self._stop_fd = -1
        self._closed = False
        try:
            self._stop_fd = os.eventfd(0, _EFD_FLAGS)
            self._build(functions)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ assembly

    def _build(self, functions: Sequence[PciModel]) -> None:
        gsi = FIRST_MSI_GSI
        for plan, fn in zip(self.layout.devices, functions):
            dev = _Device(plan, fn, threading.Lock(), gsi)
            self.devices.append(dev)
            self._by_bdf[(plan.bus, plan.devfn)] = dev
            for _ in fn.msix_entries():
                fd = os.eventfd(0, _EFD_FLAGS)
                dev.vector_fds.append(fd)
                self.vm.add_irqfd(fd, gsi + len(dev.vector_fds) - 1)
            gsi += len(dev.vector_fds)
            for q in range(getattr(fn, "num_queues", 0)):
                dev.notify_offsets.append(fn.notify_offset(q))  # type: ignore[attr-defined]
                dev.queue_fds.append(os.eventfd(0, _EFD_FLAGS))
            fn.signal_msi = self._signaller(dev)
            fn.on_change = self._watcher(dev)
        self._sync_routing(force=True)
        for dev in self.devices:  # firmware's work: BAR0 where the plan puts it, decoding on
            with dev.lock:
                dev.fn.config_write(_BAR0, 4, dev.plan.bar0)
                dev.fn.config_write(COMMAND, 2, dev.fn.config_read(COMMAND, 2) | COMMAND_MEMORY)
                self._follow_bars(dev)  # whether or not the model announced it

    @staticmethod
    def _signaller(dev: _Device) -> Callable[[int], None]:
        fds, write = tuple(dev.vector_fds), os.eventfd_write

        def signal_msi(vector: int) -> None:
            if 0 <= vector < len(fds):
                try:
                    write(fds[vector], 1)
                except BlockingIOError:
                    pass  # the counter is full: an interrupt is pending anyway
        return signal_msi

    def _watcher(self, dev: _Device) -> Callable[[str], None]:
        def on_change(change: str) -> None:
            # Called by the model inside a config/MMIO write or a reset, with dev.lock held.
            if self._closed:
                return
            if change in ("bars", "reset"):
                self._follow_bars(dev)
            if change in ("msix", "reset"):
                self._follow_msix(dev)
        return on_change

    # ------------------------------------------------------------ following the models

    def _follow_bars(self, dev: _Device) -> None:
        bars = tuple(sorted((b.address, b.address + b.size, b.index)  # type: ignore[attr-defined]
                            for b in dev.fn.bars() if b.address))  # type: ignore[attr-defined]
        if bars != dev.bars:
            dev.bars = bars
            self._rebuild_bar_map()
        bar0 = next((start for start, _, index in bars if index == 0), 0)
        if dev.queue_fds and bar0 != dev.notify_at:
            self._move_notify(dev, bar0)

    def _rebuild_bar_map(self) -> None:
        with self._map_lock:
            # by address only: two devices' BARs the guest put at one address must not compare devices
            entries = sorted(((start, end, index, dev) for dev in self.devices for start, end, index in dev.bars),
                             key=lambda e: (e[0], e[1], e[2]))
            self._bar_map = ([e[0] for e in entries], entries)

    def _move_notify(self, dev: _Device, bar0: int) -> None:
        old, dev.notify_at = dev.notify_at, bar0
        if old:
            for fd, off in zip(dev.queue_fds, dev.notify_offsets):
                try:
                    self.vm.remove_ioeventfd(fd, old + off)
                except KvmIoctlError:
                    pass  # never registered (refused when added)
        dev.notify_fallback = 0
        if bar0:
            for fd, off in zip(dev.queue_fds, dev.notify_offsets):
                try:
                    self.vm.add_ioeventfd(fd, bar0 + off)
                except KvmIoctlError:
                    dev.notify_fallback += 1  # the guest overlapped two BARs: that write exits instead

    def _follow_msix(self, dev: _Device) -> None:
        routes = []
        for vector, entry in enumerate(dev.fn.msix_entries()):
            address = msi_route_address(entry.address, self.x2apic)  # type: ignore[attr-defined]
            if address is not None and vector < len(dev.vector_fds):
                routes.append(MsiRoute(dev.gsi_base + vector, address, entry.data))  # type: ignore[attr-defined]
        if tuple(routes) != dev.routes:
            dev.routes = tuple(routes)
            self._sync_routing()

    def _sync_routing(self, force: bool = False) -> None:
        with self._routing_lock:
            table = (*default_irq_routes(), *(r for dev in self.devices for r in dev.routes))
            if table == self._routes_set and not force:
                return
            try:
                self.vm.set_gsi_routing(table)
                self._routes_set = table
            except KvmIoctlError:
                if force:
                    raise
                self.routing_errors += 1  # KVM refused the guest's entries: the old routes stay

    # ------------------------------------------------------------ configuration space

    def config_read(self, bus: int, devfn: int, offset: int, size: int) -> int:
        dev = self._by_bdf.get((bus, devfn))
        if dev is None:
            return (1 << (size << 3)) - 1
        with dev.lock:
            return dev.fn.config_read(offset, size)

    def config_write(self, bus: int, devfn: int, offset: int, size: int, value: int) -> None:
        dev = self._by_bdf.get((bus, devfn))
        if dev is not None:
            with dev.lock:
                dev.fn.config_write(offset, size, value)

    def config_ports(self) -> ConfigPorts:
        """The IoBus device for ports CONFIG_ADDRESS_PORT.. +8 (`IoBus.register(0xCF8, 8, ...)`)."""
        return ConfigPorts(self)

    # ------------------------------------------------------------ MMIO exits (the vCPU loops)

    def mmio_read(self, addr: int, size: int) -> int:
        """A guest read of `size` bytes at `addr` that left KVM; all-ones where nothing decodes."""
        if self.ecam_start <= addr < self.ecam_end:
            if size == 8:  # a 64-bit access to config space: two dwords, as a bridge splits it
                return self._ecam_read(addr, 4) | self._ecam_read(addr + 4, 4) << 32
            off = addr - ECAM_BASE
            dev = self._by_bdf.get((off >> 20, off >> 12 & 0xFF))
            if dev is None:
                return (1 << (size << 3)) - 1
            with dev.lock:
                return dev.fn.config_read(off & (ECAM_FUNCTION_SIZE - 1), size)
        starts, entries = self._bar_map
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            start, end, index, dev = entries[i]
            if addr + size <= end:
                with dev.lock:
                    return dev.fn.mmio_read(index, addr - start, size)
        return (1 << (size << 3)) - 1

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """A guest write that left KVM; dropped where nothing decodes."""
        if self.ecam_start <= addr < self.ecam_end:
            if size == 8:
                self._ecam_write(addr, 4, value & 0xFFFF_FFFF)
                self._ecam_write(addr + 4, 4, value >> 32)
            else:
                self._ecam_write(addr, size, value)
            return
        starts, entries = self._bar_map
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            start, end, index, dev = entries[i]
            if addr + size <= end:
                with dev.lock:
                    dev.fn.mmio_write(index, addr - start, size, value)

    def _ecam_read(self, addr: int, size: int) -> int:
        off = addr - ECAM_BASE
        return self.config_read(off >> 20, off >> 12 & 0xFF, off & (ECAM_FUNCTION_SIZE - 1), size)

    def _ecam_write(self, addr: int, size: int, value: int) -> None:
        off = addr - ECAM_BASE
        self.config_write(off >> 20, off >> 12 & 0xFF, off & (ECAM_FUNCTION_SIZE - 1), size, value)

    # ------------------------------------------------------------ I/O threads

    def start(self) -> None:
        """One I/O thread per device with queues."""
        for dev in self.devices:
            if dev.queue_fds and dev.thread is None:
                dev.thread = threading.Thread(target=self._io_thread, args=(dev,),
                                              name=f"{self.name}-{dev.name}", daemon=True)
                dev.thread.start()

    def _io_thread(self, dev: _Device) -> None:
        try:
            cpus = self._cpus_of(dev.plan.domain)
            if cpus:
                os.sched_setaffinity(0, cpus)  # this thread: where the domain's vCPUs and memory are
            poller = select.poll()
            queue_of = {fd: q for q, fd in enumerate(dev.queue_fds)}
            for fd in (*dev.queue_fds, self._stop_fd):
                poller.register(fd, select.POLLIN)
            stop, read, lock, notify = self._stop_fd, os.eventfd_read, dev.lock, dev.fn.queue_notify  # type: ignore[attr-defined]
            poll = poller.poll
            while True:
                stopping = False
                for fd, _ in poll():
                    if fd == stop:
                        stopping = True  # after the kicks that came with it: a notify before the stop is served
                        continue
                    try:
                        read(fd)
                    except BlockingIOError:
                        continue  # another wake-up took it
                    with lock:
                        notify(queue_of[fd])
                if stopping:
                    return
        except BaseException as e:  # a model must not raise; if it does, the machine ends with why
            self._on_error(f"{dev.name} ({dev.plan.bdf}) I/O thread: {type(e).__name__}: {e}")

    def stop(self) -> None:
        """Stop and join the I/O threads (they can be started again)."""
        if self._stop_fd < 0:
            return
        threads = [dev.thread for dev in self.devices if dev.thread is not None]
        if threads:
            os.eventfd_write(self._stop_fd, 1)
            for t in threads:
                t.join()
            try:
                os.eventfd_read(self._stop_fd)
            except BlockingIOError:
                pass
        for dev in self.devices:
            dev.thread = None

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Threads, ioeventfds, irqfds and eventfds released; idempotent, every step tried."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        vm_open = True
        try:
            self.vm.fd
        except Exception:
            vm_open = False  # the VM went first: its ioeventfds and irqfds went with it
        for dev in self.devices:
            if vm_open and dev.notify_at:
                for fd, off in zip(dev.queue_fds, dev.notify_offsets):
                    try:
                        self.vm.remove_ioeventfd(fd, dev.notify_at + off)
                    except KvmIoctlError:
                        pass
            dev.notify_at = 0
            for gsi, fd in enumerate(dev.vector_fds, dev.gsi_base):
                if vm_open:
                    try:
                        self.vm.remove_irqfd(fd, gsi)
                    except KvmIoctlError:
                        pass
            for fd in (*dev.queue_fds, *dev.vector_fds):
                os.close(fd)
            dev.queue_fds, dev.vector_fds = [], []
            dev.fn.signal_msi = _dropped
            dev.fn.on_change = _ignored
            reset = getattr(dev.fn, "function_reset", None)
            if reset is not None:
                with dev.lock:
                    reset()  # power-on state: the rings' guest memory views go, so memory can be unmapped
            close = getattr(dev.fn, "close", None)
            if close is not None:  # what the model holds on the host (a 9p share's open fids)
                with dev.lock:
                    close()
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        self.devices, self._by_bdf = [], {}  # the models (and the guest memory views they hold) can go
        self._bar_map = ([], [])

    def __enter__(self) -> PciPlatform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dropped(vector: int) -> None:
    pass


def _ignored(change: str) -> None:
    pass


assert CONFIG_ADDRESS_PORT == 0xCF8 and ECAM_BUS_SIZE == 1 << 20
