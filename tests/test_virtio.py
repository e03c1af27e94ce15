"""The PCI function, the virtio-pci transport, the split virtqueue and
virtio-blk, driven by a driver written here the way Linux's virtio_pci_modern
and virtio_blk drive them: enumerate the function and its capabilities, size
and place the BAR, program MSI-X, reset, ACKNOWLEDGE, DRIVER, negotiate
features, FEATURES_OK, set up the queue, DRIVER_OK, then requests through
descriptors in real guest memory (`SlotRam`) against a real file.

Then a hostile driver: every misprogramming must end in a device error
(DEVICE_NEEDS_RESET plus a configuration interrupt) or an IOERR status,
never an exception into the caller and never a hang (each test runs under
an alarm).
"""

from __future__ import annotations

import os
import signal
import struct
import tempfile
from typing import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from numavm.devices.memory import GuestRam, GuestRamError, SlotRam
from numavm.devices.pci import Bar, BarKind, PciFunction
from numavm.devices.pci import function as pcif
from numavm.devices.virtio import blk as vblk
from numavm.devices.virtio import pci as vpci
from numavm.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC
from numavm.devices.virtio.queue import (MAX_INDIRECT, NO_VECTOR, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                         VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue, VirtqueueError)

MiB = 1 << 20
BAR_ADDRESS = 0xC000_0000
MSI_ADDRESS = 0xFEE0_0000
SLOT = 1 * MiB  # two 1 MiB slots: two domains' segments, contiguous


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    """Every test here ends within 60 s or fails: a hang is a failure, not a stuck CI."""

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError("test ran over its bound: a hang")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def ram() -> Iterator[SlotRam]:
    r = SlotRam([(0, SLOT), (SLOT, SLOT)])
    yield r


class Image(tuple):  # type: ignore[type-arg]
    """(fd, bytes) with a short repr, for hypothesis's failure reports."""

    def __repr__(self) -> str:
        return f"Image(fd={self[0]}, {len(self[1])} bytes)"


@pytest.fixture
def image() -> Iterator[tuple[int, bytes]]:
    """A 64 KiB + 100 bytes file of known bytes (the partial sector is not exposed)."""
    data = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(64 * 1024 + 100))
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        fd = os.dup(f.fileno())
        yield Image((fd, data))
        os.close(fd)


# ---------------------------------------------------------------- the driver


class Driver:
    """A virtio-pci modern driver for a `VirtioPciDevice` over `SlotRam`."""

    def __init__(self, dev: vpci.VirtioPciDevice, ram: SlotRam) -> None:
        self.dev = dev
        self.ram = ram
        self.msis: list[int] = []
        self.changes: list[str] = []
        dev.signal_msi = self.msis.append
        dev.on_change = self.changes.append
        self._next = 0x1_0000  # bump allocator for rings and buffers
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (cap offset, region offset, length)
        self.notify_multiplier = 0
        self.msix_cap = 0

    # ---- memory

    def alloc(self, n: int, align: int = 16) -> int:
        at = (self._next + align - 1) // align * align
        self._next = at + n
        assert self._next < 2 * SLOT
        return at

    # ---- PCI

    def cfg(self, off: int, size: int) -> int:
        return self.dev.config_read(off, size)

    def set_cfg(self, off: int, size: int, value: int) -> None:
        self.dev.config_write(off, size, value)

    def probe(self) -> None:
        """What the PCI core and virtio_pci_modern's probe do."""
        assert self.cfg(pcif.VENDOR_ID, 2) == 0x1AF4
        assert self.cfg(pcif.STATUS, 2) & pcif.STATUS_CAP_LIST
        # BAR sizing with decoding off, as __pci_read_base does
        self.set_cfg(pcif.COMMAND, 2, 0)
        self.set_cfg(pcif.BAR0, 4, 0xFFFF_FFFF)
        size = (~(self.cfg(pcif.BAR0, 4) & ~0xF) & 0xFFFF_FFFF) + 1
        assert size == vpci.VIRTIO_BAR_SIZE
        self.set_cfg(pcif.BAR0, 4, BAR_ADDRESS)
        self.set_cfg(pcif.COMMAND, 2, pcif.COMMAND_MEMORY | pcif.COMMAND_BUS_MASTER | pcif.COMMAND_INTX_DISABLE)
        assert self.dev.bars() == [Bar(0, BAR_ADDRESS, vpci.VIRTIO_BAR_SIZE, BarKind.MEM32)]
        ptr = self.cfg(pcif.CAPABILITIES_POINTER, 1)
        seen = 0
        while ptr:
            seen += 1
            assert seen < 48, "capability list loops"
            cap_id = self.cfg(ptr, 1)
            if cap_id == pcif.CAP_ID_VENDOR:
                cfg_type, bar = self.cfg(ptr + 3, 1), self.cfg(ptr + 4, 1)
                assert bar == 0
                self.caps.setdefault(cfg_type, (ptr, self.cfg(ptr + 8, 4), self.cfg(ptr + 12, 4)))
                if cfg_type == vpci.CAP_NOTIFY_CFG:
                    self.notify_multiplier = self.cfg(ptr + 16, 4)
            elif cap_id == pcif.CAP_ID_MSIX:
                self.msix_cap = ptr
            ptr = self.cfg(ptr + 1, 1)
        assert {1, 2, 3, 4, 5} <= set(self.caps)
        assert self.msix_cap

    # ---- BAR0 registers

    def common(self, name: str, size: int, value: int | None = None) -> int:
        off = next(o for o, (_, n) in vpci._COMMON.items() if n == name) + self.caps[vpci.CAP_COMMON_CFG][1]
        if value is None:
            return self.dev.mmio_read(0, off, size)
        self.dev.mmio_write(0, off, size, value)
        return value

    def status(self) -> int:
        return self.common("device_status", 1)

    def set_status(self, bits: int) -> None:
        self.common("device_status", 1, bits)

    def features(self) -> int:
        self.common("device_feature_select", 4, 0)
        low = self.common("device_feature", 4)
        self.common("device_feature_select", 4, 1)
        return low | self.common("device_feature", 4) << 32

    def enable_msix(self, vectors: int) -> None:
        control = self.cfg(self.msix_cap + 2, 2)
        assert (control & 0x7FF) + 1 == vectors
        table = self.cfg(self.msix_cap + 4, 4)
        assert table & 7 == 0  # BIR 0
        self.set_cfg(self.msix_cap + 2, 2, control | pcif.MSIX_CONTROL_ENABLE | pcif.MSIX_CONTROL_MASKALL)
        for v in range(vectors):
            base = (table & ~7) + 16 * v
            self.dev.mmio_write(0, base, 4, MSI_ADDRESS)
            self.dev.mmio_write(0, base + 4, 4, 0)
            self.dev.mmio_write(0, base + 8, 4, 0x30 + v)
            self.dev.mmio_write(0, base + 12, 4, 0)  # unmask
        self.set_cfg(self.msix_cap + 2, 2, control | pcif.MSIX_CONTROL_ENABLE)

    def setup(self, want: int | None = None, queue_size: int | None = None, *, driver_ok: bool = True) -> None:
        """Linux's virtio_dev_probe + vp_modern_find_vqs + virtio_device_ready."""
        self.probe()
        self.set_status(0)
        assert self.status() == 0
        self.set_status(vpci.STATUS_ACKNOWLEDGE)
        self.set_status(vpci.STATUS_ACKNOWLEDGE | vpci.STATUS_DRIVER)
        offered = self.features()
        assert offered >> VIRTIO_F_VERSION_1 & 1
        accept = offered if want is None else want
        for word in (0, 1):
            self.common("driver_feature_select", 4, word)
            self.common("driver_feature", 4, (accept >> (32 * word)) & 0xFFFF_FFFF)
        self.set_status(vpci.STATUS_ACKNOWLEDGE | vpci.STATUS_DRIVER | vpci.STATUS_FEATURES_OK)
        assert self.status() & vpci.STATUS_FEATURES_OK, "device refused the features"
        nq = self.common("num_queues", 2)
        self.enable_msix(1 + nq)
        self.common("config_msix_vector", 2, 0)
        assert self.common("config_msix_vector", 2) == 0
        self.queues: list[tuple[int, int, int, int]] = []  # (size, desc, avail, used)
        for q in range(nq):
            self.common("queue_select", 2, q)
            size = self.common("queue_size", 2)
            if queue_size is not None:
                size = queue_size
                self.common("queue_size", 2, size)
            self.common("queue_msix_vector", 2, 1 + q)
            assert self.common("queue_msix_vector", 2) == 1 + q
            desc, avail, used = self.alloc(16 * size, 4096), self.alloc(6 + 2 * size, 2), self.alloc(6 + 8 * size, 4096)
            self.ram.write(desc, bytes(16 * size))
            self.ram.write(avail, bytes(6 + 2 * size))
            self.ram.write(used, bytes(6 + 8 * size))
            for name, addr in (("queue_desc", desc), ("queue_driver", avail), ("queue_device", used)):
                self.common(name, 4, addr & 0xFFFF_FFFF)  # vp_iowrite64_twopart
                self.dev.mmio_write(0, self.caps[1][1] + next(o for o, (_, n) in vpci._COMMON.items() if n == name) + 4,
                                    4, addr >> 32)
            self.common("queue_enable", 2, 1)
            assert self.common("queue_enable", 2) == 1
            self.queues.append((size, desc, avail, used))
        self.avail_idx = [0] * nq
        self.used_seen = [0] * nq
        self.free = [list(range(q[0])) for q in self.queues]
        if driver_ok:
            self.set_status(vpci.STATUS_ACKNOWLEDGE | vpci.STATUS_DRIVER | vpci.STATUS_FEATURES_OK
                            | vpci.STATUS_DRIVER_OK)

    # ---- rings

    def put_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.ram.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, q: int, head: int) -> None:
        size, _, avail, _ = self.queues[q]
        self.ram.write(avail + 4 + 2 * (self.avail_idx[q] % size), struct.pack("<H", head))
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        self.ram.write(avail + 2, struct.pack("<H", self.avail_idx[q]))

    def chain(self, q: int, bufs: list[tuple[int, int, bool]], *, indirect: bool = False) -> int:
        """Put a chain of (address, length, device-writable) buffers in queue q; its head."""
        size, desc, _, _ = self.queues[q]
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (addr, length, w) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.put_desc(table, i, addr, length, (VIRTQ_DESC_F_WRITE if w else 0)
                              | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1)
            head = self.free[q].pop(0)
            self.put_desc(desc, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            return head
        ids = [self.free[q].pop(0) for _ in bufs]
        for k, (i, (addr, length, w)) in enumerate(zip(ids, bufs)):
            last = k == len(bufs) - 1
            self.put_desc(desc, i, addr, length, (VIRTQ_DESC_F_WRITE if w else 0)
                          | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else ids[k + 1])
        return ids[0]

    def kick(self, q: int = 0) -> None:
        self.dev.mmio_write(0, self.caps[vpci.CAP_NOTIFY_CFG][1] + self.notify_multiplier * q, 2, q)

    def used(self, q: int = 0) -> list[tuple[int, int]]:
        size, desc, _, used = self.queues[q]
        idx = struct.unpack("<H", self.ram.read(used + 2, 2))[0]
        out = []
        while self.used_seen[q] != idx:
            out.append(struct.unpack("<II", self.ram.read(used + 4 + 8 * (self.used_seen[q] % size), 8)))
            self.used_seen[q] = (self.used_seen[q] + 1) & 0xFFFF
        for head, _ in out:  # free the chain's descriptors (direct chains: follow next)
            i = head
            while True:
                self.free[q].append(i)
                _, _, flags, nxt = struct.unpack("<QIHH", self.ram.read(desc + 16 * i, 16))
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                i = nxt
        return out


class BlkDriver(Driver):
    """virtio_blk's requests on top of the transport driver."""

    def config(self, off: int, size: int) -> int:
        return self.dev.mmio_read(0, self.caps[vpci.CAP_DEVICE_CFG][1] + off, size)

    def request(self, kind: int, sector: int = 0, *, out: bytes = b"", in_len: int = 0, segments: int = 1,
                indirect: bool = False, data_at: int | None = None) -> tuple[int, bytes, int]:
        """One request, ``segments`` data buffers; (status, bytes read, used length)."""
        hdr = self.alloc(16)
        self.ram.write(hdr, struct.pack("<IIQ", kind, 0, sector))
        bufs: list[tuple[int, int, bool]] = [(hdr, 16, False)]
        data_len = len(out) or in_len
        data = data_at if data_at is not None else self.alloc(max(data_len, 1), 512)
        if out:
            self.ram.write(data, out)
        pieces = _cuts(data_len, segments)
        at = data
        for n in pieces:
            bufs.append((at, n, not out))
            at += n
        status = self.alloc(1, 1)
        self.ram.write(status, b"\xEE")
        bufs.append((status, 1, True))
        head = self.chain(0, bufs, indirect=indirect)
        self.offer(0, head)
        before = len(self.msis)
        self.kick()
        done = self.used()
        assert [h for h, _ in done] == [head]
        assert self.msis[before:] == [1], "one queue interrupt on vector 1"
        return self.ram.read(status, 1)[0], self.ram.read(data, in_len), done[0][1]


def _cuts(n: int, k: int) -> list[int]:
    if n == 0:
        return []
    k = max(1, min(k, n))
    base = n // k
    return [base] * (k - 1) + [n - base * (k - 1)]


def blk_device(ram: GuestRam, fd: int, size: int, *, readonly: bool = False,
               serial: str = "numavm-disk0") -> vpci.VirtioPciDevice:
    return vpci.VirtioPciDevice(vblk.VirtioBlk(fd, size, readonly=readonly, serial=serial), ram)


def ready(ram: SlotRam, image: tuple[int, bytes], **kw: object) -> BlkDriver:
    fd, data = image
    drv = BlkDriver(blk_device(ram, fd, len(data), **kw), ram)  # type: ignore[arg-type]
    drv.setup()
    return drv


def needs_reset(drv: Driver) -> None:
    """The device reported a protocol error as the spec asks, and said why."""
    assert drv.status() & vpci.STATUS_DEVICE_NEEDS_RESET
    assert 0 in drv.msis, "a configuration interrupt on vector 0"
    assert drv.dev.errors


# ---------------------------------------------------------------- GuestRam


def test_slot_ram_views_split_at_slots(ram: SlotRam) -> None:
    assert isinstance(ram, GuestRam)
    ram.write(SLOT - 4, b"abcdefgh")
    assert [bytes(v) for v in ram.views(SLOT - 4, 8)] == [b"abcd", b"efgh"]
    with pytest.raises(GuestRamError):
        ram.view(SLOT - 4, 8)
    with pytest.raises(ValueError):
        ram.views(2 * SLOT - 4, 8)
    assert ram.views(5, 0) == []
    hole = SlotRam([(0, 4096), (8192, 4096)])
    with pytest.raises(ValueError):
        hole.views(4000, 200)


# ---------------------------------------------------------------- PCI function


def function() -> PciFunction:
    return PciFunction(vendor_id=0x1234, device_id=0x5678, class_code=0x018000, revision=3,
                       subsystem_vendor_id=0x1AF4, subsystem_id=2, bar_sizes={0: 0x8000, 2: 0x1000},
                       msix_vectors=3, msix_table_offset=0x4000, msix_pba_offset=0x5000)


def test_config_header_read_only_fields() -> None:
    f = function()
    assert f.config_read(0, 4) == 0x5678_1234
    assert f.config_read(pcif.REVISION_ID, 4) == 0x0180_0003
    assert f.config_read(pcif.HEADER_TYPE, 1) == 0
    assert f.config_read(pcif.SUBSYSTEM_VENDOR_ID, 4) == 0x0002_1AF4
    assert f.config_read(pcif.INTERRUPT_PIN, 1) == 0
    f.config_write(0, 4, 0)
    f.config_write(pcif.STATUS, 2, 0xFFFF)
    f.config_write(pcif.CLASS_CODE, 1, 0xFF)
    f.config_write(pcif.INTERRUPT_PIN, 1, 1)
    assert f.config_read(0, 4) == 0x5678_1234
    assert f.config_read(pcif.STATUS, 2) == pcif.STATUS_CAP_LIST
    assert f.config_read(pcif.REVISION_ID, 4) == 0x0180_0003
    assert f.config_read(pcif.INTERRUPT_PIN, 1) == 0
    f.config_write(pcif.COMMAND, 2, 0xFFFF)
    assert f.config_read(pcif.COMMAND, 2) == (pcif.COMMAND_MEMORY | pcif.COMMAND_BUS_MASTER
                                             | pcif.COMMAND_INTX_DISABLE)
    f.config_write(pcif.INTERRUPT_LINE, 1, 11)
    assert f.config_read(pcif.INTERRUPT_LINE, 1) == 11
    # unaligned, odd sizes, out of range: all-ones, writes dropped
    assert f.config_read(1, 2) == 0xFFFF
    assert f.config_read(0x1000, 1) == 0xFF
    assert f.config_read(0, 3) == 0xFFFFFF
    f.config_write(2, 4, 0)
    assert f.config_read(0x100, 4) == 0  # conventional: no extended capabilities


def test_bar_sizing_moves_and_decode() -> None:
    f = function()
    changes: list[str] = []
    f.on_change = changes.append
    for index, size in ((0, 0x8000), (2, 0x1000)):
        off = pcif.BAR0 + 4 * index
        f.config_write(off, 4, 0xFFFF_FFFF)
        assert f.config_read(off, 4) == (~(size - 1)) & 0xFFFF_FFFF
    for empty in (1, 3, 4, 5):
        f.config_write(pcif.BAR0 + 4 * empty, 4, 0xFFFF_FFFF)
        assert f.config_read(pcif.BAR0 + 4 * empty, 4) == 0
    f.config_write(pcif.ROM_ADDRESS, 4, 0xFFFF_FFFF)
    assert f.config_read(pcif.ROM_ADDRESS, 4) == 0
    assert changes == []  # decoding is off: nothing the engine maps changed
    f.assign_bar(0, 0xC000_0000)
    f.assign_bar(2, 0xC000_8000)
    assert [b.address for b in f.bars()] == [0, 0]
    changes.clear()
    f.config_write(pcif.COMMAND, 2, pcif.COMMAND_MEMORY)
    assert [b.address for b in f.bars()] == [0xC000_0000, 0xC000_8000]
    assert changes == ["bars"]
    # a move, in two 16-bit halves, low bits below the size ignored
    f.config_write(pcif.BAR0 + 2, 2, 0xC010)
    f.config_write(pcif.BAR0, 2, 0x1234)
    assert f.bars()[0].address == 0xC010_0000
    assert changes == ["bars", "bars"]
    f.config_write(pcif.COMMAND, 2, 0)
    assert [b.address for b in f.bars()] == [0, 0]
    with pytest.raises(ValueError):
        f.assign_bar(0, 0xC000_1000)  # misaligned


def test_msix_masking_pending_and_resignal() -> None:
    f = function()
    got: list[int] = []
    changes: list[str] = []
    f.signal_msi = got.append
    f.on_change = changes.append
    f.config_write(pcif.COMMAND, 2, pcif.COMMAND_MEMORY)
    cap = f.config_read(pcif.CAPABILITIES_POINTER, 1)
    assert f.config_read(cap, 1) == pcif.CAP_ID_MSIX
    assert f.config_read(cap + 2, 2) == 2  # 3 vectors, disabled
    assert f.config_read(cap + 4, 4) == 0x4000 and f.config_read(cap + 8, 4) == 0x5000
    assert all(e.masked for e in f.msix_entries())
    assert f.msix is not None
    f.msix.signal(0)
    assert got == [] and f.msix.dropped == 1  # MSI-X off: no INTx either
    f.config_write(cap + 2, 2, pcif.MSIX_CONTROL_ENABLE)
    assert f.enabled and changes[-1] == "msix"
    f.msix.signal(1)
    assert got == [] and f.mmio_read(0, 0x5000, 8) == 0b010  # masked: pending
    f.mmio_write(0, 0x4000 + 16, 8, 0x0000_0000_FEE0_1000)
    f.mmio_write(0, 0x4000 + 24, 4, 0x41)
    assert f.mmio_read(0, 0x4000 + 16, 8) == 0xFEE0_1000
    f.mmio_write(0, 0x4000 + 28, 4, 0)  # unmask vector 1: the pending one goes out
    assert got == [1] and f.mmio_read(0, 0x5000, 4) == 0
    assert f.msix_entries()[1] == (0xFEE0_1000, 0x41, False)
    # function-wide mask
    f.config_write(cap + 2, 2, pcif.MSIX_CONTROL_ENABLE | pcif.MSIX_CONTROL_MASKALL)
    assert f.function_masked
    f.msix.signal(1)
    f.msix.signal(2)  # vector 2 is also masked on its own
    assert got == [1] and f.mmio_read(0, 0x5000, 4) == 0b110
    f.config_write(cap + 2, 2, pcif.MSIX_CONTROL_ENABLE)
    assert got == [1, 1] and f.mmio_read(0, 0x5000, 4) == 0b100
    f.mmio_write(0, 0x5000, 4, 0)  # the PBA is read-only
    assert f.mmio_read(0, 0x5000, 4) == 0b100
    # odd accesses to the table: all-ones, dropped
    assert f.mmio_read(0, 0x4002, 2) == 0xFFFF
    f.mmio_write(0, 0x4001, 4, 0)
    assert f.mmio_read(0, 0x8000, 4) == 0xFFFF_FFFF  # past the BAR


# ---------------------------------------------------------------- virtio-blk, as Linux drives it


def test_identity_and_config(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = ready(ram, image)
    dev = drv.dev
    assert dev.config_read(pcif.DEVICE_ID, 2) == 0x1042
    assert dev.config_read(pcif.REVISION_ID, 1) == 1
    assert dev.config_read(pcif.CLASS_CODE - 1, 4) >> 8 == 0x018000
    assert dev.config_read(pcif.SUBSYSTEM_ID, 2) == 2
    assert drv.notify_multiplier == vpci.NOTIFY_OFF_MULTIPLIER
    assert dev.notify_offset(0) == drv.caps[vpci.CAP_NOTIFY_CFG][1]
    features = drv.features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, vblk.VIRTIO_BLK_F_FLUSH, vblk.VIRTIO_BLK_F_BLK_SIZE,
                vblk.VIRTIO_BLK_F_SEG_MAX, vblk.VIRTIO_BLK_F_SIZE_MAX):
        assert features >> bit & 1, bit
    assert not features >> vblk.VIRTIO_BLK_F_RO & 1
    assert not features >> 29 & 1  # no EVENT_IDX
    assert drv.config(0, 8) == len(image[1]) // 512 == 128
    assert drv.config(0, 4) == 128 and drv.config(4, 4) == 0
    assert drv.config(8, 4) == vblk.SIZE_MAX
    assert drv.config(12, 4) == vblk.SEG_MAX
    assert drv.config(20, 4) == 512
    assert drv.common("num_queues", 2) == 1
    assert drv.common("queue_notify_off", 2) == 0
    assert drv.status() == 0x0F


def test_read_write_flush_get_id(ram: SlotRam, image: tuple[int, bytes]) -> None:
    fd, data = image
    drv = ready(ram, image)
    status, got, used = drv.request(vblk.VIRTIO_BLK_T_IN, 3, in_len=4096, segments=3)
    assert status == vblk.VIRTIO_BLK_S_OK and got == data[3 * 512:3 * 512 + 4096] and used == 4097
    new = os.urandom(3 * 512)
    status, _, used = drv.request(vblk.VIRTIO_BLK_T_OUT, 10, out=new, segments=2)
    assert status == vblk.VIRTIO_BLK_S_OK and used == 1
    assert os.pread(fd, len(new), 10 * 512) == new
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 9, in_len=5 * 512, indirect=True, segments=5)
    assert status == vblk.VIRTIO_BLK_S_OK and got == data[9 * 512:10 * 512] + new + data[13 * 512:14 * 512]
    status, _, used = drv.request(vblk.VIRTIO_BLK_T_FLUSH)
    assert status == vblk.VIRTIO_BLK_S_OK and used == 1
    status, got, used = drv.request(vblk.VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == vblk.VIRTIO_BLK_S_OK and got == b"numavm-disk0".ljust(20, b"\0") and used == 21
    status, _, used = drv.request(99, in_len=512)
    assert status == vblk.VIRTIO_BLK_S_UNSUPP and used == 1
    # the last whole sector reads, the next does not
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 127, in_len=512)
    assert status == vblk.VIRTIO_BLK_S_OK and got == data[127 * 512:128 * 512]
    status, _, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 127, in_len=1024)
    assert status == vblk.VIRTIO_BLK_S_IOERR
    assert not drv.dev.errors


def test_buffer_across_slots(ram: SlotRam, image: tuple[int, bytes]) -> None:
    """A buffer that straddles two domains' segments is two views, read and written in place."""
    fd, data = image
    drv = ready(ram, image)
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 0, in_len=8192, data_at=SLOT - 4096)
    assert status == vblk.VIRTIO_BLK_S_OK and got == data[:8192]
    payload = os.urandom(8192)
    status, _, _ = drv.request(vblk.VIRTIO_BLK_T_OUT, 20, out=payload, data_at=SLOT - 1024)
    assert status == vblk.VIRTIO_BLK_S_OK and os.pread(fd, 8192, 20 * 512) == payload


def test_short_file_read_zero_fills(ram: SlotRam, image: tuple[int, bytes]) -> None:
    """The file shrank under the device: the missing tail reads as zeros, not stale guest bytes."""
    fd, data = image
    drv = ready(ram, image)
    os.ftruncate(fd, 1000)
    at = drv.alloc(2048, 512)
    ram.write(at, b"\xAA" * 2048)
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 0, in_len=2048, data_at=at, segments=3)
    assert status == vblk.VIRTIO_BLK_S_OK and got == data[:1000] + bytes(1048)


def test_readonly(ram: SlotRam, image: tuple[int, bytes]) -> None:
    fd, data = image
    drv = ready(ram, image, readonly=True)
    assert drv.features() >> vblk.VIRTIO_BLK_F_RO & 1
    status, _, _ = drv.request(vblk.VIRTIO_BLK_T_OUT, 0, out=b"x" * 512)
    assert status == vblk.VIRTIO_BLK_S_IOERR
    assert os.pread(fd, 512, 0) == data[:512]
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 0, in_len=512)
    assert status == vblk.VIRTIO_BLK_S_OK and got == data[:512]


@pytest.mark.parametrize("sector", [128, 2**40, 2**63, 2**64 - 1])
def test_huge_sector_is_ioerr(ram: SlotRam, image: tuple[int, bytes], sector: int) -> None:
    drv = ready(ram, image)
    for kind in (vblk.VIRTIO_BLK_T_IN, vblk.VIRTIO_BLK_T_OUT):
        status, _, _ = drv.request(kind, sector, in_len=512 if kind == 0 else 0, out=b"" if kind == 0 else b"y" * 512)
        assert status == vblk.VIRTIO_BLK_S_IOERR
    assert not drv.status() & vpci.STATUS_DEVICE_NEEDS_RESET
    status, _, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 0, in_len=100)  # not a whole sector
    assert status == vblk.VIRTIO_BLK_S_IOERR


def test_batch_and_interrupt_suppression(ram: SlotRam, image: tuple[int, bytes]) -> None:
    fd, data = image
    drv = ready(ram, image)
    heads, statuses = [], []
    for s in range(20):
        hdr, buf, st = drv.alloc(16), drv.alloc(512, 512), drv.alloc(1, 1)
        ram.write(hdr, struct.pack("<IIQ", vblk.VIRTIO_BLK_T_IN, 0, s))
        heads.append(drv.chain(0, [(hdr, 16, False), (buf, 512, True), (st, 1, True)]))
        statuses.append((st, buf, s))
        drv.offer(0, heads[-1])
    _, _, avail, _ = drv.queues[0]
    ram.write(avail, struct.pack("<H", VIRTQ_AVAIL_F_NO_INTERRUPT))
    drv.kick()
    assert drv.msis == []  # the driver asked for no interrupt
    assert [h for h, _ in drv.used()] == heads
    for st, buf, s in statuses:
        assert ram.read(st, 1) == b"\0" and ram.read(buf, 512) == data[s * 512:(s + 1) * 512]


def test_reset_and_reinit(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = ready(ram, image)
    drv.changes.clear()
    drv.set_status(0)
    assert drv.status() == 0 and drv.changes == ["reset"]
    drv.common("queue_select", 2, 0)
    assert drv.common("queue_enable", 2) == 0
    assert drv.common("queue_msix_vector", 2) == NO_VECTOR
    assert drv.common("config_msix_vector", 2) == NO_VECTOR
    drv.kick()  # a stale kick after reset: ignored, no error
    assert drv.status() == 0 and drv.dev.ignored_notifies == 1
    drv._next = 0x8_0000
    drv.setup()
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 1, in_len=512)
    assert status == vblk.VIRTIO_BLK_S_OK and got == image[1][512:1024]


def test_isr_read_clears(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = ready(ram, image)
    drv.request(vblk.VIRTIO_BLK_T_FLUSH)
    isr = drv.caps[vpci.CAP_ISR_CFG][1]
    assert drv.dev.mmio_read(0, isr, 1) == vpci.ISR_QUEUE
    assert drv.dev.mmio_read(0, isr, 1) == 0


def test_pci_cfg_window(ram: SlotRam, image: tuple[int, bytes]) -> None:
    """VIRTIO_PCI_CAP_PCI_CFG reaches BAR0 through configuration space."""
    drv = ready(ram, image)
    cap = drv.caps[vpci.CAP_PCI_CFG][0]
    drv.set_cfg(cap + 4, 1, 0)
    drv.set_cfg(cap + 8, 4, vpci.COMMON_CFG_OFFSET + 0x14)  # device_status
    drv.set_cfg(cap + 12, 4, 1)
    assert drv.cfg(cap + 16, 1) == 0x0F
    drv.set_cfg(cap + 8, 4, vpci.DEVICE_CFG_OFFSET)
    drv.set_cfg(cap + 12, 4, 4)
    assert drv.cfg(cap + 16, 4) == 128


def test_features_refused(ram: SlotRam, image: tuple[int, bytes]) -> None:
    fd, data = image
    for want in (1 << VIRTIO_F_VERSION_1 | 1 << 29, 1 << vblk.VIRTIO_BLK_F_FLUSH, 1 << VIRTIO_F_VERSION_1 | 1 << 63):
        drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
        with pytest.raises(AssertionError, match="refused"):
            drv.setup(want=want)
        assert not drv.status() & vpci.STATUS_FEATURES_OK
    drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
    drv.setup(want=1 << VIRTIO_F_VERSION_1)  # the minimum is fine
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 0, in_len=512)
    assert status == 0 and got == data[:512]
    drv.common("driver_feature_select", 4, 0)
    drv.common("driver_feature", 4, 0xFFFF_FFFF)  # after FEATURES_OK: ignored
    assert drv.common("driver_feature", 4) == 0


def test_wraparound_of_ring_indices(ram: SlotRam) -> None:
    """16-bit indices wrap: the device follows the driver across 0xFFFF -> 0."""
    q = Virtqueue(ram, 0, 8)
    q.desc, q.driver, q.device = 0x1000, 0x2000, 0x3000
    q.enable()
    q.last_avail = q.used_idx = q._avail_idx = 0xFFFC
    ram.write(0x3002, struct.pack("<H", 0xFFFC))
    buf = 0x5000
    for k in range(8):
        ram.write(0x1000 + 16 * k, struct.pack("<QIHH", buf + k * 16, 16, VIRTQ_DESC_F_WRITE, 0))
    idx = 0xFFFC
    for rnd in range(3):
        for k in range(6):
            ram.write(0x2004 + 2 * (idx % 8), struct.pack("<H", k))
            idx = (idx + 1) & 0xFFFF
        ram.write(0x2002, struct.pack("<H", idx))
        got = []
        while (c := q.pop()) is not None:
            got.append(c.head)
            q.push(c.head, 1)
        assert got == list(range(6))
        assert struct.unpack("<H", ram.read(0x3002, 2))[0] == idx == q.used_idx
    assert idx == (0xFFFC + 18) & 0xFFFF


# ---------------------------------------------------------------- a hostile driver


def raw_setup(ram: SlotRam, image: tuple[int, bytes], **kw: object) -> BlkDriver:
    fd, data = image
    drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
    drv.setup(**kw)  # type: ignore[arg-type]
    return drv


def hostile_enable(ram: SlotRam, image: tuple[int, bytes], **regs: int) -> BlkDriver:
    """Program queue 0 with ``regs`` (queue_size, queue_desc, ...) and enable it."""
    fd, data = image
    drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
    drv.probe()
    drv.set_status(0)
    drv.set_status(1)
    drv.set_status(3)
    drv.common("driver_feature_select", 4, 1)
    drv.common("driver_feature", 4, 1)
    drv.set_status(0xB)
    drv.enable_msix(2)
    drv.common("config_msix_vector", 2, 0)
    drv.common("queue_select", 2, 0)
    defaults = {"queue_size": 256, "queue_desc": 0x1_0000, "queue_driver": 0x2_0000, "queue_device": 0x3_0000}
    defaults.update(regs)
    for name, value in defaults.items():
        drv.common(name, 2 if name == "queue_size" else 8, value)
    drv.common("queue_enable", 2, 1)
    return drv


@pytest.mark.parametrize("regs", [
    {"queue_size": 100},  # not a power of two
    {"queue_size": 0},
    {"queue_size": 512},  # past the maximum
    {"queue_desc": 2 * SLOT},  # outside RAM
    {"queue_desc": 2 * SLOT - 256},  # runs off the end of RAM
    {"queue_driver": 1 << 63},
    {"queue_device": 0xFFFF_FFFF_FFFF_F000},
    {"queue_desc": SLOT - 0x800},  # straddles the two slots
    {"queue_desc": 0x1_0008},  # misaligned
    {"queue_device": 0x3_0002},
])
def test_bad_queue_programming(ram: SlotRam, image: tuple[int, bytes], regs: dict[str, int]) -> None:
    drv = hostile_enable(ram, image, **regs)
    assert drv.common("queue_enable", 2) == 0
    needs_reset(drv)
    drv.set_status(0xF)  # the driver carries on regardless
    drv.kick()
    assert drv.status() & vpci.STATUS_DEVICE_NEEDS_RESET
    drv.set_status(0)  # a reset clears it
    assert drv.status() == 0


def test_notify_before_enable(ram: SlotRam, image: tuple[int, bytes]) -> None:
    fd, data = image
    drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
    drv.probe()
    drv.set_status(0)
    drv.kick()  # before DRIVER_OK: ignored
    assert drv.status() == 0 and not drv.dev.errors
    drv.set_status(1)
    drv.set_status(3)
    drv.common("driver_feature_select", 4, 1)
    drv.common("driver_feature", 4, 1)
    drv.set_status(0xB)
    drv.enable_msix(2)
    drv.common("config_msix_vector", 2, 0)
    drv.set_status(0xF)  # DRIVER_OK with the queue never enabled
    drv.kick()
    needs_reset(drv)
    drv.kick(5)  # a queue that does not exist, through MMIO: no exception
    drv.dev.queue_notify(7)
    drv.dev.queue_notify(-1)


def test_descriptor_loop_direct(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = raw_setup(ram, image)
    _, desc, _, _ = drv.queues[0]
    drv.put_desc(desc, 0, 0x9_0000, 16, VIRTQ_DESC_F_NEXT, 1)
    drv.put_desc(desc, 1, 0x9_1000, 512, VIRTQ_DESC_F_NEXT, 0)
    drv.offer(0, 0)
    drv.kick()
    needs_reset(drv)
    assert "loop" in drv.dev.errors[-1]


def test_descriptor_self_loop(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = raw_setup(ram, image)
    _, desc, _, _ = drv.queues[0]
    drv.put_desc(desc, 5, 0x9_0000, 16, VIRTQ_DESC_F_NEXT, 5)
    drv.offer(0, 5)
    drv.kick()
    needs_reset(drv)


def test_descriptor_loop_indirect(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = raw_setup(ram, image)
    _, desc, _, _ = drv.queues[0]
    table = drv.alloc(64)
    drv.put_desc(table, 0, 0x9_0000, 16, VIRTQ_DESC_F_NEXT, 1)
    drv.put_desc(table, 1, 0x9_1000, 16, VIRTQ_DESC_F_NEXT, 2)
    drv.put_desc(table, 2, 0x9_2000, 16, VIRTQ_DESC_F_NEXT, 3)
    drv.put_desc(table, 3, 0x9_3000, 16, VIRTQ_DESC_F_NEXT, 1)
    drv.put_desc(desc, 0, table, 64, VIRTQ_DESC_F_INDIRECT, 0)
    drv.offer(0, 0)
    drv.kick()
    needs_reset(drv)


@pytest.mark.parametrize("case", ["nested", "with-next", "zero", "ragged", "too-big", "outside", "next-past",
                                  "not-negotiated"])
def test_bad_indirect(ram: SlotRam, image: tuple[int, bytes], case: str) -> None:
    want = None
    if case == "not-negotiated":
        want = 1 << VIRTIO_F_VERSION_1
    drv = raw_setup(ram, image, want=want)
    _, desc, _, _ = drv.queues[0]
    table = drv.alloc(16 * 4)
    inner = drv.alloc(16 * 2)
    drv.put_desc(inner, 0, 0x9_0000, 16, 0, 0)
    drv.put_desc(table, 0, 0x9_0000, 16, VIRTQ_DESC_F_NEXT, 1)
    drv.put_desc(table, 1, inner if case == "nested" else 0x9_1000, 16,
                 VIRTQ_DESC_F_INDIRECT if case == "nested" else VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                 9 if case == "next-past" else 2)
    drv.put_desc(table, 2, 0x9_2000, 1, VIRTQ_DESC_F_WRITE, 0)
    length, flags, addr = 48, VIRTQ_DESC_F_INDIRECT, table
    if case == "with-next":
        flags |= VIRTQ_DESC_F_NEXT
    elif case == "zero":
        length = 0
    elif case == "ragged":
        length = 40
    elif case == "too-big":
        length = 16 * (MAX_INDIRECT + 1)
    elif case == "outside":
        addr = 2 * SLOT - 16
    drv.put_desc(desc, 0, addr, length, flags, 1)
    drv.offer(0, 0)
    drv.kick()
    needs_reset(drv)


@pytest.mark.parametrize("case", ["head-past", "next-past", "outside", "huge-len", "past-size-max",
                                  "read-after-write", "no-status", "short-header", "ahead"])
def test_bad_chains(ram: SlotRam, image: tuple[int, bytes], case: str) -> None:
    drv = raw_setup(ram, image)
    size, desc, avail, _ = drv.queues[0]
    hdr = drv.alloc(16)
    ram.write(hdr, struct.pack("<IIQ", vblk.VIRTIO_BLK_T_IN, 0, 0))
    data, st = drv.alloc(512, 512), drv.alloc(1, 1)
    chain = [(hdr, 16, 0), (data, 512, VIRTQ_DESC_F_WRITE), (st, 1, VIRTQ_DESC_F_WRITE)]
    if case == "outside":
        chain[1] = (2 * SLOT - 256, 512, VIRTQ_DESC_F_WRITE)
    elif case == "huge-len":
        chain[1] = (data, 0xFFFF_FFFF, VIRTQ_DESC_F_WRITE)
    elif case == "past-size-max":
        chain[1] = (0, vblk.SIZE_MAX + 512, VIRTQ_DESC_F_WRITE)
    elif case == "read-after-write":
        chain[1] = (data, 512, VIRTQ_DESC_F_WRITE)
        chain[2] = (st, 1, 0)
    elif case == "no-status":
        chain = chain[:1]
    elif case == "short-header":
        chain[0] = (hdr, 8, 0)
    for i, (addr, length, flags) in enumerate(chain):
        last = i == len(chain) - 1
        drv.put_desc(desc, i, addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                     size + 3 if case == "next-past" and i == 0 else i + 1)
    head = size if case == "head-past" else 0
    drv.offer(0, head)
    if case == "ahead":
        ram.write(avail + 2, struct.pack("<H", size + 1))
    drv.kick()
    needs_reset(drv)
    drv.kick()  # while NEEDS_RESET: ignored
    assert drv.dev.error_count == 1


def test_queue_size_not_power_of_two_via_setup(ram: SlotRam, image: tuple[int, bytes]) -> None:
    fd, data = image
    drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
    with pytest.raises(AssertionError):
        drv.setup(queue_size=48)  # the driver sees queue_enable read back 0
    needs_reset(drv)


def test_queue_registers_fixed_while_enabled(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = ready(ram, image)
    drv.common("queue_select", 2, 0)
    desc = drv.common("queue_desc", 4)
    drv.common("queue_desc", 4, 0xDEAD_0000)
    drv.common("queue_size", 2, 8)
    assert drv.common("queue_desc", 4) == desc and drv.common("queue_size", 2) == 256
    drv.common("queue_select", 2, 9)  # no such queue: reads 0, writes dropped
    assert drv.common("queue_size", 2) == 0
    drv.common("queue_enable", 2, 1)
    drv.common("queue_msix_vector", 2, 0)
    assert drv.common("queue_msix_vector", 2) == 0
    drv.common("queue_select", 2, 0)
    drv.common("queue_msix_vector", 2, 0)  # fixed while enabled
    assert drv.common("queue_msix_vector", 2) == 1
    drv.common("config_msix_vector", 2, 77)  # no such vector
    assert drv.common("config_msix_vector", 2) == NO_VECTOR
    assert not drv.dev.errors


def test_bus_master_off_ignores_kicks(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = ready(ram, image)
    drv.set_cfg(pcif.COMMAND, 2, pcif.COMMAND_MEMORY)
    hdr, st = drv.alloc(16), drv.alloc(1, 1)
    ram.write(hdr, struct.pack("<IIQ", vblk.VIRTIO_BLK_T_FLUSH, 0, 0))
    drv.offer(0, drv.chain(0, [(hdr, 16, False), (st, 1, True)]))
    drv.kick()
    assert drv.used() == [] and drv.dev.ignored_notifies == 1
    drv.set_cfg(pcif.COMMAND, 2, pcif.COMMAND_MEMORY | pcif.COMMAND_BUS_MASTER)
    drv.kick()
    assert len(drv.used()) == 1


# ---------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.binary(min_size=16 * 8, max_size=16 * 8), heads=st.lists(st.integers(0, 15), max_size=8),
       avail_idx=st.integers(0, 0xFFFF), flags=st.integers(0, 0xFFFF), indirect=st.booleans())
def test_any_ring_contents_terminate(table: bytes, heads: list[int], avail_idx: int, flags: int,
                                     indirect: bool) -> None:
    """Whatever bytes the guest puts in the rings, pop() returns or raises VirtqueueError, fast."""
    ram = SlotRam([(0, 0x1000), (0x1000, 0x1000)])
    q = Virtqueue(ram, 0, 8, max_segment=0x800)
    q.indirect = indirect
    q.desc, q.driver, q.device = 0x0, 0x200, 0x400
    q.enable()
    ram.write(0, table)
    ram.write(0x200, struct.pack("<HH", flags, avail_idx) + b"".join(struct.pack("<H", h) for h in heads))
    popped = 0
    try:
        while (chain := q.pop()) is not None:
            popped += 1
            assert chain.descriptors <= 8 + MAX_INDIRECT
            assert chain.readable_len + chain.writable_len <= chain.descriptors * 0x800
            q.push(chain.head, 0)
    except VirtqueueError:
        pass
    assert popped <= 8


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 127), st.integers(1, 8),
                              st.integers(1, 4), st.booleans()), min_size=1, max_size=12))
def test_reads_and_writes_match_a_model(image: tuple[int, bytes], ops: list[tuple[str, int, int, int, bool]]) -> None:
    """Random reads and writes through the queue agree with a bytearray holding the same disk."""
    fd, data = image
    os.pwrite(fd, data, 0)
    model = bytearray(data[:128 * 512])
    ram = SlotRam([(0, SLOT), (SLOT, SLOT)])
    drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
    drv.setup()
    for kind, sector, count, segments, indirect in ops:
        n = count * 512
        ok = sector + count <= 128
        drv._next = 0x4_0000  # reuse buffer memory between requests
        if kind == "r":
            status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, sector, in_len=n, segments=segments, indirect=indirect)
            if ok:
                assert got == bytes(model[sector * 512:sector * 512 + n])
        else:
            payload = os.urandom(n)
            status, _, _ = drv.request(vblk.VIRTIO_BLK_T_OUT, sector, out=payload, segments=segments,
                                       indirect=indirect)
            if ok:
                model[sector * 512:sector * 512 + n] = payload
        assert status == (vblk.VIRTIO_BLK_S_OK if ok else vblk.VIRTIO_BLK_S_IOERR)
    assert os.pread(fd, 128 * 512, 0) == bytes(model)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, vpci.VIRTIO_BAR_SIZE - 4), st.sampled_from([1, 2, 4, 8]),
                                 st.integers(0, 2**64 - 1)), max_size=40))
def test_random_mmio_never_raises(image: tuple[int, bytes], writes: list[tuple[int, int, int]]) -> None:
    """A driver poking random BAR0 registers: the device survives (no exception, no hang)."""
    fd, data = image
    ram = SlotRam([(0, SLOT), (SLOT, SLOT)])
    drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
    drv.setup()
    for off, size, value in writes:
        drv.dev.mmio_write(0, off, size, value & ((1 << (8 * size)) - 1))
        drv.dev.mmio_read(0, off, size)
    for q in range(3):
        drv.dev.queue_notify(q)


# ---------------------------------------------------------------- limits, exactly


def test_chain_using_the_whole_ring(ram: SlotRam, image: tuple[int, bytes]) -> None:
    """A chain of exactly the queue's size is legal (header, 254 data buffers, status): the bound is not off by one."""
    fd, data = image
    drv = ready(ram, image)
    status, got, used = drv.request(vblk.VIRTIO_BLK_T_IN, 0, in_len=254 * 256, segments=254)
    assert status == vblk.VIRTIO_BLK_S_OK and got == data[:254 * 256] and used == 254 * 256 + 1
    assert not drv.dev.errors


def test_largest_indirect_table(ram: SlotRam, image: tuple[int, bytes]) -> None:
    fd, data = image
    drv = ready(ram, image)
    n = MAX_INDIRECT - 2
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 0, in_len=128 * 512, segments=n, indirect=True)
    assert status == vblk.VIRTIO_BLK_S_OK and got == data[:128 * 512]
    assert not drv.dev.errors


def test_masked_queue_vector_is_pending_until_unmasked(ram: SlotRam, image: tuple[int, bytes]) -> None:
    drv = ready(ram, image)
    table = drv.cfg(drv.msix_cap + 4, 4) & ~7
    drv.dev.mmio_write(0, table + 16 + 12, 4, 1)  # mask vector 1 (Linux does, moving the IRQ)
    hdr, st = drv.alloc(16), drv.alloc(1, 1)
    ram.write(hdr, struct.pack("<IIQ", vblk.VIRTIO_BLK_T_FLUSH, 0, 0))
    drv.offer(0, drv.chain(0, [(hdr, 16, False), (st, 1, True)]))
    drv.kick()
    assert drv.msis == [] and len(drv.used()) == 1
    assert drv.dev.mmio_read(0, vpci.MSIX_PBA_OFFSET, 8) == 0b10
    drv.dev.mmio_write(0, table + 16 + 12, 4, 0)
    assert drv.msis == [1] and drv.dev.mmio_read(0, vpci.MSIX_PBA_OFFSET, 8) == 0


def test_errors_reach_on_error_and_isr_without_vector(ram: SlotRam, image: tuple[int, bytes]) -> None:
    """With no configuration vector the error still shows: status, ISR bit 1, on_error."""
    drv = ready(ram, image)
    logged: list[str] = []
    drv.dev.on_error = logged.append
    drv.common("config_msix_vector", 2, NO_VECTOR)
    _, desc, _, _ = drv.queues[0]
    drv.put_desc(desc, 0, 2 * SLOT, 16, 0, 0)
    drv.offer(0, 0)
    drv.kick()
    assert drv.status() & vpci.STATUS_DEVICE_NEEDS_RESET and drv.msis == []
    assert drv.dev.mmio_read(0, vpci.ISR_OFFSET, 1) == vpci.ISR_CONFIG
    assert logged == list(drv.dev.errors) and "outside RAM" in logged[0]


_FIELD_VALUES = {
    0: st.sampled_from([0x9_0000, 0x9_0008, 0xA_0000, SLOT - 8, 2 * SLOT - 16, 2 * SLOT, 2**64 - 16]),  # addr
    1: st.sampled_from([0, 1, 8, 15, 17, 512, 4096, 48, vblk.SIZE_MAX + 1, 0xFFFF_FFFF]),  # len
    2: st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                        VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 0xFFFF]),  # flags
    3: st.integers(0, 300),  # next
}
_MUTATION = st.integers(0, 3).flatmap(lambda f: st.tuples(st.just(f), st.integers(0, 3), _FIELD_VALUES[f]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(indirect=st.booleans(), mutations=st.lists(_MUTATION, max_size=3),
       kind=st.sampled_from([0, 1, 4, 8, 11, 2**32 - 1]),
       sector=st.sampled_from([0, 1, 120, 127, 128, 2**63, 2**64 - 1]),
       heads=st.lists(st.integers(0, 300), max_size=2), avail_jump=st.sampled_from([0, 0, 0, 200, 300]))
def test_hostile_requests_never_escape(image: tuple[int, bytes], indirect: bool,
                                       mutations: list[tuple[int, int, int]], kind: int, sector: int,
                                       heads: list[int], avail_jump: int) -> None:
    """A valid request (header, 4 KiB, status; direct or indirect) with up to three descriptor fields
    replaced by hostile values, extra bogus heads, a runaway avail index: each kick ends (no exception,
    no hang) with the request served or the device in DEVICE_NEEDS_RESET, and the disk never grows."""
    fd, data = image
    os.pwrite(fd, data, 0)
    ram = SlotRam([(0, SLOT), (SLOT, SLOT)])
    drv = BlkDriver(blk_device(ram, fd, len(data)), ram)
    drv.setup()
    _, desc, avail, _ = drv.queues[0]
    ram.write(0x9_0000, struct.pack("<IIQ", kind, 0, sector))
    table = [[0x9_0000, 16, VIRTQ_DESC_F_NEXT, 1], [0xA_0000, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2],
             [0xB_0000, 1, VIRTQ_DESC_F_WRITE, 0], [0x9_0000, 16, 0, 0]]
    if kind == vblk.VIRTIO_BLK_T_OUT:
        table[1][2] = VIRTQ_DESC_F_NEXT
    for field, i, value in mutations:
        table[i][field] = value
    where = 0xC_0000 if indirect else desc
    for i, d in enumerate(table):
        drv.put_desc(where, i, *d)
    if indirect:
        drv.put_desc(desc, 0, 0xC_0000, 48, VIRTQ_DESC_F_INDIRECT, 0)
    drv.offer(0, 0)
    for h in heads:
        drv.offer(0, h)
    if avail_jump:
        ram.write(avail + 2, struct.pack("<H", avail_jump))
    drv.kick()
    drv.kick()
    status = drv.status()
    assert status & 0x0F == 0x0F
    if status & vpci.STATUS_DEVICE_NEEDS_RESET:
        assert drv.dev.errors and 0 in drv.msis
        event("device error")
    else:
        assert drv.used() and not drv.dev.errors
        event("served")
    assert os.fstat(fd).st_size == len(data)  # nothing written past the disk


def test_function_reset_is_power_on_state(ram: SlotRam, image: tuple[int, bytes]) -> None:
    """A machine reset: decoding off, BAR unassigned, MSI-X off and masked, virtio reset; then a new boot works."""
    drv = ready(ram, image)
    drv.changes.clear()
    drv.dev.function_reset()
    assert drv.dev.bars()[0].address == 0 and drv.cfg(pcif.BAR0, 4) == 0
    assert drv.cfg(pcif.COMMAND, 2) == 0
    assert not drv.dev.enabled and all(e.masked and e.address == 0 for e in drv.dev.msix_entries())
    assert drv.dev.status == 0 and not drv.dev.queues[0].enabled
    assert drv.changes == ["msix", "bars", "reset"]
    assert drv.cfg(pcif.VENDOR_ID, 4) == 0x1042_1AF4 and drv.cfg(pcif.CAPABILITIES_POINTER, 1) == 0x40
    drv.msis.clear()
    drv._next = 0x8_0000
    drv.setup()
    status, got, _ = drv.request(vblk.VIRTIO_BLK_T_IN, 2, in_len=512)
    assert status == vblk.VIRTIO_BLK_S_OK and got == image[1][1024:1536]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 0x1000), st.sampled_from([1, 2, 4, 3, 8]), st.integers(0, 2**32 - 1)),
                       max_size=60))
def test_config_writes_keep_identity_and_capabilities(ram: SlotRam, writes: list[tuple[int, int, int]]) -> None:
    """Whatever a guest writes to configuration space, the identity, the capability chain and the
    BAR flag bits read as built, and nothing raises."""
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        dev = blk_device(ram, fd, 1 << 20)
        snapshot = [dev.config_read(off, 4) for off in range(0, 0x40, 4) if off not in (0x04, 0x0C, 0x10, 0x3C)]
        caps = []
        ptr = dev.config_read(pcif.CAPABILITIES_POINTER, 1)
        while ptr:
            caps.append((ptr, dev.config_read(ptr, 1)))
            ptr = dev.config_read(ptr + 1, 1)
        for off, size, value in writes:
            dev.config_write(off, size, value & ((1 << (8 * size)) - 1))
            dev.config_read(off, size)
        assert [dev.config_read(off, 4) for off in range(0, 0x40, 4) if off not in (0x04, 0x0C, 0x10, 0x3C)] == snapshot
        assert dev.config_read(pcif.BAR0, 4) & 0x7FFF == 0
        again = []
        ptr = dev.config_read(pcif.CAPABILITIES_POINTER, 1)
        while ptr:
            again.append((ptr, dev.config_read(ptr, 1)))
            ptr = dev.config_read(ptr + 1, 1)
        assert again == caps
    finally:
        os.close(fd)


def test_reset_lets_guest_memory_close(image: tuple[int, bytes]) -> None:
    """Enabled queues hold views of the rings; a reset drops them, so the engine can unmap guest RAM."""
    ram = SlotRam([(0, SLOT), (SLOT, SLOT)])
    drv = ready(ram, image)
    drv.request(vblk.VIRTIO_BLK_T_IN, 0, in_len=512)
    with pytest.raises(BufferError):
        ram.close()
    drv.dev.function_reset()
    ram.close()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 24), in_order=st.booleans(), data=st.data())
def test_an_in_order_indirect_table_reads_as_the_descriptor_loop_reads_it(n: int, in_order: bool,
                                                                          data: st.DataObject) -> None:
    """The queue's one-pass reading of a Linux-shaped indirect table (`_in_order`) gives the
    chain, or the refusal, that the descriptor-by-descriptor loop gives for the same table."""
    from numavm.devices.virtio import queue as vq

    ram = SlotRam([(0, 0x4000), (0x4000, 0x4000)])
    ram.write(0, os.urandom(0x8000))  # every byte different: equal views are views of one place
    entries = []
    for k in range(n):
        flags = data.draw(st.sampled_from([0, 1, 2, 3, 1, 3, 4, 5]), "flags")
        nxt = k + 1 if in_order else data.draw(st.integers(0, n), "next")
        addr = data.draw(st.integers(0, 0x7F00), "addr")
        length = data.draw(st.integers(0, 0x900), "length")
        entries.append(struct.pack("<QIHH", addr, length, flags, nxt))
    results = []
    for threshold in (1, 1 << 30):  # the one-pass reading, then the loop alone
        q = Virtqueue(ram, 0, 8, max_segment=0x800)
        q.indirect = True
        q.desc, q.driver, q.device = 0x6000, 0x6200, 0x6400
        q.enable()
        ram.write(0x7000, b"".join(entries))
        ram.write(0x6000, struct.pack("<QIHH", 0x7000, 16 * n, VIRTQ_DESC_F_INDIRECT, 0))
        ram.write(0x6200, struct.pack("<HHH", 0, 1, 0))
        old, vq._IN_ORDER_FROM = vq._IN_ORDER_FROM, threshold
        try:
            chain = q.pop()
            assert chain is not None
            results.append(([bytes(v) for v in chain.readable], [bytes(v) for v in chain.writable],
                            chain.descriptors))
        except VirtqueueError:
            results.append("refused")
        finally:
            vq._IN_ORDER_FROM = old
            q.reset()
    event(f"{'in order' if in_order else 'any order'}: {'refused' if results[1] == 'refused' else 'served'}")
    assert results[0] == results[1]
