"""Row 3: prefault throughput of one domain under bind:0, one thread, GiB/s."""

from __future__ import annotations

import ctypes
import mmap
import os
import time

from numavm.host.memory import MADV_POPULATE_WRITE, Segment
from numavm.spec.policy import Mode, Policy

from .proc import QEMU, BenchError, Qmp, shell
from .runner import Bench, Side, median_ratio

GiB = 1 << 30
MiB = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def numavm_sample(size: int) -> float:
    seg = Segment(size, Policy(Mode.BIND, (0,)), domain=0, machine="bench")
    try:
        r = seg.prefault(threads=1)
    finally:
        seg.close()
    return r.gib_per_s


def limit_sample(size: int) -> float:
    """One madvise(MADV_POPULATE_WRITE) over a fresh memfd mapping, one thread, no policy."""
    fd = os.memfd_create("bench-limit", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise BenchError(f"mmap: {os.strerror(ctypes.get_errno())}")
        try:
            t = time.monotonic()
            if _libc.madvise(addr, size, MADV_POPULATE_WRITE) != 0:
                raise BenchError(f"madvise: {os.strerror(ctypes.get_errno())}")
            dt = time.monotonic() - t
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return size / GiB / dt


def qemu_args(size: int, backend: str, prealloc: bool) -> list[str]:
    mb = f"{size // MiB}M"
    return ["-S", "-M", "pc", "-m", mb, "-object",
            f"{backend},id=m0,size={mb},prealloc={'on' if prealloc else 'off'},prealloc-threads=1,"
            "host-nodes=0,policy=bind", "-numa", "node,nodeid=0,memdev=m0"]


def qemu_sample(size: int, backend: str) -> float:
    if QEMU is None:
        raise BenchError("qemu-system-x86_64 not installed")
    t = {}
    for pre in (False, True):
        with Qmp(qemu_args(size, backend, pre)) as q:
            t[pre] = q.ready()
    cost = t[True] - t[False]
    if cost <= 0:
        raise BenchError(f"prealloc=on started no slower ({t[True]:.3f} s vs {t[False]:.3f} s)")
    return size / GiB / cost


def benches(quick: bool) -> list[Bench]:
    size = 256 * MiB if quick else 1 * GiB
    n = Side("numavm", lambda: numavm_sample(size),
             command=f"python -c 'from numavm.host.memory import Segment; from numavm.spec.policy import Mode, Policy; "
                     f"print(Segment({size}, Policy(Mode.BIND, (0,))).prefault(threads=1))'")
    lim = Side("limit: one MADV_POPULATE_WRITE", lambda: limit_sample(size),
               command="(in-process) memfd_create + ftruncate + mmap(MAP_SHARED) + one "
                       f"madvise(MADV_POPULATE_WRITE) of {size // MiB} MiB")
    peers = [lim]
    for backend, label in (("memory-backend-ram", "QEMU prealloc, memory-backend-ram"),
                           ("memory-backend-memfd", "QEMU prealloc, memory-backend-memfd")):
        peers.append(Side(label, (lambda b=backend: qemu_sample(size, b)),
                          command=shell([QEMU or "qemu-system-x86_64", "-accel", "kvm", "-display", "none",
                                         "-nodefaults", "-qmp", "stdio", *qemu_args(size, backend, True)])
                          + "   # and the same with prealloc=off"))

    def met(b: Bench) -> str:
        r_lim = median_ratio(n, lim)
        r_q = [median_ratio(n, p) for p in peers[1:]]
        if r_lim is None:
            return "n/a"
        q_ok = all(r is not None and r > 1 for r in r_q)
        return (f"{'met' if r_lim >= 0.8 else 'not met'} for the limit ({r_lim:.0%}); "
                f"{'faster' if q_ok else 'not faster'} than QEMU")

    return [Bench("prefault", "prefault", f"Prefault one domain, bind:0, 1 thread ({size // MiB} MiB)",
                  "GiB/s", n, peers, higher_is_better=True, goal="≥ 80 % of the limit; faster than QEMU",
                  goal_met=met, notes=[
        f"One domain of {size // MiB} MiB under `bind:0`, populated by one thread; GiB/s (higher is better, "
        "so a ratio numavm/peer above 1 means numavm is faster).",
        "numavm: `Segment(size, bind:0).prefault(threads=1)` (memfd, mbind, then MADV_POPULATE_WRITE in "
        "chunks from a thread pinned to node 0's CPUs); the time is PrefaultResult.seconds.",
        "limit: a fresh memfd of the same size, mapped shared, populated by a single "
        "madvise(MADV_POPULATE_WRITE) call in one thread, no policy: the kernel's cost with nothing around it.",
        "QEMU: startup time (spawn to QMP `query-status` answered, with `-S`) with prealloc=on minus the same "
        "with prealloc=off, prealloc-threads=1, host-nodes=0,policy=bind; the size divided by that "
        "difference. memory-backend-ram is anonymous memory (QEMU madvises it MADV_HUGEPAGE, so with THP "
        "`enabled=madvise` it may get 2 MiB pages); memory-backend-memfd is shmem like numavm's memfds "
        "(this host's shmem THP setting decides its page size).",
        f"THP on this host: enabled={_thp('enabled')}, shmem_enabled={_thp('shmem_enabled')}."])]


def _thp(name: str) -> str:
    try:
        text = open(f"/sys/kernel/mm/transparent_hugepage/{name}").read()
        return next((w.strip("[]") for w in text.split() if w.startswith("[")), text.strip())
    except OSError:
        return "unknown"
