"""The KVM engine's device plumbing on the real /dev/kvm: ioeventfd, irqfd and GSI routing, MSI,
guest memory views, --disk images; then the PCI platform (numavm.vmm.kvm.pci) under small
guest programs.

Guest programs are a few hand-assembled instructions, as in test_kvm.py: this host's KVM may
emulate guest code.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from numavm.errors import ConfigError
from numavm.host.disk import SECTOR, open_disk, open_disks
from numavm.vmm.kvm import cpu
from numavm.vmm.kvm import ioctls as K

from kvmtest import kick, needs_kvm, real_mode_state, with_regs  # noqa: E402

pytestmark = [pytest.mark.usefixtures("sigusr1_handler")]

OUT_PORT = 0x10


def _low_memory(vm: K.Vm, size: int = 0x10000) -> mmap.mmap:
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vm.set_user_memory_region(0, 0, size, K.host_address(mem))
    return mem


def _prepare_x86(vm: K.Vm) -> None:
    vm.set_tss_addr(0xFFFB_D000)
    vm.set_identity_map_addr(0xFFFB_C000)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _count(fd: int) -> int:
    """The eventfd's counter, reset to 0 (0 when it was never signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# --- structures and request numbers ----------------------------------------------

UAPI_SIZES = {"KvmIoeventfd": ("kvm_ioeventfd", 64), "KvmIrqfd": ("kvm_irqfd", 32),
              "KvmIrqRoutingEntry": ("kvm_irq_routing_entry", 48), "KvmIrqRouting": ("kvm_irq_routing", 8),
              "KvmMsi": ("kvm_msi", 32)}
UAPI_REQUESTS = {"KVM_SET_GSI_ROUTING": 0x4008AE6A, "KVM_IRQFD": 0x4020AE76, "KVM_IOEVENTFD": 0x4040AE79,
                 "KVM_SIGNAL_MSI": 0x4020AEA5}


def test_structs_and_requests_match_uapi() -> None:
    for name, (_, size) in UAPI_SIZES.items():
        assert ctypes.sizeof(getattr(K, name)) == size, name
    for name, value in UAPI_REQUESTS.items():
        assert getattr(K, name) == value, name


@pytest.mark.skipif(shutil.which("cc") is None or not Path("/usr/include/linux/kvm.h").exists(),
                    reason="needs a C compiler and linux-libc-dev's linux/kvm.h")
def test_structs_and_requests_against_installed_headers(tmp_path: Path) -> None:
    src = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    src += [f'printf("{c} %zu\\n", sizeof(struct {c}));' for c, _ in UAPI_SIZES.values()]
    src += [f'printf("{r} %lu\\n", (unsigned long){r});' for r in UAPI_REQUESTS]
    src += ['printf("u %zu\\n", offsetof(struct kvm_irq_routing_entry, u));',
            'printf("caps %d %d %d %d %d\\n", KVM_CAP_IOEVENTFD, KVM_CAP_IOEVENTFD_ANY_LENGTH, KVM_CAP_IRQFD, '
            'KVM_CAP_IRQ_ROUTING, KVM_CAP_SIGNAL_MSI);', "return 0; }"]
    (tmp_path / "s.c").write_text("\n".join(src))
    subprocess.run(["cc", "-o", str(tmp_path / "s"), str(tmp_path / "s.c")], check=True)
    out = dict(line.split(" ", 1) for line in subprocess.run(
        [str(tmp_path / "s")], check=True, capture_output=True, text=True).stdout.splitlines())
    for name, (c, _) in UAPI_SIZES.items():
        assert ctypes.sizeof(getattr(K, name)) == int(out[c]), name
    for req in UAPI_REQUESTS:
        assert getattr(K, req) == int(out[req]), req
    assert K.KvmIrqRoutingEntry.u.offset == int(out["u"])
    assert [int(c) for c in out["caps"].split()] == [int(c) for c in K.DEVICE_CAPS]


def test_default_routes_are_kvms_own_table() -> None:
    routes = K.default_irq_routes()
    assert len(routes) == 24 + 16
    by_gsi: dict[int, set[tuple[int, int]]] = {}
    for r in routes:
        by_gsi.setdefault(r.gsi, set()).add((r.chip, r.pin))
    assert by_gsi[0] == {(K.KVM_IRQCHIP_IOAPIC, 0), (K.KVM_IRQCHIP_PIC_MASTER, 0)}
    assert by_gsi[4] == {(K.KVM_IRQCHIP_IOAPIC, 4), (K.KVM_IRQCHIP_PIC_MASTER, 4)}
    assert by_gsi[11] == {(K.KVM_IRQCHIP_IOAPIC, 11), (K.KVM_IRQCHIP_PIC_SLAVE, 3)}
    assert by_gsi[23] == {(K.KVM_IRQCHIP_IOAPIC, 23)}
    assert K.FIRST_MSI_GSI == 24 and max(by_gsi) < K.FIRST_MSI_GSI


@needs_kvm
def test_device_capabilities_present(kvm: K.Kvm) -> None:
    kvm.require(K.DEVICE_CAPS, "PCI devices")
    assert kvm.check_extension(K.KvmCap.IRQ_ROUTING) > K.FIRST_MSI_GSI  # room for MSI routes


# --- ioeventfd ------------------------------------------------------------------------

IOEVENTFD_PROGRAM = bytes([
    0xB8, 0x00, 0x20,                          # mov ax, 0x2000
    0x8E, 0xD8,                                # mov ds, ax       ; base 0x20000: no RAM, MMIO
    0xC7, 0x06, 0x00, 0x00, 0x07, 0x00,        # mov word [0], 7        -> any-length eventfd A
    0xC6, 0x06, 0x00, 0x00, 0x01,              # mov byte [0], 1        -> A again (any length)
    0xC7, 0x06, 0x08, 0x00, 0x34, 0x12,        # mov word [8], 0x1234   -> datamatch eventfd B
    0xC7, 0x06, 0x08, 0x00, 0x78, 0x56,        # mov word [8], 0x5678   -> no match: an MMIO exit
    0xE6, OUT_PORT,                            # out 0x10, al           ; checkpoint
    0xC7, 0x06, 0x00, 0x00, 0x07, 0x00,        # mov word [0], 7        -> deassigned: an MMIO exit
    0xF4,                                      # hlt
])


@needs_kvm
def test_ioeventfd_fires_without_an_exit_and_deassigns(kvm: K.Kvm) -> None:
    a, b = _eventfd(), _eventfd()
    try:
        with kvm.create_vm() as vm:
            _prepare_x86(vm)
            mem = _low_memory(vm)
            mem[0x1000:0x1000 + len(IOEVENTFD_PROGRAM)] = IOEVENTFD_PROGRAM
            vm.add_ioeventfd(a, 0x20000)  # any length
            vm.add_ioeventfd(b, 0x20008, 2, datamatch=0x1234)
            with pytest.raises(K.KvmIoctlError, match=r"^KVM_IOEVENTFD\(0x20000\): EEXIST"):
                vm.add_ioeventfd(a, 0x20000)
            vcpu = vm.create_vcpu(0)
            vcpu.load_cpu_state(real_mode_state(0, 0x1000))

            assert vcpu.run() == K.KvmExit.MMIO  # the first exit is the unmatched write
            m = vcpu.mmio_exit()
            assert (m.phys_addr, m.length, m.is_write, bytes(m.data)) == (0x20008, 2, True, b"\x78\x56")
            del m
            assert _count(a) == 2 and _count(b) == 1  # both writes to A, the matching one to B

            vm.remove_ioeventfd(a, 0x20000)
            with pytest.raises(K.KvmIoctlError, match=r"deassign\): ENOENT"):
                vm.remove_ioeventfd(a, 0x20000)
            assert vcpu.run() == K.KvmExit.IO
            assert vcpu.run() == K.KvmExit.MMIO  # A is gone: the write exits
            assert vcpu.mmio_exit().phys_addr == 0x20000
            assert _count(a) == 0
            vm.remove_ioeventfd(b, 0x20008, 2, datamatch=0x1234)
    finally:
        os.close(a)
        os.close(b)


def test_ioeventfd_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="any-length"):
        K.Vm._ioeventfd_request(0, 0x1000, 0, 5, False, False)
    with pytest.raises(ValueError, match="length 3"):
        K.Vm._ioeventfd_request(0, 0x1000, 3, None, False, False)


# --- MSI: irqfd, GSI routing, KVM_SIGNAL_MSI -------------------------------------------

GDT, CODE, IDT, HANDLERS, PT, STACK = 0x1000, 0x2000, 0x3000, 0x4000, 0x10000, 0x8000
READY_PORT, VECTOR_PORT = 0x10, 0x11
LAPIC = 0xFEE00000
MSI_VECTORS = (0x40, 0x41, 0x42)


def _idt_gate(handler: int) -> bytes:
    """A 64-bit interrupt gate (type 0xE, present, DPL 0) to `handler` in the boot code segment."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, cpu.BOOT_CS, 0, 0x8E, handler >> 16 & 0xFFFF,
                       handler >> 32, 0)


def _mov_rax(value: int) -> bytes:
    return b"\x48\xB8" + struct.pack("<Q", value)


def interrupt_program() -> tuple[bytes, dict[int, bytes]]:
    """Long-mode code: enable the LAPIC, load an IDT, report ready, then hlt in a loop; each
    vector's handler reports its vector on VECTOR_PORT and EOIs."""
    code = b"".join([
        _mov_rax(LAPIC + 0xF0), b"\xC7\x00\xFF\x01\x00\x00",  # mov dword [rax], 0x1ff: APIC on
        _mov_rax(IDT + 0xF00), b"\x0F\x01\x18",                # lidt [rax]
        b"\xFB",                                               # sti
        b"\xE6" + bytes([READY_PORT]),                         # out READY_PORT, al
        b"\xF4\xEB\xFD",                                       # hlt; jmp hlt
    ])
    handlers = {}
    for k, vector in enumerate(MSI_VECTORS):
        handlers[HANDLERS + 0x40 * k] = b"".join([
            b"\x50",                                           # push rax
            b"\xB0" + bytes([vector]),                         # mov al, vector
            b"\xE6" + bytes([VECTOR_PORT]),                    # out VECTOR_PORT, al
            _mov_rax(LAPIC + 0xB0), b"\xC7\x00\x00\x00\x00\x00",  # mov dword [rax], 0: EOI
            b"\x58",                                           # pop rax
            b"\x48\xCF",                                       # iretq
        ])
    return code, handlers


def _interrupt_vm(kvm: K.Kvm, vm: K.Vm) -> tuple[mmap.mmap, K.Vcpu]:
    _prepare_x86(vm)
    vm.create_irqchip()
    mem = _low_memory(vm, 0x100000)
    code, handlers = interrupt_program()
    tables = cpu.identity_page_tables(PT)
    mem[PT:PT + len(tables)] = tables
    mem[GDT:GDT + cpu.GDT_SIZE] = cpu.gdt_bytes()
    mem[CODE:CODE + len(code)] = code
    idt = bytearray(256 * 16)
    for k, vector in enumerate(MSI_VECTORS):
        idt[vector * 16:vector * 16 + 16] = _idt_gate(HANDLERS + 0x40 * k)
    mem[IDT:IDT + len(idt)] = bytes(idt)
    mem[IDT + 0xF00:IDT + 0xF0A] = struct.pack("<HQ", len(idt) - 1, IDT)
    for addr, blob in handlers.items():
        mem[addr:addr + len(blob)] = blob
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(kvm.supported_cpuid())
    vcpu.load_cpu_state(cpu.long_mode_state(PT, GDT, CODE, rsp=STACK))
    return mem, vcpu


@needs_kvm
def test_msi_through_irqfd_and_signal_msi_reach_the_guests_idt(kvm: K.Kvm) -> None:
    """GSI 24 and 25 routed as MSIs (with KVM's default IOAPIC/PIC routes kept): a write to
    GSI 24's irqfd runs the guest's handler for its vector; re-routing GSI 24 changes the
    vector the same irqfd delivers; KVM_SIGNAL_MSI delivers without a route; a legacy
    KVM_IRQ_LINE still works under the new table."""
    fd = _eventfd()
    try:
        with kvm.create_vm() as vm:
            mem, vcpu = _interrupt_vm(kvm, vm)
            msi = lambda vector: LAPIC | 0 << 12  # noqa: E731  (destination APIC id 0, physical)
            vm.set_gsi_routing([*K.default_irq_routes(), K.MsiRoute(24, msi(0x40), 0x40)])
            vm.add_irqfd(fd, 24)
            seen: list[int] = []
            steps = [lambda: os.eventfd_write(fd, 1),
                     lambda: (vm.set_gsi_routing([*K.default_irq_routes(), K.MsiRoute(24, msi(0x41), 0x41)]),
                              os.eventfd_write(fd, 1)),
                     lambda: vm.signal_msi(msi(0x42), 0x42),
                     lambda: vm.irq_line(4, 1)]  # IOAPIC pin 4, still routed (masked in the guest)

            def worker() -> None:
                step = 0
                while len(seen) < 3:
                    reason = vcpu.run()
                    if reason == K.KvmExit.INTR:
                        return
                    assert reason == K.KvmExit.IO, reason
                    io = vcpu.io_exit()
                    if io.port == VECTOR_PORT:
                        seen.append(io.data[0])
                    del io
                    if step < 3:
                        steps[step]()
                        step += 1

            t = threading.Thread(target=worker)
            t.start()
            t.join(60)
            if t.is_alive():
                kick(vcpu, t)
            assert seen == list(MSI_VECTORS)
            steps[3]()
            vm.irq_line(4, 0)
            vm.remove_irqfd(fd, 24)
            vm.remove_irqfd(fd, 24)  # KVM answers 0 for an irqfd it does not hold: teardown may repeat
    finally:
        os.close(fd)


# --- guest memory views ------------------------------------------------------------

def test_views_split_at_slot_boundaries() -> None:
    from numavm.host.memory import GuestMemory, GuestAddressError
    from numavm.plan.layout import plan_layout
    from numavm.spec.topology import MachineSpec, parse_numa

    layout = plan_layout(MachineSpec(domains=[parse_numa("id=0,size=4M,cpus=0"),
                                              parse_numa("id=1,size=4M")]).build(host_nodes=(0,)))
    with GuestMemory(layout, machine="views", shared=False) as mem:
        edge = 4 << 20
        views = mem.views(edge - 3, 6)
        assert [v.nbytes for v in views] == [3, 3]
        views[0][:] = b"abc"
        views[1][:] = b"def"
        assert mem.read(edge - 3, 6) == b"abcdef"
        assert mem.segments[1].read(0, 3) == b"def"
        assert [v.nbytes for v in mem.views(0, 16)] == [16]
        assert mem.views(5, 0) == []
        with pytest.raises(GuestAddressError, match="runs past the end of RAM"):
            mem.views(2 * edge - 1, 2)
        for v in views:
            v.release()


# --- --disk images ----------------------------------------------------------------------

def _image(tmp_path: Path, size: int = 1 << 20, name: str = "disk.img") -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def _refused(path: object, readonly: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        open_disk(path, readonly)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"--disk {path}: "), msg
    return msg


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_disk_opens_once_with_size_and_lock(tmp_path: Path) -> None:
    p = _image(tmp_path, 3 * SECTOR)
    before = _fds()
    with open_disk(p) as d:
        assert (d.path, d.size, d.sectors, d.readonly, d.block_device) == (str(p), 3 * SECTOR, 3, False, False)
        assert _fds() == before + 1
        os.pwrite(d.fd, b"x", 0)
        assert "locked by another user" in _refused(p)  # a second writer
        assert "locked by another writer" in _refused(p, readonly=True)  # a reader while it writes
    assert _fds() == before and d.closed
    with open_disk(p, readonly=True) as r1, open_disk(p, readonly=True) as r2:  # readers share
        assert r1.readonly and r2.size == 3 * SECTOR
        with pytest.raises(OSError):
            os.pwrite(r1.fd, b"y", 0)
        assert "locked by another user" in _refused(p)  # a writer while they read
    with open_disk(p):  # both gone: writable again
        pass


def test_disk_refusals_are_one_line(tmp_path: Path) -> None:
    assert "no such file" in _refused(tmp_path / "missing.img")
    assert "is a directory" in _refused(tmp_path)
    assert "is a directory" in _refused(tmp_path, readonly=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "is a FIFO, not a disk image" in _refused(fifo)  # and the open did not block
    assert "is a FIFO" in _refused(fifo, readonly=True)
    assert "is a character device" in _refused("/dev/null")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "sock"))
        assert "is a socket, not a disk image" in _refused(tmp_path / "sock")
    finally:
        sock.close()
    assert "is empty" in _refused(_image(tmp_path, 0, "empty.img"))
    assert "not a multiple of 512" in _refused(_image(tmp_path, 1000, "odd.img"))
    assert "not a directory" in _refused(_image(tmp_path, 512, "f") / "x")


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _without_dac_override() -> None:
    """In the child before exec: drop root's permission-check bypass from the bounding set,
    so the exec'd interpreter meets file modes as any owner would."""
    if os.getuid() == 0:
        from numavm.host.libc import prctl
        prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0)
        prctl(PR_CAPBSET_DROP, CAP_DAC_READ_SEARCH, 0, 0, 0)


def test_disk_unreadable_and_unwritable(tmp_path: Path) -> None:
    """Permissions as an unprivileged user meets them (root reads everything): in a child
    without CAP_DAC_OVERRIDE when this runs as root."""
    ro = _image(tmp_path, 512, "ro.img")
    none = _image(tmp_path, 512, "none.img")
    ro.chmod(0o444)
    none.chmod(0o000)
    code = (f"from numavm.host.disk import open_disk\n"
            f"for p, r in (({str(none)!r}, True), ({str(ro)!r}, False)):\n"
            f"    try: open_disk(p, r)\n"
            f"    except Exception as e: print(e)\n"
            f"print(open_disk({str(ro)!r}, True).size)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        out = subprocess.run([sys.executable, "-c", code], preexec_fn=_without_dac_override,
                             capture_output=True, text=True, env=env, timeout=60)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {e}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"--disk {none}: permission denied",
        f"--disk {ro}: permission denied for reading and writing (add ,readonly for a read-only disk)",
        "512"]


class _Spec:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path, self.readonly = path, readonly


def test_open_disks_is_all_or_none(tmp_path: Path) -> None:
    a, b = _image(tmp_path, 512, "a.img"), _image(tmp_path, 1024, "b.img")
    before = _fds()
    with pytest.raises(ConfigError, match=r"^--disk .*missing\.img: no such file$"):
        open_disks([_Spec(a), _Spec(b), _Spec(tmp_path / "missing.img")])
    assert _fds() == before  # a and b were closed again
    with pytest.raises(ConfigError, match=r"is the same image as disk 0 \(.*a\.img\); give each image once"):
        open_disks([_Spec(a), _Spec(tmp_path / "." / "a.img", True)])
    assert _fds() == before
    disks = open_disks([_Spec(a), _Spec(b, True)])
    assert [(d.size, d.readonly) for d in disks] == [(512, False), (1024, True)]
    for d in disks:
        d.close()
    assert _fds() == before


def test_open_disks_names_the_disk_as_its_spec_does(tmp_path: Path) -> None:
    from numavm.spec.devices import disk_from_table, parse_disk

    missing = tmp_path / "none.img"
    with pytest.raises(ConfigError, match=rf"^--disk {missing}: no such file$"):
        open_disks([parse_disk(f"{missing},domain=1")])
    with pytest.raises(ConfigError, match=rf"^m.toml: disk {missing}: no such file$"):
        open_disks([disk_from_table({"path": str(missing)}, 0, "m.toml")])


# --- the PCI platform under guest programs ---------------------------------------------
#
# A small interpreter runs in the guest (64-bit, interrupts off but while it waits): a table of
# 24-byte operations (op, address, value) the test writes, each an MMIO or port access, a read
# reported on port 0x90, or a wait for an interrupt, whose handler reports its vector on port
# 0x91 and EOIs.  The end reports on port 0x92, which stops the machine.  Assembled with GNU as
# (the source is in the comments).

INTERP = bytes.fromhex(
    "0f011b"            # lidt [rbx]
    "488b06"            # next: mov rax, [rsi]
    "488b7e08"          #   mov rdi, [rsi+8]        ; address (or port)
    "488b5610"          #   mov rdx, [rsi+16]       ; value
    "4883c618"          #   add rsi, 24
    "3c017425"          #   cmp al, 0x01; je w8
    "3c027425"          #   cmp al, 0x02; je w16
    "3c047426"          #   cmp al, 0x04; je w32
    "3c12742d"          #   cmp al, 0x12; je r16
    "3c147430"          #   cmp al, 0x14; je r32
    "3c247432"          #   cmp al, 0x24; je pout
    "3c347435"          #   cmp al, 0x34; je pin
    "3c307438"          #   cmp al, 0x30; je wait
    "3c117412"          #   cmp al, 0x11; je r8
    "e692"              # done: out 0x92, al
    "f4ebfd"            # halt: hlt; jmp halt
    "8817ebc4"          # w8: mov [rdi], dl; jmp next
    "668917ebbf"        # w16: mov [rdi], dx; jmp next
    "8917ebbb"          # w32: mov [rdi], edx; jmp next
    "0fb607e790ebb4"    # r8: movzx eax, byte [rdi]; out 0x90, eax; jmp next
    "0fb707e790ebad"    # r16: movzx eax, word [rdi]; out 0x90, eax; jmp next
    "8b07e790eba7"      # r32: mov eax, [rdi]; out 0x90, eax; jmp next
    "89d089faefeba0"    # pout: mov eax, edx; mov edx, edi; out dx, eax; jmp next
    "89faede790eb99"    # pin: mov edx, edi; in eax, dx; out 0x90, eax; jmp next
    "fbf4faeb94"        # wait: sti; hlt; cli; jmp next
)
W8, W16, W32, R8, R16, R32, POUT, PIN, WAIT, END = 0x01, 0x02, 0x04, 0x11, 0x12, 0x14, 0x24, 0x34, 0x30, 0x00
VALUE_PORT = 0x90
M_GDT, M_PROGRAM, M_TABLE, M_PT, M_IDT, M_IDTR, M_HANDLERS = 0x7000, 0x8000, 0x9000, 0x10000, 0x20000, 0x21000, 0x22000
HANDLED = range(0x40, 0x50)


def _handler(vector: int) -> bytes:
    """push rax; mov al, vector; out 0x91, al; mov eax, 0; mov [0xfee000b0], eax (EOI); pop rax; iretq"""
    return bytes.fromhex(f"50b0{vector:02x}e691b800000000a3b000e0fe0000000058" "48cf")


class Recorder:
    """Ports 0x90-0x92: values, interrupt vectors (in the order they came), and the end."""

    def __init__(self, machine: object) -> None:
        self.machine = machine
        self.events: list[tuple[str, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.events.append(("value", value))
        elif offset == 1:
            self.events.append(("irq", value))
        else:
            from numavm.vmm.run import Outcome
            self.machine.stop(Outcome.STOPPED, "the program ended")  # type: ignore[attr-defined]

    @property
    def values(self) -> list[int]:
        return [v for kind, v in self.events if kind == "value"]


def _pci_layout(tmp_path: Path, *disks: str, domains: tuple[str, ...] = ("id=0,size=32M,cpus=0", "id=1,size=32M")):
    from numavm.plan.layout import plan_layout
    from numavm.spec.devices import parse_disk
    from numavm.spec.topology import MachineSpec, parse_numa

    spec = MachineSpec(domains=[parse_numa(d) for d in domains], disks=[parse_disk(d) for d in disks])
    return plan_layout(spec.build(host_nodes=(0,)))


def run_script(machine: object, ops: list[tuple[int, int, int]], timeout: float = 60) -> Recorder:
    """Run the interpreter over `ops` on the machine's boot vCPU; the recorder of what it reported."""
    from numavm.vmm.kvm.machine import KvmMachine
    from numavm.vmm.run import Outcome

    assert isinstance(machine, KvmMachine)
    rec = Recorder(machine)
    machine.bus.register(VALUE_PORT, 3, rec)
    idt = bytearray(256 * 16)
    handlers = b""
    for k, vector in enumerate(HANDLED):
        code = _handler(vector)
        idt[vector * 16:vector * 16 + 16] = _idt_gate(M_HANDLERS + 0x20 * k)
        handlers += code.ljust(0x20, b"\xcc")
    table = b"".join(struct.pack("<QQQ", op, addr, value) for op, addr, value in [*ops, (END, 0, 0)])
    machine.load([(M_GDT, cpu.gdt_bytes()), (M_PROGRAM, INTERP), (M_TABLE, table), (M_PT, cpu.identity_page_tables(M_PT)),
                  (M_IDT, bytes(idt)), (M_IDTR, struct.pack("<HQ", len(idt) - 1, M_IDT)), (M_HANDLERS, handlers)])
    state = cpu.long_mode_state(M_PT, M_GDT, M_PROGRAM, rsp=0x7000, rsi=M_TABLE)
    machine.set_boot_state(with_regs(state, rbx=M_IDTR))
    result = machine.run(timeout=timeout)
    assert result.outcome is Outcome.STOPPED, (result.detail, rec.events)
    rec.result = result  # type: ignore[attr-defined]
    return rec


LAPIC_ON = (W32, LAPIC + 0xF0, 0x1FF)  # the spurious-vector register: APIC software-enabled


def _cf8(bus: int, devfn: int, offset: int) -> int:
    return 0x8000_0000 | bus << 16 | devfn << 8 | offset


@needs_kvm
def test_config_space_through_ecam_and_cf8_reads_the_model(tmp_path: Path) -> None:
    from numavm.plan.pci import ecam_address
    from numavm.vmm.kvm.machine import KvmMachine

    a, b = _image(tmp_path, 1 << 20, "a.img"), _image(tmp_path, 4096, "b.img")
    layout = _pci_layout(tmp_path, f"{a},domain=1", f"{b},domain=0")
    d1, d0 = layout.pci.devices  # --disk order; bridges (buses) in domain order
    assert (d0.domain, d1.domain) == (0, 1) and 0 < d0.bus < d1.bus  # bridges in domain order
    with KvmMachine(layout, name="cfg") as m:
        rec = run_script(m, [
            (R32, ecam_address(d1.bus, d1.slot, 0), 0),                 # vendor | device << 16
            (R32, ecam_address(d0.bus, d0.slot, 0) + 8, 0),             # revision | class << 8
            (R16, ecam_address(d1.bus, d1.slot, 0) + 0x2E, 0),          # subsystem id
            (R32, ecam_address(0, 0, 0), 0),                            # bus 0 is empty: all-ones
            (R32, ecam_address(d1.bus, 5, 0), 0),                       # an empty slot
            (POUT, 0xCF8, _cf8(d1.bus, d1.devfn, 0)), (PIN, 0xCFC, 0),  # mechanism #1
            (POUT, 0xCF8, _cf8(d0.bus, d0.devfn, 0x10)), (PIN, 0xCFC, 0),  # BAR0 as numavm assigned it
            (PIN, 0xCF8, 0),                                            # the latch reads back
            (POUT, 0xCF8, _cf8(0, 0, 0)), (PIN, 0xCFC, 0),              # nothing on bus 0
            (POUT, 0xCF8, _cf8(d1.bus, d1.devfn, 0) & 0x7FFF_FFFF), (PIN, 0xCFC, 0),  # disabled
        ])
    assert rec.values == [0x1042_1AF4, 0x0180_0001, 2, 0xFFFF_FFFF, 0xFFFF_FFFF,
                          0x1042_1AF4, d0.bar0, _cf8(d0.bus, d0.devfn, 0x10), 0xFFFF_FFFF, 0xFFFF_FFFF]
    assert rec.result.exits["mmio"] == 5  # type: ignore[attr-defined]


COMMON, ISR, DEVCFG, NOTIFY, MSIX_TABLE = 0x0000, 0x1000, 0x2000, 0x3000, 0x4000
CMD_MEMORY_MASTER = 0x6


def _msix_control(fn: object) -> int:
    """Offset of the MSI-X capability's message control in `fn`'s config space (walking the list)."""
    cap = fn.config_read(0x34, 1)  # type: ignore[attr-defined]
    while cap:
        if fn.config_read(cap, 1) == 0x11:  # type: ignore[attr-defined]
            return cap + 2
        cap = fn.config_read(cap + 1, 1)  # type: ignore[attr-defined]
    raise AssertionError("no MSI-X capability")


@needs_kvm
def test_bar_sizing_and_moving_from_the_guest_moves_mmio_and_the_notify_eventfd(tmp_path: Path) -> None:
    from numavm.plan.pci import ecam_address
    from numavm.vmm.kvm.machine import KvmMachine

    layout = _pci_layout(tmp_path, f"{_image(tmp_path)},domain=1")
    (dev,) = layout.pci.devices
    cfg = ecam_address(dev.bus, dev.slot, 0)
    old, new = dev.bar0, dev.bar0 + 0x10000
    with KvmMachine(layout, name="bars") as m:
        assert m.pci is not None
        fn = m.pci.devices[0].fn
        rec = run_script(m, [
            (R32, cfg + 0x10, 0),                       # numavm's assignment
            (R16, old + COMMON + 0x12, 0),              # num_queues, through the BAR where it is
            (W16, cfg + 0x04, 0),                       # decoding off, as Linux sizes a BAR
            (W32, cfg + 0x10, 0xFFFF_FFFF), (R32, cfg + 0x10, 0),  # size it
            (W32, cfg + 0x10, new), (R32, cfg + 0x10, 0),
            (R16, new + COMMON + 0x12, 0),              # not decoding yet: nothing there
            (W16, cfg + 0x04, CMD_MEMORY_MASTER),
            (R16, new + COMMON + 0x12, 0),              # the BAR answers at its new address
            (R16, old + COMMON + 0x12, 0),              # and no longer at the old one
            (W16, new + NOTIFY, 0),                     # queue 0's notify: the moved ioeventfd, no exit
            (W16, old + NOTIFY, 0),                     # the old address: an exit that reaches nothing
        ])
        assert rec.values == [old, 1, 0xFFFF_8000, new, 0xFFFF, 1, 0xFFFF]
        assert m.pci.devices[0].notify_at == new
        assert fn.ignored_notifies == 1  # the I/O thread ran queue 0 once (not enabled yet: ignored)
        assert rec.result.exits["mmio"] == 12  # every access but the notify


@needs_kvm
def test_a_device_interrupt_reaches_the_guest_through_msix_irqfd_and_its_route(tmp_path: Path) -> None:
    """The whole interrupt path: the guest programs MSI-X vector 0 (config changes) and turns on
    DRIVER_OK, then notifies a queue it never enabled; the notify's ioeventfd wakes the I/O
    thread, the model flags the device error and raises its configuration interrupt, the
    irqfd and the route the guest's table entry became deliver it to the guest's handler."""
    from numavm.plan.pci import ecam_address
    from numavm.vmm.kvm.machine import KvmMachine

    layout = _pci_layout(tmp_path, f"{_image(tmp_path)},domain=1")
    (dev,) = layout.pci.devices
    cfg, bar = ecam_address(dev.bus, dev.slot, 0), dev.bar0
    logged: list[str] = []
    with KvmMachine(layout, name="msix", log=logged.append) as m:
        assert m.pci is not None
        fn = m.pci.devices[0].fn
        control = _msix_control(fn)
        rec = run_script(m, [
            LAPIC_ON,
            (W16, cfg + 0x04, CMD_MEMORY_MASTER),
            (W32, bar + MSIX_TABLE, LAPIC), (W32, bar + MSIX_TABLE + 4, 0),
            (W32, bar + MSIX_TABLE + 8, 0x41), (W32, bar + MSIX_TABLE + 12, 0),  # vector 0 -> 0x41, unmasked
            (W16, cfg + control, 0x8000),              # MSI-X on
            (W16, bar + COMMON + 0x10, 0),             # config_msix_vector = 0
            (W8, bar + COMMON + 0x14, 0x07),           # ACKNOWLEDGE | DRIVER | DRIVER_OK
            (W16, bar + NOTIFY, 0),                    # queue 0, never enabled
            (WAIT, 0, 0),
            (R8, bar + COMMON + 0x14, 0),              # DEVICE_NEEDS_RESET now set
        ])
        assert rec.events == [("irq", 0x41), ("value", 0x47)]
        assert m.pci.devices[0].routes == (K.MsiRoute(K.FIRST_MSI_GSI, LAPIC, 0x41),)
        error = fn.errors[-1]
        assert "queue 0 notified but not enabled" in error
    assert logged == [f"numavm: virtio-blk {dev.bdf} ({tmp_path / 'disk.img'}): the guest's driver broke the "
                      f"protocol: {error} (the device waits for a reset)"]


DESC, AVAIL, USED, HEADER, STATUS = 0x30000, 0x31000, 0x32000, 0x33000, 0x35000
QSIZE = 256


def _virtio_setup(cfg: int, bar: int, control: int, vector: int) -> list[tuple[int, int, int]]:
    """A driver's bring-up of queue 0 with the rings at DESC/AVAIL/USED, its interrupt on MSI-X
    vector 1 -> `vector`, up to DRIVER_OK."""
    c = bar + COMMON
    return [
        LAPIC_ON,
        (W16, cfg + 0x04, CMD_MEMORY_MASTER),
        (W32, bar + MSIX_TABLE + 16, LAPIC), (W32, bar + MSIX_TABLE + 20, 0),
        (W32, bar + MSIX_TABLE + 24, vector), (W32, bar + MSIX_TABLE + 28, 0),
        (W16, cfg + control, 0x8000),
        (W8, c + 0x14, 0x01), (W8, c + 0x14, 0x03),          # ACKNOWLEDGE, DRIVER
        (W32, c + 0x08, 1), (W32, c + 0x0C, 1),               # driver features 32-63: VERSION_1
        (W8, c + 0x14, 0x0B), (R8, c + 0x14, 0),              # FEATURES_OK, read back
        (W16, c + 0x16, 0),                                   # queue_select 0
        (R16, c + 0x18, 0),                                   # queue_size
        (W32, c + 0x20, DESC), (W32, c + 0x24, 0),
        (W32, c + 0x28, AVAIL), (W32, c + 0x2C, 0),
        (W32, c + 0x30, USED), (W32, c + 0x34, 0),
        (W16, c + 0x1A, 1),                                   # queue_msix_vector = 1
        (W16, c + 0x1C, 1),                                   # queue_enable
        (W8, c + 0x14, 0x0F),                                 # DRIVER_OK
    ]


def _request(mem: object, req_type: int, sector: int, buffers: list[tuple[int, int]], head: int, slot: int) -> None:
    """Descriptors head.. for one virtio-blk request (header, data buffers, status) and avail slot."""
    write = mem.write  # type: ignore[attr-defined]
    chain = [(HEADER + 16 * slot, 16, 0)] + [(a, n, 2 if req_type == 0 else 0) for a, n in buffers] \
        + [(STATUS + slot, 1, 2)]
    write(HEADER + 16 * slot, struct.pack("<IIQ", req_type, 0, sector))
    for k, (addr, n, flags) in enumerate(chain):
        last = k == len(chain) - 1
        write(DESC + 16 * (head + k), struct.pack("<QIHH", addr, n, flags | (0 if last else 1), head + k + 1))
    write(AVAIL + 4 + 2 * slot, struct.pack("<H", head))


@needs_kvm
def test_virtio_blk_reads_and_writes_the_image_into_guest_memory_across_two_domains(tmp_path: Path) -> None:
    """A guest program drives the device as a driver would (the rings are written by the test);
    the request's data buffer straddles domain 0's end and domain 1's start, so the device's
    preadv/pwritev go straight into two host segments.  Read sector 1.., then write it back
    elsewhere; flush."""
    from numavm.plan.pci import ecam_address
    from numavm.vmm.kvm.machine import KvmMachine

    img = _image(tmp_path, 1 << 20)
    pattern = os.urandom(1 << 20)
    img.write_bytes(pattern)
    layout = _pci_layout(tmp_path, f"{img},domain=1")
    (dev,) = layout.pci.devices
    cfg, bar = ecam_address(dev.bus, dev.slot, 0), dev.bar0
    edge = 32 << 20  # domain 0 ends, domain 1 starts
    buf, n = edge - 1536, 4096
    with KvmMachine(layout, name="blk") as m:
        assert m.pci is not None and m.memory is not None
        control = _msix_control(m.pci.devices[0].fn)
        _request(m.memory, 0, 1, [(buf, n)], head=0, slot=0)            # IN: sectors 1..8
        _request(m.memory, 1, 100, [(buf, n)], head=3, slot=1)          # OUT: back at sector 100
        _request(m.memory, 4, 0, [], head=6, slot=2)                    # FLUSH
        m.memory.write(AVAIL, struct.pack("<HH", 0, 1))                 # one request offered
        rec = run_script(m, [
            *_virtio_setup(cfg, bar, control, 0x42),
            (W16, bar + NOTIFY, 0), (WAIT, 0, 0),
            (R16, USED + 2, 0), (R8, STATUS, 0),
            (W16, AVAIL + 2, 3), (W16, bar + NOTIFY, 0), (WAIT, 0, 0),  # the write and the flush
            (R16, USED + 2, 0), (R8, STATUS + 1, 0), (R8, STATUS + 2, 0),
        ])
        assert rec.events == [("value", 0x0B), ("value", QSIZE),                  # FEATURES_OK held; queue size
                              ("irq", 0x42), ("value", 1), ("value", 0),            # the read: used 1, status OK
                              ("irq", 0x42), ("value", 3), ("value", 0), ("value", 0)]  # write, flush
        assert m.memory.read(buf, n) == pattern[512:512 + n]
        assert m.memory.segments[0].read(edge - 1536, 1536) == pattern[512:2048]  # the part in domain 0
        used = struct.unpack_from("<HH", m.memory.read(USED, 4))[1]
        assert used == 3
        assert m.memory.read(STATUS, 3) == b"\0\0\0"
    assert img.read_bytes()[100 * 512:100 * 512 + n] == pattern[512:512 + n]


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


@needs_kvm
def test_io_threads_are_named_and_pinned_like_their_domain_and_everything_is_released(tmp_path: Path) -> None:
    from numavm.host.memory import policy_cpus
    from numavm.plan.pci import ecam_address
    from numavm.vmm.kvm.machine import KvmMachine

    layout = _pci_layout(tmp_path, f"{_image(tmp_path, name='a.img')},domain=1",
                         f"{_image(tmp_path, name='b.img')},domain=0,readonly",
                         domains=("id=0,size=32M,cpus=0", "id=1,size=32M,domain_policy=bind:0"))
    fds, threads = _fds(), _threads()
    seen: dict[str, set[int]] = {}
    with KvmMachine(layout, name="rel") as m:
        assert m.pci is not None and len(m.disks) == 2 and all(not d.closed for d in m.disks)

        class Spy(Recorder):
            def write(self, offset: int, size: int, value: int) -> None:
                for t in threading.enumerate():
                    if t.name.startswith("rel-virtio-blk"):
                        seen[t.name] = os.sched_getaffinity(t.native_id or 0)
                super().write(offset, size, value)

        rec = Spy(m)
        m.bus.register(0x94, 3, rec)
        rec2 = run_script(m, [(PIN, 0x94, 0), (POUT, 0x94 + 2, 0)])  # the spy looks while the vCPU runs
        assert rec2.values == [0]
        assert _threads() == threads  # the I/O threads ended with the run
    assert set(seen) == {"rel-virtio-blk0", "rel-virtio-blk1"}
    assert seen["rel-virtio-blk0"] == set(policy_cpus((0,)))  # domain 1 is bound to host node 0
    assert seen["rel-virtio-blk1"] == os.sched_getaffinity(0)  # domain 0 has the default policy: unpinned
    assert _fds() == fds and _threads() == threads
    assert all(d.closed for d in m.disks) or m.disks == []


@needs_kvm
def test_a_machine_that_fails_to_build_releases_its_disks(tmp_path: Path) -> None:
    from numavm.vmm.kvm.machine import KvmMachine

    img = _image(tmp_path)
    layout = _pci_layout(tmp_path, f"{img},domain=1")
    fds = _fds()
    with pytest.raises(Exception, match="/nonexistent/kvm"):
        KvmMachine(layout, kvm_path="/nonexistent/kvm")
    assert _fds() == fds
    with open_disk(img):  # and the lock went with it
        pass


@needs_kvm
def test_a_locked_image_is_refused_before_guest_memory_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from numavm.host.memory import guestmap
    from numavm.vmm.kvm.machine import KvmMachine

    img = _image(tmp_path)
    layout = _pci_layout(tmp_path, f"{img},domain=1")
    made: list[object] = []
    monkeypatch.setattr(guestmap.GuestMemory, "__post_init__", lambda self: made.append(self))
    with open_disk(img):
        with pytest.raises(ConfigError, match=rf"^--disk {img}: is locked by another user"):
            KvmMachine(layout)
    assert made == []


@needs_kvm
def test_a_machine_without_devices_has_no_pci_platform() -> None:
    from numavm.plan.layout import plan_layout
    from numavm.spec.topology import MachineSpec
    from numavm.vmm.kvm.machine import KvmMachine

    layout = plan_layout(MachineSpec(cpus=1, memory=64 << 20).build())
    with KvmMachine(layout) as m:
        assert m.pci is None and m.disks == [] and 0xCF8 not in m.bus
        rec = run_script(m, [(R32, 0xE000_0000, 0), (W32, 0xC000_0000, 5), (R32, 0xC000_0000, 0)])
    assert rec.values == [0xFFFF_FFFF, 0xFFFF_FFFF]  # nothing decodes: reads float high, writes vanish


def test_msi_route_addresses() -> None:
    from numavm.vmm.kvm.pci import msi_route_address

    assert msi_route_address(0, False) is None  # an unprogrammed vector
    assert msi_route_address(0xFEB0_0000, False) is None  # not the LAPIC window
    assert msi_route_address(0xFEE0_1000, False) == 0xFEE0_1000  # APIC id 1, xAPIC
    assert msi_route_address(0x1_FEE0_1000, False) == 0xFEE0_1000  # the high word means nothing there
    # x2APIC format (KVM_X2APIC_API): Linux's extended destination id (bits 5-11 = id bits 8-14)
    # becomes the high word KVM reads (bits 40-63 = id bits 8-31): APIC id 256 + 3
    assert msi_route_address(0xFEE0_3020, True) == 0x100_FEE0_3000
    assert msi_route_address(0x100_FEE0_3000, True) == 0x100_FEE0_3000  # already in KVM's form
    assert msi_route_address(0x1_FEE0_3000, True) is None  # KVM refuses a low byte in the high word


def test_the_api_refuses_a_bad_image_before_the_kernel_and_releases_a_good_one(tmp_path: Path) -> None:
    """Machine.run/check open the images once, before guest assets and memory (exit 2 material),
    hand them to the engine in GuestRun.disks, and close them however the run ends."""
    from numavm import Machine

    two = ["id=0,size=64M,cpus=0", "id=1,size=64M,cpus=1"]
    # a kernel file that passes the input checks (numavm.host.files: kind and size, first of
    # all) but is no kernel: refused when the assets are read, after the images were opened
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"not a kernel" * 100)
    bad = Machine(cpus=2, domains=two, disks=[f"{tmp_path / 'none.img'},domain=1"])
    for call in (bad.run, bad.check):  # the image is refused before the kernel is read
        with pytest.raises(ConfigError, match=rf"^--disk {tmp_path / 'none.img'}: no such file$"):
            call(kernel=kernel)  # type: ignore[operator]
    img = _image(tmp_path)
    good = Machine(cpus=2, domains=two, disks=[f"{img},domain=1"])
    fds = _fds()
    with pytest.raises(ConfigError, match="^--kernel: .*neither a bzImage"):  # the image was opened, then the kernel refused
        good.run("true", kernel=kernel)
    assert _fds() == fds
    with open_disk(img):  # its lock went with it
        pass


@needs_kvm
def test_a_guest_that_overlaps_two_devices_bars_gets_one_of_them_not_a_crash(tmp_path: Path) -> None:
    """The guest puts disk 1's BAR0 on disk 0's: MMIO there reaches one function, the second
    notify ioeventfd at the same address is refused by KVM (its writes would exit instead),
    and moving the BAR away again restores both."""
    from numavm.vmm.kvm.machine import KvmMachine

    layout = _pci_layout(tmp_path, f"{_image(tmp_path, name='a.img')},domain=1",
                         f"{_image(tmp_path, name='b.img')},domain=1")
    d0, d1 = layout.pci.devices
    with KvmMachine(layout, name="overlap") as m:
        assert m.pci is not None
        p0, p1 = m.pci.devices
        m.pci.config_write(d1.bus, d1.devfn, 0x10, 4, d0.bar0)  # the guest's doing
        assert p1.bars == p0.bars and p1.notify_at == d0.bar0
        assert (p0.notify_fallback, p1.notify_fallback) == (0, 1)
        assert m.pci.mmio_read(d0.bar0 + 0x12, 2) == 1  # num_queues, from one of them
        m.pci.config_write(d1.bus, d1.devfn, 0x10, 4, d1.bar0)
        assert p1.notify_fallback == 0 and m.pci.mmio_read(d1.bar0 + 0x12, 2) == 1


def test_views_many_is_views_per_buffer() -> None:
    """GuestMemory.views_many (the virtqueue's one call for a request's buffers) gives exactly
    the views `views` gives buffer by buffer: in one slot, across slots, with an empty buffer,
    and the same refusal outside RAM."""
    from numavm.host.memory import GuestMemory, GuestAddressError
    from numavm.plan.layout import plan_layout
    from numavm.spec.topology import MachineSpec, parse_numa

    layout = plan_layout(MachineSpec(domains=[parse_numa("id=0,size=4M,cpus=0"),
                                              parse_numa("id=1,size=4M")]).build(host_nodes=(0,)))
    edge = 4 << 20
    with GuestMemory(layout, machine="many", shared=False) as mem:
        mem.write(0, os.urandom(2 * edge))
        for addrs, lengths in (([0x1000, 0x3000, 0x2000], [0x1000, 0x800, 0x10]),  # one slot
                               ([edge + 0x1000, edge + 0x5000], [4096, 4096]),     # the other
                               ([edge - 0x800, 0x1000], [0x1000, 0x1000]),         # one straddles
                               ([0x1000, edge + 0x1000], [0x1000, 0x1000]),        # two slots
                               ([0x1000, 0x2000], [0x1000, 0])):                   # an empty buffer
            many = mem.views_many(addrs, lengths)
            each = [v for a, n in zip(addrs, lengths) for v in mem.views(a, n)]
            assert [bytes(v) for v in many] == [bytes(v) for v in each]
            for v in (*many, *each):
                v.release()
        with pytest.raises(GuestAddressError):
            mem.views_many([0x1000, 2 * edge - 0x800], [0x1000, 0x1000])
# ---------------------------------------------------------------- virtio-9p shares (--share on KVM)


P9_REQ, P9_RESP = 0x38000, 0x3C000  # 16 requests and their replies, clear of the rings


def _p9_requests(mem: object, messages: list[bytes]) -> None:
    """Each 9P message as a two-descriptor chain (the request, then 0x400 bytes for its reply),
    all offered in the avail ring at once."""
    write = mem.write  # type: ignore[attr-defined]
    for i, msg in enumerate(messages):
        req, resp = P9_REQ + 0x400 * i, P9_RESP + 0x400 * i
        write(req, msg)
        write(DESC + 16 * 2 * i, struct.pack("<QIHH", req, len(msg), 1, 2 * i + 1))
        write(DESC + 16 * (2 * i + 1), struct.pack("<QIHH", resp, 0x400, 2, 0))
        write(AVAIL + 4 + 2 * i, struct.pack("<H", 2 * i))
    write(AVAIL, struct.pack("<HH", 0, len(messages)))


def _p9_reply(mem: object, i: int) -> tuple[int, bytes]:
    """Reply i's type and body."""
    from numavm.devices.p9 import wire
    raw = mem.read(P9_RESP + 0x400 * i, 0x400)  # type: ignore[attr-defined]
    size, kind, _tag = wire.HEADER.unpack_from(raw)
    return kind, raw[wire.HEADER_SIZE:size]


@needs_kvm
def test_virtio_9p_shares_serve_the_host_directories_to_a_guest_driver(tmp_path: Path) -> None:
    """Two shares on the KVM machine (numavm.plan.layout.with_shares): a guest program brings up
    the rw one's queue and notifies once for a whole session (version, attach, walk, open, read,
    create, write, clunk); the replies are the host file's bytes, the write lands on the host,
    the read-only share's device says its tag.  Every descriptor (roots, fids) and the
    RLIMIT_NOFILE are back after the machine closes, and its I/O threads are named."""
    import resource

    from numavm.devices.p9 import wire
    from numavm.plan.layout import with_shares
    from numavm.plan.pci import VIRTIO_9P, ecam_address
    from numavm.spec.shares import parse_shares
    from numavm.vmm.kvm.machine import KvmMachine

    ro_dir, rw_dir = tmp_path / "ro", tmp_path / "rw"
    ro_dir.mkdir()
    rw_dir.mkdir()
    (rw_dir / "file").write_bytes(b"from the host\n")
    shares = parse_shares([str(ro_dir), f"{rw_dir}:/data,rw"])
    layout = with_shares(_pci_layout(tmp_path, f"{_image(tmp_path)},domain=1"), len(shares))
    d0, d1 = layout.pci.of_kind(VIRTIO_9P)
    assert (d0.domain, d0.bus, d1.slot) == (0, 4, 1)  # a bridge after the disk's, the boot vCPU's domain
    cfg, bar = ecam_address(d1.bus, d1.slot, 0), d1.bar0
    fds, threads, nofile = _fds(), _threads(), resource.getrlimit(resource.RLIMIT_NOFILE)
    msgs = [wire.message(wire.TVERSION, wire.NOTAG, wire.Encoder().u32(8192).string(b"9P2000.L").bytes()),
            wire.message(wire.TATTACH, 1, wire.Encoder().u32(0).u32(wire.NOFID).string(b"").string(b"").u32(0).bytes()),
            wire.message(wire.TWALK, 2, wire.Encoder().u32(0).u32(1).u16(1).string(b"file").bytes()),
            wire.message(wire.TLOPEN, 3, wire.Encoder().u32(1).u32(0).bytes()),
            wire.message(wire.TREAD, 4, wire.Encoder().u32(1).u64(0).u32(100).bytes()),
            wire.message(wire.TWALK, 5, wire.Encoder().u32(0).u32(2).u16(0).bytes()),
            wire.message(wire.TLCREATE, 6, wire.Encoder().u32(2).string(b"new").u32(2).u32(0o644).u32(0).bytes()),
            wire.message(wire.TWRITE, 7, wire.Encoder().u32(2).u64(0).u32(6).bytes() + b"guest\n"),
            wire.message(wire.TCLUNK, 8, wire.Encoder().u32(2).bytes())]
    seen: set[str] = set()
    with KvmMachine(layout, name="p9", shares=shares) as m:
        assert m.pci is not None and m.memory is not None
        fn0, fn1 = (dev.fn for dev in m.pci.devices[1:])
        assert [fn0.device.tag, fn1.device.tag] == ["numavm-share0", "numavm-share1"]  # type: ignore[attr-defined]
        assert fn0.device.readonly and not fn1.device.readonly  # type: ignore[attr-defined]
        assert fn1.device.server.cross_mounts  # type: ignore[attr-defined]
        _p9_requests(m.memory, msgs)

        class Spy(Recorder):
            def read(self, offset: int, size: int) -> int:
                seen.update(t.name for t in threading.enumerate())  # while the vCPU runs
                return 0

        m.bus.register(0x94, 3, Spy(m))
        rec = run_script(m, [(PIN, 0x94, 0), *_virtio_setup(cfg, bar, _msix_control(fn1), 0x43),
                             (W16, bar + NOTIFY, 0), (WAIT, 0, 0), (R16, USED + 2, 0)])
        assert rec.events[2:] == [("value", 128), ("irq", 0x43), ("value", len(msgs))]
        kinds = [_p9_reply(m.memory, i)[0] for i in range(len(msgs))]
        assert kinds == [k + 1 for k in (wire.TVERSION, wire.TATTACH, wire.TWALK,
                                         wire.TLOPEN, wire.TREAD, wire.TWALK,
                                         wire.TLCREATE, wire.TWRITE, wire.TCLUNK)]
        body = _p9_reply(m.memory, 4)[1]
        assert body[4:4 + int.from_bytes(body[:4], "little")] == b"from the host\n"
        assert int.from_bytes(_p9_reply(m.memory, 7)[1], "little") == 6
    assert (rw_dir / "new").read_bytes() == b"guest\n"
    assert {"p9-virtio-9p0", "p9-virtio-9p1", "p9-virtio-blk0"} <= seen
    assert _fds() == fds and _threads() == threads and resource.getrlimit(resource.RLIMIT_NOFILE) == nofile


@needs_kvm
def test_a_share_that_went_away_is_refused_before_guest_memory_exists(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from numavm.host.memory import guestmap
    from numavm.plan.layout import with_shares
    from numavm.spec.shares import parse_shares
    from numavm.vmm.kvm.machine import KvmMachine

    gone = tmp_path / "gone"
    gone.mkdir()
    shares = parse_shares([str(gone)])
    gone.rmdir()
    layout = with_shares(_pci_layout(tmp_path), 1)
    made: list[object] = []
    monkeypatch.setattr(guestmap.GuestMemory, "__post_init__", lambda self: made.append(self))
    fds = _fds()
    with pytest.raises(ConfigError, match=rf"^--share {gone}: no such file or directory"):
        KvmMachine(layout, shares=shares)
    assert made == [] and _fds() == fds


def test_fid_budget_raises_the_soft_limit_and_puts_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """RLIMIT_NOFILE's soft limit (often 1024) is raised toward what the shares' fids need, as
    far as the hard limit goes (further only where numavm may raise that too); the fids per
    share follow what it allows; too little room is a one-line refusal; the limit goes back."""
    import resource

    from numavm.host import shares as H

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = before[1]
    low = H._open_fds() + H.FD_RESERVE + 16
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        fids, old = H.fid_budget(2, 1 << 16)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert old == (low, hard) and soft > low
        assert H.MIN_FIDS <= fids <= (soft - H.FD_RESERVE) // 4
        H.restore_nofile(old)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (low, hard)
        monkeypatch.setattr(H, "_open_fds", lambda: 1 << 40)  # no room whatever the limits
        with pytest.raises(ConfigError, match=r"^--share: RLIMIT_NOFILE \(\d+\) leaves room for 0 open files"):
            H.fid_budget(1, 1 << 16)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (low, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
