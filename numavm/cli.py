"""The `numavm` command line.

Every subcommand takes the same machine options (bhyve's letters where bhyve
has them).  Bad input ends with one line on stderr naming the option and
what is allowed, and exit status 2, before anything is allocated.
"""

from __future__ import annotations

from numavm.command import BROKEN_PIPE, become_command, discard_stdout, finished, is_command

if is_command():  # the console script imports this module first: from here a signal ends numavm with 130
    become_command()

import argparse  # noqa: E402
import errno
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, NoReturn, Sequence

from numavm import __version__
from numavm.spec import config
from numavm.guest.aptrelease import check_release
from numavm.errors import ConfigError, NumavmError
from numavm.spec.policy import MAX_HOST_NODES, POLICY_SYNTAX
from numavm.vmm.run import STAGES, ExitCode
from numavm.spec.topology import MAX_DOMAINS, MachineSpec, Topology, parse_distance, parse_hmat, parse_hmat_cache, parse_numa
from numavm.spec.devices import parse_disk
from numavm.spec.units import parse_int, parse_list, parse_size

if TYPE_CHECKING:
    from numavm.api import Machine
    from numavm.vmm.run import RunResult

EXIT_OK = ExitCode.OK
EXIT_FAILURE = ExitCode.FAILURE
EXIT_USAGE = ExitCode.USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage first; one line is what we promise.
        raise ConfigError(message)


def _machine_options(p: argparse.ArgumentParser, host_nodes: bool = True) -> None:
    g = p.add_argument_group("machine options (shared by every command)")
    g.add_argument("-c", "--cpus", metavar="N", help="vCPUs (default 1, or as many as the domains name; at most 1024)")
    g.add_argument("-m", "--memory", metavar="SIZE",
                   help="guest memory: bytes or K/M/G/T (default 512M without domains; "
                        "optional when every domain has a size)")
    g.add_argument("-n", "--numa", metavar="id=I[,size=SIZE][,cpus=LIST][,domain_policy=POLICY]",
                   action="append", default=[],
                   help="one guest NUMA domain, repeatable; LIST like 0-1+4; POLICY one of: " + POLICY_SYNTAX)
    g.add_argument("--distance", metavar="I:J=D", action="append", default=[],
                   help="distance between domains I and J, repeatable; symmetric unless both "
                        "directions are given; 11..254, 255 = unreachable (default 20)")
    g.add_argument("--hmat", metavar="I:T,latency=NS,bandwidth=MBPS", action="append", default=[],
                   help="what initiator domain I (with vCPUs) sees of target domain T's memory, for the "
                        "ACPI HMAT, repeatable: latency in ns and bandwidth in MB/s, or read-latency=, "
                        "write-latency=, read-bandwidth=, write-bandwidth= separately")
    g.add_argument("--hmat-cache", metavar="T,size=SIZE[,level=L,line=B,assoc=A,policy=P]", action="append",
                   default=[],
                   help="a memory-side cache in front of domain T's memory, repeatable: level 1..3 (default "
                        "1), line size in bytes (64), assoc none|direct|complex (none), policy "
                        "none|writeback|writethrough (none)")
    g.add_argument("--disk", metavar="FILE[,domain=N][,readonly][,initiator]", action="append", default=[],
                   help="a raw disk image as a virtio-blk device on domain N's PCI host bridge (default 0), "
                        "repeatable; readonly: the guest cannot write it; initiator: the device is also an "
                        "ACPI generic initiator of domain N (which may then have no memory and no vCPUs)")
    g.add_argument("-f", "--config", metavar="FILE",
                   help="the machine as TOML (see examples/example.toml); -c/-m override the file, "
                        "and -n/--distance/--hmat/--hmat-cache/--disk replace its domains/distances/HMAT "
                        "entries/disks")
    g.add_argument("--like-host", action="store_true",
                   help="one domain per host NUMA node: memory (-m) and vCPUs (-c, default one per host CPU) "
                        "shared as the host's nodes share theirs, the host's distances, each domain bound to "
                        "its node (so its vCPUs run on that node's CPUs); -n id=I,size=S sets a domain's size")
    if host_nodes:
        g.add_argument("--host-nodes", metavar="LIST",
                       help="check policies against these host nodes instead of this host's online nodes")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="numavm", description="A NUMA-first virtual machine monitor on Linux KVM.")
    p.add_argument("--version", action="version", version=f"numavm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sp = sub.add_parser("plan", help="show where domains, vCPUs and tables go (no VM is created)",
                        description="Show the planned machine: domains, guest-physical ranges, vCPUs "
                                    "and APIC ids, host policies, distances and the e820 map. "
                                    "Without machine options: the built-in example.")
    _machine_options(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON document (schema 1)")
    sp.add_argument("--svg", metavar="FILE", help="also draw the topology as an SVG picture")

    sa = sub.add_parser("acpi", help="write the ACPI tables the guest will see",
                        description="Write each ACPI table the guest will see as DIR/SIG.dat "
                                    "(RSDP, XSDT, FACP, DSDT, APIC, and SRAT/SLIT for NUMA machines, HMAT with --hmat or "
                                    "--hmat-cache); "
                                    "`iasl -d DIR/SRAT.dat` disassembles one.")
    _machine_options(sa)
    sa.add_argument("--out", metavar="DIR", required=True, help="directory to write the tables into")

    se = sub.add_parser("export", help="the same machine in a peer's syntax",
                        description="Print the same machine for QEMU, libvirt, Cloud Hypervisor, bhyve "
                                    "or as numavm TOML. What the peer cannot express is said on stderr.")
    _machine_options(se)
    se.add_argument("--to", required=True, metavar="FORMAT",
                    help="qemu, libvirt, cloud-hypervisor, bhyve or toml")
    si = sub.add_parser("import", help="read a machine written for QEMU, libvirt, Cloud Hypervisor or bhyve",
                        description="Read a machine written for a peer and print it as numavm TOML (or the "
                                    "plan as JSON): QEMU's -smp, -m, -numa and memory backends; libvirt's "
                                    "<vcpu>, <memory>, <cpu><numa> and <numatune>; Cloud Hypervisor's --cpus, "
                                    "--memory, --memory-zone and --numa; bhyve's -c, -m, -n and -o domains.*. "
                                    "Options that are not part of the NUMA machine are named on stderr; what "
                                    "numavm cannot express is an error (exit 2).")
    si.add_argument("--from", dest="peer", required=True, metavar="FORMAT",
                    help="qemu, libvirt, cloud-hypervisor or bhyve")
    si.add_argument("file", nargs="?", default="-", metavar="FILE|-", help="the peer's text (default: stdin)")
    si.add_argument("--json", action="store_true", help="print the plan as JSON (what `plan --json` prints)")
    si.add_argument("--host-nodes", metavar="LIST",
                    help="check policies against these host nodes instead of this host's online nodes")

    sr = sub.add_parser("run", help="boot Linux on the machine and run a command in it",
                        description="Boot Linux on the planned machine, run CMD in it and exit with "
                                    "its status (0 on clean power-off). CMD's stdout is numavm's stdout "
                                    "byte for byte, its stderr numavm's stderr (each carried by a serial "
                                    "port of its own), its stdin /dev/null; the guest console (kernel log) "
                                    "is shown only with --verbose (on stderr) or written to "
                                    "--console-log. Without CMD on a terminal: an interactive shell in the "
                                    "guest (leave it with exit or Ctrl-D). With --initrd the console goes "
                                    "to stdout. "
                                    "Exit codes: 70 guest panic, 71 triple fault, 72 emulation failure, "
                                    "73 timeout, 74 guest reset, 130 interrupted.")
    _machine_options(sr, host_nodes=False)
    _guest_options(sr)
    sr.add_argument("--append", metavar="ARGS", default="", help="more kernel command-line parameters")
    sr.add_argument("--add", metavar="HOST_PATH[:GUEST_PATH]", action="append", default=[],
                    help="copy a host file (and its shared libraries) into the guest, repeatable")
    sr.add_argument("--share", metavar="HOST_DIR[:GUEST_DIR][,rw]", action="append", default=[],
                    help="a host directory the guest mounts (virtio-9p) at GUEST_DIR (default: the same "
                         "path), read-only unless rw; repeatable")
    sr.add_argument("--host-root", action="store_true",
                    help="the command runs in the host's / (read-only; tmpfs on /tmp, /var/tmp and /run, HOME "
                         "writable over the host's, writes kept in the guest) as you, in your current "
                         "directory, after numavm's /init has reported")
    sr.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                    help="the command to run in the guest")

    sf = sub.add_parser("fetch", help="put Debian's kernel and busybox-static into numavm's cache",
                        description="Download (apt-get download; nothing is installed on the host) the "
                                    "kernel image package linux-image-amd64 depends on and busybox-static, "
                                    "and extract the kernel and busybox into numavm's cache "
                                    "($XDG_CACHE_HOME/numavm). A no-op when the cache is current. "
                                    "--release fetches another release's kernel and busybox from the "
                                    "host's mirrors (apt reads it through a private configuration in the "
                                    "cache).")
    sf.add_argument("--cache", metavar="DIR", help="another cache directory")
    sf.add_argument("--release", metavar="CODENAME",
                    help="another release of the host's distribution, e.g. trixie (Debian 13) on a "
                         "Debian 12 host or bookworm on Debian 13 (default: the host's own)")

    sc = sub.add_parser("check", help="boot the built-in guest and compare what it saw with the plan",
                        description="Boot the built-in guest and compare the NUMA topology it saw "
                                    "with the plan. Stage kernel reads the guest kernel's log (SRAT "
                                    "ranges, APIC->node (Linux 6.12+ no longer logs it), zonelist order); "
                                    "stage userspace adds the guest's sysfs (CPUs and their APIC ids, "
                                    "MemTotal and distances per node; HMAT access classes, memory-side caches "
                                    "and memory tiers). Exits 0 on match, 1 on mismatch, "
                                    "73 when the guest timed out before it could be compared, 130 when "
                                    "interrupted. Without machine options: the built-in example.")
    _machine_options(sc, host_nodes=False)
    _guest_options(sc)
    sc.add_argument("--stage", choices=STAGES,
                    help="default: kernel where the engine is a KVM that emulates guest code, else userspace")
    sc.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def _guest_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest and engine")
    g.add_argument("--accel", default="auto", metavar="kvm|tcg|auto",
                   help="engine: KVM, QEMU's TCG, or auto (KVM with hardware virtualization, else TCG)")
    k = g.add_mutually_exclusive_group()
    k.add_argument("--kernel", metavar="FILE", help="a bzImage or vmlinux (default: Debian's, fetched)")
    k.add_argument("--release", metavar="CODENAME",
                   help="the kernel and busybox of this release of the host's distribution "
                        "(e.g. trixie or bookworm; fetched like `numavm fetch --release`)")
    g.add_argument("--initrd", metavar="FILE", help="an initramfs (default: numavm's own)")
    g.add_argument("--timeout", metavar="S", default=None,
                   help="stop the guest after S seconds (a number more than 0, e.g. 30 or 0.5)")
    g.add_argument("--verbose", "-v", action="store_true",
                   help="print engine details (e.g. QEMU's arguments) and the guest console on stderr")
    g.add_argument("--console-log", metavar="FILE",
                   help="write the guest console (kernel log, numavm's report) to FILE")
    g.add_argument("--no-pin", action="store_true",
                   help="KVM engine: do not pin vCPU threads to the CPUs of their domain's policy nodes")
    g.add_argument("--prefault", nargs="?", const="all", metavar="DOMAINS",
                   help="populate guest memory under each domain's policy before the guest starts: "
                        "every domain, or the domains in DOMAINS (a LIST like 0-1+3)")
    g.add_argument("--hugepages", choices=("thp", "hugetlbfs"),
                   help="back guest memory with transparent huge pages or hugetlbfs pages (the KVM "
                        "engine's memory gets transparent huge pages anyway where the host allows them)")
    g.add_argument("--stats", action="store_true", help="print VM exit statistics after the run")


def machine_spec(args: argparse.Namespace, note: Callable[[str], None] | None = None) -> MachineSpec:
    """The machine options as a spec; no options at all means the example."""
    if args.like_host:
        return _like_host_spec(args, note or _stderr)
    given = (args.cpus is not None or args.memory is not None or args.numa or args.distance or args.hmat
             or args.hmat_cache)
    if args.config:
        spec = config.load(args.config)
    elif not given:
        spec = config.example()
    else:
        spec = MachineSpec()
    if args.cpus is not None:
        try:
            spec.cpus = parse_int(args.cpus, "-c/--cpus")
        except ConfigError:
            raise ConfigError(f"-c/--cpus: expected a whole number 1..1024, got {args.cpus!r}") from None
    if args.memory is not None:
        spec.memory = parse_size(args.memory, "-m/--memory")
    if args.numa:
        spec.domains = [parse_numa(t) for t in args.numa]
        spec.distances = []  # a file's distances and HMAT entries belong to the file's domains
        spec.hmat, spec.caches = [], []
    if args.distance:
        spec.distances = [parse_distance(t) for t in args.distance]
    if args.hmat:
        spec.hmat = [parse_hmat(t) for t in args.hmat]
    if args.hmat_cache:
        spec.caches = [parse_hmat_cache(t) for t in args.hmat_cache]
    if args.disk:
        spec.disks = [parse_disk(t) for t in args.disk]
    return spec


def _like_host_spec(args: argparse.Namespace, note: Callable[[str], None]) -> MachineSpec:
    from numavm.spec.likehost import OPT, like_host

    other = next((o for o, v in (("-f/--config", args.config), ("--distance", args.distance),
                                  ("--hmat", args.hmat), ("--hmat-cache", args.hmat_cache)) if v), None)
    if other:
        raise ConfigError(f"{OPT}: the host gives the domains and distances; it cannot be combined with {other}")
    cpus = parse_int(args.cpus, "-c/--cpus") if args.cpus is not None else None
    memory = parse_size(args.memory, "-m/--memory") if args.memory is not None else None
    shape = like_host(cpus, memory, given=[parse_numa(t) for t in args.numa])
    for line in shape.notes:
        note(f"numavm: {OPT}: {line}")
    shape.spec.disks = [parse_disk(t) for t in args.disk]
    return shape.spec


def build_topology(args: argparse.Namespace) -> Topology:
    held: list[str] = []  # --like-host's notes: said once the machine is known to be good
    topo = machine_spec(args, held.append).build(_host_nodes(args))
    for line in held:
        _stderr(line)
    return topo


def _host_nodes(args: argparse.Namespace) -> tuple[int, ...] | None:
    host = getattr(args, "host_nodes", None)
    return parse_list(host.replace(",", "+"), "--host-nodes", MAX_HOST_NODES) if host is not None else None


def machine_options(options: list[str], note: Callable[[str], None]) -> tuple[MachineSpec, tuple[int, ...] | None]:
    """The machine options alone (`numavm.Machine.from_options`): the spec and --host-nodes;
    `note` gets what --like-host says about the host."""
    p = _Parser(prog="numavm", add_help=False)
    _machine_options(p)
    args = p.parse_args(options)
    return machine_spec(args, note), _host_nodes(args)


def _machine(args: argparse.Namespace) -> Machine:
    from numavm.api import Machine
    held: list[str] = []  # --like-host's notes: an error is the one line printed
    machine = Machine.from_spec(machine_spec(args, held.append), _host_nodes(args))
    for line in held:
        _stderr(line)
    return machine


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _machine(args).plan()
    if args.svg:
        _write(Path(args.svg), plan.svg(), "--svg")
    if args.json:
        print(plan.to_json())
    else:
        sys.stdout.write(plan.text())
    return EXIT_OK


def cmd_acpi(args: argparse.Namespace) -> int:
    from numavm.plan.acpi import build_tables
    from numavm.plan.layout import plan_layout

    tables = build_tables(plan_layout(build_topology(args)))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out: cannot create {out}: {e.strerror}") from None
    for sig, blob in tables.blobs().items():
        _write(out / f"{sig}.dat", blob, "--out")
        print(f"{out / (sig + '.dat')}  {len(blob)} bytes")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from numavm.peers.export import FORMATS, export

    if args.to not in FORMATS:
        raise ConfigError(f"--to: must be one of {', '.join(FORMATS)}, got {args.to!r}")
    result = export(build_topology(args), args.to)
    for w in result.warnings:
        print(f"numavm: {args.to}: {w}", file=sys.stderr)
    sys.stdout.write(result.text if result.text.endswith("\n") else result.text + "\n")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from numavm.peers.export import export
    from numavm.peers import FORMATS, MAX_INPUT, import_topology
    from numavm.host.files import read_input, read_stream

    if args.peer not in FORMATS:
        raise ConfigError(f"--from: must be one of {', '.join(FORMATS)}, got {args.peer!r}")
    name = "stdin" if args.file == "-" else args.file
    if args.file == "-":
        data = read_stream(sys.stdin.buffer, "import", name, MAX_INPUT)
    else:
        data = read_input(args.file, "import", MAX_INPUT, pipes=True)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"import: {name} is not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None
    host = args.host_nodes
    nodes = parse_list(host.replace(",", "+"), "--host-nodes", MAX_HOST_NODES) if host is not None else None
    topo, notes = import_topology(args.peer, text, nodes)
    for note in notes:
        print(f"numavm: import: {_one_line(Exception(note))}", file=sys.stderr)
    if args.json:
        from numavm.plan.layout import plan_layout
        from numavm.plan.render import plan_document
        print(json.dumps(plan_document(plan_layout(topo)), indent=2))
    else:
        sys.stdout.write(export(topo, "toml").text)
    return EXIT_OK


def _write(path: Path, data: str | bytes, option: str) -> None:
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):  # the host's trouble, not the input's
            raise NumavmError(f"{option}: cannot write {path}: {e.strerror}") from None
        raise ConfigError(f"{option}: cannot write {path}: {e.strerror}") from None


def _one_line(e: Exception) -> str:
    """Errors quote user input, which may hold newlines; the promise is one line."""
    return " ".join(str(e).splitlines())


def _guest_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What `run` and `check` pass to `Machine.run`/`Machine.check` from their shared options."""
    return dict(accel=args.accel, timeout=args.timeout, kernel=args.kernel, release=args.release,
                initrd=args.initrd, prefault=_prefault(args), hugepages=args.hugepages,
                pin=not args.no_pin, console_log=args.console_log, verbose=args.verbose, log=_stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from numavm.api import GuestFailed

    command = list(args.guest_command)
    if command and command[0] == "--":
        command = command[1:]
    machine = _machine(args)
    own_init = args.initrd is None
    # no command on a terminal: a shell in the guest, on the command port
    shell = own_init and not command and sys.stdin.isatty()
    from numavm.guest.launch import Sink

    out, err = _binary(sys.stdout), _binary(sys.stderr)
    echo = [err] if args.verbose else [] if own_init else [out]
    sink = Sink(out)  # a write error ends the writing, not the run; reported after it
    try:
        result = machine.run(command, add=args.add, append=args.append, stdout=sink, stderr=Sink(err),
                             console=echo, shell=shell, shares=args.share, host_root=args.host_root,
                             input_fd=sys.stdin.fileno() if shell else None, **_guest_kwargs(args))
    except GuestFailed as e:
        failed = e.result
        _report_run(args, failed.counts_exits, failed.engine, failed.engine_result)
        if own_init and not args.verbose and failed.console:
            _stderr("numavm: the guest console's last lines:\n" + failed.console_tail(15))
        print(f"numavm: {e}", file=sys.stderr)
        return e.exit_code
    _report_run(args, result.counts_exits, result.engine, result.engine_result)
    if sink.error is not None:
        discard_stdout()
        raise NumavmError(f"run: cannot write stdout: {sink.error.strerror} (the guest command's output "
                          f"was lost; it exited {result.status})")
    return result.status


def cmd_check(args: argparse.Namespace) -> int:
    verdict = _machine(args).check(stage=args.stage, console=[_binary(sys.stderr)] if args.verbose else [],
                                   **_guest_kwargs(args))
    _report_run(args, verdict.counts_exits, verdict.engine, verdict.engine_result)
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        sys.stdout.write(verdict.text())
    if not verdict.match and verdict.exit_code != EXIT_FAILURE:
        # the guest never got as far as the comparison: say why, not "mismatch"
        print(f"numavm: guest {verdict.outcome.value}: {verdict.detail}", file=sys.stderr)
    return verdict.exit_code


def cmd_fetch(args: argparse.Namespace) -> int:
    from numavm.guest.assets import fetch

    from numavm.guest.assets import cache_root

    if args.release is not None:
        check_release(args.release)
    where = Path(args.cache) if args.cache else cache_root()
    try:
        a = fetch(where, log=print, release=args.release)
    except OSError as e:
        raise NumavmError(f"fetch: cannot write the cache {where}: {e.strerror}; free space there or "
                          f"name a writable directory with --cache or XDG_CACHE_HOME") from None
    print(f"kernel {a.kernel_version}: {a.kernel}")
    print(f"busybox: {a.busybox}")
    return EXIT_OK


def _report_run(args: argparse.Namespace, counts_exits: bool, engine: str, result: RunResult | None) -> None:
    """What every command that runs a VM prints after it: the placement audit, and --stats."""
    if result is None:
        return
    if result.placement:
        _stderr("numavm: guest memory placement:\n" + result.placement.rstrip())
    if args.stats:
        exits = (", ".join(f"{k} {v}" for k, v in result.exits.most_common())
                 or ("none" if counts_exits else f"none counted ({engine.upper()} engine)"))
        _stderr(f"numavm: exits: {exits}")
        for what, counter in (("reads", result.unhandled_reads), ("writes", result.unhandled_writes)):
            if counter:
                ports = ", ".join(f"{p:#x}x{n}" for p, n in counter.most_common(8))
                _stderr(f"numavm: unhandled port {what}: {ports}")


def _prefault(args: argparse.Namespace) -> bool | frozenset[int]:
    """--prefault as `Machine.run` takes it: True for every domain."""
    wanted = _prefault_domains(args)
    return True if wanted is None else wanted


def _prefault_domains(args: argparse.Namespace) -> frozenset[int] | None:
    """--prefault: None means every domain, the empty set none."""
    if args.prefault is None:
        return frozenset()
    if args.prefault == "all":
        return None
    return frozenset(parse_list(args.prefault, "--prefault", MAX_DOMAINS))


def _binary(stream: Any) -> BinaryIO:
    """The binary stream under a text one; a stream without one (a test's StringIO) is passed
    as it is: nothing is written to it before the run's input is checked."""
    return getattr(stream, "buffer", stream)  # type: ignore[no-any-return]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


COMMANDS = {"plan": cmd_plan, "acpi": cmd_acpi, "export": cmd_export, "import": cmd_import, "run": cmd_run,
            "check": cmd_check, "fetch": cmd_fetch}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(argv)
    except KeyboardInterrupt:  # a signal while an error was being printed
        status = ExitCode.INTERRUPTED
    finished(status)  # as the numavm command: the process ends here, with this status
    return status


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        command = args.command
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, not at the interpreter's exit
        return status
    except ConfigError as e:
        print(f"numavm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except NumavmError as e:
        print(f"numavm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # stdout's reader went away (`| head`): end quietly, as a killed pipe stage
        discard_stdout()
        return BROKEN_PIPE
    except OSError as e:
        if e.filename is not None:
            raise
        # what is left unnamed is stdout: a full disk (`> /dev/full`), a quota, an I/O error
        discard_stdout()
        print(f"numavm: error: {command or 'numavm'}: cannot write stdout: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
