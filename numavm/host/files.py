"""Every file numavm reads from the user, checked and read in one place.

A path the user names (``--kernel``, ``--initrd``, ``--add``, ``-f``, ``import FILE``) is
opened without blocking (a FIFO with no writer must not hang the open), checked to be a
regular file (not a FIFO, a character device such as /dev/zero (/dev/null, empty, is read as
such), a directory or a socket;
the small text inputs -f and import FILE may also be a pipe, as ``-f <(...)`` gives)
and no larger than the option's limit, and only then read, with that bound: a file that
grows while it is read is cut at the limit and refused, not read to memory's end.  Every
refusal is a `ConfigError` whose one line names the option, the file and what is allowed.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from numavm.errors import ConfigError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# The limits, one per kind of input (README's Limits).  Debian's bzImage is ~8 MiB and its
# vmlinux ~60 MiB; numavm's own initramfs with busybox is ~2 MiB.
MAX_KERNEL = 512 * MiB
MAX_INITRD = 1 * GiB
MAX_ADD = 256 * MiB  # each --add file (and each shared library it brings)
MAX_ADD_TOTAL = 1 * GiB  # every --add file together
MAX_CONFIG = 1 * MiB  # -f/--config (a 256-domain machine with every distance is ~200 KiB)
MAX_IMPORT = 1 * MiB  # import FILE (a 256-domain libvirt XML with every distance is ~1/3 MiB)


DEV_NULL = os.makedev(1, 3)  # the one character device that is a bounded input: empty


def human(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def too_large(option: str, path: str, limit: int, what: str = "") -> ConfigError:
    return ConfigError(f"{option}: {path} is over the size limit of {human(limit)}"
                       f"{' for ' + what if what else ''}")


def _checked_fd(path: str | os.PathLike[str], option: str, limit: int, pipes: bool = False) -> tuple[int, int]:
    """An open fd on `path` (a regular file at most `limit` bytes, or with `pipes` a pipe)
    and its size (0 for a pipe)."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: the open of a FIFO with no writer would block; it is refused below
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"{option}: cannot read {name}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if pipes and stat.S_ISFIFO(st.st_mode) and _anonymous_pipe(fd):
            return fd, 0
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == DEV_NULL:
            return fd, 0  # empty, at once (`--initrd /dev/null`: no initramfs at all)
        if not stat.S_ISREG(st.st_mode):
            allowed = "a regular file or a pipe such as <(...)" if pipes else "a regular file"
            raise ConfigError(f"{option}: {name} is {_kind(st.st_mode)}; {allowed} is needed")
        if st.st_size > limit:
            raise too_large(option, name, limit)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _anonymous_pipe(fd: int) -> bool:
    """A pipe (`-f <(...)`, /dev/fd/N: its writer exists), not a named FIFO (which may have
    none, and then a read would wait for ever)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
    except OSError:
        return False


def check_input_file(path: str | os.PathLike[str], option: str, limit: int) -> int:
    """Refuse (ConfigError) what is not a readable regular file of at most `limit` bytes; its size."""
    fd, size = _checked_fd(path, option, limit)
    os.close(fd)
    return size


def read_input(path: str | os.PathLike[str], option: str, limit: int, pipes: bool = False) -> bytes:
    """The bytes of `path`, checked as `check_input_file` does and read with the bound `limit`;
    `pipes`: a pipe is read too (`-f <(...)`, not a named FIFO), up to the same bound."""
    fd, _ = _checked_fd(path, option, limit, pipes)
    try:
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = _bounded(f, limit)
    except OSError as e:
        raise ConfigError(f"{option}: cannot read {os.fspath(path)}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since the check
        raise too_large(option, os.fspath(path), limit)
    return data


def read_stream(stream: BinaryIO, option: str, name: str, limit: int) -> bytes:
    """At most `limit` bytes of an already open stream (stdin); more is refused as over the limit."""
    try:
        data = _bounded(stream, limit)
    except OSError as e:
        raise ConfigError(f"{option}: cannot read {name}: {e.strerror}") from None
    if len(data) > limit:
        raise too_large(option, name, limit)
    return data


def _bounded(f: BinaryIO, limit: int) -> bytes:
    """Up to limit + 1 bytes (one more tells a file over the limit), without asking the
    allocator for limit + 1 bytes at once when the file is small."""
    chunks: list[bytes] = []
    left = limit + 1
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def open_image(path: str | os.PathLike[str], option: str, writable: bool) -> tuple[int, int]:
    """A disk image (``--disk``): a regular file or a block device, opened for reading (and
    writing when `writable`) without blocking on a FIFO; its fd and size in bytes.  What is
    neither (a FIFO, /dev/zero, a directory) is refused in one line.  An image is not read
    into memory, so it has no size limit of its own."""
    name = os.fspath(path)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(name, flags)
    except OSError as e:
        raise ConfigError(f"{option}: cannot open {name}{' for writing' if writable else ''}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise ConfigError(f"{option}: {name} is {_kind(st.st_mode)}; a regular file or a block device is needed")
        os.set_blocking(fd, True)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"{option}: cannot open {name}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, size
