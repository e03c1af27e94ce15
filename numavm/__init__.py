"""numavm: a NUMA-first virtual machine monitor on Linux KVM.

Packages follow the data path (README.md's code map): spec (what the user asked) -> plan
(layout, CPUID, ACPI tables, boot plan) -> host (memory segments, policies, system calls) ->
devices -> vmm (the run, engine choice, the KVM and TCG engines) -> guest (the built-in Linux
guest) -> check (what the guest saw against the plan); peers and cli at the edges.
"""

__version__ = "0.1.0"
