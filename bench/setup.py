"""Row 2: setup, launch to the guest's first instruction (seen as its first port write)."""

from __future__ import annotations

import json
import sys

from numavm.peers.export import qemu_args

from .child import topology
from .guests import bios_first_byte
from .proc import BenchError, Spawned, need_qemu, python_child, scratch, shell, QEMU
from .runner import Bench, Side

TIMEOUT = 120


def numavm_sample(topo: str, phases: list[dict]) -> float:
    with python_child(["setup", topo]) as c:
        t = c.wait_for(b"!", TIMEOUT)
        rc = c.finish(TIMEOUT)
        if rc != 0:
            raise BenchError(f"child exit {rc}: {c.err.decode(errors='replace')[-300:]}")
        try:
            phases.append(json.loads(c.err.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
    return t


def qemu_argv(topo: str) -> list[str]:
    bios = scratch("first-byte.bin", bios_first_byte())
    return [QEMU or "qemu-system-x86_64", "-accel", "kvm", *qemu_args(topology(topo)), "-bios", str(bios),
            "-display", "none", "-nodefaults", "-monitor", "none", "-serial", "stdio"]


def qemu_sample(topo: str) -> float:
    need_qemu()
    with Spawned(qemu_argv(topo)) as q:
        return q.wait_for(b"!", TIMEOUT)


def _phases_line(phases: list[dict]) -> list[str]:
    if not phases:
        return []
    keys = ["imports", "build", "load", "run_to_exit", "teardown"]
    med = {k: sorted(p[k] for p in phases)[len(phases) // 2] * 1000 for k in keys if k in phases[0]}
    return ["numavm phases inside the child (median, ms; interpreter start-up before `import` is the "
            "rest of the launch time): " + ", ".join(f"{k} {v:.1f}" for k, v in med.items())]


def make(topo: str, key: str, title: str, goal: str, limit: float | None) -> Bench:
    phases: list[dict] = []
    n = Side("numavm", lambda: numavm_sample(topo, phases),
             command=f"PYTHONPATH=. {sys.executable} -m bench.child setup {topo}   "
                     "# prints ! at the first port exit")
    q = Side("QEMU-KVM", lambda: qemu_sample(topo), command=shell(qemu_argv(topo)))

    def met(b: Bench) -> str:
        m = b.numavm.ok()
        if limit is None or not m:
            return "n/a"
        v = sorted(m)[len(m) // 2]
        return ("met" if v <= limit else "not met") + f" (median {v:.3f} s)"

    return Bench(key, "setup", title, "s", n, [q], goal=goal, goal_met=met if limit else None,
                 extra=lambda b: _phases_line(phases), notes=[
        "Launch to the guest's first instruction, observed as the guest's first port write: the harness "
        "spawns the process and stops the clock when the byte it causes arrives on the child's stdout.",
        "numavm: a fresh `python -m bench.child setup` (interpreter start-up, `import numavm`, "
        "plan_layout, KvmMachine(...) — guest memory, mbind, VM, vCPUs, CPUID, ACPI tables —, loading a "
        "3-instruction 64-bit program, KvmMachine.run() starting every vCPU thread); the boot vCPU's first "
        "instruction is `out 0x98, al`, whose handler writes `!` to stdout. Teardown is not timed.",
        "QEMU: `qemu-system-x86_64 -accel kvm` with `numavm export --to qemu`'s options for the same "
        "topology and, as firmware, a 64 KiB `-bios` image holding only `mov dx,0x3f8; mov al,'!'; "
        "out dx,al; hlt` reached from the reset vector — no SeaBIOS, so QEMU's first guest instruction is "
        "ours too; `!` arrives through its 16550 on `-serial stdio`. Killed once seen.",
        "Both sides: guest RAM is not prefaulted, and the other vCPUs are created but wait for INIT/SIPI."])


def benches(quick: bool) -> list[Bench]:
    return [make("example", "setup-example", "Setup: launch to first guest instruction, example",
                 "≤ 0.3 s", 0.3),
            make("64:64:32", "setup-64x64", "Setup: launch to first guest instruction, 64 domains × 64 vCPUs "
                 "(32 MiB each)", "", None)]
