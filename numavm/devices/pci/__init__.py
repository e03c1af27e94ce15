"""PCI functions as pure models: configuration space, memory BARs, MSI-X.

`PciFunction` is what the engine's config-space accessors (ECAM, CF8/CFC) and
BAR MMIO exits call; `numavm.devices.virtio.pci` builds the virtio transport
on it.
"""

from numavm.devices.pci.function import Bar, BarKind, Change, PciFunction
from numavm.devices.pci.msix import MsixEntry, MsixTable

__all__ = ["Bar", "BarKind", "Change", "PciFunction", "MsixEntry", "MsixTable"]
