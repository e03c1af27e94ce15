"""numavm: a NUMA-first virtual machine monitor on Linux KVM.

Layers, each one job (see README.md):
topology -> layout -> acpi -> memory -> kvm -> boot -> devices -> machine -> cli

As a library: `numavm.Machine` (numavm.api), imported on first use so that
`import numavm` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("Machine", "Plan", "CommandResult", "GuestTopology", "GuestNode", "Verdict", "GuestFailed")
_ERRORS = ("ConfigError", "NumavmError")
__all__ = ["__version__", *_API, *_ERRORS]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api
        return getattr(api, name)
    if name in _ERRORS:
        from . import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'numavm' has no attribute {name!r}")
