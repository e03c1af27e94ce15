"""Disk images on the host: each `--disk` file opened once, checked, and locked, before the guest exists.

`open_disk` opens an image for a virtio-blk device and refuses, in one line naming `--disk` and
the path (a `ConfigError`: exit 2, nothing allocated yet), what the device could not serve:

- a missing or unreadable file, or one not writable when the disk is not `readonly`;
- anything but a regular file or a block device (a directory, a FIFO, a character device, a
  socket): opened with O_NONBLOCK so a FIFO cannot block the open, and judged by fstat on
  the opened fd, so what is checked is what is used;
- an empty image, or one whose size is not a multiple of 512 bytes (virtio-blk counts
  512-byte sectors: a tail would be unreachable);
- an image another writer holds: numavm takes an open-file-description lock (F_OFD_SETLK) over
  the whole file, a write lock for a read-write disk and a read lock for a readonly one, so
  two numavm guests never write one image, and a readonly guest never reads an image another
  one writes.  QEMU's own image locks (shared locks on single bytes past offset 100) conflict
  with numavm's write lock either way, and with its read lock when QEMU writes.  The kernel
  drops the lock with the last fd of the description, however numavm ends.

The `DiskImage` owns its fd: `close()` (idempotent; also the context manager's exit) releases
it and the lock.  `open_disks` opens several, all or none, and refuses one image given twice.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from numavm.errors import ConfigError

SECTOR = 512  # virtio-blk's unit, whatever the image's block size

# struct flock (x86-64 and aarch64: short, short, off_t, off_t, pid_t, padded to 32 bytes);
# an OFD lock needs l_pid 0.
_FLOCK = struct.Struct("@hhqqi4x")
assert _FLOCK.size == 32
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # linux/fcntl.h


class DiskSpec(Protocol):
    """What `open_disks` needs of a disk spec (numavm.spec.devices.Disk; `origin` optional)."""

    @property
    def path(self) -> str: ...

    @property
    def readonly(self) -> bool: ...


@dataclass(eq=False)
class DiskImage:
    """One opened, locked image.  `fd` is -1 once closed."""

    path: str
    fd: int
    size: int  # bytes, a multiple of SECTOR
    readonly: bool
    block_device: bool = False
    _ident: tuple[int, int] = field(default=(0, 0), repr=False)  # (st_dev, st_ino) or the device's st_rdev

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)  # the last fd of its description: the kernel drops the OFD lock

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def _refuse(what: str, why: str) -> ConfigError:
    return ConfigError(f"{what}: {why}")


def _open_error(path: str, e: OSError, readonly: bool, name: str) -> ConfigError:
    err = e.errno or 0
    if err == errno.ENOENT:
        return _refuse(name, "no such file")
    if err == errno.ENOTDIR:
        return _refuse(name, "a component of the path is not a directory")
    if err == errno.EISDIR:
        return _refuse(name, "is a directory, not a disk image (a regular file or a block device)")
    if err in (errno.EACCES, errno.EPERM):
        return _refuse(name, "permission denied" if readonly else
                       "permission denied for reading and writing (add ,readonly for a read-only disk)")
    if err == errno.EROFS:
        return _refuse(name, "on a read-only file system (add ,readonly for a read-only disk)")
    if err in (errno.ENXIO, errno.ENODEV):  # a socket, or a device node without a driver
        try:
            kind = _kind(os.stat(path).st_mode)
        except OSError:
            kind = "a device without a driver"
        return _refuse(name, f"is {kind}, not a disk image (a regular file or a block device)")
    if err == errno.ETXTBSY:
        return _refuse(name, "is a running program's file, not writable")
    return _refuse(name, f"cannot open: {errno.errorcode.get(err, str(err))} ({os.strerror(err)})")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_disk(path: str | os.PathLike[str], readonly: bool = False, what: str | None = None) -> DiskImage:
    """Open, check and lock one image (see the module's docstring); ConfigError says why not,
    naming the disk as `what` (its spec's origin: ``--disk PATH``, ``FILE: disk PATH``)."""
    path = os.fspath(path)
    name = what or f"--disk {path}"
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _open_error(path, e, readonly, name) from None
    try:
        st = os.fstat(fd)
        block = stat.S_ISBLK(st.st_mode)
        if not (stat.S_ISREG(st.st_mode) or block):
            raise _refuse(name, f"is {_kind(st.st_mode)}, not a disk image (a regular file or a block device)")
        os.set_blocking(fd, True)  # O_NONBLOCK only kept the open from waiting on a FIFO
        size = os.lseek(fd, 0, os.SEEK_END) if block else st.st_size  # a block device's st_size is 0
        if size == 0:
            raise _refuse(name, "is empty (a disk image needs at least one 512-byte sector)")
        if size % SECTOR:
            raise _refuse(name, f"size {size} bytes is not a multiple of {SECTOR} "
                                f"(virtio-blk counts {SECTOR}-byte sectors; the last {size % SECTOR} bytes would be lost)")
        _lock(fd, name, readonly)
        ident = (0, st.st_rdev) if block else (st.st_dev, st.st_ino)
        return DiskImage(path, fd, size, readonly, block, ident)
    except BaseException:
        os.close(fd)
        raise


def _lock(fd: int, path: str, readonly: bool) -> None:
    request = _FLOCK.pack(fcntl.F_RDLCK if readonly else fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, request)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise _refuse(path, "is locked by another writer" if readonly else
                          "is locked by another user of the image (a writer, or a reader while "
                          "this disk would write; ,readonly shares it read-only)") from None
        if e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return  # a file system without OFD locks (some FUSE or network mounts): no lock to take
        raise _refuse(path, f"cannot lock: {errno.errorcode.get(e.errno or 0, str(e.errno))} "
                            f"({os.strerror(e.errno or 0)})") from None


def open_disks(specs: Iterable[DiskSpec]) -> list[DiskImage]:
    """Open every disk in order, all or none: on any refusal the ones opened are closed.  One
    image given twice is refused by name (its second lock would only say "in use")."""
    opened: list[DiskImage] = []
    try:
        for spec in specs:
            path = os.fspath(spec.path)
            what = getattr(spec, "origin", None) or f"--disk {path}"
            try:
                st = os.stat(path)
            except OSError:
                st = None  # open_disk says why
            if st is not None:
                ident = (0, st.st_rdev) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)
                for k, other in enumerate(opened):
                    if other._ident == ident:
                        raise _refuse(what, f"is the same image as disk {k} ({other.path}); "
                                            "give each image once")
            opened.append(open_disk(path, bool(spec.readonly), what))
        return opened
    except BaseException:
        close_disks(opened)
        raise


def close_disks(disks: Sequence[DiskImage]) -> None:
    """Close each (idempotent); every one is tried."""
    for d in disks:
        d.close()
