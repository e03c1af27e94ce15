"""bzImage parsing per the x86 boot protocol (Documentation/arch/x86/boot.rst).

A bzImage is: the real-mode setup (``setup_sects + 1`` sectors of 512 bytes,
the setup header at 0x1F1 inside it), then the 32/64-bit protected-mode part,
which is the kernel's own decompressor with the compressed ``vmlinux`` ELF
embedded at ``payload_offset`` (relative to the protected-mode part) for
``payload_length`` bytes.  numavm unpacks that payload on the host and loads
the ELF itself: the in-guest decompressor is slow on hosts whose KVM emulates
guest code (~100 KB/s measured), and the 64-bit ELF entry needs no real-mode or
decompressor stage at all.

The kernel build appends the uncompressed size as a little-endian u32 after
every compressed stream (``size_append`` in scripts/Makefile.lib), and
``payload_length`` counts it; the decoders here stop at the end of the stream
and check that trailer when it is there.
"""

from __future__ import annotations

import bz2
import ctypes
import importlib
import lzma
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

from numavm.errors import NumavmError

SETUP_HEADER_OFFSET = 0x1F1
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4 (boot.rst)
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS" read as a little-endian u32
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, the 64-bit entry, ext_* fields

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6


class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header`` (arch/x86/include/uapi/asm/bootparam.h).

    Field comments give the offset inside the bzImage / zero page; the
    structure itself starts at 0x1F1.
    """

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),         # 0x1F1
        ("root_flags", ctypes.c_uint16),         # 0x1F2
        ("syssize", ctypes.c_uint32),            # 0x1F4
        ("ram_size", ctypes.c_uint16),           # 0x1F8
        ("vid_mode", ctypes.c_uint16),           # 0x1FA
        ("root_dev", ctypes.c_uint16),           # 0x1FC
        ("boot_flag", ctypes.c_uint16),          # 0x1FE
        ("jump", ctypes.c_uint16),               # 0x200
        ("header", ctypes.c_uint32),             # 0x202
        ("version", ctypes.c_uint16),            # 0x206
        ("realmode_swtch", ctypes.c_uint32),     # 0x208
        ("start_sys_seg", ctypes.c_uint16),      # 0x20C
        ("kernel_version", ctypes.c_uint16),     # 0x20E
        ("type_of_loader", ctypes.c_uint8),      # 0x210
        ("loadflags", ctypes.c_uint8),           # 0x211
        ("setup_move_size", ctypes.c_uint16),    # 0x212
        ("code32_start", ctypes.c_uint32),       # 0x214
        ("ramdisk_image", ctypes.c_uint32),      # 0x218
        ("ramdisk_size", ctypes.c_uint32),       # 0x21C
        ("bootsect_kludge", ctypes.c_uint32),    # 0x220
        ("heap_end_ptr", ctypes.c_uint16),       # 0x224
        ("ext_loader_ver", ctypes.c_uint8),      # 0x226
        ("ext_loader_type", ctypes.c_uint8),     # 0x227
        ("cmd_line_ptr", ctypes.c_uint32),       # 0x228
        ("initrd_addr_max", ctypes.c_uint32),    # 0x22C
        ("kernel_alignment", ctypes.c_uint32),   # 0x230
        ("relocatable_kernel", ctypes.c_uint8),  # 0x234
        ("min_alignment", ctypes.c_uint8),       # 0x235
        ("xloadflags", ctypes.c_uint16),         # 0x236
        ("cmdline_size", ctypes.c_uint32),       # 0x238
        ("hardware_subarch", ctypes.c_uint32),   # 0x23C
        ("hardware_subarch_data", ctypes.c_uint64),  # 0x240
        ("payload_offset", ctypes.c_uint32),     # 0x248
        ("payload_length", ctypes.c_uint32),     # 0x24C
        ("setup_data", ctypes.c_uint64),         # 0x250
        ("pref_address", ctypes.c_uint64),       # 0x258
        ("init_size", ctypes.c_uint32),          # 0x260
        ("handover_offset", ctypes.c_uint32),    # 0x264
        ("kernel_info_offset", ctypes.c_uint32),  # 0x268
    ]

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


SETUP_HEADER_END = 0x26C
assert ctypes.sizeof(SetupHeader) == SETUP_HEADER_END - SETUP_HEADER_OFFSET
for _name, _off in (("boot_flag", 0x1FE), ("header", 0x202), ("version", 0x206),
                    ("loadflags", 0x211), ("cmd_line_ptr", 0x228),
                    ("initrd_addr_max", 0x22C), ("kernel_alignment", 0x230),
                    ("relocatable_kernel", 0x234), ("xloadflags", 0x236),
                    ("cmdline_size", 0x238), ("payload_offset", 0x248),
                    ("payload_length", 0x24C), ("pref_address", 0x258),
                    ("init_size", 0x260), ("kernel_info_offset", 0x268)):
    assert getattr(SetupHeader, _name).offset == _off - SETUP_HEADER_OFFSET, _name


def header_length(image: bytes | memoryview) -> int:
    """Bytes of setup header the image defines: 0x1F1 up to 0x202 + byte[0x201].

    byte[0x201] is the displacement of the short jump at 0x200, which skips
    exactly the header (boot.rst: "copy the setup header ... from 0x01f1 to
    0x0202 + the value of byte 0x0201"); capped at the fields known here.
    """
    end = 0x202 + image[0x201]
    return max(0, min(end, SETUP_HEADER_END) - SETUP_HEADER_OFFSET)


@dataclass(frozen=True)
class BzImage:
    header: SetupHeader  # a copy; fields past `header_len` are zero
    header_len: int  # bytes of header the image defines, from 0x1F1
    setup_size: int  # real-mode part: (setup_sects + 1) * 512
    payload: memoryview  # the compressed vmlinux, trailing size u32 included

    @property
    def compression(self) -> str:
        return payload_format(self.payload)


def is_bzimage(data: bytes | memoryview) -> bool:
    return (len(data) >= SETUP_HEADER_END
            and struct.unpack_from("<H", data, 0x1FE)[0] == BOOT_FLAG
            and struct.unpack_from("<I", data, 0x202)[0] == HDRS_MAGIC)


def parse_bzimage(data: bytes | memoryview, name: str = "kernel") -> BzImage:
    """Check the setup header and locate the compressed payload.

    `name` (usually the file path) only appears in error messages.
    """
    view = memoryview(data).cast("B")
    if len(view) < SETUP_HEADER_END:
        raise NumavmError(f"{name}: {len(view)} bytes is too short for a bzImage")
    hdr = SetupHeader.from_buffer_copy(bytes(view[SETUP_HEADER_OFFSET:SETUP_HEADER_END]))
    if hdr.boot_flag != BOOT_FLAG or hdr.header != HDRS_MAGIC:
        raise NumavmError(f"{name}: not a bzImage (no 0xAA55 boot flag and 'HdrS' header)")
    if hdr.version < MIN_PROTOCOL:
        raise NumavmError(f"{name}: boot protocol {hdr.version_str} is too old; "
                          "numavm needs 2.12 or later (Linux 3.8+)")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise NumavmError(f"{name}: not a 64-bit kernel (xloadflags lacks XLF_KERNEL_64)")
    hlen = header_length(view)
    # Zero whatever the image does not define (older minor versions).
    raw = bytes(view[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + hlen])
    hdr = SetupHeader.from_buffer_copy(raw.ljust(ctypes.sizeof(SetupHeader), b"\0"))
    setup_size = ((hdr.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE
    start = setup_size + hdr.payload_offset
    end = start + hdr.payload_length
    if hdr.payload_length == 0 or end > len(view):
        raise NumavmError(f"{name}: payload [{start:#x}, {end:#x}) lies outside the "
                          f"{len(view)}-byte file (truncated bzImage?)")
    return BzImage(header=hdr, header_len=hlen, setup_size=setup_size,
                   payload=view[start:end])


# --- payload decompression ------------------------------------------------

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),  # legacy lz4 frame (lz4 -l), as the kernel uses
    (b"\x89LZO", "lzo"),
    (b"\x5d\x00\x00", "lzma"),  # lzma-alone: props 0x5D, dictionary size (LE) < 16 MiB
    (b"\x7fELF", "none"),  # CONFIG_KERNEL_UNCOMPRESSED
)

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # uncompressed bytes per legacy block


def payload_format(payload: bytes | memoryview) -> str:
    """The compression of `payload` by its magic, or "unknown"."""
    head = bytes(payload[:8])
    for magic, fmt in _MAGICS:
        if head.startswith(magic):
            return fmt
    return "unknown"


class _StreamDecoder(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: Any, /) -> bytes: ...


def decompress_payload(payload: bytes | memoryview, name: str = "kernel") -> tuple[bytes, str]:
    """Unpack a bzImage payload: returns (the vmlinux bytes, format name).

    Each format is decoded by a C library in one call (no Python loop over
    bytes).  zstd needs Python 3.14's ``compression.zstd`` or the
    ``zstandard`` package, lz4 the ``lz4`` package; their absence is a
    NumavmError naming what to install.
    """
    fmt = payload_format(payload)
    data = memoryview(payload).cast("B")
    try:
        if fmt == "xz":
            # The kernel's xz stream: BCJ x86 filter + LZMA2, CRC32 check; liblzma
            # reads the filter chain from the stream header.
            out, rest = _stream(lzma.LZMADecompressor(format=lzma.FORMAT_XZ), data)
        elif fmt == "lzma":
            out, rest = _stream(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), data)
        elif fmt == "gzip":
            out, rest = _stream(zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), data)
        elif fmt == "bzip2":
            out, rest = _stream(bz2.BZ2Decompressor(), data)
        elif fmt == "zstd":
            out, rest = _zstd(data, name)
        elif fmt == "lz4":
            out, rest = _lz4_legacy(data, name)
        elif fmt == "none":
            return bytes(data), fmt
        elif fmt == "lzo":
            raise NumavmError(f"{name}: LZO-compressed kernels are not supported; "
                              "use a kernel built with xz, gzip, zstd, lzma, bzip2 or lz4")
        else:
            raise NumavmError(f"{name}: unknown payload compression (magic "
                              f"{bytes(data[:6]).hex(' ')}); expected xz, gzip, zstd, "
                              "lzma, bzip2, lz4 or an ELF")
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError) as e:
        raise NumavmError(f"{name}: corrupt {fmt} payload: {e}") from e
    _check_trailer(out, rest, fmt, name)
    return out, fmt


def _stream(dec: _StreamDecoder, data: memoryview) -> tuple[bytes, bytes]:
    out = dec.decompress(data)
    if not dec.eof:
        raise EOFError("compressed stream ends early")
    return out, dec.unused_data


def _check_trailer(out: bytes, rest: bytes, fmt: str, name: str) -> None:
    """The build's appended u32 size, when it is all that follows, must match."""
    if len(rest) == 4:
        (size,) = struct.unpack("<I", rest)
        if size != len(out) & 0xFFFF_FFFF:
            raise NumavmError(f"{name}: {fmt} payload unpacked to {len(out)} bytes but "
                              f"its trailer says {size}")


def _optional_module(module: str, fmt: str, name: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NumavmError(f"{name}: the kernel payload is {fmt}-compressed; install the "
                          f"'{package}' Python package (pip install {package}) to load it, "
                          "or use an xz/gzip-compressed kernel or its vmlinux") from None


def _zstd(data: memoryview, name: str) -> tuple[bytes, bytes]:
    try:  # Python 3.14+ ships zstd in the standard library
        stdlib_zstd = importlib.import_module("compression.zstd")
    except ImportError:
        stdlib_zstd = None
    if stdlib_zstd is not None:
        try:
            return _stream(stdlib_zstd.ZstdDecompressor(), data)
        except stdlib_zstd.ZstdError as e:
            raise NumavmError(f"{name}: corrupt zstd payload: {e}") from e
    zstandard = _optional_module("zstandard", "zstd", name, "zstandard")
    try:
        # One frame; what follows it (the size trailer) lands in unused_data.
        dobj = zstandard.ZstdDecompressor().decompressobj()
        out = dobj.decompress(bytes(data))
        return out, bytes(getattr(dobj, "unused_data", b""))
    except zstandard.ZstdError as e:
        raise NumavmError(f"{name}: corrupt zstd payload: {e}") from e


def _lz4_legacy(data: memoryview, name: str) -> tuple[bytes, bytes]:
    """The legacy lz4 frame: magic, then (le32 compressed size, block)*.

    Each block holds up to 8 MiB uncompressed, so the loop runs a few times per
    kernel; lz4.block (C) decodes each block.  A further magic starts a
    concatenated stream; exactly 4 bytes left over is the size trailer.
    """
    lz4_block = _optional_module("lz4.block", "lz4", name, "lz4")
    parts: list[bytes] = []
    pos = 4
    while len(data) - pos > 4:
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if pos + size > len(data):
            raise NumavmError(f"{name}: lz4 block of {size} bytes at {pos - 4:#x} "
                              "runs past the payload")
        try:
            parts.append(lz4_block.decompress(bytes(data[pos:pos + size]),
                                              uncompressed_size=LZ4_LEGACY_BLOCK))
        except lz4_block.LZ4BlockError as e:
            raise NumavmError(f"{name}: corrupt lz4 payload: {e}") from e
        pos += size
    return b"".join(parts), bytes(data[pos:])
