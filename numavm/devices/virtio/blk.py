"""virtio-blk (virtio 1.2, section 5.2) over an already-open file descriptor.

The engine opens the image, checks it and locks it before anything else is
allocated; the device gets the descriptor, the size in bytes and whether it
is read-only, and never opens, closes or resizes anything.

A request is a chain: a 16-byte header the device reads (type, reserved,
sector), data buffers, and a 1-byte status the device writes last.  Data
moves with ``os.preadv`` / ``os.pwritev`` between the file and the chain's
memoryviews, which are guest RAM: no bounce buffer, and no per-byte work in
Python.  A read that meets the end of the file early (the file shrank under
us) zero-fills the rest.

Answers, in the request's status byte:

* IN, OUT: OK, or IOERR for a range past the capacity (the sector arithmetic
  is exact, so a huge sector number is just out of range), a length that is
  not a whole number of sectors, a write to a read-only disk, or a host I/O
  error;
* FLUSH: ``fdatasync``, IOERR if it fails;
* GET_ID: the serial, 20 bytes, NUL-padded (no NUL when it is 20 long);
* anything else: UNSUPP.

A chain that is not a request at all (no room for the status byte, a
header shorter than 16 bytes) is a protocol error (VirtioError: the device
needs a reset); so is anything the queue itself refuses (`Virtqueue.pop`).

Features: VERSION_1, RING_INDIRECT_DESC, FLUSH, BLK_SIZE (512),
SEG_MAX, SIZE_MAX, and RO when read-only.  Capacity is in 512-byte sectors
whatever the block size; a partial last sector of the file is not exposed.
"""

from __future__ import annotations

import operator
import os
import struct
from typing import Final

from numavm.devices.virtio.device import (VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_RING_F_INDIRECT_DESC,
                                          VirtioDevice)
from numavm.devices.virtio.queue import Chain, Virtqueue, VirtioError
from numavm.plan import pci as plan_pci

__all__ = [
    "VirtioBlk", "SECTOR_SIZE", "ID_BYTES",
    "VIRTIO_BLK_F_SIZE_MAX", "VIRTIO_BLK_F_SEG_MAX", "VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_T_IN", "VIRTIO_BLK_T_OUT", "VIRTIO_BLK_T_FLUSH", "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_S_OK", "VIRTIO_BLK_S_IOERR", "VIRTIO_BLK_S_UNSUPP",
]

VIRTIO_BLK_F_SIZE_MAX: Final = 1
VIRTIO_BLK_F_SEG_MAX: Final = 2
VIRTIO_BLK_F_RO: Final = 5
VIRTIO_BLK_F_BLK_SIZE: Final = 6
VIRTIO_BLK_F_FLUSH: Final = 9

VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8

VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2

SECTOR_SIZE: Final = 512
ID_BYTES: Final = 20
PCI_CLASS_STORAGE_OTHER: Final = plan_pci.PCI_CLASS[plan_pci.VIRTIO_BLK]  # mass storage, other

QUEUE_SIZE: Final = 256
SEG_MAX: Final = QUEUE_SIZE - 2  # data segments per request: the ring less header and status
SIZE_MAX: Final = 1 << 20  # bytes per segment (also bounds every descriptor of the queue)

_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
_CONFIG = struct.Struct("<QIIII")  # capacity, size_max, seg_max, geometry (0), blk_size
_nbytes = operator.attrgetter("nbytes")
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    _IOV_MAX = 1024


class VirtioBlk(VirtioDevice):
    """One disk: ``fd`` open for reading (and writing unless ``readonly``), ``size`` bytes."""

    device_id = VIRTIO_ID_BLOCK
    pci_class = PCI_CLASS_STORAGE_OTHER
    queue_sizes = (QUEUE_SIZE,)
    max_segment = SIZE_MAX

    def __init__(self, fd: int, size: int, *, readonly: bool = False, serial: str = "") -> None:
        if size < 0:
            raise ValueError(f"disk size {size}")
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.capacity = size // SECTOR_SIZE  # sectors
        self.serial = serial.encode("ascii", "replace")[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_BLK_F_FLUSH)
                         | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_SIZE_MAX)
                         | (readonly << VIRTIO_BLK_F_RO))
        self._config = _CONFIG.pack(self.capacity, SIZE_MAX, SEG_MAX, 0, SECTOR_SIZE)
        self.requests = 0  # served, of any type
        self.io_errors = 0  # requests answered IOERR

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or size < 1:
            return 0
        return int.from_bytes(self._config[offset:offset + size].ljust(size, b"\0"), "little")

    def process(self, queue: Virtqueue) -> bool:
        used = False
        while (chain := queue.pop()) is not None:
            queue.push(chain.head, self._serve(chain))
            used = True
        return used

    def _serve(self, chain: Chain) -> int:
        """Serve one request; the bytes written into its writable buffers (status included)."""
        readable, writable = chain.readable, chain.writable
        # Linux's shape first: the header alone in the first buffer, the status alone in the last
        if readable and readable[0].nbytes == _HEADER.size:
            kind, _, sector = _HEADER.unpack(readable[0])
            data_out = readable[1:]
        else:
            header, data_out = _split(readable, _HEADER.size)
            got = sum(v.nbytes for v in header)
            if got < _HEADER.size:
                raise VirtioError(f"virtio-blk: request {chain.head} has a header of {got} bytes, not {_HEADER.size}")
            kind, _, sector = _HEADER.unpack(b"".join(header))
        if writable and writable[-1].nbytes == 1:
            data_in, status_view = writable[:-1], writable[-1]
        else:
            writable_len = chain.writable_len
            if writable_len < 1:
                raise VirtioError(f"virtio-blk: request {chain.head} has no status byte")
            data_in, status_views = _split(writable, writable_len - 1)
            status_view = status_views[0]
        written = 0
        if kind == VIRTIO_BLK_T_IN:
            status, written = self._transfer(sector, data_in, write=False)
            if status != VIRTIO_BLK_S_OK:
                written = 0
        elif kind == VIRTIO_BLK_T_OUT:
            status, _ = self._transfer(sector, data_out, write=True)
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = self._flush()
        elif kind == VIRTIO_BLK_T_GET_ID:
            written = _copy_into(data_in, self.serial)
            status = VIRTIO_BLK_S_OK
        else:
            status = VIRTIO_BLK_S_UNSUPP
        status_view[0] = status
        self.requests += 1
        if status == VIRTIO_BLK_S_IOERR:
            self.io_errors += 1
        return written + 1

    def _transfer(self, sector: int, views: list[memoryview], *, write: bool) -> tuple[int, int]:
        """(status, bytes moved) of a read or write of ``views`` at ``sector``."""
        length = sum(map(_nbytes, views))
        if length % SECTOR_SIZE or sector + length // SECTOR_SIZE > self.capacity:
            return VIRTIO_BLK_S_IOERR, 0
        if write and self.readonly:
            return VIRTIO_BLK_S_IOERR, 0
        offset = sector * SECTOR_SIZE
        try:
            if write:
                _write_all(self.fd, views, offset, length)
            else:
                _read_all(self.fd, views, offset, length)
        except OSError:
            return VIRTIO_BLK_S_IOERR, 0
        return VIRTIO_BLK_S_OK, length

    def _flush(self) -> int:
        try:
            os.fdatasync(self.fd)
        except OSError:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK


def _split(views: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """``views`` as (the first ``n`` bytes, the rest), cutting a view where needed."""
    head: list[memoryview] = []
    for i, v in enumerate(views):
        if n <= 0:
            return head, views[i:]
        if v.nbytes <= n:
            head.append(v)
            n -= v.nbytes
        else:
            head.append(v[:n])
            return head, [v[n:]] + views[i + 1:]
    return head, []


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    return _split(views, n)[1]


def _read_all(fd: int, views: list[memoryview], offset: int, length: int) -> None:
    """Fill ``views`` (``length`` bytes) from ``offset``; past the end of the file, zeros."""
    while length > 0:
        n = os.preadv(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
        length -= n
        if length <= 0:
            return  # the usual case: the first call did it all
        views = _advance(views, n)
        if n == 0:
            for v in views:
                v[:] = bytes(v.nbytes)
            return
        offset += n


def _write_all(fd: int, views: list[memoryview], offset: int, length: int) -> None:
    while length > 0:
        n = os.pwritev(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset)
        length -= n
        if length <= 0:
            return
        if n == 0:
            raise OSError("pwritev wrote nothing")
        offset += n
        views = _advance(views, n)


def _copy_into(views: list[memoryview], data: bytes) -> int:
    """Copy as much of ``data`` as fits into ``views``; the bytes copied."""
    done = 0
    for v in views:
        take = min(v.nbytes, len(data) - done)
        if take <= 0:
            break
        v[:take] = data[done:done + take]
        done += take
    return done
