"""9P2000.L on the wire: message numbers, the fixed header, a checked decoder, an encoder.

A message is ``size[4] type[1] tag[2]`` and a body; integers are little-endian, a string is
``len[2]`` and that many bytes (no NUL), a qid is ``type[1] version[4] path[8]``.  The numbers
are Linux's (include/net/9p/9p.h), which is what v9fs sends; a reply's type is its request's
plus one.

Everything the guest wrote is read through `Decoder`, which checks each field against the bytes
actually there: a length that runs past the message is `Malformed` (answered EINVAL), never an
IndexError or a short slice taken for data.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "Malformed", "Decoder", "Encoder", "HEADER", "HEADER_SIZE", "QID_SIZE", "NOTAG", "NOFID",
    "QT_DIR", "QT_SYMLINK", "QT_FILE", "VERSION_9P2000_L", "NAMES",
]

HEADER: Final = struct.Struct("<IBH")  # size, type, tag
HEADER_SIZE: Final = HEADER.size  # 7
QID: Final = struct.Struct("<BIQ")
QID_SIZE: Final = QID.size  # 13
NOTAG: Final = 0xFFFF
NOFID: Final = 0xFFFF_FFFF
VERSION_9P2000_L: Final = b"9P2000.L"

QT_DIR: Final = 0x80
QT_SYMLINK: Final = 0x02
QT_FILE: Final = 0x00

# request types (the reply is +1); 9P2000.L first, then the 9P2000 base messages it keeps
TLERROR, RLERROR = 6, 7
TSTATFS = 8
TLOPEN = 12
TLCREATE = 14
TSYMLINK = 16
TMKNOD = 18
TRENAME = 20
TREADLINK = 22
TGETATTR = 24
TSETATTR = 26
TXATTRWALK = 30
TXATTRCREATE = 32
TREADDIR = 40
TFSYNC = 50
TLOCK = 52
TGETLOCK = 54
TLINK = 70
TMKDIR = 72
TRENAMEAT = 74
TUNLINKAT = 76
TVERSION = 100
TAUTH = 102
TATTACH = 104
TFLUSH = 108
TWALK = 110
TREAD = 116
TWRITE = 118
TCLUNK = 120
TREMOVE = 122

NAMES: Final = {v: k for k, v in dict(globals()).items() if k.startswith("T") and isinstance(v, int)}


class Malformed(ValueError):
    """A message whose fields do not fit its bytes (or make no sense): answered EINVAL."""


class Decoder:
    """Fields of one message body, each checked against the bytes left."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def _take(self, n: int) -> int:
        at = self.pos
        if at + n > len(self.data):
            raise Malformed(f"field of {n} bytes at {at} runs past the message's {len(self.data)}")
        self.pos = at + n
        return at

    def u8(self) -> int:
        return self.data[self._take(1)]

    def u16(self) -> int:
        return int.from_bytes(self.data[(at := self._take(2)):at + 2], "little")

    def u32(self) -> int:
        return int.from_bytes(self.data[(at := self._take(4)):at + 4], "little")

    def u64(self) -> int:
        return int.from_bytes(self.data[(at := self._take(8)):at + 8], "little")

    def string(self) -> bytes:
        n = self.u16()
        at = self._take(n)
        return bytes(self.data[at:at + n])

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


class Encoder:
    """A reply body, built field by field."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> Encoder:
        self.buf.append(v & 0xFF)
        return self

    def u16(self, v: int) -> Encoder:
        self.buf += (v & 0xFFFF).to_bytes(2, "little")
        return self

    def u32(self, v: int) -> Encoder:
        self.buf += (v & 0xFFFF_FFFF).to_bytes(4, "little")
        return self

    def u64(self, v: int) -> Encoder:
        self.buf += (v & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        return self

    def string(self, s: bytes) -> Encoder:
        if len(s) > 0xFFFF:
            raise Malformed(f"string of {len(s)} bytes does not fit a 9P string")
        self.u16(len(s))
        self.buf += s
        return self

    def qid(self, qid: bytes) -> Encoder:
        self.buf += qid
        return self

    def bytes(self) -> bytes:
        return bytes(self.buf)


def qid(kind: int, version: int, path: int) -> bytes:
    return QID.pack(kind, version & 0xFFFF_FFFF, path & 0xFFFF_FFFF_FFFF_FFFF)


def message(kind: int, tag: int, body: bytes = b"") -> bytes:
    """A whole message: header (size counts itself) and body."""
    return HEADER.pack(HEADER_SIZE + len(body), kind, tag) + body
