"""Row 6: scale — KvmMachine setup (and, with --scale-boots, `numavm check --stage kernel`) at
8/64/256 domains and 64/256/1024 vCPUs."""

from __future__ import annotations

import os
import sys

from numavm.vmm.engine import detect

from .proc import BenchError, shell
from .runner import Bench, Side
from .setup import numavm_sample as setup_sample

CONFIGS = [(8, 64), (64, 64), (256, 255), (256, 256), (64, 256), (64, 1024), (256, 1024)]
DOMAIN_MIB = 16
BOOT_TIMEOUT = float(os.environ.get("BENCH_SCALE_BOOT_TIMEOUT", "900"))


def check_argv(d: int, c: int) -> list[str]:
    """`numavm check --stage kernel` with the engine auto picks: TCG up to QEMU pc's 255 vCPUs
    on a host whose KVM emulates guest code, KVM otherwise."""
    from .boot import numavm_argv
    per = max(1, c // d)
    with_cpus = min(d, c)  # with fewer vCPUs than domains, the last domains are memory-only
    opts: list[str] = []
    for i in range(d):
        if i >= with_cpus:
            opts += ["-n", f"id={i},size={DOMAIN_MIB}M"]
            continue
        lo, hi = i * per, (c - 1 if i == with_cpus - 1 else i * per + per - 1)
        opts += ["-n", f"id={i},size={DOMAIN_MIB}M,cpus={lo}-{hi}" if hi > lo else f"id={i},size={DOMAIN_MIB}M,cpus={lo}"]
    argv = numavm_argv(["--timeout", str(BOOT_TIMEOUT), *opts])
    k = argv.index("--accel")
    argv[k + 1] = "auto"
    return argv


def boot_sample(d: int, c: int) -> float:
    from .boot import numavm_sample
    info: list[dict] = []
    t = numavm_sample(check_argv(d, c), info)
    if info and info[0].get("match") is False:
        raise BenchError(f"reached NUMA-ready in {t:.1f} s but check reported a mismatch: {info[0]['boot']}")
    return t


def benches(quick: bool) -> list[Bench]:
    if quick:
        return [Bench("scale", "scale", "Scale", "s", Side("numavm", None), [],
                      skipped="--quick: scale runs skipped")]
    boots = os.environ.get("BENCH_SCALE_BOOTS") == "1"
    host = detect()
    out = []
    for d, c in CONFIGS:
        topo = f"{d}:{c}:{DOMAIN_MIB}"
        phases: list[dict] = []
        s = Side("numavm KvmMachine setup", lambda t=topo, p=phases: setup_sample(t, p),
                 command=f"PYTHONPATH=. {sys.executable} -m bench.child setup {topo}")
        peers = []
        if boots:
            peers.append(Side("numavm check --stage kernel", lambda d=d, c=c: boot_sample(d, c),
                              command=shell(check_argv(d, c))))
        from .setup import _phases_line
        out.append(Bench(f"scale-{d}x{c}", "scale", f"Scale: {d} domains × {c} vCPUs ({DOMAIN_MIB} MiB each)",
                         "s", s, peers, runs=1, warmup=0, extra=lambda b, p=phases: _phases_line(p), notes=[
            "numavm only (QEMU's `pc` machine stops at 255 vCPUs). Launch to the boot vCPU's first "
            "instruction as in the setup row, one run. The second column, when present (environment "
            "BENCH_SCALE_BOOTS=1), is launch to `Built N zonelists` under `numavm check --stage kernel "
            f"--accel auto` (the engine it picked is in the row's notes), one run, timeout {BOOT_TIMEOUT:g} s "
            "(BENCH_SCALE_BOOT_TIMEOUT)."
            + ("" if boots else f" Kernel-stage boots at scale were not run here: on this host "
               f"({host.reason}) one example boot already takes tens of seconds.")]))
    return out
