"""Row 5: the cost of one port I/O exit, and the share of it spent in Python."""

from __future__ import annotations

import json
import sys

from .cbuild import kvmloop_so
from .guests import QEMU_DEBUG_EXIT, bios_out_loop
from .proc import QEMU, BenchError, Spawned, python_child, scratch, shell
from .runner import Bench, Side, median_ratio

TIMEOUT = 600


def numavm_sample(n: int, variant: str, so: str | None = None) -> float:
    args = ["exits", str(n), variant] + ([so] if so else [])
    with python_child(args) as c:
        rc = c.finish(TIMEOUT)
        if rc != 0:
            raise BenchError(f"child exit {rc}: {c.err.decode(errors='replace')[-300:]}")
        doc = json.loads(c.err.decode().strip().splitlines()[-1])
    return doc["seconds"] / n * 1e6


def qemu_argv(n: int) -> list[str]:
    bios = scratch(f"out-loop-{n}.bin", bios_out_loop(n))
    return [QEMU or "qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-smp", "1", "-m", "64M",
            "-bios", str(bios), *QEMU_DEBUG_EXIT, "-display", "none", "-nodefaults", "-monitor", "none",
            "-serial", "stdio"]


def qemu_sample(n: int) -> float:
    if QEMU is None:
        raise BenchError("qemu-system-x86_64 not installed")
    with Spawned(qemu_argv(n)) as q:
        t_s = q.wait_for(b"S", TIMEOUT)
        t_e = q.wait_for(b"E", TIMEOUT)
    return (t_e - t_s) / n * 1e6


def benches(quick: bool) -> list[Bench]:
    n = 20_000 if quick else 200_000
    so = kvmloop_so()
    full = Side("numavm", lambda: numavm_sample(n, "full"),
                command=f"PYTHONPATH=. {sys.executable} -m bench.child exits {n} full")
    qemu = Side("QEMU-KVM", lambda: qemu_sample(n), command=shell(qemu_argv(n)))
    bare = Side("bare KVM_RUN, Python loop", lambda: numavm_sample(n, "bare"),
                command=f"PYTHONPATH=. {sys.executable} -m bench.child exits {n} bare")
    c = Side("bare KVM_RUN, C loop", (lambda: numavm_sample(n, "c", str(so))) if so else None,
             missing="no C compiler", command=f"PYTHONPATH=. {sys.executable} -m bench.child exits {n} c {so}")

    def share(b: Bench) -> tuple[float | None, float | None]:
        r_c, r_bare = median_ratio(c, full), median_ratio(bare, full)
        return (None if r_c is None else 1 - r_c), (None if r_bare is None else 1 - r_bare)

    def met(b: Bench) -> str:
        s_c, _ = share(b)
        if s_c is None:
            return "n/a"
        return ("met" if s_c <= 0.10 else "not met") + f" (Python share {s_c:.0%})"

    def extra(b: Bench) -> list[str]:
        s_c, s_bare = share(b)
        out = []
        if s_c is not None:
            out.append(f"Python share of one exit = 1 − (C loop / numavm), median over rounds: **{s_c:.0%}**.")
        if s_bare is not None:
            out.append(f"numavm's dispatch alone (1 − bare Python loop / numavm): {s_bare:.0%}; the rest of "
                       "the Python share is the ctypes/fcntl call around the ioctl.")
        return out

    return [Bench("exits", "exits", "Port I/O exit: time per exit", "µs", full, [qemu, bare, c],
                  goal="Python share ≤ 10 %", goal_met=met, extra=extra, notes=[
        f"A 1-vCPU guest runs `out 0x98,al` (start mark), then {n:,} × `out 0x99,al` (a port nobody "
        "handles, on both sides) in a `dec ecx; jnz` loop, then the end mark; time per exit = time between "
        "the marks / N.",
        "numavm: KvmMachine.run() — a vCPU thread, KVM_RUN through ctypes, numavm's port dispatch (IoBus, "
        "unhandled-write counting, the I/O lock); the marks are timestamped (perf_counter) by a device on "
        "port 0x98, in the child.",
        "QEMU-KVM: the same loop in real mode from a 64 KiB `-bios` image; the marks are the bytes `S` and "
        "`E` on COM1 (`-serial stdio`), timestamped by the harness as they arrive; then isa-debug-exit.",
        "bare KVM_RUN, Python loop: the same vCPU and program, but the child's main thread only calls "
        "`vcpu.run()` N times (no dispatch). bare KVM_RUN, C loop: N × ioctl(KVM_RUN) from "
        "bench/kvmloop.c (compiled with cc at run time) on the same vCPU fd — the kernel round trip with "
        "no Python at all. Their ratio to numavm gives the Python share."])]
