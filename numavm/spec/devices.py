"""What the user asked for beyond CPUs and memory: the guest's devices and the domain each sits on.

`--disk FILE[,domain=N][,readonly][,initiator]` (repeatable; TOML ``[[disk]]``;
``Machine(disks=...)``) gives the guest a virtio-blk disk on domain N's PCI host bridge
(numavm.plan.pci), so the guest's `/sys/bus/pci/devices/*/numa_node` says N.  With
`initiator` the device is also an ACPI generic initiator of domain N (SRAT type 5): its node
initiates memory accesses without CPUs, and such a domain may have neither (``-n
id=N,size=0``).  Nothing here opens the file: `plan` and `export` never need it, and a run
opens and checks it once, before anything is allocated (numavm.host.disk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from numavm.errors import ConfigError
from numavm.spec.units import parse_int

DISK_OPT = "--disk"
DISK_KEYS = "domain=N, readonly, initiator"
# Devices sit on their domain's bridge at slots 0..31 of its one bus; bridges take buses 1..255.
MAX_DISKS = 64
MAX_DEVICES_PER_DOMAIN = 32
MAX_PATH = 4096  # PATH_MAX: a longer path cannot be opened anyway


@dataclass(frozen=True)
class Disk:
    """One `--disk`, parsed; its domain is checked against the machine in `check_disks`."""

    path: str
    domain: int = 0
    readonly: bool = False
    initiator: bool = False
    origin: str = field(default=DISK_OPT, compare=False)  # names this disk in errors, not part of the machine

    def option(self) -> str:
        """The `--disk` argument that gives this disk back (commas in the path doubled)."""
        flags = "".join(f",{f}" for f, on in (("readonly", self.readonly), ("initiator", self.initiator)) if on)
        return f"{self.path.replace(',', ',,')},domain={self.domain}{flags}"


def parse_disk(text: str, opt: str = DISK_OPT) -> Disk:
    """``FILE[,domain=N][,readonly][,initiator]``; a comma in FILE is written twice, as QEMU does."""
    if len(text) > MAX_PATH + 64:
        raise ConfigError(f"{opt}: longer than {MAX_PATH + 64} characters")
    parts = text.replace(",,", "\0").split(",")
    path = parts[0].replace("\0", ",")
    _check_path(path, opt)
    origin = f"{opt} {path}"
    domain, flags = 0, set()
    seen: set[str] = set()
    for part in parts[1:]:
        part = part.replace("\0", ",").strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if key in seen:
            raise ConfigError(f"{origin}: {key} given twice")
        seen.add(key)
        if key == "domain" and eq:
            domain = parse_int(value, f"{origin} domain")
            if domain < 0:
                raise ConfigError(f"{origin} domain: must be 0 or more, got {domain}")
        elif key in ("readonly", "initiator") and (not eq or value.strip().lower() in ("on", "true", "1")):
            flags.add(key)
        elif key in ("readonly", "initiator") and value.strip().lower() in ("off", "false", "0"):
            pass
        else:
            raise ConfigError(f"{origin}: unknown key {part!r} (keys: {DISK_KEYS})")
    return Disk(path, domain, "readonly" in flags, "initiator" in flags, origin)


def disk_from_table(d: object, k: int, name: str) -> Disk:
    """One TOML ``[[disk]]`` table, or the API's dict: path, domain, readonly, initiator."""
    where = f"{name}: disk[{k}]"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table with path (and domain, readonly, initiator)")
    unknown = sorted(set(d) - {"path", "domain", "readonly", "initiator"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: path, domain, readonly, initiator)")
    path = d.get("path")
    if not isinstance(path, str):
        raise ConfigError(f"{where}.path: required, a string naming the image file")
    _check_path(path, f"{where}.path")
    domain = d.get("domain", 0)
    if not isinstance(domain, int) or isinstance(domain, bool) or domain < 0:
        raise ConfigError(f"{where}.domain: a domain id (0 or more), got {domain!r}")
    flags = {}
    for key in ("readonly", "initiator"):
        v = d.get(key, False)
        if not isinstance(v, bool):
            raise ConfigError(f"{where}.{key}: true or false, got {v!r}")
        flags[key] = v
    return Disk(path, domain, flags["readonly"], flags["initiator"], f"{name}: disk {path}")


def _check_path(path: str, field: str) -> None:
    if not path.strip():
        raise ConfigError(f"{field}: expected FILE[,{DISK_KEYS.replace(', ', '][,')}], the image first")
    if len(path) > MAX_PATH or "\0" in path:
        raise ConfigError(f"{field}: not a usable path (at most {MAX_PATH} characters, no NUL)")


def check_disks(disks: list[Disk] | tuple[Disk, ...], domains: int, numa: bool) -> tuple[Disk, ...]:
    """The machine's rules for disks: each names an existing domain, at most MAX_DISKS in all and
    MAX_DEVICES_PER_DOMAIN per domain; an initiator needs NUMA domains (an SRAT to be in)."""
    if len(disks) > MAX_DISKS:
        raise ConfigError(f"{DISK_OPT}: at most {MAX_DISKS} disks, got {len(disks)}")
    per: dict[int, int] = {}
    for disk in disks:
        if disk.domain >= domains:
            what = f"domains 0..{domains - 1}" if numa else "domain 0 (the machine has no -n domains)"
            raise ConfigError(f"{disk.origin} domain: no domain {disk.domain}; the machine has {what}")
        if disk.initiator and not numa:
            raise ConfigError(f"{disk.origin} initiator: a generic initiator needs NUMA domains (-n/--numa)")
        per[disk.domain] = per.get(disk.domain, 0) + 1
        if per[disk.domain] > MAX_DEVICES_PER_DOMAIN:
            raise ConfigError(f"{disk.origin}: at most {MAX_DEVICES_PER_DOMAIN} devices per domain "
                              f"(one PCI bus each)")
    return tuple(disks)


def initiator_domains(disks: tuple[Disk, ...]) -> frozenset[int]:
    """The domains that hold a generic initiator."""
    return frozenset(d.domain for d in disks if d.initiator)
