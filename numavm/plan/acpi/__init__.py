"""What the guest is told: ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, SRAT, SLIT, HMAT, MCFG).

`build_tables(layout)` returns every table as a value with its guest-physical
address; `AcpiTables.placements()` gives the (address, bytes) pairs to copy
into guest memory.  See `tables` for the power-off/reset contract
(`S5_SLEEP_CONTROL_VALUE` etc.) the devices layer must honour.
"""

from numavm.plan.layout import S5_SLEEP_CONTROL_VALUE, SLP_EN, SLP_TYP_MASK, SLP_TYP_SHIFT, WAK_STS
from numavm.plan.acpi import aml
from numavm.plan.acpi.tables import (
    FADT_LENGTH,
    IOAPIC_ID,
    NMI_LINT,
    S5_SLP_TYP,
    TIMER_GSI,
    TIMER_IRQ,
    AcpiTables,
    BootArch,
    Dsdt,
    Fadt,
    FadtFlags,
    Gas,
    GenericInitiatorAffinity,
    InterruptSourceOverride,
    IoApic,
    LocalApic,
    LocalApicNmi,
    LocalX2Apic,
    LocalX2ApicNmi,
    Madt,
    Mcfg,
    McfgEntry,
    MemoryAffinity,
    ProcessorAffinity,
    Rsdp,
    Slit,
    Srat,
    X2ApicAffinity,
    Xsdt,
    build_dsdt,
    build_madt,
    build_mcfg,
    build_srat,
    build_tables,
    checksum,
)

__all__ = [
    "aml", "FADT_LENGTH", "IOAPIC_ID", "NMI_LINT", "S5_SLEEP_CONTROL_VALUE", "S5_SLP_TYP", "SLP_EN",
    "SLP_TYP_MASK", "SLP_TYP_SHIFT", "WAK_STS", "TIMER_GSI", "TIMER_IRQ",
    "AcpiTables", "BootArch", "Dsdt", "Fadt", "FadtFlags", "Gas", "GenericInitiatorAffinity", "InterruptSourceOverride", "IoApic",
    "LocalApic", "LocalApicNmi", "LocalX2Apic", "LocalX2ApicNmi", "Madt", "Mcfg", "McfgEntry", "MemoryAffinity",
    "ProcessorAffinity", "Rsdp", "Slit", "Srat", "X2ApicAffinity", "Xsdt", "build_dsdt", "build_madt", "build_mcfg",
    "build_srat", "build_tables", "checksum",
]
