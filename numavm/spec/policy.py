"""Host memory policies for a guest domain's backing memory (``domain_policy=``).

Accepts bhyve's domainset(9) names (round-robin, first-touch, prefer) and
Linux's mempolicy names; both map onto the Linux modes that `memory` applies
with mbind(2).  This module only parses and validates.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from numavm.errors import ConfigError
from numavm.spec.units import format_list, parse_cpulist, parse_list


class Mode(enum.IntEnum):
    """Linux's MPOL_* numbers (include/uapi/linux/mempolicy.h)."""

    DEFAULT = 0
    PREFERRED = 1
    BIND = 2
    INTERLEAVE = 3
    LOCAL = 4
    PREFERRED_MANY = 5
    WEIGHTED_INTERLEAVE = 6

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


# Spelling -> (mode, what NODES may be): "none" (no nodes allowed), "one"
# (exactly one node), "some" (one or more), "optional" (default: all online).
_NAMES: dict[str, tuple[Mode, str]] = {
    "default": (Mode.DEFAULT, "none"),
    "local": (Mode.LOCAL, "none"),
    "first-touch": (Mode.LOCAL, "none"),
    "ft": (Mode.LOCAL, "none"),
    "bind": (Mode.BIND, "some"),
    "preferred": (Mode.PREFERRED, "one"),
    "prefer": (Mode.PREFERRED, "one"),
    "preferred-many": (Mode.PREFERRED_MANY, "some"),
    "interleave": (Mode.INTERLEAVE, "optional"),
    "il": (Mode.INTERLEAVE, "optional"),
    "round-robin": (Mode.INTERLEAVE, "optional"),
    "rr": (Mode.INTERLEAVE, "optional"),
    "weighted-interleave": (Mode.WEIGHTED_INTERLEAVE, "some"),
}

POLICY_SYNTAX = (
    "default, local, first-touch|ft, bind:NODES, preferred:N, prefer:N, "
    "preferred-many:NODES, interleave|il|round-robin|rr[:NODES], weighted-interleave:NODES")


@dataclass(frozen=True)
class Policy:
    """A Linux memory policy: a mode and the host nodes it names.

    An interleave written without nodes means every online host node; it is
    kept as ``nodes=()`` until `resolve` fills in the host's nodes.
    """

    mode: Mode = Mode.DEFAULT
    nodes: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.mode.label}:{format_list(self.nodes)}" if self.nodes else self.mode.label

    def resolve(self, online: tuple[int, ...]) -> "Policy":
        if self.mode is Mode.INTERLEAVE and not self.nodes:
            return Policy(self.mode, tuple(online))
        return self

    def check_nodes(self, online: tuple[int, ...], field: str) -> None:
        missing = [n for n in self.nodes if n not in online]
        if missing:
            which = "node " + str(missing[0]) if len(missing) == 1 else "nodes " + format_list(missing)
            raise ConfigError(
                f"{field}: host {which} not online (online: {format_list(online) or 'none'})")


# Linux's MAX_NUMNODES at its largest (CONFIG_NODES_SHIFT=10): no host node id reaches it
MAX_HOST_NODES = 1 << 10


def parse_policy(text: str, field: str) -> Policy:
    name, sep, nodes_text = text.strip().partition(":")
    key = name.strip().lower()
    if key not in _NAMES:
        raise ConfigError(f"{field}: unknown policy {name!r}; allowed: {POLICY_SYNTAX}")
    mode, arity = _NAMES[key]
    nodes = parse_list(nodes_text, f"{field} nodes", MAX_HOST_NODES) if sep else ()
    if arity == "none" and sep:
        raise ConfigError(f"{field}: {key} takes no nodes, got {text!r}")
    if arity in ("one", "some") and not nodes:
        what = "one host node" if arity == "one" else "host nodes"
        raise ConfigError(f"{field}: {key} needs {what}, e.g. {key}:0")
    if arity == "one" and len(nodes) != 1:
        raise ConfigError(f"{field}: {key} takes exactly one host node, got {format_list(nodes)}")
    return Policy(mode, nodes)


NODE_ONLINE = Path("/sys/devices/system/node/online")


def host_online_nodes(path: Path = NODE_ONLINE) -> tuple[int, ...]:
    """The host's online NUMA nodes; a host without the node sysfs has node 0 only."""
    try:
        text = path.read_text().strip()
    except OSError:
        return (0,)
    return parse_cpulist(text, str(path)) or (0,)
