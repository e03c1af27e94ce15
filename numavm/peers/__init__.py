"""Machines written for a peer, read back (``numavm import --from FORMAT``).

One module per peer format holds its reader (a new format is a new module,
listed in `READERS`); each turns the peer's text into a `MachineSpec` with the
peer's own spelling in every origin, and lists, one line each, what it read
but what is not part of numavm's machine (devices other than its disks, ...) or belongs to
another numavm option.  What numavm cannot express is a `ConfigError` naming
it.  `MachineSpec.build` then applies numavm's rules as for `-n`.
"""

from __future__ import annotations

import importlib
import shlex
from dataclasses import dataclass, field

from numavm.errors import ConfigError
from numavm.spec.topology import MachineSpec, Topology
from numavm.spec.units import parse_size

# format -> module in this package
READERS = {"qemu": "qemu", "libvirt": "libvirt", "cloud-hypervisor": "cloud_hypervisor", "bhyve": "bhyve"}
FORMATS = tuple(READERS)
MAX_INPUT = 1 << 20  # a 256-domain libvirt XML with every distance is ~1/3 MiB


@dataclass
class Imported:
    spec: MachineSpec
    notes: list[str] = field(default_factory=list)  # one line each, for stderr


def read(fmt: str, text: str) -> Imported:
    """The machine `text` describes in `fmt`'s syntax, not yet checked by numavm's rules."""
    if fmt not in READERS:
        raise ConfigError(f"--from: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if len(text) > MAX_INPUT:
        raise ConfigError(f"import --from {fmt}: more than {MAX_INPUT >> 20} MiB of input; a machine is far smaller")
    module = importlib.import_module(f".{READERS[fmt]}", __name__)
    try:
        return module.read(text)  # type: ignore[no-any-return]
    except ConfigError as e:
        raise ConfigError(f"import --from {fmt}: {e}") from None


def import_topology(fmt: str, text: str, host_nodes: tuple[int, ...] | None = None) -> tuple[Topology, list[str]]:
    """`read`, then numavm's rules; every error names the format."""
    imp = read(fmt, text)
    try:
        return imp.spec.build(host_nodes), imp.notes
    except ConfigError as e:
        raise ConfigError(f"import --from {fmt}: {e}") from None


# ---------------------------------------------------------------- shared by the readers


def command_words(text: str, fmt: str) -> list[str]:
    """A shell command line as words: backslash-newlines joined, # comments dropped,
    the program (and anything before the first option) left out."""
    try:
        words = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as e:  # "No closing quotation"
        raise ConfigError(f"not a shell command line: {e}") from None
    for k, w in enumerate(words):
        if w.startswith("-"):
            return words[k:]
    return []


def size(text: str, field: str, plain: int = 1) -> int:
    """SIZE as numavm reads it, except that a bare number counts `plain` bytes
    (QEMU's -m and bhyve's -m count MiB)."""
    t = text.strip()
    if t.isascii() and t.isdigit():
        return int(t) * plain
    return parse_size(t, field)


def flag(value: str, field: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"{field}: expected on or off, got {value!r}")


def comma_list(text: str, field: str) -> tuple[int, ...]:
    """Linux cpulist spelling (``0-3,6``, libvirt's ``^2`` exclusions too) as sorted numbers."""
    from numavm.spec.units import parse_list

    take: list[int] = []
    drop: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ConfigError(f"{field}: empty item in {text!r}")
        (drop if part.startswith("^") else take).extend(parse_list(part.lstrip("^"), field))
    if len(set(take)) != len(take):
        raise ConfigError(f"{field}: {text!r} names a number more than once")
    return tuple(sorted(set(take) - set(drop)))

