"""numavm: a NUMA-first virtual machine monitor on Linux KVM.

Layers, each one job (see README.md):
topology -> layout -> acpi -> memory -> kvm -> boot -> devices -> machine -> cli
"""

__version__ = "0.1.0"
