"""How the 9p server keeps every guest-named path inside the share.

The promise: nothing outside the shared directory is reachable, whatever the guest sends and
whatever it has made of the share's contents (symlinks to /etc, directories renamed under an
open fid, ``..`` at the root, device nodes).  It rests on four rules, each small enough to check:

1. A fid is an open file descriptor, never a path.  A fid names an inode; renames, symlinks
   swapped in behind it, a concurrent ``mv`` cannot make it name another one.  Every operation
   is ``*at(fid's fd, one name)`` or on the fd itself.
2. A name from the guest is one path component: not empty, no ``/``, no NUL, not ``.`` or
   ``..`` (`component`).  ``..`` exists only as a walk element, and is served by the server
   itself: the root's parent is the root, any other directory's parent is its real parent (a
   directory below the root has its parent below the root or is the root).
3. Walks and creates go through ``openat2`` with `WALK` resolve flags: RESOLVE_BENEATH (the
   kernel refuses anything that would leave the directory fd, so a bug in rule 2 is still not
   an escape), RESOLVE_NO_SYMLINKS (no symlink is followed anywhere; with O_PATH | O_NOFOLLOW a
   final symlink is opened as itself, which is how Treadlink reads it), RESOLVE_NO_MAGICLINKS
   (no /proc-style jumps) and, unless the engine asks the server to cross mounts, RESOLVE_NO_XDEV
   (a mount inside the share is not part of it).  Crossing them confines as well: a walk goes
   down into a mount with RESOLVE_BENEATH still on, and ``..`` from a mount's root goes to its
   mount point's parent, as the host's own lookup does, which is inside the share (rule 2); the
   server folds each file system into its qid paths, so they stay unique.  The other ``*at``
   calls (mkdirat, unlinkat, renameat, symlinkat, fstatat without following, linkat) take one
   checked component and do not follow a final symlink.
4. Only regular files and directories are ever opened for I/O, decided by ``fstat`` on the
   fid's O_PATH descriptor (the inode cannot change under it).  A regular file is reopened
   through ``/proc/self/fd/N``: the kernel's name for exactly that inode, chosen by the server,
   never by the guest.  Device nodes, FIFOs and sockets are never opened (EACCES); a symlink
   opened for I/O is ELOOP.

The host may still move a directory out of the share while the guest holds a fid on it (a
host user doing that gives the guest that directory, as with any shared folder server); the
guest alone cannot, since every rename it asks for is between two names inside the share.

``openat2`` is a system call glibc 2.36 does not wrap.  Device models do not import
numavm.host, so the engine passes numavm.host.libc.openat2 in as an `Openat2` callable; the
resolve flags are chosen here, where the promise is made, not by the caller.
"""

from __future__ import annotations

import errno
from typing import Final, Protocol

__all__ = [
    "Openat2", "P9Error", "component", "WALK", "RESOLVE_NO_XDEV", "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS", "RESOLVE_BENEATH", "NAME_MAX",
]

# include/uapi/linux/openat2.h
RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08

WALK: Final = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
PARENT: Final = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV  # ``..`` below the root
NAME_MAX: Final = 255


class Openat2(Protocol):
    def __call__(self, dirfd: int, path: str | bytes, flags: int, mode: int, resolve: int) -> int:
        """openat2(2): a new descriptor, or an OSError carrying the errno."""
        ...


class P9Error(Exception):
    """A request the server refuses: answered Rlerror(errno)."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(err, why or errno.errorcode.get(err, str(err)))
        self.errno = err


def component(name: bytes) -> bytes:
    """``name`` if it is one ordinary path component; P9Error otherwise."""
    if not name or name in (b".", b".."):
        raise P9Error(errno.EINVAL, f"name {name!r} is not a file name")
    if b"/" in name or b"\0" in name:
        raise P9Error(errno.EINVAL, f"name {name!r} is not one path component")
    if len(name) > NAME_MAX:
        raise P9Error(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
    return name
