"""`numavm check` under TCG (auto on a host whose KVM emulates guest code) against the fastest
equivalent QEMU command, for both stages: the kernel's NUMA setup, and a busybox userspace."""

from __future__ import annotations

import gzip
import json
import os
import stat
import sys
import time

from numavm.spec import config
from numavm.vmm.engine import qemu_binary
from numavm.peers.export import qemu_args

from .proc import QEMU, ROOT, BenchError, Spawned, child_env, scratch, shell
from .runner import Bench, Side, median_ratio

READY = rb"Built \d+ zonelists"
USER_MARK = b"@@BENCH-USERSPACE@@"
TIMEOUT = float(os.environ.get("BENCH_CHECK_TIMEOUT", "300"))
QBOOT = "/usr/share/qemu/qboot.rom"
GOAL = "≤ 1 × fastest QEMU-TCG"


def numavm_argv(stage: str) -> list[str]:
    return [sys.executable, "-m", "numavm", "check", "--stage", stage, "--accel", "auto", "--json"]


def numavm_sample(stage: str, info: list[dict]) -> float:
    """Launch to numavm's exit: the verdict is printed, everything is released."""
    with Spawned(numavm_argv(stage), env=child_env(), cwd=str(ROOT)) as c:
        rc = c.finish(TIMEOUT)
        t = time.monotonic() - c.t0
        try:
            doc = json.loads(bytes(c.out))
        except ValueError:
            raise BenchError(f"numavm check printed no JSON (exit {rc}): {c.err[-300:]!r}") from None
        info.append({"match": doc.get("match"), "boot": doc.get("boot"), "engine": doc.get("engine")})
        if rc != 0 or not doc.get("match"):
            raise BenchError(f"numavm check exit {rc}: {doc.get('mismatches')}")
    return t


def guest_side() -> tuple[str, dict[str, str]]:
    """The vmlinux and the kernel command line numavm's TCG engine uses, per stage."""
    from numavm.guest.launch import guest_assets, kernel_cmdline, tcg_cmdline

    assets = guest_assets(None, lambda s: None)
    return str(assets.vmlinux), {st: tcg_cmdline(kernel_cmdline(st, False)) for st in ("kernel", "userspace")}


def minimal_initrd() -> str:
    """busybox and an /init that prints a marker and powers off: the least a userspace can be."""
    from numavm.guest.assets import cached, fetch
    from numavm.guest.initramfs import Entry, cpio_newc

    busybox = (cached() or fetch(log=lambda s: None)).busybox
    init = b"#!/bin/sh\necho " + USER_MARK + b"\n/bin/busybox poweroff -f\n"
    entries = [Entry("bin", stat.S_IFDIR | 0o755), Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
               Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"), Entry("dev", stat.S_IFDIR | 0o755),
               Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)), Entry("init", stat.S_IFREG | 0o755, init)]
    return str(scratch("bench-minimal-initrd.cpio.gz", gzip.compress(cpio_newc(entries), 6, mtime=0)))


def qemu_argv(vmlinux: str, cmdline: str, initrd: str | None) -> list[str]:
    topo = config.example().build()
    bios = ["-bios", QBOOT] if os.path.exists(QBOOT) else []
    # numavm's own TCG tuning too: one TCG thread for more vCPUs than host cores, no HPET
    threads = "multi" if (os.cpu_count() or 1) > topo.cpus else "single"
    return [QEMU or "qemu-system-x86_64", "-accel", f"tcg,thread={threads}", *bios, *qemu_args(topo),
            "-machine", "hpet=off", "-kernel", vmlinux,
            *(["-initrd", initrd] if initrd else []), "-append", cmdline, "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]


def qemu_sample(argv: list[str], marker: bytes) -> float:
    if QEMU is None:
        raise BenchError("qemu-system-x86_64 not installed")
    with Spawned(argv) as q:
        if marker == READY:
            return q.wait_for_re(READY, TIMEOUT)
        return q.wait_for(marker, TIMEOUT)


def benches(quick: bool) -> list[Bench]:
    titles = {"kernel": "check --stage kernel (TCG): launch to verdict vs QEMU launch to \"Built N zonelists\"",
              "userspace": "check --stage userspace (TCG): launch to verdict vs QEMU launch to busybox /init"}
    if not qemu_binary():
        why = "qemu-system-x86_64 not installed"
        return [Bench("check-tcg", "check", titles[s], "s", Side("numavm", None, missing=why), [], skipped=why)
                for s in titles]
    try:
        vmlinux, cmdlines = guest_side()
        initrd = minimal_initrd()
    except Exception as e:  # no apt, no network: say so in the table
        why = f"guest assets unavailable: {e}"
        return [Bench("check-tcg", "check", titles[s], "s", Side("numavm", None, missing=why), [], skipped=why)
                for s in titles]
    out = []
    for stage in ("kernel", "userspace"):
        info: list[dict] = []
        n_argv = numavm_argv(stage)
        q_argv = qemu_argv(vmlinux, cmdlines[stage], initrd if stage == "userspace" else None)
        marker = READY if stage == "kernel" else USER_MARK
        n = Side("numavm", (lambda st=stage, inf=info: numavm_sample(st, inf)), command=shell(n_argv))
        q = Side("QEMU-TCG", (lambda a=q_argv, m=marker: qemu_sample(a, m)), command=shell(q_argv))

        def met(b: Bench, n: Side = n, q: Side = q) -> str:
            r = median_ratio(n, q)
            return "n/a" if r is None else ("met" if r <= 1.0 else "not met") + f" ({r:.2f} × QEMU-TCG)"

        def extra(b: Bench, info: list[dict] = info) -> list[str]:
            return ["numavm check's verdicts: " + "; ".join(f"match={i['match']} engine={i['engine']} ({i['boot']})"
                                                            for i in info)] if info else []

        notes = [
            "numavm: `" + shell(n_argv[1:]) + "`, timed from spawn to process exit (the verdict printed, QEMU "
            "gone, guest memory released): Python start and imports, plan, assets, initramfs (cached), guest memory, "
            "QEMU start, the RAM-layout and CPU checks over QMP, the guest, teardown.",
            "QEMU: the fastest equivalent command typed by hand — TCG, qboot, the same PVH vmlinux numavm "
            "unpacks and caches, `numavm export --to qemu` of the example (QEMU builds its own SRAT/SLIT), "
            f"`-serial stdio`, and numavm's own kernel command line for this stage (`{cmdlines[stage]}`); timed "
            "from spawn to the marker on its console, then killed.",
        ]
        if stage == "kernel":
            notes.append("Marker: the kernel's `Built N zonelists` line (numavm check stops its guest there too "
                         "and parses the log up to it).")
        else:
            notes.append("QEMU's initramfs is busybox with an /init that echoes a marker and powers off "
                         "(gzip, built here); numavm's /init also reads sysfs and prints the topology report.")
        out.append(Bench("check-tcg", "check", titles[stage], "s", n, [q], runs=5, warmup=1,
                         goal=GOAL, goal_met=met, extra=extra, notes=notes))
    return out
