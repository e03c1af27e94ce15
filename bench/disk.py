"""Disk reads in the guest under TCG: numavm's engine (a pxb per domain, virtio-blk-pci on the fd
numavm checked) against plain QEMU-TCG with the same virtio-blk-pci on its root bus.

Both guests boot the same vmlinux (numavm's Debian kernel) and read the same 1 GiB raw image
(written once, random bytes, in the host's page cache after the warm-up), timed inside the
guest: a sequential read with busybox `dd iflag=direct bs=1M` (between two /proc/uptime
readings, 10 ms resolution), and 4 KiB O_DIRECT random reads by bench/randread.c (its own
monotonic clock).  numavm's initramfs loads the virtio modules itself
(numavm.guest.modules); QEMU's initramfs gets the same module files and insmods them in the
same order.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .proc import QEMU, ROOT, BenchError, Spawned, child_env, scratch, shell
from .runner import Bench, Side, median_ratio

IMAGE_SIZE = 1 << 30
QUICK_IMAGE_SIZE = 64 << 20
RANDOM_READS = 5000
TIMEOUT = 300.0
DONE = b"@@BENCH-DISK-DONE@@"
QBOOT = "/usr/share/qemu/qboot.rom"
MACHINE = ["-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M,cpus=1"]
SCRIPT = ("a=$(cut -d' ' -f1 /proc/uptime); "
          "dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null; "
          "b=$(cut -d' ' -f1 /proc/uptime); echo \"seq-seconds $a $b\"; "
          f"/randread /dev/vda {RANDOM_READS}; echo {DONE.decode()}")
_SEQ = re.compile(rb"seq-seconds ([0-9.]+) ([0-9.]+)")
_IOPS = re.compile(rb"randread \d+ reads in [0-9.]+ s: ([0-9.]+) IOPS")


def randread(where: Path | None = None) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler for bench/randread.c")
    out = (where or Path(tempfile.gettempdir())) / "numavm-bench-randread"
    src = Path(__file__).with_name("randread.c")
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run([cc, "-O2", "-static", "-o", str(out), str(src)], check=True)
    return out


def image(size: int, where: Path | None = None) -> Path:
    path = (where or Path(tempfile.gettempdir())) / f"numavm-bench-disk-{size >> 20}M.img"
    if not path.exists() or path.stat().st_size != size:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        tmp.replace(path)
    return path


def parse(out: bytes, size: int) -> tuple[float, float]:
    """(sequential MiB/s, random-read IOPS) from a guest's output."""
    s, r = _SEQ.search(out), _IOPS.search(out)
    if s is None or r is None:
        raise BenchError(f"no figures in the guest's output: {out[-300:]!r}")
    secs = float(s.group(2)) - float(s.group(1))
    if secs <= 0:
        raise BenchError("the sequential read took less than /proc/uptime's resolution")
    return (size >> 20) / secs, float(r.group(1))


def numavm_argv(img: Path, rr: Path) -> list[str]:
    return [sys.executable, "-m", "numavm", "run", "--accel", "tcg", *MACHINE,
            "--disk", f"{img},domain=1,readonly", "--add", f"{rr}:/randread",
            "--timeout", str(int(TIMEOUT)), "--", "sh", "-c", SCRIPT]


def qemu_initrd(modules: list[Path], rr: Path, script: str = SCRIPT) -> Path:
    from numavm.guest.assets import cached, fetch
    from numavm.guest.initramfs import Entry, cpio_newc

    busybox = (cached() or fetch(log=lambda s: None)).busybox
    init = b"#!/bin/sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n" \
           b"mount -t devtmpfs dev /dev\n" + b"".join(b"insmod /%s\n" % m.name.encode() for m in modules) + \
           script.encode() + b"\npoweroff -f\n"
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    entries = [Entry("bin", d), Entry("bin/busybox", f, busybox.read_bytes()),
               Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"), Entry("dev", d), Entry("proc", d), Entry("sys", d),
               Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)), Entry("init", f, init),
               *[Entry(m.name, f, m.read_bytes()) for m in modules], Entry("randread", f, rr.read_bytes())]
    return scratch("bench-disk-initrd.cpio.gz", gzip.compress(cpio_newc(entries), 6, mtime=0))


def qemu_argv(img: Path, vmlinux: str, initrd: Path) -> list[str]:
    from numavm.guest.launch import kernel_cmdline, tcg_cmdline
    from numavm.peers.export import qemu_args
    from numavm.api import Machine

    m = Machine(cpus=2, domains=[MACHINE[3], MACHINE[5]], disks=[f"{img},domain=1,readonly"])  # no pci=off
    cmdline = tcg_cmdline(kernel_cmdline("userspace", False, topology=m.topology), 2)
    threads = "multi" if (os.cpu_count() or 1) > 2 else "single"
    bios = ["-bios", QBOOT] if os.path.exists(QBOOT) else []  # a device on bus 0: Linux places its BARs
    return [QEMU or "qemu-system-x86_64", "-accel", f"tcg,thread={threads}", *bios, *qemu_args(m.topology),
            "-machine", "hpet=off", "-drive", f"file={img},if=none,format=raw,readonly=on,id=d0",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on", "-kernel", vmlinux, "-initrd", str(initrd),
            "-append", cmdline, "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-monitor", "none", "-no-reboot"]


def sample(argv: list[str], env: dict[str, str] | None, size: int, which: int) -> float:
    with Spawned(argv, env=env, cwd=str(ROOT)) as c:
        c.wait_for(DONE, TIMEOUT)
        return parse(bytes(c.out), size)[which]


def benches(quick: bool) -> list[Bench]:
    titles = ("Disk, TCG: sequential read of a {size} raw image in the guest, dd iflag=direct bs=1M",
              "Disk, TCG: 4 KiB O_DIRECT random reads in the guest ({n} reads)")
    size = QUICK_IMAGE_SIZE if quick else IMAGE_SIZE
    label = f"{size >> 20} MiB" if size < 1 << 30 else f"{size >> 30} GiB"
    names = [titles[0].format(size=label), titles[1].format(n=RANDOM_READS)]
    why = ""
    if QEMU is None:
        why = "qemu-system-x86_64 not installed"
    else:
        try:
            from numavm.guest.launch import guest_assets
            from numavm.guest.modules import device_modules

            assets = guest_assets(None, lambda s: None)
            assert assets.debian is not None
            modules = device_modules(assets.debian, ["virtio-blk"], lambda s: None)
            rr, img = randread(), image(size)
        except Exception as e:  # no apt, no network, no compiler: say so in the table
            why = f"guest assets unavailable: {e}"
    if why:
        return [Bench(f"disk-{k}", "disk", t, "MiB/s" if k == "seq" else "IOPS", Side("numavm", None, missing=why),
                      [], skipped=why) for k, t in zip(("seq", "rand"), names)]
    vmlinux = str(assets.vmlinux)
    n_argv = numavm_argv(img, rr)
    q_argv = qemu_argv(img, vmlinux, qemu_initrd(modules, rr))
    out = []
    for which, (key, unit) in enumerate((("seq", "MiB/s"), ("rand", "IOPS"))):
        n = Side("numavm-TCG", (lambda w=which: sample(n_argv, child_env(), size, w)), command=shell(n_argv))
        q = Side("QEMU-TCG", (lambda w=which: sample(q_argv, None, size, w)), command=shell(q_argv))

        def met(b: Bench, n: Side = n, q: Side = q) -> str:
            r = median_ratio(n, q)
            return "n/a" if r is None else ("met" if r >= 0.8 else "not met") + f" ({r:.2f} × QEMU-TCG)"

        notes = [
            "numavm: `numavm run --accel tcg` on two domains with the image as `--disk IMG,domain=1,readonly`: "
            "QEMU's pxb for domain 1's host bridge (root bus 1), virtio-blk-pci behind it at 0000:02:00.0 on "
            "a raw -blockdev over the fd numavm opened (`/dev/fdset/0`), SeaBIOS, numavm's SRAT/SLIT and "
            "_PXM SSDT; the guest's command is the script below, its output read from numavm's stdout.",
            "QEMU: the same vmlinux and kernel command line, `numavm export --to qemu` of the same two "
            "domains, qboot, `-drive file=IMG,if=none,format=raw,readonly=on` and "
            "`virtio-blk-pci,disable-legacy=on` on the root bus; an initramfs of busybox, the virtio "
            f"modules numavm's initramfs loads ({', '.join(m.name for m in modules)}) and randread, whose "
            "/init insmods them and runs the same script.",
            f"Guest script: `{SCRIPT}`. The figure is taken inside the guest, so boot time is not in it.",
        ]
        out.append(Bench(f"disk-{key}", "disk", names[which], unit, n, [q], runs=5, warmup=1,
                         higher_is_better=True, goal="≥ 0.8 × QEMU-TCG", goal_met=met, notes=notes))
    return out


# ---------------------------------------------------------------- KVM: numavm-KVM vs QEMU-KVM in L1
#
# `python -m bench.disk --l1 [--runs N] [--also-numavm ROOT] [--out BENCHMARKS.md]` boots one L1
# (bench/l1.py: a hardware-virtualization KVM under QEMU TCG) and runs in it, round after round,
# each side once per round (the order reversed every other round): numavm's KVM engine (this
# checkout, and any other checkout given with --also-numavm, e.g. main before a change) and
# QEMU-KVM, on the same image, kernel, command, modules and topology.  Round 0 is a warm-up
# (discarded).  Besides the figures in the guest, each side's CPU time in its threads other than the
# vCPUs is read from /proc over each phase (the device side: numavm's I/O thread, QEMU's main loop
# and thread pool), with the guest's request counts from /sys/block/vda/stat.

L1_SECTION = "## Disks on KVM (L1): numavm-KVM against QEMU-KVM's virtio-blk-pci"
L1_DIR = Path("/var/tmp")  # the host's image and randread: outside /tmp, which L1 covers with its own tmpfs
KVM_TIMEOUT = 900.0
_P_START, _P_MID, _P_DONE = "@@DISK-P0@@", "@@DISK-P1@@", "@@DISK-P2@@"
# Markers around each phase, each followed by a second of sleep in which the harness reads /proc.
def kvm_script(reads: int = RANDOM_READS) -> str:
    """Markers around each phase, each followed by a second of sleep in which the harness reads /proc."""
    return (f"echo \"vda-stat0 $(cat /sys/block/vda/stat)\"; echo {_P_START}; sleep 1; "
            "a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null; "
            "b=$(cut -d' ' -f1 /proc/uptime); echo \"seq-seconds $a $b\"; "
            f"echo \"vda-stat1 $(cat /sys/block/vda/stat)\"; echo {_P_MID}; sleep 1; "
            f"/randread /dev/vda {reads}; echo \"vda-stat2 $(cat /sys/block/vda/stat)\"; "
            f"echo {_P_DONE}; sleep 1; echo {DONE.decode()}")


def kvm_qemu_argv(img: Path, vmlinux: str, initrd: Path) -> list[str]:
    """QEMU-KVM with virtio-blk-pci on its root bus.  cache=writeback (QEMU's default): buffered
    preads through the host's page cache, which is what numavm's I/O thread does (no O_DIRECT);
    cache=none would be O_DIRECT, which the image's tmpfs in L1 refuses."""
    from numavm.api import Machine
    from numavm.guest.launch import kernel_cmdline
    from numavm.peers.export import qemu_args

    m = Machine(cpus=2, domains=[MACHINE[3], MACHINE[5]], disks=[f"{img},domain=1,readonly"])
    bios = ["-bios", QBOOT] if os.path.exists(QBOOT) else []
    return [QEMU or "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", *bios, *qemu_args(m.topology),
            "-drive", f"file={img},if=none,format=raw,readonly=on,cache=writeback,id=d0",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on", "-kernel", vmlinux, "-initrd", str(initrd),
            "-append", kernel_cmdline("userspace", False, topology=m.topology), "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]


def kvm_numavm_argv(img: Path, rr: Path, script: str) -> list[str]:
    return [sys.executable, "-m", "numavm", "run", "--accel", "kvm", *MACHINE,
            "--disk", f"{img},domain=1,readonly", "--add", f"{rr}:/randread",
            "--timeout", str(int(KVM_TIMEOUT)), "--", "sh", "-c", script]


def device_threads(pid: int) -> dict[int, tuple[int, int]]:
    """(user, system) clock ticks of each live thread of `pid` that has not run guest code
    (guest_time, stat field 43, is 0): the device side (numavm's I/O thread and console
    readers, QEMU's main loop and thread-pool workers).  Per thread, not the process total less
    the vCPU threads: the kernel scales a process's and each thread's times separately, and
    the difference of two large scaled sums came out negative."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                t = f.read().rsplit(")", 1)[1].split()  # field n is [n - 3]
        except OSError:
            continue
        if int(t[40]) == 0:
            out[int(tid)] = (int(t[11]), int(t[12]))
    return out


def cpu_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> list[float]:
    """[user, system] seconds the device threads used between two readings (a thread born in
    between counts from zero; one that ended in between is lost: QEMU's pool workers live
    10 s idle, longer than the gaps here)."""
    tick = os.sysconf("SC_CLK_TCK")
    u = sum(a[0] - before.get(t, (0, 0))[0] for t, a in after.items())
    s = sum(a[1] - before.get(t, (0, 0))[1] for t, a in after.items())
    return [u / tick, s / tick]


def _vmm_pid(root_pid: int) -> int:
    """The VMM process: `root_pid` itself (numavm's KVM engine, QEMU)."""
    return root_pid


def kvm_sample(argv: list[str], env: dict[str, str] | None, cwd: str, size: int) -> dict:
    out: dict = {}
    with Spawned(argv, env=env, cwd=cwd, stderr_to_stdout=True) as c:
        cpu = []
        for mark in (_P_START, _P_MID, _P_DONE):
            c.wait_for(mark.encode(), KVM_TIMEOUT)
            cpu.append(device_threads(_vmm_pid(c.pid)))
        c.wait_for(DONE, KVM_TIMEOUT)  # (wait_for's timeout counts from the spawn)
        text = bytes(c.out)
    out["seq"], out["iops"] = parse(text, size)
    stats = {m.group(1).decode(): [int(x) for x in m.group(2).split()]
             for m in re.finditer(rb"(vda-stat\d) ([\d ]+)", text)}
    reads = [stats[f"vda-stat{k}"][0] for k in range(3)]  # reads completed
    out["seq_requests"], out["rand_requests"] = reads[1] - reads[0], reads[2] - reads[1]
    out["seq_cpu"], out["rand_cpu"] = cpu_between(cpu[0], cpu[1]), cpu_between(cpu[1], cpu[2])  # user, system
    return out


def _console(line: str) -> None:
    """A line on stderr and on L1's console, which the host keeps even when L1 stalls."""
    print(line, file=sys.stderr, flush=True)
    try:
        with open("/dev/console", "w") as con:
            con.write(line + "\n")
    except OSError:
        pass


L1_SAMPLE = "@@L1DISK "


def inner_kvm(runs: int, host_image: Path, host_rr: Path, roots: list[str], reads: int) -> int:
    """In L1: the image copied into L1's tmpfs (the same bytes for every side, in L1's RAM), then
    the rounds.  Each sample goes to L1's console as it ends."""
    import json

    from numavm.guest.launch import guest_assets
    from numavm.guest.modules import device_modules

    img = Path(os.environ.get("TMPDIR", "/tmp")) / host_image.name
    t0 = time.monotonic()
    shutil.copyfile(host_image, img)
    _console(f"l1disk: image copied into L1's tmpfs in {time.monotonic() - t0:.0f} s")
    size = img.stat().st_size
    assets = guest_assets(None, lambda s: None)
    assert assets.debian is not None
    modules = device_modules(assets.debian, ["virtio-blk"], lambda s: None)
    sides: dict[str, tuple[list[str], dict[str, str] | None, str]] = {}
    for k, root in enumerate(roots):
        label = "numavm-KVM" if k == 0 else f"numavm-KVM {Path(root).name}"
        sides[label] = (kvm_numavm_argv(img, host_rr, kvm_script(reads)), child_env(PYTHONPATH=root), root)
    sides["QEMU-KVM"] = (kvm_qemu_argv(img, str(assets.vmlinux), qemu_initrd(modules, host_rr, kvm_script(reads))),
                         None, str(ROOT))
    for r in range(runs + 1):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            argv, env, cwd = sides[name]
            try:
                got = kvm_sample(argv, env, cwd, size)
            except Exception as e:  # noqa: BLE001 - a failed sample is recorded, the run goes on
                got = {"error": " ".join(str(e).split())[-300:]}
            _console(L1_SAMPLE + json.dumps({"round": r, "side": name, **got}, separators=(",", ":")))
    print(L1_SAMPLE + json.dumps({"argv": {k: v[0] for k, v in sides.items()}, "kernel": str(assets.vmlinux)}))
    return 0


def _samples(text: str) -> list[dict]:
    import json
    out = []
    for m in re.finditer(re.escape(L1_SAMPLE) + r"(\{.*\})", text):
        try:
            d = json.loads(m.group(1))
        except ValueError:
            continue  # a line a kernel message broke
        if "side" in d:
            out.append(d)
    return out


def _mmm(vals: list[float], fmt: str = "{:.0f}") -> str:
    if not vals:
        return "n/a"
    import statistics
    return f"{fmt.format(min(vals))} / **{fmt.format(statistics.median(vals))}** / {fmt.format(max(vals))}"


def l1_report(samples: list[dict], runs: int, l1_seconds: float, cmd: str, commit: str, load: str,
              size: int = IMAGE_SIZE, reads: int = RANDOM_READS) -> str:
    """The BENCHMARKS.md section: per side min / median / max over the counted rounds, and the
    median over rounds of each numavm side's ratio to QEMU-KVM in the same round."""
    import statistics
    counted = [s for s in samples if s.get("round", 0) > 0 and "error" not in s]
    failed = [s for s in samples if "error" in s]
    sides = list(dict.fromkeys(s["side"] for s in samples))
    by = {(s["side"], s["round"]): s for s in counted}

    def vals(side: str, key: str) -> list[float]:
        return [s[key] for s in counted if s["side"] == side]

    def ratio(side: str, key: str) -> str:
        rs = [by[(side, r)][key] / by[("QEMU-KVM", r)][key] for (sd, r) in by
              if sd == side and ("QEMU-KVM", r) in by and by[("QEMU-KVM", r)][key]]
        return f"{statistics.median(rs):.2f}" if rs else "n/a"

    def per_request(side: str, phase: str, which: int) -> list[float]:
        return [s[f"{phase}_cpu"][which] / s[f"{phase}_requests"] * 1e6 for s in counted
                if s["side"] == side and s[f"{phase}_requests"]]

    lines = [L1_SECTION, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{cmd}` (commit {commit}): one L1 "
             f"boot ({l1_seconds:.0f} s in all), in it a warm-up round and {runs} counted rounds, each side once per "
             f"round, the order reversed every other round; min / **median** / max over the counted rounds. Host load "
             f"(1-minute average) at the start and end: {load}. L1 is QEMU TCG emulating an AMD CPU with SVM+NPT "
             "(bench/l1.py), so both VMMs, numavm's Python included, and both guests run emulated: the figures "
             "compare the sides, they are not bare-metal speeds.", "",
             "| figure | unit | " + " | ".join(sides) + " | " + " | ".join(f"{s} / QEMU-KVM (median of rounds)"
                                                                     for s in sides if s != "QEMU-KVM") + " |",
             "|---|---|" + "---|" * (2 * len(sides) - 1)]
    for key, title, unit, fmt in (("seq", f"sequential read, {size >> 20} MiB, `dd iflag=direct bs=1M`", "MiB/s",
                                   "{:.0f}"),
                                  ("iops", f"4 KiB O_DIRECT random reads ({reads})", "IOPS", "{:.0f}")):
        lines.append(f"| {title} | {unit} | " + " | ".join(_mmm(vals(s, key), fmt) for s in sides) + " | "
                     + " | ".join(ratio(s, key) for s in sides if s != "QEMU-KVM") + " |")
    for phase, title in (("seq", "sequential"), ("rand", "random")):
        for which, kind in ((0, "user"), (1, "system")):
            lines.append(f"| device-side CPU per guest request, {title}, {kind} | µs | "
                         + " | ".join(_mmm(per_request(s, phase, which)) for s in sides) + " | "
                         + " | ".join("" for s in sides if s != "QEMU-KVM") + " |")
    req = {s: statistics.median(vals(s, "seq_requests")) for s in sides if vals(s, "seq_requests")}
    lines += ["", "Guest requests per phase (from /sys/block/vda/stat, median): sequential "
              + ", ".join(f"{s}: {v:.0f}" for s, v in req.items()) + f"; random: {reads} + the odd "
              "request of the guest's own.", ""]
    # the Python share: numavm's device-side user time per request against the guest's time per request
    for s in sides:
        if s == "QEMU-KVM":
            continue
        shares = []
        for smp in counted:
            if smp["side"] != s or not smp["rand_requests"] or not smp["seq_requests"]:
                continue
            rand = smp["rand_cpu"][0] / smp["rand_requests"] / (1 / smp["iops"])
            seq_secs = (size >> 20) / smp["seq"]
            shares.append((smp["seq_cpu"][0] / seq_secs, rand))
        if shares:
            lines.append(f"- {s}: the device side's user time (numavm's I/O thread: Python) is "
                         f"{_mmm([a * 100 for a, _ in shares], '{:.0f}')} % of the sequential read's time and "
                         f"{_mmm([b * 100 for _, b in shares], '{:.0f}')} % of the random reads' time.")
    if failed:
        lines += ["", "Failed samples:"] + [f"- round {f['round']}, {f['side']}: {f['error']}" for f in failed]
    return "\n".join(lines) + "\n"


def main_l1(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from . import l1
    p = argparse.ArgumentParser(prog="python -m bench.disk --l1", description="numavm-KVM vs QEMU-KVM disk "
                                "reads in one L1 boot (see the comment above L1_SECTION)")
    p.add_argument("--l1", action="store_true")
    p.add_argument("--runs", type=int, default=3, help="counted rounds (after one warm-up round)")
    p.add_argument("--also-numavm", action="append", default=[], metavar="ROOT",
                   help="another numavm checkout to run as a side of its own (e.g. /work/main: before a change)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a 64 MiB image, 300 random reads, "
                   "nothing written to --out")
    p.add_argument("--reads", type=int, default=RANDOM_READS, help=argparse.SUPPRESS)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--console", metavar="FILE", help="L1's whole console to FILE")
    p.add_argument("--inner", nargs=2, metavar=("IMAGE", "RANDREAD"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    roots = [str(ROOT), *ns.also_numavm]
    if ns.inner:
        return inner_kvm(ns.runs, Path(ns.inner[0]), Path(ns.inner[1]), roots, ns.reads)
    why = l1.unavailable()
    if why:
        print(f"bench.disk: {why}", file=sys.stderr)
        return 1
    load0 = os.getloadavg()[0]
    size, reads = (QUICK_IMAGE_SIZE, 300) if ns.quick else (IMAGE_SIZE, RANDOM_READS)
    img, rr = image(size, L1_DIR), randread(L1_DIR)
    inner = [sys.executable, "-m", "bench.disk", "--l1", "--runs", str(ns.runs), "--reads", str(reads),
             "--inner", str(img), str(rr)]
    for r in ns.also_numavm:
        inner += ["--also-numavm", r]
    cases, res = l1.run_cases([l1.Case("disk", inner, timeout=7000)], timeout=7600)
    if ns.console:
        Path(ns.console).write_text(res.console)
    c = cases.get("disk")
    samples = _samples((c.stderr if c else "") + "\n" + res.console)
    if c is None:  # L1 stalled: the console still has the samples that ended
        samples = _samples(res.console)
    # one copy of each sample (stderr and the console both carry it)
    samples = list({(s["round"], s["side"]): s for s in samples}.values())
    if not samples:
        print(f"bench.disk: no samples ({res.detail}); L1's console ends:\n{res.console[-3000:]}", file=sys.stderr)
        return 1
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cmd = "python -m bench.disk --l1 --runs " + str(ns.runs) + "".join(f" --also-numavm {r}" for r in ns.also_numavm)
    text = l1_report(samples, ns.runs, res.seconds, cmd, commit, f"{load0:.1f}, {os.getloadavg()[0]:.1f}",
                     size, reads)
    argv_line = next((json.loads(m.group(1)) for m in re.finditer(re.escape(L1_SAMPLE) + r"(\{\"argv.*\})",
                                                                  c.stdout if c else "")), None)
    if argv_line:
        text += "\nCommands (in L1; IMG is the image in L1's tmpfs):\n\n```\n" + "\n".join(
            f"# {k}\n{shell(v)}" for k, v in argv_line["argv"].items()) + "\n```\n"
    print(text)
    if ns.quick:
        return 0
    out = Path(ns.out)
    old = out.read_text() if out.exists() else ""
    if L1_SECTION in old:
        head, _, rest = old.partition(L1_SECTION)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1:] if nxt >= 0 else "")
    out.write_text(old.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main_l1())
