"""Devices under the TCG engine: QEMU's expander bridges and virtio-blk-pci at the plan's BDFs.

The unit tests read the QEMU arguments and numavm's _PXM SSDT (through `iasl -d`); the guest
tests boot Linux under QEMU (numavm's initramfs loads the virtio modules Debian 12's kernel
needs) and read back what the plan promised: each disk's PCI address and node, its bytes, a
write and a flush reaching the file, a read-only disk refusing writes, a generic initiator's
node.  `numavm check` with disks under TCG is tests/test_guest_devices.py's (it compares each
device's node and the generic initiators through this engine).
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
from numavm.host.disk import DiskImage, open_disks
from numavm.spec.devices import Disk
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


# Per virtio disk the guest saw: its PCI address, node, read-only flag, cache mode and contents'
# digest; then to the disk at WRITE_BDF a write with a flush and one without, and a write to
# each read-only disk (Linux probes the disks in no fixed order: vda is not always the same one).
GUEST_SCRIPT = r"""
for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  p=$(readlink -f $b/device/..)
  echo "disk ${p##*/} node=$(cat $p/numa_node) ro=$(cat $b/ro) cache=$(cat $b/queue/write_cache | tr ' ' -)" \
       "md5=$(md5sum < /dev/${b##*/} | cut -d' ' -f1)"
  if [ "${p##*/}" = WRITE_BDF ]; then
    printf numavm-guest-wrote | dd of=/dev/${b##*/} bs=512 seek=5 conv=sync,fsync 2>/dev/null && echo "wrote ${p##*/}"
    printf unflushed | dd of=/dev/${b##*/} bs=512 seek=6 conv=sync oflag=direct 2>/dev/null
  elif [ "$(cat $b/ro)" = 1 ]; then
    printf x | dd of=/dev/${b##*/} bs=512 conv=sync,fsync 2>/dev/null; echo "ro-write ${p##*/} status=$?"
  fi
done
echo "gi=$(cat /sys/devices/system/node/has_generic_initiator 2>/dev/null)"
"""


def numavm(*args: str, timeout: float = 600, tmpdir: Path | None = None,
           wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run([*(wrap or []), sys.executable, "-m", "numavm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@needs_qemu
def test_guest_sees_each_disk_on_its_node_reads_writes_and_flushes(tmp_path: Path) -> None:
    """One boot: a read-write disk on domain 1, a read-only one on domain 0, an initiator on a
    domain without memory or vCPUs; each at its planned BDF on its node, the bytes the file's."""
    rw = image(tmp_path / "rw.img", 4 << 20)
    ro = image(tmp_path / "ro.img", 1 << 20)
    gi = image(tmp_path / "gi.img", 1 << 20)
    before = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in (rw, ro, gi)}
    machine = ["-c", "2", "-n", TWO[0], "-n", TWO[1], "-n", "id=2,size=0",
               "--disk", f"{rw},domain=1", "--disk", f"{ro},domain=0,readonly", "--disk", f"{gi},domain=2,initiator"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # Where strace is, it counts QEMU's fdatasyncs of the image (cheaply: a seccomp filter stops
    # only that call): the guest's flush is one, QEMU's own at exit for the unflushed write after
    # it the other; a flush QEMU did not pass on would leave only the second.
    strace, log = shutil.which("strace"), tmp_path / "strace.log"
    wrap = [strace, "-f", "-qq", "--seccomp-bpf", "-y", "-e", "trace=fdatasync", "-o", str(log)] if strace else None
    r = numavm("run", "--accel", "tcg", "--timeout", "300", "--verbose", *machine, "--", "sh", "-c",
               GUEST_SCRIPT.replace("WRITE_BDF", "0000:04:00.0"), tmpdir=scratch, wrap=wrap)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    # --verbose shows QEMU's arguments; nothing is left behind: no temporary directory (SSDT,
    # FIFOs), and the images' locks went with numavm and QEMU
    (qemu,) = [ln for ln in r.stderr.splitlines() if ln.startswith("qemu: ")]
    assert "-device pxb,id=pxb4,bus_nr=3,bus=pci.0" in qemu and "/dev/fdset/2" in qemu
    assert list(scratch.iterdir()) == []
    for d in open_disks([Disk(str(p)) for p in (rw, gi)]):
        d.close()
    plan = {d.bdf: d for d in Machine(cpus=2, domains=TWO + ["id=2,size=0"],
                                      disks=[f"{rw},domain=1", f"{ro},domain=0,readonly",
                                             f"{gi},domain=2,initiator"]).layout.pci.devices}
    seen = {}
    for line in r.stdout.splitlines():
        if line.startswith("disk "):
            bdf, *fields = line.split()[1:]
            seen[bdf] = dict(f.split("=", 1) for f in fields)
    assert sorted(seen) == sorted(plan) == ["0000:02:00.0", "0000:04:00.0", "0000:06:00.0"], r.stdout
    paths = [rw, ro, gi]
    for bdf, dev in plan.items():
        assert seen[bdf]["node"] == str(dev.domain), (bdf, r.stdout)
        assert seen[bdf]["ro"] == ("1" if dev.index == 1 else "0")
        assert seen[bdf]["md5"] == before[paths[dev.index]]  # the guest read the file's bytes
    # the device offers a volatile write cache, so Linux flushes (QEMU: fdatasync on the image)
    assert seen["0000:04:00.0"]["cache"] == "write-back"
    assert "wrote 0000:04:00.0" in r.stdout and "ro-write 0000:02:00.0 status=1" in r.stdout, r.stdout
    with open(rw, "rb") as f:
        f.seek(5 * 512)
        assert f.read(1024) == b"numavm-guest-wrote".ljust(512, b"\0") + b"unflushed".ljust(512, b"\0")
    if strace:
        syncs = [ln for ln in log.read_text().splitlines() if "fdatasync(" in ln and f"<{rw}>" in ln]
        assert len(syncs) == 2, log.read_text()
    assert hashlib.md5(ro.read_bytes()).hexdigest() == before[ro]
    assert "gi=2" in r.stdout, r.stdout


def test_more_bridges_than_qemus_root_bus_takes_is_refused() -> None:
    doms = ["id=0,size=4M,cpus=0"] + [f"id={i},size=4M" for i in range(1, 31)]
    fits = Machine(cpus=1, domains=doms[:30], disks=[f"d{i}.img,domain={i}" for i in range(30)]).layout
    T.check_tcg(fits)  # 30 pxbs: slots 2..31 of QEMU's bus 0
    over = Machine(cpus=1, domains=doms, disks=[f"d{i}.img,domain={i}" for i in range(31)]).layout
    with pytest.raises(T.EngineRefusal, match="at most 30 expander bridges.*31 domains; use --accel kvm"):
        T.check_tcg(over)


def test_a_block_device_takes_qemus_host_device_driver(tmp_path: Path) -> None:
    pci = Machine(disks=["/dev/x"]).layout.pci
    args = T.pci_args(pci, [DiskImage("/dev/x", -1, 1 << 20, readonly=True, block_device=True)])
    assert args[args.index("-blockdev") + 1].startswith("driver=host_device,node-name=file0,filename=/dev/fdset/0,")


@needs_qemu
def test_qemu_opens_a_loop_device_disk(tmp_path: Path) -> None:
    """QEMU starts (-S: no guest) on a block device's fd; skipped where no loop device can be made."""
    backing = image(tmp_path / "loop.img", 4 << 20)
    losetup = shutil.which("losetup")
    r = subprocess.run([losetup, "-f", "--show", str(backing)], capture_output=True, text=True) if losetup else None
    if r is None or r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip() if r else 'no losetup'}")
    dev = r.stdout.strip()
    try:
        (disk,) = open_disks([Disk(dev, readonly=True)])
        try:
            assert disk.block_device
            argv = [QEMU, "-M", "pc", "-nodefaults", "-display", "none", "-S", "-monitor", "stdio",
                    *T.pci_args(Machine(disks=[f"{dev},readonly"]).layout.pci, [disk])]
            q = subprocess.run(argv, input="quit\n", capture_output=True, text=True, pass_fds=(disk.fd,), timeout=60)
            assert q.returncode == 0, q.stderr
        finally:
            disk.close()
    finally:
        subprocess.run([losetup, "-d", dev], check=False)
