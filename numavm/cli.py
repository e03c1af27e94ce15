"""The `numavm` command line.

Every subcommand takes the same machine options (bhyve's letters where bhyve
has them).  Bad input ends with one line on stderr naming the option and
what is allowed, and exit status 2, before anything is allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from . import __version__, config
from .errors import ConfigError, NumavmError
from .policy import POLICY_SYNTAX
from .topology import MachineSpec, Topology, parse_distance, parse_numa
from .units import parse_list, parse_size

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


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
    g.add_argument("-f", "--config", metavar="FILE",
                   help="the machine as TOML (see examples/example.toml); -c/-m override the file, "
                        "and -n/--distance replace its domains/distances")
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
                                    "(RSDP, XSDT, FACP, DSDT, APIC, and SRAT/SLIT for NUMA machines); "
                                    "`iasl -d DIR/SRAT.dat` disassembles one.")
    _machine_options(sa)
    sa.add_argument("--out", metavar="DIR", required=True, help="directory to write the tables into")

    se = sub.add_parser("export", help="the same machine in a peer's syntax",
                        description="Print the same machine for QEMU, libvirt, Cloud Hypervisor, bhyve "
                                    "or as numavm TOML. What the peer cannot express is said on stderr.")
    _machine_options(se)
    se.add_argument("--to", required=True, metavar="FORMAT",
                    help="qemu, libvirt, cloud-hypervisor, bhyve or toml")
    return p


def machine_spec(args: argparse.Namespace) -> MachineSpec:
    """The machine options as a spec; no options at all means the example."""
    given = args.cpus is not None or args.memory is not None or args.numa or args.distance
    if args.config:
        spec = config.load(args.config)
    elif not given:
        spec = config.example()
    else:
        spec = MachineSpec()
    if args.cpus is not None:
        try:
            spec.cpus = int(args.cpus, 10)
        except ValueError:
            raise ConfigError(f"-c/--cpus: expected a whole number 1..1024, got {args.cpus!r}") from None
    if args.memory is not None:
        spec.memory = parse_size(args.memory, "-m/--memory")
    if args.numa:
        spec.domains = [parse_numa(t) for t in args.numa]
        spec.distances = []  # a file's distances belong to the file's domains
    if args.distance:
        spec.distances = [parse_distance(t) for t in args.distance]
    return spec


def build_topology(args: argparse.Namespace) -> Topology:
    host = getattr(args, "host_nodes", None)
    nodes = parse_list(host.replace(",", "+"), "--host-nodes") if host is not None else None
    return machine_spec(args).build(nodes)


def cmd_plan(args: argparse.Namespace) -> int:
    from .layout import plan_layout
    from .plan import plan_document, plan_text

    layout = plan_layout(build_topology(args))
    if args.svg:
        from .svg import plan_svg
        _write(Path(args.svg), plan_svg(layout), "--svg")
    if args.json:
        print(json.dumps(plan_document(layout), indent=2))
    else:
        sys.stdout.write(plan_text(layout))
    return EXIT_OK


def cmd_acpi(args: argparse.Namespace) -> int:
    from .acpi import build_tables
    from .layout import plan_layout

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
    from .export import FORMATS, export

    if args.to not in FORMATS:
        raise ConfigError(f"--to: must be one of {', '.join(FORMATS)}, got {args.to!r}")
    result = export(build_topology(args), args.to)
    for w in result.warnings:
        print(f"numavm: {args.to}: {w}", file=sys.stderr)
    sys.stdout.write(result.text if result.text.endswith("\n") else result.text + "\n")
    return EXIT_OK


def _write(path: Path, data: str | bytes, option: str) -> None:
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    except OSError as e:
        raise ConfigError(f"{option}: cannot write {path}: {e.strerror}") from None


def _one_line(e: Exception) -> str:
    """Errors quote user input, which may hold newlines; the promise is one line."""
    return " ".join(str(e).splitlines())


COMMANDS = {"plan": cmd_plan, "acpi": cmd_acpi, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"numavm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except NumavmError as e:
        print(f"numavm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
