"""The device models alone: bus dispatch, the 16550A as Linux's 8250 driver
drives it, and the power-off / reset devices."""

from __future__ import annotations

import pytest

from numavm.devices import (
    I8042,
    IO_DELAY_PORT,
    POST_PORT,
    S5_SLEEP_CONTROL_VALUE,
    S5_SLP_TYP,
    AcpiPower,
    Device,
    IoBus,
    PowerEvent,
    Serial16550,
    SinkPort,
    attach_power_devices,
)
from numavm.devices import serial as uart
from numavm.plan.layout import (
    COM1_IRQ,
    COM1_PORT,
    RESET_PORT,
    RESET_VALUE,
    SLEEP_CONTROL_PORT,
    SLEEP_STATUS_PORT,
)

# 8250 register offsets, as in include/uapi/linux/serial_reg.h
RX = TX = DLL = 0
IER = DLM = 1
IIR = FCR = EFR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7


class Recorder:
    """A device that logs every access and answers reads from a table."""

    def __init__(self, answers: dict[int, int] | None = None) -> None:
        self.log: list[tuple[object, ...]] = []
        self.answers = answers or {}

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return self.answers.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


class Com:
    """A UART on a bus at COM1, with the callbacks recorded."""

    def __init__(self, **kwargs: object) -> None:
        self.irqs: list[tuple[int, bool]] = []
        self.chunks: list[bytes] = []
        self.uart = Serial16550(self.chunks.append, lambda line, level: self.irqs.append((line, level)),
                                **kwargs)  # type: ignore[arg-type]
        self.bus = IoBus()
        self.bus.register(COM1_PORT, 8, self.uart)

    def inb(self, reg: int) -> int:
        return self.bus.read(COM1_PORT + reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.bus.write(COM1_PORT + reg, 1, value)

    @property
    def output(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def line(self) -> bool:
        return self.uart.irq_level


# ------------------------------------------------------------------ bus


def test_bus_dispatches_offsets_and_sizes() -> None:
    bus = IoBus()
    dev = Recorder({0: 0x12, 3: 0xABCD})
    bus.register(0x100, 4, dev)
    assert bus.read(0x100, 1) == 0x12
    assert bus.read(0x103, 2) == 0xABCD
    bus.write(0x102, 4, 0xDEADBEEF)
    assert dev.log == [("r", 0, 1), ("r", 3, 2), ("w", 2, 4, 0xDEADBEEF)]
    assert bus.device_at(0x101) is dev and bus.device_at(0x104) is None
    assert 0x103 in bus and 0x104 not in bus
    assert bus.ranges == ((0x100, 4, dev),)
    assert not bus.unhandled_reads and not bus.unhandled_writes
    assert isinstance(dev, Device)


@pytest.mark.parametrize("size, ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF)])
def test_bus_unknown_port_reads_all_ones(size: int, ones: int) -> None:
    bus = IoBus()
    bus.register(0x100, 1, Recorder())
    assert bus.read(0x101, size) == ones
    assert bus.read(0x101, size) == ones
    assert bus.unhandled_reads == {0x101: 2}
    assert not bus.unhandled_writes


def test_bus_counts_unhandled_writes_per_port() -> None:
    bus = IoBus()
    dev = Recorder()
    bus.register(0x3F8, 8, dev)
    bus.write(0x2F8, 1, 0x41)
    bus.write(0x2F8, 1, 0x42)
    bus.write(0xCF8, 4, 0x8000_0000)
    bus.write(0x3F8, 1, 0x43)  # handled
    assert bus.unhandled_writes == {0x2F8: 2, 0xCF8: 1}
    assert not bus.unhandled_reads
    assert dev.log == [("w", 0, 1, 0x43)]


def test_bus_lookups_are_live_and_misses_are_handed_over() -> None:
    bus = IoBus()
    find_reader, find_writer = bus.lookups()
    assert find_reader(0x70) is None and find_writer(0x70) is None
    dev = Recorder({1: 0x5A})
    bus.register(0x70, 2, dev)  # registered after the lookups were taken: they see it
    read, offset = find_reader(0x71)
    assert read(offset, 1) == 0x5A
    write, offset = find_writer(0x70)
    write(offset, 2, 0xBEEF)
    assert dev.log == [("r", 1, 1), ("w", 0, 2, 0xBEEF)]
    bus.write(0x99, 1, 0)
    bus.count_unhandled({0x98: 3}, {0x99: 2, 0x97: 1})
    bus.count_unhandled({}, {0x99: 1})
    assert bus.unhandled_reads == {0x98: 3}
    assert bus.unhandled_writes == {0x99: 4, 0x97: 1}


@pytest.mark.parametrize("base, length", [(0x3F0, 9), (0x3FF, 1), (0x3F8, 8), (0x3FA, 2), (0x3F0, 0x20)])
def test_bus_refuses_overlaps(base: int, length: int) -> None:
    bus = IoBus()
    first = Recorder()
    bus.register(0x3F8, 8, first)
    with pytest.raises(ValueError, match="overlap"):
        bus.register(base, length, Recorder())
    # Nothing of the refused registration took effect.
    assert bus.ranges == ((0x3F8, 8, first),)
    assert bus.read(0x3F0, 1) == 0xFF and 0x3F0 not in bus and 0x400 not in bus


def test_bus_accepts_adjacent_ranges_and_refuses_bad_ones() -> None:
    bus = IoBus()
    a, b = Recorder(), Recorder()
    bus.register(0x3F8, 8, a)
    bus.register(0x3F0, 8, b)
    bus.register(0x400, 1, Recorder())
    assert [r[0] for r in bus.ranges] == [0x3F0, 0x3F8, 0x400]
    bus.write(0x3F7, 1, 1)
    bus.write(0x3F8, 1, 2)
    assert b.log == [("w", 7, 1, 1)] and a.log == [("w", 0, 1, 2)]
    for base, length in [(0x500, 0), (-1, 2), (0xFFFF, 2)]:
        with pytest.raises(ValueError):
            bus.register(base, length, Recorder())
    bus.register(0xFFFF, 1, Recorder())  # the last port is fine


# ------------------------------------------------------------------ 16550A


def test_uart_power_on_registers() -> None:
    com = Com()
    assert [com.inb(r) for r in range(8)] == [0x00, 0x00, 0x01, 0x00, 0x00, 0x60, 0xB0, 0x00]
    assert com.irqs == [] and com.output == b""


def linux_autoconfig(com: Com) -> str:
    """The register traffic of Linux's autoconfig() / autoconfig_16550a()
    (drivers/tty/serial/8250/8250_port.c), returning the type it decides on."""
    # IER existence test.
    scratch = com.inb(IER)
    com.outb(IER, 0)
    scratch2 = com.inb(IER) & 0x0F
    com.outb(IER, 0x0F)
    scratch3 = com.inb(IER) & 0x0F
    com.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none (IER test)"
    save_mcr = com.inb(MCR)
    save_lcr = com.inb(LCR)
    # Loopback test.
    com.outb(MCR, 0x10 | 0x0A)  # LOOP | OUT2 | RTS
    status1 = com.inb(MSR) & 0xF0
    com.outb(MCR, save_mcr)
    if status1 != 0x90:  # DCD | CTS
        return "none (loopback test)"
    # FIFO detection.
    com.outb(LCR, 0xBF)
    com.outb(EFR, 0)
    com.outb(LCR, 0)
    com.outb(FCR, 0x01)
    kind = {0: "8250", 1: "unknown", 2: "16550"}.get(com.inb(IIR) >> 6, "16550A")
    if kind == "16550A":
        com.outb(LCR, 0x80)
        if com.inb(EFR) == 0:
            return "16650 (EFRv1)"
        com.outb(LCR, 0xBF)
        if com.inb(EFR) == 0:
            return "EFRv2"
        com.outb(LCR, 0)
        status1 = com.inb(MCR)
        com.outb(LCR, 0xE0)
        status2 = com.inb(0x02)  # EXCR1
        if not (status2 ^ status1) & 0x10:
            com.outb(LCR, 0)
            com.outb(MCR, status1 ^ 0x10)
            com.outb(LCR, 0xE0)
            status2 = com.inb(0x02)
            com.outb(LCR, 0)
            com.outb(MCR, status1)
            if (status2 ^ status1) & 0x10:
                return "NS16550A"
        com.outb(LCR, 0)
        com.outb(FCR, 0x01 | 0x20)
        status1 = com.inb(IIR) & 0xE0
        com.outb(FCR, 0x01)
        com.outb(LCR, 0x80)
        com.outb(FCR, 0x01 | 0x20)
        status2 = com.inb(IIR) & 0xE0
        com.outb(FCR, 0x01)
        com.outb(LCR, 0)
        if status1 == 0xC0 and status2 == 0xE0:
            return "16750"
        iersave = com.inb(IER)
        com.outb(IER, iersave & ~0x40)
        if not com.inb(IER) & 0x40:
            com.outb(IER, iersave | 0x40)
            if com.inb(IER) & 0x40:
                return "XScale"
        com.outb(IER, iersave)
    com.outb(LCR, save_lcr)
    # Reset the UART the way autoconfig ends.
    com.outb(MCR, save_mcr)
    com.outb(FCR, 0x01)
    com.outb(FCR, 0x01 | 0x02 | 0x04)
    com.outb(FCR, 0)
    com.inb(RX)
    com.outb(IER, 0)
    return kind


def test_linux_autoconfig_identifies_a_16550a() -> None:
    com = Com()
    assert linux_autoconfig(com) == "16550A"
    assert [com.inb(r) for r in (IER, IIR, LCR, MCR, LSR)] == [0x00, 0x01, 0x00, 0x00, 0x60]
    assert com.irqs == [] and com.output == b""


def test_ier_keeps_only_the_four_interrupt_enables() -> None:
    com = Com()
    com.outb(IER, 0xFF)
    assert com.inb(IER) == 0x0F


def test_scratch_register() -> None:
    com = Com()
    for value in (0x55, 0xAA, 0x00, 0xFF):
        com.outb(SCR, value)
        assert com.inb(SCR) == value


def test_loopback_mirrors_mcr_into_msr_and_thr_into_rbr() -> None:
    com = Com()
    assert com.inb(MSR) == 0xB0  # a terminal: DCD, DSR, CTS
    com.outb(MCR, 0x10)  # loopback, all outputs off
    assert com.inb(MSR) == 0x0B  # CTS, DSR, DCD fell: their delta bits
    assert com.inb(MSR) == 0x00  # deltas cleared by the read
    for mcr, msr in [(0x01, 0x20), (0x02, 0x10), (0x04, 0x40), (0x08, 0x80), (0x0F, 0xF0)]:
        com.outb(MCR, 0x10 | mcr)
        assert com.inb(MSR) & 0xF0 == msr
    com.outb(MCR, 0x10 | 0x0B)  # OUT1 falls: trailing edge of RI
    assert com.inb(MSR) == 0xB0 | 0x04
    assert com.inb(MCR) == 0x1B

    com.outb(TX, ord("x"))
    assert com.inb(LSR) == 0x61  # DR, THRE, TEMT
    assert com.inb(RX) == ord("x")
    assert com.inb(LSR) == 0x60
    assert com.output == b""  # nothing reached the host
    assert com.irqs == []  # OUT2 does not reach the pin in loopback


def test_loopback_overrun_sets_oe_until_lsr_is_read() -> None:
    com = Com()
    com.outb(MCR, 0x10)
    com.outb(TX, 1)
    com.outb(TX, 2)  # 16450 mode: one-byte receiver, overwritten
    assert com.inb(LSR) == 0x63  # DR, OE, THRE, TEMT
    assert com.inb(LSR) == 0x61  # OE cleared by the read
    assert com.inb(RX) == 2
    com.outb(FCR, 0x01)
    for i in range(17):
        com.outb(TX, i)
    assert com.inb(LSR) == 0x63
    assert [com.inb(RX) for _ in range(16)] == list(range(16))  # the 17th was lost
    assert com.inb(LSR) == 0x60


def test_divisor_latch() -> None:
    com = Com()
    com.outb(IER, 0x05)
    com.outb(LCR, 0x80 | 0x03)
    com.outb(DLL, 0x01)
    com.outb(DLM, 0x02)
    assert com.inb(DLL) == 0x01 and com.inb(DLM) == 0x02
    assert com.uart.divisor == 0x0201
    com.outb(LCR, 0x03)
    assert com.inb(IER) == 0x05  # DLM writes did not touch IER
    assert com.inb(LCR) == 0x03
    assert com.output == b""  # nor did DLL writes transmit


def test_fifo_control_and_iir_fifo_bits() -> None:
    com = Com()
    com.outb(FCR, 0x01)
    assert com.inb(IIR) == 0xC1 and com.uart.fifo_enabled
    com.outb(FCR, 0x00)
    assert com.inb(IIR) == 0x01 and not com.uart.fifo_enabled
    com.outb(FCR, 0xC6)  # FCR0 clear: the other bits are not programmed
    assert com.inb(IIR) == 0x01
    com.uart.feed(b"abc")
    com.outb(FCR, 0x07)  # enable and clear both FIFOs
    assert com.inb(LSR) == 0x61  # the receiver refilled from host input
    assert com.inb(RX) == ord("b")  # 'a' sat in RBR and was cleared with the FIFO


def test_transmit_goes_to_output_in_batches() -> None:
    com = Com()
    com.outb(LCR, 0x83)
    com.outb(DLL, 1)
    com.outb(DLM, 0)
    com.outb(LCR, 0x03)
    com.outb(FCR, 0xC7)
    for ch in b"Linux version 6.1\n":
        assert com.inb(LSR) & 0x20  # THRE before every character
        com.outb(TX, ch)
    assert com.chunks == [b"Linux version 6.1\n"]  # one callback for the line
    for ch in b"login: ":
        com.outb(TX, ch)
    assert com.chunks == [b"Linux version 6.1\n"]
    com.outb(IER, 0)  # Linux ends a console message by restoring IER
    assert com.chunks == [b"Linux version 6.1\n", b"login: "]
    com.outb(TX, ord("#"))
    com.uart.flush()
    com.uart.flush()
    assert com.chunks[-1] == b"#" and len(com.chunks) == 3
    assert com.irqs == []  # IER was 0 throughout


def test_flush_threshold() -> None:
    com = Com(flush_threshold=4)
    for ch in b"abcdefghij":
        com.outb(TX, ch)
    assert com.chunks == [b"abcd", b"efgh"]
    com.uart.flush()
    assert com.chunks == [b"abcd", b"efgh", b"ij"]


def test_thre_interrupt_raised_cleared_and_reraised() -> None:
    com = Com()
    com.outb(MCR, 0x0B)  # DTR, RTS, OUT2
    com.outb(FCR, 0x01)
    assert com.irqs == []
    com.outb(IER, 0x02)  # ETBEI with THR empty
    assert com.irqs == [(COM1_IRQ, True)]
    assert com.inb(IIR) == 0xC2
    # Reading IIR while it reports THRE clears it.
    assert com.irqs == [(COM1_IRQ, True), (COM1_IRQ, False)]
    assert com.inb(IIR) == 0xC1
    # A THR write empties again at once: THRE is back.
    com.outb(TX, ord("a"))
    assert com.irqs[-1] == (COM1_IRQ, True) and com.inb(IIR) == 0xC2
    # Writing THR clears it too (and it comes straight back); no extra edges.
    com.outb(TX, ord("b"))
    assert com.irqs == [(COM1_IRQ, True), (COM1_IRQ, False), (COM1_IRQ, True), (COM1_IRQ, False),
                        (COM1_IRQ, True)]
    # Disabling ETBEI lowers the line; enabling it again re-raises THRE even
    # though the last IIR read had acknowledged it.
    com.outb(IER, 0x00)
    assert com.irqs[-1] == (COM1_IRQ, False) and com.inb(IIR) == 0xC1
    com.outb(IER, 0x02)
    assert com.irqs[-1] == (COM1_IRQ, True) and com.inb(IIR) == 0xC2
    assert com.inb(IIR) == 0xC1 and not com.line
    # Writing ETBEI again while already set is no rising edge.
    com.outb(IER, 0x02)
    assert com.inb(IIR) == 0xC1 and not com.line
    assert com.output == b"ab"


def test_linux_txen_and_thre_tests_pass() -> None:
    """serial8250_do_startup's two THRE probes must not flag UART bugs."""
    com = Com()
    com.outb(MCR, 0x0B)
    # UART_BUG_TXEN test: IER=THRI, then LSR must show TEMT with an interrupt pending.
    com.outb(IER, 0x02)
    lsr = com.inb(LSR)
    iir = com.inb(IIR)
    com.outb(IER, 0)
    assert lsr & 0x40 and not iir & 0x01
    # UART_BUG_THRE test: THRE must be reasserted after IER 0 -> THRI.
    com.outb(IER, 0x02)
    iir1 = com.inb(IIR)
    com.outb(IER, 0)
    com.outb(IER, 0x02)
    iir = com.inb(IIR)
    com.outb(IER, 0)
    assert iir1 == 0x02 and iir == 0x02
    assert not com.line


def test_receive_sets_dr_and_raises_rdi() -> None:
    com = Com()
    com.outb(MCR, 0x0B)
    com.outb(IER, 0x01)
    assert com.irqs == [] and com.inb(LSR) == 0x60
    assert com.uart.feed(b"hi") == 2
    assert com.irqs == [(COM1_IRQ, True)]
    assert com.inb(LSR) == 0x61
    assert com.inb(IIR) == 0x04  # 16450 mode: RDI with a byte in RBR
    assert com.inb(IIR) == 0x04  # an IIR read does not acknowledge RDI
    assert com.inb(RX) == ord("h")
    assert com.line and com.inb(LSR) == 0x61  # 'i' moved up from the backlog
    assert com.inb(RX) == ord("i")
    assert com.inb(LSR) == 0x60 and com.inb(IIR) == 0x01
    assert com.irqs == [(COM1_IRQ, True), (COM1_IRQ, False)]
    assert com.inb(RX) == ord("i")  # an empty receiver reads its last byte
    assert com.uart.pending_input == 0


def test_receive_fifo_trigger_level_and_timeout() -> None:
    com = Com()
    com.outb(MCR, 0x08)
    com.outb(FCR, 0xC1)  # FIFO on, trigger level 14
    com.outb(IER, 0x01)
    com.uart.feed(b"ls\r")
    assert com.inb(IIR) == 0xCC  # below the trigger level: character timeout
    assert com.line
    assert bytes(com.inb(RX) for _ in range(3)) == b"ls\r"
    assert com.inb(IIR) == 0xC1 and not com.line
    data = bytes(range(0x20, 0x20 + 40))
    com.uart.feed(data)
    assert com.uart.pending_input == 40
    assert com.inb(IIR) == 0xC4  # 16 bytes in the FIFO: trigger level reached
    got = bytearray()
    while com.inb(LSR) & 0x01:  # serial8250_rx_chars
        got.append(com.inb(RX))
    assert bytes(got) == data
    assert com.inb(IIR) == 0xC1 and not com.line
    assert com.inb(LSR) == 0x60  # no overrun: the backlog refilled the FIFO


def test_receive_priority_over_thre_and_line_status_interrupt() -> None:
    com = Com(backlog_limit=4)
    com.outb(MCR, 0x08)
    com.outb(FCR, 0x01)
    com.outb(IER, 0x07)  # RDI, THRI, RLSI
    assert com.inb(IIR) == 0xC2
    assert com.uart.feed(b"0123456789abcdefXYZWV") == 20  # 16 in the FIFO + 4 held
    assert com.inb(IIR) == 0xC6  # overrun: receiver line status first
    assert com.inb(LSR) == 0x63
    assert com.inb(IIR) == 0xC4  # then received data (trigger level 1)
    assert bytes(com.inb(RX) for _ in range(20)) == b"0123456789abcdefXYZW"
    assert com.inb(IIR) == 0xC1  # THRE was acknowledged by the first IIR read
    com.outb(TX, ord("!"))
    assert com.inb(IIR) == 0xC2


def test_irq_line_follows_out2() -> None:
    com = Com()
    com.outb(IER, 0x03)
    com.uart.feed(b"x")
    assert com.uart.interrupt_pending and com.irqs == []  # OUT2 low: line not driven
    com.outb(MCR, 0x03)  # DTR | RTS
    assert com.irqs == []
    com.outb(MCR, 0x0B)  # + OUT2
    assert com.irqs == [(COM1_IRQ, True)]
    com.outb(MCR, 0x1B)  # loopback disconnects OUT2 from the pin
    assert com.irqs == [(COM1_IRQ, True), (COM1_IRQ, False)]
    com.outb(MCR, 0x0B)
    assert com.irqs[-1] == (COM1_IRQ, True)
    com.outb(MCR, 0x03)
    assert com.irqs[-1] == (COM1_IRQ, False) and len(com.irqs) == 4


def test_irq_line_number_is_configurable() -> None:
    com = Com(irq_line=3)
    com.outb(MCR, 0x08)
    com.outb(IER, 0x02)
    assert com.irqs == [(3, True)]


def test_modem_status_interrupt() -> None:
    com = Com()
    com.outb(MCR, 0x08)
    com.outb(IER, 0x08)
    assert com.inb(IIR) == 0x01
    com.outb(MCR, 0x18)  # loopback with OUT2 only: CTS and DSR fall, DCD stays
    assert com.uart.interrupt_pending and com.inb(IIR) == 0x00
    assert com.inb(MSR) == 0x80 | 0x03
    assert com.inb(IIR) == 0x01


def test_wide_accesses_split_into_bytes() -> None:
    com = Com()
    com.bus.write(COM1_PORT + LCR, 2, 0x0B_03)  # LCR = 0x03, MCR = 0x0B
    assert com.inb(LCR) == 0x03 and com.inb(MCR) == 0x0B
    assert com.bus.read(COM1_PORT + LSR, 4) == 0xFF_00_B0_60  # LSR, MSR, SCR, past the end
    assert com.bus.read(COM1_PORT + IIR, 2) == 0x03_01


def test_host_input_waits_during_loopback() -> None:
    com = Com()
    com.outb(MCR, 0x10)
    com.uart.feed(b"k")
    assert com.inb(LSR) == 0x60 and com.uart.pending_input == 1
    com.outb(MCR, 0x00)
    assert com.inb(LSR) == 0x61 and com.inb(RX) == ord("k")


def test_reset_restores_power_on_state() -> None:
    com = Com()
    com.outb(MCR, 0x0B)
    com.outb(FCR, 0x01)
    com.outb(LCR, 0x83)
    com.outb(SCR, 0x5A)
    com.outb(LCR, 0x03)
    com.outb(IER, 0x02)
    com.outb(TX, ord("z"))
    assert com.line
    com.uart.reset()
    assert com.output == b"z" and not com.line
    assert [com.inb(r) for r in range(8)] == [0x00, 0x00, 0x01, 0x00, 0x00, 0x60, 0xB0, 0x00]


def test_linux_startup_and_interrupt_driven_tty_output() -> None:
    """serial8250_do_startup, set_termios, then a tty write served by the
    interrupt handler loop (serial8250_handle_irq + tx_chars)."""
    com = Com()
    assert linux_autoconfig(com) == "16550A"
    # startup: clear FIFOs, clear interrupt registers, LSR safety check.
    com.outb(FCR, 0x01)
    com.outb(FCR, 0x07)
    com.outb(FCR, 0)
    for reg in (LSR, RX, IIR, MSR):
        com.inb(reg)
    assert com.inb(LSR) != 0xFF
    com.outb(LCR, 0x03)
    com.outb(MCR, 0x0B)
    # set_termios: 115200 8N1, FIFO with trigger 8, receive interrupts.
    com.outb(LCR, 0x83)
    com.outb(DLL, 1)
    com.outb(DLM, 0)
    com.outb(LCR, 0x03)
    com.outb(FCR, 0x81)
    com.outb(IER, 0x05)
    assert com.irqs == []

    pending = list(b"hello from the tty layer, longer than one FIFO load\r\n")
    ier = 0x05
    handled = 0

    def handle_irq() -> None:
        nonlocal ier, handled
        while True:  # serial8250_interrupt: loop until IIR reports nothing
            iir = com.inb(IIR)
            if iir & 0x01:
                return
            handled += 1
            lsr = com.inb(LSR)
            if lsr & 0x20 and ier & 0x02:  # serial8250_tx_chars
                for _ in range(16):
                    if not pending:
                        break
                    com.outb(TX, pending.pop(0))
                if not pending:  # __stop_tx
                    ier &= ~0x02
                    com.outb(IER, ier)

    # uart_start -> serial8250_start_tx: set ETBEI; the interrupt does the rest.
    ier |= 0x02
    com.outb(IER, ier)
    assert com.line
    seen = 0
    while seen < len(com.irqs):  # deliver edges as the IOAPIC would
        if com.irqs[seen][1]:
            handle_irq()
        seen += 1
    assert com.output == b"hello from the tty layer, longer than one FIFO load\r\n"
    assert handled == 4 and not com.line and com.inb(IIR) == 0xC1

    # A printk while the tty is transmitting: console_write saves IER, clears
    # it, polls LSR per character, restores IER -- THRE must come back.
    pending[:] = b"more"
    ier |= 0x02
    com.outb(IER, ier)
    assert com.line  # the handler would run; pretend the printk comes first
    saved = com.inb(IER)
    com.outb(IER, 0)
    for ch in b"[ 1.0] msg\n":
        while not com.inb(LSR) & 0x20:
            pass
        com.outb(TX, ch)
    assert com.inb(LSR) & 0x60 == 0x60
    assert not com.line
    com.outb(IER, saved)
    assert com.line and com.uart.interrupt_pending
    handle_irq()
    assert com.output.endswith(b"[ 1.0] msg\nmore")
    assert not com.line


# ------------------------------------------------------------------ power


def test_acpi_s5_poweroff_through_the_sleep_control_register() -> None:
    events: list[str] = []
    bus = IoBus()
    pm = AcpiPower(events.append)
    pm.attach(bus)
    assert S5_SLP_TYP == 5 and S5_SLEEP_CONTROL_VALUE == 0x34
    assert bus.read(SLEEP_STATUS_PORT, 1) == 0x00
    # acpi_hw_extended_sleep: clear WAK_STS, write SLP_TYP|SLP_EN, poll WAK_STS.
    bus.write(SLEEP_STATUS_PORT, 1, 0x80)
    bus.write(SLEEP_CONTROL_PORT, 1, S5_SLP_TYP << 2 | 0x20)
    assert events == ["poweroff"] and events[0] is PowerEvent.POWEROFF
    assert bus.read(SLEEP_STATUS_PORT, 1) == 0x80
    assert bus.read(SLEEP_CONTROL_PORT, 1) == 0x00
    bus.write(SLEEP_STATUS_PORT, 1, 0x01)  # not WAK_STS: no effect
    assert bus.read(SLEEP_STATUS_PORT, 1) == 0x80
    bus.write(SLEEP_STATUS_PORT, 1, 0x80)  # write 1 to clear
    assert bus.read(SLEEP_STATUS_PORT, 1) == 0x00
    assert pm.sleep_requests == [5]


def test_acpi_other_sleep_writes_do_not_power_off() -> None:
    events: list[str] = []
    bus = IoBus()
    AcpiPower(events.append).attach(bus)
    bus.write(SLEEP_CONTROL_PORT, 1, S5_SLP_TYP << 2)  # SLP_TYP without SLP_EN
    assert events == [] and bus.read(SLEEP_STATUS_PORT, 1) == 0x00
    bus.write(SLEEP_CONTROL_PORT, 1, 3 << 2 | 0x20)  # S3: not implemented, wakes at once
    assert events == [] and bus.read(SLEEP_STATUS_PORT, 1) == 0x80


def test_acpi_reset_register() -> None:
    events: list[str] = []
    bus = IoBus()
    pm = AcpiPower(events.append)
    pm.attach(bus)
    bus.write(RESET_PORT, 1, RESET_VALUE ^ 0xFF)
    assert events == [] and pm.ignored_resets == 1
    bus.write(RESET_PORT, 1, RESET_VALUE)
    assert events == ["reset"] and events[0] is PowerEvent.RESET
    assert bus.read(RESET_PORT, 1) == 0


def test_i8042_reboot_k() -> None:
    events: list[str] = []
    bus = IoBus()
    kbc = I8042(events.append)
    kbc.attach(bus)
    # native_machine_emergency_restart, BOOT_KBD: kb_wait() then 0xFE to 0x64.
    status = bus.read(0x64, 1)
    assert status == 0x14 and not status & 0x02
    bus.write(0x64, 1, 0xFE)
    assert events == ["reset"]
    assert bus.read(0x64, 1) == 0x1C  # last write was a command
    bus.write(0x64, 1, 0xFF)  # pulses no line
    bus.write(0x64, 1, 0xFA)  # pulses line 0 (and 2): reset
    assert events == ["reset", "reset"]


def test_i8042_other_commands_are_harmless_and_never_answer() -> None:
    events: list[str] = []
    bus = IoBus()
    kbc = I8042(events.append)
    kbc.attach(bus)
    for cmd in (0x20, 0xAA, 0xAD, 0xA7):  # read CTR, self-test, disable ports
        bus.write(0x64, 1, cmd)
        assert not bus.read(0x64, 1) & 0x03  # nothing in the output buffer
    assert bus.read(0x60, 1) == 0x00
    bus.write(0x60, 1, 0xFF)  # keyboard reset, to no keyboard
    assert bus.read(0x64, 1) == 0x14
    assert kbc.ignored_commands == {0x20: 1, 0xAA: 1, 0xAD: 1, 0xA7: 1}
    # Write output port: the A20 gate value keeps the reset line high ...
    bus.write(0x64, 1, 0xD1)
    bus.write(0x60, 1, 0xDF)
    assert events == []
    # ... a value with bit 0 clear pulls it low.
    bus.write(0x64, 1, 0xD1)
    bus.write(0x60, 1, 0xDE)
    assert events == ["reset"]
    bus.write(0x60, 1, 0x00)  # no pending command: keyboard data, ignored
    assert events == ["reset"]
    assert bus.unhandled_reads == {} and bus.unhandled_writes == {}


def test_io_delay_ports_are_sinks() -> None:
    sink = SinkPort("POST code")
    assert sink.read(0, 1) == 0xFF and sink.read(0, 2) == 0xFFFF
    bus = IoBus()
    devices = attach_power_devices(bus, lambda event: None)
    for _ in range(3):
        bus.write(POST_PORT, 1, 0)
    bus.write(IO_DELAY_PORT, 1, 0x42)
    assert devices.post.writes == 3 and devices.post.last_value == 0
    assert devices.io_delay.writes == 1 and devices.io_delay.last_value == 0x42
    assert bus.read(POST_PORT, 1) == 0xFF
    assert bus.unhandled_writes == {} and bus.unhandled_reads == {}


def test_attach_power_devices_registers_every_port() -> None:
    events: list[str] = []
    bus = IoBus()
    devices = attach_power_devices(bus, events.append)
    assert sorted(base for base, _, _ in bus.ranges) == sorted(
        [SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, RESET_PORT, 0x60, 0x64, POST_PORT, IO_DELAY_PORT])
    assert all(length == 1 for _, length, _ in bus.ranges)
    bus.write(SLEEP_CONTROL_PORT, 1, S5_SLEEP_CONTROL_VALUE)
    bus.write(RESET_PORT, 1, RESET_VALUE)
    bus.write(0x64, 1, 0xFE)
    assert events == ["poweroff", "reset", "reset"]
    assert devices.acpi.sleep_requests == [S5_SLP_TYP]
    # And the UART fits beside them.
    bus.register(COM1_PORT, uart.UART_PORTS, Serial16550(lambda data: None, lambda line, level: None))
