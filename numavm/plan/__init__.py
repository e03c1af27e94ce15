"""What the guest is given: guest-physical layout, CPUID, ACPI tables, the Linux boot plan, and
the plan rendered (text, JSON, SVG)."""
