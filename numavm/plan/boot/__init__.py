"""Loading Linux: the bzImage and ELF parsers and the boot plan.

Everything here is pure: it reads kernel files and returns what the machine
layer must write where in guest memory, and the register values to start with.
"""

from __future__ import annotations

from numavm.plan.boot.bzimage import BzImage, SetupHeader, decompress_payload, parse_bzimage
from numavm.plan.boot.elf import ElfImage, LoadSegment, parse_elf
from numavm.plan.boot.linux import (
    BOOT_PARAMS_ADDR,
    BOOT_SCRATCH_END,
    BOOT_SCRATCH_START,
    CMDLINE_ADDR,
    EMULATION_SAFE_CMDLINE,
    BootParams,
    BootPlan,
    E820EntryC,
    KernelImage,
    emulation_safe_cmdline,
    load_kernel,
    parse_kernel,
    plan_boot,
)

__all__ = [
    "BOOT_PARAMS_ADDR", "BOOT_SCRATCH_END", "BOOT_SCRATCH_START", "CMDLINE_ADDR",
    "EMULATION_SAFE_CMDLINE", "BootParams", "BootPlan", "BzImage", "E820EntryC",
    "ElfImage", "KernelImage", "LoadSegment", "SetupHeader", "decompress_payload",
    "emulation_safe_cmdline", "load_kernel", "parse_bzimage", "parse_elf",
    "parse_kernel", "plan_boot",
]
