"""virtio-9p and its 9P2000.L server, driven by a client written here the way Linux's v9fs
and net/9p/trans_virtio.c drive them: a virtio-pci driver (test_virtio's) over real guest
memory (`SlotRam`), 9P messages in chains split at 4 KiB pages, the zero-copy shapes for
Tread/Treaddir (an 11-byte reply header, then the data pages) and Twrite (a 23-byte request
header, then the data pages), against a real temporary directory.

What is proven: what the guest reads matches the host's files (os.stat, bytes, listings); what
it writes lands on disk; nothing outside the share is reachable (``..`` at the root, absolute
and relative symlinks out, names with ``/``, renames to names outside, device nodes and FIFOs
never opened); a read-only share refuses every change; malformed and hostile messages get a
reply (or, when a chain cannot carry one, a device error), never an exception and never a hang.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from numavm.devices.memory import SlotRam
from numavm.devices.p9 import server as p9s
from numavm.devices.p9 import wire
from numavm.devices.virtio import p9 as vp9
from numavm.devices.virtio import pci as vpci
from numavm.host import libc

from test_virtio import SLOT, Driver, bounded, needs_reset  # noqa: F401  (bounded: the 60 s alarm)

PAGE = 4096
MSIZE = 64 * 1024
TABLES_AT = 0x2_0000  # indirect descriptor tables, reused (the rings sit below)
REQ_AT = 0x4_0000  # request buffer (slot 0)
RESP_AT = 0x8_0000  # reply buffer (slot 0)
STRADDLE_AT = SLOT - 3 * PAGE - 100  # a reply buffer across the two slots (two domains)


class Remote(Exception):
    """An Rlerror."""

    def __init__(self, err: int) -> None:
        super().__init__(err, errno.errorcode.get(err, str(err)))
        self.errno = err


def _pages(addr: int, n: int, writable: bool) -> list[tuple[int, int, bool]]:
    """[addr, addr+n) cut at page boundaries, as pack_sg_list does."""
    out = []
    while n > 0:
        take = min(n, PAGE - addr % PAGE)
        out.append((addr, take, writable))
        addr += take
        n -= take
    return out


@dataclass
class Qid:
    kind: int
    version: int
    path: int


def _qid(b: bytes, at: int = 0) -> Qid:
    return Qid(*struct.unpack_from("<BIQ", b, at))


class P9Driver(Driver):
    """virtio_9p and net/9p's client, enough of them to drive every message."""

    tag = 0
    cyclic = 0  # after setup: indirect tables come from a ring of their own, below REQ_AT

    def alloc(self, n: int, align: int = 16) -> int:
        if not self.cyclic:
            at = super().alloc(n, align)
            assert at + n <= TABLES_AT
            return at
        at = (self.cyclic + align - 1) // align * align
        if at + n > REQ_AT:
            at = TABLES_AT
        self.cyclic = at + n
        return at

    def setup(self, *a: object, **kw: object) -> None:
        super().setup(*a, **kw)  # type: ignore[arg-type]
        self.cyclic = TABLES_AT  # each request is answered before the next: a table is free again

    def mount_tag(self) -> bytes:
        base = self.caps[vpci.CAP_DEVICE_CFG][1]
        n = self.dev.mmio_read(0, base, 2)
        return bytes(self.dev.mmio_read(0, base + 2 + i, 1) for i in range(n))

    def raw(self, msg: bytes, room: int = MSIZE, *, resp_at: int = RESP_AT,
            out_extra: list[tuple[int, int, bool]] | None = None,
            in_split: int | None = None) -> bytes:
        """Send ``msg`` as Linux would (page-split, indirect); the reply's bytes (its used length)."""
        self.ram.write(REQ_AT, msg)
        bufs = _pages(REQ_AT, len(msg), False) + (out_extra or [])
        if in_split is None:
            bufs += _pages(resp_at, room, True)
        else:  # the zero-copy shape: a header buffer, then the data pages elsewhere
            bufs += [(resp_at, in_split, True)] + _pages(resp_at + PAGE * 4, room - in_split, True)
        self.ram.write(resp_at, b"\xEE" * min(room, 64))
        head = self.chain(0, bufs, indirect=len(bufs) > 1)
        self.offer(0, head)
        self.kick()
        done = self.used()
        assert [h for h, _ in done] == [head]
        n = done[0][1]
        if in_split is None:
            return self.ram.read(resp_at, n)
        hdr = self.ram.read(resp_at, min(n, in_split))
        return hdr + self.ram.read(resp_at + PAGE * 4, max(0, n - in_split))

    def rpc(self, kind: int, body: bytes = b"", room: int = MSIZE, **kw: object) -> bytes:
        self.tag = (self.tag + 1) % 0xFFFF
        reply = self.raw(wire.message(kind, self.tag, body), room, **kw)  # type: ignore[arg-type]
        size, rkind, rtag = wire.HEADER.unpack_from(reply)
        assert size == len(reply), (size, len(reply))
        assert rtag == self.tag
        if rkind == wire.RLERROR:
            assert size == 11
            raise Remote(struct.unpack_from("<I", reply, 7)[0])
        assert rkind == kind + 1, (kind, rkind)
        assert not self.server.faults, self.server.faults
        return reply[7:]

    @property
    def server(self) -> p9s.Server:
        return self.dev.device.server  # type: ignore[attr-defined,no-any-return]

    # ---- messages, as v9fs sends them

    def version(self, msize: int = MSIZE, version: bytes = b"9P2000.L") -> tuple[int, bytes]:
        b = self.rpc(wire.TVERSION, struct.pack("<I", msize) + _s(version))
        return struct.unpack_from("<I", b)[0], b[6:6 + struct.unpack_from("<H", b, 4)[0]]

    def attach(self, fid: int = 0) -> Qid:
        b = self.rpc(wire.TATTACH, struct.pack("<II", fid, wire.NOFID) + _s(b"root") + _s(b"") + struct.pack("<I", 0))
        return _qid(b)

    def walk(self, fid: int, newfid: int, *names: bytes | str) -> list[Qid]:
        body = struct.pack("<IIH", fid, newfid, len(names)) + b"".join(_s(os.fsencode(n)) for n in names)
        b = self.rpc(wire.TWALK, body)
        n = struct.unpack_from("<H", b)[0]
        assert len(b) == 2 + 13 * n
        return [_qid(b, 2 + 13 * i) for i in range(n)]

    def getattr(self, fid: int) -> dict[str, int]:
        b = self.rpc(wire.TGETATTR, struct.pack("<IQ", fid, 0x3FFF))
        valid = struct.unpack_from("<Q", b)[0]
        q = _qid(b, 8)
        keys = ("mode", "uid", "gid", "nlink", "rdev", "size", "blksize", "blocks", "atime", "atime_ns",
                "mtime", "mtime_ns", "ctime", "ctime_ns", "btime", "btime_ns", "gen", "data_version")
        vals = struct.unpack_from("<III" + "Q" * 15, b, 21)
        assert len(b) == 21 + 12 + 15 * 8
        return {"valid": valid, "qid_type": q.kind, "ino": q.path, **dict(zip(keys, vals))}

    def lopen(self, fid: int, flags: int = 0) -> Qid:
        b = self.rpc(wire.TLOPEN, struct.pack("<II", fid, flags))
        return _qid(b)

    def read(self, fid: int, offset: int, count: int, *, zc: bool = False) -> bytes:
        room = 11 + count if zc else MSIZE
        b = self.rpc(wire.TREAD, struct.pack("<IQI", fid, offset, count), room, in_split=11 if zc else None)
        n = struct.unpack_from("<I", b)[0]
        assert len(b) == 4 + n and n <= count
        return b[4:]

    def read_all(self, fid: int, chunk: int = 8192, **kw: bool) -> bytes:
        out = b""
        while data := self.read(fid, len(out), chunk, **kw):
            out += data
        return out

    def readdir(self, fid: int, offset: int = 0, count: int = 8192, *,
                zc: bool = False) -> list[tuple[Qid, int, int, bytes]]:
        room = 11 + count if zc else MSIZE
        b = self.rpc(wire.TREADDIR, struct.pack("<IQI", fid, offset, count), room, in_split=11 if zc else None)
        n = struct.unpack_from("<I", b)[0]
        assert len(b) == 4 + n and n <= count
        out, at = [], 4
        while at < len(b):
            q = _qid(b, at)
            off, dtype, ln = struct.unpack_from("<QBH", b, at + 13)
            out.append((q, off, dtype, b[at + 24:at + 24 + ln]))
            at += 24 + ln
        assert at == len(b)
        return out

    def readdir_all(self, fid: int, count: int = 8192) -> list[tuple[Qid, int, int, bytes]]:
        out: list[tuple[Qid, int, int, bytes]] = []
        offset = 0
        while batch := self.readdir(fid, offset, count):
            out += batch
            offset = batch[-1][1]
        return out

    def readlink(self, fid: int) -> bytes:
        b = self.rpc(wire.TREADLINK, struct.pack("<I", fid))
        return b[2:2 + struct.unpack_from("<H", b)[0]]

    def statfs(self, fid: int) -> tuple[int, ...]:
        return struct.unpack("<IIQQQQQQI", self.rpc(wire.TSTATFS, struct.pack("<I", fid)))

    def clunk(self, fid: int) -> None:
        assert self.rpc(wire.TCLUNK, struct.pack("<I", fid)) == b""

    def lcreate(self, fid: int, name: bytes | str, flags: int = os.O_RDWR, mode: int = 0o644) -> Qid:
        return _qid(self.rpc(wire.TLCREATE, struct.pack("<I", fid) + _s(os.fsencode(name))
                             + struct.pack("<III", flags, mode, 0)))

    def write(self, fid: int, offset: int, data: bytes, *, zc: bool = False) -> int:
        head = struct.pack("<IQI", fid, offset, len(data))
        if not zc:
            b = self.rpc(wire.TWRITE, head + data)
        else:  # header alone, size covering the data, data pages elsewhere (p9_virtio_zc_request)
            at = 0x10_0000 + 5 * PAGE + 123  # slot 1
            self.ram.write(at, data)
            self.tag = (self.tag + 1) % 0xFFFF
            msg = struct.pack("<IBH", 7 + len(head) + len(data), wire.TWRITE, self.tag) + head
            reply = self.raw(msg, out_extra=_pages(at, len(data), False))
            assert reply[4] == wire.TWRITE + 1, reply
            b = reply[7:]
        return struct.unpack_from("<I", b)[0]

    def mkdir(self, fid: int, name: bytes | str, mode: int = 0o755) -> Qid:
        return _qid(self.rpc(wire.TMKDIR, struct.pack("<I", fid) + _s(os.fsencode(name)) + struct.pack("<II", mode, 0)))

    def symlink(self, fid: int, name: bytes | str, target: bytes | str) -> Qid:
        return _qid(self.rpc(wire.TSYMLINK, struct.pack("<I", fid) + _s(os.fsencode(name))
                             + _s(os.fsencode(target)) + struct.pack("<I", 0)))

    def unlinkat(self, fid: int, name: bytes | str, flags: int = 0) -> None:
        self.rpc(wire.TUNLINKAT, struct.pack("<I", fid) + _s(os.fsencode(name)) + struct.pack("<I", flags))

    def renameat(self, olddir: int, old: bytes | str, newdir: int, new: bytes | str) -> None:
        self.rpc(wire.TRENAMEAT, struct.pack("<I", olddir) + _s(os.fsencode(old)) + struct.pack("<I", newdir)
                 + _s(os.fsencode(new)))

    def setattr(self, fid: int, valid: int, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0,
                atime: tuple[int, int] = (0, 0), mtime: tuple[int, int] = (0, 0)) -> None:
        self.rpc(wire.TSETATTR, struct.pack("<IIIIIQQQQQ", fid, valid, mode, uid, gid, size, *atime, *mtime))

    def fsync(self, fid: int, datasync: int = 0) -> None:
        self.rpc(wire.TFSYNC, struct.pack("<II", fid, datasync))

    def link(self, dfid: int, fid: int, name: bytes | str) -> None:
        self.rpc(wire.TLINK, struct.pack("<II", dfid, fid) + _s(os.fsencode(name)))

    def mknod(self, dfid: int, name: bytes | str, mode: int, major: int = 0, minor: int = 0) -> Qid:
        return _qid(self.rpc(wire.TMKNOD, struct.pack("<I", dfid) + _s(os.fsencode(name))
                             + struct.pack("<IIII", mode, major, minor, 0)))

    def errno_of(self, kind: int, body: bytes = b"", **kw: object) -> int:
        with pytest.raises(Remote) as e:
            self.rpc(kind, body, **kw)  # type: ignore[arg-type]
        return e.value.errno


def _s(b: bytes) -> bytes:
    return struct.pack("<H", len(b)) + b


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def ram() -> Iterator[SlotRam]:
    yield SlotRam([(0, SLOT), (SLOT, SLOT)])


BIG = bytes((i * 31 + (i >> 8)) & 0xFF for i in range(300_000))


def make_tree(root: Path, entries: int = 150) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, guest\n")
    (root / "big.bin").write_bytes(BIG)
    (root / "dir" / "a").write_bytes(b"A" * 10)
    (root / "dir" / "sub" / "deep").write_bytes(b"deep")
    for i in range(entries):
        (root / "dir" / f"entry-{i:03d}-{'x' * (i % 40)}").write_bytes(b"%d" % i)
    os.symlink("/etc", root / "etc-abs")
    os.symlink("../../../../../../etc", root / "dir" / "etc-rel")
    os.symlink("hello.txt", root / "link-in")
    (root / "empty").write_bytes(b"")


@pytest.fixture
def share() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="numavm-p9-") as d:
        root = Path(d) / "share"
        root.mkdir()
        (Path(d) / "secret").write_bytes(b"outside the share")
        make_tree(root)
        yield root


def open_root(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def p9_driver(ram: SlotRam, root: Path, *, readonly: bool = False, max_fids: int = p9s.MAX_FIDS,
              tag: str = "share0", cross_mounts: bool = False) -> P9Driver:
    fd = open_root(root)
    dev = vpci.VirtioPciDevice(vp9.Virtio9p(fd, tag, readonly=readonly, openat2=libc.openat2, max_fids=max_fids,
                                            cross_mounts=cross_mounts), ram)
    drv = P9Driver(dev, ram)
    drv.root_fd = fd  # type: ignore[attr-defined]
    drv.setup()
    return drv


@pytest.fixture
def c(ram: SlotRam, share: Path) -> Iterator[P9Driver]:
    drv = p9_driver(ram, share)
    drv.version()
    drv.attach(0)
    yield drv
    drv.dev.device.close()  # type: ignore[attr-defined]
    os.close(drv.root_fd)  # type: ignore[attr-defined]


@pytest.fixture
def ro(ram: SlotRam, share: Path) -> Iterator[P9Driver]:
    drv = p9_driver(ram, share, readonly=True)
    drv.version()
    drv.attach(0)
    yield drv
    drv.dev.device.close()  # type: ignore[attr-defined]
    os.close(drv.root_fd)  # type: ignore[attr-defined]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- the device


def test_identity_tag_and_features(ram: SlotRam, share: Path) -> None:
    drv = p9_driver(ram, share, tag="hostshare")
    assert drv.cfg(0x02, 2) == 0x1040 + 9  # PCI device id: modern virtio 9p
    assert drv.cfg(0x2E, 2) == 9  # subsystem id: the virtio device id
    assert drv.features() >> vp9.VIRTIO_9P_F_MOUNT_TAG & 1
    assert drv.mount_tag() == b"hostshare"
    assert drv.common("num_queues", 2) == 1
    for bad in ("", "a b", "x" * 256, "nul\0"):
        with pytest.raises(ValueError):
            vp9.Virtio9p(drv.root_fd, bad, openat2=libc.openat2)  # type: ignore[attr-defined]
    with tempfile.NamedTemporaryFile() as f, pytest.raises(NotADirectoryError):
        vp9.Virtio9p(os.open(f.name, os.O_RDONLY | os.O_CLOEXEC), "t", openat2=libc.openat2)
    os.close(drv.root_fd)  # type: ignore[attr-defined]


def test_version_negotiation(ram: SlotRam, share: Path) -> None:
    drv = p9_driver(ram, share)
    assert drv.errno_of(wire.TATTACH, struct.pack("<II", 0, wire.NOFID) + _s(b"") + _s(b"") + b"\0" * 4) \
        == errno.EPROTO  # nothing before Tversion
    assert drv.version(8 << 20) == (p9s.MAX_MSIZE, b"9P2000.L")  # bounded
    assert drv.version(MSIZE) == (MSIZE, b"9P2000.L")
    assert drv.version(MSIZE, b"9P2000.u") == (MSIZE, b"unknown")
    assert drv.version(1024) == (1024, b"unknown")  # too small to carry Linux's own replies
    assert drv.version(MSIZE) == (MSIZE, b"9P2000.L")
    drv.attach(0)
    drv.version(MSIZE)  # a new session: fid 0 is gone
    assert drv.errno_of(wire.TCLUNK, struct.pack("<I", 0)) == errno.EBADF


# ---------------------------------------------------------------- looking and reading


def test_walk_getattr_match_host(c: P9Driver, share: Path) -> None:
    root = c.getattr(0)
    st = os.stat(share)
    assert root["ino"] == st.st_ino and root["qid_type"] == wire.QT_DIR and root["mode"] == st.st_mode
    for rel in ("hello.txt", "big.bin", "dir", "dir/sub/deep", "etc-abs", "dir/etc-rel", "empty"):
        qids = c.walk(0, 1, *rel.split("/"))
        st = os.lstat(share / rel)
        assert qids[-1].path == st.st_ino
        assert qids[-1].kind == (wire.QT_DIR if stat.S_ISDIR(st.st_mode) else
                                 wire.QT_SYMLINK if stat.S_ISLNK(st.st_mode) else wire.QT_FILE)
        a = c.getattr(1)
        assert a["valid"] == p9s.STATS_BASIC
        for k in ("mode", "uid", "gid", "nlink", "size", "blocks", "blksize"):
            assert a[k] == getattr(st, "st_" + k), k
        assert a["mtime"] * 10**9 + a["mtime_ns"] == st.st_mtime_ns
        assert a["ctime"] * 10**9 + a["ctime_ns"] == st.st_ctime_ns
        c.clunk(1)
    # a partial walk: the qids up to the failure, and no new fid
    partial = c.walk(0, 1, "dir", "sub", "nope", "x")
    assert [q.path for q in partial] == [os.stat(share / p).st_ino for p in ("dir", "dir/sub")]
    assert c.errno_of(wire.TCLUNK, struct.pack("<I", 1)) == errno.EBADF
    with pytest.raises(Remote) as e:
        c.walk(0, 1, "nope")
    assert e.value.errno == errno.ENOENT
    # clone, and walk a fid onto itself
    assert c.walk(0, 2) == []
    c.walk(2, 2, "dir", "sub")
    assert c.getattr(2)["ino"] == os.stat(share / "dir/sub").st_ino
    assert c.walk(2, 3, "..", "..")[-1].path == os.stat(share).st_ino
    # fids in use, unknown fids
    with pytest.raises(Remote) as e:
        c.walk(0, 2, "dir")
    assert e.value.errno == errno.EBADF
    with pytest.raises(Remote) as e:
        c.walk(77, 78)
    assert e.value.errno == errno.EBADF


@pytest.mark.parametrize("zc", [False, True])
def test_read_matches_host(c: P9Driver, share: Path, zc: bool) -> None:
    for name in ("hello.txt", "big.bin", "empty"):
        c.walk(0, 1, name)
        c.lopen(1, os.O_RDONLY)
        assert c.read_all(1, 60_000, zc=zc) == (share / name).read_bytes()
        c.clunk(1)
    c.walk(0, 1, "big.bin")
    c.lopen(1)
    data = (share / "big.bin").read_bytes()
    assert c.read(1, 123_457, 5000, zc=zc) == data[123_457:128_457]
    assert c.read(1, 299_990, 5000, zc=zc) == data[299_990:]
    assert c.read(1, 1 << 40, 100, zc=zc) == b""
    # a count past msize is bounded by msize, not taken
    assert len(c.read(1, 0, 0xFFFF_FFFF)) == MSIZE - 11


def test_read_into_buffer_across_domains(c: P9Driver, share: Path) -> None:
    c.walk(0, 1, "big.bin")
    c.lopen(1)
    n = 5 * PAGE
    b = c.rpc(wire.TREAD, struct.pack("<IQI", 1, 1000, n), 11 + n, resp_at=STRADDLE_AT)
    assert b[4:] == (share / "big.bin").read_bytes()[1000:1000 + n]


def test_readdir_matches_host(c: P9Driver, share: Path) -> None:
    c.walk(0, 1, "dir")
    c.lopen(1, os.O_RDONLY)
    whole = c.readdir_all(1)
    names = [e[3] for e in whole]
    assert sorted(names) == sorted([b".", b".."] + [os.fsencode(n) for n in os.listdir(share / "dir")])
    assert [e[1] for e in whole] == list(range(1, len(whole) + 1))  # offsets: the next entry's number
    for q, _, dtype, name in whole:
        st = os.lstat(share / "dir" / os.fsdecode(name))
        assert dtype == stat.S_IFMT(st.st_mode) >> 12
        assert q.path == st.st_ino
    # small replies page through the same listing, no entry lost or repeated
    assert [e[3] for e in c.readdir_all(1, count=100)] == names
    # a seek back (offset 40) continues from there
    assert [e[3] for e in c.readdir(1, 40, 8192)] == names[40:]
    # Linux's zero-copy shape: an 11-byte header buffer, the entries in the pages after it
    assert [e[3] for e in c.readdir(1, 0, 3000, zc=True)] == names[:len(c.readdir(1, 0, 3000))]
    # the root's ".." is the root
    c.walk(0, 2)
    c.lopen(2)
    root = {e[3]: e[0].path for e in c.readdir_all(2)}
    assert root[b".."] == root[b"."] == os.stat(share).st_ino
    assert c.errno_of(wire.TREADDIR, struct.pack("<IQI", 0, 0, 100)) == errno.EBADF  # not open
    c.walk(0, 3, "hello.txt")
    c.lopen(3)
    assert c.errno_of(wire.TREADDIR, struct.pack("<IQI", 3, 0, 100)) == errno.ENOTDIR


def test_readlink_statfs(c: P9Driver, share: Path) -> None:
    for name, target in (("etc-abs", b"/etc"), ("link-in", b"hello.txt"), ("dir/etc-rel", b"../../../../../../etc")):
        c.walk(0, 1, *name.split("/"))
        assert c.readlink(1) == target
        c.clunk(1)
    c.walk(0, 1, "hello.txt")
    assert c.errno_of(wire.TREADLINK, struct.pack("<I", 1)) == errno.EINVAL
    kind, bsize, blocks, *_, namelen = c.statfs(0)
    s = os.statvfs(share)
    assert (kind, bsize, blocks, namelen) == (p9s.V9FS_MAGIC, s.f_bsize, s.f_blocks, s.f_namemax)


def test_xattrs_flush_lock(c: P9Driver) -> None:
    assert c.errno_of(wire.TXATTRWALK, struct.pack("<II", 0, 5) + _s(b"security.capability")) == errno.ENODATA
    assert c.errno_of(wire.TXATTRWALK, struct.pack("<II", 0, 5) + _s(b"")) == errno.EOPNOTSUPP
    assert c.errno_of(wire.TCLUNK, struct.pack("<I", 5)) == errno.EBADF  # no fid was made
    assert c.rpc(wire.TFLUSH, struct.pack("<H", 3)) == b""
    c.walk(0, 1, "hello.txt")
    c.lopen(1)
    assert c.rpc(wire.TLOCK, struct.pack("<IBIQQI", 1, 1, 0, 0, 0, 42) + _s(b"guest")) == b"\0"
    assert c.rpc(wire.TGETLOCK, struct.pack("<IBQQI", 1, 1, 0, 10, 42) + _s(b"guest")) \
        == struct.pack("<BQQI", 2, 0, 10, 42) + _s(b"guest")


# ---------------------------------------------------------------- changing


@pytest.mark.parametrize("zc", [False, True])
def test_create_write_land_on_disk(c: P9Driver, share: Path, zc: bool) -> None:
    c.walk(0, 1)
    q = c.lcreate(1, "new.bin", os.O_WRONLY, 0o640)
    assert q.kind == wire.QT_FILE
    payload = bytes(range(256)) * 200
    assert c.write(1, 0, payload[:30_000], zc=zc) == 30_000
    assert c.write(1, 30_000, payload[30_000:], zc=zc) == len(payload) - 30_000
    c.fsync(1)
    c.fsync(1, 1)
    c.clunk(1)
    assert (share / "new.bin").read_bytes() == payload
    assert stat.S_IMODE(os.stat(share / "new.bin").st_mode) == 0o640
    # lcreate on an existing regular file without EXCL opens it; with EXCL it is EEXIST
    c.walk(0, 1)
    c.lcreate(1, "new.bin", os.O_RDWR | os.O_TRUNC)
    assert c.read(1, 0, 100) == b""
    c.walk(0, 2)
    assert c.errno_of(wire.TLCREATE, struct.pack("<I", 2) + _s(b"new.bin")
                      + struct.pack("<III", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600, 0)) == errno.EEXIST
    # a write on a fid open read-only
    c.walk(0, 3, "hello.txt")
    c.lopen(3, os.O_RDONLY)
    assert c.errno_of(wire.TWRITE, struct.pack("<IQI", 3, 0, 1) + b"x") == errno.EBADF


def test_namespace_operations(c: P9Driver, share: Path) -> None:
    q = c.mkdir(0, "made", 0o750)
    assert q.kind == wire.QT_DIR and q.path == os.stat(share / "made").st_ino
    assert stat.S_IMODE(os.stat(share / "made").st_mode) == 0o750
    c.symlink(0, "sl", "made/../hello.txt")
    assert os.readlink(share / "sl") == "made/../hello.txt"
    c.walk(0, 1, "made")
    c.renameat(0, "hello.txt", 1, "moved.txt")
    assert (share / "made" / "moved.txt").read_bytes() == b"hello, guest\n" and not (share / "hello.txt").exists()
    c.walk(0, 2, "made", "moved.txt")
    c.link(0, 2, "hard")
    assert os.stat(share / "hard").st_ino == os.stat(share / "made" / "moved.txt").st_ino
    c.mknod(0, "fifo", stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(os.lstat(share / "fifo").st_mode)
    chr_null = struct.pack("<I", 0) + _s(b"null") + struct.pack("<IIII", stat.S_IFCHR | 0o666, 1, 3, 0)
    assert c.errno_of(wire.TMKNOD, chr_null) == errno.EPERM
    c.unlinkat(1, "moved.txt")
    c.unlinkat(0, "hard")
    not_rmdir = struct.pack("<I", 0) + _s(b"made") + struct.pack("<I", 0)
    assert c.errno_of(wire.TUNLINKAT, not_rmdir) in (errno.EISDIR, errno.EPERM)
    c.unlinkat(0, "made", p9s.AT_REMOVEDIR)
    assert not (share / "made").exists()
    # the fid on the removed file still reads it: fids are descriptors, not paths
    c.lopen(2)
    assert c.read(2, 0, 100) == b"hello, guest\n"


def test_setattr(c: P9Driver, share: Path) -> None:
    c.walk(0, 1, "big.bin")
    c.setattr(1, p9s.SETATTR_MODE, mode=0o600)
    assert stat.S_IMODE(os.stat(share / "big.bin").st_mode) == 0o600
    c.setattr(1, p9s.SETATTR_SIZE, size=1000)
    assert os.stat(share / "big.bin").st_size == 1000
    c.setattr(1, p9s.SETATTR_MTIME | p9s.SETATTR_MTIME_SET | p9s.SETATTR_ATIME | p9s.SETATTR_ATIME_SET,
              atime=(1_000_000, 5), mtime=(2_000_000, 7))
    st = os.stat(share / "big.bin")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000 * 10**9 + 5, 2_000_000 * 10**9 + 7)
    c.setattr(1, p9s.SETATTR_MTIME)  # now
    assert os.stat(share / "big.bin").st_mtime_ns > 2_000_000 * 10**9 + 7
    c.walk(0, 2, "dir")
    assert c.errno_of(wire.TSETATTR, struct.pack("<IIIIIQQQQQ", 2, p9s.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)) \
        == errno.EISDIR
    c.walk(0, 3, "etc-abs")
    assert c.errno_of(wire.TSETATTR, struct.pack("<IIIIIQQQQQ", 3, p9s.SETATTR_MODE, 0o777, 0, 0, 0, 0, 0, 0, 0)) \
        == errno.EOPNOTSUPP


# ---------------------------------------------------------------- confinement


def test_dotdot_at_root_stays_at_root(c: P9Driver, share: Path) -> None:
    root = os.stat(share).st_ino
    assert [q.path for q in c.walk(0, 1, "..", "..", "..")] == [root] * 3
    assert [q.path for q in c.walk(0, 2, "..", "..", "secret")] == [root, root]  # partial: no "secret" there
    with pytest.raises(Remote):
        c.walk(1, 2, "secret")  # the share's parent holds "secret": unreachable
    c.walk(0, 3, "dir", "sub", "..", "..", "..", "..")
    assert c.getattr(3)["ino"] == root


def test_symlinks_are_not_followed(c: P9Driver, share: Path) -> None:
    for link in (("etc-abs",), ("dir", "etc-rel"), ("link-in",)):
        qids = c.walk(0, 1, *link, "passwd")  # partial: stops at the symlink
        assert len(qids) == len(link) and qids[-1].kind == wire.QT_SYMLINK
        c.walk(0, 1, *link)
        assert c.errno_of(wire.TLOPEN, struct.pack("<II", 1, 0)) == errno.ELOOP
        assert c.errno_of(wire.TREADDIR, struct.pack("<IQI", 1, 0, 100)) == errno.EBADF
        assert c.errno_of(wire.TMKDIR, struct.pack("<I", 1) + _s(b"x") + struct.pack("<II", 0o755, 0)) == errno.ENOTDIR
        st = c.getattr(1)
        assert stat.S_ISLNK(st["mode"])  # the link itself, not /etc
        c.clunk(1)


@pytest.mark.parametrize("name", [b"a/../../secret", b"../secret", b"..", b".", b"", b"/etc", b"x\0y", b"x" * 256])
def test_names_are_single_components(c: P9Driver, share: Path, name: bytes) -> None:
    expect = errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL
    body = struct.pack("<I", 0) + _s(name)
    if name not in (b"..", b"."):
        assert c.errno_of(wire.TWALK, struct.pack("<IIH", 0, 1, 1) + _s(name)) == expect
    assert c.errno_of(wire.TMKDIR, body + struct.pack("<II", 0o755, 0)) == expect
    assert c.errno_of(wire.TUNLINKAT, body + struct.pack("<I", 0)) == expect
    assert c.errno_of(wire.TSYMLINK, body + _s(b"t") + struct.pack("<I", 0)) == expect
    assert c.errno_of(wire.TRENAMEAT, struct.pack("<I", 0) + _s(b"hello.txt") + body) == expect
    assert c.errno_of(wire.TRENAMEAT, body + struct.pack("<I", 0) + _s(b"x")) == expect
    c.walk(0, 1)
    assert c.errno_of(wire.TLCREATE, struct.pack("<I", 1) + _s(name) + struct.pack("<III", 2, 0o644, 0)) == expect
    assert (share / "hello.txt").exists() and (share.parent / "secret").read_bytes() == b"outside the share"
    assert sorted(os.listdir(share.parent)) == ["secret", "share"]


def test_rename_cannot_carry_anything_out(c: P9Driver, share: Path) -> None:
    """Hold a fid deep in the tree, move its directories around (inside: all a guest can do),
    then walk ``..`` as far as it goes: the root stops it wherever the directory went."""
    c.walk(0, 1, "dir", "sub")
    c.walk(0, 2, "dir")
    c.renameat(0, "dir", 0, "renamed")  # the fid follows its inode
    c.renameat(2, "sub", 0, "top")  # dir/sub -> top: fid 1's parent is now the root
    qids = c.walk(1, 3, "..", "..", "..", "..")
    assert {q.path for q in qids} == {os.stat(share).st_ino}
    c.walk(1, 4, "deep")
    c.lopen(4)
    assert c.read(4, 0, 10) == b"deep"
    # a symlink swapped in where a directory was: the fid still names the directory
    c.walk(0, 5, "renamed")
    os.rename(share / "renamed", share / "elsewhere")
    os.symlink("/etc", share / "renamed")
    assert c.getattr(5)["ino"] == os.stat(share / "elsewhere").st_ino
    with pytest.raises(Remote):
        c.walk(5, 6, "passwd")
    # the guest cannot rename the root or onto names outside it
    rename_dotdot = struct.pack("<I", 0) + _s(b"..") + struct.pack("<I", 0) + _s(b"x")
    assert c.errno_of(wire.TRENAMEAT, rename_dotdot) == errno.EINVAL
    assert c.errno_of(wire.TRENAMEAT, struct.pack("<I", 0) + _s(b"top") + struct.pack("<I", 0) + _s(b"../top")) \
        == errno.EINVAL
    assert sorted(os.listdir(share.parent)) == ["secret", "share"]


def test_device_nodes_and_fifos_are_never_opened(c: P9Driver, share: Path) -> None:
    os.mkfifo(share / "pipe")  # opening it for reading would block forever
    names = ["pipe"]
    try:
        os.mknod(share / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        names.append("null")
    except PermissionError:
        pass
    for name in names:
        c.walk(0, 1, name)
        assert stat.S_IFMT(c.getattr(1)["mode"]) == stat.S_IFMT(os.lstat(share / name).st_mode)
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            assert c.errno_of(wire.TLOPEN, struct.pack("<II", 1, flags)) == errno.EACCES
        c.walk(0, 2)
        assert c.errno_of(wire.TLCREATE, struct.pack("<I", 2) + _s(name.encode()) + struct.pack("<III", 2, 0o644, 0)) \
            == errno.EACCES
        assert c.errno_of(wire.TSETATTR, struct.pack("<IIIIIQQQQQ", 1, p9s.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)) \
            == errno.EINVAL  # as truncate(2) says of a non-regular file
        c.clunk(1)
        c.clunk(2)


def test_create_never_follows_a_symlink(c: P9Driver, share: Path) -> None:
    """A dangling symlink to a path outside, and one to a file outside: Tlcreate over either
    name neither creates nor opens anything out there."""
    outside = share.parent / "created-outside"
    os.symlink(outside, share / "dangling")
    os.symlink(share.parent / "secret", share / "to-secret")
    for name, flags in (("dangling", os.O_RDWR), ("to-secret", os.O_RDWR | os.O_TRUNC), ("to-secret", os.O_RDONLY)):
        c.walk(0, 1)
        create = struct.pack("<I", 1) + _s(name.encode()) + struct.pack("<III", flags, 0o644, 0)
        assert c.errno_of(wire.TLCREATE, create) == errno.ELOOP
        c.clunk(1)
    assert not outside.exists() and (share.parent / "secret").read_bytes() == b"outside the share"
    c.walk(0, 1, "to-secret")
    assert c.errno_of(wire.TSETATTR, struct.pack("<IIIIIQQQQQ", 1, p9s.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)) \
        == errno.EOPNOTSUPP
    assert c.errno_of(wire.TLINK, struct.pack("<II", 0, 1) + _s(b"hard")) == errno.EPERM
    assert (share.parent / "secret").read_bytes() == b"outside the share"


def test_mounts_inside_the_share_are_not_crossed(c: P9Driver, share: Path) -> None:
    """RESOLVE_NO_XDEV: a file system mounted inside the share is not part of it."""
    mnt = share / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "numavm-p9-test", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "inside-mount").write_bytes(b"other fs")
        assert c.errno_of(wire.TWALK, struct.pack("<IIH", 0, 1, 1) + _s(b"mnt")) == errno.EXDEV
        c.walk(0, 1)
        c.lopen(1)
        assert b"mnt" in [e[3] for e in c.readdir_all(1)]  # listed (its name is the share's), not entered
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@contextlib.contextmanager
def tmpfs_at(*where: Path) -> Iterator[None]:
    """A tmpfs mounted at each of `where` (root only), unmounted after."""
    done: list[Path] = []
    try:
        for w in where:
            w.mkdir(exist_ok=True)
            if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "numavm-p9-test", str(w)],
                                                   capture_output=True).returncode:
                pytest.skip("cannot mount a tmpfs here")
            done.append(w)
        yield
    finally:
        for w in reversed(done):
            subprocess.run(["umount", str(w)], check=True)


@pytest.fixture
def x(ram: SlotRam, share: Path) -> Iterator[P9Driver]:
    """A share whose server crosses mounts (the KVM engine's, numavm.vmm.kvm.machine)."""
    drv = p9_driver(ram, share, cross_mounts=True)
    drv.version()
    drv.attach(0)
    yield drv
    drv.dev.device.close()  # type: ignore[attr-defined]
    os.close(drv.root_fd)  # type: ignore[attr-defined]


def test_mounts_are_crossed_as_the_host_crosses_them(x: P9Driver, share: Path) -> None:
    """cross_mounts: a walk enters a file system mounted inside the share and reads it; ``..``
    from its root comes back to the mount point's parent, never above the share's root; two
    file systems whose roots have one inode number get distinct qid paths (the guest's inode
    numbers), as they would under QEMU's multidevs=remap."""
    a, b = share / "dir" / "mnt-a", share / "mnt-b"
    with tmpfs_at(a, b):
        (a / "in-a").write_bytes(b"file system a")
        (b / "in-b").write_bytes(b"file system b")
        assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_dev != os.stat(b).st_dev  # tmpfs roots
        qa = x.walk(0, 1, "dir", "mnt-a")[-1]
        qb = x.walk(0, 2, "mnt-b")[-1]
        assert qa.kind == qb.kind == wire.QT_DIR and qa.path != qb.path
        assert qa.path >> p9s.QID_INO_BITS and qb.path >> p9s.QID_INO_BITS  # not the share's own file system
        assert qa.path & ((1 << p9s.QID_INO_BITS) - 1) == os.stat(a).st_ino
        assert x.getattr(1)["ino"] == qa.path
        x.walk(1, 3, "in-a")
        x.lopen(3)
        assert x.read_all(3) == b"file system a"
        listed = {e[3]: e[0].path for e in (x.lopen(2), x.readdir_all(2))[1]}
        assert listed[b"in-b"] == x.walk(0, 4, "mnt-b", "in-b")[-1].path and listed[b"."] == qb.path
        # up and out of both mounts: the share's directories, then its root, then its root again
        up = x.walk(1, 5, "..", "..", "..", "..")
        assert [q.path for q in up] == [os.stat(share / "dir").st_ino] + [os.stat(share).st_ino] * 3
        assert x.walk(2, 6, "..")[-1].path == os.stat(share).st_ino
        for fid in (3, 4, 5, 6):
            x.clunk(fid)
        x.clunk(1)
        x.clunk(2)


def test_qid_paths_unique_past_the_prefix_bits(share: Path) -> None:
    """Inode numbers wider than QID_INO_BITS, and file systems past the prefixes, get numbers
    of their own: distinct, stable, and never one of a prefixed path; the table is bounded."""
    fd = open_root(share)
    try:
        srv = p9s.Server(fd, readonly=True, openat2=libc.openat2, cross_mounts=True)
        own = os.fstat(fd).st_dev
        assert srv.qid_path(own, 12345) == 12345 and srv.qid_path(own + 1, 12345) == 1 << p9s.QID_INO_BITS | 12345
        wide = 1 << 60
        p, q = srv.qid_path(own, wide), srv.qid_path(own, wide + 1)
        assert p != q and p >> 63 and q >> 63 and srv.qid_path(own, wide) == p
        srv._prefixes.update({-k: k for k in range(len(srv._prefixes), p9s.MAX_DEV_PREFIXES)})  # every prefix taken
        r = srv.qid_path(own + 99, 7)
        assert r >> 63 and r not in (p, q) and srv.qid_path(own + 99, 7) == r
        srv._exact.update({(-1, k): p9s.QID_EXACT | k for k in range(len(srv._exact), p9s.MAX_EXACT_QIDS)})
        h = srv.qid_path(own + 100, 8)
        assert h >> 62 == 3 and srv.qid_path(own + 100, 8) == h and len(srv._exact) == p9s.MAX_EXACT_QIDS
    finally:
        os.close(fd)


def test_a_root_share_keeps_proc_and_sys_apart() -> None:
    """The host's / as the root share serves it (read-only, crossing mounts): /proc, /sys and
    /dev are distinct directories to the guest, and ``..`` from any of them is the root."""
    ram = SlotRam([(0, SLOT), (SLOT, SLOT)])
    drv = p9_driver(ram, Path("/"), readonly=True, cross_mounts=True)
    try:
        drv.version()
        drv.attach(0)
        seen = {}
        for fid, name in enumerate(("proc", "sys", "dev"), 1):
            if not os.path.ismount(f"/{name}"):
                continue
            seen[name] = drv.walk(0, fid, name)[-1].path
            assert drv.walk(fid, 10, "..")[-1].path == os.stat("/").st_ino
            drv.clunk(10)
        assert len(set(seen.values())) == len(seen) >= 2, seen
        if "proc" in seen:  # /proc/self is a symlink the server does not follow: the walk stops at it
            qids = drv.walk(0, 11, "proc", "self", "fd")
            assert len(qids) == 2 and qids[-1].kind == wire.QT_SYMLINK and 11 not in drv.server.fids
    finally:
        drv.dev.device.close()  # type: ignore[attr-defined]
        os.close(drv.root_fd)  # type: ignore[attr-defined]


def test_append_appends_at_the_real_end(c: P9Driver, share: Path) -> None:
    c.walk(0, 1, "hello.txt")
    c.lopen(1, os.O_WRONLY | p9s.DOTL_APPEND)
    with open(share / "hello.txt", "ab") as f:  # the host grows the file behind the guest's back
        f.write(b"host\n")
    assert c.write(1, 13, b"guest\n") == 6  # the offset the guest believed was the end
    assert (share / "hello.txt").read_bytes() == b"hello, guest\nhost\nguest\n"


# ---------------------------------------------------------------- read-only


def test_readonly_refuses_every_change(ro: P9Driver, share: Path) -> None:
    before = {p: (p.lstat().st_mtime_ns, p.lstat().st_size) for p in share.rglob("*")}
    ro.walk(0, 1, "hello.txt")
    f = struct.pack("<I", 0)
    refused = [
        (wire.TLCREATE, f + _s(b"n") + struct.pack("<III", 2, 0o644, 0)),
        (wire.TWRITE, struct.pack("<IQI", 1, 0, 1) + b"x"),
        (wire.TSETATTR, struct.pack("<IIIIIQQQQQ", 1, 1, 0o777, 0, 0, 0, 0, 0, 0, 0)),
        (wire.TMKDIR, f + _s(b"d") + struct.pack("<II", 0o755, 0)),
        (wire.TMKNOD, f + _s(b"p") + struct.pack("<IIII", stat.S_IFIFO | 0o644, 0, 0, 0)),
        (wire.TUNLINKAT, f + _s(b"hello.txt") + struct.pack("<I", 0)),
        (wire.TRENAMEAT, f + _s(b"hello.txt") + f + _s(b"x")),
        (wire.TRENAME, struct.pack("<II", 1, 0) + _s(b"x")),
        (wire.TSYMLINK, f + _s(b"s") + _s(b"t") + struct.pack("<I", 0)),
        (wire.TLINK, struct.pack("<II", 0, 1) + _s(b"h")),
        (wire.TXATTRCREATE, struct.pack("<I", 1) + _s(b"user.x") + struct.pack("<QI", 1, 0)),
        (wire.TREMOVE, struct.pack("<I", 1)),
    ]
    for kind, body in refused:
        assert ro.errno_of(kind, body) == errno.EROFS, wire.NAMES[kind]
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert ro.errno_of(wire.TLOPEN, struct.pack("<II", 1, flags)) == errno.EROFS
    ro.lopen(1, os.O_RDONLY)
    assert ro.read(1, 0, 100) == b"hello, guest\n"
    ro.walk(0, 2, "dir")
    ro.lopen(2)
    assert len(ro.readdir_all(2)) == 2 + len(os.listdir(share / "dir"))
    assert before == {p: (p.lstat().st_mtime_ns, p.lstat().st_size) for p in share.rglob("*")}


# ---------------------------------------------------------------- hostile and malformed


def test_fid_table_is_bounded_and_released(ram: SlotRam, share: Path) -> None:
    fds = _open_fds()
    drv = p9_driver(ram, share, max_fids=8)
    drv.version()
    drv.attach(0)
    for fid in range(1, 8):
        drv.walk(0, fid, "dir")
    assert drv.errno_of(wire.TWALK, struct.pack("<IIH", 0, 8, 0)) == errno.ENFILE
    assert drv.errno_of(wire.TATTACH, struct.pack("<II", 9, wire.NOFID) + _s(b"") + _s(b"") + b"\0" * 4) == errno.ENFILE
    drv.clunk(7)
    drv.walk(0, 8)
    drv.lopen(8)
    drv.readdir(8, 0, 200)  # a listing in progress holds one more descriptor
    assert _open_fds() > fds + 8
    drv.set_status(0)  # device reset: the session and every fid's descriptor go
    assert _open_fds() == fds + 1  # the root, which the engine keeps
    os.close(drv.root_fd)  # type: ignore[attr-defined]


def test_unknown_and_malformed_messages(c: P9Driver) -> None:
    for kind in (0, 1, wire.TLERROR, wire.TAUTH, wire.TRENAME, 99, 111, 200, 255):
        assert c.errno_of(kind, b"\0" * 16) in (errno.EOPNOTSUPP, errno.EINVAL), kind
    # truncated bodies of every message the server knows
    for kind in wire.NAMES:
        if kind in (wire.TLERROR,):
            continue
        for body in (b"", b"\1"):
            with pytest.raises(Remote) as e:
                c.rpc(kind, body)
            assert e.value.errno in (errno.EINVAL, errno.EOPNOTSUPP), wire.NAMES[kind]
    # a string length past the message
    assert c.errno_of(wire.TWALK, struct.pack("<IIH", 0, 1, 1) + struct.pack("<H", 500) + b"abc") == errno.EINVAL
    assert c.errno_of(wire.TWALK, struct.pack("<IIH", 0, 1, 17) + _s(b"dir") * 17) == errno.EINVAL
    assert c.errno_of(wire.TWALK, struct.pack("<IIH", 0, 1, 0xFFFF)) == errno.EINVAL
    # a size field bigger than the buffers, or smaller than a header
    for size in (0, 6, 12, 0xFFFF_FFFF, MSIZE + 1):
        c.tag += 1
        reply = c.raw(struct.pack("<IBHI", size, wire.TCLUNK, c.tag, 0))
        assert reply[4] == wire.RLERROR and reply[5:7] == struct.pack("<H", c.tag)
        assert struct.unpack_from("<I", reply, 7)[0] in (errno.EINVAL, errno.EBADF)
    # a Twrite whose count claims more than the message carries writes what is there
    c.walk(0, 1)
    c.lcreate(1, "w")
    c.tag += 1
    msg = struct.pack("<IBHIQI", 23 + 3, wire.TWRITE, c.tag, 1, 0, 1 << 30) + b"abc"
    assert struct.unpack_from("<I", c.raw(msg), 7)[0] == 3
    # offsets past what the host takes
    assert c.errno_of(wire.TREAD, struct.pack("<IQI", 1, 1 << 63, 10)) == errno.EINVAL
    assert c.server.faults == []


def test_no_change_without_room_for_its_reply(c: P9Driver, share: Path) -> None:
    """A request whose reply could not be delivered is refused before it runs; the room Linux
    6.0+ gives each request (p9_msg_buf_size: its reply's own largest size, not msize) is
    enough.  Measured the hard way: Debian 12's guest got EMSGSIZE for every open when the
    server wanted room for any reply."""
    c.walk(0, 1)
    create = struct.pack("<I", 1) + _s(b"created") + struct.pack("<III", 2, 0o644, 0)
    for room in (11, 23):
        assert c.errno_of(wire.TLCREATE, create, room=room) == errno.EMSGSIZE
    for room in (11, 21):
        assert c.errno_of(wire.TWALK, struct.pack("<IIH", 0, 5, 1) + _s(b"dir"), room=room) == errno.EMSGSIZE
    assert c.errno_of(wire.TWALK, struct.pack("<IIH", 0, 5, 2) + _s(b"dir") + _s(b"sub"), room=34) == errno.EMSGSIZE
    assert not (share / "created").exists() and 5 not in c.server.fids
    # Linux's sizes: Rlcreate 24, Rwalk 9 + 13n, Runlinkat an Rlerror's 11, Rgetattr 160, Rlopen 24, Rclunk 11
    assert _qid(c.rpc(wire.TLCREATE, create, room=24)).kind == wire.QT_FILE and (share / "created").exists()
    assert len(c.rpc(wire.TWALK, struct.pack("<IIH", 0, 5, 2) + _s(b"dir") + _s(b"sub"), room=35)) == 2 + 26
    c.rpc(wire.TUNLINKAT, struct.pack("<I", 0) + _s(b"created") + b"\0" * 4, room=11)
    assert not (share / "created").exists()
    c.rpc(wire.TGETATTR, struct.pack("<IQ", 5, p9s.STATS_BASIC), room=160)
    c.walk(0, 2, "hello.txt")
    c.rpc(wire.TLOPEN, struct.pack("<II", 2, 0), room=24)
    assert c.rpc(wire.TREAD, struct.pack("<IQI", 2, 0, 100), 11 + 5)[4:] == b"hello"  # reads fit what there is
    c.rpc(wire.TCLUNK, struct.pack("<I", 2), room=11)
    assert max(p9s.REPLY_ROOM.values()) <= p9s.MAX_REPLY_ROOM


def test_chains_that_cannot_carry_a_reply_are_device_errors(ram: SlotRam, share: Path) -> None:
    for bufs in ([(REQ_AT, 5, False), (RESP_AT, 100, True)], [(REQ_AT, 64, False)],
                 [(REQ_AT, 64, False), (RESP_AT, 10, True)]):
        drv = p9_driver(ram, share)
        ram.write(REQ_AT, wire.message(wire.TVERSION, 0xFFFF, struct.pack("<I", MSIZE) + _s(b"9P2000.L")))
        head = drv.chain(0, bufs)
        drv.offer(0, head)
        drv.kick()
        needs_reset(drv)
        os.close(drv.root_fd)  # type: ignore[attr-defined]


_NAME = st.sampled_from([b"dir", b"hello.txt", b"new", b"..", b".", b"etc-abs", b"a/b", b"", b"sub"])
_MESSAGE = st.tuples(
    st.sampled_from(sorted(wire.NAMES) + [7, 101, 127]),
    st.one_of(
        st.binary(max_size=80),  # anything at all
        # a fid the session has (0..3) or not, then names and numbers: the shapes the server parses
        st.tuples(st.integers(0, 5), st.lists(st.one_of(_NAME.map(lambda n: struct.pack("<H", len(n)) + n),
                                                        st.binary(min_size=4, max_size=8)), max_size=5))
        .map(lambda t: struct.pack("<I", t[0]) + b"".join(t[1])),
    ),
    st.one_of(st.integers(11, 300), st.just(4096)),  # reply room: tight, or what Linux gives
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=st.lists(_MESSAGE, min_size=1, max_size=6))
def test_any_messages_get_replies_and_release_everything(messages: list[tuple[int, bytes, int]]) -> None:
    """Random messages of every type over a live session (fids on the root, a directory, an
    open file), random reply room: each gets a well-formed reply with its tag, or Rlerror; no
    server fault, no device error; nothing outside the share changes; a device reset then
    gives back every descriptor the session held."""
    with tempfile.TemporaryDirectory(prefix="numavm-p9-") as d:  # a fresh tree: messages may change it
        share = Path(d) / "share"
        share.mkdir()
        (Path(d) / "secret").write_bytes(b"outside the share")
        make_tree(share, entries=3)
        _any_messages(share, messages)


def _any_messages(share: Path, messages: list[tuple[int, bytes, int]]) -> None:
    ram = SlotRam([(0, SLOT), (SLOT, SLOT)])
    fds = _open_fds()
    drv = p9_driver(ram, share)
    try:
        drv.version()
        drv.attach(0)
        drv.walk(0, 1, "dir")
        drv.walk(0, 2, "hello.txt")
        drv.lopen(2)
        drv.walk(0, 3)
        for i, (kind, body, room) in enumerate(messages):
            tag = 100 + i
            reply = drv.raw(wire.message(kind, tag, body), room)
            size, rkind, rtag = wire.HEADER.unpack_from(reply)
            assert size == len(reply) <= room and rtag == tag
            assert rkind in (wire.RLERROR, kind + 1)
            assert drv.server.faults == []
            assert not drv.status() & vpci.STATUS_DEVICE_NEEDS_RESET
        assert (share.parent / "secret").read_bytes() == b"outside the share"
        assert sorted(os.listdir(share.parent)) == ["secret", "share"]
        drv.set_status(0)
        assert _open_fds() == fds + 1  # the root descriptor, which is the caller's
    finally:
        drv.dev.device.close()  # type: ignore[attr-defined]
        os.close(drv.root_fd)  # type: ignore[attr-defined]


def _inodes(root: Path) -> set[int]:
    out = {os.lstat(root).st_ino}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.lstat(os.path.join(dirpath, n)).st_ino)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(walks=st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.lists(st.sampled_from(
    ["..", ".", "dir", "sub", "deep", "etc-abs", "etc-rel", "link-in", "secret", "share", "etc", "passwd",
     "hello.txt"]), max_size=6)), min_size=1, max_size=12))
def test_every_walk_stays_inside(c: P9Driver, share: Path, walks: list[tuple[int, list[str]]]) -> None:
    """Any sequence of walks, from any fid, with ``..``, ``.``, symlinks and names of things
    outside: every qid the server returns and every fid it makes is an inode of the share."""
    inside = _inodes(share)
    for fid in (1, 2):
        if fid in c.server.fids:
            c.clunk(fid)
        c.walk(0, fid)
    for src, names in walks:
        try:
            qids = c.walk(src, 3, *names)
        except Remote:
            continue
        assert {q.path for q in qids} <= inside
        if len(qids) == len(names):  # fid 3 was made
            assert c.getattr(3)["ino"] in inside
            if src:  # fid 1 or 2 moves there: later walks go on from where this one ended
                c.clunk(src)
                c.walk(3, src)
            c.clunk(3)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(walks=st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.lists(st.sampled_from(
    ["..", ".", "dir", "mnt", "inner", "out-link", "sub", "deep", "secret", "share", "etc", "hello.txt"]),
    max_size=6)), min_size=1, max_size=12))
def test_every_walk_stays_inside_across_mounts(x: P9Driver, share: Path, walks: list[tuple[int, list[str]]]) -> None:
    """test_every_walk_stays_inside for a server that crosses mounts, with a file system mounted
    at dir/mnt (holding a directory and a symlink out): every qid is one of the share's files,
    its mount's included, and ``..`` out of the mount lands in dir, never above the root."""
    mnt = share / "dir" / "mnt"
    with tmpfs_at(mnt):
        (mnt / "inner").mkdir(exist_ok=True)
        (mnt / "inner" / "deep").write_bytes(b"in the mount")
        if not (mnt / "out-link").is_symlink():
            os.symlink("../../../secret", mnt / "out-link")
        inside = {x.server.qid_path(st.st_dev, st.st_ino) for st in
                  [os.lstat(share)] + [os.lstat(os.path.join(d, n)) for d, ds, fs in os.walk(share)
                                       for n in ds + fs]}
        for fid in (1, 2):
            if fid in x.server.fids:
                x.clunk(fid)
        x.walk(0, 1, "dir", "mnt")
        x.walk(0, 2, "dir", "mnt", "inner")
        for src, names in walks:
            try:
                qids = x.walk(src, 3, *names)
            except Remote:
                continue
            assert {q.path for q in qids} <= inside
            if len(qids) == len(names):
                assert x.getattr(3)["ino"] in inside
                x.clunk(3)
        for fid in (1, 2):
            x.clunk(fid)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(counts=st.lists(st.integers(80, 3000), min_size=1, max_size=8))
def test_readdir_pages_any_sizes(c: P9Driver, share: Path, counts: list[int]) -> None:
    """Replies of any sizes that hold the longest entry (24 + 50 bytes here; an empty reply is
    the end of the directory in 9P) page through the listing: nothing lost, nothing repeated."""
    c.walk(0, 9, "dir")
    try:
        c.lopen(9)
        expect = sorted([b".", b".."] + [os.fsencode(n) for n in os.listdir(share / "dir")])
        got: list[bytes] = []
        offset, i = 0, 0
        while batch := c.readdir(9, offset, counts[i % len(counts)]):
            got += [e[3] for e in batch]
            offset = batch[-1][1]
            i += 1
        assert sorted(got) == expect
    finally:
        c.clunk(9)


_FILES = ["f0", "f1", "d0", "d0/f2"]


def _model_apply(root: Path, op: tuple) -> int:  # type: ignore[type-arg]
    """The operation done directly on the host: 0, or the errno it failed with."""
    try:
        kind, name = op[0], root / op[1]
        if kind == "write":
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.pwrite(fd, op[3], op[2])
            finally:
                os.close(fd)
        elif kind == "truncate":
            os.truncate(name, op[2])
        elif kind == "rename":
            os.rename(name, root / op[2])
        elif kind == "unlink":
            os.unlink(name)
        elif kind == "rmdir":
            os.rmdir(name)
        elif kind == "mkdir":
            os.mkdir(name, 0o755)
        return 0
    except OSError as e:
        return e.errno or -1


def _p9_apply(c: P9Driver, op: tuple) -> int:  # type: ignore[type-arg]
    """The same operation as v9fs would send it: walk to the parent, then the message."""
    kind, path = op[0], op[1].split("/")
    parent, name = path[:-1], path[-1]
    try:
        c.walk(0, 10, *parent)
        try:
            if kind == "write":
                try:
                    c.walk(10, 11, name)
                except Remote as e:
                    if e.errno != errno.ENOENT:
                        raise
                    c.walk(10, 11)
                    create = True
                else:
                    create = False
                try:
                    if create:
                        c.lcreate(11, name, os.O_WRONLY, 0o644)
                    else:
                        c.lopen(11, os.O_WRONLY)
                    data, at = op[3], 0
                    while at < len(data):
                        at += c.write(11, op[2] + at, data[at:at + 20_000])
                finally:
                    c.clunk(11)
            elif kind == "truncate":
                c.walk(10, 11, name)
                try:
                    c.setattr(11, p9s.SETATTR_SIZE, size=op[2])
                finally:
                    c.clunk(11)
            elif kind == "rename":
                new = op[2].split("/")
                c.walk(0, 11, *new[:-1])
                try:
                    c.renameat(10, name, 11, new[-1])
                finally:
                    c.clunk(11)
            elif kind == "unlink":
                c.unlinkat(10, name)
            elif kind == "rmdir":
                c.unlinkat(10, name, p9s.AT_REMOVEDIR)
            elif kind == "mkdir":
                c.mkdir(10, name, 0o755)
        finally:
            c.clunk(10)
        return 0
    except Remote as e:
        return e.errno


def _tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


_OP = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(_FILES), st.integers(0, 70_000),
              st.binary(min_size=1, max_size=50_000)),
    st.tuples(st.just("truncate"), st.sampled_from(_FILES), st.integers(0, 100_000)),
    st.tuples(st.just("rename"), st.sampled_from(_FILES), st.sampled_from(_FILES)),
    st.tuples(st.sampled_from(["unlink", "rmdir", "mkdir"]), st.sampled_from(_FILES)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(_OP, min_size=1, max_size=10))
def test_changes_match_the_same_calls_on_the_host(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """Writes at any offsets, truncates, renames, unlinks, mkdirs through 9P land exactly as the
    same calls made directly on a twin directory: same results (or errno), same tree, same bytes,
    and what 9P reads back is what is on disk."""
    with tempfile.TemporaryDirectory(prefix="numavm-p9-") as d:
        share, twin = Path(d) / "share", Path(d) / "twin"
        share.mkdir()
        twin.mkdir()
        ram = SlotRam([(0, SLOT), (SLOT, SLOT)])
        drv = p9_driver(ram, share)
        try:
            drv.version()
            drv.attach(0)
            for op in ops:
                result = _p9_apply(drv, op)
                assert result == _model_apply(twin, op), op
                event(f"{op[0]}: {errno.errorcode.get(result, 'ok')}")
            tree = _tree(share)
            assert tree == _tree(twin)
            for rel, data in tree.items():
                if data is not None:
                    drv.walk(0, 12, *rel.split("/"))
                    drv.lopen(12)
                    assert drv.read_all(12, 30_000) == data
                    drv.clunk(12)
            assert drv.server.faults == []
        finally:
            drv.dev.device.close()  # type: ignore[attr-defined]
            os.close(drv.root_fd)  # type: ignore[attr-defined]
