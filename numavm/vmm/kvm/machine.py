"""The machine on KVM: assembles memory, vCPUs and devices, and runs them.

One host memory segment per domain (numavm.host.memory) becomes one KVM slot per
guest range; one Python thread per vCPU runs KVM_RUN (which releases the
GIL); exits are dispatched to the device models by port.  Any vCPU can end
the machine (power-off, reset, triple fault, emulation failure, error); then
every vCPU is kicked out of KVM_RUN, joined, and every fd, mapping and
thread is released, on every path.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from numavm.vmm.kvm import cpu as cpumode
from numavm.plan.acpi import build_tables
from numavm.plan.cpuid import vcpu_cpuid
from numavm.devices import IoBus, IrqLines, PowerEvent, Serial16550, attach_power_devices
from numavm.errors import NumavmError
from numavm.vmm.kvm.ioctls import (DEVICE_CAPS, RUN_MMIO_DATA, RUN_WORD_EXIT_REASON, RUN_WORD_IO, RUN_WORD_IO_COUNT,
                                   RUN_WORD_IO_DATA_OFFSET, RUN_WORD_MMIO_ADDR, RUN_WORD_MMIO_IS_WRITE, RUN_WORD_MMIO_LEN,
                                   Kvm, KvmExit, KvmInternalError, KvmIoctlError, KvmIoDirection, MpState, Vcpu, Vm)
from numavm.plan.layout import (COM1_PORT, COM2_IRQ, COM2_PORT, COM3_IRQ, COM3_PORT, CONSOLE_UARTS, LAPIC_ADDR,
                                STREAM_UARTS, Layout)
from numavm.host.memory import GuestMemory, policy_cpus
from numavm.spec.policy import Mode
from numavm.vmm.run import PANIC_RE, GuestRun, Outcome, RunResult, prefault_for

if TYPE_CHECKING:
    from numavm.host.disk import DiskImage
    from numavm.devices.virtio.device import VirtioDevice
    from numavm.plan.pci import PciDevice
    from numavm.spec.shares import Share
    from numavm.vmm.kvm.pci import PciPlatform

# KVM's private pages for VMX (TSS and identity map), in the 3-4 GiB hole,
# clear of the IOAPIC and LAPIC.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000
KICK_SIGNAL = signal.SIGUSR1
_INT3 = 0xCC
_BP_VECTOR = 3

_PANIC_WORDS = b"Kernel panic"

# Exits are counted per vCPU in a list indexed by exit reason (no string keys
# on the hot path); RunResult.exits names them.  Reasons past the list (none
# known today) are counted by name in KvmMachine._other_exits.
_EXIT_SLOTS = 64
_EXIT_NAMES = {int(e): e.name.lower() for e in KvmExit}


def emulation_failure_text(data: tuple[int, ...], rip: int) -> str:
    """KVM's emulation-failure report: flags, then insn_size and up to 15 bytes."""
    if len(data) >= 3 and data[0] & 1:  # KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        raw = struct.pack("<QQ", data[1], data[2])
        insn = raw[1:1 + min(raw[0], 15)]
        return f"guest RIP {rip:#x}, instruction bytes {insn.hex(' ')}"
    return f"guest RIP {rip:#x} (no instruction bytes reported)"


class KvmMachine:
    """A VM on /dev/kvm built from a Layout.  Use as a context manager."""

    def __init__(self, layout: Layout, *, name: str = "numavm",
                 console: Callable[[bytes], None] | None = None,
                 stdout: Callable[[bytes], None] | None = None,
                 stderr: Callable[[bytes], None] | None = None,
                 pin: bool = True, hugepages: str | None = None,
                 kvm_path: str = "/dev/kvm", cpuid: bool = True,
                 disks: Sequence[DiskImage] | None = None,
                 shares: Sequence[Share] = (),
                 log: Callable[[str], None] | None = None) -> None:
        """`stdout`/`stderr`: given, the machine gets UARTs at COM2 and COM3 too (the guest
        command's streams, see numavm.guest.initramfs), whose output goes to them.

        `disks`: the machine's disk images, opened (numavm.host.disk.open_disks), one per
        `layout.topology.disks` in order; the caller keeps them and closes them.  Without
        them a machine whose layout has disks opens them itself, first of all, and closes
        them with itself.  `shares`: the run's shared directories (numavm.spec.shares), one per
        virtio-9p device of `layout.pci` (numavm.plan.layout.with_shares), served by numavm's
        own 9p server; the machine opens each directory first of all and closes it last.
        `log`: numavm's own lines (a device the guest misprogrammed)."""
        self.layout = layout
        self.name = name
        self.pin = pin
        self._console = console or (lambda data: None)
        self._stream_sinks = None if stdout is None and stderr is None else (
            stdout or (lambda data: None), stderr or (lambda data: None))
        self._console_tail = b""  # for a panic line split across flushes
        self._stop = threading.Event()
        self._stopping = False  # the vCPU loops' cheap view of _stop
        self._outcome: tuple[Outcome, str] | None = None
        self._outcome_lock = threading.Lock()
        self._io_lock = threading.Lock()  # the device models are not thread-safe
        self._threads: list[threading.Thread] = []
        self._aux: list[threading.Thread] = []  # helpers (stdin reader) joined at the end
        self._exits: list[list[int]] = []  # per vCPU: count per exit reason
        self._other_exits: Counter[str] = Counter()  # reasons >= _EXIT_SLOTS
        self._ran: set[int] = set()
        self.memory: GuestMemory | None = None
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.vcpus: list[Vcpu] = []
        self.pci: PciPlatform | None = None  # only when the layout has devices
        self.disks: list[DiskImage] = list(disks) if disks is not None else []
        self._own_disks = disks is None
        self.shares = tuple(shares)
        self._share_fds: list[int] = []  # O_PATH roots, open from first to last (numavm.host.shares)
        self._nofile: tuple[int, int] | None = None  # RLIMIT_NOFILE to put back
        self._max_fids = 0  # each 9p server's, as RLIMIT_NOFILE allows
        self._log = log or (lambda line: None)
        try:
            self._build(hugepages, kvm_path, cpuid)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ assembly

    def _build(self, hugepages: str | None, kvm_path: str, use_cpuid: bool) -> None:
        layout = self.layout
        if layout.pci and self._own_disks:
            # Before anything is allocated: a missing or locked image is the user's mistake.
            from numavm.host.disk import open_disks
            self.disks = open_disks(layout.topology.disks)
        if len(self.disks) != len(layout.topology.disks):
            raise NumavmError(f"{len(self.disks)} disk images for {len(layout.topology.disks)} disks")
        if self.shares:
            from numavm.plan.pci import VIRTIO_9P
            planned = len(layout.pci.of_kind(VIRTIO_9P))
            if planned != len(self.shares):
                raise NumavmError(f"{len(self.shares)} shares for {planned} planned 9p devices")
            from numavm.host.shares import WANT_FIDS, fid_budget, open_roots
            self._share_fds = open_roots(self.shares)  # before anything is allocated, as the disks
            self._max_fids, self._nofile = fid_budget(len(self.shares), WANT_FIDS)
        # Memory first: a bad policy is refused before KVM is even opened.
        # Private anonymous memory: no other process maps it, and it gets THP (see `Anonymous`).
        self.memory = GuestMemory(layout, machine=self.name, hugepages=hugepages, shared=False)
        self.kvm = Kvm(kvm_path)
        if layout.topology.cpus > self.kvm.max_vcpus:
            raise NumavmError(f"-c/--cpus: this host's KVM allows at most {self.kvm.max_vcpus} vCPUs")
        if max(layout.apic_ids) >= self.kvm.max_vcpu_id:
            raise NumavmError(f"APIC id {max(layout.apic_ids)} exceeds this KVM's limit "
                              f"({self.kvm.max_vcpu_id - 1})")
        vm = self.vm = self.kvm.create_vm()
        vm.set_tss_addr(KVM_TSS_ADDR)
        vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        x2apic = layout.needs_x2apic and use_cpuid
        if x2apic:  # APIC ids past 254: 32-bit ids, and 0xFF no longer means broadcast
            vm.enable_x2apic_api()
        for region in self.memory.regions():
            vm.set_user_memory_region(*region)
        vm.set_boot_cpu_id(layout.apic_ids[0])
        supported = self.kvm.supported_cpuid() if use_cpuid else []
        for index, apic in enumerate(layout.apic_ids):
            vcpu = vm.create_vcpu(apic)
            self.vcpus.append(vcpu)
            if use_cpuid:
                vcpu.set_cpuid(vcpu_cpuid(supported, layout, index))
            if x2apic:  # after the CPUID: KVM takes x2APIC mode only with the CPUID bit
                vcpu.set_msrs({cpumode.MSR_IA32_APIC_BASE: cpumode.x2apic_base(index == 0, LAPIC_ADDR)})
        uarts = CONSOLE_UARTS if self._stream_sinks is None else STREAM_UARTS
        for addr, blob in build_tables(layout, uarts).placements():
            self.memory.write(addr, blob)
        self.bus = IoBus()
        self.irq_lines = IrqLines(self._irq)  # COM1 and COM3 share IRQ 4
        self.serial = Serial16550(self._console_out, self.irq_lines.source())
        self.bus.register(COM1_PORT, 8, self.serial)
        self.uarts = [self.serial]
        self.stdout_serial: Serial16550 | None = None
        if self._stream_sinks is not None:
            out, err = self._stream_sinks
            self.stdout_serial = Serial16550(out, self.irq_lines.source(), irq_line=COM2_IRQ)
            stderr_serial = Serial16550(err, self.irq_lines.source(), irq_line=COM3_IRQ)
            self.bus.register(COM2_PORT, 8, self.stdout_serial)
            self.bus.register(COM3_PORT, 8, stderr_serial)
            self.uarts += [self.stdout_serial, stderr_serial]
        self.power = attach_power_devices(self.bus, self._power_event)
        if layout.pci:
            self._build_pci(x2apic)

    def _build_pci(self, x2apic: bool) -> None:
        """The PCI platform (numavm.vmm.kvm.pci), a virtio-blk function per disk and a virtio-9p
        function per share.  Only for a machine with devices: one without keeps KVM's default
        routes and no device threads."""
        from numavm.devices.virtio import VirtioPciDevice
        from numavm.plan.pci import CONFIG_ADDRESS_PORT
        from numavm.vmm.kvm.pci import PciPlatform

        assert self.kvm is not None and self.vm is not None and self.memory is not None
        self.kvm.require(DEVICE_CAPS, "the machine's PCI devices")
        functions: list[VirtioPciDevice] = []
        try:
            for dev in self.layout.pci.devices:
                device, what = self._device_model(dev)
                fn = VirtioPciDevice(device, self.memory)
                fn.on_error = self._device_error_log(f"{dev.kind} {dev.bdf} ({what})")
                functions.append(fn)
            self.pci = PciPlatform(self.vm, self.layout.pci, functions, name=self.name, x2apic=x2apic,
                                   cpus_of=self._domain_cpus,
                                   on_error=lambda line: self.stop(Outcome.ERROR, line))
        except BaseException:
            for fn in functions:  # the platform never took them: what they hold goes here
                fn.close()
            raise
        self.bus.register(CONFIG_ADDRESS_PORT, 8, self.pci.config_ports())

    def _device_model(self, dev: PciDevice) -> tuple[VirtioDevice, str]:
        """The device type for one planned function, and what names it in the log."""
        from numavm.devices.virtio import VirtioBlk
        from numavm.plan.pci import VIRTIO_9P, VIRTIO_BLK

        if dev.kind == VIRTIO_BLK:
            image = self.disks[dev.index]
            return VirtioBlk(image.fd, image.size, readonly=image.readonly, serial=f"numavm{dev.index}"), str(image.path)
        if dev.kind == VIRTIO_9P:
            from numavm.devices.virtio.p9 import Virtio9p
            from numavm.host.libc import openat2
            from numavm.host.shares import option_of

            share = self.shares[dev.index]
            try:
                # Every share crosses the host's mounts inside it, as the host's own path lookup
                # does and as QEMU's 9p does under TCG (numavm.spec.shares): one view on both engines.
                return Virtio9p(self._share_fds[dev.index], share.tag, readonly=not share.rw, openat2=openat2,
                                max_fids=self._max_fids, cross_mounts=True), share.host
            except OSError as e:
                raise NumavmError(f"{option_of(share)}: the KVM engine's 9p server cannot serve it here: "
                                  f"{e.strerror or e} (it needs openat2, Linux 5.6+, and /proc/self/fd); "
                                  f"use --accel tcg") from None
        raise NumavmError(f"{dev.kind} at {dev.bdf}: the KVM engine has no such device model")

    def _device_error_log(self, what: str, shown: int = 4) -> Callable[[str], None]:
        """A device's protocol errors (a driver that misprogrammed it) to the log: the first
        few, then one line saying more came; the device itself keeps counting them."""
        count = 0

        def on_error(reason: str) -> None:
            nonlocal count
            count += 1
            if count <= shown:
                self._log(f"numavm: {what}: the guest's driver broke the protocol: {reason} "
                          "(the device waits for a reset)")
            elif count == shown + 1:
                self._log(f"numavm: {what}: more protocol errors, not shown")
        return on_error

    def _console_out(self, data: bytes) -> None:
        """Guest console output (a line at a time): to the console, and watched for a panic."""
        self._console(data)
        tail = self._console_tail + data
        self._console_tail = tail[-256:]
        at = tail.find(_PANIC_WORDS)
        if at >= 0 and b"\n" in tail[at:]:
            m = PANIC_RE.search(tail[at:].decode(errors="replace"))
            self._console_tail = b""
            self.stop(Outcome.PANIC, f"guest kernel panic: {m.group(1).strip() if m else ''}".rstrip(": "))

    def _irq(self, line: int, level: bool) -> None:
        assert self.vm is not None
        self.vm.irq_line(line, 1 if level else 0)

    def _power_event(self, event: str) -> None:
        if event == PowerEvent.POWEROFF:
            self.stop(Outcome.POWEROFF, "guest powered off (ACPI S5)")
        else:
            self.stop(Outcome.RESET, f"guest asked for a reset ({event})")

    # ------------------------------------------------------------ loading

    def load(self, writes: Iterable[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Copy (guest-physical address, data) pairs into guest memory."""
        assert self.memory is not None
        for addr, data in writes:
            self.memory.write(addr, data)

    def set_boot_state(self, state: cpumode.CpuState) -> None:
        """The boot vCPU starts here; the others wait for INIT/SIPI, as on hardware."""
        self.vcpus[0].load_cpu_state(state)

    def start_all(self, state_for: Callable[[int], cpumode.CpuState]) -> None:
        """Every vCPU starts running at once (small guest programs, no SIPI: bench/ and tests)."""
        for index, vcpu in enumerate(self.vcpus):
            vcpu.load_cpu_state(state_for(index))
            vcpu.set_mp_state(MpState.RUNNABLE)

    def read_input_from(self, fd: int) -> None:
        """Feed the guest from a host fd (an interactive stdin) until the run ends: the
        command port (COM2) when the machine has one, else the console."""
        import select

        def reader() -> None:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.1)
                if ready:
                    data = os.read(fd, 4096)
                    if not data:
                        return
                    self.feed_input(data)

        t = threading.Thread(target=reader, name=f"{self.name}-stdin", daemon=True)
        self._aux.append(t)
        t.start()

    def feed_input(self, data: bytes) -> None:
        """Host input for the guest's serial console."""
        with self._io_lock:
            (self.stdout_serial or self.serial).feed(data)

    # ------------------------------------------------------------ running

    def stop(self, outcome: Outcome, detail: str) -> None:
        """End the run from any thread; the first reason given wins."""
        with self._outcome_lock:
            if self._outcome is None:
                self._outcome = (outcome, detail)
        self._stopping = True
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, timeout: float | None = None, on_start: Callable[[], None] | None = None) -> RunResult:
        """Run every vCPU until one ends the machine, `stop()` or the timeout; `on_start` is
        called (in this thread) once the vCPUs run."""
        if threading.current_thread() is not threading.main_thread():
            raise NumavmError("KvmMachine.run must be called from the main thread (it handles signals)")
        start = time.monotonic()
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        old[KICK_SIGNAL] = signal.signal(KICK_SIGNAL, lambda *_: None)  # only to interrupt KVM_RUN
        try:
            if self.pci is not None:
                self.pci.start()
            for index, vcpu in enumerate(self.vcpus):
                exits = [0] * _EXIT_SLOTS
                self._exits.append(exits)
                t = threading.Thread(target=self._vcpu_thread, args=(index, vcpu, exits),
                                     name=f"{self.name}-vcpu{index}", daemon=True)
                self._threads.append(t)
                t.start()
            if on_start is not None:
                on_start()
            deadline = None if timeout is None else start + timeout
            # Short waits keep the main thread responsive to SIGINT/SIGTERM.
            while not self._stop.wait(0.05):
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop(Outcome.TIMEOUT, f"no end after {timeout:g} s")
            self._join_vcpus()
            for t in self._aux:
                t.join()
            self._aux.clear()
        finally:
            if self.pci is not None:
                self.pci.stop()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        with self._io_lock:
            for uart in self.uarts:
                uart.flush()
        outcome, detail = self._outcome or (Outcome.STOPPED, "stopped")
        assert self.memory is not None
        total: Counter[str] = Counter(self._other_exits)
        for counts in self._exits:
            for reason, n in enumerate(counts):
                if n:
                    total[_EXIT_NAMES.get(reason, str(reason))] += n
        return RunResult(outcome, detail, time.monotonic() - start, total,
                         Counter(self.bus.unhandled_reads), Counter(self.bus.unhandled_writes),
                         frozenset(self._ran), self.memory.describe())

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop(Outcome.INTERRUPTED, f"stopped by {signal.Signals(signum).name}")

    def _join_vcpus(self) -> None:
        for vcpu, t in zip(self.vcpus, self._threads):
            while t.is_alive():
                vcpu.immediate_exit = True
                if t.ident is not None:
                    try:
                        signal.pthread_kill(t.ident, KICK_SIGNAL)
                    except ProcessLookupError:
                        pass  # the thread ended between the check and the kick
                t.join(0.05)
        self._threads.clear()

    def _pin(self, index: int) -> None:
        """Keep a vCPU on the host CPUs of its domain's policy nodes."""
        cpus = self._domain_cpus(self.layout.topology.domain_of_cpu(index).id)
        if cpus:
            os.sched_setaffinity(0, cpus)  # 0 = this thread on Linux

    def _domain_cpus(self, domain: int) -> tuple[int, ...]:
        """Where a domain's threads run (its vCPUs, its devices' I/O threads): the host CPUs of
        its policy's nodes; () for no pinning (--no-pin, or a policy without nodes)."""
        if not self.pin:
            return ()
        pol = self.layout.topology.domains[domain].policy
        if pol.mode in (Mode.DEFAULT, Mode.LOCAL) or not pol.nodes:
            return ()
        return policy_cpus(pol.nodes)  # the prefault threads' CPUs too

    def _vcpu_thread(self, index: int, vcpu: Vcpu, exits: list[int]) -> None:
        unhandled_reads: dict[int, int] = {}  # plain dicts: a Counter's += is slower
        unhandled_writes: dict[int, int] = {}
        try:
            self._pin(index)
            self._ran.add(vcpu.apic_id)
            self._vcpu_loop(vcpu, exits, unhandled_reads, unhandled_writes)
        except BaseException as e:  # any failure ends the machine, with its reason
            self.stop(Outcome.ERROR, f"vCPU {index}: {e}")
        finally:
            with self._io_lock:
                self.bus.count_unhandled(unhandled_reads, unhandled_writes)

    def _vcpu_loop(self, vcpu: Vcpu, exits: list[int], unhandled_reads: dict[int, int],
                   unhandled_writes: dict[int, int]) -> None:
        """KVM_RUN and dispatch until the machine stops.

        The hot path is a port access of count 1 (the UART, the ACPI ports,
        a guest poking an absent port): the exit is read as words straight
        from the kvm_run page, the port looked up in the bus's table, and the
        device called under the I/O lock; an absent port touches no device,
        so it is counted without the lock, in this vCPU's own counters (handed
        to the bus when the loop ends).  No object is made per exit and
        everything is bound to locals.
        """
        kvm_run, page, words = vcpu.kvm_run, vcpu.page, vcpu.words
        find_reader, find_writer = self.bus.lookups()
        acquire, release = self._io_lock.acquire, self._io_lock.release
        from_bytes = int.from_bytes
        reads_get, writes_get = unhandled_reads.get, unhandled_writes.get
        IO, INTR, OUT, MMIO = int(KvmExit.IO), int(KvmExit.INTR), int(KvmIoDirection.OUT), int(KvmExit.MMIO)
        REASON, IO_HEAD, IO_COUNT, IO_DATA = (RUN_WORD_EXIT_REASON, RUN_WORD_IO, RUN_WORD_IO_COUNT,
                                              RUN_WORD_IO_DATA_OFFSET)
        M_ADDR, M_LEN, M_WRITE, M_DATA = RUN_WORD_MMIO_ADDR, RUN_WORD_MMIO_LEN, RUN_WORD_MMIO_IS_WRITE, RUN_MMIO_DATA
        # MMIO: the PCI platform's (ECAM, BARs; it locks the device it calls), else nothing
        # decodes: reads float high, writes go nowhere.
        mmio_read = self.pci.mmio_read if self.pci is not None else _floating_read
        mmio_write = self.pci.mmio_write if self.pci is not None else _dropped_write
        slots = len(exits)
        while not self._stopping:
            try:
                kvm_run()
            except InterruptedError:  # a kick (or any signal)
                exits[INTR] += 1
                continue
            except BlockingIOError:
                # EAGAIN: this vCPU waits for INIT/SIPI (MP state UNINITIALIZED); KVM_RUN
                # blocked until an event came and the vCPU is still not running: run again.
                continue
            except OSError as e:
                raise KvmIoctlError(e.errno or 0, "KVM_RUN") from None
            reason = words[REASON]
            if reason == IO:  # the hot path: keep it short
                exits[IO] += 1
                head = words[IO_HEAD]  # direction | size << 8 | port << 16
                if words[IO_COUNT] != 1:
                    self._string_io(page, head & 0xFF == OUT, head >> 8 & 0xFF, head >> 16,
                                    words[IO_COUNT], words[IO_DATA])
                elif head & 0xFF == OUT:
                    port = head >> 16
                    entry = find_writer(port)
                    if entry is None:
                        unhandled_writes[port] = writes_get(port, 0) + 1
                        continue
                    size, offset = head >> 8 & 0xFF, words[IO_DATA]
                    value = page[offset] if size == 1 else from_bytes(page[offset:offset + size], "little")
                    acquire()
                    try:
                        entry[0](entry[1], size, value)
                    finally:
                        release()
                else:
                    port, size, offset = head >> 16, head >> 8 & 0xFF, words[IO_DATA]
                    reader = find_reader(port)
                    if reader is None:  # a floating bus reads all-ones
                        unhandled_reads[port] = reads_get(port, 0) + 1
                        value = (1 << (size << 3)) - 1
                    else:
                        acquire()
                        try:
                            value = reader[0](reader[1], size)
                        finally:
                            release()
                    if size == 1:
                        page[offset] = value
                    else:
                        page[offset:offset + size] = value.to_bytes(size, "little")
            elif reason == MMIO:  # config space and BAR registers; queue notifies never exit
                exits[MMIO] += 1
                addr, size = words[M_ADDR] | words[M_ADDR + 1] << 32, words[M_LEN]
                if words[M_WRITE] & 0xFF:
                    mmio_write(addr, size, from_bytes(page[M_DATA:M_DATA + size], "little"))
                else:
                    page[M_DATA:M_DATA + size] = mmio_read(addr, size).to_bytes(size, "little")
            elif reason == INTR:
                exits[INTR] += 1
            elif reason < slots:
                exits[reason] += 1
                self._other_exit(vcpu, reason)
            else:
                with self._outcome_lock:
                    self._other_exits[str(reason)] += 1
                self._other_exit(vcpu, reason)

    def _string_io(self, page: memoryview, out: bool, size: int, port: int, count: int,
                   offset: int) -> None:
        """ins/outs (and rep): `count` accesses of `size` bytes, data end to end in the page."""
        bus = self.bus
        with self._io_lock:
            if out:
                for k in range(offset, offset + size * count, size):
                    bus.write(port, size, int.from_bytes(page[k:k + size], "little"))
            else:
                for k in range(offset, offset + size * count, size):
                    page[k:k + size] = bus.read(port, size).to_bytes(size, "little")

    def _other_exit(self, vcpu: Vcpu, reason: int) -> None:
        self._slow_exit(vcpu, vcpu.exit_reason)

    def _slow_exit(self, vcpu: Vcpu, reason: KvmExit | int) -> None:
        if reason == KvmExit.HLT:
            return  # only without an in-kernel LAPIC; ours has one
        if reason == KvmExit.SHUTDOWN:
            self.stop(Outcome.TRIPLE_FAULT, f"vCPU {vcpu.apic_id}: triple fault (shutdown) at RIP "
                                            f"{vcpu.get_regs().rip:#x}")
        elif reason == KvmExit.SYSTEM_EVENT:
            ev = vcpu.system_event()
            kind = getattr(ev.type, "name", str(ev.type))
            if kind == "SHUTDOWN":
                self.stop(Outcome.POWEROFF, "guest powered off")
            elif kind == "RESET":
                self.stop(Outcome.RESET, "guest asked for a reset")
            elif kind == "CRASH":
                self.stop(Outcome.PANIC, "guest reported a crash")
            else:
                self.stop(Outcome.ERROR, f"vCPU {vcpu.apic_id}: system event {kind}")
        elif reason == KvmExit.INTERNAL_ERROR:
            err = vcpu.internal_error()
            rip = vcpu.get_regs().rip
            if err.suberror == KvmInternalError.EMULATION:
                if self._emulate_int3(vcpu, err.data, rip):
                    return
                self.stop(Outcome.EMULATION_FAILURE,
                          f"vCPU {vcpu.apic_id}: KVM could not emulate an instruction: "
                          + emulation_failure_text(err.data, rip))
            else:
                self.stop(Outcome.ERROR, f"vCPU {vcpu.apic_id}: KVM internal error {err.suberror!r} at RIP {rip:#x}")
        elif reason == KvmExit.FAIL_ENTRY:
            f = vcpu.fail_entry()
            self.stop(Outcome.ERROR, f"vCPU {vcpu.apic_id}: VM entry failed "
                                     f"(reason {f.hardware_entry_failure_reason:#x})")
        else:
            self.stop(Outcome.ERROR, f"vCPU {vcpu.apic_id}: unexpected KVM exit {reason!r}")

    def _emulate_int3(self, vcpu: Vcpu, data: tuple[int, ...], rip: int) -> bool:
        """An emulating KVM may fail on int3; deliver the #BP it means, as the CPU would."""
        if not (len(data) >= 3 and data[0] & 1):
            return False
        raw = struct.pack("<QQ", data[1], data[2])
        if raw[0] < 1 or raw[1] != _INT3:
            return False
        regs = vcpu.get_regs()
        regs.rip = rip + 1  # #BP is a trap: it reports the address after int3
        vcpu.set_regs(regs)
        events = vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = _BP_VECTOR
        events.exception.has_error_code = 0
        vcpu.set_vcpu_events(events)
        return True

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Release vCPUs, the VM, /dev/kvm and guest memory; safe to call twice."""
        if self._threads:
            self._stopping = True
            self._stop.set()
            self._join_vcpus()
        pci, self.pci = self.pci, None
        if pci is not None:  # its threads and models hold guest memory views: before the memory goes
            pci.close()
        vm, self.vm = self.vm, None
        if vm is not None:
            vm.close()
        self.vcpus = []
        kvm, self.kvm = self.kvm, None
        if kvm is not None:
            kvm.close()
        memory, self.memory = self.memory, None
        if memory is not None:
            memory.close()
        if self._own_disks:
            disks, self.disks = self.disks, []
            for disk in disks:
                disk.close()
        if self._share_fds or self._nofile is not None:  # after the 9p devices closed their fids
            from numavm.host.shares import close_roots, restore_nofile
            fds, self._share_fds = self._share_fds, []
            close_roots(fds)
            nofile, self._nofile = self._nofile, None
            restore_nofile(nofile)

    def __enter__(self) -> "KvmMachine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _floating_read(addr: int, size: int) -> int:
    return (1 << (size << 3)) - 1


def _dropped_write(addr: int, size: int, value: int) -> None:
    pass


# KVM's in-kernel IOAPIC takes an 8-bit destination: the extended destination id a
# Linux guest writes (KVM_FEATURE_MSI_EXT_DEST_ID) in RTE bits 49-55 is dropped, so an
# interrupt routed to APIC id 256 would reach APIC id 0 and be lost.  The guest routes
# its device interrupts to the boot vCPU (APIC id 0) instead.
X2APIC_IRQ_CMDLINE = "irqaffinity=0"


def x2apic_cmdline(layout: Layout, cmdline: str) -> str:
    """`cmdline`, plus `X2APIC_IRQ_CMDLINE` for a machine with APIC ids past 254 unless
    the line already sets an irqaffinity."""
    if not layout.needs_x2apic or "irqaffinity=" in cmdline:
        return cmdline
    return f"{cmdline} {X2APIC_IRQ_CMDLINE}".strip()


def shares_layout(layout: Layout, shares: Sequence[Share]) -> Layout:
    """The run's layout on this engine: the machine's, plus a virtio-9p PCI device per share
    (numavm.plan.layout.with_shares: the e820 map, MCFG and DSDT follow); ConfigError when
    they do not fit."""
    from numavm.plan.layout import with_shares
    try:
        return with_shares(layout, len(shares))
    except ValueError as e:
        from numavm.errors import ConfigError
        raise ConfigError(f"--share: {e} on the KVM engine") from None


def run_linux(run: GuestRun, pin: bool = True) -> RunResult:
    """The KVM engine's run: the run's kernel loaded as numavm.plan.boot plans it, in long mode."""
    from numavm.plan.boot import load_kernel, plan_boot

    layout = shares_layout(run.layout, run.shares)
    kernel = load_kernel(run.kernel)
    plan = plan_boot(layout, kernel, run.initrd, x2apic_cmdline(layout, run.cmdline))
    # the boot CPU's page tables, then its GDT: in the scratch area the plan leaves free
    page_tables = plan.scratch.start
    tables = cpumode.identity_page_tables(page_tables)
    gdt = page_tables + 0x6000
    assert page_tables + len(tables) <= gdt and gdt + len(cpumode.gdt_bytes()) <= plan.scratch.end
    with KvmMachine(layout, console=run.console, stdout=run.stdout, stderr=run.stderr, pin=pin,
                    hugepages=run.hugepages, disks=run.disks or None, shares=run.shares, log=run.log) as m:
        if run.watch is not None:
            run.watch.stop = m.stop
        assert m.memory is not None
        prefault_for(run, m.memory)
        if run.input_fd is not None:
            m.read_input_from(run.input_fd)
        m.load(plan.writes)
        m.load([(page_tables, tables), (gdt, cpumode.gdt_bytes())])
        m.set_boot_state(cpumode.long_mode_state(page_tables, gdt, plan.rip, rsi=plan.rsi))
        del plan, kernel  # loaded: the kernel file's mapping can go
        return m.run(timeout=run.timeout, on_start=run.on_start)
