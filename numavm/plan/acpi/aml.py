"""A tiny AML encoder: just what numavm's DSDT needs.

Every function returns the encoded bytes of one AML term (ACPI 6.x, chapter
20, "ACPI Machine Language Specification"), so terms compose by passing bytes
to bytes.  Resource descriptors (chapter 6.4) are here too, because a
`ResourceTemplate` is an AML Buffer of them.
"""

from __future__ import annotations

import re
import struct

# Opcodes (ACPI 6.x, 20.3 "AML Byte Stream Byte Values").
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'

# Small resource descriptor tags (6.4.2): (item name << 3) | length.
_IRQ_NO_FLAGS_TAG = 0x04 << 3 | 2  # IRQ descriptor, 2-byte form (no flags byte)
_IO_PORT_TAG = 0x08 << 3 | 7
_END_TAG = 0x0F << 3 | 1
# Large resource descriptors (6.4.3): tag byte 0x80 | item name, then a 16-bit length.
_MEMORY32_FIXED_TAG = 0x86
_DWORD_ADDRESS_TAG = 0x87
_WORD_ADDRESS_TAG = 0x88
_RESOURCE_MEMORY = 0  # address space descriptors' resource type
_RESOURCE_BUS_NUMBER = 2
# General flags of an address space descriptor (6.4.3.5): a bridge produces its windows, and
# both ends are fixed ("ResourceProducer, MinFixed, MaxFixed, PosDecode")
_ADDR_MIN_FIXED = 1 << 2
_ADDR_MAX_FIXED = 1 << 3
_MEM_READ_WRITE = 1  # memory type-specific flags bit 0; bits 1-2 0 = NonCacheable

_NAME_SEG_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")
_EISA_RE = re.compile(r"^[A-Z]{3}[0-9A-F]{4}$")

MAX_PKG_LENGTH = (1 << 28) - 1


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of `body_len` bytes; the value counts itself too."""
    if body_len < 0:
        raise ValueError(f"negative length {body_len}")
    if body_len + 1 < 1 << 6:
        return bytes((body_len + 1,))
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = extra << 6 | (total & 0x0F)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes((lead,)) + rest
    raise ValueError(f"AML package of {body_len} bytes exceeds {MAX_PKG_LENGTH}")


def with_pkg_length(body: bytes) -> bytes:
    return pkg_length(len(body)) + body


def name_seg(seg: str) -> bytes:
    """One 4-character NameSeg; shorter names are padded with '_'."""
    if not _NAME_SEG_RE.match(seg):
        raise ValueError(f"bad AML NameSeg {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString: ``\_SB_.COM1``, ``^FOO``, ``_HID``; segments joined by '.'."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = b"\\", rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + b"^", rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + b"\x00"  # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes((DUAL_NAME_PREFIX,)) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"AML name path {path!r} has too many segments")
    return prefix + bytes((MULTI_NAME_PREFIX, len(segs))) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest ComputationalData for an unsigned integer."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer out of range: {value}")
    if value == 0:
        return bytes((ZERO_OP,))
    if value == 1:
        return bytes((ONE_OP,))
    if value == (1 << 64) - 1:
        return bytes((ONES_OP,))
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32), (QWORD_PREFIX, "<Q", 1 << 64)):
        if value < limit:
            return bytes((prefix,)) + struct.pack(fmt, value)
    raise AssertionError("unreachable")


def dword(value: int) -> bytes:
    """An integer forced into DWordConst form (as EisaId() compiles)."""
    return bytes((DWORD_PREFIX,)) + struct.pack("<I", value)


def string(text: str) -> bytes:
    data = text.encode("ascii")
    if b"\x00" in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes((STRING_PREFIX,)) + data + b"\x00"


def buffer(data: bytes) -> bytes:
    return bytes((BUFFER_OP,)) + with_pkg_length(integer(len(data)) + data)


def package(*elements: bytes) -> bytes:
    """Package of already-encoded elements (at most 255)."""
    if len(elements) > 255:
        raise ValueError("Package holds at most 255 elements (VarPackage not supported)")
    return bytes((PACKAGE_OP,)) + with_pkg_length(bytes((len(elements),)) + b"".join(elements))


def name(path: str, value: bytes) -> bytes:
    return bytes((NAME_OP,)) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    return bytes((SCOPE_OP,)) + with_pkg_length(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    return bytes((EXT_OP_PREFIX, DEVICE_OP)) + with_pkg_length(name_string(path) + b"".join(terms))


def method(path: str, nargs: int, *terms: bytes, serialized: bool = False, sync_level: int = 0) -> bytes:
    if not 0 <= nargs <= 7 or not 0 <= sync_level <= 15:
        raise ValueError("Method: 0..7 arguments, sync level 0..15")
    flags = nargs | (0x08 if serialized else 0) | sync_level << 4
    return bytes((METHOD_OP,)) + with_pkg_length(name_string(path) + bytes((flags,)) + b"".join(terms))


def return_(value: bytes) -> bytes:
    return bytes((RETURN_OP,)) + value


def eisa_id_value(text: str) -> int:
    """The 32-bit compressed EISA id of e.g. ``PNP0501`` (0x0105D041)."""
    if not _EISA_RE.match(text):
        raise ValueError(f"bad EISA id {text!r} (three letters A-Z, four hex digits)")
    vendor = 0
    for ch in text[:3]:
        vendor = vendor << 5 | (ord(ch) - 0x40)
    product = int(text[3:], 16)
    # stored big-endian: vendor high byte first, then product high byte
    return int.from_bytes(vendor.to_bytes(2, "big") + product.to_bytes(2, "big"), "little")


def eisa_id(text: str) -> bytes:
    return dword(eisa_id_value(text))


# ---------------------------------------------------------------- resources


def io_port(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """I/O Port descriptor (6.4.2.5), 8 bytes: ``IO (Decode16, min, max, align, len)``."""
    if not (0 <= minimum <= 0xFFFF and 0 <= maximum <= 0xFFFF and 0 <= alignment <= 0xFF
            and 0 <= length <= 0xFF):
        raise ValueError("IO descriptor field out of range")
    out = struct.pack("<BBHHBB", _IO_PORT_TAG, 1 if decode16 else 0, minimum, maximum, alignment, length)
    assert len(out) == 8
    return out


def irq_no_flags(*irqs: int) -> bytes:
    """IRQ descriptor without the flags byte (6.4.2.1): edge, active high, exclusive."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQ descriptor holds IRQs 0..15, got {irq}")
        mask |= 1 << irq
    out = struct.pack("<BH", _IRQ_NO_FLAGS_TAG, mask)
    assert len(out) == 3
    return out


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """32-bit Fixed Memory Range descriptor (6.4.3.4), 12 bytes: ``Memory32Fixed (ReadWrite, base, len)``."""
    if not (0 <= base < 1 << 32 and 0 <= length < 1 << 32 and base + length <= 1 << 32):
        raise ValueError("Memory32Fixed: a range below 4 GiB")
    out = struct.pack("<BHBII", _MEMORY32_FIXED_TAG, 9, 1 if writable else 0, base, length)
    assert len(out) == 12
    return out


def word_bus_number(first: int, last: int) -> bytes:
    """Word Address Space Descriptor for bus numbers (6.4.3.5.3), 16 bytes:
    ``WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, count)``."""
    if not 0 <= first <= last <= 0xFF:
        raise ValueError(f"bus numbers 0..255, first <= last, got {first}..{last}")
    out = struct.pack("<BHBBBHHHHH", _WORD_ADDRESS_TAG, 13, _RESOURCE_BUS_NUMBER,
                      _ADDR_MIN_FIXED | _ADDR_MAX_FIXED, 0, 0, first, last, 0, last - first + 1)
    assert len(out) == 16
    return out


def dword_memory(start: int, end: int) -> bytes:
    """DWord Address Space Descriptor for memory (6.4.3.5.2), 26 bytes: a bridge's window
    [start, end): ``DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    ReadWrite, 0, start, end - 1, 0, end - start)``."""
    if not 0 <= start < end <= 1 << 32:
        raise ValueError(f"DWordMemory: a non-empty window below 4 GiB, got {start:#x}-{end:#x}")
    out = struct.pack("<BHBBBIIIII", _DWORD_ADDRESS_TAG, 23, _RESOURCE_MEMORY, _ADDR_MIN_FIXED | _ADDR_MAX_FIXED,
                      _MEM_READ_WRITE, 0, start, end - 1, 0, end - start)
    assert len(out) == 26
    return out


def end_tag(descriptors: bytes) -> bytes:
    """End Tag (6.4.2.9) whose checksum makes the whole template sum to zero."""
    head = bytes((_END_TAG,))
    return head + bytes(((-sum(descriptors + head)) & 0xFF,))


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate () {...}``: a Buffer of descriptors plus the End Tag."""
    body = b"".join(descriptors)
    return buffer(body + end_tag(body))
