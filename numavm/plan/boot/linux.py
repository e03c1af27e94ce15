"""Booting Linux at its 64-bit entry: what to write where, and where to start.

`load_kernel` reads a bzImage (its payload unpacked on the host) or a bare
``vmlinux`` ELF.  `plan_boot` places the kernel's PT_LOAD segments at their
physical addresses, the zero page (``struct boot_params``), the command
line and the initrd, and returns them as ``(guest address, bytes)`` writes
plus the entry registers of the 64-bit boot protocol (boot.rst, "64-bit
BOOT PROTOCOL"): RIP = startup_64's physical address, RSI = the zero page,
with the machine layer providing long mode, identity-mapped page tables
covering at least the kernel, the zero page and the command line, and a GDT
with __BOOT_CS = 0x10 and __BOOT_DS = 0x18 (see numavm.vmm.kvm.cpu).

Guest-physical addresses chosen here (below 1 MiB see numavm.plan.layout):

    0x0000-0x0FFF   left alone (real-mode IVT/BDA area)
    0x1000-0x7FFF   BOOT_SCRATCH: the machine's page tables and GDT (28 KiB:
                    PML4 + PDPT + 4 PDs identity-map 4 GiB with 2 MiB pages,
                    leaving one page for the GDT/TSS)
    0x8000-0x8FFF   BOOT_PARAMS_ADDR: the zero page
    0x9000-...      CMDLINE_ADDR: the command line, NUL-terminated (at most
                    cmdline_size + 1 bytes: 2048 for Debian's 6.1)
    0x9FC00-0xFFFFF EBDA, ACPI tables (0xA0000-0xDFFFF), RSDP: not touched
    16 MiB-...      the kernel, at its ELF p_paddr, reserving
                    [load, load + max(init_size, image end - load))
    top of RAM      the initrd, page aligned, as high as allowed: below
                    min(initrd_addr_max + 1, LOW_RAM_LIMIT), outside the
                    kernel's reservation (as QEMU places it); if the space
                    above the kernel is too small, under 16 MiB instead

Guest RAM is fresh (anonymous memory or a memfd) and therefore already zero: the bss
tails of the kernel segments are returned as `BootPlan.zero_ranges` for a
caller that reuses memory, but a caller on fresh memory may skip them (they
are megabytes; never write zero buffers for them).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from dataclasses import dataclass, field

from numavm.errors import ConfigError, NumavmError
from numavm.plan.layout import (
    EBDA_START,
    LEGACY_END,
    LOW_RAM_LIMIT,
    TABLE_AREA_START,
    E820Type,
    Layout,
    Range,
)
from numavm.spec.topology import MAX_CPUS
from numavm.plan.boot.bzimage import (
    BOOT_FLAG,
    HDRS_MAGIC,
    LOADED_HIGH,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    SetupHeader,
    decompress_payload,
    is_bzimage,
    parse_bzimage,
)
from numavm.plan.boot.elf import ElfImage, is_elf, parse_elf

PAGE_SIZE = 4096
MiB = 1 << 20

BOOT_SCRATCH_START = 0x1000
BOOT_SCRATCH_END = 0x8000
BOOT_PARAMS_ADDR = 0x8000
CMDLINE_ADDR = 0x9000
CMDLINE_AREA_END = EBDA_START
assert BOOT_SCRATCH_END <= BOOT_PARAMS_ADDR and BOOT_PARAMS_ADDR + PAGE_SIZE <= CMDLINE_ADDR

# What a bare ELF gets in the synthesized setup header.
SYNTH_PROTOCOL = 0x020F  # 2.15, Linux 5.5+
COMMAND_LINE_SIZE = 2048  # x86's COMMAND_LINE_SIZE; the boot protocol's cmdline_size
INITRD_ADDR_MAX = 0x7FFF_FFFF  # what x86-64 kernels declare
KERNEL_ALIGNMENT = 2 * MiB  # CONFIG_PHYSICAL_ALIGN default
LOADER_UNDEFINED = 0xFF  # type_of_loader: "undefined/other" loader

E820_MAX_ENTRIES_ZEROPAGE = 128


class E820EntryC(ctypes.LittleEndianStructure):
    """``struct boot_e820_entry``: 20 bytes, packed."""

    _pack_ = 1
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32)]


assert ctypes.sizeof(E820EntryC) == 20


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params``, the zero page (arch/x86/include/uapi/asm/bootparam.h).

    Legacy sub-structures the loader leaves zero are declared as byte blocks
    of their size; the offsets are asserted below.
    """

    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * 0x40),      # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),    # 0x040
        ("_pad2", ctypes.c_uint8 * 4),               # 0x054
        ("tboot_addr", ctypes.c_uint64),             # 0x058
        ("ist_info", ctypes.c_uint8 * 0x10),         # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),         # 0x070
        ("_pad3", ctypes.c_uint8 * 8),               # 0x078
        ("hd0_info", ctypes.c_uint8 * 16),           # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),           # 0x090
        ("sys_desc_table", ctypes.c_uint8 * 0x10),   # 0x0A0
        ("olpc_ofw_header", ctypes.c_uint8 * 0x10),  # 0x0B0
        ("ext_ramdisk_image", ctypes.c_uint32),      # 0x0C0
        ("ext_ramdisk_size", ctypes.c_uint32),       # 0x0C4
        ("ext_cmd_line_ptr", ctypes.c_uint32),       # 0x0C8
        ("_pad4", ctypes.c_uint8 * 112),             # 0x0CC
        ("cc_blob_address", ctypes.c_uint32),        # 0x13C
        ("edid_info", ctypes.c_uint8 * 0x80),        # 0x140
        ("efi_info", ctypes.c_uint8 * 0x20),         # 0x1C0
        ("alt_mem_k", ctypes.c_uint32),              # 0x1E0
        ("scratch", ctypes.c_uint32),                # 0x1E4
        ("e820_entries", ctypes.c_uint8),            # 0x1E8
        ("eddbuf_entries", ctypes.c_uint8),          # 0x1E9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),  # 0x1EA
        ("kbd_status", ctypes.c_uint8),              # 0x1EB
        ("secure_boot", ctypes.c_uint8),             # 0x1EC
        ("_pad5", ctypes.c_uint8 * 2),               # 0x1ED
        ("sentinel", ctypes.c_uint8),                # 0x1EF: nonzero makes Linux wipe fields
        ("_pad6", ctypes.c_uint8 * 1),               # 0x1F0
        ("hdr", SetupHeader),                        # 0x1F1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x1F1 - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),  # 0x290
        ("e820_table", E820EntryC * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2D0
        ("_pad8", ctypes.c_uint8 * 48),              # 0xCD0
        ("eddbuf", ctypes.c_uint8 * (6 * 82)),       # 0xD00: EDDMAXNR x struct edd_info
        ("_pad9", ctypes.c_uint8 * 276),             # 0xEEC
    ]


assert ctypes.sizeof(BootParams) == 4096
for _name, _off in (("acpi_rsdp_addr", 0x070), ("ext_ramdisk_image", 0x0C0),
                    ("ext_ramdisk_size", 0x0C4), ("ext_cmd_line_ptr", 0x0C8),
                    ("cc_blob_address", 0x13C), ("e820_entries", 0x1E8),
                    ("sentinel", 0x1EF), ("hdr", 0x1F1), ("edd_mbr_sig_buffer", 0x290),
                    ("e820_table", 0x2D0), ("eddbuf", 0xD00)):
    assert getattr(BootParams, _name).offset == _off, _name


# --- kernel command line for emulating KVMs -------------------------------

# Kernel parameters that keep a stock (Debian 6.1) kernel off instructions an
# emulating KVM (kvm_pvm on this host) cannot execute: measured there, failures
# come back as KVM_EXIT_INTERNAL_ERROR (emulation failure), and KVM_SET_CPUID2
# did not hide most features, so the command line is the lever
# (see shared/reference/README.md, "The emulating KVM here").
_EMULATION_SAFE_PARAMS: tuple[tuple[str, str], ...] = (
    ("clearcpuid="
     "xsave,smap,smep,rdrand,rdseed,popcnt,pcid,invpcid,fsgsbase,clflushopt,clwb,rdpid,"
     "avx,avx2,movbe,cx16,ssse3,sse4_1,sse4_2,pclmulqdq,aes",
     # xsave: xrstor/xsave in FPU context switching (noxsave is not a 6.1 parameter);
     # smap: clac/stac around user accesses; smep/pcid/invpcid: CR4 and TLB-flush
     # paths (invpcid); fsgsbase: wrfsbase/rdgsbase; rdrand/rdseed/rdpid/popcnt/movbe/
     # clflushopt/clwb: alternatives patched in when present; cx16: `lock cmpxchg16b`
     # in SLUB (the first failure seen); avx/avx2/ssse3/sse4_*/pclmulqdq/aes: SIMD
     # crypto/RAID code (`movd %ecx,%xmm15`, `ldmxcsr` were seen failing).
     "hide features whose instructions the emulator cannot run"),
    ("nofsgsbase", "no FSGSBASE instructions even if CPUID still shows the bit"),
    ("mitigations=off", "no retpoline/IBRS/verw sequences (MSR writes, odd instructions)"),
    ("nowatchdog", "no NMI/soft watchdog: emulated guests run far slower than wall time"),
    ("nosoftlockup", "without it a soft-lockup warning fires under emulation"),
    # The two below only make early boot cheaper to emulate (about 1 us per instruction
    # and per byte of `rep stosb` there); measured in bench/KVM_BOOT_NOTES.md.
    (f"nr_cpus={MAX_CPUS}",
     # Debian's NR_CPUS is 8192 and nr_cpu_ids stays 8192 until ACPI has counted the
     # CPUs, so numa_init walks 8192 CPUs (early_cpu_to_node/numa_set_node): ~0.6 s
     # emulated.  numavm never builds more than MAX_CPUS vCPUs, so this cap hides none:
     # the possible CPUs, APIC ids and their nodes are still the MADT's and SRAT's.
     "caps the possible CPUs at numavm's own limit: no 8192-CPU loops before SMP setup"),
    ("percpu_alloc=page",
     # The default "embed" allocator zeroes one 2 MiB atom per node group with an
     # inlined `rep stosb` in memblock_alloc (4 MiB here, ~2.9 s emulated); "page"
     # zeroes only the ~58 pages each CPU uses (still taken from the CPU's node).
     "first percpu chunk from node-local 4 KiB pages: 4x fewer bytes zeroed"),
)
EMULATION_SAFE_CMDLINE = " ".join(p for p, _why in _EMULATION_SAFE_PARAMS)


def emulation_safe_cmdline() -> str:
    """Parameters to add for hosts whose KVM emulates guest code (kvm_pvm)."""
    return EMULATION_SAFE_CMDLINE


# --- the kernel -----------------------------------------------------------

@dataclass(frozen=True)
class KernelImage:
    path: str
    format: str  # "bzImage" or "elf"
    compression: str | None  # the bzImage payload's format ("xz", ...), None for an ELF
    elf: ElfImage
    setup: SetupHeader | None  # the bzImage's setup header (a copy), None for an ELF
    setup_len: int  # bytes of `setup` the image defines (from 0x1F1)
    unpack_seconds: float  # host time spent decompressing (0 for an ELF)
    release: str | None  # the bzImage's version string ("6.1.0-... (...) #1 SMP ..."), if any
    vmlinux: bytes = field(repr=False)  # the ELF; segment data are views into it

    @property
    def entry(self) -> int:
        """Physical address of the 64-bit entry (startup_64)."""
        return self.elf.entry_paddr

    @property
    def load_addr(self) -> int:
        return self.elf.load_start

    @property
    def reserved(self) -> Range:
        """Memory the kernel owns from entry on: its image, and init_size if larger.

        init_size (bzImage) is what the kernel needs contiguously from its load
        address while starting; a bare ELF has only its segments (bss and brk
        included in p_memsz).
        """
        start = self.load_addr
        init = self.setup.init_size if self.setup is not None else 0
        return Range(start, max(self.elf.load_end, start + init))

    @property
    def cmdline_size(self) -> int:
        return self.setup.cmdline_size if self.setup is not None else COMMAND_LINE_SIZE

    @property
    def initrd_addr_max(self) -> int:
        return self.setup.initrd_addr_max if self.setup is not None else INITRD_ADDR_MAX


def parse_kernel(data: bytes | mmap.mmap, name: str = "kernel") -> KernelImage:
    """`load_kernel` on bytes already read; `name` is for messages."""
    if is_bzimage(data):
        bz = parse_bzimage(data, name)
        t0 = time.perf_counter()
        vmlinux, fmt = decompress_payload(bz.payload, name)
        dt = time.perf_counter() - t0
        if not is_elf(vmlinux):
            raise NumavmError(f"{name}: the {fmt} payload did not unpack to an ELF vmlinux")
        elf = parse_elf(vmlinux, f"{name} (unpacked vmlinux)")
        return KernelImage(name, "bzImage", fmt, elf, bz.header, bz.header_len, dt,
                           _release(data, bz.header), vmlinux)
    if is_elf(data):
        return KernelImage(name, "elf", None, parse_elf(data, name), None, 0, 0.0, None, data)
    raise NumavmError(f"{name}: neither a bzImage (no 'HdrS' header at 0x202) nor an ELF vmlinux")


def _release(data: bytes | mmap.mmap, hdr: SetupHeader) -> str | None:
    """The string kernel_version points at (offset from 0x200 in the image)."""
    if not hdr.kernel_version:
        return None
    start = 0x200 + hdr.kernel_version
    end = data.find(b"\0", start, start + 256)
    if end < 0:
        return None
    return data[start:end].decode("ascii", "replace")


def load_kernel(path: str | os.PathLike[str]) -> KernelImage:
    """Read a bzImage or an uncompressed vmlinux ELF from `path`."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            # Mapped, not read: a vmlinux's segments then go from the page cache straight into
            # guest memory, one copy instead of two (~0.7 s of a boot in the nested-SVM L1).
            # The mapping lives as long as views into it do (the boot plan's writes).
            empty = os.fstat(f.fileno()).st_size == 0
            data = b"" if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise NumavmError(f"kernel {name}: {e.strerror or e}") from e
    return parse_kernel(data, name)


# --- the boot plan --------------------------------------------------------

@dataclass(frozen=True)
class BootPlan:
    writes: list[tuple[int, bytes | memoryview]]  # (guest-physical address, data)
    zero_ranges: list[Range]  # bss tails; already zero on fresh memory (see module doc)
    rip: int  # startup_64, physical
    rsi: int  # the zero page
    boot_params: bytes  # the zero page as written (also in `writes`)
    boot_params_addr: int
    cmdline_addr: int
    cmdline: bytes  # NUL-terminated, as written
    kernel: Range  # the kernel's reservation (image and init_size)
    initrd: Range | None
    scratch: Range  # for the machine's page tables and GDT; nothing here writes it
    pvh_entry: int | None  # the ELF's PVH entry, for loaders that use it


def plan_boot(layout: Layout, kernel: KernelImage, initrd: bytes | None,
              cmdline: str) -> BootPlan:
    ram = sorted((Range(e.start, e.end) for e in layout.e820 if e.type == E820Type.RAM),
                 key=lambda r: r.start)
    kres = kernel.reserved
    initrd_len = len(initrd) if initrd else 0
    initrd_pages = _align_up(initrd_len, PAGE_SIZE)

    def too_small(what: str) -> NumavmError:
        need = _align_up(kres.end + initrd_pages, MiB) // MiB
        have = layout.topology.memory / MiB
        extra = f" plus {initrd_len / MiB:.1f} MiB for the initrd" if initrd_len else ""
        return NumavmError(
            f"guest RAM ({have:g} MiB) is too small: {what}; the kernel needs "
            f"[{kres.start / MiB:g} MiB, {kres.end / MiB:.1f} MiB){extra}, "
            f"so give the guest at least {need} MiB (Linux itself wants more to run)")

    if not _inside(kres, ram):
        raise too_small(f"no RAM range holds the kernel at {kres}")

    # Command line.
    raw = cmdline.encode()
    if b"\0" in raw:
        raise ConfigError("kernel command line: contains a NUL byte")
    limit = min(kernel.cmdline_size, CMDLINE_AREA_END - CMDLINE_ADDR - 1)
    if len(raw) > limit:
        raise ConfigError(f"kernel command line: {len(raw)} bytes, the kernel takes "
                          f"at most {limit}")
    cmd = raw + b"\0"

    # Initrd: the highest page-aligned spot in RAM below the kernel's limit.
    initrd_range = None
    if initrd:
        top = min(kernel.initrd_addr_max + 1, LOW_RAM_LIMIT)
        free = _subtract([Range(max(r.start, LEGACY_END), min(r.end, top)) for r in ram],
                         [kres])
        for r in sorted(free, key=lambda r: r.end, reverse=True):
            end = r.end - r.end % PAGE_SIZE
            start = end - initrd_pages
            if start >= r.start:
                initrd_range = Range(start, start + initrd_len)
                break
        else:
            raise too_small(f"no room for the {initrd_len}-byte initrd below "
                            f"{top:#x} outside the kernel")

    bp = _boot_params(layout, kernel, CMDLINE_ADDR, initrd_range)
    writes: list[tuple[int, bytes | memoryview]] = [
        (BOOT_PARAMS_ADDR, bp), (CMDLINE_ADDR, cmd)]
    zero: list[Range] = []
    for seg in kernel.elf.segments:
        if seg.filesz:
            writes.append((seg.paddr, seg.data))
        if seg.memsz > seg.filesz:
            zero.append(Range(seg.paddr + seg.filesz, seg.end))
    if initrd and initrd_range is not None:
        writes.append((initrd_range.start, initrd))

    _check_writes(writes, zero, ram)
    return BootPlan(
        writes=writes, zero_ranges=zero, rip=kernel.entry, rsi=BOOT_PARAMS_ADDR,
        boot_params=bp, boot_params_addr=BOOT_PARAMS_ADDR, cmdline_addr=CMDLINE_ADDR,
        cmdline=cmd, kernel=kres, initrd=initrd_range,
        scratch=Range(BOOT_SCRATCH_START, BOOT_SCRATCH_END), pvh_entry=kernel.elf.pvh_entry)


def _boot_params(layout: Layout, kernel: KernelImage, cmdline_addr: int,
                 initrd: Range | None) -> bytes:
    bp = BootParams()
    if kernel.setup is not None:
        # The bzImage's own header, as far as the image defines it (boot.rst).
        ctypes.memmove(ctypes.addressof(bp.hdr), ctypes.addressof(kernel.setup),
                       kernel.setup_len)
    else:
        h = bp.hdr
        h.boot_flag = BOOT_FLAG
        h.header = HDRS_MAGIC
        h.version = SYNTH_PROTOCOL
        h.kernel_alignment = KERNEL_ALIGNMENT
        h.xloadflags = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
        h.cmdline_size = COMMAND_LINE_SIZE
        h.initrd_addr_max = INITRD_ADDR_MAX
        h.pref_address = kernel.load_addr
        h.init_size = kernel.reserved.size
        h.vid_mode = 0xFFFF  # "normal" text mode: nothing to set up
    h = bp.hdr
    h.type_of_loader = LOADER_UNDEFINED
    h.loadflags |= LOADED_HIGH
    h.cmd_line_ptr = cmdline_addr & 0xFFFF_FFFF
    bp.ext_cmd_line_ptr = cmdline_addr >> 32
    if initrd is not None:
        h.ramdisk_image = initrd.start & 0xFFFF_FFFF
        bp.ext_ramdisk_image = initrd.start >> 32
        h.ramdisk_size = initrd.size & 0xFFFF_FFFF
        bp.ext_ramdisk_size = initrd.size >> 32
    bp.acpi_rsdp_addr = layout.rsdp_addr
    if len(layout.e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise NumavmError(f"{len(layout.e820)} e820 entries; the zero page holds "
                          f"{E820_MAX_ENTRIES_ZEROPAGE}")
    bp.e820_entries = len(layout.e820)
    for slot, e in zip(bp.e820_table, layout.e820):
        slot.addr, slot.size, slot.type = e.start, e.end - e.start, int(e.type)
    return bytes(bp)


def _check_writes(writes: list[tuple[int, bytes | memoryview]], zero: list[Range],
                  ram: list[Range]) -> None:
    """Every write in RAM, none overlapping another, the scratch area or the tables."""
    spans = [Range(a, a + len(d)) for a, d in writes if len(d)] + zero
    forbidden = [Range(0, BOOT_SCRATCH_END), Range(TABLE_AREA_START, LEGACY_END)]
    for s in spans:
        if not _inside(s, ram):
            raise NumavmError(f"boot data at {s} lies outside guest RAM")
        for f in forbidden:
            if s.start < f.end and f.start < s.end:
                raise NumavmError(f"boot data at {s} overlaps the reserved {f}")
    ordered = sorted(spans, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if a.end > b.start:
            raise NumavmError(f"boot data at {a} and {b} overlap")


def _inside(r: Range, ram: list[Range]) -> bool:
    return any(x.start <= r.start and r.end <= x.end for x in ram)


def _subtract(ranges: list[Range], holes: list[Range]) -> list[Range]:
    out: list[Range] = []
    for r in ranges:
        pieces = [r]
        for h in holes:
            nxt = []
            for p in pieces:
                if h.end <= p.start or p.end <= h.start:
                    nxt.append(p)
                    continue
                if p.start < h.start:
                    nxt.append(Range(p.start, h.start))
                if h.end < p.end:
                    nxt.append(Range(h.end, p.end))
            pieces = nxt
        out.extend(p for p in pieces if p.size > 0)
    return out


def _align_up(x: int, a: int) -> int:
    return -(-x // a) * a
