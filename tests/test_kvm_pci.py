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
