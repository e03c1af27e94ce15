"""virtio-9p (virtio 1.2, section 5.6 "Traditional Device: 9p"): a host directory as a 9P2000.L share.

Device ID 9, one request queue, feature VIRTIO_9P_F_MOUNT_TAG with the configuration
``tag_len[2] tag[tag_len]``: the guest mounts it with ``mount -t 9p -o
trans=virtio,version=9p2000.L TAG DIR``.  Each chain is one request (its readable buffers) and
room for the reply (its writable buffers); `numavm.devices.p9.server.Server` answers it and
the chain goes back with the reply's length.

A chain that cannot carry a request header or the smallest reply is a protocol error
(VirtioError: the device needs a reset); everything else the guest sends gets a 9P reply.

What the engine does with it:

* opens the share's directory, ``os.open(path, O_PATH | O_DIRECTORY | O_CLOEXEC)``, and keeps
  that descriptor until after `close` (the device never closes it);
* builds ``VirtioPciDevice(Virtio9p(root_fd, tag, readonly=..., openat2=numavm.host.libc.openat2,
  cross_mounts=...), guest_memory)`` for a plan device of kind ``numavm.plan.pci.VIRTIO_9P``
  (``cross_mounts``: walks enter the host's mounts inside the share; the server's docstring); the constructor
  raises OSError (ENOSYS: a kernel before 5.6 has no openat2; no /proc/self/fd) or ValueError
  (a bad tag) before the guest starts;
* runs ``queue_notify`` on the device's I/O thread under the device's lock, the lock the vCPUs
  take for its MMIO (a reset closes descriptors the I/O thread would otherwise be using);
* leaves room for ``2 * max_fids`` descriptors (an open directory being listed holds two):
  RLIMIT_NOFILE's soft limit is often 1024, so raise it towards the hard limit, or pass a
  smaller ``max_fids``; running out is answered EMFILE / ENFILE to the guest, not a crash;
* after the I/O thread has stopped, calls `close`, then closes the root descriptor.
"""

from __future__ import annotations

from typing import Final

from numavm.devices.p9.confine import Openat2
from numavm.devices.p9.server import MAX_FIDS, MAX_MSIZE, Server, Unanswerable
from numavm.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_9P, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice
from numavm.devices.virtio.queue import Virtqueue, VirtioError
from numavm.plan import pci as plan_pci

__all__ = ["Virtio9p", "VIRTIO_ID_9P", "VIRTIO_9P_F_MOUNT_TAG", "MAX_TAG", "QUEUE_SIZE", "PCI_CLASS_9P"]

VIRTIO_9P_F_MOUNT_TAG: Final = 0
PCI_CLASS_9P: Final = plan_pci.PCI_CLASS[plan_pci.VIRTIO_9P]
QUEUE_SIZE: Final = 128  # Linux's net/9p/trans_virtio.c VIRTQUEUE_NUM, and QEMU's
MAX_TAG: Final = 255  # bytes; the configuration window holds 4 KiB, QEMU stops at 255 too


class Virtio9p(VirtioDevice):
    """The share ``root_fd`` (a directory descriptor the caller keeps) under mount tag ``tag``."""

    device_id = VIRTIO_ID_9P
    pci_class = PCI_CLASS_9P
    queue_sizes = (QUEUE_SIZE,)
    max_segment = MAX_MSIZE  # Linux splits its buffers at pages; a whole message is at most msize

    def __init__(self, root_fd: int, tag: str, *, readonly: bool = False, openat2: Openat2,
                 max_fids: int = MAX_FIDS, cross_mounts: bool = False) -> None:
        raw = tag.encode("utf-8")
        if not raw or len(raw) > MAX_TAG or "\0" in tag or not tag.isprintable() or " " in tag:
            raise ValueError(f"9p mount tag {tag!r}: 1..{MAX_TAG} printable bytes, no spaces")
        self.tag = tag
        self.readonly = readonly
        self.server = Server(root_fd, readonly=readonly, openat2=openat2, max_fids=max_fids,
                             cross_mounts=cross_mounts)
        self.features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                         | (1 << VIRTIO_9P_F_MOUNT_TAG))
        self._config = len(raw).to_bytes(2, "little") + raw

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or size < 1:
            return 0
        return int.from_bytes(self._config[offset:offset + size].ljust(size, b"\0"), "little")

    def process(self, queue: Virtqueue) -> bool:
        used = False
        while (chain := queue.pop()) is not None:
            try:
                written = self.server.serve(chain.readable, chain.writable)
            except Unanswerable as e:
                raise VirtioError(f"virtio-9p: request {chain.head}: {e}") from None
            queue.push(chain.head, written)
            used = True
        return used

    def reset(self) -> None:
        """The driver reset the device: the 9P session ends, every fid's descriptor is closed."""
        self.server.reset()

    def close(self) -> None:
        """The machine is done with the device (after its I/O thread stopped)."""
        self.server.close()
