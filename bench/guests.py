"""Tiny guest programs: 64-bit code for KvmMachine and 64 KiB firmware images for QEMU.

numavm's side starts its boot vCPU in long mode (numavm.vmm.kvm.cpu builds the page
tables and GDT); QEMU's side starts at the x86 reset vector in real mode from
a `-bios` image that holds only our few instructions (no SeaBIOS, no option
ROMs): the first instruction the vCPU executes is ours, on both sides.
"""

from __future__ import annotations

import struct

from numavm.vmm.kvm import cpu as cpumode
from numavm.plan.layout import Layout

GDT_ADDR = 0x7000
PROGRAM_ADDR = 0x8000
PT_ADDR = 0x10000

MARK_PORT = 0x98  # start/end markers (numavm: a device that timestamps them)
LOOP_PORT = 0x99  # unhandled on both numavm and QEMU's pc
COM1 = 0x3F8
DEBUG_EXIT_PORT = 0xF4  # QEMU's isa-debug-exit (iobase=0xf4,iosize=1)
QEMU_DEBUG_EXIT = ["-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=1"]

HALT64 = bytes.fromhex("f4ebfd")  # hlt; jmp hlt


def first_out_program() -> bytes:
    """64-bit: one `out MARK_PORT, al`, then halt."""
    return bytes.fromhex("b021" f"e6{MARK_PORT:02x}") + HALT64


def out_loop_program(n: int) -> bytes:
    """64-bit: mark, `n` x `out LOOP_PORT, al`, mark, halt."""
    return (bytes.fromhex(f"b021e6{MARK_PORT:02x}")            # mov al,0x21; out MARK,al
            + b"\xb9" + struct.pack("<I", n)                     # mov ecx, n
            + bytes.fromhex(f"e6{LOOP_PORT:02x}" "ffc9" "75fa")  # L: out LOOP,al; dec ecx; jnz L
            + bytes.fromhex(f"e6{MARK_PORT:02x}")                # out MARK,al
            + HALT64)


def load_long_mode(machine, program: bytes, *, all_vcpus: bool = False) -> None:
    """Copy `program`, a GDT and identity page tables into `machine` and point
    the boot vCPU (or every vCPU) at it."""
    layout: Layout = machine.layout
    tables = cpumode.identity_page_tables(PT_ADDR, max(layout.ram_top, 4 << 30))
    machine.load([(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, program), (PT_ADDR, tables)])
    state = cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR)
    if all_vcpus:
        machine.start_all(lambda i: state)
    else:
        machine.set_boot_state(state)


# ---------------------------------------------------------------- QEMU firmware

def _bios(code: bytes) -> bytes:
    """A 64 KiB image mapped at 0xF0000 (and below 4 GiB): `code` at F000:0000,
    reached from the reset vector F000:FFF0 by a far jump."""
    img = bytearray(b"\xf4" * 0x10000)
    img[:len(code)] = code
    img[0xFFF0:0xFFF5] = bytes.fromhex("ea0000" "00f0")  # jmp far F000:0000
    return bytes(img)


def bios_first_byte() -> bytes:
    """Real mode: write '!' to COM1, then halt."""
    return _bios(bytes.fromhex("baf803" "b021" "ee" "f4ebfd"))  # mov dx,3f8; mov al,'!'; out dx,al


def bios_out_loop(n: int) -> bytes:
    """Real mode: 'S' on COM1, `n` x `out LOOP_PORT, al`, 'E' on COM1, isa-debug-exit."""
    return _bios(bytes.fromhex("baf803" "b053" "ee")            # mov dx,3f8; mov al,'S'; out dx,al
                 + b"\x66\xb9" + struct.pack("<I", n)           # mov ecx, n
                 + bytes.fromhex(f"e6{LOOP_PORT:02x}" "6649" "75fa")  # L: out LOOP,al; dec ecx; jnz L
                 + bytes.fromhex("b045" "ee")                   # mov al,'E'; out dx,al
                 + bytes.fromhex(f"b000e6{DEBUG_EXIT_PORT:02x}")  # mov al,0; out DEBUG_EXIT,al
                 + bytes.fromhex("f4ebfd"))
