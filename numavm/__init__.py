"""numavm: a NUMA-first virtual machine monitor on Linux KVM.

Packages follow the data path (README.md's code map): spec (what the user asked) -> plan
(layout, CPUID, ACPI tables, boot plan) -> host (memory segments, policies, system calls) ->
devices -> vmm (the run, engine choice, the KVM and TCG engines) -> guest (the built-in Linux
guest) -> check (what the guest saw against the plan); peers and cli at the edges.

As a library: `numavm.Machine` (numavm.api), imported on first use so that
`import numavm` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("Machine", "Plan", "CommandResult", "GuestReport", "GuestNode", "Verdict", "GuestFailed")
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
