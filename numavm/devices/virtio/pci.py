"""The virtio 1.x modern PCI transport (virtio 1.2, section 4.1), MSI-X only.

One 32-bit memory BAR0 of `VIRTIO_BAR_SIZE` holds every register; vendor
capabilities (ID 0x09) tell the driver where:

    0x0000  common configuration   features, status, queue setup (`_COMMON`)
    0x1000  ISR status             read-to-clear; bit 0 queue, bit 1 configuration
    0x2000  device configuration   the device type's (`VirtioDevice.config_read`)
    0x3000  notifications          queue q at 0x3000 + 4 * q (`notify_offset`)
    0x4000  MSI-X table            vector 0: configuration changes, 1 + q: queue q
    0x5000  MSI-X PBA

plus the VIRTIO_PCI_CAP_PCI_CFG window the spec requires (a config-space
path to the BAR, which Linux does not use).  Vendor 0x1AF4, device 0x1040 +
the virtio ID, revision 1: a modern-only device, so a driver that does not
accept VIRTIO_F_VERSION_1 is refused at FEATURES_OK.

Device status, as the driver walks it: 0 (a write of 0 resets the device:
queues, features, vectors, ISR, the device type's state), ACKNOWLEDGE,
DRIVER, FEATURES_OK (kept only if the driver's features are a subset of the
offered ones and include VERSION_1; the driver reads it back and gives up
otherwise), DRIVER_OK.  Features written after FEATURES_OK are ignored,
as are queue registers of an enabled queue.

A driver that breaks the protocol (rings outside RAM, descriptor loops,
lengths past the device's limits, a queue notified after DRIVER_OK but
never enabled, ...) puts the device in DEVICE_NEEDS_RESET: the status bit is
set, a configuration interrupt goes out, the reason is kept in `errors`, and
queues are left alone until the driver resets the device.  Nothing a driver
does raises into the engine.  A notify of a disabled queue before DRIVER_OK
is ignored (counted): a kick the I/O thread serves after the guest reset the
device is stale, not hostile.

Queue notifications arrive as `queue_notify(q)` from the device's I/O thread
(the engine's ioeventfd at BAR0's address + `notify_offset(q)`; Linux writes
the queue index there as 16 bits, so a 2-byte or any-length ioeventfd without
datamatch fits; re-register it when ``on_change("bars")`` says BAR0 moved) or
as an MMIO write there; either runs the queue.  Interrupts leave through
MSI-X (`signal_msi(vector)`, called only for an enabled, unmasked vector; the
MSI-X table keeps masked ones pending).  Protocol errors are also reported
through ``on_error(reason)`` for the engine's log.

Not thread-safe, like every model here: the engine holds the device's own
lock around every call (vCPU threads' config and MMIO accesses, the I/O
thread's `queue_notify`), so callbacks run under that lock too.
"""

from __future__ import annotations

import collections
from typing import Callable, Final

from numavm.devices.memory import GuestRam
from numavm.devices.pci.function import CAP_ID_VENDOR, COMMAND, COMMAND_BUS_MASTER, PciFunction
from numavm.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice
from numavm.devices.virtio.queue import NO_VECTOR, Virtqueue, VirtioError
from numavm.plan import pci as plan_pci

__all__ = [
    "VirtioPciDevice",
    "VIRTIO_VENDOR_ID", "VIRTIO_PCI_DEVICE_ID_BASE", "VIRTIO_BAR", "VIRTIO_BAR_SIZE",
    "COMMON_CFG_OFFSET", "ISR_OFFSET", "DEVICE_CFG_OFFSET", "NOTIFY_OFFSET", "NOTIFY_OFF_MULTIPLIER",
    "MSIX_TABLE_OFFSET", "MSIX_PBA_OFFSET", "REGION_SIZE",
    "STATUS_ACKNOWLEDGE", "STATUS_DRIVER", "STATUS_DRIVER_OK", "STATUS_FEATURES_OK",
    "STATUS_DEVICE_NEEDS_RESET", "STATUS_FAILED", "ISR_QUEUE", "ISR_CONFIG",
    "CAP_COMMON_CFG", "CAP_NOTIFY_CFG", "CAP_ISR_CFG", "CAP_DEVICE_CFG", "CAP_PCI_CFG",
]

# The BAR0 layout is the plan's (numavm.plan.pci: the engine assigns BARs in bridge windows from
# the same size); the names here are the transport's.
VIRTIO_VENDOR_ID: Final = plan_pci.VIRTIO_VENDOR
VIRTIO_PCI_DEVICE_ID_BASE: Final = plan_pci.VIRTIO_PCI_DEVICE_BASE  # + the virtio device ID: a modern (1.x) device
VIRTIO_BAR: Final = 0
VIRTIO_BAR_SIZE: Final = plan_pci.VIRTIO_BAR_SIZE
REGION_SIZE: Final = plan_pci.VIRTIO_REGION_SIZE
COMMON_CFG_OFFSET: Final = plan_pci.VIRTIO_COMMON_CFG
ISR_OFFSET: Final = plan_pci.VIRTIO_ISR_CFG
DEVICE_CFG_OFFSET: Final = plan_pci.VIRTIO_DEVICE_CFG
NOTIFY_OFFSET: Final = plan_pci.VIRTIO_NOTIFY_CFG
NOTIFY_OFF_MULTIPLIER: Final = plan_pci.VIRTIO_NOTIFY_MULTIPLIER
MSIX_TABLE_OFFSET: Final = plan_pci.VIRTIO_MSIX_TABLE
MSIX_PBA_OFFSET: Final = plan_pci.VIRTIO_MSIX_PBA

# device status bits (section 2.1)
STATUS_ACKNOWLEDGE: Final = 1
STATUS_DRIVER: Final = 2
STATUS_DRIVER_OK: Final = 4
STATUS_FEATURES_OK: Final = 8
STATUS_DEVICE_NEEDS_RESET: Final = 0x40
STATUS_FAILED: Final = 0x80

ISR_QUEUE: Final = 1
ISR_CONFIG: Final = 2

# virtio_pci_cap.cfg_type
CAP_COMMON_CFG: Final = 1
CAP_NOTIFY_CFG: Final = 2
CAP_ISR_CFG: Final = 3
CAP_DEVICE_CFG: Final = 4
CAP_PCI_CFG: Final = 5

# struct virtio_pci_common_cfg: offset -> (size, field)
_COMMON: Final = {
    0x00: (4, "device_feature_select"),
    0x04: (4, "device_feature"),
    0x08: (4, "driver_feature_select"),
    0x0C: (4, "driver_feature"),
    0x10: (2, "config_msix_vector"),
    0x12: (2, "num_queues"),
    0x14: (1, "device_status"),
    0x15: (1, "config_generation"),
    0x16: (2, "queue_select"),
    0x18: (2, "queue_size"),
    0x1A: (2, "queue_msix_vector"),
    0x1C: (2, "queue_enable"),
    0x1E: (2, "queue_notify_off"),
    0x20: (8, "queue_desc"),
    0x28: (8, "queue_driver"),
    0x30: (8, "queue_device"),
    0x38: (2, "queue_notify_data"),  # VIRTIO_F_NOTIF_CONFIG_DATA: not offered, reads 0
    0x3A: (2, "queue_reset"),  # VIRTIO_F_RING_RESET: not offered, reads 0
}
_COMMON_SIZE: Final = 0x3C
_FIELD_AT: Final = {off + k: (off, size, name) for off, (size, name) in _COMMON.items() for k in range(size)}

_MAX_ERRORS = 16


def _ones(size: int) -> int:
    return (1 << (size * 8)) - 1


class VirtioPciDevice(PciFunction):
    """A virtio device type behind the modern PCI transport, DMA through ``ram``."""

    def __init__(self, device: VirtioDevice, ram: GuestRam) -> None:
        if not device.features >> VIRTIO_F_VERSION_1 & 1:
            raise ValueError(f"virtio device {device.device_id} does not offer VIRTIO_F_VERSION_1")
        nq = len(device.queue_sizes)
        if not 1 <= nq <= REGION_SIZE // NOTIFY_OFF_MULTIPLIER:
            raise ValueError(f"{nq} queues do not fit the notify region")
        super().__init__(
            vendor_id=VIRTIO_VENDOR_ID,
            device_id=VIRTIO_PCI_DEVICE_ID_BASE + device.device_id,
            class_code=device.pci_class,
            revision=1,
            subsystem_vendor_id=VIRTIO_VENDOR_ID,
            subsystem_id=device.device_id,
            bar_sizes={VIRTIO_BAR: VIRTIO_BAR_SIZE},
            msix_vectors=1 + nq,
            msix_bar=VIRTIO_BAR,
            msix_table_offset=MSIX_TABLE_OFFSET,
            msix_pba_offset=MSIX_PBA_OFFSET,
        )
        self.device = device
        self.ram = ram
        self.queues = [Virtqueue(ram, q, size, max_segment=device.max_segment)
                       for q, size in enumerate(device.queue_sizes)]
        for cfg_type, offset in ((CAP_COMMON_CFG, COMMON_CFG_OFFSET), (CAP_ISR_CFG, ISR_OFFSET),
                                 (CAP_DEVICE_CFG, DEVICE_CFG_OFFSET)):
            self.add_capability(CAP_ID_VENDOR, _virtio_cap(16, cfg_type, offset, REGION_SIZE))
        self.add_capability(CAP_ID_VENDOR, _virtio_cap(20, CAP_NOTIFY_CFG, NOTIFY_OFFSET, REGION_SIZE)
                            + NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"))
        # VIRTIO_PCI_CAP_PCI_CFG: bar, offset and length select a BAR access through pci_cfg_data
        self._pci_cfg = self.add_capability(CAP_ID_VENDOR, _virtio_cap(20, CAP_PCI_CFG, 0, 0) + bytes(4))
        self._put_mask(self._pci_cfg + 4, 1, 0xFF)
        self._put_mask(self._pci_cfg + 8, 4, 0xFFFF_FFFF)
        self._put_mask(self._pci_cfg + 12, 4, 0xFFFF_FFFF)
        self._put_mask(self._pci_cfg + 16, 4, 0xFFFF_FFFF)
        self.errors: collections.deque[str] = collections.deque(maxlen=_MAX_ERRORS)  # newest last
        self.error_count = 0
        self.ignored_notifies = 0  # notifies of a disabled queue before DRIVER_OK, or while NEEDS_RESET
        self.on_error: Callable[[str], None] = _ignore_error  # set by the engine: log a protocol error
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.isr = 0
        for q in self.queues:
            q.reset()

    def reset(self) -> None:
        """Device reset (the driver wrote status 0)."""
        self._reset_state()
        self.device.reset()
        self.on_change("reset")

    def function_reset(self) -> None:
        """Power-on state: the PCI function's (`PciFunction.function_reset`) and a device reset."""
        super().function_reset()
        self.errors.clear()
        self.reset()

    def close(self) -> None:
        """The engine is done with the function (after `function_reset`, its I/O thread
        stopped): the device type releases what it holds."""
        self.device.close()

    # ---- for the engine

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    def notify_offset(self, queue: int) -> int:
        """Where in BAR0 the driver notifies ``queue`` (an ioeventfd's address, less the BAR's)."""
        if not 0 <= queue < len(self.queues):
            raise ValueError(f"no queue {queue}")
        return NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * queue

    def queue_notify(self, queue: int) -> None:
        """Run ``queue`` (the driver notified it); a protocol error becomes DEVICE_NEEDS_RESET."""
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            self.ignored_notifies += 1
            return
        q = self.queues[queue] if 0 <= queue < len(self.queues) else None
        if q is None or not q.enabled:
            if self.status & STATUS_DRIVER_OK:
                self.fail(f"queue {queue} notified but {'not enabled' if q else 'not present'}")
            else:
                self.ignored_notifies += 1
            return
        if not self._cfg[COMMAND] & COMMAND_BUS_MASTER:  # the command register's low byte, as `command` reads it
            self.ignored_notifies += 1  # no DMA without bus mastering; the kick is lost, as on hardware
            return
        try:
            used = self.device.process(q)
        except VirtioError as e:
            self.fail(str(e))
            return
        except ValueError as e:  # guest memory refused a range the device asked for
            self.fail(f"queue {queue}: {e}")
            return
        if used and q.needs_interrupt():
            self._interrupt(q.msix_vector, ISR_QUEUE)

    def fail(self, reason: str) -> None:
        """The driver broke the protocol: DEVICE_NEEDS_RESET and a configuration interrupt."""
        self.errors.append(reason)
        self.error_count += 1
        self.on_error(reason)
        if not self.status & STATUS_DEVICE_NEEDS_RESET:
            self.status |= STATUS_DEVICE_NEEDS_RESET
            self._interrupt(self.config_msix_vector, ISR_CONFIG)

    def config_changed(self) -> None:
        """The device type changed its configuration (a resize): new generation, interrupt."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        self._interrupt(self.config_msix_vector, ISR_CONFIG)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        self.isr |= isr_bit
        if vector != NO_VECTOR and self.msix is not None:
            self.msix.signal(vector)

    # ---- configuration space: the PCI_CFG window

    def config_read(self, offset: int, size: int) -> int:
        data = self._pci_cfg + 16
        if offset >= data and offset + size <= data + 4 and size in (1, 2, 4) and offset % size == 0:
            value = self._window_access(None)
            if value is not None:
                self._put(data, 4, value)
        return super().config_read(offset, size)

    def _config_written(self, offset: int, size: int) -> None:
        data = self._pci_cfg + 16
        if offset < data + 4 and offset + size > data:
            self._window_access(self._get(data, 4))

    def _window_access(self, write: int | None) -> int | None:
        bar = self._get(self._pci_cfg + 4, 1)
        off = self._get(self._pci_cfg + 8, 4)
        length = self._get(self._pci_cfg + 12, 4)
        if bar != VIRTIO_BAR or length not in (1, 2, 4) or off % length:
            return None
        if write is None:
            return self.mmio_read(bar, off, length)
        self.mmio_write(bar, off, length, write & _ones(length))
        return None

    # ---- BAR0

    def _bar_read(self, bar: int, offset: int, size: int) -> int:
        region, off = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON_CFG_OFFSET:
            return self._common_read(off, size)
        if region == ISR_OFFSET:
            if off:
                return 0
            isr, self.isr = self.isr, 0
            return isr
        if region == DEVICE_CFG_OFFSET:
            return self.device.config_read(off, size) & _ones(size)
        return 0  # notify region, unused space

    def _bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        region, off = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if region == COMMON_CFG_OFFSET:
            self._common_write(off, size, value)
        elif region == DEVICE_CFG_OFFSET:
            self.device.config_write(off, size, value)
        elif region == NOTIFY_OFFSET and off % NOTIFY_OFF_MULTIPLIER == 0:
            self.queue_notify(off // NOTIFY_OFF_MULTIPLIER)

    # ---- common configuration

    def _selected(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _field(self, name: str) -> int:
        q = self._selected()
        if name == "device_feature":
            return (self.device.features >> (32 * self.device_feature_select)) & 0xFFFF_FFFF \
                if self.device_feature_select < 2 else 0
        if name == "driver_feature":
            return (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF \
                if self.driver_feature_select < 2 else 0
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.status
        if name in ("device_feature_select", "driver_feature_select", "config_msix_vector",
                    "config_generation", "queue_select"):
            return int(getattr(self, name))
        if q is None:
            return 0
        if name == "queue_size":
            return q.size
        if name == "queue_msix_vector":
            return q.msix_vector
        if name == "queue_enable":
            return int(q.enabled)
        if name == "queue_notify_off":
            return q.index
        if name == "queue_desc":
            return q.desc
        if name == "queue_driver":
            return q.driver
        if name == "queue_device":
            return q.device
        return 0

    def _common_read(self, off: int, size: int) -> int:
        hit = _FIELD_AT.get(off)
        if hit is not None and off + size <= hit[0] + hit[1]:
            start, _, name = hit
            return (self._field(name) >> (8 * (off - start))) & _ones(size)
        value = 0  # an access across fields: byte by byte
        for k in range(size):
            hit = _FIELD_AT.get(off + k)
            if hit is not None:
                value |= ((self._field(hit[2]) >> (8 * (off + k - hit[0]))) & 0xFF) << (8 * k)
        return value

    def _common_write(self, off: int, size: int, value: int) -> None:
        hit = _FIELD_AT.get(off)
        if hit is None or off + size > hit[0] + hit[1]:
            return  # across fields or past the structure: no driver does that
        start, width, name = hit
        shift = 8 * (off - start)
        if size < width:
            value = (self._field(name) & ~(_ones(size) << shift)) | (value << shift)
        q = self._selected()
        if name in ("device_feature_select", "driver_feature_select"):
            setattr(self, name, value)
        elif name == "driver_feature":
            if not self.status & STATUS_FEATURES_OK and self.driver_feature_select < 2:
                word = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << word)) | (value << word)
        elif name == "config_msix_vector":
            self.config_msix_vector = self._vector(value)
        elif name == "device_status":
            self._write_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif q is None or q.enabled:
            return  # no such queue, or its registers are fixed while it runs
        elif name == "queue_size":
            q.size = value
        elif name == "queue_msix_vector":
            q.msix_vector = self._vector(value)
        elif name == "queue_enable":
            if value == 1:
                self._enable(q)
        elif name == "queue_desc":
            q.desc = value
        elif name == "queue_driver":
            q.driver = value
        elif name == "queue_device":
            q.device = value

    def _vector(self, value: int) -> int:
        """A vector the table has, or NO_VECTOR (Linux reads it back to see whether it took)."""
        return value if self.msix is not None and value < self.msix.vectors else NO_VECTOR

    def _enable(self, q: Virtqueue) -> None:
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        q.indirect = bool(self.driver_features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        try:
            q.enable()
        except VirtioError as e:
            self.fail(str(e))

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        value |= self.status & STATUS_DEVICE_NEEDS_RESET  # the device's bit; only a reset clears it
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            offered = self.device.features
            if self.driver_features & ~offered or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                value &= ~STATUS_FEATURES_OK  # refused: the driver reads the status back
            else:
                self.device.negotiated(self.driver_features)
        self.status = value


def _ignore_error(reason: str) -> None:
    pass


def _virtio_cap(cap_len: int, cfg_type: int, offset: int, length: int) -> bytes:
    """struct virtio_pci_cap after cap_vndr and cap_next (BAR 0, id 0)."""
    return (bytes([cap_len, cfg_type, VIRTIO_BAR, 0, 0, 0])
            + offset.to_bytes(4, "little") + length.to_bytes(4, "little"))
