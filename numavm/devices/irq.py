"""ISA interrupt lines that several devices share (COM1 and COM3 on IRQ 4).

A line is high while any of its devices drives it high (a wired OR), and the
machine hears only the line's changes, so one device lowering its output
does not hide another's pending interrupt.  Linux's 8250 driver chains the
UARTs of one IRQ and services every one of them until none is pending,
which is what makes an edge-triggered shared line work.
"""

from __future__ import annotations

from typing import Callable


class IrqLines:
    """Combines per-device levels into line levels for ``set_line(line, level)``."""

    def __init__(self, set_line: Callable[[int, bool], None]) -> None:
        self._set_line = set_line
        self._high: dict[int, set[int]] = {}  # line -> the sources driving it high
        self._sources = 0

    def source(self) -> Callable[[int, bool], None]:
        """A new device's ``irq(line, level)`` callback."""
        key = self._sources
        self._sources += 1

        def drive(line: int, level: bool) -> None:
            high = self._high.setdefault(line, set())
            before = bool(high)
            if level:
                high.add(key)
            else:
                high.discard(key)
            if bool(high) != before:
                self._set_line(line, not before)

        return drive

    def level(self, line: int) -> bool:
        return bool(self._high.get(line))
