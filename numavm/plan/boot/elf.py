"""ELF64 loading of an x86-64 ``vmlinux``: segments, entry point, PVH note.

Only what a loader needs: PT_LOAD segments by physical address (p_paddr;
the kernel is linked at virtual 0xffffffff81000000 and physical 16 MiB, and
its per-CPU segment has virtual address 0), the 64-bit entry (startup_64)
as a physical address, and the Xen PVH entry note that QEMU's ``-kernel``
uses to boot the same ELF in 32-bit protected mode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from numavm.errors import NumavmError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC = 2
ET_DYN = 3

PT_LOAD = 1
PT_NOTE = 4

XEN_ELFNOTE_PHYS32_ENTRY = 18  # PVH: 32-bit physical entry (arch/x86/platform/pvh/head.S)
XEN_NOTE_NAME = b"Xen"

# e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
# e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")  # namesz, descsz, type
assert _EHDR.size == 64 and _PHDR.size == 56


@dataclass(frozen=True)
class LoadSegment:
    paddr: int
    vaddr: int
    data: memoryview  # p_filesz bytes of the file, not copied
    memsz: int  # >= len(data); the rest is zero (bss)

    @property
    def end(self) -> int:
        return self.paddr + self.memsz

    @property
    def filesz(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ElfImage:
    segments: tuple[LoadSegment, ...]  # in file order
    entry: int  # e_entry as written in the file
    entry_paddr: int  # the 64-bit entry's physical address
    pvh_entry: int | None  # XEN_ELFNOTE_PHYS32_ENTRY, a physical address, if present
    notes: tuple[tuple[bytes, int, bytes], ...]  # (name, type, desc) from PT_NOTE

    @property
    def load_start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def load_end(self) -> int:
        return max(s.end for s in self.segments)


def is_elf(data: bytes | memoryview) -> bool:
    return bytes(data[:4]) == ELF_MAGIC


def parse_elf(data: bytes | memoryview, name: str = "vmlinux") -> ElfImage:
    """Parse an x86-64 ELF64 executable; segment data are views into `data`."""
    view = memoryview(data).cast("B")
    if len(view) < _EHDR.size or not is_elf(view):
        raise NumavmError(f"{name}: not an ELF file")
    (ident, e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, *_rest) = _EHDR.unpack_from(view, 0)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or e_machine != EM_X86_64:
        raise NumavmError(f"{name}: not a little-endian x86-64 ELF64 "
                          f"(class {ident[4]}, data {ident[5]}, machine {e_machine})")
    if e_type not in (ET_EXEC, ET_DYN):
        raise NumavmError(f"{name}: ELF type {e_type} is not an executable")
    if e_phentsize != _PHDR.size or e_phoff + e_phnum * _PHDR.size > len(view):
        raise NumavmError(f"{name}: bad program header table")

    segments: list[LoadSegment] = []
    notes: list[tuple[bytes, int, bytes]] = []
    for i in range(e_phnum):
        p_type, _pf, off, vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            view, e_phoff + i * _PHDR.size)
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if off + filesz > len(view):
            raise NumavmError(f"{name}: segment {i} [{off:#x}, {off + filesz:#x}) lies "
                              f"outside the {len(view)}-byte file")
        if p_type == PT_LOAD:
            if memsz < filesz:
                raise NumavmError(f"{name}: segment {i} has p_memsz < p_filesz")
            if memsz:
                segments.append(LoadSegment(paddr, vaddr, view[off:off + filesz], memsz))
        else:
            notes.extend(_notes(view[off:off + filesz]))
    if not segments:
        raise NumavmError(f"{name}: no PT_LOAD segment")
    _check_overlaps(segments, name)

    pvh = None
    for nname, ntype, desc in notes:
        if nname == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            pvh = int.from_bytes(desc, "little")  # .long or .quad (_ASM_PTR) by build
    return ElfImage(segments=tuple(segments), entry=e_entry,
                    entry_paddr=_entry_paddr(e_entry, segments, name),
                    pvh_entry=pvh, notes=tuple(notes))


def _entry_paddr(entry: int, segments: list[LoadSegment], name: str) -> int:
    """e_entry as a physical address.

    e_entry of an x86-64 vmlinux may be startup_64's virtual address; Linux's
    linker script says ENTRY(phys_startup_64), so current kernels (Debian's
    6.1 included: 0x1000000) store the physical one.  Accept both: a virtual address
    inside a segment is translated through it (p_vaddr -> p_paddr); else a
    physical address inside a segment is used as is.  Virtual is tried first
    except for the per-CPU segment, whose p_vaddr is 0 and would capture
    small addresses.
    """
    for s in segments:
        if s.vaddr and s.vaddr <= entry < s.vaddr + s.memsz:
            return s.paddr + (entry - s.vaddr)
    for s in segments:
        if s.paddr <= entry < s.end:
            return entry
    raise NumavmError(f"{name}: entry point {entry:#x} is in no loadable segment")


def _check_overlaps(segments: list[LoadSegment], name: str) -> None:
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if a.end > b.paddr:
            raise NumavmError(f"{name}: segments at {a.paddr:#x} and {b.paddr:#x} overlap")


def _notes(blob: memoryview) -> list[tuple[bytes, int, bytes]]:
    """ELF notes: 12-byte header, name and desc each padded to 4 bytes."""
    out = []
    pos = 0
    while pos + _NHDR.size <= len(blob):
        namesz, descsz, ntype = _NHDR.unpack_from(blob, pos)
        pos += _NHDR.size
        name_end = pos + namesz
        desc_start = pos + (-(-namesz // 4) * 4)
        desc_end = desc_start + descsz
        if desc_end > len(blob):
            break
        out.append((bytes(blob[pos:name_end]).rstrip(b"\0"), ntype,
                    bytes(blob[desc_start:desc_end])))
        pos = desc_start + (-(-descsz // 4) * 4)
    return out
