"""A 16550A UART, as Linux's 8250 driver probes and drives it.

Register the device for 8 ports (``bus.register(COM1_PORT, 8, uart)``).
Offsets (DLAB = LCR bit 7):

    0  read RBR / write THR        DLAB=1: DLL (divisor latch, low byte)
    1  IER (low 4 bits)            DLAB=1: DLM (divisor latch, high byte)
    2  read IIR / write FCR        (not banked by DLAB on a 16550A)
    3  LCR    4  MCR (low 5 bits)    5  LSR    6  MSR    7  SCR

Transmission is instantaneous: a THR write puts the byte in the output
buffer (or, in loopback, in the receiver) and THR is empty again at once, so
LSR.THRE and LSR.TEMT always read 1 and the THR-empty interrupt becomes
pending again right after each write (what a real UART with an idle
transmitter does a bit time later).  Output is buffered and handed to the
``output`` callback on a newline, when `flush_threshold` bytes have piled
up, on every IER write (Linux writes IER at the end of each console message
and when its tty transmit queue runs dry, so prompts without a newline come
out promptly), and when the machine calls `flush`.

Interrupt sources and IIR ids, highest priority first (all gated by IER):

    0x06 receiver line status   LSR.OE set (cleared by reading LSR)
    0x04 received data          RX FIFO at its trigger level (1 with FIFOs off)
    0x0C character timeout      RX FIFO non-empty, below the trigger level;
                                reported at once (no 4-character delay)
    0x02 THR empty              cleared by reading IIR while it is the one
                                reported, or by writing THR; set again by the
                                (instant) end of transmission, by clearing the
                                TX FIFO, and whenever IER.ETBEI goes 0 -> 1
                                (THR being empty) -- Linux's THRE test and its
                                console code, which saves IER, clears it and
                                restores it around every message, rely on
                                that last rule
    0x00 modem status           an MSR delta bit set (cleared by reading MSR)
    0x01 none

IIR bits 7:6 read 11 while the FIFOs are enabled.  The interrupt line (the
``irq`` callback, called only when the level changes) is asserted when a
source is pending and MCR.OUT2 is set, as on a PC where OUT2 gates the
UART's interrupt onto the ISA bus; in loopback mode OUT2 is disconnected
from the pin, so the line stays low.

Host input (`feed`) goes into an unbounded-by-default backlog from which the
receiver FIFO (16 bytes with FIFOs on, 1 without) is refilled as the guest
reads RBR, so a fast paste is not lost to overruns.  In loopback mode the
receiver hears only the transmitter, and host input waits in the backlog.
Bytes the guest discards with an FCR receiver reset are gone, as on real
hardware (the driver resets the FIFOs when it opens the port).  OE is set
when a loopback byte finds the receiver full, or when the backlog limit
drops host bytes.

MSR: outside loopback the modem inputs read CTS, DSR and DCD asserted (a
terminal is attached), RI clear.  In loopback they follow MCR: CTS = RTS,
DSR = DTR, RI = OUT1, DCD = OUT2.  Changes set the delta bits (TERI on the
trailing edge of RI).  LCR's word format and break bits are stored and
otherwise ignored; parity, framing and break errors never occur.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from numavm.plan.layout import COM1_IRQ

__all__ = [
    "Serial16550", "UART_PORTS",
    "IER_RDI", "IER_THRI", "IER_RLSI", "IER_MSI",
    "IIR_NO_INT", "IIR_MSI", "IIR_THRI", "IIR_RDI", "IIR_RLSI", "IIR_TIMEOUT", "IIR_FIFO_ENABLED",
    "FCR_ENABLE_FIFO", "FCR_CLEAR_RCVR", "FCR_CLEAR_XMIT",
    "LCR_DLAB", "MCR_DTR", "MCR_RTS", "MCR_OUT1", "MCR_OUT2", "MCR_LOOP",
    "LSR_DR", "LSR_OE", "LSR_THRE", "LSR_TEMT",
    "MSR_DCTS", "MSR_DDSR", "MSR_TERI", "MSR_DDCD", "MSR_CTS", "MSR_DSR", "MSR_RI", "MSR_DCD",
]

UART_PORTS = 8
FIFO_SIZE = 16

# Register offsets.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # ERBFI: received data available (and character timeout)
IER_THRI = 0x02  # ETBEI: transmitter holding register empty
IER_RLSI = 0x04  # ELSI: receiver line status
IER_MSI = 0x08  # EDSSI: modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_STORED = 0xC8  # trigger level (7:6) and DMA mode select (3)
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # by FCR bits 7:6

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

MODEM_INPUTS = MSR_DCD | MSR_DSR | MSR_CTS  # a terminal on the line

_NEWLINE = 0x0A


class Serial16550:
    """A 16550A UART at 8 consecutive ports.

    ``output(data)`` receives transmitted bytes (in batches, see `flush`);
    ``irq(irq_line, level)`` is called each time the interrupt line changes
    level.  Not thread-safe: the machine calls `feed` and `flush` from the
    thread that does port I/O, or under the same lock.
    """

    __slots__ = (
        "_output", "_irq", "irq_line", "flush_threshold", "backlog_limit",
        "_out", "_rx", "_backlog", "_rx_capacity", "_trigger", "_fifo_enabled", "_fcr",
        "_ier", "_lcr", "_mcr", "_scr", "_dll", "_dlm", "_errors", "_msr_delta",
        "_thr_pending", "_rbr", "_level",
    )

    def __init__(
        self,
        output: Callable[[bytes], None],
        irq: Callable[[int, bool], None],
        *,
        irq_line: int = COM1_IRQ,
        flush_threshold: int = 4096,
        backlog_limit: int | None = None,
    ) -> None:
        if flush_threshold < 1:
            raise ValueError(f"flush_threshold must be >= 1, not {flush_threshold}")
        self._output = output
        self._irq = irq
        self.irq_line = irq_line
        self.flush_threshold = flush_threshold
        self.backlog_limit = backlog_limit  # host bytes held beyond the FIFO; None = no limit
        self._out = bytearray()
        self._backlog: deque[int] = deque()
        self._rx: deque[int] = deque()
        self._level = False
        self._reset_registers()

    # ------------------------------------------------------------ machine side

    def reset(self) -> None:
        """Power-on state (machine reset): output is flushed; host input still
        in the backlog is kept, what sat in the receiver is gone."""
        self.flush()
        self._reset_registers()
        self._update_irq()

    def _reset_registers(self) -> None:
        self._rx.clear()
        self._rx_capacity = 1
        self._trigger = 1
        self._fifo_enabled = False
        self._fcr = 0
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._dll = 0
        self._dlm = 0
        self._errors = 0  # LSR error bits (only OE here)
        self._msr_delta = 0
        self._thr_pending = False
        self._rbr = 0  # what RBR reads once the receiver is empty: the last byte
        self._refill()

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were kept.

        With a `backlog_limit`, bytes beyond it are dropped and LSR.OE is set.
        """
        backlog = self._backlog
        backlog.extend(data)
        self._refill()
        kept = len(data)
        limit = self.backlog_limit
        if limit is not None and len(backlog) > limit:
            excess = len(backlog) - limit
            for _ in range(excess):
                backlog.pop()
            kept = max(kept - excess, 0)
            self._errors |= LSR_OE
        self._update_irq()
        return kept

    def flush(self) -> None:
        """Hand buffered output to the ``output`` callback."""
        out = self._out
        if out:
            data = bytes(out)
            out.clear()
            self._output(data)

    @property
    def irq_level(self) -> bool:
        """The interrupt line as last driven through ``irq``."""
        return self._level

    @property
    def interrupt_pending(self) -> bool:
        """Whether IIR reports a source, whatever OUT2 says."""
        return self._iir_id() != IIR_NO_INT

    @property
    def divisor(self) -> int:
        return self._dlm << 8 | self._dll

    @property
    def fifo_enabled(self) -> bool:
        return self._fifo_enabled

    @property
    def pending_input(self) -> int:
        """Host bytes not yet read by the guest (receiver FIFO and backlog)."""
        return len(self._backlog) + (0 if self._mcr & MCR_LOOP else len(self._rx))

    # ------------------------------------------------------------ guest side

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            return self._read_wide(offset, size)
        if offset == LSR:  # polled once per character by the console
            lsr = LSR_THRE | LSR_TEMT | self._errors
            if self._rx:
                lsr |= LSR_DR
            if self._errors:
                self._errors = 0
                self._update_irq()
            return lsr
        if offset == RBR:
            if self._lcr & LCR_DLAB:
                return self._dll
            return self._read_rbr()
        if offset == IIR:
            iid = self._iir_id()
            if iid == IIR_THRI:
                self._thr_pending = False
                self._update_irq()
            return (iid | IIR_FIFO_ENABLED) if self._fifo_enabled else iid
        if offset == IER:
            return self._dlm if self._lcr & LCR_DLAB else self._ier
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == MSR:
            msr = self._modem_status() | self._msr_delta
            if self._msr_delta:
                self._msr_delta = 0
                self._update_irq()
            return msr
        if offset == SCR:
            return self._scr
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            self._write_wide(offset, size, value)
            return
        value &= 0xFF
        if offset == THR and not self._lcr & LCR_DLAB:
            if self._mcr & MCR_LOOP:
                self._loop_back(value)
            else:
                out = self._out
                out.append(value)
                if value == _NEWLINE or len(out) >= self.flush_threshold:
                    self.flush()
            # THR went empty again at once: the THRE interrupt is back.
            self._thr_pending = True
            if self._ier & IER_THRI and not self._level:
                self._update_irq()
        elif offset == IER:
            if self._lcr & LCR_DLAB:
                self._dlm = value
                return
            self._write_ier(value)
        elif offset == DLL:
            self._dll = value
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only (writes are factory-test only on a 16550A).

    # ------------------------------------------------------------ internals

    def _read_wide(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            byte = self.read(offset + i, 1) if offset + i < UART_PORTS else 0xFF
            value |= byte << (i << 3)
        return value

    def _write_wide(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            if offset + i < UART_PORTS:
                self.write(offset + i, 1, value >> (i << 3) & 0xFF)

    def _read_rbr(self) -> int:
        rx = self._rx
        if not rx:
            return self._rbr
        value = self._rbr = rx.popleft()
        if self._backlog and not self._mcr & MCR_LOOP:
            rx.append(self._backlog.popleft())
        if self._level:  # reading can only retire a source, never raise one
            self._update_irq()
        return value

    def _write_ier(self, value: int) -> None:
        new = value & IER_MASK
        if new & IER_THRI and not self._ier & IER_THRI:
            self._thr_pending = True  # THR is always empty here
        self._ier = new
        self._update_irq()
        self.flush()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE_FIFO)
        if enable != self._fifo_enabled:
            # Switching between FIFO and 16450 mode empties both FIFOs.
            self._fifo_enabled = enable
            self._rx_capacity = FIFO_SIZE if enable else 1
            self._rx.clear()
        if enable:  # the other bits are only programmed with FCR0 set
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
            if value & FCR_CLEAR_XMIT:
                self._thr_pending = True
            self._fcr = value & FCR_STORED
            self._trigger = RX_TRIGGER_LEVELS[value >> 6]
        else:
            self._fcr = 0
            self._trigger = 1
        self._refill()
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        before = self._modem_status()
        was_loop = self._mcr & MCR_LOOP
        self._mcr = value & MCR_MASK
        after = self._modem_status()
        changed = before ^ after
        if changed:
            delta = (changed & (MSR_CTS | MSR_DSR | MSR_DCD)) >> 4
            if before & MSR_RI and not after & MSR_RI:
                delta |= MSR_TERI
            self._msr_delta |= delta
        if was_loop and not self._mcr & MCR_LOOP:
            self._refill()
        self._update_irq()

    def _modem_status(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MODEM_INPUTS
        return ((mcr & MCR_DTR) << 5 | (mcr & MCR_RTS) << 3
                | (mcr & MCR_OUT1) << 4 | (mcr & MCR_OUT2) << 4)

    def _loop_back(self, value: int) -> None:
        rx = self._rx
        if len(rx) < self._rx_capacity:
            rx.append(value)
        else:
            self._errors |= LSR_OE
            if not self._fifo_enabled:
                rx[0] = value  # 16450 mode: the new byte overwrites RBR
        self._update_irq()

    def _refill(self) -> None:
        if self._mcr & MCR_LOOP:
            return
        rx, backlog, capacity = self._rx, self._backlog, self._rx_capacity
        while backlog and len(rx) < capacity:
            rx.append(backlog.popleft())

    def _iir_id(self) -> int:
        ier = self._ier
        if ier & IER_RLSI and self._errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            if len(self._rx) < self._trigger:
                return IIR_TIMEOUT
            return IIR_RDI
        if ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = (self._mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2 and self._iir_id() != IIR_NO_INT
        if level != self._level:
            self._level = level
            self._irq(self.irq_line, level)
