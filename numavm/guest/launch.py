"""A Linux guest on either engine: what `numavm run` and `numavm check` share.

The guest is Debian's kernel (host-side unpacked, entered directly) with
numavm's own initramfs, booted on the machine the plan describes.  This
module picks the kernel command line for the engine and host, prepares the
assets, and collects the console (and, for `run`, hands the guest command's
stdout and stderr, which arrive on serial ports of their own, to their
sinks).  The engines run it as a `numavm.vmm.run.GuestRun`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Sequence

from numavm.guest.assets import Assets, cached, fetch
from numavm.host.files import MAX_ADD, MAX_ADD_TOTAL, MAX_INITRD, MAX_KERNEL, check_input_file, read_input
from numavm.host.cache import CacheError, cache_root, find, locked, note, private_dir, prune, recall, store
# numavm.plan.boot (kernel loading, boot plans) is imported where used: the TCG engine needs
# neither, and every import is paid at every `numavm check`.
from numavm.errors import ConfigError, NumavmError
from numavm.vmm.run import Outcome

if TYPE_CHECKING:
    from numavm.spec.topology import Topology
    from numavm.plan.layout import Layout
    from numavm.guest.initramfs import Entry

Log = Callable[[str], None]


# The console is the serial port in both engines; earlyprintk puts the early
# boot log (SRAT, node ranges, zonelists) on it before the console driver
# exists.  nokaslr keeps the kernel image on the same node from boot to boot.
# pci=off: numavm's machine has no PCI, and a probe of the absent config space costs a
# port-I/O exit per access.  Measured in L1 (nested SVM, an AMD family 0xf CPU): the GART
# aperture search probed 256 buses x 32 slots, twice, ~33,000 of the example's 38,920 exits;
# with pci=off 6,136 exits, and L1's run 172 s -> 87 s.
BASE_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr panic=-1"
NO_PCI_CMDLINE = "pci=off"  # not for a machine with devices (--disk): they are PCI functions
# A machine with devices needs PCI, but not the early port-I/O scans (the GART aperture search,
# early quirks): pci=noearly leaves them out.  Linux then takes the MCFG's ECAM late, where it
# finds it reserved by an ACPI motherboard resource (numavm's DSDT has one): measured under
# QEMU q35 with Debian's 6.1, "PCI: MMCONFIG at [mem 0xb0000000-0xbfffffff] reserved in ACPI
# motherboard resources", and a virtio-blk disk behind a pxb-pcie found on its node.
PCI_CMDLINE = "pci=noearly"
KERNEL_STAGE_CMDLINE = "ignore_loglevel"
# Userspace: warnings and worse reach the console (an llc-sibling warning among
# them), the info lines do not: a serial console costs an emulated guest about
# 1.5 s for the ~400 lines of a full boot log.  numavm's /init copies the NUMA
# lines the check reads (SRAT, node ranges, zonelists, fallback order) from
# dmesg; `--append loglevel=7` brings the whole log back.
USERSPACE_CMDLINE = "loglevel=5"


# The kernel's log ring by default: Debian's CONFIG_LOG_BUF_SHIFT=17.  Linux grows it for many
# CPUs only after its NUMA setup has logged.
LOG_BUF_DEFAULT = 128 << 10


def log_buf_cmdline(cpus: int, nodes: int) -> str:
    """``log_buf_len=`` for a machine whose NUMA lines would not fit the default log ring, else "".

    `check` reads the guest's NUMA setup from its log: a line per vCPU and per memory range
    in the SRAT, and a fallback order per node that names every node (about 4 bytes each).
    A ring too small for them loses the first before the console or /init has read them.
    Measured: 256 domains x 1,024 vCPUs logged "** 121 printk messages dropped **", the
    fallback orders of nodes 0-120, and the check reported them missing.  Twice the
    estimate plus the default ring, rounded up to a power of two as the kernel does; small
    machines get nothing, so their command line stays as it was."""
    numa = cpus * 64 + nodes * 160 + nodes * nodes * 4
    if 2 * numa <= LOG_BUF_DEFAULT // 2:  # the other half for the rest of the boot log
        return ""
    need = 2 * numa + LOG_BUF_DEFAULT
    return f"log_buf_len={1 << (need - 1).bit_length()}"


def kernel_cmdline(stage: str, emulated_kvm: bool, append: str = "", topology: Topology | None = None,
                   shares: bool = False) -> str:
    """The guest's command line for `stage`; with `topology`, a log ring its NUMA lines fit in
    (`log_buf_cmdline`) unless `append` sets one, and PCI (without its early scans) when the
    machine has devices or the run has shares (`shares`: virtio-9p devices for --share and
    --host-root, PCI functions like the machine's disks)."""
    pci = shares or (topology is not None and bool(topology.disks))
    parts = [BASE_CMDLINE, PCI_CMDLINE if pci else NO_PCI_CMDLINE,
             KERNEL_STAGE_CMDLINE if stage == "kernel" else USERSPACE_CMDLINE]
    if emulated_kvm:
        from numavm.plan.boot import emulation_safe_cmdline
        parts.append(emulation_safe_cmdline())
    if topology is not None and "log_buf_len=" not in append:
        parts.append(log_buf_cmdline(topology.cpus, len(topology.domains)))
    if append:
        parts.append(append)
    return " ".join(p for p in parts if p)


def tcg_cmdline(cmdline: str, cpus: int = 1, own_init: bool = False) -> str:
    """`cmdline` with what makes an emulated (TCG) guest boot fast and evenly, unless given already.

    Both TCG boots use it: numavm's engine (`numavm.vmm.tcg`) and the QEMU oracle
    (tests/test_oracle.py's `qemu_argv`).  None of it changes what the guest reports about its
    topology (nodes, CPU lists, APIC ids, distances).  Measured with N domains of one
    vCPU each on 2 busy host cores (Debian 12: 6.1 kernel, QEMU 7.2; Debian 13: 6.12,
    QEMU 10.0):

    * ``maxcpus=1`` and ``numavm.online_cpus=all``, from `TCG_ONLINE_FROM_INIT` vCPUs
      and with `own_init` only (numavm's /init then brings the other CPUs online before
      it reports; another init would keep one CPU).  Until the fs initcalls the
      kernel's clocksource is jiffies, which cannot drive a tickless timer, so every
      online CPU, idle or not, takes a periodic tick at HZ=250 with scheduler load
      balancing over one group per node.  QEMU runs all vCPUs in one round-robin
      thread, and the ticks are paced by the host's clock: past some number of vCPUs
      the emulated tick work fills the host's time, and the boot CPU's initcalls crawl
      (sampled RIPs of the non-halted vCPUs: scheduler_tick, update_process_times,
      update_sd_lb_stats, rcu_sched_clock_irq).  A cliff, not a slope: 16 vCPUs 12-16 s,
      32 vCPUs 14-20 s, 48 vCPUs 61 s, 64 vCPUs 88-130 s, and longer still when the
      host is busier.  Onlined from /init the CPUs find a tickless kernel (64 vCPUs:
      45 s against 130 s on 6.1, 76 s against 163 s on 6.12; 48 vCPUs: 38 s against
      61 s), but each costs ~0.3 s, a loss below the cliff (16 vCPUs: 15-20 s against
      12-16 s; 32 vCPUs: 20-27 s against 14-20 s on 6.1, 54 s against 43 s on 6.12).
    * ``tsc=reliable``: QEMU's TSC is the host's, but the kernel otherwise marks it
      unstable ("TSCs unsynchronized"): sched_clock's slow path, and HPET as the
      clocksource (an emulated MMIO read per clock read).  The 63 secondary CPUs came
      up in 7.8 s instead of 16.7 s.
    * ``lpj=``: each secondary CPU's delay-loop calibration fails under TCG
      ("calibrate_delay_direct() failed") and falls back to a slow converging loop,
      ~0.15 s per CPU; `lpj=` presets the value.  QEMU's TCG reads the host's TSC, so
      the host's clock rate gives the right value (Debian's kernel runs at HZ=250; the
      boot CPU computes the same value itself); a host whose `cpu MHz` is not its TSC
      rate only changes udelay() lengths, which QEMU's device models do not depend on.

    A parameter of the same name already on the line (`--append`) is kept, and a
    ``maxcpus=`` or ``nr_cpus=`` there leaves the CPUs to the user.
    """
    parts = [cmdline]
    if "lpj=" not in cmdline:
        mhz = _host_mhz()
        if mhz is not None:
            parts.append(f"lpj={int(mhz * 1_000_000 / GUEST_HZ)}")
    if "tsc=" not in cmdline:
        parts.append("tsc=reliable")
    if own_init and cpus >= TCG_ONLINE_FROM_INIT and "maxcpus=" not in cmdline and "nr_cpus=" not in cmdline:
        from numavm.guest.initramfs import ONLINE_CPUS_MARK

        parts.append(f"maxcpus=1 {ONLINE_CPUS_MARK}")
    return " ".join(parts)


GUEST_HZ = 250  # Debian's kernels: CONFIG_HZ_250
# From this many vCPUs a TCG guest boots one CPU and its /init onlines the rest (tcg_cmdline).
# Onlining costs ~0.3 s a CPU; up to 32 vCPUs, booting them all was faster (see tcg_cmdline).
TCG_ONLINE_FROM_INIT = 48


def _host_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    mhz = float(line.split(":", 1)[1])
                    return mhz if 100 <= mhz <= 10_000 else None
    except (OSError, ValueError):
        pass
    return None


@dataclass
class GuestAssets:
    kernel: Path  # what the user gave or the cached Debian bzImage
    vmlinux: Path  # the unpacked ELF (same as kernel when given an ELF)
    busybox: Path | None
    debian: Assets | None = None  # the Debian package the kernel came from (None: --kernel)
    release: str | None = None  # that package's release, when not the host's


def guest_assets(kernel: str | None, log: Log, release: str | None = None) -> GuestAssets:
    """The kernel (fetched from Debian's packages, of the host's release or of
    `release`, unless given) and its unpacked ELF.

    A kernel that is not a readable bzImage or x86-64 vmlinux is bad input
    (ConfigError), as a missing one is.
    """
    if kernel is None:
        assets = cached(release=release) or fetch_anywhere(log, release)
        return GuestAssets(assets.kernel, unpacked_kernel(assets.kernel, log), assets.busybox, assets, release)
    path = Path(kernel)
    check_input_file(path, "--kernel", MAX_KERNEL)
    try:
        return GuestAssets(path, unpacked_kernel(path, log), None)
    except OSError as e:
        raise ConfigError(f"--kernel: cannot read {path}: {e.strerror}") from None
    except CacheError:
        raise
    except NumavmError as e:
        raise ConfigError(f"--kernel: {' '.join(str(e).split())}") from None


def fetch_anywhere(log: Log, release: str | None = None) -> Assets:
    """`fetch()` into the cache, or into this run's private directory when the cache
    cannot be written (read-only, full)."""
    try:
        return fetch(log=log, release=release, reuse=True, spill=private_dir)
    except OSError as e:
        first = e
    where = private_dir()
    log(f"numavm: the cache {cache_root()} cannot be written ({first.strerror}): fetching into {where}")
    try:
        return fetch(where, log=log, release=release)
    except OSError as e:
        raise CacheError(f"cannot keep Debian's kernel and busybox: the cache {cache_root()}: "
                         f"{first.strerror}; {where}: {e.strerror}; free space or point XDG_CACHE_HOME "
                         f"or TMPDIR at a writable directory, or pass --kernel and --initrd") from None


def _valid_elf(path: Path) -> bool:
    """Whether `path` is a whole x86-64 vmlinux (every segment inside the file).

    Mapped, not read: the check touches only the headers and notes, so a run no
    longer reads the whole ~40 MB image twice (here and when loading it)."""
    import mmap

    from numavm.plan.boot.elf import parse_elf
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            ok = True
            try:
                # its views into `mm` die with the result, before the unmap
                ok = _is_linux(parse_elf(mm, str(path)).notes)
            except NumavmError:
                ok = False
            return ok
    except (OSError, ValueError):  # unreadable, or empty (an empty file cannot be mapped)
        return False


def _is_linux(notes: Sequence[tuple[bytes, int, bytes]]) -> bool:
    """Whether an x86-64 ELF is a Linux kernel: its notes are Linux's (the build salt, since
    4.20) or Xen's (the PVH entry); a program such as /bin/ls has neither."""
    return any(name in (b"Linux", b"Xen") for name, _, _ in notes)


# Unpacked images (~40 MB each) and the notes that name them, most recently used first: a
# new kernel (Debian's updates, a user's own builds) no longer leaves its predecessors forever.
KERNELS_KEPT = 4
KERNEL_NOTES_KEPT = 16  # one per kernel file's path, size, mtime and inode
_DIGEST_HEX = 16  # an image is vmlinux-<the first hex digits of its source's SHA-256>


def unpacked_kernel(path: Path, log: Log) -> Path:
    """An ELF vmlinux for `path`, unpacked once and cached by content.

    QEMU's PVH boot wants the ELF, and the KVM engine then skips a 1.5 s
    decompression on every boot.  A cached vmlinux is used only when it is
    whole (`_valid_elf`); when the cache cannot be written the unpacked image
    goes to this run's private directory (`numavm.host.cache.store`).  The
    KERNELS_KEPT most recently used images are kept.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"\x7fELF":
        if not _valid_elf(path):
            from numavm.plan.boot import load_kernel
            load_kernel(path)  # raises what is wrong with it
            raise NumavmError(f"{path}: an x86-64 ELF file, but not a Linux kernel (no Linux or Xen "
                              f"ELF note)")
        return path
    known = _known_vmlinux(path)  # the common case, without waiting for anyone
    if known is not None:
        return known
    # one numavm at a time unpacks (runs started together unpack once and note one digest)
    with locked(cache_root(), "unpack", log, "unpacking a kernel"):
        return _unpacked(path, log)


def _known_vmlinux(path: Path) -> Path | None:
    """The whole vmlinux already unpacked from `path` (known by its path, size, mtime and inode)."""
    try:
        st = path.stat()
    except OSError:
        return None
    digest = recall("vmlinux-src", f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}") or ""
    out = find(f"vmlinux-{digest}") if len(digest) == _DIGEST_HEX else None
    if out is None or not _valid_elf(out):
        return None
    try:
        os.utime(out)  # used: the newest survive `prune`
    except OSError:
        pass
    return out


def _unpacked(path: Path, log: Log) -> Path:
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"\x7fELF":  # the file changed since: the caller's checks again
            if not _valid_elf(path):
                from numavm.plan.boot import load_kernel
                load_kernel(path)  # raises what is wrong with it
                raise NumavmError(f"{path}: an x86-64 ELF file, but not a Linux kernel (no Linux or Xen "
                                  f"ELF note)")
            return path
        # hashing an 8 MB bzImage costs ~40 ms a run: remember the digest per (file, size, mtime)
        st = os.fstat(f.fileno())
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        digest = recall("vmlinux-src", ident) or ""
        out = find(f"vmlinux-{digest}") if len(digest) == _DIGEST_HEX else None
        if out is None:
            import hashlib  # only to hash a new kernel: its import alone is ~15 ms

            digest = hashlib.sha256(head + f.read()).hexdigest()[:_DIGEST_HEX]
            note("vmlinux-src", ident, digest, keep=KERNEL_NOTES_KEPT)
            out = find(f"vmlinux-{digest}")
    if out is not None and _valid_elf(out):
        try:
            os.utime(out)  # used: the newest survive `prune`
        except OSError:
            pass
        return out
    from numavm.plan.boot import load_kernel
    image = load_kernel(path)
    assert image.vmlinux is not None
    out = store(f"vmlinux-{digest}", bytes(image.vmlinux), log)
    prune(out.parent, ("vmlinux-" + "[0-9a-f]" * _DIGEST_HEX,), KERNELS_KEPT)
    log(f"numavm: unpacked {path.name} ({image.compression}) to {out} in {image.unpack_seconds:.1f} s")
    return out


def guest_modules(assets: GuestAssets, layout: Layout, log: Log) -> list[Path]:
    """The kernel modules numavm's initramfs must load for the machine's devices (in load
    order, numavm.guest.modules): [] without devices; [] with a note for a kernel numavm did not
    fetch (--kernel: its drivers must be built in).  Fetched once per kernel into the cache."""
    if not layout.pci:
        return []
    if assets.debian is None:
        log("numavm: --kernel: numavm knows no modules for this kernel; its virtio-pci and virtio-blk "
            "drivers must be built in for the guest to see the machine's disks")
        return []
    from numavm.guest.modules import device_modules

    return device_modules(assets.debian, sorted({d.kind for d in layout.pci.devices}), log, assets.release)


def guest_initrd(initrd: str | None, busybox: Path | None, command: list[str] | None,
                 add: list[str], shell: bool = False, modules: Sequence[Path] = (),
                 extra: Sequence[Entry] = ()) -> bytes:
    from numavm.guest.initramfs import cached_initramfs

    if initrd is not None:
        return read_input(initrd, "--initrd", MAX_INITRD)
    pairs = check_added(add)
    if busybox is None:
        busybox = (cached() or fetch_anywhere(lambda s: None)).busybox
    return cached_initramfs(busybox, command or None, pairs, shell=shell, modules=modules, extra=extra)


def check_inputs(kernel: str | None, initrd: str | None, add: Sequence[str]) -> None:
    """Every file a run reads, checked for kind and size before anything else happens."""
    if initrd is not None:
        check_input_file(initrd, "--initrd", MAX_INITRD)
    check_added(add)
    if kernel is not None:
        check_input_file(kernel, "--kernel", MAX_KERNEL)


def check_added(add: Sequence[str]) -> list[tuple[Path, str]]:
    """--add's (host file, guest path) pairs, each file a regular file within MAX_ADD, all
    within MAX_ADD_TOTAL (numavm.host.files)."""
    from numavm.host.files import too_large

    pairs = []
    total = 0
    for spec in add:
        host, _, guest = spec.partition(":")
        total += check_input_file(host, "--add", MAX_ADD)
        if total > MAX_ADD_TOTAL:
            raise too_large("--add", host, MAX_ADD_TOTAL, "every --add file together")
        pairs.append((Path(host), guest or host))
    return pairs


class Console:
    """Collects the guest console, echoes it (to each of `echo`), and asks `watch` after each chunk."""

    def __init__(self, echo: BinaryIO | Sequence[BinaryIO] | None = None,
                 watch: Callable[[str], None] | None = None) -> None:
        self._echo = [] if echo is None else [echo] if not isinstance(echo, Sequence) else list(echo)
        self._watch = watch
        self._chunks: list[bytes] = []
        self._text = ""

    def __call__(self, data: bytes) -> None:
        self._chunks.append(data)
        for out in self._echo:
            out.write(data)
            out.flush()
        if self._watch is not None:
            self._watch(data.decode(errors="replace"))

    def tail(self, lines: int) -> str:
        """The last `lines` lines, for a run that ended badly without --verbose."""
        return "\n".join(self.text.replace("\r", "").rstrip("\n").split("\n")[-lines:])

    @property
    def text(self) -> str:
        if self._chunks:
            self._text += b"".join(self._chunks).decode(errors="replace")
            self._chunks.clear()
        return self._text


class Sink:
    """A guest stream written through to a host binary stream as it arrives.

    A reader that went away (a closed pipe: `numavm run ... | head`) ends the
    writing, not the run; so does any other error writing (a full disk), which is kept in
    `error` for the command line to report."""

    def __init__(self, out: BinaryIO) -> None:
        self._out: BinaryIO | None = out
        self.error: OSError | None = None

    def __call__(self, data: bytes) -> None:
        if self._out is None:
            return
        try:
            self._out.write(data)
            self._out.flush()
        except (BrokenPipeError, ValueError):
            self._out = None
        except OSError as e:
            self._out, self.error = None, e


class KernelStageWatch:
    """Stops the machine once the guest kernel has finished its NUMA setup.

    Ready at the kernel's "Built N zonelists" line, or, with `until_smp`, once
    the secondary CPUs are up as well (the scheduler's llc-sibling warnings come
    then).  `until_smp` is off where the engine checks its vCPUs against the plan
    before the guest runs (TCG: `numavm.vmm.tcg.check_cpus`), which settles what SMP
    bring-up would show and saves the ~1.5 s bring-up costs there.
    """

    READY = re.compile(r"Built \d+ zonelists")
    SMP = "Brought up"  # "smp: Brought up N nodes, M CPUs"

    def __init__(self, until_smp: bool) -> None:
        self.stop: Callable[[Outcome, str], None] | None = None
        self._tail = ""
        self._ready = False
        self._done = False
        self.until_smp = until_smp  # also wait for SMP bring-up (llc-sibling warnings come then)

    def __call__(self, text: str) -> None:
        if self._done:
            return
        # only the new text and the end of the previous chunks: a marker may arrive in pieces
        window = self._tail + text
        self._tail = window[-160:]
        if not self._ready and self.READY.search(window):
            self._ready = True
            window = window[self.READY.search(window).end():]  # type: ignore[union-attr]
            self._tail = window[-160:]
        if self._ready and (not self.until_smp or self.SMP in window):
            self._done = True
            if self.stop is not None:
                self.stop(Outcome.STOPPED, "guest kernel finished its NUMA setup")
