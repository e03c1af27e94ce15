"""A 9P2000.L file server for a host directory shared into the guest (virtio-9p's protocol).

``wire`` is the message codec, ``confine`` the rules that keep every guest-named path inside
the share, ``server`` the fid table and the operations.  No transport, no threads, no KVM:
numavm.devices.virtio.p9 puts it on a virtqueue.
"""

from numavm.devices.p9.confine import Openat2, P9Error
from numavm.devices.p9.server import MAX_FIDS, MAX_MSIZE, Server, Unanswerable

__all__ = ["Server", "Unanswerable", "Openat2", "P9Error", "MAX_FIDS", "MAX_MSIZE"]
