"""numavm.vmm.kvm.ioctls on the real /dev/kvm, plus the pure long-mode helpers of numavm.vmm.kvm.cpu.

Guest programs are a few hand-assembled instructions (plain mov/out/hlt):
some hosts' KVM emulates guest kernel code and fails on fancier ones.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from numavm.vmm.kvm import cpu
from numavm.vmm.kvm import ioctls as K
from numavm.errors import NumavmError

GiB = 1 << 30
OUT_PORT = 0x10


from kvmtest import kick, needs_kvm, real_mode_state, run_vcpu_threads  # noqa: E402


def _low_memory(vm: K.Vm, size: int = 0x10000) -> mmap.mmap:
    """Anonymous mmap as guest RAM slot 0 at guest-physical 0."""
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vm.set_user_memory_region(0, 0, size, K.host_address(mem))
    return mem


def _prepare_x86(vm: K.Vm) -> None:
    # Intel VMX needs these for real mode; harmless elsewhere.
    vm.set_tss_addr(0xFFFB_D000)
    vm.set_identity_map_addr(0xFFFB_C000)


def _run_with_timeout(vcpu: K.Vcpu, timeout: float = 30.0) -> K.KvmExit | int:
    """vcpu.run() in a thread; kick it out with a signal if the guest never exits."""
    result: list[K.KvmExit | int | BaseException] = []

    def target() -> None:
        try:
            result.append(vcpu.run())
        except BaseException as e:  # handed to the test thread
            result.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout)
    if t.is_alive():
        kick(vcpu, t)
        pytest.fail(f"vCPU {vcpu.apic_id} did not exit within {timeout}s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


pytestmark = [pytest.mark.usefixtures("sigusr1_handler")]


# --- structures and request numbers -----------------------------------------

# Sizes as the UAPI headers declare them on x86-64 (linux/kvm.h, asm/kvm.h).
UAPI_SIZES = {
    "KvmRegs": ("kvm_regs", 144),
    "KvmSegment": ("kvm_segment", 24),
    "KvmDtable": ("kvm_dtable", 16),
    "KvmSregs": ("kvm_sregs", 312),
    "KvmFpu": ("kvm_fpu", 416),
    "KvmLapicState": ("kvm_lapic_state", 1024),
    "KvmVcpuEvents": ("kvm_vcpu_events", 64),
    "KvmUserspaceMemoryRegion": ("kvm_userspace_memory_region", 32),
    "KvmCpuidEntry2": ("kvm_cpuid_entry2", 40),
    "KvmCpuid2": ("kvm_cpuid2", 8),
    "KvmMsrEntry": ("kvm_msr_entry", 16),
    "KvmMsrs": ("kvm_msrs", 8),
    "KvmIrqLevel": ("kvm_irq_level", 8),
    "KvmPitConfig": ("kvm_pit_config", 64),
    "KvmMpState": ("kvm_mp_state", 4),
    "KvmRun": ("kvm_run", 2352),
}

# Request numbers as the C preprocessor expands them from linux/kvm.h.
UAPI_REQUESTS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_SET_BOOT_CPU_ID": 0xAE78,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
}


@pytest.mark.parametrize("name", sorted(UAPI_SIZES))
def test_struct_size_matches_uapi(name: str) -> None:
    assert ctypes.sizeof(getattr(K, name)) == UAPI_SIZES[name][1]


@pytest.mark.parametrize("name", sorted(UAPI_REQUESTS))
def test_request_number_matches_uapi(name: str) -> None:
    assert getattr(K, name) == UAPI_REQUESTS[name]


def test_kvm_run_layout() -> None:
    assert K.KvmRun.exit_reason.offset == 8
    assert K.KvmRun.exit.offset == 32
    assert K.KvmRun.kvm_valid_regs.offset == 288
    assert K.KvmRun.s.offset == 304
    assert K.KvmVcpuEvents.exception_payload.offset == 56
    assert K.KvmSregs.cr0.offset == 224 and K.KvmSregs.efer.offset == 264


@pytest.mark.skipif(shutil.which("cc") is None or not Path("/usr/include/linux/kvm.h").exists(),
                    reason="needs a C compiler and linux-libc-dev's linux/kvm.h")
def test_sizes_and_requests_against_installed_headers(tmp_path: Path) -> None:
    src = ["#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    src += [f'printf("{cname} %zu\\n", sizeof(struct {cname}));' for cname, _ in UAPI_SIZES.values()]
    src += [f'printf("{req} %lu\\n", (unsigned long){req});' for req in UAPI_REQUESTS]
    src += ["return 0; }"]
    (tmp_path / "s.c").write_text("\n".join(src))
    subprocess.run(["cc", "-o", str(tmp_path / "s"), str(tmp_path / "s.c")], check=True)
    out = dict(line.split() for line in subprocess.run(
        [str(tmp_path / "s")], check=True, capture_output=True, text=True).stdout.splitlines())
    for name, (cname, _) in UAPI_SIZES.items():
        assert ctypes.sizeof(getattr(K, name)) == int(out[cname]), name
    for req in UAPI_REQUESTS:
        assert getattr(K, req) == int(out[req]), req


# --- pure long-mode helpers (numavm.vmm.kvm.cpu) --------------------------------------

def _walk(tables: bytes, base: int, vaddr: int) -> int:
    """Translate `vaddr` through tables copied at guest `base` (a tiny MMU)."""
    def entry(table: int, index: int) -> int:
        return int(struct.unpack_from("<Q", tables, table - base + 8 * index)[0])

    e = entry(base, (vaddr >> 39) & 511)
    assert e & cpu.PTE_PRESENT
    e = entry(e & ~0xFFF, (vaddr >> 30) & 511)
    assert e & cpu.PTE_PRESENT
    if e & cpu.PTE_HUGE:
        return (e & ~0xFFF & ~(GiB - 1)) | (vaddr & (GiB - 1))
    e = entry(e & ~0xFFF, (vaddr >> 21) & 511)
    assert e & cpu.PTE_PRESENT and e & cpu.PTE_HUGE
    return (e & ~0xFFF & ~((2 << 20) - 1)) | (vaddr & ((2 << 20) - 1))


@pytest.mark.parametrize("huge_1g", [False, True])
@pytest.mark.parametrize("top", [0, 4 * GiB, 6 * GiB + 1, 600 * GiB])
def test_identity_page_tables_map_identity(top: int, huge_1g: bool) -> None:
    base = 0x9000
    tables = cpu.identity_page_tables(base, top, huge_1g=huge_1g)
    assert len(tables) == cpu.page_tables_size(top, huge_1g=huge_1g)
    mapped = cpu.identity_top(top)
    assert mapped >= max(4 * GiB, top) and mapped % GiB == 0
    for addr in (0, 0x1234, 2 * GiB + 0x5678, 4 * GiB - 1, mapped - 1, mapped // 2 + 0x1FFFFF):
        assert _walk(tables, base, addr) == addr


def test_identity_page_tables_stop_at_top() -> None:
    tables = cpu.identity_page_tables(0, 4 * GiB)
    pdpt = struct.unpack_from("<512Q", tables, 4096)
    assert all(pdpt[:4]) and not any(pdpt[4:])
    with pytest.raises(ValueError, match="aligned"):
        cpu.identity_page_tables(0x123, 4 * GiB)


def test_gdt_descriptors() -> None:
    gdt = struct.unpack("<6Q", cpu.gdt_bytes())
    assert gdt[cpu.BOOT_CS // 8] == 0x00AF9B000000FFFF  # 64-bit code, flat
    assert gdt[cpu.BOOT_DS // 8] == 0x00CF93000000FFFF  # data, flat
    assert gdt[cpu.BOOT_TSS // 8] == 0x00008B0000000067  # busy TSS
    state = cpu.long_mode_state(0x10000, 0x1000, 0x2000)
    assert state.gdt == cpu.DescriptorTable(0x1000, cpu.GDT_SIZE - 1)
    assert state.control["efer"] & (cpu.EFER_LME | cpu.EFER_LMA)
    assert state.segments["cs"].l == 1 and state.segments["cs"].selector == cpu.BOOT_CS


# --- opening /dev/kvm ------------------------------------------------------------

def test_missing_device_is_one_line_error() -> None:
    with pytest.raises(NumavmError) as info:
        K.Kvm("/nonexistent/kvm")
    msg = str(info.value)
    assert "/nonexistent/kvm" in msg and "does not exist" in msg and "\n" not in msg


def test_unopenable_device_names_errno(tmp_path: Path) -> None:
    with pytest.raises(NumavmError, match=r"EISDIR \(Is a directory\)"):
        K.Kvm(str(tmp_path))


@needs_kvm
def test_missing_capability_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = K.Kvm.check_extension

    def without_pit2(self: K.Kvm, cap: K.KvmCap | int) -> int:
        return 0 if cap == K.KvmCap.PIT2 else real(self, cap)

    monkeypatch.setattr(K.Kvm, "check_extension", without_pit2)
    before = _fd_count()
    with pytest.raises(NumavmError, match="KVM_CAP_PIT2"):
        K.Kvm()
    assert _fd_count() == before  # the half-opened fd was closed


@needs_kvm
def test_system_queries(kvm: K.Kvm) -> None:
    assert kvm.check_extension(K.KvmCap.USER_MEMORY) == 1
    assert kvm.max_vcpus >= kvm.recommended_vcpus >= 1
    assert kvm.max_vcpu_id >= kvm.max_vcpus
    assert kvm.vcpu_mmap_size >= ctypes.sizeof(K.KvmRun)
    leaves = {(e.function, e.index) for e in kvm.supported_cpuid()}
    assert (0, 0) in leaves and (0x80000001, 0) in leaves


# --- running guests -----------------------------------------------------------------

REAL_MODE_OUT_HLT = bytes([
    0xB0, 0x42,        # mov al, 0x42
    0xE6, OUT_PORT,    # out 0x10, al
    0xF4,              # hlt
])


@needs_kvm
def test_real_mode_out_then_hlt(kvm: K.Kvm) -> None:
    with kvm.create_vm() as vm:
        _prepare_x86(vm)
        mem = _low_memory(vm)
        mem[0x1000:0x1000 + len(REAL_MODE_OUT_HLT)] = REAL_MODE_OUT_HLT
        vcpu = vm.create_vcpu(0)
        vcpu.load_cpu_state(real_mode_state(cs_base=0, rip=0x1000))

        assert vcpu.run() == K.KvmExit.IO
        io = vcpu.io_exit()
        assert (io.port, io.size, io.direction, io.count) == (OUT_PORT, 1, K.KvmIoDirection.OUT, 1)
        assert bytes(io.data) == b"\x42"
        del io

        assert vcpu.run() == K.KvmExit.HLT
        assert vcpu.get_regs().rip == 0x1000 + len(REAL_MODE_OUT_HLT)
        with pytest.raises(K.KvmError, match="not IO"):
            vcpu.io_exit()


@needs_kvm
def test_exit_words_match_the_decoded_exit(kvm: K.Kvm) -> None:
    """The hot path's view of kvm_run (Vcpu.words, RUN_WORD_*) reads what io_exit() decodes."""
    code = bytes([
        0xBA, 0x34, 0x12,  # mov dx, 0x1234
        0xB8, 0xEF, 0xBE,  # mov ax, 0xbeef
        0xEF,              # out dx, ax
        0xF4,              # hlt
    ])
    with kvm.create_vm() as vm:
        _prepare_x86(vm)
        mem = _low_memory(vm)
        mem[0x1000:0x1000 + len(code)] = code
        vcpu = vm.create_vcpu(0)
        vcpu.load_cpu_state(real_mode_state(cs_base=0, rip=0x1000))

        assert vcpu.kvm_run() == 0  # the bare call: the exit is read from the page
        words, page = vcpu.words, vcpu.page
        assert words[K.RUN_WORD_EXIT_REASON] == K.KvmExit.IO == vcpu.exit_reason
        io = vcpu.io_exit()
        head = words[K.RUN_WORD_IO]
        assert (head & 0xFF, head >> 8 & 0xFF, head >> 16) == (K.KvmIoDirection.OUT, 2, 0x1234)
        assert (io.direction, io.size, io.port) == (K.KvmIoDirection.OUT, 2, 0x1234)
        assert words[K.RUN_WORD_IO_COUNT] == io.count == 1
        offset = words[K.RUN_WORD_IO_DATA_OFFSET]
        assert bytes(page[offset:offset + 2]) == bytes(io.data) == b"\xef\xbe"
        del io, words, page

        assert vcpu.run() == K.KvmExit.HLT
        vcpu.close()
        with pytest.raises(K.KvmError, match="closed"):
            vcpu.kvm_run()
        with pytest.raises(K.KvmError, match="closed"):
            vcpu.words
        with pytest.raises(K.KvmError, match="closed"):
            vcpu.run()


@needs_kvm
def test_real_mode_mmio_and_port_in(kvm: K.Kvm) -> None:
    code = bytes([
        0xB8, 0x00, 0x20,              # mov ax, 0x2000
        0x8E, 0xD8,                    # mov ds, ax        ; ds base 0x20000: no RAM there
        0xC6, 0x06, 0x00, 0x00, 0x5A,  # mov byte [0], 0x5a -> MMIO write
        0xA0, 0x01, 0x00,              # mov al, [1]        -> MMIO read
        0xE6, OUT_PORT,                # out 0x10, al
        0xE4, 0x61,                    # in al, 0x61
        0xE6, OUT_PORT + 1,            # out 0x11, al
        0xF4,                          # hlt
    ])
    with kvm.create_vm() as vm:
        _prepare_x86(vm)
        mem = _low_memory(vm)
        mem[0x1000:0x1000 + len(code)] = code
        vcpu = vm.create_vcpu(0)
        vcpu.load_cpu_state(real_mode_state(cs_base=0, rip=0x1000))

        assert vcpu.run() == K.KvmExit.MMIO
        m = vcpu.mmio_exit()
        assert (m.phys_addr, m.length, m.is_write, bytes(m.data)) == (0x20000, 1, True, b"\x5a")

        assert vcpu.run() == K.KvmExit.MMIO
        m = vcpu.mmio_exit()
        assert (m.phys_addr, m.length, m.is_write) == (0x20001, 1, False)
        m.data[0] = 0x77  # the value the guest's load sees
        del m

        assert vcpu.run() == K.KvmExit.IO
        assert bytes(vcpu.io_exit().data) == b"\x77"

        assert vcpu.run() == K.KvmExit.IO
        io = vcpu.io_exit()
        assert (io.port, io.direction, io.size) == (0x61, K.KvmIoDirection.IN, 1)
        io.data[0] = 0x99
        del io

        assert vcpu.run() == K.KvmExit.IO
        io = vcpu.io_exit()
        assert (io.port, bytes(io.data)) == (OUT_PORT + 1, b"\x99")
        del io
        assert vcpu.run() == K.KvmExit.HLT


def _long_mode_program(target: int, value: int) -> bytes:
    return b"".join([
        b"\x48\xB8" + struct.pack("<Q", value),   # mov rax, value
        b"\x48\xBF" + struct.pack("<Q", target),  # mov rdi, target
        b"\x48\x89\x07",                          # mov [rdi], rax
        b"\x48\x8B\x1F",                          # mov rbx, [rdi]   ; read it back
        b"\x89\xD8",                              # mov eax, ebx
        b"\xE7" + bytes([OUT_PORT]),              # out 0x10, eax    ; report low half
        b"\xF4",                                  # hlt
    ])


def _has_1g_pages(entries: list[K.KvmCpuidEntry2]) -> bool:
    return any(e.function == 0x80000001 and e.edx >> 26 & 1 for e in entries)


@needs_kvm
@pytest.mark.parametrize("huge_1g", [False, True], ids=["2M-pages", "1G-pages"])
def test_long_mode_writes_high_memory(kvm: K.Kvm, huge_1g: bool) -> None:
    supported = kvm.supported_cpuid()
    if huge_1g and not _has_1g_pages(supported):
        pytest.skip("KVM does not offer 1 GiB pages (CPUID pdpe1gb)")
    pt_base, gdt_base, code_base = 0x10000, 0x1000, 0x2000
    high_base, high_size = 4 * GiB, 4 * GiB        # slot 1: guest [4 GiB, 8 GiB)
    target = 6 * GiB + 0x123008
    value = 0x1122334455667788
    code = _long_mode_program(target, value)
    with kvm.create_vm() as vm:
        _prepare_x86(vm)
        low = _low_memory(vm, 0x100000)
        # Sparse: only the page the guest writes is ever backed.
        high = mmap.mmap(-1, high_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        vm.set_user_memory_region(1, high_base, high_size, K.host_address(high))
        tables = cpu.identity_page_tables(pt_base, high_base + high_size, huge_1g=huge_1g)
        low[pt_base:pt_base + len(tables)] = tables
        low[gdt_base:gdt_base + cpu.GDT_SIZE] = cpu.gdt_bytes()
        low[code_base:code_base + len(code)] = code

        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(supported)  # as a VMM must: the guest sees LM, PAE, ...
        vcpu.load_cpu_state(cpu.long_mode_state(pt_base, gdt_base, code_base, rsp=0x8000))
        sregs = vcpu.get_sregs()
        assert sregs.efer & cpu.EFER_LMA and sregs.cs.l == 1 and sregs.cr3 == pt_base

        assert _run_with_timeout(vcpu) == K.KvmExit.IO
        io = vcpu.io_exit()
        assert (io.port, io.size) == (OUT_PORT, 4)
        assert struct.unpack("<I", io.data)[0] == value & 0xFFFFFFFF
        del io
        assert _run_with_timeout(vcpu) == K.KvmExit.HLT
        off = target - high_base
        assert struct.unpack_from("<Q", high, off)[0] == value


@needs_kvm
def test_triple_fault_is_shutdown_exit(kvm: K.Kvm) -> None:
    """ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault -> KVM_EXIT_SHUTDOWN."""
    pt_base, gdt_base, code_base = 0x10000, 0x1000, 0x2000
    with kvm.create_vm() as vm:
        _prepare_x86(vm)
        low = _low_memory(vm, 0x100000)
        tables = cpu.identity_page_tables(pt_base)
        low[pt_base:pt_base + len(tables)] = tables
        low[gdt_base:gdt_base + cpu.GDT_SIZE] = cpu.gdt_bytes()
        low[code_base:code_base + 2] = b"\x0F\x0B"  # ud2
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.supported_cpuid())
        vcpu.load_cpu_state(cpu.long_mode_state(pt_base, gdt_base, code_base, rsp=0x8000))
        assert _run_with_timeout(vcpu) == K.KvmExit.SHUTDOWN


@needs_kvm
def test_exit_accessors_decode_run_page(kvm: K.Kvm) -> None:
    """Decoding of exits a test guest cannot provoke, written into the shared page."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        run = vcpu.run_state
        run.exit_reason = K.KvmExit.SYSTEM_EVENT
        run.system_event.type = K.KvmSystemEvent.RESET
        run.system_event.ndata = 2
        run.system_event.data[0], run.system_event.data[1] = 7, 9
        assert vcpu.exit_reason == K.KvmExit.SYSTEM_EVENT
        assert vcpu.system_event() == K.SystemEventExit(K.KvmSystemEvent.RESET, (7, 9))

        run.exit_reason = K.KvmExit.INTERNAL_ERROR
        run.internal.suberror = K.KvmInternalError.EMULATION
        run.internal.ndata = 1
        run.internal.data[0] = 0xABC
        assert vcpu.internal_error() == K.InternalErrorExit(K.KvmInternalError.EMULATION, (0xABC,))

        run.exit_reason = K.KvmExit.FAIL_ENTRY
        run.fail_entry.hardware_entry_failure_reason = 0x21
        run.fail_entry.cpu = 1
        assert vcpu.fail_entry() == K.FailEntryExit(0x21, 1)
        with pytest.raises(K.KvmError, match="not MMIO"):
            vcpu.mmio_exit()


@needs_kvm
def test_vcpus_run_concurrently_in_threads(kvm: K.Kvm) -> None:
    """A guest-side barrier: every vCPU counts itself in, then waits for all.

    It only completes if all vCPUs are inside KVM_RUN at once, i.e. the GIL
    is released during the ioctl.
    """
    apic_ids = [0, 2, 5, 7]  # sparse on purpose: vcpu id = APIC id
    n = len(apic_ids)
    counter = 0x3000
    code = bytes([
        0xF0, 0xFF, 0x06, counter & 0xFF, counter >> 8,  # lock inc word [0x3000]
        0xA1, counter & 0xFF, counter >> 8,              # spin: mov ax, [0x3000]
        0x3D, n, 0x00,                                   #   cmp ax, n
        0x75, 0xF8,                                      #   jne spin
        0x89, 0xD8,                                      # mov ax, bx   ; bx = APIC id
        0xE6, OUT_PORT,                                  # out 0x10, al
        0xF4,                                            # hlt (blocks in-kernel: never re-run)
    ])
    with kvm.create_vm() as vm:
        _prepare_x86(vm)
        vm.create_irqchip()  # before the vCPUs, so each gets an in-kernel LAPIC
        vm.create_pit2()
        vm.set_boot_cpu_id(apic_ids[1])
        mem = _low_memory(vm)
        mem[0x1000:0x1000 + len(code)] = code
        vcpus = [vm.create_vcpu(i) for i in apic_ids]
        assert [v.apic_id for v in vm.vcpus] == apic_ids
        for v in vcpus:
            assert v.get_lapic().apic_id == v.apic_id
            # Non-boot vCPUs wait for INIT/SIPI under the in-kernel LAPIC.
            expected = K.MpState.RUNNABLE if v.apic_id == apic_ids[1] else K.MpState.UNINITIALIZED
            assert v.get_mp_state() == expected
            v.set_mp_state(K.MpState.RUNNABLE)
            v.load_cpu_state(real_mode_state(cs_base=0, rip=0x1000))
            regs = v.get_regs()
            regs.rbx = v.apic_id
            v.set_regs(regs)

        results: dict[int, tuple[K.KvmExit | int, int, bytes]] = {}

        def worker(v: K.Vcpu) -> None:
            reason = v.run()
            if reason == K.KvmExit.IO:
                io = v.io_exit()
                results[v.apic_id] = (reason, io.port, bytes(io.data))
            else:
                results[v.apic_id] = (reason, -1, b"")

        stuck = run_vcpu_threads(vcpus, worker, 30)
        assert not stuck, f"vCPUs {stuck} never passed the barrier"
        assert results == {i: (K.KvmExit.IO, OUT_PORT, bytes([i])) for i in apic_ids}
        assert struct.unpack_from("<H", mem, counter)[0] == n
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)


@needs_kvm
def test_signal_kicks_vcpu_out_of_run(kvm: K.Kvm) -> None:
    spin = bytes([0xEB, 0xFE])  # jmp $
    with kvm.create_vm() as vm:
        _prepare_x86(vm)
        vm.create_irqchip()
        mem = _low_memory(vm)
        mem[0x1000:0x1002] = spin
        vcpu = vm.create_vcpu(0)
        vcpu.load_cpu_state(real_mode_state(cs_base=0, rip=0x1000))
        got: list[K.KvmExit | int] = []
        t = threading.Thread(target=lambda: got.append(vcpu.run()))
        t.start()
        t.join(0.2)
        assert t.is_alive()  # spinning in the guest, not holding the GIL
        kick(vcpu, t)
        assert got == [K.KvmExit.INTR]


@needs_kvm
def test_vcpu_state_roundtrip(kvm: K.Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(3)
        regs = vcpu.get_regs()
        regs.rax, regs.r15 = 0xDEAD, 0xBEEF
        vcpu.set_regs(regs)
        assert (vcpu.get_regs().rax, vcpu.get_regs().r15) == (0xDEAD, 0xBEEF)
        events = vcpu.get_vcpu_events()
        vcpu.set_vcpu_events(events)
        lapic = vcpu.get_lapic()
        assert lapic.apic_id == 3
        vcpu.set_lapic(lapic)
        fpu = vcpu.get_fpu()
        vcpu.set_fpu(fpu)
        vcpu.set_cpuid(kvm.supported_cpuid())
        assert any(e.function == 0 for e in vcpu.get_cpuid())
        ia32_sysenter_cs = 0x174
        vcpu.set_msrs({ia32_sysenter_cs: 0x10})
        assert vcpu.get_msrs([ia32_sysenter_cs]) == {ia32_sysenter_cs: 0x10}


# --- errors and resources ----------------------------------------------------------

@needs_kvm
def test_ioctl_failure_names_errno(kvm: K.Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_vcpu(1)
        with pytest.raises(K.KvmIoctlError, match=r"^KVM_CREATE_VCPU: EEXIST \(File exists\)$") as info:
            vm.create_vcpu(1)
        assert info.value.errno == errno.EEXIST
        assert isinstance(info.value, NumavmError) and isinstance(info.value, OSError)
        with pytest.raises(K.KvmError, match=r"^KVM_SET_USER_MEMORY_REGION: EINVAL \(Invalid argument\)$"):
            vm.set_user_memory_region(0, 0x123, 0x1000, 0)  # guest address not page aligned
        with pytest.raises(K.KvmError, match=r"APIC id"):
            vm.create_vcpu(kvm.max_vcpu_id)
        with pytest.raises(K.KvmError, match=r"^KVM_GET_LAPIC: (ENXIO|EINVAL) \("):
            vm.vcpus[0].get_lapic()  # no in-kernel irqchip


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_kvm
def test_close_releases_every_fd() -> None:
    before = _fd_count()
    kvm = K.Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    vcpus = [vm.create_vcpu(i) for i in range(3)]
    assert _fd_count() == before + 1 + 1 + 3 * K.FDS_PER_VCPU
    with vcpus[0]:
        vcpus[0].load_cpu_state(real_mode_state(0, 0))
    vm.close()
    vm.close()  # idempotent
    kvm.close()
    kvm.close()
    assert _fd_count() == before
    for v in vcpus:
        with pytest.raises(K.KvmError, match="closed"):
            v.get_regs()


@needs_kvm
def test_close_with_exit_view_still_held(kvm: K.Kvm) -> None:
    before = _fd_count()
    with kvm.create_vm() as vm:
        _prepare_x86(vm)
        mem = _low_memory(vm)
        mem[0x1000:0x1000 + len(REAL_MODE_OUT_HLT)] = REAL_MODE_OUT_HLT
        vcpu = vm.create_vcpu(0)
        vcpu.load_cpu_state(real_mode_state(0, 0x1000))
        assert vcpu.run() == K.KvmExit.IO
        io = vcpu.io_exit()
    # Closing did not fail and did not unmap under the live view: the mapping
    # (and the vCPU it pins) lives until the view goes.
    assert bytes(io.data) == b"\x42"
    del io
    gc.collect()
    assert _fd_count() == before
