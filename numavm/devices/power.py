"""Power-off and reset: the ACPI registers, an i8042 stub and I/O-delay sinks.

Each device reports through ``on_event(event)`` with a `PowerEvent` (a
`str`: ``"poweroff"`` or ``"reset"``); the machine decides what to do (stop
the vCPUs, rebuild the guest).  Nothing here stops anything by itself.

Hardware-reduced ACPI (the FADT's registers, ports from `numavm.plan.layout`):

* Sleep control register (`SLEEP_CONTROL_PORT`, 8 bits): Linux writes
  ``SLP_TYP << 2 | SLP_EN`` with SLP_TYP from the DSDT's ``\\_S5`` package.
  SLP_EN with SLP_TYP == `S5_SLP_TYP` is ``poweroff``.  Other sleep types
  are not implemented: the machine "wakes" at once.  Any write with SLP_EN
  sets WAK_STS, so the wait loop ACPICA runs after the write ends (for S5 the
  machine is expected to have stopped the vCPUs by then).  Reads return 0
  (SLP_EN is write-only).
* Sleep status register (`SLEEP_STATUS_PORT`, 8 bits): WAK_STS is bit 7,
  cleared by writing 1 to it (ACPICA does so before sleeping).
* Reset register (`RESET_PORT`, 8 bits): writing `RESET_VALUE` is ``reset``;
  other values are ignored (counted in `AcpiPower.ignored_resets`).

i8042 keyboard controller (ports 0x60 data, 0x64 status/command), for
``reboot=k`` and its fallback after ACPI reset: Linux waits for status bit 1
(input buffer full) to clear, then writes command 0xFE, which pulses the
CPU reset line.  The stub is *clearly absent* to the i8042 driver: the FADT
leaves IAPC_BOOT_ARCH's 8042 flag clear and the DSDT declares no PS/2
device, so Linux does not probe it ("PNP: No PS/2 controller found"); should
a probe be forced (``i8042.nopnp``), no command ever puts a byte in the
output buffer, so it fails at once ("Can't read CTR") instead of finding a
half-working keyboard.  Status reads 0x14 (system flag, keyboard not
inhibited) plus bit 3 when the last write went to the command port; input
and output buffers are always empty.  Commands 0xF0-0xFF pulse output-port
lines low (those whose bit is clear in the command's low nibble): bit 0 is
the reset line, so 0xFE (and any even one) is ``reset``.  Command 0xD1 takes
the next data byte as the output port: bit 0 clear is ``reset`` (the A20
values 0xDD/0xDF are harmless).  Everything else is accepted and ignored
(counted in `I8042.ignored_commands`).

Ports 0x80 (POST code) and 0xED: Linux's ``io_delay`` writes one of them
(``io_delay=0x80`` is the default, ``0xed`` the alternative) to waste a
bus cycle after slow port I/O.  Each is a `SinkPort` that counts its writes
and keeps the last value (a POST-code display), so they never show up in
the bus's unhandled counters; reads return all-ones like the empty bus.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from numavm.plan.layout import (RESET_PORT, RESET_VALUE, S5_SLEEP_CONTROL_VALUE, S5_SLP_TYP, SLEEP_CONTROL_PORT,
                      SLEEP_STATUS_PORT, SLP_EN, SLP_TYP_MASK, SLP_TYP_SHIFT, WAK_STS)
from numavm.devices.bus import IoBus, all_ones

__all__ = [
    "PowerEvent", "S5_SLP_TYP", "SLP_TYP_SHIFT", "SLP_TYP_MASK", "SLP_EN", "WAK_STS",
    "S5_SLEEP_CONTROL_VALUE", "I8042_DATA_PORT", "I8042_COMMAND_PORT", "POST_PORT", "IO_DELAY_PORT",
    "Register", "AcpiPower", "I8042", "SinkPort", "PowerDevices", "attach_power_devices",
]

# The sleep registers' bits (S5_SLP_TYP, SLP_EN, WAK_STS, ...) are numavm.plan.layout's,
# from which numavm.plan.acpi builds the DSDT's \_S5 package.

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # reads: status
POST_PORT = 0x80
IO_DELAY_PORT = 0xED


class PowerEvent(enum.StrEnum):
    POWEROFF = "poweroff"
    RESET = "reset"


class Register:
    """One 8-bit port as a `Device`, from a getter and a setter.

    Wider accesses act on the low byte; a read returns it zero-extended.
    """

    __slots__ = ("_get", "_set")

    def __init__(self, get: Callable[[], int], put: Callable[[int], None]) -> None:
        self._get = get
        self._set = put

    def read(self, offset: int, size: int) -> int:
        return self._get()

    def write(self, offset: int, size: int, value: int) -> None:
        self._set(value & 0xFF)


class AcpiPower:
    """The hardware-reduced ACPI sleep control, sleep status and reset registers."""

    def __init__(self, on_event: Callable[[str], None], *, reset_value: int = RESET_VALUE) -> None:
        self._on_event = on_event
        self.reset_value = reset_value
        self.wak_sts = False
        self.sleep_requests: list[int] = []  # SLP_TYP of every write with SLP_EN
        self.ignored_resets = 0
        self.sleep_control = Register(_zero, self._write_sleep_control)
        self.sleep_status = Register(self._read_sleep_status, self._write_sleep_status)
        self.reset_register = Register(_zero, self._write_reset)

    def attach(
        self,
        bus: IoBus,
        *,
        sleep_control_port: int = SLEEP_CONTROL_PORT,
        sleep_status_port: int = SLEEP_STATUS_PORT,
        reset_port: int = RESET_PORT,
    ) -> None:
        bus.register(sleep_control_port, 1, self.sleep_control)
        bus.register(sleep_status_port, 1, self.sleep_status)
        bus.register(reset_port, 1, self.reset_register)

    def _write_sleep_control(self, value: int) -> None:
        if not value & SLP_EN:
            return
        slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        self.sleep_requests.append(slp_typ)
        self.wak_sts = True
        if slp_typ == S5_SLP_TYP:
            self._on_event(PowerEvent.POWEROFF)

    def _read_sleep_status(self) -> int:
        return WAK_STS if self.wak_sts else 0

    def _write_sleep_status(self, value: int) -> None:
        if value & WAK_STS:
            self.wak_sts = False

    def _write_reset(self, value: int) -> None:
        if value == self.reset_value:
            self._on_event(PowerEvent.RESET)
        else:
            self.ignored_resets += 1


class I8042:
    """An i8042 that only resets the machine (see the module docstring)."""

    STATUS_OBF = 0x01  # output buffer full: never
    STATUS_IBF = 0x02  # input buffer full: never
    STATUS_SYS = 0x04  # system flag: self-test passed at power-on
    STATUS_CMD = 0x08  # last write was to the command port
    STATUS_UNLOCKED = 0x10  # keyboard not inhibited

    CMD_WRITE_OUTPUT_PORT = 0xD1
    CMD_PULSE_RESET = 0xFE
    OUTPUT_PORT_RESET = 0x01  # output port bit 0: CPU reset line, active low

    def __init__(self, on_event: Callable[[str], None]) -> None:
        self._on_event = on_event
        self._status = self.STATUS_SYS | self.STATUS_UNLOCKED
        self._pending: int | None = None  # a command waiting for its data byte
        self.ignored_commands: Counter[int] = Counter()
        self.data = Register(_zero, self._write_data)
        self.command = Register(self._read_status, self._write_command)

    def attach(self, bus: IoBus, *, data_port: int = I8042_DATA_PORT,
               command_port: int = I8042_COMMAND_PORT) -> None:
        bus.register(data_port, 1, self.data)
        bus.register(command_port, 1, self.command)

    @property
    def status(self) -> int:
        return self._status

    def _read_status(self) -> int:
        return self._status

    def _write_command(self, value: int) -> None:
        self._status |= self.STATUS_CMD
        self._pending = None
        if value & 0xF0 == 0xF0:  # pulse output-port lines whose bit is clear
            if not value & self.OUTPUT_PORT_RESET:
                self._on_event(PowerEvent.RESET)
        elif value == self.CMD_WRITE_OUTPUT_PORT:
            self._pending = value
        else:
            self.ignored_commands[value] += 1

    def _write_data(self, value: int) -> None:
        self._status &= ~self.STATUS_CMD
        pending, self._pending = self._pending, None
        if pending == self.CMD_WRITE_OUTPUT_PORT and not value & self.OUTPUT_PORT_RESET:
            self._on_event(PowerEvent.RESET)
        # Without a pending command the byte is for the keyboard: there is none.


class SinkPort:
    """A port that swallows writes (counted) and reads as all-ones."""

    __slots__ = ("name", "writes", "last_value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.writes = 0
        self.last_value: int | None = None

    def read(self, offset: int, size: int) -> int:
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self.last_value = value


@dataclass(frozen=True)
class PowerDevices:
    acpi: AcpiPower
    i8042: I8042
    post: SinkPort
    io_delay: SinkPort


def attach_power_devices(bus: IoBus, on_event: Callable[[str], None]) -> PowerDevices:
    """Build every device of this module and register each at its usual ports."""
    devices = PowerDevices(AcpiPower(on_event), I8042(on_event),
                           SinkPort("POST code"), SinkPort("I/O delay"))
    devices.acpi.attach(bus)
    devices.i8042.attach(bus)
    bus.register(POST_PORT, 1, devices.post)
    bus.register(IO_DELAY_PORT, 1, devices.io_delay)
    return devices


def _zero() -> int:
    return 0
