"""numavm.plan.boot: bzImage and ELF parsing, payload unpacking, the zero page and boot plan.

Uses the real Debian kernel (the package linux-image-amd64 depends on), got
through numavm.guest.assets when that works, else with apt-get download into a cache
under the temp directory; those tests skip with the reason when neither works.
Synthetic images made here cover the other compressions and the error paths.
"""

from __future__ import annotations

import bz2
import ctypes
import gzip
import importlib.util
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from numavm.plan.boot import (
    BOOT_PARAMS_ADDR,
    BOOT_SCRATCH_END,
    BOOT_SCRATCH_START,
    CMDLINE_ADDR,
    BootParams,
    BootPlan,
    KernelImage,
    SetupHeader,
    decompress_payload,
    emulation_safe_cmdline,
    load_kernel,
    parse_bzimage,
    parse_elf,
    parse_kernel,
    plan_boot,
)
from numavm.plan.boot.bzimage import XLF_KERNEL_64
from numavm.errors import ConfigError, NumavmError
from numavm.plan.layout import (
    LEGACY_END,
    TABLE_AREA_START,
    E820Type,
    Layout,
    Range,
    plan_layout,
)
from numavm.spec.topology import MachineSpec, parse_numa
from numavm.spec.units import GiB, MiB

KERNEL_CACHE = Path(tempfile.gettempdir()) / "numavm-test-kernel"


# --- getting the real kernel ----------------------------------------------

def _from_assets() -> Path | None:
    try:
        from numavm.guest import assets
    except ImportError:
        return None
    try:
        got = assets.fetch()
    except Exception:  # noqa: BLE001 - any failure there: fall back to apt ourselves
        return None
    kernel = getattr(got, "kernel", None)
    return Path(kernel) if kernel and Path(kernel).is_file() else None


def _run(*cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=600).stdout


def _from_apt() -> Path:
    """vmlinuz from the package linux-image-amd64 depends on, cached under /tmp."""
    found = sorted(KERNEL_CACHE.glob("vmlinuz-*"))
    if found:
        return found[-1]
    for tool in ("apt-cache", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"real-kernel tests need {tool} (Debian apt) to fetch a kernel")
    try:
        deps = _run("apt-cache", "depends", "linux-image-amd64")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"apt-cache depends linux-image-amd64 failed (run apt-get update?): {e}")
    pkgs = [line.split(":", 1)[1].strip() for line in deps.splitlines()
            if line.strip().startswith("Depends:") and "linux-image-" in line]
    if not pkgs:
        pytest.skip("apt knows no linux-image-amd64 dependency (run apt-get update?)")
    KERNEL_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=KERNEL_CACHE) as tmp:
        try:
            _run("apt-get", "download", pkgs[0], cwd=Path(tmp))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"apt-get download {pkgs[0]} failed: {getattr(e, 'stderr', e)}")
        deb = next(Path(tmp).glob("*.deb"))
        # Only /boot/vmlinuz-* out of the package's data (dpkg-deb -x would
        # also unpack ~400 MB of modules); stop reading once it is out.
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    for member in tar:
                        name = os.path.basename(member.name)
                        if member.isfile() and name.startswith("vmlinuz-") \
                                and os.path.dirname(member.name).endswith("boot"):
                            src = tar.extractfile(member)
                            assert src is not None
                            part = Path(tmp) / name
                            part.write_bytes(src.read())
                            os.replace(part, KERNEL_CACHE / name)  # atomic for parallel runs
                            break
            except tarfile.TarError as e:
                pytest.skip(f"dpkg-deb --fsys-tarfile {deb.name}: {e}")
            finally:
                proc.kill()
    found = sorted(KERNEL_CACHE.glob("vmlinuz-*"))
    if not found:
        pytest.skip(f"{pkgs[0]} holds no /boot/vmlinuz-*")
    return found[-1]


@pytest.fixture(scope="session")
def real_kernel_path() -> Path:
    return _from_assets() or _from_apt()


@pytest.fixture(scope="session")
def real_kernel(real_kernel_path: Path) -> KernelImage:
    t0 = time.perf_counter()
    k = load_kernel(real_kernel_path)
    print(f"\n{real_kernel_path.name}: {k.compression} payload unpacked in "
          f"{k.unpack_seconds:.2f} s (load_kernel {time.perf_counter() - t0:.2f} s), "
          f"{len(k.vmlinux) / MiB:.1f} MiB vmlinux")
    return k


# --- helpers --------------------------------------------------------------

def layout(*numa: str, memory: int | None = None, cpus: int | None = None) -> Layout:
    spec = MachineSpec(cpus=cpus, memory=memory, domains=[parse_numa(n) for n in numa])
    return plan_layout(spec.build(host_nodes=(0, 1, 2, 3)))


TWO_NODES = ("id=0,size=1G,cpus=0", "id=1,size=1G,cpus=1")


def ram_ranges(lay: Layout) -> list[Range]:
    return [Range(e.start, e.end) for e in lay.e820 if e.type == E820Type.RAM]


def in_ram(r: Range, lay: Layout) -> bool:
    return any(x.start <= r.start and r.end <= x.end for x in ram_ranges(lay))


def overlaps(a: Range, b: Range) -> bool:
    return a.start < b.end and b.start < a.end


def read_guest(plan: BootPlan, addr: int, size: int) -> bytes:
    """Bytes at `addr` as the plan's writes would leave them (fresh memory is zero)."""
    for start, data in plan.writes:
        if start <= addr and addr + size <= start + len(data):
            return bytes(data[addr - start:addr - start + size])
    raise AssertionError(f"nothing written at {addr:#x}+{size}")


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def u8(b: bytes, off: int) -> int:
    return b[off]


def u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def u64(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", b, off)[0])


def check_plan(plan: BootPlan, lay: Layout, kernel: KernelImage, cmdline: str,
               initrd: bytes | None) -> None:
    """The zero page read back at its documented offsets, and the placement rules."""
    bp = plan.boot_params
    assert len(bp) == 4096
    assert plan.rsi == plan.boot_params_addr == BOOT_PARAMS_ADDR
    assert read_guest(plan, BOOT_PARAMS_ADDR, 4096) == bp
    assert plan.rip == kernel.entry
    # setup header
    assert u16(bp, 0x1FE) == 0xAA55
    assert bp[0x202:0x206] == b"HdrS"
    assert u16(bp, 0x206) >= 0x020C
    assert u8(bp, 0x210) == 0xFF  # type_of_loader: undefined
    assert u8(bp, 0x211) & 1  # LOADED_HIGH
    assert u16(bp, 0x236) & XLF_KERNEL_64
    assert u8(bp, 0x1EF) == 0  # sentinel: Linux would wipe fields otherwise
    # e820: count at 0x1E8, 20-byte entries from 0x2D0
    assert u8(bp, 0x1E8) == len(lay.e820)
    for i, e in enumerate(lay.e820):
        addr, size, typ = struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i)
        assert (addr, addr + size, typ) == (e.start, e.end, int(e.type))
    assert bp[0x2D0 + 20 * len(lay.e820):0x2D0 + 20 * 128] == bytes(20 * (128 - len(lay.e820)))
    # command line: pointer (+ext) -> NUL-terminated string
    cmd_ptr = u32(bp, 0x228) | u32(bp, 0x0C8) << 32
    assert cmd_ptr == plan.cmdline_addr == CMDLINE_ADDR
    raw = cmdline.encode() + b"\0"
    assert read_guest(plan, cmd_ptr, len(raw)) == raw
    assert len(cmdline) <= u32(bp, 0x238)
    # ACPI
    assert u64(bp, 0x070) == lay.rsdp_addr
    # initrd: pointer/size (+ext), in RAM, page aligned, off the kernel
    rd_addr = u32(bp, 0x218) | u32(bp, 0x0C0) << 32
    rd_size = u32(bp, 0x21C) | u32(bp, 0x0C4) << 32
    if initrd is None:
        assert (rd_addr, rd_size) == (0, 0) and plan.initrd is None
    else:
        assert plan.initrd == Range(rd_addr, rd_addr + rd_size)
        assert rd_size == len(initrd) and rd_addr % 4096 == 0
        assert read_guest(plan, rd_addr, rd_size) == initrd
        assert in_ram(plan.initrd, lay)
        assert not overlaps(plan.initrd, plan.kernel)
        assert rd_addr + rd_size <= u32(bp, 0x22C) + 1  # initrd_addr_max
        assert rd_addr >= LEGACY_END
    # kernel segments at their p_paddr
    for seg in kernel.elf.segments:
        if seg.filesz:
            assert any(a == seg.paddr and d is seg.data for a, d in plan.writes)
        assert plan.kernel.start <= seg.paddr and seg.end <= plan.kernel.end
    assert in_ram(plan.kernel, lay)
    # nothing in the scratch area, the ACPI tables or each other's way
    spans = sorted([Range(a, a + len(d)) for a, d in plan.writes] + plan.zero_ranges,
                   key=lambda r: r.start)
    for s in spans:
        assert in_ram(s, lay), s
        assert not overlaps(s, Range(TABLE_AREA_START, LEGACY_END)), s
        assert not overlaps(s, Range(BOOT_SCRATCH_START, BOOT_SCRATCH_END)), s
    for a, b in zip(spans, spans[1:]):
        assert a.end <= b.start, (a, b)
    assert plan.scratch == Range(0x1000, 0x8000)


# --- synthetic images -----------------------------------------------------

KVIRT = 0xFFFF_FFFF_8100_0000
KPHYS = 16 * MiB


def make_elf(entry: int = KVIRT + 0x40, pvh: int | None = KPHYS + 0x80,
             pvh_size: int = 4) -> bytes:
    """A minimal x86-64 vmlinux: text at 16 MiB, data with a bss tail, a PVH note."""
    text = bytes(range(256)) * 16  # 4 KiB
    data = b"D" * 100
    note = b""
    if pvh is not None:
        desc = pvh.to_bytes(pvh_size, "little")
        note = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    phnum = 3
    off = 64 + phnum * 56
    text_off, data_off, note_off = off, off + len(text), off + len(text) + len(data)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1,
                       entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    ph = [
        struct.pack("<IIQQQQQQ", 1, 5, text_off, KVIRT, KPHYS, len(text), len(text), 0x1000),
        struct.pack("<IIQQQQQQ", 1, 6, data_off, KVIRT + 2 * MiB, KPHYS + 2 * MiB,
                    len(data), 3 * 4096, 0x1000),
        struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4),
    ]
    return ehdr + b"".join(ph) + text + data + note


def make_bzimage(payload: bytes, *, version: int = 0x020F, xload: int = 0x7F,
                 setup_sects: int = 1, init_size: int = 8 * MiB) -> bytes:
    """A fake bzImage: setup sectors with a header, then the payload."""
    setup_size = (setup_sects + 1) * 512
    img = bytearray(setup_size)
    h = SetupHeader()
    h.setup_sects = setup_sects
    h.boot_flag = 0xAA55
    h.jump = 0x6AEB  # jmp over the header to 0x26C
    h.header = 0x53726448
    h.version = version
    h.loadflags = 1
    h.initrd_addr_max = 0x7FFF_FFFF
    h.kernel_alignment = 2 * MiB
    h.relocatable_kernel = 1
    h.xloadflags = xload
    h.cmdline_size = 2047
    h.payload_offset = 0x10
    h.payload_length = len(payload)
    h.pref_address = KPHYS
    h.init_size = init_size
    img[0x1F1:0x1F1 + ctypes.sizeof(h)] = bytes(h)
    return bytes(img) + bytes(0x10) + payload


def sized(stream: bytes, size: int) -> bytes:
    """What the kernel build does: the uncompressed size appended as le32."""
    return stream + struct.pack("<I", size)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "bzip2": bz2.compress,
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                  filters=[{"id": lzma.FILTER_X86},
                                           {"id": lzma.FILTER_LZMA2, "preset": 6}]),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
}


# --- real kernel ----------------------------------------------------------

# Debian 12's 6.1 is built with CONFIG_KERNEL_XZ, Debian 13's 6.12 with CONFIG_KERNEL_ZSTD.
PAYLOAD_MAGIC = {"xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


def debian_compression(release: str | None) -> str:
    """The payload format of Debian's kernel of this release string ("6.12.118+deb13-amd64 ...")."""
    major, minor = (int(x) for x in (release or "0.0").split(".")[:2])
    return "zstd" if (major, minor) >= (6, 12) else "xz"


def test_real_bzimage_header(real_kernel_path: Path) -> None:
    data = real_kernel_path.read_bytes()
    bz = parse_bzimage(data, str(real_kernel_path))
    h = bz.header
    # ctypes fields agree with the documented offsets in the file
    assert h.setup_sects == data[0x1F1]
    assert h.boot_flag == u16(data, 0x1FE) == 0xAA55
    assert h.header == u32(data, 0x202) and data[0x202:0x206] == b"HdrS"
    assert h.version == u16(data, 0x206) >= 0x020C
    assert h.loadflags == data[0x211] and h.loadflags & 1  # LOADED_HIGH
    assert h.kernel_alignment == u32(data, 0x230) and h.kernel_alignment >= 2 * MiB
    assert h.kernel_alignment & (h.kernel_alignment - 1) == 0
    assert h.relocatable_kernel == data[0x234] == 1
    assert h.xloadflags == u16(data, 0x236) and h.xloadflags & XLF_KERNEL_64
    assert h.cmdline_size == u32(data, 0x238) >= 255
    assert h.initrd_addr_max == u32(data, 0x22C) >= 0x37FF_FFFF
    assert h.payload_offset == u32(data, 0x248)
    assert h.payload_length == u32(data, 0x24C) > 1 * MiB
    assert h.pref_address == u64(data, 0x258) == 16 * MiB
    assert h.init_size == u32(data, 0x260) > h.payload_length
    assert bz.setup_size == (data[0x1F1] + 1) * 512
    release = parse_kernel(data).release
    assert bz.compression == debian_compression(release), release
    assert bytes(bz.payload[:6]).startswith(PAYLOAD_MAGIC[bz.compression])


def test_real_payload_is_vmlinux(real_kernel: KernelImage) -> None:
    k = real_kernel
    assert k.format == "bzImage" and k.compression == debian_compression(k.release)
    assert k.vmlinux[:4] == b"\x7fELF"
    assert k.release and k.release.split()[0] in k.path
    segs = k.elf.segments
    assert len(segs) >= 2
    assert k.load_addr == segs[0].paddr == 16 * MiB
    assert all(s.paddr % 4096 == 0 and s.end < 4 * GiB for s in segs)
    # the 64-bit entry: startup_64, in .head.text at the start of the text segment (6.1 puts it
    # at the very start, 6.12 after a few early-boot C helpers: 16 MiB + 0xc43 there)
    assert any(s.paddr <= k.entry < s.end for s in segs)
    assert 16 * MiB <= k.entry < 16 * MiB + 64 * 1024
    # PVH entry note (QEMU's -kernel uses it), inside the text segment
    pvh = k.elf.pvh_entry
    assert pvh is not None and segs[0].paddr < pvh < segs[0].end
    # the kernel's reservation: init_size from the header covers the image
    assert k.setup is not None
    assert k.reserved == Range(16 * MiB, 16 * MiB + max(k.setup.init_size, k.elf.load_end - 16 * MiB))
    assert k.elf.load_end <= k.reserved.end


def test_real_decompress_trailer_checked(real_kernel_path: Path) -> None:
    bz = parse_bzimage(real_kernel_path.read_bytes())
    payload = bytearray(bz.payload)
    payload[-4:] = struct.pack("<I", 12345)
    with pytest.raises(NumavmError, match="trailer says 12345"):
        decompress_payload(bytes(payload))


def test_real_boot_plan(real_kernel: KernelImage) -> None:
    lay = layout(*TWO_NODES)
    initrd = bytes(range(256)) * (3 * 4096) + b"tail"  # 3 MiB + 4 bytes
    cmdline = "console=ttyS0 " + emulation_safe_cmdline()
    plan = plan_boot(lay, real_kernel, initrd, cmdline)
    check_plan(plan, lay, real_kernel, cmdline, initrd)
    assert plan.rip == real_kernel.entry
    assert plan.pvh_entry == real_kernel.elf.pvh_entry
    # initrd at the top of RAM (2 GiB here), below initrd_addr_max
    assert plan.initrd is not None and plan.initrd.start == 2 * GiB - (3 * MiB + 4096)
    # the header fields copied from the image
    bp = plan.boot_params
    assert real_kernel.setup is not None
    assert u32(bp, 0x260) == real_kernel.setup.init_size
    assert u16(bp, 0x206) == real_kernel.setup.version
    assert bp[0x1F1:0x1F1 + 0x10] == bytes(real_kernel.setup)[:0x10]
    # and the ctypes view agrees with the offsets
    parsed = BootParams.from_buffer_copy(bp)
    assert parsed.e820_entries == len(lay.e820) and parsed.acpi_rsdp_addr == lay.rsdp_addr


def test_real_boot_plan_above_4g(real_kernel: KernelImage) -> None:
    # 1G + 4G: RAM [1M, 3G) and [4G, 6G); initrd stays below initrd_addr_max (2 GiB)
    lay = layout("id=0,size=1G,cpus=0", "id=1,size=4G,cpus=1")
    initrd = b"\x42" * (5 * MiB + 1)
    plan = plan_boot(lay, real_kernel, initrd, "console=ttyS0")
    check_plan(plan, lay, real_kernel, "console=ttyS0", initrd)
    assert plan.initrd is not None and plan.initrd.end <= 2 * GiB
    assert plan.initrd.start == 2 * GiB - (5 * MiB + 4096)


def test_real_boot_plan_no_initrd(real_kernel: KernelImage) -> None:
    lay = layout(memory=512 * MiB, cpus=1)
    plan = plan_boot(lay, real_kernel, None, "")
    check_plan(plan, lay, real_kernel, "", None)
    assert plan.cmdline == b"\0"


def test_real_too_little_ram(real_kernel: KernelImage) -> None:
    need = -(-real_kernel.reserved.end // MiB)
    with pytest.raises(NumavmError, match=rf"at least {need} MiB"):
        plan_boot(layout(memory=32 * MiB, cpus=1), real_kernel, None, "")
    # the kernel fits in 96 MiB, but not with a 64 MiB initrd beside it
    lay = layout(memory=96 * MiB, cpus=1)
    plan_boot(lay, real_kernel, None, "")
    with pytest.raises(NumavmError, match=r"initrd.*at least \d+ MiB"):
        plan_boot(lay, real_kernel, bytes(64 * MiB), "")


# --- synthetic images: formats and errors ---------------------------------

@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_synthetic_bzimage(fmt: str, tmp_path: Path) -> None:
    elf = make_elf()
    img = make_bzimage(sized(COMPRESSORS[fmt](elf), len(elf)))
    path = tmp_path / "bzImage"
    path.write_bytes(img)
    k = load_kernel(path)
    assert (k.format, k.compression) == ("bzImage", fmt)
    assert k.vmlinux == elf
    assert k.entry == KPHYS + 0x40  # virtual e_entry translated through its segment
    assert k.elf.pvh_entry == KPHYS + 0x80
    assert k.reserved == Range(KPHYS, KPHYS + 8 * MiB)  # init_size wins over the image
    lay = layout(memory=64 * MiB, cpus=1)
    initrd = b"initrd" * 1000
    plan = plan_boot(lay, k, initrd, "root=/dev/ram0")
    check_plan(plan, lay, k, "root=/dev/ram0", initrd)
    # the bss tail of the data segment is a zero range, not a zero write
    assert plan.zero_ranges == [Range(KPHYS + 2 * MiB + 100, KPHYS + 2 * MiB + 3 * 4096)]
    assert all(len(d) < 1 * MiB for _, d in plan.writes)
    assert plan.initrd == Range(64 * MiB - 8192, 64 * MiB - 8192 + len(initrd))


def test_payload_without_trailer_and_with_padding() -> None:
    elf = make_elf()
    assert decompress_payload(gzip.compress(elf))[0] == elf  # no trailer at all
    out, fmt = decompress_payload(COMPRESSORS["xz"](elf) + bytes(16))  # stream padding
    assert (out, fmt) == (elf, "xz")


def test_unknown_magic() -> None:
    img = make_bzimage(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(NumavmError, match="unknown payload compression.*12 34 56 78"):
        parse_kernel(img, "bzImage")


def test_lzo_refused() -> None:
    with pytest.raises(NumavmError, match="LZO"):
        decompress_payload(b"\x89LZO\x00" + bytes(20))


def test_corrupt_and_truncated_payloads() -> None:
    elf = make_elf()
    stream = gzip.compress(elf)
    with pytest.raises(NumavmError, match="corrupt gzip"):
        decompress_payload(stream[:len(stream) // 2])
    bad = bytearray(COMPRESSORS["xz"](elf))
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(NumavmError, match="corrupt xz"):
        decompress_payload(bytes(bad))
    with pytest.raises(NumavmError, match="trailer says"):
        decompress_payload(sized(stream, len(elf) + 1))
    # payload not an ELF
    junk = gzip.compress(b"not an elf" * 10)
    with pytest.raises(NumavmError, match="did not unpack to an ELF"):
        parse_kernel(make_bzimage(sized(junk, 100)), "bzImage")


@pytest.mark.parametrize("fmt,magic,module,package", [
    ("zstd", b"\x28\xb5\x2f\xfd", "zstandard", "zstandard"),
    ("lz4", b"\x02\x21\x4c\x18", "lz4", "lz4"),
])
def test_optional_formats(fmt: str, magic: bytes, module: str, package: str) -> None:
    elf = make_elf()
    if fmt == "zstd" and has_module("compression.zstd"):
        pytest.skip("Python ships zstd: no package needed")
    if not has_module(module):
        with pytest.raises(NumavmError, match=rf"{fmt}-compressed; install the '{package}'"):
            decompress_payload(magic + bytes(32))
        return
    if fmt == "zstd":
        import zstandard  # type: ignore[import-not-found,unused-ignore]
        stream = zstandard.ZstdCompressor().compress(elf)
    else:
        import lz4.block  # type: ignore[import-not-found,unused-ignore]
        block = lz4.block.compress(elf, store_size=False)
        stream = magic + struct.pack("<I", len(block)) + block
    assert decompress_payload(sized(stream, len(elf))) == (elf, fmt)


def test_bzimage_header_errors() -> None:
    payload = sized(gzip.compress(make_elf()), len(make_elf()))
    with pytest.raises(NumavmError, match="boot protocol 2.11 is too old"):
        parse_bzimage(make_bzimage(payload, version=0x020B))
    with pytest.raises(NumavmError, match="not a 64-bit kernel"):
        parse_bzimage(make_bzimage(payload, xload=0))
    img = bytearray(make_bzimage(payload))
    img[0x202:0x206] = b"Hdrs"
    with pytest.raises(NumavmError, match="neither a bzImage"):
        parse_kernel(bytes(img), "k")
    with pytest.raises(NumavmError, match="too short"):
        parse_bzimage(b"\0" * 100)
    with pytest.raises(NumavmError, match="outside the"):
        parse_bzimage(make_bzimage(payload)[:-10])
    with pytest.raises(NumavmError, match="neither a bzImage"):
        parse_kernel(b"MZ" + bytes(1000), "k")


def test_setup_sects_zero_means_four() -> None:
    elf = make_elf()
    img = bytearray(make_bzimage(sized(gzip.compress(elf), len(elf)), setup_sects=4))
    img[0x1F1] = 0
    assert parse_bzimage(bytes(img)).setup_size == 5 * 512
    assert parse_kernel(bytes(img)).vmlinux == elf


def test_bare_elf(tmp_path: Path) -> None:
    elf = make_elf(entry=KPHYS + 0x40, pvh=KPHYS + 0x80, pvh_size=8)
    path = tmp_path / "vmlinux"
    path.write_bytes(elf)
    k = load_kernel(path)
    assert (k.format, k.compression, k.setup) == ("elf", None, None)
    assert k.entry == KPHYS + 0x40  # physical e_entry used as is
    assert k.elf.pvh_entry == KPHYS + 0x80  # 8-byte (.quad) note
    assert k.reserved == Range(KPHYS, KPHYS + 2 * MiB + 3 * 4096)
    lay = layout(memory=64 * MiB, cpus=1)
    plan = plan_boot(lay, k, b"rd", "console=ttyS0")
    check_plan(plan, lay, k, "console=ttyS0", b"rd")
    bp = plan.boot_params
    assert u16(bp, 0x206) == 0x020F
    assert u32(bp, 0x238) == 2048  # cmdline_size
    assert u32(bp, 0x22C) == 0x7FFF_FFFF  # initrd_addr_max
    assert u64(bp, 0x258) == KPHYS  # pref_address


def test_elf_errors() -> None:
    with pytest.raises(NumavmError, match="entry point 0x1234 is in no loadable segment"):
        parse_elf(make_elf(entry=0x1234))
    elf32 = bytearray(make_elf())
    elf32[4] = 1
    with pytest.raises(NumavmError, match="not a little-endian x86-64 ELF64"):
        parse_elf(bytes(elf32))
    with pytest.raises(NumavmError, match="outside"):
        parse_elf(make_elf()[:400])
    assert parse_elf(make_elf(pvh=None)).pvh_entry is None


def test_cmdline_checks(tmp_path: Path) -> None:
    k = parse_kernel(make_elf(), "vmlinux")
    lay = layout(memory=64 * MiB, cpus=1)
    plan_boot(lay, k, None, "x" * 2048)
    with pytest.raises(ConfigError, match="2049 bytes, the kernel takes at most 2048"):
        plan_boot(lay, k, None, "x" * 2049)
    with pytest.raises(ConfigError, match="NUL"):
        plan_boot(lay, k, None, "a\0b")


def test_too_little_ram_synthetic() -> None:
    k = parse_kernel(make_bzimage(sized(gzip.compress(make_elf()), len(make_elf())),
                                  init_size=40 * MiB), "bzImage")
    with pytest.raises(NumavmError, match=r"guest RAM \(\d+ MiB\) is too small.*at least 56 MiB"):
        plan_boot(layout(memory=32 * MiB, cpus=1), k, None, "")
    lay = layout(memory=64 * MiB, cpus=1)
    plan_boot(lay, k, bytes(8 * MiB), "")  # [56 MiB, 64 MiB)
    plan_boot(lay, k, bytes(15 * MiB), "")  # [1 MiB, 16 MiB), under the kernel
    with pytest.raises(NumavmError, match=r"initrd.*at least 72 MiB"):
        plan_boot(lay, k, bytes(16 * MiB), "")


def test_initrd_below_kernel_when_top_is_taken() -> None:
    # kernel reservation reaches the top of RAM: the initrd goes under 16 MiB
    k = parse_kernel(make_bzimage(sized(gzip.compress(make_elf()), len(make_elf())),
                                  init_size=48 * MiB), "bzImage")
    lay = layout(memory=64 * MiB, cpus=1)
    initrd = bytes(3 * MiB)
    plan = plan_boot(lay, k, initrd, "")
    check_plan(plan, lay, k, "", initrd)
    assert plan.initrd == Range(13 * MiB, 16 * MiB)


def test_boot_params_struct() -> None:
    assert ctypes.sizeof(BootParams) == 4096
    assert BootParams.e820_entries.offset == 0x1E8
    assert BootParams.e820_table.offset == 0x2D0
    assert BootParams.hdr.offset == 0x1F1
    assert BootParams.acpi_rsdp_addr.offset == 0x070
    assert BootParams.ext_ramdisk_image.offset == 0x0C0
    assert BootParams.ext_cmd_line_ptr.offset == 0x0C8
    assert SetupHeader.init_size.offset == 0x260 - 0x1F1


def test_emulation_safe_cmdline() -> None:
    params = emulation_safe_cmdline().split()
    for p in ("nofsgsbase", "mitigations=off", "nowatchdog", "nosoftlockup"):
        assert p in params
    clear = next(p for p in params if p.startswith("clearcpuid="))
    feats = clear.split("=", 1)[1].split(",")
    for f in ("xsave", "smap", "cx16", "avx", "ssse3", "fsgsbase"):
        assert f in feats
    assert "noxsave" not in params  # not a 6.1 parameter


def test_emulation_safe_cmdline_speedups_keep_the_topology() -> None:
    from numavm.plan.boot.linux import _EMULATION_SAFE_PARAMS
    from numavm.spec.topology import MAX_CPUS

    params = emulation_safe_cmdline().split()
    assert "percpu_alloc=page" in params
    # the possible-CPU cap must never hide a vCPU numavm can build
    caps = [p for p in params if p.startswith(("nr_cpus=", "possible_cpus=", "maxcpus="))]
    assert caps == [f"nr_cpus={MAX_CPUS}"]
    # nothing that changes what the guest derives from SRAT/SLIT/e820
    for p in params:
        assert not p.startswith(("numa=", "mem=", "memmap=", "acpi=", "movablecore=", "kernelcore=",
                                 "numa_balancing", "noapic", "nosmp"))
    # every parameter is explained
    assert all(why for _p, why in _EMULATION_SAFE_PARAMS)
