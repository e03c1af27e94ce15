"""Row 4: the monitor's own resident memory, beside guest RAM, for the example."""

from __future__ import annotations

import sys

from numavm.spec import config
from numavm.peers.export import qemu_args

from .proc import QEMU, BenchError, Qmp, python_child, shell, smaps_rss
from .runner import Bench, Side

MiB = 1 << 20
GUEST_MIN = 256 * MiB  # guest RAM on either side: the example's domains are 512 MiB and up
extra_info: dict[str, list[float]] = {"numavm_guest": [], "qemu_guest": []}


def split(pid: int, is_guest) -> tuple[float, float]:
    """(monitor MiB, guest RAM resident MiB) of `pid` from its smaps."""
    maps = smaps_rss(pid)
    guest = sum(r for name, size, r in maps if is_guest(name, size))
    total = sum(r for _, _, r in maps)
    return (total - guest) / MiB, guest / MiB


def numavm_sample() -> float:
    with python_child(["rss", "example"], stdin=True) as c:
        c.wait_for(b"ready\n", 120)
        mon, guest = split(c.pid, lambda name, size: size >= GUEST_MIN)
        c.finish(60)
    extra_info["numavm_guest"].append(guest)
    return mon


def qemu_argv_tail() -> list[str]:
    return ["-S", *qemu_args(config.example().build())]


def qemu_sample() -> float:
    if QEMU is None:
        raise BenchError("qemu-system-x86_64 not installed")
    with Qmp(qemu_argv_tail()) as q:
        q.ready()
        mon, guest = split(q.spawned.pid, lambda name, size: size >= GUEST_MIN)
    extra_info["qemu_guest"].append(guest)
    return mon


def benches(quick: bool) -> list[Bench]:
    n = Side("numavm", numavm_sample, command=f"PYTHONPATH=. {sys.executable} -m bench.child rss example")
    q = Side("QEMU-KVM", qemu_sample, command=shell([QEMU or "qemu-system-x86_64", "-accel", "kvm",
                                                      "-display", "none", "-nodefaults", "-qmp", "stdio",
                                                      *qemu_argv_tail()]))

    def met(b: Bench) -> str:
        a, p = b.numavm.ok(), q.ok()
        if not a or not p:
            return "n/a"
        ma, mp = sorted(a)[len(a) // 2], sorted(p)[len(p) // 2]
        return ("met" if ma <= mp else "not met") + f" ({ma:.0f} vs {mp:.0f} MiB)"

    def extra(b: Bench) -> list[str]:
        g = extra_info
        out = []
        if g["numavm_guest"]:
            out.append(f"guest RAM resident beside it (median): numavm {sorted(g['numavm_guest'])[len(g['numavm_guest']) // 2]:.2f} MiB"
                       + (f", QEMU {sorted(g['qemu_guest'])[len(g['qemu_guest']) // 2]:.2f} MiB" if g["qemu_guest"] else ""))
        return out

    return [Bench("rss", "rss", "Monitor resident memory beside guest RAM, example", "MiB", n, [q],
                  goal="≤ QEMU", goal_met=met, extra=extra, notes=[
        "Definition: the process's resident memory (sum of Rss over /proc/PID/smaps) minus the resident "
        "pages of its guest-RAM mappings, with the machine built and idle, before any guest instruction: "
        "numavm after KvmMachine(...) (guest memory, VM, vCPUs, CPUID, ACPI tables written), QEMU at `-S` once QMP "
        "answers `query-status`.",
        "Guest-RAM mappings: on both sides the mappings of 256 MiB or more (the example's domains are "
        "1 GiB, 1 GiB, 512 MiB: numavm's anonymous memory, cross-checked in the child with "
        "GuestMemory.audit(), and QEMU's memory backends; nothing else either maps is that large).",
        "numavm's figure is the whole Python process: interpreter, numavm and its imports, the vCPU "
        "structures (kvm_run pages); QEMU's includes its firmware/ROM copies and device state."])]
