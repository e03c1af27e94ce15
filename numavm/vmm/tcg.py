"""The TCG engine: QEMU's software emulation as the CPU and platform, numavm for the rest.

Where /dev/kvm emulates guest code (kvm_pvm) QEMU's TCG runs a Linux guest
about 100x faster.  numavm still owns the topology, the layout, the tables
the guest reads and the host memory: it creates the guest RAM (one memfd,
each domain's policy on its range), hands it to QEMU by file descriptor,
and gives QEMU its SRAT and SLIT with -acpitable and no -numa options, so
QEMU builds no NUMA tables of its own.  QEMU's `pc` machine with
``max-ram-below-4g=3G`` lays RAM out exactly as numavm's layout does; numavm
checks that in QEMU's memory tree before the guest runs and refuses on a
mismatch.

Disks (`--disk`) are QEMU's own devices at the plan's PCI addresses: an expander bridge per
host bridge, virtio-blk-pci on the image fds numavm opened and locked, and an SSDT of numavm's
that gives each bridge its domain as _PXM (`pci_args`, `pxm_ssdt`).

The console is QEMU's stdio chardev; for `run` the guest command's stdout and
stderr are COM2 and COM3, QEMU pipe chardevs on FIFOs numavm reads.

QEMU runs as a child numavm manages: exact arguments (``--verbose``),
killed on timeout, SIGINT and SIGTERM, and by the kernel when numavm dies
(see `numavm.host.lifetime`), its failures turned into numavm's outcomes; its
temporary directory and the guest memory are released on every path, and a
killed run's directory by the next run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from numavm.plan.acpi import aml, build_tables
from numavm.plan.acpi.tables import _Table
from numavm.plan.pci import HostBridge, PciLayout
from numavm.vmm.engine import EngineRefusal, qemu_binary
from numavm.errors import ConfigError, NumavmError
from numavm.plan.layout import HIGH_RAM_BASE, LOW_RAM_LIMIT, QEMU_PC_MACHINE, Layout
from numavm.host.lifetime import OwnedDir, die_with_parent
from numavm.host.disk import DiskImage, close_disks, open_disks
from numavm.host.memory import GuestMemory
from numavm.spec.shares import Share
from numavm.vmm.run import PANIC_RE as _PANIC
from numavm.vmm.run import GuestRun, Outcome, RunResult, prefault_for

QEMU_CPU = "qemu64"
QEMU_PC_MAX_CPUS = 255  # pc-i440fx: xAPIC ids only
# Linux (x86-64, xAPIC) sends IPIs in logical flat mode up to this many possible CPUs, physical above.
LINUX_FLAT_MAX_CPUS = 8
# Firmware: qboot starts a PVH/linuxboot kernel faster than SeaBIOS, for machines without devices.
# With devices QEMU's default firmware (SeaBIOS) boots it, through its PVH option ROM: qboot
# neither numbers the bus behind an expander bridge's own PCI-to-PCI bridge nor assigns BARs,
# and QEMU builds each pxb's _CRS from what firmware programmed, so under qboot the pxb's root
# bus had one bus number and no memory window, and Linux could neither reach the devices behind
# it nor place their BARs ("busn_res: can not insert [bus 02-01] under [bus 01]").  SeaBIOS
# numbers that bus B + 1 and assigns the BARs in windows QEMU then describes.
QBOOT = Path("/usr/share/qemu/qboot.rom")


# Expander bridges QEMU's pc machine takes: each is a device on its root bus, whose slot 0 is the
# i440fx host bridge and slot 1 the PIIX3 (-nodefaults, no VGA); the 31st pxb finds no slot.
QEMU_PC_MAX_PXB = 30
NUMA_TABLES = ("SRAT", "SLIT", "HMAT")  # numavm's; QEMU makes the others (no -numa: no NUMA tables)
QEMU_ACPITABLE_MAX = 65535  # -acpitable refuses larger tables ("ACPI table too big")
# Once QEMU has exited, the console and stream pumps reach EOF after the bytes still in their
# pipes: they get this long to hand those on, since a busy host may not schedule them for a
# while (5 s was a suspect for a command's output lost on a loaded CI host).  The bound is for a
# sink that blocks (a reader of numavm's stdout that stopped reading).
DRAIN_SECONDS = 60.0


def qemu_ram_offset(gpa: int) -> int:
    """Offset in QEMU pc's main RAM (``max-ram-below-4g=3G``) of guest RAM
    address `gpa`: [0, 3 GiB) is RAM [0, 3 GiB), the rest comes from 4 GiB."""
    return gpa - (HIGH_RAM_BASE - LOW_RAM_LIMIT) if gpa >= HIGH_RAM_BASE else gpa


def check_ram_order(layout: Layout) -> None:
    """Refuse a layout whose domains, end to end in one memfd (GuestMemory's unified
    mode), would not sit at QEMU pc's RAM offsets: each domain's policy must cover
    its own guest ranges under QEMU."""
    base = 0
    for d in layout.domains:
        if not (d.segment_size and d.slots):
            continue
        for s in d.slots:
            if qemu_ram_offset(s.guest.start) != base + s.offset:
                raise NumavmError(
                    f"domain {d.id}: guest range {s.guest} is at RAM offset "
                    f"{qemu_ram_offset(s.guest.start):#x}, not {base + s.offset:#x} as the "
                    "domains end to end would put it; unified memory needs the layout's order")
        base += d.segment_size


_tables_of: tuple[Layout, dict[str, bytes]] | None = None


def acpi_blobs(layout: Layout) -> dict[str, bytes]:
    """The layout's ACPI tables by signature, built once per layout (the engine's check,
    then the run, ask for them)."""
    global _tables_of
    known = _tables_of  # one read: another thread's machine may replace it meanwhile
    if known is None or known[0] is not layout:
        known = _tables_of = (layout, build_tables(layout).blobs())
    return known[1]


def check_tcg(layout: Layout) -> tuple[list[str], list[str]]:
    """Refuse (ConfigError) what QEMU cannot run as planned; else its -smp and -device options."""
    blobs = acpi_blobs(layout)
    for sig in NUMA_TABLES:
        if len(blobs.get(sig, b"")) > QEMU_ACPITABLE_MAX:
            raise EngineRefusal("--accel tcg", f"QEMU's -acpitable takes tables up to {QEMU_ACPITABLE_MAX} "
                                f"bytes and this {sig} is {len(blobs[sig])} ({len(layout.domains)} domains)",
                                "use --accel kvm")
    if len(layout.pci.bridges) > QEMU_PC_MAX_PXB:
        raise EngineRefusal("--accel tcg", f"QEMU's pc machine takes at most {QEMU_PC_MAX_PXB} expander bridges "
                            f"(one per domain with a disk), and this machine has disks on "
                            f"{len(layout.pci.bridges)} domains", "use --accel kvm")
    return tcg_topology(layout)


def pxb_bus_nr(bridge: HostBridge) -> int:
    """The root bus number of the QEMU expander bridge (``pxb``) standing for `bridge`.

    A pxb is a root bus with QEMU's own PCI-to-PCI bridge in slot 0, and the devices given to the
    pxb sit behind that bridge, on the bus firmware numbers next: the plan's bus is that one
    (numavm.plan.pci keeps the bus below each bridge's free for this)."""
    return bridge.bus - 1


def pxb_id(bridge: HostBridge) -> str:
    """The QEMU id of the expander bridge standing for `bridge` (devices name it as their bus)."""
    return f"pxb{bridge.bus}"


def pxb_acpi_name(bridge: HostBridge) -> str:
    """QEMU's name for the pxb's root bus in its DSDT: ``\\_SB.PCxx``, xx its bus number in hex
    (hw/i386/acpi-build.c, QEMU 7.2 and 10.0)."""
    return f"\\_SB_.PC{pxb_bus_nr(bridge):02X}"


def pxm_ssdt(pci: PciLayout) -> bytes | None:
    """An SSDT that gives each of QEMU's expander bridges its domain as ``_PXM``, or None.

    QEMU writes a pxb's ``_PXM`` only from its ``numa_node=``, which it refuses ("Illegal numa
    node") unless the machine has that many ``-numa`` nodes (7.2 and 10.0 alike), and numavm
    gives QEMU none: its own SRAT comes with -acpitable.  So numavm adds the ``_PXM`` itself, in
    the scope of QEMU's device for that root bus; Linux reads it for every bus below."""
    terms = [aml.scope(pxb_acpi_name(b), aml.name("_PXM", aml.integer(b.pxm)))
             for b in pci.bridges if b.pxm is not None]
    return Ssdt(b"".join(terms)).to_bytes() if terms else None


@dataclass(frozen=True)
class Ssdt(_Table):
    """A Secondary System Description Table: raw AML, loaded after QEMU's DSDT."""

    aml: bytes
    signature: ClassVar[bytes] = b"SSDT"
    revision: ClassVar[int] = 2

    def body(self) -> bytes:
        return self.aml


def pci_args(pci: PciLayout, disks: Sequence[DiskImage]) -> list[str]:
    """QEMU options for the machine's host bridges and disks, every BDF the plan's.

    `disks` are the opened images (numavm.host.disk), in --disk order; QEMU inherits their fds.
    Each is fd set N (`-add-fd`) and QEMU opens ``/dev/fdset/N``, which dup()s the inherited
    fd: QEMU reads and writes the very open file numavm checked, never the path again (which
    could meanwhile name another file; ``/proc/self/fd/N`` would reopen it as a new open file,
    which numavm's own lock then refuses: "Failed to lock byte 100", measured).  ``locking=off``: numavm's OFD lock is on that same open
    file description and holds for the whole run; QEMU's own byte-range locks, taken through it,
    would not conflict with it but replace parts of it.  Raw format, QEMU's default cache
    (writeback: the guest sees a volatile write cache and sends flushes, which QEMU passes on as
    fdatasync), the modern virtio-pci transport only, as numavm's own device.  A block device
    takes QEMU's ``host_device`` driver: its ``file`` driver refuses anything but a regular file
    ("'file' driver requires '/dev/fdset/0' to be a regular file", QEMU 7.2).
    """
    args: list[str] = []
    for b in pci.bridges:
        args += ["-device", f"pxb,id={pxb_id(b)},bus_nr={pxb_bus_nr(b)},bus=pci.0"]
    bridges = {b.domain: b for b in pci.bridges}
    for dev, image in zip(pci.devices, disks, strict=True):
        ro = "on" if image.readonly else "off"
        n = dev.index
        args += [
            "-add-fd", f"fd={image.fd},set={n}",
            "-blockdev", f"driver={'host_device' if image.block_device else 'file'},node-name=file{n},"
                         f"filename=/dev/fdset/{n},read-only={ro},locking=off",
            "-blockdev", f"driver=raw,node-name=disk{n},file=file{n},read-only={ro}",
            "-device", f"virtio-blk-pci,id=vd{n},drive=disk{n},bus={pxb_id(bridges[dev.domain])},"
                       f"addr={dev.slot:#x},disable-legacy=on",
        ]
    return args


def share_args(shares: Sequence[Share]) -> list[str]:
    """QEMU options exporting each share (numavm.spec.shares) over virtio-9p, QEMU's own server.

    The ``local`` backend serves the directory with QEMU's credentials (``security_model=none``:
    files keep their host owners and modes; what QEMU cannot chown or chmod is not an error),
    and walks every path one component at a time under the export with O_NOFOLLOW, so neither
    ``..`` nor a symlink takes a request outside it (QEMU 2.9+, CVE-2016-9602); a read-only
    share is ``readonly=on``, QEMU refusing every modifying request with EROFS whatever the
    guest's mount says.  ``multidevs=remap``: an export spanning host filesystems (the host's
    ``/`` holds /proc, /sys, /dev...) gets distinct inode numbers (9p qid paths) from each;
    with QEMU's default the roots of /proc and /sys, both inode 1, were one inode to the
    guest (cache=loose keys inodes by qid), which then mounted its /sys over its /proc.  The
    devices sit on QEMU's root bus (bus 0, which numavm's plan leaves
    free), after the disks' expander bridges, at the first free slots: the disks' BDFs, behind
    the bridges, do not move."""
    args: list[str] = []
    for k, s in enumerate(shares):
        ro = "" if s.rw else ",readonly=on"
        path = s.host.replace(",", ",,")
        args += ["-fsdev", f"local,id=fs{k},path={path},security_model=none,multidevs=remap{ro}",
                 "-device", f"virtio-9p-pci,id=share{k},fsdev=fs{k},mount_tag={s.tag},bus=pci.0,"
                            "disable-legacy=on"]
    return args


def tcg_topology(layout: Layout) -> tuple[list[str], list[str]]:
    """QEMU -smp and -device options giving every vCPU numavm's APIC id.

    QEMU numbers APIC ids socket << ceil(log2(cores)) | core, as numavm's
    layout does with one package per domain.  Linux numbers CPUs in APIC
    order under QEMU and in vCPU order under numavm's MADT, so the two agree
    only when APIC ids rise with the vCPU index: refused otherwise.

    When the ids run from 0 without a gap the vCPUs are the first N that
    ``-smp N`` makes.  Otherwise (a domain before the last has fewer vCPUs
    than its package's cores: 1+2, 3+2, 3+3) the APIC ids have holes:
    QEMU makes the boot vCPU and each other one is a ``-device`` placed by
    socket and core.  QEMU before 9.0 cannot deliver an xAPIC logical-mode
    interrupt to an APIC id above the first id without a CPU (hw/intc/apic.c
    stops its scan at the first empty slot), and Linux sends its IPIs in
    logical flat mode while it has at most 8 possible CPUs: the vCPUs past a
    hole never got them, and the guest stalled in smp_call_function_many_cond.
    So with holes there are always more than 8 possible CPUs (empty sockets
    after the last domain's, hot-pluggable slots in QEMU's MADT and in no
    SRAT entry); Linux then uses physical mode, which QEMU delivers by id.
    """
    ids = list(layout.apic_ids)
    if layout.needs_x2apic:
        top = max(ids)
        raise EngineRefusal("--accel tcg", f"APIC id {top} (vCPU {ids.index(top)}) passes 254, so the guest "
                            f"needs x2APIC, and QEMU's pc machine takes at most {QEMU_PC_MAX_CPUS} vCPUs "
                            "with xAPIC ids (QEMU 7.2's TCG has no x2APIC)", "use --accel kvm")
    if ids != sorted(ids) or ids[0] != 0:
        raise EngineRefusal("--accel tcg", "QEMU numbers vCPUs in APIC-id order, so each domain's cpus= must be "
                            "a contiguous range and the domains' ranges must follow domain order "
                            "(e.g. cpus=0-1, cpus=2-3)", "use --accel kvm for this layout")
    sockets = sum(1 for d in layout.domains if d.apic_ids)
    cores = 1 << layout.core_bits
    maxcpus = sockets * cores
    if maxcpus > QEMU_PC_MAX_CPUS:
        raise EngineRefusal("--accel tcg", f"QEMU's pc machine takes at most {QEMU_PC_MAX_CPUS} vCPUs, and this "
                            f"layout spans {maxcpus} APIC ids ({sockets} packages of {cores})", "use --accel kvm")
    if ids == list(range(len(ids))):  # present CPUs are the first N QEMU would make
        return [f"{len(ids)},sockets={sockets},cores={cores},threads=1,maxcpus={maxcpus}"], []
    # Holes in the APIC ids: pad with empty sockets past LINUX_FLAT_MAX_CPUS (at most 16 in all).
    sockets = max(sockets, LINUX_FLAT_MAX_CPUS // cores + 1)
    devices = [f"{QEMU_CPU}-x86_64-cpu,socket-id={a >> layout.core_bits},"
               f"core-id={a & (cores - 1)},thread-id=0" for a in ids[1:]]
    return [f"1,sockets={sockets},cores={cores},threads=1,maxcpus={sockets * cores}"], devices


class QemuMachine:
    """A guest under qemu-system-x86_64 with TCG, on numavm's memory and tables."""

    def __init__(self, layout: Layout, *, name: str = "numavm",
                 console: Callable[[bytes], None] | None = None,
                 stdout: Callable[[bytes], None] | None = None,
                 stderr: Callable[[bytes], None] | None = None,
                 hugepages: str | None = None, log: Callable[[str], None] | None = None,
                 shares: Sequence[Share] = (), disks: Sequence[DiskImage] | None = None) -> None:
        """`stdout`/`stderr`: given, the guest gets COM2 and COM3 (see `STREAM_PORTS`),
        whose output goes to them.  `shares`: host directories exported over virtio-9p.
        `disks`: the images the caller opened and locked (GuestRun.disks, numavm.api) and
        closes; without them the machine opens its layout's disks itself and closes them."""
        self.layout = layout
        self.shares = tuple(shares)
        self.name = name
        self._console = console or (lambda data: None)
        self._streams: dict[str, Callable[[bytes], None]] = {}
        if stdout is not None or stderr is not None:
            self._streams = {"out": stdout or (lambda data: None), "err": stderr or (lambda data: None)}
        self._log = log or (lambda line: None)
        binary = qemu_binary()
        if not binary:
            raise ConfigError("--accel tcg: qemu-system-x86_64 not found (Debian: apt-get install qemu-system-x86)")
        self.binary = binary
        self.smp, self.cpu_devices = check_tcg(layout)  # refuses before anything is allocated
        if len(layout.pci.bridges) + len(self.shares) > QEMU_PC_MAX_PXB:  # each share: a slot on bus 0 too
            raise EngineRefusal("--accel tcg", f"QEMU's pc root bus has {QEMU_PC_MAX_PXB} free slots, and this run "
                                f"needs {len(layout.pci.bridges)} for disks' bridges and {len(self.shares)} "
                                "for shares", "use fewer shares or --accel kvm")
        self._tmp: Path | None = None
        self._tmpdir: OwnedDir | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._outcome: tuple[Outcome, str] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ended = threading.Event()  # the run is over: the input copier stops
        self._fifo_fds: list[int] = []
        self.argv: list[str] = []
        check_ram_order(layout)
        # The images first: a refused one (missing, locked...) is a one-line error before any guest
        # memory exists.  QEMU gets these very fds, so it uses the files numavm checked and locked.
        # Given `disks` (the run's, opened by its caller: GuestRun.disks) are the caller's to close.
        self._own_disks = disks is None
        self.disks: list[DiskImage] = open_disks(layout.topology.disks) if disks is None else list(disks)
        try:
            self.memory: GuestMemory | None = GuestMemory(layout, machine=name, hugepages=hugepages, unified=True)
        except BaseException:
            if self._own_disks:
                close_disks(self.disks)
            raise
        try:
            self._tmpdir = OwnedDir("tcg")  # a killed run's directory goes with the next run
            self._tmp = self._tmpdir.path
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ arguments

    def command(self, kernel: Path, initrd: Path | None, cmdline: str) -> tuple[list[str], int]:
        """The QEMU argv and the guest RAM fd it inherits."""
        assert self.memory is not None and self._tmp is not None
        tables = acpi_blobs(self.layout)
        acpi: list[str] = []
        for sig in NUMA_TABLES:  # QEMU supplies the rest of the platform's tables
            if sig in tables:
                path = self._tmp / f"{sig}.dat"
                path.write_bytes(tables[sig])
                acpi += ["-acpitable", f"file={path}"]
        ssdt = pxm_ssdt(self.layout.pci)
        if ssdt is not None:
            path = self._tmp / "SSDT.dat"
            path.write_bytes(ssdt)
            acpi += ["-acpitable", f"file={path}"]
        (backing,) = self.memory.backing_fds()
        topo = self.layout.topology
        argv = [
            self.binary, "-name", self.name,
            "-accel", f"tcg,thread={self.tcg_threads()}",
            "-machine", f"{QEMU_PC_MACHINE},memory-backend=ram,hpet=off",
            "-cpu", QEMU_CPU,
            "-smp", *self.smp,
            "-m", f"{topo.memory // (1 << 20)}M",
            "-object", f"memory-backend-file,id=ram,mem-path=/proc/self/fd/{backing.fd},share=on,"
                       f"size={backing.size}",
            *[a for dev in self.cpu_devices for a in ("-device", dev)],
            *acpi,
            *pci_args(self.layout.pci, self.disks),
            *share_args(self.shares),
            "-kernel", str(kernel),
            *(["-initrd", str(initrd)] if initrd else []),
            "-append", cmdline,
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            # COM2, COM3: QEMU's pipe chardev, FIFOs NAME.in (to the guest) and NAME.out
            *[a for port in self._streams
              for a in ("-chardev", f"pipe,id={port},path={self._tmp / port}", "-serial", f"chardev:{port}")],
            "-qmp", f"unix:{self._tmp / 'qmp.sock'},server=on,wait=on",
            "-no-reboot", "-S",
        ]
        if QBOOT.exists() and not self.layout.pci:
            argv[1:1] = ["-bios", str(QBOOT)]
        return argv, backing.fd

    def tcg_threads(self) -> str:
        """One host thread per vCPU only when the host has a core for each.

        With more vCPUs than cores, multi-threaded TCG spends its time
        contending (measured here: 64 vCPUs on 2 cores boot in 25 s single
        against 124 s multi, and 4 vCPUs in 3.7 s against 4.4 s).
        """
        return "multi" if (os.cpu_count() or 1) > self.layout.topology.cpus else "single"

    # ------------------------------------------------------------ running

    def run(self, kernel: Path, initrd: bytes | None, cmdline: str,
            timeout: float | None = None, input_fd: int | None = None,
            on_start: Callable[[], None] | None = None) -> RunResult:
        """Boot and run the guest; `input_fd` (with stream ports): what is read from it
        goes to the guest's COM2 (an interactive shell's terminal).  `on_start` is called
        (in this thread) once the guest runs."""
        assert self._tmp is not None
        initrd_path = None
        if initrd is not None:
            initrd_path = self._tmp / "initrd.img"
            initrd_path.write_bytes(initrd)
        self.argv, fd = self.command(kernel, initrd_path, cmdline)
        self._log("qemu: " + " ".join(_quote(a) for a in self.argv))
        start = time.monotonic()
        # Python sets signal handlers from the main thread only; a run from another thread
        # (several machines at once, numavm.api) leaves SIGINT/SIGTERM to the process, and QEMU
        # still dies with the thread that started it (die_with_parent).
        old = ({sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
               if threading.current_thread() is threading.main_thread() else {})
        pumps: list[threading.Thread] = []
        try:
            fifos = self._open_fifos()
            self._proc = subprocess.Popen(
                self.argv, pass_fds=(fd, *(d.fd for d in self.disks)), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,  # our signal handlers decide QEMU's fate, not the terminal
                preexec_fn=die_with_parent())  # and QEMU dies with numavm, however it ends
            err_buf: list[bytes] = []
            errs = threading.Thread(target=lambda: err_buf.append(self._proc.stderr.read()),  # type: ignore[union-attr]
                                    daemon=True)
            errs.start()
            self._start_guest(start, timeout)  # QEMU has opened its FIFOs once it answers QMP
            reader = threading.Thread(target=self._pump, daemon=True)
            reader.start()
            for port, (rfd, _) in fifos.items():
                pumps.append(threading.Thread(target=_copy_out, args=(rfd, self._streams[port]), daemon=True))
            if input_fd is not None and "out" in fifos:
                pumps.append(threading.Thread(target=_copy_in, args=(input_fd, fifos["out"][1], self._ended),
                                              daemon=True))
            for t in pumps:
                t.start()
            if on_start is not None:
                on_start()
            deadline = None if timeout is None else start + timeout
            # woken at once by stop() or by the console's end (QEMU exited): no polling delay
            while self._outcome is None and self._proc.poll() is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.stop(Outcome.TIMEOUT, f"no end after {timeout:g} s")
                    break
                wait = 1.0 if left is None else min(left, 1.0)
                if not reader.is_alive():  # the console ended: QEMU is exiting, reap it
                    try:
                        self._proc.wait(wait)
                    except subprocess.TimeoutExpired:
                        pass
                    continue
                self._wake.wait(wait)
                self._wake.clear()
            if self._outcome is not None:
                self._kill()  # numavm decided the end: the guest is discarded, nothing to flush
            self._terminate()
            reader.join(DRAIN_SECONDS)
            errs.join(DRAIN_SECONDS)
            self._ended.set()
            for t in pumps:  # the streams' last bytes: QEMU has exited, their FIFOs hit EOF
                t.join(DRAIN_SECONDS)
            stderr = b"".join(err_buf).decode(errors="replace").strip()
            rc = self._proc.returncode
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._terminate()
            self._ended.set()
            for t in pumps:
                t.join(5)
            self._close_fifos()
        if self._outcome is None:
            if rc == 0:
                self._outcome = (Outcome.POWEROFF, "guest powered off")
            elif rc is not None and rc < 0:
                self._outcome = (Outcome.ERROR, f"QEMU was killed by {signal.Signals(-rc).name}")
            else:
                first = stderr.splitlines()[0] if stderr else f"exit status {rc}"
                self._outcome = (Outcome.ERROR, f"QEMU failed: {first}")
        outcome, detail = self._outcome
        return RunResult(outcome, detail, time.monotonic() - start, Counter(),
                         vcpus_ran=frozenset(self.layout.apic_ids), placement=self._describe())

    def _open_fifos(self) -> dict[str, tuple[int, int]]:
        """Per stream port: numavm's ends of its FIFOs, (read NAME.out, write NAME.in).

        Opened before QEMU starts and without blocking (the write end read-write: a
        FIFO opened so needs no reader yet); the read end reaches EOF once QEMU,
        its only writer, has exited.
        """
        assert self._tmp is not None
        out: dict[str, tuple[int, int]] = {}
        for port in self._streams:
            for end in ("in", "out"):
                os.mkfifo(self._tmp / f"{port}.{end}", 0o600)
            r = os.open(self._tmp / f"{port}.out", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._fifo_fds.append(r)
            w = os.open(self._tmp / f"{port}.in", os.O_RDWR | os.O_CLOEXEC)
            self._fifo_fds.append(w)
            os.set_blocking(r, True)
            out[port] = (r, w)
        return out

    def _close_fifos(self) -> None:
        for fd in self._fifo_fds:
            os.close(fd)
        self._fifo_fds = []

    def _describe(self) -> str:
        """The placement audit of the pages QEMU's guest used (QEMU has exited by now)."""
        assert self.memory is not None
        try:
            self.memory.map_resident()
            return self.memory.describe()
        except NumavmError as e:
            return f"guest memory placement unavailable: {e}"

    def _start_guest(self, start: float, timeout: float | None) -> None:
        """Check QEMU's RAM layout against the plan over QMP, then let the guest run."""
        assert self._tmp is not None and self._proc is not None
        path = str(self._tmp / "qmp.sock")
        sock = None
        while sock is None:
            if self._proc.poll() is not None:
                return  # QEMU refused its arguments: the caller reports its stderr
            if timeout is not None and time.monotonic() - start > timeout:
                self.stop(Outcome.TIMEOUT, "QEMU did not start")
                return
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                sock = s
            except OSError:
                s.close()
                time.sleep(0.005)
        with sock, sock.makefile("rw") as f:
            qmp = _Qmp(f)
            qmp.call("qmp_capabilities")
            tree = qmp.call("human-monitor-command", **{"command-line": "info mtree -f"})
            problem = check_ram_layout(self.layout, tree)
            if problem:
                self.stop(Outcome.ERROR, f"QEMU's RAM layout differs from numavm's plan: {problem}")
                return
            cpus = [(c.get("props", {}), qmp.call("qom-get", path=c["qom-path"], property="apic-id"))
                    for c in qmp.call("query-cpus-fast")]
            problem = check_cpus(self.layout, cpus)
            if problem:
                self.stop(Outcome.ERROR, f"QEMU's CPUs differ from numavm's plan: {problem}")
                return
            qmp.call("cont")

    def _pump(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        panic = bytearray()
        while True:
            data = os.read(fd, 65536)
            if not data:
                self._wake.set()  # QEMU closed its console: it has exited
                return
            self._console(data)
            panic += data
            if b"Kernel panic" in panic:
                m = _PANIC.search(panic.decode(errors="replace"))
                if m and b"\n" in panic[panic.find(b"Kernel panic"):]:
                    self.stop(Outcome.PANIC, f"guest kernel panic: {m.group(1).strip()}")
            del panic[:-256]  # keep only a tail for markers split across reads

    def stop(self, outcome: Outcome, detail: str) -> None:
        with self._lock:
            if self._outcome is None:
                self._outcome = (outcome, detail)
        self._wake.set()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop(Outcome.INTERRUPTED, f"stopped by {signal.Signals(signum).name}")

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        self._terminate()
        if self._proc is not None:
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()
        self._tmp = None
        tmpdir, self._tmpdir = self._tmpdir, None
        if tmpdir is not None:
            tmpdir.close()
        memory, self.memory = self.memory, None
        if memory is not None:
            memory.close()
        if self._own_disks:
            close_disks(self.disks)

    def __enter__(self) -> "QemuMachine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_linux(run: GuestRun) -> RunResult:
    """The TCG engine's run: QEMU boots the run's kernel on numavm's memory and tables."""
    from numavm.guest.launch import tcg_cmdline

    with QemuMachine(run.layout, console=run.console, stdout=run.stdout, stderr=run.stderr,
                     hugepages=run.hugepages, log=run.log if run.verbose else None, shares=run.shares,
                     disks=run.disks or None) as m:
        if run.watch is not None:
            run.watch.stop = m.stop
        assert m.memory is not None
        prefault_for(run, m.memory)
        cmdline = tcg_cmdline(run.cmdline, run.layout.topology.cpus, run.own_init)
        return m.run(run.kernel, run.initrd, cmdline, timeout=run.timeout, input_fd=run.input_fd,
                     on_start=run.on_start)


class _Qmp:
    def __init__(self, f: Any) -> None:
        self.f = f
        json.loads(f.readline())  # the greeting

    def call(self, execute: str, **arguments: Any) -> Any:
        self.f.write(json.dumps({"execute": execute, "arguments": arguments} if arguments
                                else {"execute": execute}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise NumavmError(f"QMP {execute}: {reply['error'].get('desc')}")


_MTREE_RAM = re.compile(r"^\s*([0-9a-f]{16})-([0-9a-f]{16}) \(prio \S+, ram\): (\S+)(?: @([0-9a-f]{16}))?", re.M)


def check_ram_layout(layout: Layout, mtree: str) -> str | None:
    """None when QEMU maps its RAM backend where numavm's layout puts it.

    numavm's guest RAM is one backing object whose offset o lies at guest
    o below 3 GiB and at 4 GiB + (o - low) above.  QEMU shadows parts below
    1 MiB with ROMs and VGA (numavm's e820 reserves that area anyway), so
    the comparison starts at 1 MiB.  Reads the flat views of `info mtree -f`.
    """
    topo = layout.topology
    low = min(topo.memory, LOW_RAM_LIMIT)
    want = [(1 << 20, low, 1 << 20)]
    if topo.memory > low:
        want.append((HIGH_RAM_BASE, HIGH_RAM_BASE + topo.memory - low, low))
    views = []  # (guest start, guest end, backend offset) of every view of "ram"
    for m in _MTREE_RAM.finditer(mtree):  # every flat view; those with RAM agree
        if m.group(3) == "ram":
            start = int(m.group(1), 16)
            views.append((start, int(m.group(2), 16) + 1, int(m.group(4), 16) if m.group(4) else start))
    for s, e, off in want:
        if not any(vs <= s and e <= ve and vo + (s - vs) == off for vs, ve, vo in views):
            seen = ", ".join(f"{vs:#x}-{ve - 1:#x}@{vo:#x}" for vs, ve, vo in sorted(views)) or "nothing"
            return f"numavm puts backend offset {off:#x} at guest {s:#x}-{e - 1:#x}; QEMU maps {seen}"
    return None


def check_cpus(layout: Layout, cpus: list[tuple[dict[str, Any], int]]) -> str | None:
    """None when QEMU's vCPUs are the plan's: its APIC ids, and one socket per domain.

    `cpus` is (props from query-cpus-fast, the CPU's apic-id) per vCPU.  The
    guest maps CPUs to nodes by APIC id through numavm's SRAT, so the ids must
    be exactly the SRAT's.  Linux groups CPUs that share a last-level cache,
    which QEMU's qemu64 CPU reports per socket; with every socket inside one
    domain the kernel's llc-sibling check ("... is not on the same node") holds
    by construction, so the kernel stage need not wait for SMP bring-up to see it.
    """
    want = {a: d.id for d in layout.domains for a in d.apic_ids}
    got = sorted(a for _, a in cpus)
    if got != sorted(want):
        return f"APIC ids {got}, plan {sorted(want)}"
    socket_domain: dict[int, int] = {}
    for props, apic in cpus:
        sock = props.get("socket-id")
        if sock is None:
            return f"vCPU with APIC id {apic} has no socket-id"
        dom = want[apic]
        if socket_domain.setdefault(sock, dom) != dom:
            return f"socket {sock} holds vCPUs of domains {socket_domain[sock]} and {dom}"
    return None


def _copy_out(fd: int, sink: Callable[[bytes], None]) -> None:
    """A stream port's output to its sink until QEMU closes it."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        sink(data)


def _copy_in(src: int, dst: int, done: threading.Event) -> None:
    """Host input (an interactive terminal) to the guest's command port until the run ends."""
    import select

    while not done.is_set():
        ready, _, _ = select.select([src], [], [], 0.1)
        if ready:
            data = os.read(src, 4096)
            if not data:
                return
            os.write(dst, data)


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)
