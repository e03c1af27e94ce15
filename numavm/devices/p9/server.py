"""A 9P2000.L file server over one host directory: the messages Linux's v9fs sends.

`Server.serve(readable, writable)` answers one request: the request is the concatenation of the
``readable`` buffers (guest memory views), the reply goes into the ``writable`` ones.  The
transport does not matter (numavm.devices.virtio.p9 is the virtio one); threads do not either:
one caller at a time, which is what the engine's per-device lock gives.

Served: Tversion, Tattach, Twalk, Tgetattr, Tlopen, Tread, Treaddir, Treadlink, Tstatfs, Tclunk,
Tflush, Txattrwalk (no extended attributes: ENODATA, or EOPNOTSUPP for a listing), Tlock and
Tgetlock (locks are the guest's own: always granted, never held here), and unless read-only
Tlcreate, Twrite, Tsetattr, Tmkdir, Tmknod (FIFOs, sockets, regular files), Tsymlink, Tlink,
Tunlinkat, Trenameat, Tfsync.  Anything else is Rlerror(EOPNOTSUPP); on a read-only share
every modifying message is Rlerror(EROFS) before anything is looked at.

Confinement to the share is `numavm.devices.p9.confine`'s job and its rules are followed here:
fids are descriptors, names are single components, walks and creates go through ``openat2``
with RESOLVE_BENEATH and no symlinks, only regular files and directories are opened.

The server runs as the VMM's user: the guest's uname and uid/gid fields are not used for
permission checks (the host's permissions for that user apply) and a create's gid is ignored.

Data moves with ``os.preadv`` / ``os.pwritev`` between files and the guest's buffers: a Tread's
payload lands in the reply's buffers after its 11-byte header, a Twrite's is written from the
request's buffers after its 23-byte header.  Whatever the guest sends, `serve` answers with a
reply (Rlerror for nonsense: EINVAL for a malformed message, EBADF for an unknown fid, ...), or
raises `Unanswerable` when the chain cannot carry any answer at all (fewer than 7 request bytes,
fewer than 11 reply bytes).  A Python exception that is a bug of the server is answered EIO and
kept in `faults`, never raised.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable, Final, Iterator

from numavm.devices.p9 import wire
from numavm.devices.p9.confine import PARENT, RESOLVE_NO_XDEV, WALK, Openat2, P9Error, component
from numavm.devices.p9.wire import Decoder, Encoder, Malformed

__all__ = ["Server", "Unanswerable", "MAX_MSIZE", "MIN_MSIZE", "MAX_FIDS", "MAX_WALK", "IOHDR", "REPLY_ROOM"]

MAX_MSIZE: Final = 512 * 1024  # Linux 6.1's virtio transport stops at 500 KiB (125 pages)
MIN_MSIZE: Final = 4096  # below this, Linux's own replies (Rgetattr, Rwalk) would not fit
MAX_FIDS: Final = 4096
MAX_WALK: Final = 16  # P9_MAXWELEM
IOHDR: Final = 11  # size[4] type[1] tag[2] count[4]: the header before Rread's / Rreaddir's data
TWRITE_HEADER: Final = 23  # size type tag fid[4] offset[8] count[4]
RLERROR_SIZE: Final = wire.HEADER_SIZE + 4
# The room each reply needs, by request: a request with less reply room is refused (EMSGSIZE)
# before it runs, so an answer the guest cannot receive never hides a change it made.  Linux
# (6.0+, p9_msg_buf_size) gives each request exactly its reply's largest size, not msize: an
# Rlopen gets 24 bytes, an Rclunk 11 (an Rlerror's), so these are the replies' own sizes.
# Twalk's is 9 + 13 per name (checked in `_walk`); Tread and Treaddir fit their count to the
# room; Treadlink and Tgetlock change nothing and are answered EMSGSIZE after the fact.
_Q = wire.QID_SIZE
REPLY_ROOM: Final = {
    wire.TVERSION: wire.HEADER_SIZE + 4 + 2 + len(wire.VERSION_9P2000_L),  # it ends the session: checked first
    wire.TATTACH: wire.HEADER_SIZE + _Q,
    wire.TGETATTR: wire.HEADER_SIZE + 8 + _Q + 3 * 4 + 15 * 8,
    wire.TLOPEN: wire.HEADER_SIZE + _Q + 4, wire.TLCREATE: wire.HEADER_SIZE + _Q + 4,
    wire.TMKDIR: wire.HEADER_SIZE + _Q, wire.TMKNOD: wire.HEADER_SIZE + _Q, wire.TSYMLINK: wire.HEADER_SIZE + _Q,
    wire.TSTATFS: wire.HEADER_SIZE + 4 + 4 + 6 * 8 + 4,
    wire.TWRITE: wire.HEADER_SIZE + 4, wire.TLOCK: wire.HEADER_SIZE + 1, wire.TXATTRWALK: wire.HEADER_SIZE + 8,
}
MAX_REPLY_ROOM: Final = wire.HEADER_SIZE + 2 + MAX_WALK * _Q  # the largest of them: Rwalk's 16 qids
MAX_FAULTS: Final = 32

# P9_DOTL_* open flags (include/net/9p/9p.h); only these are honoured
DOTL_ACCMODE = 0o3
DOTL_CREATE = 0o100
DOTL_EXCL = 0o200
DOTL_TRUNC = 0o1000
DOTL_APPEND = 0o2000
DOTL_DSYNC = 0o10000
DOTL_SYNC = 0o4000000

AT_REMOVEDIR = 0x200
STATS_BASIC = 0x7FF  # P9_STATS_BASIC: mode..blocks, the three times; no btime, gen, data_version

SETATTR_MODE, SETATTR_UID, SETATTR_GID, SETATTR_SIZE = 0x1, 0x2, 0x4, 0x8
SETATTR_ATIME, SETATTR_MTIME, SETATTR_ATIME_SET, SETATTR_MTIME_SET = 0x10, 0x20, 0x80, 0x100

LOCK_SUCCESS = 0
LOCK_TYPE_UNLCK = 2
V9FS_MAGIC = 0x01021997

MODIFYING: Final = frozenset({
    wire.TLCREATE, wire.TWRITE, wire.TSETATTR, wire.TMKDIR, wire.TMKNOD, wire.TSYMLINK, wire.TLINK,
    wire.TUNLINKAT, wire.TRENAMEAT, wire.TRENAME, wire.TREMOVE, wire.TXATTRCREATE,
})

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    _IOV_MAX = 1024


class Unanswerable(Exception):
    """A chain with no room for a request header or for the smallest reply."""


@dataclass(slots=True)
class Fid:
    fd: int  # O_PATH | O_NOFOLLOW until Tlopen/Tlcreate, then the open descriptor
    mode: int  # st_mode when walked to (the file type does not change under a descriptor)
    access: int = -1  # -1: not open; else O_RDONLY / O_WRONLY / O_RDWR
    listing: Iterator[tuple[bytes, bytes, int]] | None = None  # Treaddir's position
    next_entry: int = 0  # the offset (entry number) `listing` yields next
    pending: tuple[bytes, bytes, int] | None = None  # an entry that did not fit the last reply

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(slots=True)
class Placed:
    """A reply body whose ``trailing`` payload bytes are already in the reply buffers after it."""

    body: bytes
    trailing: int


def qid_kind(mode: int) -> int:
    if stat.S_ISDIR(mode):
        return wire.QT_DIR
    if stat.S_ISLNK(mode):
        return wire.QT_SYMLINK
    return wire.QT_FILE


# Qid paths: the guest's inode numbers (v9fs uses a qid path as st_ino, and cache=loose takes
# two files with one qid path for one inode).  An inode number is unique only within its file
# system, and a share that crosses mounts spans several (the root share: /, /proc, /sys, /run,
# whose roots are inode 1 or 2 each): the file system is folded in, as QEMU's multidevs=remap
# does.  Each st_dev met gets a prefix in the top bits, the share's own file system 0 (so a
# share on one file system has qid paths equal to its inode numbers); an inode number too wide
# for the bits left, or a device past the prefixes, gets a number of its own from a table with
# bit 63 set; past that table's bound, a hash with bits 63 and 62 set (a collision is then
# possible, never before).
QID_INO_BITS: Final = 48
MAX_DEV_PREFIXES: Final = 1 << (63 - QID_INO_BITS)  # prefixes stay below bit 63
QID_EXACT: Final = 1 << 63
QID_HASHED: Final = 1 << 62
MAX_EXACT_QIDS: Final = 1 << 16


def _dotl_open_flags(flags: int) -> int:
    """The host flags for a 9P2000.L open: access mode, O_TRUNC, O_APPEND, O_SYNC/O_DSYNC.

    O_APPEND stays, as QEMU keeps it: v9fs computes an appending write's offset from its own idea
    of the size, which another writer (a second guest process, the host) may have made stale;
    on an O_APPEND descriptor ``pwritev`` appends whatever the offset.  Dropped: O_DIRECT (the
    guest's buffers are not aligned for it), O_NOATIME (EPERM unless the owner), O_NONBLOCK,
    O_ASYNC, and O_CREAT/O_EXCL (Tlcreate creates, Tlopen never does).
    """
    host = flags & DOTL_ACCMODE
    if flags & DOTL_TRUNC:
        host |= os.O_TRUNC
    if flags & DOTL_APPEND:
        host |= os.O_APPEND
    if flags & DOTL_SYNC:
        host |= os.O_SYNC
    elif flags & DOTL_DSYNC:
        host |= os.O_DSYNC
    return host | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW


class Server:
    """One share: ``root_fd`` (a directory; the caller keeps it and closes it after `close`)."""

    def __init__(self, root_fd: int, *, readonly: bool, openat2: Openat2, max_fids: int = MAX_FIDS,
                 max_msize: int = MAX_MSIZE, cross_mounts: bool = False) -> None:
        """`cross_mounts`: walks enter file systems mounted inside the share, as a path lookup
        on the host does (and ``..`` leaves them); without it they are refused (EXDEV) and the
        share is its own file system only.  Either way nothing outside the share is reached
        (numavm.devices.p9.confine)."""
        st = os.fstat(root_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "9p share root is not a directory")
        if not MIN_MSIZE <= max_msize <= MAX_MSIZE:
            raise ValueError(f"max msize {max_msize} is not in {MIN_MSIZE}..{MAX_MSIZE}")
        if max_fids < 1:
            raise ValueError(f"max fids {max_fids}")
        self.root_fd = root_fd
        self.root_id = (st.st_dev, st.st_ino)
        self.cross_mounts = cross_mounts
        self._walk_flags = WALK & ~RESOLVE_NO_XDEV if cross_mounts else WALK
        self._parent_flags = PARENT & ~RESOLVE_NO_XDEV if cross_mounts else PARENT
        self._prefixes: dict[int, int] = {st.st_dev: 0}  # st_dev -> qid path prefix; kept across sessions
        self._exact: dict[tuple[int, int], int] = {}
        try:  # regular files are reopened through /proc/self/fd (confine.py, rule 4): say so now, not per open
            proc = os.stat(f"/proc/self/fd/{root_fd}")
        except OSError as e:
            raise OSError(e.errno, f"9p shares need /proc/self/fd: {e.strerror}") from None
        if (proc.st_dev, proc.st_ino) != self.root_id:
            raise OSError(errno.ENOENT, "9p shares need /proc/self/fd: it names another file")
        os.close(openat2(root_fd, ".", _O_PATH | os.O_DIRECTORY, 0, self._walk_flags))  # ENOSYS before Linux 5.6: now, not per walk
        self.readonly = readonly
        self.openat2 = openat2
        self.max_fids = max_fids
        self.max_msize = max_msize
        self.fids: dict[int, Fid] = {}
        self.msize = 0  # 0 until a Tversion agreed on 9P2000.L
        self.requests = 0
        self.errors = 0  # Rlerror replies
        self.faults: list[str] = []  # server bugs answered EIO (the first MAX_FAULTS)
        self._ops: dict[int, Callable[[Decoder, list[memoryview], list[memoryview], int], bytes | Placed]] = {
            wire.TVERSION: self._version, wire.TATTACH: self._attach, wire.TWALK: self._walk,
            wire.TGETATTR: self._getattr, wire.TLOPEN: self._lopen, wire.TREAD: self._read,
            wire.TREADDIR: self._readdir, wire.TREADLINK: self._readlink, wire.TSTATFS: self._statfs,
            wire.TCLUNK: self._clunk, wire.TFLUSH: self._flush, wire.TXATTRWALK: self._xattrwalk,
            wire.TLOCK: self._lock, wire.TGETLOCK: self._getlock, wire.TFSYNC: self._fsync,
            wire.TLCREATE: self._lcreate, wire.TWRITE: self._write, wire.TSETATTR: self._setattr,
            wire.TMKDIR: self._mkdir, wire.TMKNOD: self._mknod, wire.TSYMLINK: self._symlink,
            wire.TLINK: self._link, wire.TUNLINKAT: self._unlinkat, wire.TRENAMEAT: self._renameat,
        }

    # ------------------------------------------------------------ lifetime

    def reset(self) -> None:
        """Forget the session: every fid clunked, the version to be agreed again."""
        for fid in list(self.fids):
            self._drop(fid)
        self.msize = 0

    close = reset

    # ------------------------------------------------------------ one request

    def serve(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Answer the request in ``readable`` into ``writable``; the reply's length."""
        rlen = sum(v.nbytes for v in readable)
        wlen = sum(v.nbytes for v in writable)
        if rlen < wire.HEADER_SIZE:
            raise Unanswerable(f"9p request of {rlen} bytes has no header")
        if wlen < RLERROR_SIZE:
            raise Unanswerable(f"9p reply buffer of {wlen} bytes cannot hold any reply")
        size, kind, tag = wire.HEADER.unpack(_gather(readable, wire.HEADER_SIZE))
        self.requests += 1
        limit = min(rlen, self.msize or self.max_msize)
        room = min(wlen, self.msize or self.max_msize)
        try:
            if size < wire.HEADER_SIZE or size > limit:
                raise Malformed(f"message size {size} (request buffers {rlen}, msize {self.msize})")
            if kind != wire.TVERSION and not self.msize:
                raise P9Error(errno.EPROTO, "no Tversion yet")
            if self.readonly and kind in MODIFYING:
                raise P9Error(errno.EROFS)
            op = self._ops.get(kind)
            if op is None:
                raise P9Error(errno.EOPNOTSUPP, f"message type {kind}")
            if room < REPLY_ROOM.get(kind, RLERROR_SIZE):
                raise P9Error(errno.EMSGSIZE, f"reply room of {room} bytes")
            if kind == wire.TWRITE:  # the payload stays in guest memory
                d = Decoder(_gather(readable, min(size, TWRITE_HEADER)), wire.HEADER_SIZE)
                data = _slice(readable, TWRITE_HEADER, max(0, size - TWRITE_HEADER))
            else:
                d = Decoder(_gather(readable, size), wire.HEADER_SIZE)
                data = []
            reply = op(d, data, writable, room)
        except P9Error as e:
            return self._error(writable, tag, e.errno)
        except Malformed:
            return self._error(writable, tag, errno.EINVAL)
        except OSError as e:
            return self._error(writable, tag, e.errno or errno.EIO)
        except OverflowError:  # an offset or size the host's types cannot take
            return self._error(writable, tag, errno.EINVAL)
        except Exception as e:  # a bug here, not the guest's doing: answered, kept, never raised
            if len(self.faults) < MAX_FAULTS:
                self.faults.append(f"{wire.NAMES.get(kind, kind)}: {type(e).__name__}: {e}")
            return self._error(writable, tag, errno.EIO)
        body, trailing = (reply.body, reply.trailing) if isinstance(reply, Placed) else (reply, 0)
        total = wire.HEADER_SIZE + len(body) + trailing
        if total > room:  # Rreadlink, Rgetlock: long strings, and no change made
            return self._error(writable, tag, errno.EMSGSIZE)
        _scatter(writable, wire.HEADER.pack(total, kind + 1, tag) + body)
        return total

    def _error(self, writable: list[memoryview], tag: int, err: int) -> int:
        self.errors += 1
        _scatter(writable, wire.message(wire.RLERROR, tag, err.to_bytes(4, "little")))
        return RLERROR_SIZE

    # ------------------------------------------------------------ fids

    def _fid(self, fid: int) -> Fid:
        f = self.fids.get(fid)
        if f is None:
            raise P9Error(errno.EBADF, f"no fid {fid}")
        return f

    def _new_fid(self, fid: int) -> None:
        """Check that ``fid`` may be created."""
        if fid == wire.NOFID:
            raise P9Error(errno.EBADF, "NOFID")
        if fid in self.fids:
            raise P9Error(errno.EBADF, f"fid {fid} is in use")
        if len(self.fids) >= self.max_fids:
            raise P9Error(errno.ENFILE, f"{self.max_fids} fids in use")

    def _drop(self, fid: int) -> None:
        f = self.fids.pop(fid, None)
        if f is not None:
            self._close_listing(f)
            os.close(f.fd)

    @staticmethod
    def _close_listing(f: Fid) -> None:
        if f.listing is not None:
            f.listing.close()  # type: ignore[attr-defined]
        f.listing, f.pending, f.next_entry = None, None, 0

    def qid_of(self, st: os.stat_result) -> bytes:
        return wire.qid(qid_kind(st.st_mode), 0, self.qid_path(st.st_dev, st.st_ino))

    def qid_path(self, dev: int, ino: int) -> int:
        """The guest's inode number for host inode ``ino`` of file system ``dev`` (see QID_INO_BITS)."""
        prefix = self._prefixes.get(dev)
        if prefix is None and len(self._prefixes) < MAX_DEV_PREFIXES:
            prefix = self._prefixes[dev] = len(self._prefixes)
        if prefix is not None and 0 <= ino < 1 << QID_INO_BITS:
            return prefix << QID_INO_BITS | ino
        path = self._exact.get((dev, ino))
        if path is None:
            if len(self._exact) >= MAX_EXACT_QIDS:
                return QID_EXACT | QID_HASHED | hash((dev, ino)) & (QID_HASHED - 1)
            path = self._exact[(dev, ino)] = QID_EXACT | len(self._exact)
        return path

    def _is_root(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == self.root_id

    def _step(self, fd: int, name: bytes) -> int:
        """An O_PATH descriptor for ``name`` (one walk element) under directory ``fd``."""
        if name == b"..":
            if self._is_root(os.fstat(fd)):
                return self.openat2(fd, ".", _O_PATH | os.O_DIRECTORY, 0, self._walk_flags)  # the root's parent is the root
            return self.openat2(fd, "..", _O_PATH | os.O_DIRECTORY, 0, self._parent_flags)
        if name == b".":
            return self.openat2(fd, ".", _O_PATH, 0, self._walk_flags)
        return self.openat2(fd, component(name), _O_PATH, 0, self._walk_flags)

    # ------------------------------------------------------------ session

    def _version(self, d: Decoder, *_: object) -> bytes:
        msize, version = d.u32(), d.string()
        self.reset()  # a Tversion starts a new session: every fid goes
        msize = min(msize, self.max_msize)
        if version != wire.VERSION_9P2000_L or msize < MIN_MSIZE:
            return Encoder().u32(msize).string(b"unknown").bytes()
        self.msize = msize
        return Encoder().u32(msize).string(wire.VERSION_9P2000_L).bytes()

    def _attach(self, d: Decoder, *_: object) -> bytes:
        fid, _afid, _uname, _aname, _n_uname = d.u32(), d.u32(), d.string(), d.string(), d.u32()
        self._new_fid(fid)
        fd = os.dup(self.root_fd)  # aname is not a path: every attach is the share's root
        st = os.fstat(fd)
        self.fids[fid] = Fid(fd, st.st_mode)
        return self.qid_of(st)

    def _flush(self, d: Decoder, *_: object) -> bytes:
        d.u16()  # oldtag: every request is answered before the next is read, so nothing to cancel
        return b""

    def _clunk(self, d: Decoder, *_: object) -> bytes:
        fid = d.u32()
        self._fid(fid)
        self._drop(fid)
        return b""

    # ------------------------------------------------------------ looking

    def _walk(self, d: Decoder, _data: object, _writable: object, room: int) -> bytes:
        fid, newfid, n = d.u32(), d.u32(), d.u16()
        if n > MAX_WALK:
            raise Malformed(f"walk of {n} elements")
        if room < wire.HEADER_SIZE + 2 + n * wire.QID_SIZE:  # REPLY_ROOM: before a fid is made
            raise P9Error(errno.EMSGSIZE, f"reply room of {room} bytes for a walk of {n}")
        names = [d.string() for _ in range(n)]
        src = self._fid(fid)
        if newfid != fid:
            self._new_fid(newfid)
        if n == 0:
            if newfid != fid:
                self.fids[newfid] = Fid(os.dup(src.fd), src.mode)
            return Encoder().u16(0).bytes()
        qids: list[bytes] = []
        cur, mode = src.fd, src.mode
        try:
            for i, name in enumerate(names):
                try:
                    nxt = self._step(cur, name)
                except (OSError, P9Error):
                    if i == 0:
                        raise
                    break
                if cur != src.fd:
                    os.close(cur)
                cur = nxt
                st = os.fstat(cur)
                mode = st.st_mode
                qids.append(self.qid_of(st))
        except BaseException:
            if cur != src.fd:
                os.close(cur)
            raise
        if len(qids) < n:  # a partial walk: the qids so far, and no newfid
            if cur != src.fd:
                os.close(cur)
        elif newfid == fid:
            self._close_listing(src)
            os.close(src.fd)
            src.fd, src.mode, src.access = cur, mode, -1
        else:
            self.fids[newfid] = Fid(cur, mode)
        e = Encoder().u16(len(qids))
        for q in qids:
            e.qid(q)
        return e.bytes()

    def _getattr(self, d: Decoder, *_: object) -> bytes:
        f = self._fid(d.u32())
        d.u64()  # request_mask: the basic set is always there
        st = os.fstat(f.fd)
        return (Encoder().u64(STATS_BASIC).qid(self.qid_of(st)).u32(st.st_mode).u32(st.st_uid).u32(st.st_gid)
                .u64(st.st_nlink).u64(st.st_rdev).u64(st.st_size).u64(st.st_blksize).u64(st.st_blocks)
                .u64(st.st_atime_ns // 1_000_000_000).u64(st.st_atime_ns % 1_000_000_000)
                .u64(st.st_mtime_ns // 1_000_000_000).u64(st.st_mtime_ns % 1_000_000_000)
                .u64(st.st_ctime_ns // 1_000_000_000).u64(st.st_ctime_ns % 1_000_000_000)
                .u64(0).u64(0).u64(0).u64(0).bytes())

    def _readlink(self, d: Decoder, *_: object) -> bytes:
        f = self._fid(d.u32())
        if not stat.S_ISLNK(f.mode):
            raise P9Error(errno.EINVAL, "not a symlink")
        return Encoder().string(os.readlink(b"", dir_fd=f.fd)).bytes()  # readlinkat(fd, ""): that symlink

    def _statfs(self, d: Decoder, *_: object) -> bytes:
        f = self._fid(d.u32())
        s = os.fstatvfs(f.fd)
        return (Encoder().u32(V9FS_MAGIC).u32(s.f_bsize).u64(s.f_blocks).u64(s.f_bfree).u64(s.f_bavail)
                .u64(s.f_files).u64(s.f_ffree).u64(s.f_fsid).u32(s.f_namemax).bytes())

    def _xattrwalk(self, d: Decoder, *_: object) -> bytes:
        fid, newfid, name = d.u32(), d.u32(), d.string()
        self._fid(fid)
        if newfid != fid:
            self._new_fid(newfid)
        if name:
            raise P9Error(errno.ENODATA, "no extended attributes")
        raise P9Error(errno.EOPNOTSUPP, "no extended attribute listing")

    def _lock(self, d: Decoder, *_: object) -> bytes:
        self._fid(d.u32())
        d.u8(), d.u32(), d.u64(), d.u64(), d.u32(), d.string()  # type flags start length proc_id client_id
        return Encoder().u8(LOCK_SUCCESS).bytes()

    def _getlock(self, d: Decoder, *_: object) -> bytes:
        self._fid(d.u32())
        _type, start, length, proc_id, client = d.u8(), d.u64(), d.u64(), d.u32(), d.string()
        return Encoder().u8(LOCK_TYPE_UNLCK).u64(start).u64(length).u32(proc_id).string(client).bytes()

    # ------------------------------------------------------------ opening and I/O

    def _open_fd(self, f: Fid, host_flags: int) -> int:
        """A descriptor open for I/O on ``f``'s inode: regular files and directories only."""
        if stat.S_ISDIR(f.mode):
            if host_flags & os.O_ACCMODE != os.O_RDONLY or host_flags & os.O_TRUNC:
                raise P9Error(errno.EISDIR)
            return self.openat2(f.fd, ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, self._walk_flags)
        if stat.S_ISLNK(f.mode):
            raise P9Error(errno.ELOOP, "a symlink is not opened")
        if not stat.S_ISREG(f.mode):
            raise P9Error(errno.EACCES, "device nodes, FIFOs and sockets are not opened")
        # the inode behind the descriptor, by the kernel's name for it (confine.py, rule 4)
        return os.open(f"/proc/self/fd/{f.fd}", host_flags & ~os.O_NOFOLLOW)

    def _lopen(self, d: Decoder, *_: object) -> bytes:
        f = self._fid(d.u32())
        flags = d.u32()
        if f.access >= 0:
            raise P9Error(errno.EBADF, "fid already open")
        host = _dotl_open_flags(flags)
        access = host & os.O_ACCMODE
        if access == DOTL_ACCMODE:
            raise P9Error(errno.EINVAL, "access mode 3")
        if self.readonly and (access != os.O_RDONLY or host & os.O_TRUNC):
            raise P9Error(errno.EROFS)
        fd = self._open_fd(f, host)
        os.close(f.fd)
        f.fd, f.access = fd, access
        st = os.fstat(fd)
        f.mode = st.st_mode
        return Encoder().qid(self.qid_of(st)).u32(0).bytes()  # iounit 0: msize - 24

    def _read(self, d: Decoder, _data: list[memoryview], writable: list[memoryview], room: int) -> Placed:
        f = self._fid(d.u32())
        offset, count = d.u64(), d.u32()
        if f.access < 0 or f.access == os.O_WRONLY:
            raise P9Error(errno.EBADF, "fid not open for reading")
        count = min(count, room - IOHDR)
        n = _read_into(f.fd, _slice(writable, IOHDR, count), offset) if count > 0 else 0
        return Placed(n.to_bytes(4, "little"), n)

    def _write(self, d: Decoder, data: list[memoryview], *_: object) -> bytes:
        f = self._fid(d.u32())
        offset, count = d.u64(), d.u32()
        if f.access not in (os.O_WRONLY, os.O_RDWR):
            raise P9Error(errno.EBADF, "fid not open for writing")
        # Linux's zero-copy write may map fewer pages than it asked for: the message's size,
        # not its count, says how much data there is; the reply tells the client what was written
        views = _slice(data, 0, min(count, sum(v.nbytes for v in data)))
        return Encoder().u32(_write_from(f.fd, views, offset)).bytes()

    def _fsync(self, d: Decoder, *_: object) -> bytes:
        f = self._fid(d.u32())
        datasync = d.u32()
        if f.access < 0:
            raise P9Error(errno.EBADF, "fid not open")
        (os.fdatasync if datasync else os.fsync)(f.fd)
        return b""

    def _readdir(self, d: Decoder, _data: list[memoryview], writable: list[memoryview], room: int) -> Placed:
        f = self._fid(d.u32())
        offset, count = d.u64(), d.u32()
        if f.access < 0:
            raise P9Error(errno.EBADF, "directory not open")
        if not f.is_dir:
            raise P9Error(errno.ENOTDIR)
        count = min(count, room - IOHDR)
        try:
            out = self._entries_from(f, offset, count)
        except BaseException:
            self._close_listing(f)
            raise
        _scatter(_slice(writable, IOHDR, len(out)), out)
        return Placed(len(out).to_bytes(4, "little"), len(out))

    def _entries_from(self, f: Fid, offset: int, count: int) -> bytes:
        """Directory entries from entry number ``offset``, as many whole ones as fit ``count``."""
        if f.listing is None or offset != f.next_entry:
            self._close_listing(f)  # a new listing (offset 0: rewinddir) or a seek: start over
            os.lseek(f.fd, 0, os.SEEK_SET)
            f.listing = self._listing(f.fd)
            for _ in range(offset):
                if next(f.listing, None) is None:
                    break
                f.next_entry += 1
            if f.next_entry != offset:
                return b""
        out = bytearray()
        while True:
            entry = f.pending if f.pending is not None else next(f.listing, None)
            if entry is None:
                f.pending = None
                return bytes(out)
            name, qid, dtype = entry
            record = Encoder().qid(qid).u64(f.next_entry + 1).u8(dtype).string(name).bytes()
            if len(out) + len(record) > count:
                f.pending = entry  # the next reply starts with it
                return bytes(out)
            out += record
            f.pending = None
            f.next_entry += 1

    def _listing(self, fd: int) -> Iterator[tuple[bytes, bytes, int]]:
        """``.``, ``..`` (the root's is the root) and the directory's entries, getdents order."""
        st = os.fstat(fd)
        yield b".", self.qid_of(st), stat.S_IFDIR >> 12
        dev = st.st_dev
        parent = st if self._is_root(st) else os.stat("..", dir_fd=fd, follow_symlinks=False)
        yield b"..", self.qid_of(parent), stat.S_IFDIR >> 12
        with os.scandir(fd) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    dtype, kind = stat.S_IFDIR >> 12, wire.QT_DIR
                elif e.is_symlink():
                    dtype, kind = stat.S_IFLNK >> 12, wire.QT_SYMLINK
                elif e.is_file(follow_symlinks=False):
                    dtype, kind = stat.S_IFREG >> 12, wire.QT_FILE
                else:
                    try:
                        dtype, kind = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode) >> 12, wire.QT_FILE
                    except FileNotFoundError:
                        continue  # gone since getdents saw it
                # d_ino, on the directory's file system: at a mount point, the directory below
                # the mount, as the host's own getdents says (a walk there gives the mounted root)
                yield os.fsencode(e.name), wire.qid(kind, 0, self.qid_path(dev, e.inode())), dtype

    # ------------------------------------------------------------ changing

    def _dir(self, fid: int) -> Fid:
        f = self._fid(fid)
        if not f.is_dir:
            raise P9Error(errno.ENOTDIR)
        return f

    def _lcreate(self, d: Decoder, *_: object) -> bytes:
        f = self._dir(d.u32())
        name, flags, mode, _gid = component(d.string()), d.u32(), d.u32(), d.u32()
        if f.access >= 0:
            raise P9Error(errno.EBADF, "fid already open")
        host = _dotl_open_flags(flags)
        if host & os.O_ACCMODE == DOTL_ACCMODE:
            raise P9Error(errno.EINVAL, "access mode 3")
        try:
            fd = self.openat2(f.fd, name, host | os.O_CREAT | os.O_EXCL, mode & 0o7777, self._walk_flags)
        except OSError as e:
            if e.errno != errno.EEXIST or flags & DOTL_EXCL:
                raise
            # an existing name: the ordinary walk and open, so it is a regular file or refused
            path = self._step(f.fd, name)
            try:
                st = os.fstat(path)
                fd = self._open_fd(Fid(path, st.st_mode), host)
            finally:
                os.close(path)
        os.close(f.fd)
        st = os.fstat(fd)
        f.fd, f.mode, f.access = fd, st.st_mode, host & os.O_ACCMODE
        return Encoder().qid(self.qid_of(st)).u32(0).bytes()

    def _created(self, dirfd: int, name: bytes) -> bytes:
        return self.qid_of(os.stat(name, dir_fd=dirfd, follow_symlinks=False))

    def _mkdir(self, d: Decoder, *_: object) -> bytes:
        f = self._dir(d.u32())
        name, mode, _gid = component(d.string()), d.u32(), d.u32()
        os.mkdir(name, mode & 0o7777, dir_fd=f.fd)
        return self._created(f.fd, name)

    def _mknod(self, d: Decoder, *_: object) -> bytes:
        f = self._dir(d.u32())
        name, mode, _major, _minor, _gid = component(d.string()), d.u32(), d.u32(), d.u32(), d.u32()
        if stat.S_IFMT(mode) not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG):
            raise P9Error(errno.EPERM, "no device nodes in a share")
        os.mknod(name, stat.S_IFMT(mode) | mode & 0o7777, dir_fd=f.fd)
        return self._created(f.fd, name)

    def _symlink(self, d: Decoder, *_: object) -> bytes:
        f = self._dir(d.u32())
        name, target, _gid = component(d.string()), d.string(), d.u32()
        if not target or b"\0" in target:
            raise P9Error(errno.EINVAL, "symlink target")
        os.symlink(target, name, dir_fd=f.fd)  # its text is the guest's business: never followed here
        return self._created(f.fd, name)

    def _link(self, d: Decoder, *_: object) -> bytes:
        dirf, f, name = self._dir(d.u32()), self._fid(d.u32()), component(d.string())
        if not stat.S_ISREG(f.mode):
            raise P9Error(errno.EPERM, "hard links to regular files only")
        os.link(f"/proc/self/fd/{f.fd}", name, dst_dir_fd=dirf.fd, follow_symlinks=True)
        return b""

    def _unlinkat(self, d: Decoder, *_: object) -> bytes:
        f = self._dir(d.u32())
        name, flags = component(d.string()), d.u32()
        if flags & AT_REMOVEDIR:
            os.rmdir(name, dir_fd=f.fd)
        else:
            os.unlink(name, dir_fd=f.fd)
        return b""

    def _renameat(self, d: Decoder, *_: object) -> bytes:
        old = self._dir(d.u32())
        oldname = component(d.string())
        new = self._dir(d.u32())
        newname = component(d.string())
        os.rename(oldname, newname, src_dir_fd=old.fd, dst_dir_fd=new.fd)
        return b""

    def _setattr(self, d: Decoder, *_: object) -> bytes:
        f = self._fid(d.u32())
        valid, mode, uid, gid, size = d.u32(), d.u32(), d.u32(), d.u32(), d.u64()
        atime, atime_ns, mtime, mtime_ns = d.u64(), d.u64(), d.u64(), d.u64()
        if stat.S_ISLNK(f.mode) and valid & (SETATTR_MODE | SETATTR_SIZE | SETATTR_UID | SETATTR_GID
                                             | SETATTR_ATIME | SETATTR_MTIME):
            raise P9Error(errno.EOPNOTSUPP, "attributes of a symlink itself")
        inode = f"/proc/self/fd/{f.fd}"  # that inode, whatever the descriptor's access (confine.py, rule 4)
        if valid & SETATTR_MODE:
            os.chmod(inode, mode & 0o7777)
        if valid & (SETATTR_UID | SETATTR_GID):
            os.chown(inode, uid if valid & SETATTR_UID else -1, gid if valid & SETATTR_GID else -1)
        if valid & SETATTR_SIZE:
            if not stat.S_ISREG(f.mode):
                raise P9Error(errno.EISDIR if f.is_dir else errno.EINVAL, "truncate(2)'s answers")
            os.truncate(inode, size)
        if valid & (SETATTR_ATIME | SETATTR_MTIME):
            st = os.fstat(f.fd)
            now = time.time_ns()
            a = _time(valid, SETATTR_ATIME, SETATTR_ATIME_SET, atime, atime_ns, st.st_atime_ns, now)
            m = _time(valid, SETATTR_MTIME, SETATTR_MTIME_SET, mtime, mtime_ns, st.st_mtime_ns, now)
            os.utime(inode, ns=(a, m))
        return b""


def _time(valid: int, bit: int, set_bit: int, sec: int, nsec: int, current: int, now: int) -> int:
    if not valid & bit:
        return current
    if not valid & set_bit:
        return now
    if nsec >= 1_000_000_000:
        raise P9Error(errno.EINVAL, f"nanoseconds {nsec}")
    return sec * 1_000_000_000 + nsec


# ---------------------------------------------------------------- buffers (guest memory views)


def _gather(views: list[memoryview], n: int) -> bytes:
    """The first ``n`` bytes of ``views`` (fewer if they hold fewer), copied."""
    out = bytearray()
    for v in views:
        if len(out) >= n:
            break
        out += v[:n - len(out)]
    return bytes(out)


def _slice(views: list[memoryview], start: int, n: int) -> list[memoryview]:
    """Views of bytes ``[start, start + n)`` of ``views`` (no copy; shorter if they end first)."""
    out: list[memoryview] = []
    for v in views:
        if n <= 0:
            break
        if start >= v.nbytes:
            start -= v.nbytes
            continue
        piece = v[start:start + n]
        start = 0
        out.append(piece)
        n -= piece.nbytes
    return out


def _scatter(views: list[memoryview], data: bytes) -> None:
    """Copy ``data`` to the start of ``views`` (the caller checked that it fits)."""
    at = 0
    for v in views:
        if at >= len(data):
            return
        take = min(v.nbytes, len(data) - at)
        v[:take] = data[at:at + take]
        at += take


def _read_into(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill ``views`` from ``offset`` up to the end of the file; the bytes read."""
    done = 0
    while views:
        n = os.preadv(fd, views[:_IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
        views = _slice(views, n, sum(v.nbytes for v in views) - n)
    return done


def _write_from(fd: int, views: list[memoryview], offset: int) -> int:
    done = 0
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
        views = _slice(views, n, sum(v.nbytes for v in views) - n)
    return done
