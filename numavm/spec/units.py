"""Parsing and printing of the small value syntaxes shared by every option.

SIZE: bytes, or a number with a K/M/G/T suffix (powers of 1024, either case),
which may be spelled KB or KiB (MB, MiB, ...); a plain ``B`` means bytes.
LIST: numbers and ranges joined by ``+`` (``0-1+4``); bhyve and QEMU write
ranges the same way, and ``,`` is left free to separate option keys.
Numbers are ASCII digits only: no other scripts' digits, no ``_`` separators.
SECONDS: a decimal number of seconds, more than 0 (``30``, ``0.5``).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from numavm.errors import ConfigError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIX = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
# Bounded digit counts: no real value needs more, and int() refuses >4300 digits.
# ASCII only: \d and int() would take any script's digits, and int() takes "1_0".
_SIZE_RE = re.compile(r"^\s*([0-9]{1,20})\s*(?:([KMGTkmgt])(?:i?[Bb])?|[Bb])?\s*$", re.ASCII)
_SPACE = " \t\n\r\f\v"  # str.strip() would also take Unicode spaces
_LIST_ITEM_RE = re.compile(r"^([0-9]{1,9})(?:-([0-9]{1,9}))?$")
_INT_RE = re.compile(r"^-?[0-9]{1,20}$")
_SECONDS_RE = re.compile(r"^(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})$")

# A list may not expand beyond this many members: no option of numavm needs
# more (1024 vCPUs), and it keeps a typo like 0-99999999 from eating memory.
MAX_LIST_MEMBERS = 1 << 16


def parse_size(text: str | int, field: str) -> int:
    """Parse SIZE into bytes; `field` names the option in the error."""
    if isinstance(text, bool):
        raise ConfigError(f"{field}: expected a size such as 512M or 4G, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{field}: a size cannot be negative, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(
            f"{field}: expected a size such as 512M or 4G (bytes or K/M/G/T), got {text!r}")
    return int(m.group(1)) * _SUFFIX[(m.group(2) or "").upper()]


def parse_int(text: str, field: str) -> int:
    """A whole number in ASCII digits (a leading ``-`` allowed, for the caller to refuse)."""
    t = text.strip(_SPACE)
    if not _INT_RE.match(t):
        raise ConfigError(f"{field}: expected a whole number, got {_clip(t)}")
    return int(t, 10)


def parse_seconds(text: str, field: str) -> float:
    """SECONDS: a finite decimal number more than 0 (no nan, inf, exponents or signs)."""
    t = text.strip(_SPACE)
    if not _SECONDS_RE.match(t) or float(t) <= 0:
        raise ConfigError(f"{field}: expected a number of seconds more than 0, such as 30 or 0.5, got {_clip(t)}")
    return float(t)


def format_size(n: int) -> str:
    """The shortest exact SIZE spelling of `n` bytes (``1G``, ``1536M``, ``4096``)."""
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def parse_list(text: str | int | list[int], field: str, ceiling: int | None = None) -> tuple[int, ...]:
    """Parse LIST (``0-3+6``) into sorted, distinct numbers.

    A TOML array of integers is accepted as it is.  Overlapping members are an
    error: a vCPU or node named twice is almost always a typo.  With `ceiling`, every
    member is below it, checked before a range is expanded (`check_ceiling`).
    """
    if isinstance(text, bool):
        raise ConfigError(f"{field}: expected a list such as 0-3+6, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{field}: expected non-negative integers, got {text}")
        check_ceiling(text, field, ceiling)
        items: list[int] = [text]
    elif isinstance(text, list):
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in text):
            raise ConfigError(f"{field}: expected non-negative integers, got {_clip(text)}")
        for x in text:
            check_ceiling(x, field, ceiling)
        items = list(text)
    else:
        items = []
        s = str(text).strip(_SPACE)
        if not s:
            raise ConfigError(f"{field}: expected a list such as 0-3+6, got an empty value")
        for part in s.split("+"):
            m = _LIST_ITEM_RE.match(part.strip(_SPACE))
            if not m:
                raise ConfigError(
                    f"{field}: expected numbers and ranges joined by '+' (e.g. 0-3+6), got {_clip(text)}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ConfigError(f"{field}: range {part.strip()} runs backwards")
            check_ceiling(hi, field, ceiling)
            if hi - lo + 1 + len(items) > MAX_LIST_MEMBERS:
                raise ConfigError(f"{field}: list {_clip(text)} is too long (at most {MAX_LIST_MEMBERS} members)")
            items.extend(range(lo, hi + 1))
    if len(set(items)) != len(items):
        dup = sorted(x for x, n in Counter(items).items() if n > 1)
        raise ConfigError(f"{field}: {format_list(dup)} named more than once")
    return tuple(sorted(items))


def check_ceiling(n: int, field: str, ceiling: int | None) -> None:
    """Refuse a list member at or past `ceiling` (the number of vCPUs, domains or host nodes
    there can be), before a range up to it is expanded."""
    if ceiling is not None and n >= ceiling:
        raise ConfigError(f"{field}: {n} is past the largest allowed, {ceiling - 1}")


class Members:
    """Numbers gathered from several lists (a key given more than once), each checked as it
    comes: named twice is an error at once, so the work stays linear in the input and the
    members below the lists' ceiling."""

    def __init__(self, field: str, what: str = "number") -> None:
        self.field, self.what = field, what
        self.seen: set[int] = set()

    def add(self, more: Iterable[int]) -> None:
        for x in more:
            if x in self.seen:
                raise ConfigError(f"{self.field}: {self.what} {x} named more than once")
            self.seen.add(x)

    def sorted(self) -> tuple[int, ...]:
        return tuple(sorted(self.seen))


def _clip(text: object, most: int = 80) -> str:
    """An input quoted in an error, cut to `most` characters: the line stays readable."""
    r = repr(text)
    return r if len(r) <= most else r[:most] + f"... ({len(r)} characters)"


def parse_cpulist(text: str, field: str) -> tuple[int, ...]:
    """Linux's list format, as sysfs and /proc write it (``0-3,8``; empty is none)."""
    text = text.strip()
    return parse_list(text.replace(",", "+"), field) if text else ()


def format_cpulist(items: Iterable[int]) -> str:
    """Linux's list spelling (``0-1,4``), which sysfs, QEMU, libvirt, CH and bhyve read."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges(sorted(set(items))))


def format_list(items: tuple[int, ...] | list[int]) -> str:
    """Compact LIST spelling: (0, 1, 2, 5) -> ``0-2+5``; empty -> ``""``."""
    return "+".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges(items))


def ranges(items: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of sorted `items` as inclusive (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for x in sorted(items):
        if out and out[-1][1] + 1 == x:
            out[-1] = (out[-1][0], x)
        else:
            out.append((x, x))
    return out
