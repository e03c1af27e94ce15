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


def randread() -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler for bench/randread.c")
    out = Path(tempfile.gettempdir()) / "numavm-bench-randread"
    src = Path(__file__).with_name("randread.c")
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run([cc, "-O2", "-static", "-o", str(out), str(src)], check=True)
    return out


def image(size: int) -> Path:
    path = Path(tempfile.gettempdir()) / f"numavm-bench-disk-{size >> 20}M.img"
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


def qemu_initrd(modules: list[Path], rr: Path) -> Path:
    from numavm.guest.assets import cached, fetch
    from numavm.guest.initramfs import Entry, cpio_newc

    busybox = (cached() or fetch(log=lambda s: None)).busybox
    init = b"#!/bin/sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n" \
           b"mount -t devtmpfs dev /dev\n" + b"".join(b"insmod /%s\n" % m.name.encode() for m in modules) + \
           SCRIPT.encode() + b"\npoweroff -f\n"
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
