"""Which engine runs the guest: KVM, or QEMU's TCG where KVM cannot run it well.

Each engine is an object implementing `Engine`: it says why it was chosen and
what it cannot do, refuses a layout it cannot run, and runs a `GuestRun`.
Callers ask it; they never branch on its name.  The engines' modules are
imported only when a guest runs, so a TCG run loads nothing of KVM's.

`auto` picks KVM where hardware virtualization is usable, and TCG where
/dev/kvm is missing, not accessible, or backed by a KVM that emulates guest
kernel code (kvm_pvm and the like: a KVM module on a CPU without VT-x/AMD-V,
~1000x slower than native and unable to run some instructions).  The choice
comes with a one-line reason that the commands print.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from numavm.errors import ConfigError

if TYPE_CHECKING:
    from numavm.plan.layout import Layout
    from numavm.vmm.run import GuestRun, RunResult

ACCELS = ("auto", "kvm", "tcg")
KVM_DEV = Path("/dev/kvm")
# KVM modules that run guests without hardware virtualization, by emulation.
EMULATING_MODULES = ("kvm_pvm",)
KVM_DEVNO = (10, 232)  # a misc device; KVM_MINOR in include/linux/miscdevice.h


@dataclass(frozen=True)
class HostVirt:
    kvm_usable: bool  # /dev/kvm opens read-write
    emulated: bool  # ... but guest kernel code is emulated, not run natively
    reason: str  # one line: what was found


def device_kind(dev: Path, sys_char: Path = Path("/sys/dev/char")) -> str:
    """What `dev` is: "KVM's device" for the misc device 10:232, else e.g. "character device 1:3 (null)"."""
    try:
        st = os.stat(dev)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISCHR(st.st_mode):
        num = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if num == KVM_DEVNO:
            return "KVM's device"
        try:
            name = next((line.split("=", 1)[1] for line in (sys_char / f"{num[0]}:{num[1]}" / "uevent")
                         .read_text().splitlines() if line.startswith("DEVNAME=")), None)
        except OSError:
            name = None
        return f"character device {num[0]}:{num[1]}" + (f" ({name})" if name else "")
    if stat.S_ISBLK(st.st_mode):
        return f"block device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"))
    return next((text for test, text in kinds if test(st.st_mode)), "not a device")


def detect(dev: Path = KVM_DEV, sysfs: Path = Path("/sys/module"),
           cpuinfo: Path = Path("/proc/cpuinfo"), probe: bool = True) -> HostVirt:
    """What `dev` offers: missing, inaccessible, not KVM (by device number, then
    KVM_GET_API_VERSION when `probe`), emulating, or hardware virtualization."""
    if not dev.exists():
        return HostVirt(False, False, f"{dev} does not exist (no KVM module loaded)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return HostVirt(False, False, f"{dev} is not accessible to this user (add it to the kvm group)")
    what = device_kind(dev)
    if what != "KVM's device":
        return HostVirt(False, False, f"{dev} is {what}, not KVM's device (character device "
                                      f"{KVM_DEVNO[0]}:{KVM_DEVNO[1]})")
    if probe:
        from numavm.errors import NumavmError
        from numavm.vmm.kvm.ioctls import Kvm
        try:
            with Kvm(str(dev), required_caps=()):
                pass
        except NumavmError as e:
            return HostVirt(False, False, f"{dev} does not work as KVM: {e}")
    for mod in EMULATING_MODULES:
        if (sysfs / mod).exists():
            return HostVirt(True, True, f"{dev} is {mod}, which emulates guest kernel code")
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    if flags and not {"vmx", "svm"} & set(flags):
        return HostVirt(True, True, f"{dev} works but the CPU has no VT-x/AMD-V, so guest code is emulated")
    return HostVirt(True, False, f"{dev} has hardware virtualization")


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


class Engine(Protocol):
    """What runs a guest: chosen once per command, asked (never named) by the callers."""

    name: str  # "kvm" or "tcg": for reports, not for branching
    why: str  # one line: why this engine runs the guest
    limits: tuple[str, ...]  # what it cannot do here, one phrase each
    emulates_guest_code: bool  # a KVM that emulates guest kernel code: no userspace, safe kernel params
    counts_exits: bool  # RunResult.exits is counted
    cpus_checked_before_run: bool  # the vCPUs' APIC ids and packages are checked before the guest runs
    serves_shares: bool  # gives the guest a virtio-9p device per GuestRun.shares (numavm.spec.shares)

    def refuse(self, layout: Layout) -> None:
        """Raise ConfigError when this engine cannot run `layout` as planned; nothing allocated."""

    def run(self, run: GuestRun) -> RunResult:
        """Boot the run's kernel on its layout until it ends."""


@dataclass(frozen=True)
class KvmEngine:
    """numavm's own VMM on /dev/kvm (numavm.vmm.kvm.machine)."""

    host: HostVirt
    why: str
    pin: bool = True  # vCPU threads on the CPUs of their domain's policy nodes
    name: str = "kvm"
    counts_exits: bool = True
    cpus_checked_before_run: bool = False
    serves_shares: bool = True  # its own virtio-9p device and server (numavm.devices.virtio.p9), on its bridges

    @property
    def emulates_guest_code(self) -> bool:
        return self.host.emulated

    @property
    def limits(self) -> tuple[str, ...]:
        if self.host.emulated:
            return ("guest userspace (guest kernel code is emulated, ~1000x slower)",)
        return ()

    def refuse(self, layout: Layout) -> None:
        return None  # KVM's own limits (vCPU count, APIC ids) are checked as the VM is built

    def run(self, run: GuestRun) -> RunResult:
        from numavm.vmm.kvm.machine import run_linux
        return run_linux(run, pin=self.pin)


@dataclass(frozen=True)
class TcgEngine:
    """QEMU's TCG as CPU and platform, on numavm's memory and tables (numavm.vmm.tcg)."""

    why: str
    name: str = "tcg"
    limits: tuple[str, ...] = ("exit counts", "vCPU pinning")
    emulates_guest_code: bool = False
    counts_exits: bool = False
    cpus_checked_before_run: bool = True  # over QMP (numavm.vmm.tcg.check_cpus)
    serves_shares: bool = True  # QEMU's own 9p server (numavm.vmm.tcg.share_args)

    def refuse(self, layout: Layout) -> None:
        from numavm.vmm.tcg import check_tcg
        check_tcg(layout)

    def run(self, run: GuestRun) -> RunResult:
        from numavm.vmm.tcg import run_linux
        return run_linux(run)


class EngineRefusal(ConfigError):
    """An engine cannot run a layout: `reason` says why, `advice` what to do instead."""

    def __init__(self, option: str, reason: str, advice: str) -> None:
        super().__init__(f"{option}: {reason}; {advice}")
        self.reason = reason


def choose(accel: str, host: HostVirt | None = None, pin: bool = True) -> Engine:
    """The engine for --accel, with its one-line reason; ConfigError when it cannot run here."""
    if accel not in ACCELS:
        raise ConfigError(f"--accel: must be one of {', '.join(ACCELS)}, got {accel!r}")
    if accel == "tcg":  # asked for: /dev/kvm is not looked at (nor numavm.vmm.kvm.ioctls imported)
        if not qemu_binary():
            raise ConfigError("--accel tcg: qemu-system-x86_64 not found (Debian: apt-get install qemu-system-x86)")
        return TcgEngine("engine tcg (asked for): QEMU software emulation")
    host = host or detect()
    if accel == "kvm":
        if not host.kvm_usable:
            raise ConfigError(f"--accel kvm: {host.reason}")
        return KvmEngine(host, f"engine kvm (asked for): {host.reason}", pin)
    if host.kvm_usable and not host.emulated:
        return KvmEngine(host, f"engine kvm: {host.reason}", pin)
    if qemu_binary():
        return TcgEngine(f"engine tcg: {host.reason}; QEMU's TCG is faster here")
    if host.kvm_usable:
        return KvmEngine(host, f"engine kvm: {host.reason}, and no qemu-system-x86_64 for TCG; expect a slow boot",
                         pin)
    raise ConfigError(f"--accel auto: no engine: {host.reason}, and qemu-system-x86_64 is not installed")


def select(accel: str, layout: Layout, host: HostVirt | None = None, pin: bool = True) -> Engine:
    """`choose`, then the layout: where auto chose TCG and TCG cannot run this layout,
    KVM runs it if it can; ConfigError when no engine can."""
    if accel == "auto":
        host = host or detect()
    engine = choose(accel, host, pin)
    try:
        engine.refuse(layout)
    except EngineRefusal as e:
        if accel != "auto" or host is None or not host.kvm_usable:
            raise
        engine = KvmEngine(host, f"engine kvm: TCG cannot run this layout ({e.reason}), though {host.reason}",
                           pin)
    return engine
