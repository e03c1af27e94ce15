"""What a virtio device type (blk, net, ...) gives the transport.

A device type knows its ID, its features, its queues' maximum sizes, its
device-specific configuration and what a request on its queues means; the
transport (`numavm.devices.virtio.pci`) does everything else: feature
negotiation, queue setup, status, interrupts.  A new device type is one new
module with one `VirtioDevice` subclass.

`process` drains a queue; a request the device understands but cannot serve
is answered in the request's own status (virtio-blk's IOERR), while a driver
that breaks the protocol raises `VirtioError` and the transport sets
DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import abc

from numavm.devices.virtio.queue import Virtqueue, VirtioError
from numavm.plan import pci as plan_pci

__all__ = [
    "VirtioDevice", "VirtioError",
    "VIRTIO_F_VERSION_1", "VIRTIO_F_ACCESS_PLATFORM", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_ID_NET", "VIRTIO_ID_BLOCK", "VIRTIO_ID_9P",
]

# feature bit numbers (virtio 1.2, section 6)
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

# device IDs (section 5); the plan's table (numavm.plan.pci.VIRTIO_IDS) names the ones numavm builds
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = plan_pci.VIRTIO_IDS[plan_pci.VIRTIO_BLK]
VIRTIO_ID_9P = plan_pci.VIRTIO_IDS[plan_pci.VIRTIO_9P]


class VirtioDevice(abc.ABC):
    """A virtio device type; the transport owns its queues and calls `process`."""

    device_id: int  # the virtio device ID (VIRTIO_ID_BLOCK, ...)
    pci_class: int  # 24-bit PCI class code (blk: mass storage, other: 0x018000)
    features: int  # offered feature bits; VIRTIO_F_VERSION_1 always
    queue_sizes: tuple[int, ...]  # each queue's maximum size (a power of two)
    max_segment: int = 1 << 32  # bound on one descriptor's length, checked by the queues

    def negotiated(self, features: int) -> None:
        """The driver accepted ``features`` (FEATURES_OK); a subset of `features`."""

    @abc.abstractmethod
    def config_read(self, offset: int, size: int) -> int:
        """Device-specific configuration (little-endian fields); out of range reads 0."""

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Writes to the device-specific configuration: ignored unless a device has writable fields."""

    @abc.abstractmethod
    def process(self, queue: Virtqueue) -> bool:
        """Serve every available chain of ``queue``; True if the used ring changed (interrupt).

        Raises VirtioError (VirtqueueError) when the driver broke the protocol.
        """

    def reset(self) -> None:
        """The driver reset the device (status 0): drop per-session state."""

    def close(self) -> None:
        """The engine is done with the device (its I/O thread stopped): release what it holds
        (a 9p share's open fids).  Descriptors it was given stay the engine's to close."""
