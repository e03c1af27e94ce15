"""Devices under the TCG engine: QEMU's expander bridges and virtio-blk-pci at the plan's BDFs.

The unit tests read the QEMU arguments and numavm's _PXM SSDT (through `iasl -d`); the guest
test boots Linux once under QEMU and reads back what the plan promised: each disk's PCI
address and node, its bytes, a write and a flush reaching the file, a read-only disk refusing
writes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from numavm.api import Machine
from numavm.errors import ConfigError
from numavm.host.disk import open_disks
from numavm.vmm import tcg as T

QEMU = shutil.which("qemu-system-x86_64")
IASL = shutil.which("iasl")
TWO = ["id=0,size=256M,cpus=0", "id=1,size=256M,cpus=1"]
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86)")


def image(path: Path, size: int = 1 << 20, data: bytes | None = None) -> Path:
    path.write_bytes(data if data is not None else os.urandom(size))
    return path


def test_bridge_per_domain_pxb_below_the_plans_bus_devices_at_its_slots(tmp_path: Path) -> None:
    m = Machine(cpus=2, domains=TWO + ["id=2,size=0"],
                disks=[f"{image(tmp_path / 'a')},domain=1", f"{image(tmp_path / 'b')},domain=2,initiator",
                       f"{image(tmp_path / 'c')},domain=1,readonly"])
    pci = m.layout.pci
    disks = open_disks(m.topology.disks)
    try:
        args = T.pci_args(pci, disks)
        opened = [d.fd for d in disks]
    finally:
        for d in disks:
            d.close()
    devices = [args[k + 1] for k, a in enumerate(args) if a == "-device"]
    # bridge k: the plan's bus 2k+2 is the bus behind QEMU's pxb on 2k+1
    assert devices[:2] == ["pxb,id=pxb2,bus_nr=1,bus=pci.0", "pxb,id=pxb4,bus_nr=3,bus=pci.0"]
    assert devices[2:] == [
        "virtio-blk-pci,id=vd0,drive=disk0,bus=pxb2,addr=0x0,disable-legacy=on",
        "virtio-blk-pci,id=vd1,drive=disk1,bus=pxb4,addr=0x0,disable-legacy=on",
        "virtio-blk-pci,id=vd2,drive=disk2,bus=pxb2,addr=0x1,disable-legacy=on"]
    assert [d.bdf for d in pci.devices] == ["0000:02:00.0", "0000:04:00.0", "0000:02:01.0"]
    fds = [args[k + 1] for k, a in enumerate(args) if a == "-add-fd"]
    assert fds == [f"fd={fd},set={k}" for k, fd in enumerate(opened)]
    blockdevs = [args[k + 1] for k, a in enumerate(args) if a == "-blockdev"]
    assert blockdevs[0] == "driver=file,node-name=file0,filename=/dev/fdset/0,read-only=off,locking=off"
    assert blockdevs[5] == "driver=raw,node-name=disk2,file=file2,read-only=on"


def test_pxm_ssdt_names_qemus_pxb_root_buses(tmp_path: Path) -> None:
    if IASL is None:
        pytest.skip("needs iasl (apt-get install acpica-tools)")
    m = Machine(cpus=2, domains=TWO + ["id=2,size=0"],
                disks=["a.img,domain=1", "b.img,domain=2,initiator", "c.img,domain=1"])
    blob = T.pxm_ssdt(m.layout.pci)
    assert blob is not None and blob[:4] == b"SSDT" and sum(blob) % 256 == 0
    (tmp_path / "ssdt.dat").write_bytes(blob)
    r = subprocess.run([IASL, "-d", "ssdt.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    dsl = (tmp_path / "ssdt.dsl").read_text()
    assert "Scope (\\_SB.PC01)" in dsl and "Scope (\\_SB.PC03)" in dsl, dsl
    body = dsl[dsl.index("Scope (\\_SB.PC03)"):]
    assert "Name (_PXM, 0x02)" in body, dsl


def test_no_pxm_without_numa_and_no_pci_without_disks() -> None:
    assert T.pxm_ssdt(Machine(disks=["a.img"]).layout.pci) is None  # no SRAT: nothing to name
    assert T.pxm_ssdt(Machine(cpus=2, domains=TWO).layout.pci) is None
    assert T.pci_args(Machine(cpus=2, domains=TWO).layout.pci, []) == []


@needs_qemu
def test_firmware_qboot_without_devices_seabios_with(tmp_path: Path) -> None:
    plain = Machine(cpus=2, domains=TWO).layout
    with T.QemuMachine(plain) as q:
        argv, _ = q.command(Path("/vmlinux"), None, "")
    assert ("-bios" in argv) == T.QBOOT.exists()
    assert not any(a.startswith("pxb") or "virtio" in a for a in argv)
    disk = image(tmp_path / "d.img")
    with T.QemuMachine(Machine(cpus=2, domains=TWO, disks=[f"{disk},domain=1"]).layout) as q:
        argv, _ = q.command(Path("/vmlinux"), None, "")
        (fd,) = [d.fd for d in q.disks]
        assert "-bios" not in argv  # SeaBIOS numbers the bus behind the pxb; qboot does not
        assert f"fd={fd},set=0" in argv and os.readlink(f"/proc/self/fd/{fd}") == str(disk)
        tables = [argv[k + 1] for k, a in enumerate(argv) if a == "-acpitable"]
        assert [Path(t).name for t in tables] == ["SRAT.dat", "SLIT.dat", "SSDT.dat"]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the machine


@needs_qemu
def test_a_refused_image_allocates_nothing(tmp_path: Path) -> None:
    layout = Machine(cpus=2, domains=TWO, disks=[f"{tmp_path / 'missing.img'},domain=1"]).layout
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match="missing.img: no such file"):
        T.QemuMachine(layout)
    assert set(os.listdir("/proc/self/fd")) <= before  # no memfd, no disk fd left open
