"""virtio-blk's per-request cost in Python, natively: the device models and the I/O thread without a guest.

`python -m bench.blkmodel [--requests N] [--profile CASE] [--json]` drives numavm's own
`VirtioPciDevice` + `VirtioBlk` over the engine's guest memory (`GuestMemory`, two domains, as
a `--disk` machine has) with a driver that does what Linux's virtio_blk does for an O_DIRECT
read: one request is an indirect table (header, data pages, status byte; Linux uses an
indirect table whenever a request has more than one buffer), one avail ring entry, then the
notify.  The image is a file of random bytes in the host's page cache; offsets are the
xorshift sequence of bench/randread.c.  Cases (microseconds per request, median of rounds):

- ``4k``: one 4 KiB read per notify, the model alone (`queue_notify` called directly, as the
  I/O thread calls it): the Python a QD1 random read costs, plus one preadv;
- ``4k-batch32``: 32 4 KiB reads per notify (a deep queue: what one wake-up can drain);
- ``1m``: one 1 MiB read into 256 4 KiB pages, no two contiguous (a `dd bs=1M iflag=direct`
  request whose user buffer is scattered in guest memory: the worst case; Linux's seg_max of
  254 would split it 254 + 2, and merges contiguous pages into one descriptor);
- ``4k-thread``: one 4 KiB read through the KVM engine's `PciPlatform` I/O thread (a stand-in
  VM that registers nothing: the kick is a write to the queue's eventfd, as KVM's ioeventfd
  does, the interrupt a read of the vector's irqfd eventfd), QD1 round trip; its ``cpu``
  figure is the I/O thread's own CPU time per request (`pthread_getcpuclockid`);
- ``floor``: the same 4 KiB preads at the same offsets from a bare Python loop
  (``os.preadv`` into one guest-memory view): the syscall and the copy, no device model.

Nothing is asserted but the data: every request's status is OK and its bytes are the file's.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import select
import statistics
import struct
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from numavm.devices.pci import function as pcif
from numavm.devices.virtio import blk as vblk
from numavm.devices.virtio import pci as vpci
from numavm.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

MiB = 1 << 20
PAGE = 4096
IMAGE_SIZE = 64 * MiB
QSIZE = 256
DOMAIN = 32 * MiB  # two domains of 32 MiB; the rings in domain 0, the data in both
DESC, AVAIL, USED = 0x10_0000, 0x10_1000, 0x10_2000
TABLES, HEADERS, STATUS = 0x11_0000, 0x13_0000, 0x13_2000  # per slot: a 4 KiB indirect table, 16 B, 1 B
DATA = 0x20_0000  # the requests' data pages (`_page`)
BAR = 0xC000_0000
ROUNDS = 7

_DESC = struct.Struct("<QIHH")
_HDR = struct.Struct("<IIQ")
_U16 = struct.Struct("<H")


class _NoVm:
    """What `PciPlatform` asks of a VM, registering nothing: eventfds are written by hand here."""

    fd = -1

    def add_ioeventfd(self, *a: object, **k: object) -> None: ...
    def remove_ioeventfd(self, *a: object, **k: object) -> None: ...
    def add_irqfd(self, *a: object) -> None: ...
    def remove_irqfd(self, *a: object) -> None: ...
    def set_gsi_routing(self, routes: object) -> None: ...


def _offsets(blocks: int):  # type: ignore[no-untyped-def]
    """bench/randread.c's xorshift block numbers."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    while True:
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        yield x % blocks


class Rig:
    """The device over real guest memory and a real file, brought up as Linux's driver does."""

    def __init__(self, stack: ExitStack, image: Path) -> None:
        from numavm.host.memory import GuestMemory
        from numavm.plan.layout import plan_layout
        from numavm.spec.devices import parse_disk
        from numavm.spec.topology import MachineSpec, parse_numa

        spec = MachineSpec(domains=[parse_numa("id=0,size=32M,cpus=0"), parse_numa("id=1,size=32M")],
                           disks=[parse_disk(f"{image},domain=1,readonly")])
        self.layout = plan_layout(spec.build(host_nodes=(0,)))
        self.mem = stack.enter_context(GuestMemory(self.layout, machine="blkmodel", shared=False))
        self.fd = os.open(image, os.O_RDONLY)
        stack.callback(os.close, self.fd)
        self.size = image.stat().st_size
        self.blk = vblk.VirtioBlk(self.fd, self.size, readonly=True)
        self.dev = vpci.VirtioPciDevice(self.blk, self.mem)
        stack.callback(self.dev.function_reset)  # drops the rings' views before the memory goes
        self.interrupts = 0
        self.dev.signal_msi = self._count
        self.avail_idx = 0
        self.used_idx = 0

    def _count(self, vector: int) -> None:
        self.interrupts += 1

    def bring_up(self) -> None:
        d = self.dev
        d.config_write(pcif.BAR0, 4, BAR)
        d.config_write(pcif.COMMAND, 2, pcif.COMMAND_MEMORY | pcif.COMMAND_BUS_MASTER)
        cap = d.config_read(pcif.CAPABILITIES_POINTER, 1)
        while d.config_read(cap, 1) != pcif.CAP_ID_MSIX:
            cap = d.config_read(cap + 1, 1)
        for v in range(2):  # config vector 0, queue 0 on vector 1: unmasked
            for k, word in enumerate((0xFEE0_0000, 0, 0x40 + v, 0)):
                d.mmio_write(0, vpci.MSIX_TABLE_OFFSET + 16 * v + 4 * k, 4, word)
        d.config_write(cap + 2, 2, pcif.MSIX_CONTROL_ENABLE)
        c = vpci.COMMON_CFG_OFFSET
        d.mmio_write(0, c + 0x14, 1, vpci.STATUS_ACKNOWLEDGE | vpci.STATUS_DRIVER)
        features = self.blk.features
        for word in (0, 1):
            d.mmio_write(0, c + 0x08, 4, word)
            d.mmio_write(0, c + 0x0C, 4, features >> (32 * word) & 0xFFFF_FFFF)
        d.mmio_write(0, c + 0x14, 1, 0x0B)
        assert d.mmio_read(0, c + 0x14, 1) & vpci.STATUS_FEATURES_OK
        d.mmio_write(0, c + 0x10, 2, 0)
        d.mmio_write(0, c + 0x16, 2, 0)
        for off, addr in ((0x20, DESC), (0x28, AVAIL), (0x30, USED)):
            d.mmio_write(0, c + off, 4, addr)
            d.mmio_write(0, c + off + 4, 4, 0)
        d.mmio_write(0, c + 0x1A, 2, 1)
        d.mmio_write(0, c + 0x1C, 2, 1)
        d.mmio_write(0, c + 0x14, 1, 0x0F)
        assert not d.status & vpci.STATUS_DEVICE_NEEDS_RESET, d.errors

    def prepare(self, pages: int, slots: int) -> None:
        """Slot s: descriptor s is an indirect table of header, `pages` data pages, status."""
        w = self.mem.write
        for s in range(slots):
            table = TABLES + s * PAGE
            n = pages + 2
            entries = [(HEADERS + 16 * s, 16, 0)]
            entries += [(_page(s, p, pages), PAGE, VIRTQ_DESC_F_WRITE) for p in range(pages)]
            entries.append((STATUS + s, 1, VIRTQ_DESC_F_WRITE))
            w(table, b"".join(_DESC.pack(a, n_, f | (VIRTQ_DESC_F_NEXT if i < n - 1 else 0), i + 1 if i < n - 1 else 0)
                              for i, (a, n_, f) in enumerate(entries)))
            w(DESC + 16 * s, _DESC.pack(table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0))

    def offer(self, sectors: list[int]) -> None:
        """Requests in slots 0.. reading at `sectors`, published with one avail index store."""
        w = self.mem.write
        for s, sector in enumerate(sectors):
            w(HEADERS + 16 * s, _HDR.pack(vblk.VIRTIO_BLK_T_IN, 0, sector))
            w(STATUS + s, b"\xEE")
            w(AVAIL + 4 + 2 * ((self.avail_idx + s) % QSIZE), _U16.pack(s))
        self.avail_idx = (self.avail_idx + len(sectors)) & 0xFFFF
        w(AVAIL + 2, _U16.pack(self.avail_idx))

    def reap(self, n: int) -> None:
        idx = _U16.unpack(self.mem.read(USED + 2, 2))[0]
        if (idx - self.used_idx) & 0xFFFF != n:
            raise AssertionError(f"used index {idx}, expected {self.used_idx} + {n}; errors {list(self.dev.errors)}")
        self.used_idx = idx
        status = self.mem.read(STATUS, n)
        if status != bytes(n):
            raise AssertionError(f"status bytes {status!r}")

    def check_data(self, slot: int, sector: int, pages: int) -> None:
        got = b"".join(self.mem.read(_page(slot, p, pages), PAGE) for p in range(pages))
        if got != os.pread(self.fd, pages * PAGE, sector * 512):
            raise AssertionError(f"slot {slot}: the guest's bytes are not the file's at sector {sector}")


def _page(slot: int, p: int, pages: int) -> int:
    """Data page p of a slot's request: every other page, so no two are contiguous (Linux merges
    contiguous pages into one descriptor; a user buffer's pages mostly are not)."""
    return DATA + (slot * pages + p) * 2 * PAGE


def image() -> Path:
    path = Path(tempfile.gettempdir()) / f"numavm-blkmodel-{IMAGE_SIZE >> 20}M.img"
    if not path.exists() or path.stat().st_size != IMAGE_SIZE:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(IMAGE_SIZE >> 20):
                f.write(os.urandom(MiB))
        tmp.replace(path)
    with open(path, "rb") as f:  # into the page cache: the guest's reads then cost a copy, not a disk
        while f.read(8 * MiB):
            pass
    return path


def model_case(rig: Rig, pages: int, batch: int, requests: int, profile: cProfile.Profile | None = None) -> float:
    """Microseconds per request in `queue_notify` (the model alone), `batch` requests per notify."""
    rig.prepare(pages, batch)
    blocks = (rig.size - pages * PAGE) // PAGE
    gen = _offsets(blocks)
    notify = rig.dev.queue_notify
    spent = 0.0
    done = 0
    checked = False
    while done < requests:
        sectors = [next(gen) * (PAGE // 512) for _ in range(batch)]
        rig.offer(sectors)
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        notify(0)
        spent += time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        rig.reap(batch)
        if not checked:
            rig.check_data(0, sectors[0], pages)
            checked = True
        done += batch
    return spent / done * 1e6


def thread_case(rig: Rig, requests: int) -> tuple[float, float]:
    """(round trip, I/O thread CPU) microseconds per QD1 4 KiB read through `PciPlatform`."""
    from numavm.vmm.kvm.pci import PciPlatform

    platform = PciPlatform(_NoVm(), rig.layout.pci, [rig.dev], name="blkmodel")  # type: ignore[arg-type]
    try:
        rig.bring_up()  # again: the platform moved BAR0 to the plan's address and took signal_msi
        rig.avail_idx = rig.used_idx = 0
        rig.prepare(1, 1)
        dev = platform.devices[0]
        kick_fd, irq_fd = dev.queue_fds[0], dev.vector_fds[1]
        platform.start()
        assert dev.thread is not None and dev.thread.ident is not None
        clock = time.pthread_getcpuclockid(dev.thread.ident)
        poller = select.poll()
        poller.register(irq_fd, select.POLLIN)
        gen = _offsets((rig.size - PAGE) // PAGE)
        cpu0, t0 = time.clock_gettime(clock), time.perf_counter()
        for _ in range(requests):
            sector = next(gen) * (PAGE // 512)
            rig.offer([sector])
            os.eventfd_write(kick_fd, 1)
            poller.poll()
            os.eventfd_read(irq_fd)
            rig.reap(1)
        wall, cpu = time.perf_counter() - t0, time.clock_gettime(clock) - cpu0
        rig.check_data(0, sector, 1)
        return wall / requests * 1e6, cpu / requests * 1e6
    finally:
        platform.close()


def floor_case(rig: Rig, requests: int) -> float:
    view = rig.mem.view(DATA, PAGE)
    gen = _offsets((rig.size - PAGE) // PAGE)
    fd, preadv = rig.fd, os.preadv
    t0 = time.perf_counter()
    for _ in range(requests):
        preadv(fd, [view], next(gen) * PAGE)
    spent = time.perf_counter() - t0
    view.release()
    return spent / requests * 1e6


CASES: dict[str, tuple[Callable[[Rig, int], float | tuple[float, float]], int]] = {
    "4k": (lambda rig, n: model_case(rig, 1, 1, n), 1),
    "4k-batch32": (lambda rig, n: model_case(rig, 1, 32, n), 1),
    "1m": (lambda rig, n: model_case(rig, 256, 1, n), 16),  # requests / 16: each moves 1 MiB
    "4k-thread": (thread_case, 1),
    "floor": (floor_case, 1),
}


def run(requests: int, rounds: int, cases: list[str] | None = None) -> dict[str, dict[str, float]]:
    img = image()
    samples: dict[str, list] = {k: [] for k in cases or CASES}
    for _ in range(rounds):
        for name in samples:
            fn, div = CASES[name]
            with ExitStack() as stack:
                rig = Rig(stack, img)
                rig.bring_up()
                samples[name].append(fn(rig, max(32, requests // div)))
    out: dict[str, dict[str, float]] = {}
    for name, vals in samples.items():
        if isinstance(vals[0], tuple):
            out[name] = {"us": statistics.median(v[0] for v in vals), "cpu_us": statistics.median(v[1] for v in vals)}
        else:
            out[name] = {"us": statistics.median(vals)}
        out[name]["min_us"] = min(v[0] if isinstance(v, tuple) else v for v in vals)
    return out


def profile(case: str, requests: int) -> None:
    pages, batch = {"4k": (1, 1), "4k-batch32": (1, 32), "1m": (256, 1)}[case]
    prof = cProfile.Profile()
    with ExitStack() as stack:
        rig = Rig(stack, image())
        rig.bring_up()
        model_case(rig, pages, batch, requests, prof)
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.blkmodel", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000, help="4 KiB requests per case and round (1 MiB: /16)")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--profile", choices=("4k", "4k-batch32", "1m"), help="cProfile one case instead")
    p.add_argument("--cases", help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    if ns.profile:
        profile(ns.profile, ns.requests)
        return 0
    res = run(ns.requests, ns.rounds, ns.cases.split(",") if ns.cases else None)
    if ns.json:
        print(json.dumps(res))
        return 0
    print(f"{'case':<12} {'us/request':>11} {'min':>8}  (median of {ns.rounds} rounds, load {os.getloadavg()[0]:.1f})")
    for name, r in res.items():
        extra = f"  I/O thread CPU {r['cpu_us']:.1f} us/request" if "cpu_us" in r else ""
        print(f"{name:<12} {r['us']:>11.2f} {r['min_us']:>8.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
