"""numavm as a library: a machine, its plan, a command run in it, and the check.

The command line is built on this module (`numavm plan`, `run` and `check`
call `Machine.plan`, `Machine.run` and `Machine.check`)::

    from numavm import Machine

    m = Machine(cpus=2, memory="1G", domains=["id=0,cpus=0", "id=1,cpus=1"], distances=["0:1=21"])
    m = Machine.from_options(["-n", "id=0,size=512M,cpus=0", "-n", "id=1,size=512M,cpus=1"])
    m = Machine.from_toml("examples/example.toml")
    m.plan().to_dict()                  # what `numavm plan --json` prints
    r = m.run(["sh", "-c", "cat /sys/devices/system/node/online"], timeout=120)
    r.status, r.stdout, r.stderr        # the command's, apart from the guest console
    r.topology.nodes[1].cpus            # what the guest's sysfs showed (a GuestReport)
    r.engine, r.engine_why, r.placement
    v = m.check(); v.match, v.mismatches

Bad input raises `ConfigError` with the one-line message the command line
prints (before anything is allocated); a guest that ends otherwise than by
powering off (panic, timeout, ...) raises `GuestFailed`, which carries the
run's `CommandResult`.  Nothing is printed unless a `log` is given.

Several machines can run at once from one process, each from its own thread,
on the TCG engine.  The KVM engine handles SIGINT/SIGTERM and kicks its vCPU
threads with a signal, which Python allows only in the main thread: a KVM run
from another thread raises `NumavmError` saying so.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Union

from numavm.errors import ConfigError, NumavmError
from numavm.vmm.run import OUTCOME_EXIT, STAGES, ExitCode, Outcome, RunResult
from numavm.spec.topology import MachineSpec, Topology

if TYPE_CHECKING:
    from numavm.check.report import GuestNode, GuestReport
    from numavm.check.verdict import CheckReport
    from numavm.vmm.engine import Engine
    from numavm.plan.layout import Layout

Log = Callable[[str], None]
Sink = Callable[[bytes], None]
# Where a guest stream goes: None collects it into the result, else a binary stream or a callable.
Output = Union[None, BinaryIO, IO[bytes], Sink]

__all__ = ["Machine", "Plan", "CommandResult", "GuestReport", "GuestNode", "Verdict", "GuestFailed",
           "ConfigError", "NumavmError"]


def __getattr__(name: str) -> Any:
    # The guest-report classes load with what reads a result, not with numavm.api: a run
    # imports them while its guest boots (_read_results_soon).
    if name in ("GuestReport", "GuestNode"):
        from numavm.check import report
        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _read_results_soon(*modules: str) -> Callable[[], None]:
    """GuestRun.on_start: import what reads the run's result while the guest boots; imported
    before the run, it delayed the guest by ~0.5 s in the nested-SVM L1, where Python is emulated."""
    def load() -> None:
        import importlib
        for m in modules:
            importlib.import_module(m)
    return load


def _quiet(line: str) -> None:
    return None


class GuestFailed(NumavmError):
    """The guest ended otherwise than by powering off: panic, triple fault, timeout, reset...

    The message is the line `numavm run` prints (``guest timeout: no end after 30 s``);
    `result` holds what the run gave (the console's tail shows why), `exit_code` the
    status `numavm run` exits with (70-74, 130, 1)."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(f"guest {result.outcome.value}: {result.detail}")
        self.result = result
        self.outcome = result.outcome
        self.exit_code = result.exit_code


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class CommandResult:
    """What `Machine.run` gives back."""

    status: int  # the command's exit status (0 when the guest ran no command)
    stdout: bytes  # what the command wrote to its stdout (empty when `stdout=` sent it elsewhere)
    stderr: bytes  # ... and to its stderr
    topology: GuestReport | None  # the guest's sysfs as its /init read it; None with another init (`initrd=`)
    engine: str  # "kvm" or "tcg"
    engine_why: str  # one line: why that engine
    placement: str  # the memory placement audit (per domain: policy asked, policy seen, pages per node)
    outcome: Outcome
    detail: str
    seconds: float
    console: str  # the guest console: kernel log, numavm's report, the exit marker
    warnings: tuple[str, ...] = ()
    counts_exits: bool = False  # the engine counted `engine_result.exits`
    engine_result: RunResult | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        """The status `numavm run` exits with for this run."""
        if self.outcome is Outcome.POWEROFF:
            return self.status
        return int(OUTCOME_EXIT.get(self.outcome, ExitCode.FAILURE))

    @property
    def out(self) -> str:
        """stdout as text (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")

    def console_tail(self, lines: int = 15) -> str:
        return "\n".join(self.console.replace("\r", "").rstrip("\n").split("\n")[-lines:])


@dataclass(frozen=True)
class Plan:
    """The machine's layout as a value: `to_dict()` is `numavm plan --json`'s document."""

    layout: Layout

    @property
    def topology(self) -> Topology:
        return self.layout.topology

    def to_dict(self) -> dict[str, Any]:
        from numavm.plan.render import plan_document
        return plan_document(self.layout)

    def to_json(self) -> str:
        import json
        return json.dumps(self.to_dict(), indent=2)

    def text(self) -> str:
        """`numavm plan`'s table."""
        from numavm.plan.render import plan_text
        return plan_text(self.layout)

    def svg(self) -> str:
        from numavm.plan.svg import plan_svg
        return plan_svg(self.layout)


@dataclass(frozen=True)
class Verdict:
    """What `Machine.check` gives back: the plan against what the guest saw."""

    report: CheckReport
    layout: Layout
    outcome: Outcome
    engine_why: str
    placement: str
    counts_exits: bool = False
    engine_result: RunResult | None = field(default=None, repr=False)

    @property
    def match(self) -> bool:
        return self.report.match

    @property
    def detail(self) -> str:
        """How the guest's run ended, in words (the engine's)."""
        return self.engine_result.detail if self.engine_result is not None else self.report.boot

    @property
    def mismatches(self) -> list[str]:
        return self.report.mismatches

    @property
    def notes(self) -> list[str]:
        return self.report.notes

    @property
    def stage(self) -> str:
        return self.report.stage

    @property
    def engine(self) -> str:
        return self.report.engine

    @property
    def exit_code(self) -> int:
        """`numavm check`'s status: 0 match, 1 mismatch, 73/130 when the guest never got compared."""
        if not self.match and self.outcome in (Outcome.TIMEOUT, Outcome.INTERRUPTED):
            return int(OUTCOME_EXIT[self.outcome])
        return int(ExitCode.OK if self.match else ExitCode.FAILURE)

    def to_dict(self) -> dict[str, Any]:
        """`numavm check --json`'s document."""
        return self.report.document()

    def text(self) -> str:
        """`numavm check`'s table: expected beside observed, then the verdict."""
        from numavm.check.verdict import render
        return render(self.report)


# ---------------------------------------------------------------- the machine


class Machine:
    """A guest machine: validated when made (ConfigError otherwise), then planned, run or checked.

    Keyword arguments (each as the command line's option, or a Python value):

    * `cpus`: vCPUs (`-c`); `memory`: bytes or a SIZE string like "2G" (`-m`);
    * `domains`: one per NUMA domain, each a `-n` string (``"id=0,size=1G,cpus=0-1,domain_policy=bind:0"``)
      or a mapping with the TOML file's [[domain]] keys (``{"id": 0, "size": "1G", "cpus": "0-1"}``);
    * `distances`: ``"I:J=D"`` strings (`--distance`), a full matrix, or ``{(i, j): d}``;
    * `hmat`, `hmat_cache`: `--hmat` / `--hmat-cache` strings;
    * `disks`: each a `--disk` string (``"disk.img,domain=1,readonly"``) or a mapping with the TOML
      file's [[disk]] keys (``{"path": "disk.img", "domain": 1}``);
    * `host_nodes`: check policies against these host nodes instead of this host's online ones.

    Without domains the machine is the classic one (no SRAT/SLIT); `Machine.example()` is the
    built-in example that the commands use without machine options.
    """

    def __init__(self, *, cpus: int | None = None, memory: int | str | None = None,
                 domains: Sequence[str | Mapping[str, Any]] = (),
                 distances: Sequence[str] | Sequence[Sequence[int]] | Mapping[tuple[int, int], int] = (),
                 hmat: Sequence[str] = (), hmat_cache: Sequence[str] = (),
                 disks: Sequence[str | Mapping[str, Any]] = (),
                 host_nodes: Iterable[int] | None = None) -> None:
        self._init(_kwargs_spec(cpus, memory, domains, distances, hmat, hmat_cache, disks), host_nodes)

    def _init(self, spec: MachineSpec, host_nodes: Iterable[int] | None) -> None:
        from numavm.plan.layout import plan_layout

        self.spec = spec
        self.host_nodes = tuple(host_nodes) if host_nodes is not None else None
        self.topology: Topology = spec.build(self.host_nodes)
        self.layout: Layout = plan_layout(self.topology)

    @classmethod
    def from_spec(cls, spec: MachineSpec, host_nodes: Iterable[int] | None = None) -> Machine:
        m = cls.__new__(cls)
        m._init(spec, host_nodes)
        return m

    @classmethod
    def from_options(cls, options: Sequence[str], log: Log | None = None) -> Machine:
        """From the command line's machine options, e.g. ``["-c", "2", "-n", "id=0,cpus=0", ...]``
        (`-f FILE`, `--like-host` and `--host-nodes` too); none at all is the built-in example.
        `log` gets what `--like-host` says about the host."""
        from numavm.cli import machine_options

        if isinstance(options, str):
            raise ConfigError("Machine.from_options: options must be a list of strings, as on the command "
                              f"line, got the string {options!r}")
        spec, host_nodes = machine_options(list(options), log or _quiet)
        return cls.from_spec(spec, host_nodes)

    @classmethod
    def from_toml(cls, source: str | os.PathLike[str], host_nodes: Iterable[int] | None = None) -> Machine:
        """From TOML (`-f`'s format): a path (a `Path`, or a string without a newline or "="),
        or the text itself."""
        from numavm.spec import config

        if isinstance(source, str) and ("\n" in source or "=" in source):
            return cls.from_spec(config.loads(source, "TOML text"), host_nodes)
        return cls.from_spec(config.load(source), host_nodes)

    @classmethod
    def example(cls) -> Machine:
        """The built-in example: 4 vCPUs, domains 0 and 1 with 1G and 2 vCPUs each, memory-only domain 2."""
        from numavm.spec import config
        return cls.from_spec(config.example())

    def __repr__(self) -> str:
        t = self.topology
        return f"<numavm.Machine {t.cpus} vCPUs, {t.memory >> 20} MiB, {len(t.domains) if t.numa else 0} domains>"

    # ------------------------------------------------------------ plan

    def plan(self) -> Plan:
        return Plan(self.layout)

    def engine(self, accel: str = "auto", pin: bool = True) -> Engine:
        """The engine that would run this machine (`--accel`), with its reason in `.why`;
        ConfigError (its message says why) where none can."""
        from numavm.vmm.engine import select
        return select(accel, self.layout, pin=pin)

    # ------------------------------------------------------------ run

    def run(self, command: Sequence[str] | str | None = None, *, add: Iterable[str | os.PathLike[str]] = (),
            accel: str = "auto", timeout: float | str | None = None, kernel: str | os.PathLike[str] | None = None,
            release: str | None = None, initrd: str | os.PathLike[str] | None = None, append: str = "",
            prefault: bool | Iterable[int] = False, hugepages: str | None = None, pin: bool = True,
            stdout: Output = None, stderr: Output = None, console: Sequence[BinaryIO | IO[bytes]] = (),
            console_log: str | os.PathLike[str] | None = None, input_fd: int | None = None,
            shell: bool = False, verbose: bool = False, log: Log | None = None,
            shares: Iterable[str] | str | None = (), host_root: bool = False) -> CommandResult:
        """Boot Linux on the machine, run `command` in it (a list is the argv; a string runs under
        ``sh -c``) and return its status, stdout and stderr, the guest's topology, the engine and
        the placement audit.

        `add`: host files put into the guest (with their shared libraries), ``HOST[:GUEST]``.
        `timeout`: seconds.  `stdout`/`stderr`: where the command's streams go as they arrive (a
        binary stream or a callable); None collects them into the result.  `console`: streams the
        guest console is copied to; `console_log`: a file that gets it.  `shell`/`input_fd`: an
        interactive shell on the command port, fed from `input_fd` (a terminal there is in raw
        mode for the run, so that its keys, Ctrl-C too, reach the guest).  `log`: numavm's own lines
        (engine choice, warnings).  `shares`: host directories the guest mounts, ``--share``'s
        ``HOST_DIR[:GUEST_DIR][,rw]``; `host_root`: the command runs in the host's ``/``
        (read-only, tmpfs where it must write) as this process's user, in its directory
        (numavm.guest.shares).  Raises ConfigError for bad input (nothing was allocated) and
        GuestFailed when the guest did not power off.
        """
        from numavm.guest.launch import Console, check_inputs, guest_assets, guest_initrd, guest_modules
        from numavm.guest.launch import kernel_cmdline
        from numavm.guest.launch import Sink as StreamSink
        from numavm.guest.initramfs import parse_guest_report
        from numavm.vmm.run import GuestRun

        log = log or _quiet
        argv = _argv(command)
        if isinstance(add, (str, os.PathLike)):
            add = [add]  # one file, not its name's characters
        warnings: list[str] = []
        added = [_str(a) for a in add]
        check_inputs(_str(kernel), _str(initrd), added)  # every file's kind and size, first
        exported, share_files = _shares(shares, host_root, initrd)  # the directories too
        held: list[str] = []  # the engine and why: said once the inputs are known to be good
        prep = self._prepare(accel, timeout, release, prefault, hugepages, pin, None, True, held.append, warnings)
        if exported and not getattr(prep.engine, "serves_shares", False):
            raise ConfigError(f"{'--host-root' if host_root else '--share'}: the {prep.engine.name} engine cannot "
                              "serve host directories yet; use --accel tcg")
        with _opened_disks(self.topology) as disks:  # before anything is made: a bad image is exit 2
            own_init = initrd is None
            assets = guest_assets(_str(kernel), log, release)
            modules = guest_modules(assets, self.layout, log) if own_init else []
            if exported:
                from numavm.guest.shares import merge_modules, share_modules
                modules = merge_modules(modules, share_modules(assets, log, host_root))
            initrd_bytes = guest_initrd(_str(initrd), assets.busybox, argv, added, shell=shell, modules=modules,
                                        extra=share_files)
            for line in held:
                log(line)
            cmdline = kernel_cmdline(prep.stage, prep.engine.emulates_guest_code, append, self.topology,
                                     shares=bool(exported)) + _tty_size(input_fd if shell and own_init else None)
            if prep.engine.emulates_guest_code:
                log("numavm: guest code is emulated here: added kernel parameters that avoid instructions "
                    "the emulator cannot run")
            out, err = bytearray(), bytearray()

            def sink(where: Output, buf: bytearray) -> Sink:
                if where is None:
                    return buf.extend
                if callable(where) and not hasattr(where, "write"):
                    return where  # type: ignore[return-value]
                return StreamSink(where)  # type: ignore[arg-type]

            streams = {"stdout": sink(stdout, out), "stderr": sink(stderr, err)} if own_init else {}
            with _console_log(console_log) as log_file:
                echo = list(console) + ([log_file] if log_file else [])
                con = Console(echo=echo)
                with _raw_terminal(input_fd if shell else None):
                    result = prep.engine.run(GuestRun(
                        self.layout, assets.vmlinux, initrd_bytes, cmdline, prep.timeout, con, verbose=verbose,
                        log=log, prefault=prep.prefault, hugepages=hugepages, input_fd=input_fd, own_init=own_init,
                        on_start=_read_results_soon("numavm.check.report"), disks=disks, shares=exported,
                        **streams))
            text = con.text
            report = parse_guest_report(text) if own_init else None
            if report is not None and not report.get("streams", True):
                w = ("the guest kernel has no serial ports ttyS1 and ttyS2 for the command's stdout and stderr: "
                     "its output went to the console (--verbose or --console-log show it)")
                warnings.append(w)
                log(f"numavm: warning: {w}")
            status = report.get("exit_status") if report else None
            from numavm.check.report import GuestReport
            res = CommandResult(
                status=int(status) & 0xFF if isinstance(status, int) else 0, stdout=bytes(out), stderr=bytes(err),
                topology=GuestReport.from_document(report) if report else None, engine=prep.engine.name,
                engine_why=prep.engine.why, placement=result.placement, outcome=result.outcome, detail=result.detail,
                seconds=result.seconds, console=text, warnings=tuple(warnings), counts_exits=prep.engine.counts_exits,
                engine_result=result)
            if result.outcome is not Outcome.POWEROFF:
                raise GuestFailed(res)
            return res

    # ------------------------------------------------------------ check

    def check(self, *, stage: str | None = None, accel: str = "auto", timeout: float | str | None = None,
              kernel: str | os.PathLike[str] | None = None, release: str | None = None,
              initrd: str | os.PathLike[str] | None = None, prefault: bool | Iterable[int] = False,
              hugepages: str | None = None, pin: bool = True, console: Sequence[BinaryIO | IO[bytes]] = (),
              console_log: str | os.PathLike[str] | None = None, verbose: bool = False,
              log: Log | None = None) -> Verdict:
        """Boot the machine and compare what the guest saw with the plan (`numavm check`).

        `stage`: "kernel" (the kernel's log) or "userspace" (plus sysfs); default kernel where the
        engine is a KVM that emulates guest code, else userspace.  The verdict's `match`,
        `mismatches` and `exit_code` say how it went; a guest that ended before it could be compared
        is a mismatch ("boot: ...") with `outcome` saying why."""
        from numavm.guest.launch import Console, KernelStageWatch, check_inputs, guest_assets, guest_initrd
        from numavm.guest.launch import guest_modules, kernel_cmdline
        from numavm.vmm.run import GuestRun

        if stage is not None and stage not in STAGES:
            raise ConfigError(f"--stage: must be one of {', '.join(STAGES)}, got {stage!r}")
        log = log or _quiet
        check_inputs(_str(kernel), _str(initrd), [])
        held: list[str] = []
        prep = self._prepare(accel, timeout, release, prefault, hugepages, pin, stage, False, held.append, [])
        with _opened_disks(self.topology) as disks:  # before anything is made: a bad image is exit 2
            engine, stage = prep.engine, prep.stage
            emulated_kvm = engine.emulates_guest_code
            assets = guest_assets(_str(kernel), log, release)
            own = stage == "userspace" and initrd is None
            initrd_bytes = (guest_initrd(_str(initrd), assets.busybox, None, [],
                                         modules=guest_modules(assets, self.layout, log) if own else [])
                            if stage == "userspace" else None)
            for line in held:
                log(line)
            cmdline = kernel_cmdline(stage, emulated_kvm, topology=self.topology)
            # SMP bring-up shows the llc-sibling warnings, unless the engine checked its vCPUs already
            until_smp = not (emulated_kvm or engine.cpus_checked_before_run)
            watch = KernelStageWatch(until_smp) if stage == "kernel" else None
            if emulated_kvm:
                log("numavm: guest code is emulated here: added kernel parameters that avoid instructions "
                    "the emulator cannot run")
            with _console_log(console_log) as log_file:
                con = Console(echo=list(console) + ([log_file] if log_file else []), watch=watch)
                result = engine.run(GuestRun(self.layout, assets.vmlinux, initrd_bytes, cmdline, prep.timeout, con,
                                             watch, verbose=verbose, log=log, prefault=prep.prefault,
                                             hugepages=hugepages,
                                             own_init=initrd_bytes is not None and initrd is None,
                                             on_start=_read_results_soon("numavm.check.verdict"), disks=disks))
        from numavm.check.verdict import evaluate
        wanted = Outcome.STOPPED if stage == "kernel" else Outcome.POWEROFF
        report = evaluate(self.layout, stage, engine.name, con.text, result.outcome is wanted,
                          f"{result.outcome.value} after {result.seconds:.1f} s ({result.detail})")
        return Verdict(report, self.layout, result.outcome, engine.why, result.placement, engine.counts_exits,
                       result)

    # ------------------------------------------------------------ shared

    def _prepare(self, accel: str, timeout: float | str | None, release: str | None,
                 prefault: bool | Iterable[int], hugepages: str | None, pin: bool, stage: str | None,
                 runs_command: bool, log: Log, warnings: list[str]) -> _Prepared:
        """Validate everything, pick the engine, say which and why; nothing allocated yet."""
        from numavm.guest.aptrelease import check_release
        from numavm.vmm.engine import select
        from numavm.host.memory import check_memory
        from numavm.spec.units import format_list, parse_seconds

        layout = self.layout
        if release is not None:
            check_release(release)
        seconds = _seconds(timeout, parse_seconds)
        wanted = None if prefault is True else frozenset() if prefault is False else frozenset(prefault)
        if wanted:
            with_memory = [d.id for d in layout.domains if d.segment_size]
            missing = sorted(wanted - set(with_memory))
            if missing:
                raise ConfigError(f"--prefault: no domain {missing[0]} with memory "
                                  f"(domains with memory: {format_list(with_memory)})")
        if hugepages is not None and hugepages not in ("thp", "hugetlbfs"):
            raise ConfigError(f"--hugepages: must be one of thp, hugetlbfs, got {hugepages!r}")
        engine = select(accel, layout, pin=pin)
        emulated_kvm = engine.emulates_guest_code
        if stage is None:
            stage = "kernel" if emulated_kvm else "userspace"
        if stage == "userspace" and emulated_kvm:
            raise ConfigError("--stage userspace: this host's KVM emulates guest code and cannot reach the "
                              "guest's userspace; use --accel tcg (or auto)")
        for warning in check_memory(layout, wanted, hugepages):  # None: prefault all
            warnings.append(warning)
            log(f"numavm: warning: {warning}")
        if runs_command and emulated_kvm:
            w = ("this host's KVM emulates guest code: the guest kernel boots for minutes and does not reach "
                 "userspace, so no command will run (use --accel tcg or auto)")
            warnings.append(w)
            log(f"numavm: warning: {w}")
        log(f"numavm: {engine.why}")
        return _Prepared(engine, stage, seconds, wanted)


@dataclass(frozen=True)
class _Prepared:
    engine: Engine
    stage: str
    timeout: float | None
    prefault: frozenset[int] | None  # None: every domain


def _str(p: str | os.PathLike[str] | None) -> str | None:
    return None if p is None else os.fspath(p)


def _seconds(timeout: float | str | None, parse: Callable[[str, str], float]) -> float | None:
    if timeout is None or isinstance(timeout, str):
        return None if timeout is None else parse(timeout, "--timeout")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 \
            or timeout == float("inf"):
        raise ConfigError(f"--timeout: expected a number of seconds more than 0, got {timeout!r}")
    return float(timeout)


def _argv(command: Sequence[str] | str | None) -> list[str] | None:
    if command is None:
        return None
    if isinstance(command, str):
        return ["sh", "-c", command]
    argv = [os.fspath(a) for a in command]
    if not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"command: expected a list of strings, got {list(command)!r}")
    return argv or None


def _tty_size(fd: int | None) -> str:
    """`` numavm.tty=ROWSxCOLS`` for a shell fed from the terminal `fd` (its size now), else ""."""
    if fd is None:
        return ""
    from numavm.guest.initramfs import TTY_SIZE_PARAM
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return ""
    return f" {TTY_SIZE_PARAM}{size.lines}x{size.columns}" if size.lines and size.columns else ""


def _shares(shares: Iterable[str] | str | None, host_root: bool, initrd: object) -> tuple[tuple[Any, ...], list[Any]]:
    """`run`'s --share and --host-root, checked (ConfigError): the shares the engine exports and
    the initramfs members that mount them (numavm.guest.shares); nothing for neither."""
    if not shares and not host_root:
        return (), []
    from numavm.spec.shares import HOST_ROOT_OPT, SHARE_OPT, parse_shares
    from numavm.guest.shares import share_entries

    if initrd is not None:
        raise ConfigError(f"{HOST_ROOT_OPT if host_root else SHARE_OPT}: needs numavm's own initramfs, "
                          "not --initrd (its /init mounts the shares)")
    given = [shares] if isinstance(shares, (str, os.PathLike)) else list(shares or ())
    exported = parse_shares([_str(s) if isinstance(s, os.PathLike) else s for s in given], host_root)
    return exported, share_entries(exported)


@contextlib.contextmanager
def _opened_disks(topology: Topology) -> Iterator[tuple[Any, ...]]:
    """The machine's disk images opened, checked and locked (numavm.host.disk) for one run, and
    closed after it however it ends; () and no import without disks."""
    if not topology.disks:
        yield ()
        return
    from numavm.host.disk import close_disks, open_disks

    disks = open_disks(topology.disks)
    try:
        yield tuple(disks)
    finally:
        close_disks(disks)


@contextlib.contextmanager
def _raw_terminal(fd: int | None) -> Iterator[None]:
    """A terminal on `fd` in raw mode for an interactive guest shell: keys (Ctrl-C too) go
    to the guest, whose own tty echoes, edits and ends lines; restored however the run ends."""
    if fd is None or not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _console_log:
    """`console_log`, opened (created or truncated) for the run once its input is checked, or None."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = path
        self.f: BinaryIO | None = None

    def __enter__(self) -> BinaryIO | None:
        if self.path is None:
            return None
        try:
            self.f = open(self.path, "wb")
        except OSError as e:
            raise ConfigError(f"--console-log: cannot write {os.fspath(self.path)}: {e.strerror}") from None
        return self.f

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()


def _kwargs_spec(cpus: int | None, memory: int | str | None, domains: Sequence[str | Mapping[str, Any]],
                 distances: Any, hmat: Sequence[str], hmat_cache: Sequence[str],
                 disks: Sequence[str | Mapping[str, Any]] = ()) -> MachineSpec:
    """Machine(...)'s keywords as a spec, each parsed as its command-line option or TOML key is."""
    from numavm.spec.config import distance_matrix, domain_from_table
    from numavm.spec.devices import disk_from_table, parse_disk
    from numavm.spec.topology import parse_distance, parse_hmat, parse_hmat_cache, parse_numa
    from numavm.spec.units import parse_size

    spec = MachineSpec()
    if cpus is not None:
        if isinstance(cpus, bool) or not isinstance(cpus, int):
            raise ConfigError(f"-c/--cpus: expected a whole number 1..1024, got {cpus!r}")
        spec.cpus = cpus
    if memory is not None:
        spec.memory = parse_size(memory, "-m/--memory")
    for k, d in enumerate(_seq(domains, "domains")):
        if isinstance(d, str):
            spec.domains.append(parse_numa(d))
        elif isinstance(d, Mapping):
            spec.domains.append(domain_from_table(dict(d), k, "domains"))
        else:
            raise ConfigError(f"domains[{k}]: expected a -n string or a mapping of TOML domain keys, got {d!r}")
    if isinstance(distances, Mapping):
        for key, d in distances.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ConfigError(f"distances: keys are (i, j) pairs, got {key!r}")
            spec.distances.append(parse_distance(f"{key[0]}:{key[1]}={d}"))
    elif distances and all(not isinstance(r, str) for r in _seq(distances, "distances")):
        spec.distances = distance_matrix([list(r) for r in distances], len(spec.domains), "distances")
    else:
        spec.distances = [parse_distance(t) for t in _seq(distances, "distances")]
    spec.hmat = [parse_hmat(t) for t in _seq(hmat, "hmat")]
    spec.caches = [parse_hmat_cache(t) for t in _seq(hmat_cache, "hmat_cache")]
    for k, d in enumerate(_seq(disks, "disks")):
        if isinstance(d, str):
            spec.disks.append(parse_disk(d))
        elif isinstance(d, Mapping):
            spec.disks.append(disk_from_table(dict(d), k, "disks"))
        else:
            raise ConfigError(f"disks[{k}]: expected a --disk string or a mapping of TOML disk keys, got {d!r}")
    return spec


def _seq(v: Any, name: str) -> Sequence[Any]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ConfigError(f"{name}: expected a list, got {v!r}")
    return v
