"""The host, as the report states it."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from numavm.vmm.engine import detect

from .proc import QEMU


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def qemu_version() -> str:
    if QEMU is None:
        return "not installed"
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def host_nodes() -> str:
    try:
        return Path("/sys/devices/system/node/online").read_text().strip()
    except OSError:
        return "unknown"


def mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "unknown"


def host_lines() -> list[str]:
    virt = detect()
    emul = ("**yes** — guest code is emulated, not run natively (" + virt.reason + ")" if virt.emulated
            else "no (" + virt.reason + ")")
    return [f"- CPU: {cpu_model()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"host NUMA nodes online: {host_nodes()}, memory {mem_total()}",
            f"- Kernel: {platform.system()} {platform.release()}",
            f"- KVM: {'usable' if virt.kvm_usable else 'not usable'}; emulates guest code: {emul}",
            f"- QEMU: {qemu_version()}",
            f"- Python: {platform.python_version()}"]
