"""What a guest run takes and what it gives back, whichever engine runs it.

Both engines (numavm.vmm.kvm.machine on KVM, numavm.vmm.tcg on QEMU's TCG) take a
`GuestRun` and return a `RunResult`; the commands turn its `Outcome` into
numavm's documented exit statuses (`ExitCode`).  This module imports nothing
of either engine, so each can use it without loading the other.
"""

from __future__ import annotations

import enum
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from numavm.plan.layout import Layout
    from numavm.host.disk import DiskImage
    from numavm.host.memory import GuestMemory
    from numavm.spec.shares import Share

Log = Callable[[str], None]
Sink = Callable[[bytes], None]

# The guest kernel's panic line on its console (both engines watch for it: with
# panic=-1 the kernel reboots right after, which alone would read as a reset).
PANIC_RE = re.compile(r"Kernel panic - not syncing: ?(.*)")

# How far a checked guest runs: to its kernel's NUMA setup, or on to its userspace report.
STAGES = ("kernel", "userspace")


class Outcome(enum.Enum):
    """How a run ended; the commands map each to a documented exit status."""

    POWEROFF = "poweroff"
    RESET = "reset"
    TRIPLE_FAULT = "triple-fault"
    PANIC = "panic"
    EMULATION_FAILURE = "emulation-failure"
    TIMEOUT = "timeout"
    STOPPED = "stopped"  # the host asked (e.g. check saw what it needed)
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM
    ERROR = "error"


@dataclass
class RunResult:
    outcome: Outcome
    detail: str
    seconds: float
    exits: Counter[str] = field(default_factory=Counter)  # per exit reason, where the engine counts them
    unhandled_reads: Counter[int] = field(default_factory=Counter)
    unhandled_writes: Counter[int] = field(default_factory=Counter)
    vcpus_ran: frozenset[int] = frozenset()  # APIC ids that ran
    placement: str = ""  # the memory audit at the end of the run (memory.describe())


class ExitCode(enum.IntEnum):
    """numavm's exit statuses (see README)."""

    OK = 0
    FAILURE = 1  # a host-side failure, or (check) a mismatch
    USAGE = 2
    PANIC = 70
    TRIPLE_FAULT = 71
    EMULATION_FAILURE = 72
    TIMEOUT = 73
    RESET = 74  # the guest rebooted instead of powering off
    INTERRUPTED = 130


OUTCOME_EXIT = {
    Outcome.PANIC: ExitCode.PANIC,
    Outcome.TRIPLE_FAULT: ExitCode.TRIPLE_FAULT,
    Outcome.EMULATION_FAILURE: ExitCode.EMULATION_FAILURE,
    Outcome.TIMEOUT: ExitCode.TIMEOUT,
    Outcome.RESET: ExitCode.RESET,
    Outcome.INTERRUPTED: ExitCode.INTERRUPTED,
    Outcome.ERROR: ExitCode.FAILURE,
}


class Watch(Protocol):
    """Reads the console as it comes and may end the run (e.g. `guest.KernelStageWatch`)."""

    stop: Callable[[Outcome, str], None] | None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass
class GuestRun:
    """Everything a Linux guest run needs, engine-independent."""

    layout: Layout
    kernel: Path  # an x86-64 ELF vmlinux
    initrd: bytes | None
    cmdline: str
    timeout: float | None
    console: Sink  # every byte of the guest console
    watch: Watch | None = None  # given its `stop` once the machine exists
    verbose: bool = False  # engine details (QEMU's arguments) to `log`
    prefault: frozenset[int] | None = frozenset()  # domains to prefault; None = all
    hugepages: str | None = None
    # The guest command's streams: given, the machine has COM2 (stdout) and COM3 (stderr).
    stdout: Sink | None = None
    stderr: Sink | None = None
    input_fd: int | None = None  # read into COM2: an interactive shell's terminal
    own_init: bool = False  # the initrd is numavm's: its /init brings offline CPUs online (guest.tcg_cmdline)
    log: Log = field(default=_stderr)
    # Called once from the calling thread as soon as the guest runs: the caller's own work that can
    # wait until then (numavm.api imports what reads the result) overlaps the boot instead of
    # delaying it.
    on_start: Callable[[], None] | None = None
    # The machine's disk images, one per `layout.topology.disks` in order, opened, checked and
    # locked by the caller before anything else was made (numavm.host.disk.open_disks) and
    # closed by it after the run: an engine uses their fds and never closes them.  Empty for a
    # machine with disks, an engine opens them itself (and closes them).
    disks: tuple[DiskImage, ...] = ()
    # Host directories the guest mounts over virtio-9p (--share, --host-root; numavm.spec.shares):
    # the engine gives each a 9p device with its mount tag, read-only unless `rw`.
    shares: tuple[Share, ...] = ()


def prefault(memory: GuestMemory, log: Log, domains: frozenset[int] | None = None) -> None:
    """Populate the chosen domains (all by default) under their policies before the guest
    starts; a progress bar on a terminal for big guests."""
    segs = {d: seg for d, seg in sorted(memory.segments.items()) if domains is None or d in domains}
    total = sum(seg.size for seg in segs.values())
    show = sys.stderr.isatty() and total >= 1 << 30
    done_before = 0

    def progress(done: int, whole: int) -> None:
        pct = (done_before + done) * 100 // max(total, 1)
        if show:
            sys.stderr.write(f"\rnumavm: prefault [{'#' * (pct // 4):<25}] {pct:3d}% of {total >> 20} MiB")
            sys.stderr.flush()

    for dom, seg in segs.items():
        r = seg.prefault(progress=progress)
        done_before += seg.size
        if show:
            sys.stderr.write("\n" if done_before == total else "")
        log(f"numavm: prefaulted domain {dom}: {r.bytes >> 20} MiB in {r.seconds:.2f} s "
            f"({r.gib_per_s:.2f} GiB/s, {r.threads} thread(s) on CPUs {_cpus(r.cpus)})")


def prefault_for(run: GuestRun, memory: GuestMemory) -> None:
    """The run's --prefault, if any, into `memory`."""
    if run.prefault is None or run.prefault:
        prefault(memory, run.log, run.prefault)


def _cpus(cpus: tuple[int, ...]) -> str:
    from numavm.spec.units import format_list
    return format_list(cpus) or "any"
