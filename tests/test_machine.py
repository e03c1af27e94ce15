"""The machine on real KVM: small guest programs prove memory routing and vCPUs.

Every vCPU runs, in 64-bit mode, a program that writes a signature at the
first and last byte of every guest range of every domain, then reports its
APIC id (read from its own LAPIC) through a port.  The test then reads the
host segments: each write landed in the right domain's segment at the
right offset, nothing landed anywhere else, every vCPU ran.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time

import pytest

from numavm.host.memory import Segment
from numavm.host.memory.audit import resident_runs
from numavm.vmm.kvm import cpu as cpumode
from numavm.plan.acpi import build_tables
from numavm.vmm.engine import detect
from numavm.plan.layout import Layout, plan_layout
from numavm.vmm.kvm.machine import KvmMachine
from numavm.vmm.run import Outcome
from numavm.spec.topology import MachineSpec, parse_distance, parse_numa

from kvmtest import with_regs  # noqa: E402

host = detect()
pytestmark = pytest.mark.skipif(not host.kvm_usable, reason=f"needs a usable /dev/kvm: {host.reason}")

PAGE = 4096
GDT_ADDR = 0x7000
PROGRAM_ADDR = 0x8000
TABLE_ADDR = 0x9000
PT_ADDR = 0x10000
REPORT_PORT = 0x90
SIGNATURE = 0x5A

# rsi = table of guest addresses, rcx = how many (> 0), dl = signature.
PROGRAM = bytes.fromhex(
    "488b06"          # loop: mov rax, [rsi]
    "8810"            #       mov [rax], dl
    "4883c608"        #       add rsi, 8
    "48ffc9"          #       dec rcx
    "75f2"            #       jnz loop
    "48bb200e0efe00000000"  # mov rbx, 0xfe0e0e20 (patched below)
    "8b03"            #       mov eax, [rbx]        ; LAPIC ID register
    "c1e818"          #       shr eax, 24
    "e7" + f"{REPORT_PORT:02x}" +  # out REPORT_PORT, eax
    "f4"              # halt: hlt
    "ebfd"            #       jmp halt
)
PROGRAM = PROGRAM.replace(struct.pack("<Q", 0xFE0E0E20), struct.pack("<Q", 0xFEE00020))


class Reporter:
    """A port that collects each vCPU's report and stops the machine after the last."""

    def __init__(self, machine: KvmMachine, expected: int) -> None:
        self.machine, self.expected = machine, expected
        self.ids: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.ids.append(value)
        if len(self.ids) == self.expected:
            self.machine.stop(Outcome.STOPPED, "every vCPU reported")


def targets(layout: Layout) -> list[int]:
    return [a for d in layout.domains for r in d.ranges for a in (r.start, r.end - 1)]


def populated_pages(seg: Segment) -> set[int]:
    """Pages of a segment that hold data: resident (`resident_runs`) and not all zero.  The KVM
    engine's memory is anonymous and THP-advised, so one written byte makes its whole 2 MiB
    resident: residency alone would not say which pages were written."""
    return {p for first, count in resident_runs(seg.addr, seg.size, PAGE) for p in range(first, first + count)
            if seg.read(p * PAGE, PAGE).count(0) != PAGE}


def run_program(layout: Layout) -> tuple[KvmMachine, list[int], set[int]]:
    m = KvmMachine(layout, name="test")
    reporter = Reporter(m, layout.topology.cpus)
    m.bus.register(REPORT_PORT, 4, reporter)
    addrs = targets(layout)
    tables = cpumode.identity_page_tables(PT_ADDR, max(layout.ram_top, 4 << 30))
    host_written = [(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, PROGRAM),
                    (TABLE_ADDR, struct.pack(f"<{len(addrs)}Q", *addrs)), (PT_ADDR, tables)]
    m.load(host_written)
    state = cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR)
    m.start_all(lambda i: with_regs(state, rsi=TABLE_ADDR, rcx=len(addrs), rdx=SIGNATURE))
    result = m.run(timeout=120)
    assert result.outcome is Outcome.STOPPED, result.detail
    assert result.vcpus_ran == frozenset(layout.apic_ids)
    assert result.exits["io"] >= layout.topology.cpus
    host_written += build_tables(layout).placements()  # the machine wrote the ACPI tables
    host_pages = {p for addr, data in host_written for p in range(addr // PAGE, (addr + len(data) - 1) // PAGE + 1)}
    return m, reporter.ids, host_pages


MACHINES = {
    "example": MachineSpec(domains=[parse_numa("id=0,size=1G,cpus=0-1"), parse_numa("id=1,size=1G,cpus=2-3"),
                                    parse_numa("id=2,size=512M")],
                           distances=[parse_distance("0:1=20"), parse_distance("0:2=30")]),
    "crossing-3G": MachineSpec(domains=[parse_numa("id=0,size=2G,cpus=0"),
                                        parse_numa("id=1,size=3G,cpus=1,domain_policy=bind:0")]),
    "memoryless+interleaved": MachineSpec(domains=[parse_numa("id=0,size=64M,cpus=0+2"),
                                                   parse_numa("id=1,size=0,cpus=1"),
                                                   parse_numa("id=2,size=96M,cpus=3,domain_policy=preferred:0")]),
    "classic": MachineSpec(cpus=2, memory=256 << 20),
}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_every_vcpu_writes_every_range_edge(name: str) -> None:
    layout = plan_layout(MACHINES[name].build(host_nodes=(0,)))
    m, ids, host_pages = run_program(layout)
    try:
        assert sorted(ids) == sorted(layout.apic_ids), "each vCPU reports its own planned APIC id"
        assert m.memory is not None
        for d in layout.domains:
            if not d.slots:
                assert d.id not in m.memory.segments
                continue
            seg = m.memory.segments[d.id]
            expected_pages: set[int] = set()
            for slot in d.slots:
                first, last = slot.offset, slot.offset + slot.guest.size - 1
                assert seg.read(first, 1)[0] == SIGNATURE, f"domain {d.id}: first byte of {slot.guest}"
                assert seg.read(last, 1)[0] == SIGNATURE, f"domain {d.id}: last byte of {slot.guest}"
                expected_pages |= {first // PAGE, last // PAGE}
                # The guest's write is the only non-zero byte on that page (unless the host wrote there).
                for off in (first, last):
                    page = off // PAGE
                    if d.slots[0].guest.start == 0 and page in host_pages:
                        continue
                    data = seg.read(page * PAGE, PAGE)
                    assert data.count(0) == PAGE - 1, f"domain {d.id}: stray bytes on page {page}"
            populated = populated_pages(seg)
            stray = populated - expected_pages - (host_pages if d.slots[0].guest.start == 0 else set())
            assert not stray, f"domain {d.id}: pages touched that the program never wrote: {sorted(stray)[:8]}"
            assert expected_pages <= populated
    finally:
        m.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_everything_released() -> None:
    layout = plan_layout(MACHINES["example"].build(host_nodes=(0,)))
    fds, threads = _fds(), threading.active_count()
    m, _, _ = run_program(layout)
    m.close()
    m.close()  # idempotent
    assert _fds() == fds
    assert threading.active_count() == threads


def test_released_when_construction_fails() -> None:
    layout = plan_layout(MACHINES["example"].build(host_nodes=(0,)))
    fds = _fds()
    with pytest.raises(Exception):
        KvmMachine(layout, kvm_path="/nonexistent/kvm")
    assert _fds() == fds


def test_triple_fault_ends_the_machine() -> None:
    layout = plan_layout(MachineSpec(cpus=1, memory=64 << 20).build())
    with KvmMachine(layout) as m:
        m.load([(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, b"\x0f\x0b"),  # ud2, no IDT
                (PT_ADDR, cpumode.identity_page_tables(PT_ADDR))])
        m.set_boot_state(cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR))
        result = m.run(timeout=60)
    assert result.outcome is Outcome.TRIPLE_FAULT, result.detail


def test_a_kernel_panic_line_on_the_console_ends_the_machine_as_a_panic() -> None:
    """With panic=-1 a Linux guest reboots right after its panic line: the line decides."""
    layout = plan_layout(MachineSpec(cpus=1, memory=64 << 20).build())
    text = b"boot...\r\nKernel panic - not syncing: sysrq triggered crash\r\n"
    program = bytes.fromhex("66baf803"  # mov dx, 0x3f8
                            "f36e"      # rep outsb (rsi = text, rcx = its length)
                            "ebfe")     # jmp $
    seen: list[bytes] = []
    started: list[str] = []  # on_start's thread

    def on_start() -> None:
        started.append(threading.current_thread().name)

    with KvmMachine(layout, console=seen.append) as m:
        m.load([(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, program), (TABLE_ADDR, text),
                (PT_ADDR, cpumode.identity_page_tables(PT_ADDR))])
        state = cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR)
        m.set_boot_state(with_regs(state, rsi=TABLE_ADDR, rcx=len(text)))
        result = m.run(timeout=60, on_start=on_start)
    assert started == ["MainThread"]  # once, in the caller's thread
    assert result.outcome is Outcome.PANIC, result.detail
    assert result.detail == "guest kernel panic: sysrq triggered crash"
    assert b"".join(seen) == text


def test_timeout_stops_a_spinning_guest() -> None:
    layout = plan_layout(MachineSpec(cpus=2, memory=64 << 20).build())
    with KvmMachine(layout) as m:
        m.load([(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, b"\xeb\xfe"),  # jmp $
                (PT_ADDR, cpumode.identity_page_tables(PT_ADDR))])
        state = cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR)
        m.start_all(lambda i: state)
        result = m.run(timeout=0.5)
    assert result.outcome is Outcome.TIMEOUT
    assert result.vcpus_ran == frozenset(layout.apic_ids)


def test_unknown_ports_read_all_ones_and_writes_are_counted() -> None:
    layout = plan_layout(MachineSpec(cpus=1, memory=64 << 20).build())
    program = bytes.fromhex(
        "66ba3412"   # mov dx, 0x1234
        "ed"         # in eax, dx           ; nothing there: 0xffffffff
        "e7" + f"{REPORT_PORT:02x}" +  # out REPORT_PORT, eax
        "66ba3512"   # mov dx, 0x1235
        "ee"         # out dx, al           ; dropped and counted
        "ee"         # out dx, al
        "e7" + f"{REPORT_PORT:02x}" +
        "f4ebfd")    # hlt; jmp hlt
    with KvmMachine(layout) as m:
        reporter = Reporter(m, 2)
        m.bus.register(REPORT_PORT, 4, reporter)
        m.load([(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, program),
                (PT_ADDR, cpumode.identity_page_tables(PT_ADDR))])
        m.set_boot_state(cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR))
        result = m.run(timeout=60)
    assert result.outcome is Outcome.STOPPED, result.detail
    assert reporter.ids[0] == 0xFFFFFFFF
    assert result.unhandled_reads[0x1234] == 1
    assert result.unhandled_writes[0x1235] == 2


class Echo:
    """A device at ECHO_PORT: reads give READ_VALUE cut to the access size; writes
    are recorded, and one at offset 3 stops the machine."""

    READ_VALUE = 0xA5C3E1F7

    def __init__(self, machine: KvmMachine) -> None:
        self.machine = machine
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return self.READ_VALUE & ((1 << 8 * size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 3:
            self.machine.stop(Outcome.STOPPED, "echo done")
        else:
            self.writes.append((offset, size, value))


def test_port_io_sizes_and_string_io_through_the_bus() -> None:
    """Every shape of port access the vCPU loop decodes: 1/2/4-byte IN and OUT at a
    device, rep outsb/insb (count > 1) at a device and at absent ports."""
    echo_port, buf, buf2 = 0x70, 0x8800, 0x8900
    program = bytes.fromhex(
        f"66ba{echo_port:02x}00"  # mov dx, ECHO
        "66b8efbe"     # mov ax, 0xbeef
        "66ef"         # out dx, ax          -> (0, 2, 0xbeef)
        "66ed" "66ef"  # in ax, dx; out dx, ax   -> (0, 2, 0xe1f7)
        "ec" "ee"      # in al, dx; out dx, al   -> (0, 1, 0xf7)
        "ed" "ef"      # in eax, dx; out dx, eax -> (0, 4, 0xa5c3e1f7)
        "be" + struct.pack("<I", buf).hex() +   # mov esi, buf
        "b903000000"   # mov ecx, 3
        "f36e"         # rep outsb           -> three 1-byte writes 11 22 33
        "66ba3612"     # mov dx, 0x1236
        "bf" + struct.pack("<I", buf2).hex() +  # mov edi, buf2
        "b902000000"   # mov ecx, 2
        "f36c"         # rep insb            ; nothing there: ff ff, 2 reads counted
        "66ba3712"     # mov dx, 0x1237
        "be" + struct.pack("<I", buf).hex() +   # mov esi, buf
        "b902000000"   # mov ecx, 2
        "f36e"         # rep outsb           ; dropped, 2 writes counted
        f"66ba{echo_port + 3:02x}00"  # mov dx, ECHO+3
        "ee"           # out dx, al          -> stop
        "f4ebfd")      # hlt; jmp hlt
    layout = plan_layout(MachineSpec(cpus=1, memory=64 << 20).build())
    with KvmMachine(layout) as m:
        echo = Echo(m)
        m.bus.register(echo_port, 4, echo)
        m.load([(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, program), (buf, b"\x11\x22\x33"),
                (buf2, b"\x00\x00\x00"), (PT_ADDR, cpumode.identity_page_tables(PT_ADDR))])
        m.set_boot_state(cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR))
        result = m.run(timeout=60)
        assert m.memory is not None
        filled = m.memory.read(buf2, 3)
    assert result.outcome is Outcome.STOPPED, result.detail
    assert echo.writes == [(0, 2, 0xBEEF), (0, 2, 0xE1F7), (0, 1, 0xF7), (0, 4, 0xA5C3E1F7),
                           (0, 1, 0x11), (0, 1, 0x22), (0, 1, 0x33)]
    assert filled == b"\xff\xff\x00"
    assert result.unhandled_reads == {0x1236: 2}
    assert result.unhandled_writes == {0x1237: 2}
    assert result.exits["io"] >= 10
    assert set(result.exits) <= {"io", "intr", "mmio", "hlt"}, result.exits


def test_power_off_through_the_acpi_sleep_register() -> None:
    from numavm.devices import S5_SLEEP_CONTROL_VALUE
    from numavm.plan.layout import SLEEP_CONTROL_PORT

    layout = plan_layout(MachineSpec(cpus=1, memory=64 << 20).build())
    program = bytes.fromhex(f"66ba{SLEEP_CONTROL_PORT & 0xff:02x}{SLEEP_CONTROL_PORT >> 8:02x}"  # mov dx, port
                            f"b0{S5_SLEEP_CONTROL_VALUE:02x}"  # mov al, SLP_TYP<<2|SLP_EN
                            "ee" "f4ebfd")  # out dx, al; hlt; jmp hlt
    with KvmMachine(layout) as m:
        m.load([(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, program),
                (PT_ADDR, cpumode.identity_page_tables(PT_ADDR))])
        m.set_boot_state(cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR))
        result = m.run(timeout=60)
    assert result.outcome is Outcome.POWEROFF, result.detail


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_machine_and_releases_everything(sig: signal.Signals) -> None:
    layout = plan_layout(MachineSpec(cpus=2, memory=64 << 20).build())
    fds, threads = _fds(), threading.active_count()
    handler = signal.getsignal(sig)
    with KvmMachine(layout) as m:
        m.load([(GDT_ADDR, cpumode.gdt_bytes()), (PROGRAM_ADDR, b"\xeb\xfe"),  # jmp $ on every vCPU
                (PT_ADDR, cpumode.identity_page_tables(PT_ADDR))])
        state = cpumode.long_mode_state(PT_ADDR, GDT_ADDR, PROGRAM_ADDR)
        m.start_all(lambda i: state)
        threading.Timer(0.3, os.kill, (os.getpid(), sig)).start()
        result = m.run(timeout=60)
    assert result.outcome is Outcome.INTERRUPTED and sig.name in result.detail
    assert signal.getsignal(sig) is handler  # the machine's handler was only there during the run
    time.sleep(0.05)  # the Timer thread ends right after it fired
    assert _fds() == fds
    assert threading.active_count() == threads


def test_apic_ids_past_254_start_in_x2apic_mode_with_extended_destination_ids() -> None:
    """The 128+1+1 machine (APIC id 256): every vCPU's APIC is in x2APIC mode with its full id,
    KVM_FEATURE_MSI_EXT_DEST_ID is in its CPUID; a machine below 255 keeps xAPIC mode."""
    from numavm.plan.cpuid import KVM_CPUID_FEATURES, KVM_FEATURE_MSI_EXT_DEST_ID, X2APIC_BIT

    spec = MachineSpec(domains=[parse_numa("id=0,size=64M,cpus=0-127"), parse_numa("id=1,size=64M,cpus=128"),
                                parse_numa("id=2,size=64M,cpus=129")])
    layout = plan_layout(spec.build(host_nodes=(0,)))
    assert layout.apic_ids[128:] == (128, 256)
    x2apic_id_msr = 0x802
    with KvmMachine(layout, name="x2apic") as m:
        for index in (0, 1, 127, 128, 129):
            msrs = m.vcpus[index].get_msrs([cpumode.MSR_IA32_APIC_BASE, x2apic_id_msr])
            assert msrs[cpumode.MSR_IA32_APIC_BASE] == cpumode.x2apic_base(index == 0)
            assert msrs[x2apic_id_msr] == layout.apic_ids[index]
            cpuid = {(e.function, e.index): e for e in m.vcpus[index].get_cpuid()}
            assert cpuid[(KVM_CPUID_FEATURES, 0)].eax & KVM_FEATURE_MSI_EXT_DEST_ID
            assert cpuid[(1, 0)].ecx & X2APIC_BIT
    small = plan_layout(MACHINES["example"].build(host_nodes=(0,)))
    with KvmMachine(small, name="xapic") as m:
        base = m.vcpus[0].get_msrs([cpumode.MSR_IA32_APIC_BASE])[cpumode.MSR_IA32_APIC_BASE]
        assert not base & cpumode.APIC_BASE_X2APIC and base & cpumode.APIC_BASE_ENABLE
        cpuid = {(e.function, e.index): e for e in m.vcpus[0].get_cpuid()}
        assert not cpuid[(KVM_CPUID_FEATURES, 0)].eax & KVM_FEATURE_MSI_EXT_DEST_ID


def test_x2apic_machine_routes_device_interrupts_to_the_boot_vcpu() -> None:
    from numavm.vmm.kvm.machine import X2APIC_IRQ_CMDLINE, x2apic_cmdline

    wide = plan_layout(MachineSpec(domains=[parse_numa("id=0,size=64M,cpus=0-127"),
                                            parse_numa("id=1,size=64M,cpus=128"),
                                            parse_numa("id=2,size=64M,cpus=129")]).build(host_nodes=(0,)))
    assert x2apic_cmdline(wide, "console=ttyS0") == f"console=ttyS0 {X2APIC_IRQ_CMDLINE}"
    assert x2apic_cmdline(wide, "irqaffinity=0-1") == "irqaffinity=0-1"
    small = plan_layout(MACHINES["example"].build(host_nodes=(0,)))
    assert x2apic_cmdline(small, "console=ttyS0") == "console=ttyS0"
