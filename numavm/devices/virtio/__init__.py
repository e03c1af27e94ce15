"""virtio devices: the split virtqueue, the modern PCI transport, one module per device type.

`VirtioPciDevice(VirtioBlk(fd, size, readonly=...), ram)` (a disk) or
`VirtioPciDevice(Virtio9p(root_fd, tag, readonly=..., openat2=...), ram)` (a shared directory)
is a PCI function the engine puts behind a host bridge; see `numavm.devices.virtio.pci` for the
registers and `numavm.devices.virtio.queue` for what a hostile driver can and cannot do.
"""

from numavm.devices.virtio.blk import VirtioBlk
from numavm.devices.virtio.device import VirtioDevice
from numavm.devices.virtio.p9 import Virtio9p
from numavm.devices.virtio.pci import VIRTIO_BAR, VIRTIO_BAR_SIZE, VirtioPciDevice
from numavm.devices.virtio.queue import NO_VECTOR, Chain, Virtqueue, VirtioError, VirtqueueError

__all__ = [
    "VirtioBlk", "Virtio9p", "VirtioDevice", "VirtioPciDevice", "VIRTIO_BAR", "VIRTIO_BAR_SIZE",
    "NO_VECTOR", "Chain", "Virtqueue", "VirtioError", "VirtqueueError",
]
