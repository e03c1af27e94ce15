"""Device models: pure state machines behind the port I/O bus and on PCI.

No KVM, threads or file opening in here: a device gets port, configuration
and MMIO accesses as method calls (``read(offset, size)`` /
``write(offset, size, value)``, ``config_read``, ``mmio_write``, ...) and
reaches the outside world only through callbacks (``irq(line, level)``,
``output(data)``, ``on_event(event)``, ``signal_msi(vector)``,
``on_change(change)``), so each one is unit-tested alone and the machine
wires them to KVM.  DMA devices see guest RAM through the narrow `GuestRam`
protocol (`numavm.devices.memory`); `numavm.devices.pci` holds the PCI
function and MSI-X, `numavm.devices.virtio` the virtio transport, the
virtqueue and one module per device type (blk).  A disk gets an already-open
file descriptor from the engine.
"""

from numavm.devices.bus import PORT_LIMIT, Device, IoBus, all_ones
from numavm.devices.irq import IrqLines
from numavm.devices.power import (
    I8042,
    IO_DELAY_PORT,
    POST_PORT,
    S5_SLEEP_CONTROL_VALUE,
    S5_SLP_TYP,
    SLP_EN,
    SLP_TYP_MASK,
    SLP_TYP_SHIFT,
    WAK_STS,
    AcpiPower,
    PowerDevices,
    PowerEvent,
    Register,
    SinkPort,
    attach_power_devices,
)
from numavm.devices.serial import UART_PORTS, Serial16550

__all__ = [
    "PORT_LIMIT", "Device", "IoBus", "all_ones", "IrqLines",
    "Serial16550", "UART_PORTS",
    "PowerEvent", "S5_SLP_TYP", "SLP_TYP_SHIFT", "SLP_TYP_MASK", "SLP_EN", "WAK_STS",
    "S5_SLEEP_CONTROL_VALUE", "POST_PORT", "IO_DELAY_PORT",
    "Register", "AcpiPower", "I8042", "SinkPort", "PowerDevices", "attach_power_devices",
]
