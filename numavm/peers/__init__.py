"""Machines written for a peer, read back (``numavm import --from FORMAT``).

One module per peer format holds its reader (a new format is a new module,
listed in `READERS`); each turns the peer's text into a `MachineSpec` with the
peer's own spelling in every origin, and lists, one line each, what it read
but what is not part of numavm's machine (devices, disks, ...) or belongs to
another numavm option.  What numavm cannot express is a `ConfigError` naming
it.  `MachineSpec.build` then applies numavm's rules as for `-n`.
"""

from __future__ import annotations

import importlib
import re
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
    words = shell_words(text.replace("\\\n", " "))
    for k, w in enumerate(words):
        if w.startswith("-"):
            return words[k:]
    return []


# a shell word's pieces: blanks, a comment (at a word's start), '...', "...", \\c, plain characters
_SHELL_PIECE = re.compile(r"""(?P<blank>[ \t\r\n]+)|(?P<single>'[^']*')|(?P<double>"(?:[^"\\]|\\.)*")"""
                          r"""|(?P<escape>\\.)|(?P<plain>[^ \t\r\n'"\\]+)""", re.DOTALL)
_DOUBLE_ESCAPE = re.compile(r'\\([\\"$`])')


def shell_words(text: str) -> list[str]:
    """POSIX shell words (quotes, backslashes, # comments), in time linear in `text`:
    shlex.split grows each word a character at a time, quadratic in a word's length (a
    650 KB word took 9 s)."""
    words: list[str] = []
    word: list[str] | None = None
    pos = 0
    while pos < len(text):
        if word is None and text[pos] == "#":  # a comment, to the end of the line
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end
            continue
        m = _SHELL_PIECE.match(text, pos)
        if m is None:  # an opening quote without its closing one, or a backslash at the end
            what = "a backslash at the end" if text[pos] == "\\" else "no closing quotation"
            raise ConfigError(f"not a shell command line: {what}")
        pos = m.end()
        kind, piece = m.lastgroup, m.group()
        if kind == "blank":
            if word is not None:
                words.append("".join(word))
                word = None
            continue
        if word is None:
            word = []
        if kind == "single":
            word.append(piece[1:-1])
        elif kind == "double":
            word.append(_DOUBLE_ESCAPE.sub(r"\1", piece[1:-1]))
        elif kind == "escape":
            word.append(piece[1])
        else:
            word.append(piece)
    if word is not None:
        words.append("".join(word))
    return words


def size(text: str, field: str, plain: int = 1) -> int:
    """SIZE as numavm reads it, except that a bare number counts `plain` bytes
    (QEMU's -m and bhyve's -m count MiB)."""
    t = text.strip()
    if t.isascii() and t.isdigit():
        return whole(t, field) * plain
    return parse_size(t, field)


MAX_DIGITS = 20  # 2**64 has 20; Python's int() refuses more than 4300 (ValueError)


def whole(digits: str, field: str) -> int:
    """ASCII `digits` as a number, at most MAX_DIGITS of them."""
    if len(digits) > MAX_DIGITS:
        raise ConfigError(f"{field}: a number of {len(digits)} digits; at most {MAX_DIGITS}")
    return int(digits)


def flag(value: str, field: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"{field}: expected on or off, got {value!r}")


def comma_list(text: str, field: str, ceiling: int) -> tuple[int, ...]:
    """Linux cpulist spelling (``0-3,6``, libvirt's ``^2`` exclusions too) as sorted numbers,
    each below `ceiling` (checked before a range is expanded)."""
    from numavm.spec.units import Members, parse_list

    take = Members(field)
    drop: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ConfigError(f"{field}: empty item in {text[:80]!r}")
        items = parse_list(part.lstrip("^"), field, ceiling)
        if part.startswith("^"):
            drop.update(items)
        else:
            take.add(items)
    return tuple(sorted(take.seen - drop))

