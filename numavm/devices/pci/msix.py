"""MSI-X: the vector table, the pending-bit array and the masking rules.

The table lives in a memory BAR (16 bytes per vector: message address low,
high, data, vector control whose bit 0 masks the vector); the PBA is a
read-only bit array, one bit per vector.  The capability's message control
holds the function-wide enable (bit 15) and mask (bit 14): `PciFunction`
owns those and tells this table.

`MsixTable.signal` is the one way an interrupt leaves a device: while MSI-X
is disabled it is dropped (numavm gives its PCI functions no INTx), while the
vector or the whole function is masked it only sets the vector's pending bit,
otherwise it calls ``signal_msi(vector)``.  Unmasking (the vector or the
function) re-signals every pending vector it uncovers and clears its bit, as
the PCI spec asks: Linux masks vectors while it moves them between CPUs and
counts on not losing an interrupt in that window.

Accesses: DWORD or QWORD, naturally aligned (the spec's rule; anything else
reads all-ones and writes are dropped).  Entries come out of reset masked
with address and data zero.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

__all__ = ["MsixEntry", "MsixTable", "MSIX_ENTRY_SIZE", "MSIX_VECTOR_MASKED", "MSIX_MAX_VECTORS"]

MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 1  # vector control bit 0
MSIX_MAX_VECTORS = 2048  # the table size field is 11 bits (N - 1)


class MsixEntry(NamedTuple):
    """One table entry as the engine mirrors it (a KVM MSI route per vector)."""

    address: int  # 64-bit message address
    data: int  # 32-bit message data
    masked: bool  # the vector's own mask bit (the function mask is `MsixTable.function_masked`)


def _no_signal(vector: int) -> None:
    pass


class MsixTable:
    """A function's MSI-X table and PBA; ``signal_msi`` is set by the engine."""

    def __init__(self, vectors: int, on_change: Callable[[], None]) -> None:
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X needs 1..{MSIX_MAX_VECTORS} vectors, not {vectors}")
        self.vectors = vectors
        self._words = [0] * (vectors * 4)  # addr lo, addr hi, data, control per vector
        for v in range(vectors):
            self._words[v * 4 + 3] = MSIX_VECTOR_MASKED
        self._pending = [False] * vectors
        self.enabled = False
        self.function_masked = False
        self.signal_msi: Callable[[int], None] = _no_signal
        self._on_change = on_change
        self.dropped = 0  # signals while MSI-X was disabled

    # ---- sizes, for laying out the BAR

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8

    # ---- state

    def entries(self) -> list[MsixEntry]:
        w = self._words
        return [MsixEntry(w[i] | (w[i + 1] << 32), w[i + 2], bool(w[i + 3] & MSIX_VECTOR_MASKED))
                for i in range(0, len(w), 4)]

    def pending(self, vector: int) -> bool:
        return self._pending[vector]

    def _masked(self, vector: int) -> bool:
        return self.function_masked or bool(self._words[vector * 4 + 3] & MSIX_VECTOR_MASKED)

    def signal(self, vector: int) -> None:
        """Raise ``vector`` (out of range: ignored, the caller validated it when it was programmed)."""
        if not 0 <= vector < self.vectors:
            return
        if not self.enabled:
            self.dropped += 1
        elif self._masked(vector):
            self._pending[vector] = True
        else:
            self.signal_msi(vector)

    def _deliver_pending(self) -> None:
        if not self.enabled or self.function_masked:
            return
        for v in range(self.vectors):
            if self._pending[v] and not self._words[v * 4 + 3] & MSIX_VECTOR_MASKED:
                self._pending[v] = False
                self.signal_msi(v)

    def set_control(self, enabled: bool, function_masked: bool) -> None:
        """The capability's message control changed (PciFunction calls this)."""
        if (enabled, function_masked) == (self.enabled, self.function_masked):
            return
        self.enabled, self.function_masked = enabled, function_masked
        self._on_change()
        self._deliver_pending()

    def reset(self) -> None:
        """Function reset: every vector masked, nothing pending, MSI-X off."""
        for v in range(self.vectors):
            self._words[v * 4:v * 4 + 4] = [0, 0, 0, MSIX_VECTOR_MASKED]
            self._pending[v] = False
        self.enabled = self.function_masked = False
        self._on_change()

    # ---- the BAR regions

    def table_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > self.table_size:
            return (1 << (size * 8)) - 1
        i = offset // 4
        value = self._words[i]
        if size == 8:
            value |= self._words[i + 1] << 32
        return value

    def table_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size or offset + size > self.table_size:
            return
        changed = False
        unmasked = False
        for k in range(size // 4):
            i = offset // 4 + k
            word = (value >> (32 * k)) & 0xFFFF_FFFF
            if i % 4 == 3:
                word &= MSIX_VECTOR_MASKED  # the other control bits are reserved
                if self._words[i] & ~word & MSIX_VECTOR_MASKED:
                    unmasked = True
            if self._words[i] != word:
                self._words[i] = word
                changed = True
        if changed:
            self._on_change()
        if unmasked:
            self._deliver_pending()

    def pba_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > self.pba_size:
            return (1 << (size * 8)) - 1
        value = 0
        for bit in range(size * 8):
            v = offset * 8 + bit
            if v < self.vectors and self._pending[v]:
                value |= 1 << bit
        return value
