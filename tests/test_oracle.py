"""The independent oracle: Linux under QEMU (TCG) reading numavm's SRAT and SLIT.

QEMU builds the rest of the ACPI tables (no ``-numa`` options, so no SRAT of
its own); numavm's SRAT and SLIT go in with ``-acpitable``, RAM lies where
numavm's layout puts it (``max-ram-below-4g=3G``), and ``-smp`` numbers the
vCPUs with the plan's APIC ids.  The Debian kernel boots to numavm's own
initramfs, whose /init prints what sysfs says; `guestcheck.compare_userspace`
holds it against the plan.  Plus unit tests for the pieces: the cpio writer,
the console parser, the PXM -> node rule, the .deb reader.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from numavm.guest import assets as A
from numavm.spec import config
from numavm.check import compare as G
from numavm.guest import initramfs as I
from numavm.plan.acpi import build_tables
from numavm.errors import NumavmError
from numavm.guest.launch import tcg_cmdline
from numavm.plan.layout import QEMU_PC_MACHINE, Layout, plan_layout
from numavm.plan.render import plan_document
from numavm.vmm.tcg import NUMA_TABLES, QEMU_CPU, tcg_topology
from numavm.spec.topology import MachineSpec, Topology, parse_distance, parse_numa

MiB = 1 << 20
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 420  # seconds; the 64-vCPU guest takes ~25 s alone on an idle core


def read_cpio_newc(data: bytes) -> list[I.Entry]:
    """Parse a ``newc`` archive back into entries (trailer excluded)."""
    out: list[I.Entry] = []
    pos = 0
    while True:
        hdr = data[pos:pos + 110]
        if len(hdr) < 110 or hdr[:6] != b"070701":
            raise ValueError(f"bad cpio newc header at offset {pos}")
        f = [int(hdr[6 + 8 * k:14 + 8 * k], 16) for k in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize
        data_start += -data_start & 3
        body = data[data_start:data_start + size]
        pos = data_start + size
        pos += -pos & 3
        if name == "TRAILER!!!":
            return out
        out.append(I.Entry(name, mode, body, (rmaj, rmin)))


# ================================================================ unit tests: cpio


def _fake_busybox(tmp_path: Path) -> Path:
    p = tmp_path / "busybox"
    p.write_bytes(b"\x7fELF" + bytes(range(256)) * 3 + b"tail")  # odd length: padding matters
    return p


def test_cpio_newc_format_and_roundtrip() -> None:
    entries = [
        I.Entry("bin", stat.S_IFDIR | 0o755),
        I.Entry("bin/a", stat.S_IFREG | 0o755, b"abc"),  # 3 bytes: data padded by 1
        I.Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        I.Entry("dev", stat.S_IFDIR | 0o755),
        I.Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        I.Entry("empty", stat.S_IFREG | 0o644, b""),
    ]
    blob = I.cpio_newc(entries)
    assert blob[:6] == b"070701" and len(blob) % 4 == 0
    # first header: 13 fields of 8 hex digits; namesize counts the NUL
    fields = [int(blob[6 + 8 * k:14 + 8 * k], 16) for k in range(13)]
    assert fields[1] == stat.S_IFDIR | 0o755 and fields[5] == I.MTIME and fields[11] == len("bin") + 1
    assert (110 + 4) % 4 == 2 and blob[110:114] == b"bin\0" and blob[114:116] == b"\0\0"
    assert b"TRAILER!!!\0" in blob[-128:]
    assert read_cpio_newc(blob) == entries


def test_cpio_listed_by_busybox(assets: A.Assets, tmp_path: Path) -> None:
    """An independent reader: the static busybox's cpio lists and extracts the archive."""
    img = I.build_initramfs(assets.busybox, ["echo", "hi"], compress="none")
    archive = tmp_path / "a.cpio"
    archive.write_bytes(img)
    r = subprocess.run([str(assets.busybox), "cpio", "-t"], stdin=archive.open("rb"),
                       capture_output=True, text=True, check=True)
    listed = set(r.stdout.split())
    assert {"init", "bin/busybox", "bin/sh", "dev/console", "etc/numavm/argv/0"} <= listed
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([str(assets.busybox), "cpio", "-i", "-d"], stdin=archive.open("rb"), cwd=out,
                   capture_output=True, check=True)
    assert (out / "bin/busybox").read_bytes() == assets.busybox.read_bytes()
    assert os.readlink(out / "bin/sh") == "busybox"
    assert (out / "init").read_text() == I.INIT_SCRIPT
    assert (out / "etc/numavm/argv/1").read_text() == "hi"


def test_initramfs_deterministic_gzip(tmp_path: Path) -> None:
    bb = _fake_busybox(tmp_path)
    a = I.build_initramfs(bb, ["sh", "-c", "exit 3"])
    b = I.build_initramfs(bb, ["sh", "-c", "exit 3"])
    assert a == b and a[:2] == b"\x1f\x8b" and a[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    entries = read_cpio_newc(gzip.decompress(a))
    names = [e.path for e in entries]
    assert names == sorted(names, key=lambda p: p.split("/"))  # parents first, stable order
    for parent in {n.rsplit("/", 1)[0] for n in names if "/" in n}:
        assert names.index(parent) < min(names.index(n) for n in names if n.startswith(parent + "/"))
    xz = I.build_initramfs(bb, None, compress="xz")
    assert gzip.decompress(a) != lzma.decompress(xz)  # no command: no argv files
    with pytest.raises(NumavmError):
        I.build_initramfs(bb, compress="zstd")


def test_initramfs_command_is_data_not_script(tmp_path: Path) -> None:
    bb = _fake_busybox(tmp_path)
    argv = ["printf", "%s|", "a b", "$(reboot)", "'\"", "trailing\n\n", ""]
    entries = {e.path: e for e in I.initramfs_entries(bb, argv)}
    assert entries["init"].data.decode() == I.INIT_SCRIPT  # the script never changes
    got = [entries[f"etc/numavm/argv/{k}"].data.decode() for k in range(len(argv))]
    assert got == argv and f"etc/numavm/argv/{len(argv)}" not in entries
    assert entries["dev/console"].rdev == (5, 1) and stat.S_ISCHR(entries["dev/console"].mode)
    assert entries["bin/sh"].data == b"busybox" and stat.S_ISLNK(entries["bin/sh"].mode)
    with pytest.raises(NumavmError):
        I.initramfs_entries(bb, ["a\0b"])
    with pytest.raises(NumavmError):
        I.initramfs_entries(bb, [])


def test_initramfs_adds_files_and_their_libraries(tmp_path: Path) -> None:
    ls = Path(shutil.which("ls") or "/bin/ls")
    if not I.shared_libraries(ls):
        pytest.skip(f"{ls} is not dynamically linked here")
    bb = _fake_busybox(tmp_path)
    data = tmp_path / "data.txt"
    data.write_text("hello")
    entries = {e.path: e for e in I.initramfs_entries(bb, ["/opt/ls"], [(ls, "/opt/ls"), (data, "etc/x")])}
    assert entries["opt/ls"].data == ls.read_bytes()
    assert entries["etc/x"].data == b"hello"
    libs = I.shared_libraries(ls)
    assert any("ld-linux" in lib for lib in libs) and any("libc.so" in lib for lib in libs)
    for lib in libs:
        e = entries[lib.lstrip("/")]
        assert e.data == Path(lib).read_bytes() and stat.S_ISREG(e.mode)
    with pytest.raises(NumavmError):
        I.initramfs_entries(bb, None, [(data, "../escape")])


def test_parse_ldd() -> None:
    out = ("\tlinux-vdso.so.1 (0x00007ffd3b5f2000)\n"
           "\tlibnuma.so.1 => /lib/x86_64-linux-gnu/libnuma.so.1 (0x00007f0e1c000000)\n"
           "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0e1be00000)\n"
           "\t/lib64/ld-linux-x86-64.so.2 (0x00007f0e1c02a000)\n")
    assert I.parse_ldd(out) == ["/lib/x86_64-linux-gnu/libnuma.so.1", "/lib/x86_64-linux-gnu/libc.so.6",
                                "/lib64/ld-linux-x86-64.so.2"]
    with pytest.raises(NumavmError):
        I.parse_ldd("\tlibfoo.so.1 => not found\n")


# ================================================================ unit tests: console parsing


REPORT = {"nodes": {"0": {"cpulist": "0-1", "memtotal_kb": 985208, "distance": [10, 20]},
                    "1": {"cpulist": "2-3", "memtotal_kb": 1031520, "distance": [20, 10]}},
          "online_cpus": "0-3", "online_nodes": "0-1", "acpi_tables": ["APIC", "SLIT", "SRAT"],
          "cmdline": "console=ttyS0 \"q\" \\"}


def _console(block: str, tail: str = "\n@@NUMAVM-EXIT 0@@\n") -> str:
    return ("[    0.000000] Linux version 6.1.0\nnoise\n"
            f"\n{I.TOPOLOGY_BEGIN}\n{block}\n{I.TOPOLOGY_END}\n{tail}[    3.8] reboot: Power down\n")


def test_parse_guest_report_clean_and_crlf() -> None:
    text = _console(json.dumps(REPORT, separators=(",", ":")), "out\n@@NUMAVM-EXIT 3@@\n")
    for t in (text, text.replace("\n", "\r\n")):
        rep = I.parse_guest_report(t)
        assert rep is not None and rep["exit_status"] == 3
        assert rep["streams"] is True  # no NO-STREAMS mark: the command had its own ports
        assert {k: v for k, v in rep.items() if k not in ("exit_status", "streams")} == REPORT


def test_parse_guest_report_kernel_lines_interleaved() -> None:
    line = json.dumps(REPORT, separators=(",", ":"))
    cut = line.index('"memtotal_kb":1031520') + 8
    noisy = line[:cut] + "[    3.123456] random: crng init done\n" + line[cut:]
    block = "[    2.5] clocksource: Switched\n" + noisy
    rep = I.parse_guest_report(_console(block))
    assert rep is not None and rep["nodes"]["1"]["memtotal_kb"] == 1031520 and rep["exit_status"] == 0


def test_parse_guest_report_missing_pieces() -> None:
    assert I.parse_guest_report("") is None
    assert I.parse_guest_report(f"{I.TOPOLOGY_BEGIN}\n{{\"nodes\": {{}}") is None  # cut off
    rep = I.parse_guest_report(_console(json.dumps(REPORT), tail=""))
    assert rep is not None and rep["exit_status"] is None  # powered off before the command ended
    two = _console('{"nodes": {}, "n": 1}') + _console('{"nodes": {}, "n": 2}')
    assert I.parse_guest_report(two)["n"] == 2  # type: ignore[index]


# ================================================================ unit tests: the PXM -> node rule


DMESG = """\
[    0.028649] SRAT: PXM 1 -> APIC 0x00 -> Node 0
[    0.028688] SRAT: PXM 1 -> APIC 0x01 -> Node 0
[    0.028697] SRAT: PXM 2 -> X2APIC 0x0100 -> Node 1
[    0.028831] ACPI: SRAT: Node 2 PXM 0 [mem 0x00000000-0x1fffffff]
[    0.028872] ACPI: SRAT: Node 0 PXM 1 [mem 0x20000000-0x5fffffff]
"""


def test_pxm_to_node_from_log() -> None:
    assert G.pxm_to_node_from_log(DMESG) == {1: 0, 2: 1, 0: 2}
    assert G.pxm_to_node_from_log("no numa here") == {}


def _topo(nums: list[str], dists: tuple[str, ...] = (), cpus: int | None = None,
          memory: int | None = None) -> Topology:
    spec = MachineSpec(cpus=cpus, memory=memory, domains=[parse_numa(n) for n in nums],
                       distances=[parse_distance(d) for d in dists])
    return spec.build(host_nodes=(0,))


def test_pxm_to_node_rule_on_numavm_srat() -> None:
    """Memory-only domain 0 first: Linux calls the vCPU domain node 0."""
    topo = _topo(["id=0,size=512M", "id=1,size=1G,cpus=0-1", "id=2,size=0,cpus=2-3"])
    layout = plan_layout(topo)
    srat = build_tables(layout).blobs()["SRAT"]
    want = {1: 0, 2: 1, 0: 2}
    assert G.pxm_to_node_from_srat(srat) == want
    assert G.pxm_to_node_from_plan(plan_document(layout)) == want


def test_compare_userspace_finds_differences() -> None:
    topo = _topo(["id=0,size=1G,cpus=0-1", "id=1,size=1G,cpus=2-3"], ("0:1=20", "1:0=30"))
    doc = plan_document(plan_layout(topo))
    good = {"nodes": {"0": {"cpulist": "0-1", "memtotal_kb": 985212, "distance": [10, 20]},
                      "1": {"cpulist": "2-3", "memtotal_kb": 1031520, "distance": [30, 10]}},
            "online_cpus": "0-3", "online_nodes": "0-1", "cpu_apic_ids": {"0": 0, "1": 1, "2": 2, "3": 3}}
    assert G.compare_userspace(doc, good, {0: 0, 1: 1}) == []
    swapped = {"nodes": {"1": good["nodes"]["0"], "0": good["nodes"]["1"]}}  # type: ignore[index]
    assert G.compare_userspace(doc, swapped, {0: 0, 1: 1})  # CPUs and distances differ
    bad = json.loads(json.dumps(good))
    bad["nodes"]["1"]["memtotal_kb"] = 1048577  # more than the domain has
    bad["nodes"]["0"]["distance"] = [10, 30]
    bad["nodes"]["0"]["cpulist"] = "0"
    out = G.compare_userspace(doc, bad, {0: 0, 1: 1})
    assert len(out) == 4 and any("MemTotal" in m for m in out) and any("APIC ids 0," in m for m in out)
    assert any("CPUs" in m for m in out) and any("distances" in m for m in out)
    one = {"nodes": {"0": good["nodes"]["0"]}, "online_nodes": "0"}  # type: ignore[index]
    assert any("nodes:" in m for m in G.compare_userspace(doc, one, {0: 0, 1: 1}))
    # right CPU numbers on the right nodes, but the vCPUs' APIC ids crossed over between domains
    crossed = dict(good, cpu_apic_ids={"0": 0, "1": 2, "2": 1, "3": 3})
    out = G.compare_userspace(doc, crossed, {0: 0, 1: 1})
    assert out == ["domain 0 (node 0): APIC ids 0,2, plan wants 0-1",
                   "domain 1 (node 1): APIC ids 1,3, plan wants 2-3"]
    assert G.compare_userspace(doc, {k: v for k, v in good.items() if k != "cpu_apic_ids"},
                               {0: 0, 1: 1}) == ["the guest's report has no APIC ids (cpu_apic_ids)"]


def test_apic_and_pxm_maps_from_the_guests_sysfs() -> None:
    """Linux 6.12 logs no processor affinity: APIC -> node and a CPU-only domain's node come
    from the report (node cpulists and each CPU's APIC id)."""
    doc = plan_document(plan_layout(_topo(["id=0,size=512M", "id=1,size=0,cpus=0-1",
                                           "id=2,size=512M,cpus=2"])))
    rep = {"nodes": {"0": {"cpulist": "0-1"}, "1": {"cpulist": "2"}, "2": {"cpulist": ""}},
           "cpu_apic_ids": {"0": 0, "1": 1, "2": 2}}
    apics = {d["id"]: d["apic_ids"] for d in doc["domains"]}
    assert G.apic_to_node_from_report(rep) == {a: n for n, d in ((0, 1), (1, 2)) for a in apics[d]}
    from_log = {2: 1, 0: 2}  # 6.12 logs only the domains with memory
    assert G.guest_pxm_to_node(doc, from_log, rep) == {1: 0, 2: 1, 0: 2} == G.pxm_to_node_from_plan(doc)
    split = dict(rep, nodes={"0": {"cpulist": "0"}, "1": {"cpulist": "1-2"}, "2": {"cpulist": ""}})
    assert G.guest_pxm_to_node(doc, from_log, split) == from_log  # domain 1 split: no node to give it


def test_memory_bounds() -> None:
    doc = plan_document(plan_layout(_topo(["id=0,size=2G,cpus=0", "id=1,size=3G,cpus=1"])))
    b = G.memory_bounds(doc)
    assert b[0][1] == 2 * 1024 * 1024 and b[1][1] == 3 * 1024 * 1024
    assert any("kernel image" in w for w in b[0][2]) and not any("swiotlb" in w for w in b[0][2])
    assert any("swiotlb" in w for w in b[1][2])  # it holds the top of low RAM, and RAM passes 4G
    # a node's allowance stays a fraction of a big node
    assert b[1][0] > 0.95 * 3 * 1024 * 1024


def test_qemu_smp_matches_apic_ids() -> None:
    layout = plan_layout(config.example().build(host_nodes=(0,)))
    assert tcg_topology(layout) == (["4,sockets=2,cores=2,threads=1,maxcpus=4"], [])
    uneven = plan_layout(_topo(["id=0,size=1G,cpus=0-2", "id=1,size=1G,cpus=3"]))
    # APIC ids 0,1,2,4: the boot vCPU from -smp, the others placed by socket and core,
    # empty sockets past 8 possible CPUs (see tcg_topology)
    assert tcg_topology(uneven) == (["1,sockets=3,cores=4,threads=1,maxcpus=12"],
                                    ["qemu64-x86_64-cpu,socket-id=0,core-id=1,thread-id=0",
                                     "qemu64-x86_64-cpu,socket-id=0,core-id=2,thread-id=0",
                                     "qemu64-x86_64-cpu,socket-id=1,core-id=0,thread-id=0"])


# ================================================================ unit tests: assets


def _deb(files: dict[str, bytes]) -> bytes:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", tar_buf.getvalue())]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" * (len(data) & 1)
    return out


def test_deb_extraction(tmp_path: Path) -> None:
    deb = tmp_path / "k.deb"
    deb.write_bytes(_deb({"./boot/config-6.1.0-9": b"cfg", "./boot/vmlinuz-6.1.0-9-amd64": b"KERNEL",
                          "./lib/modules/x": b"m"}))
    name, data = A._extract_one(deb, A.KERNEL_FILE)
    assert (name, data) == ("vmlinuz-6.1.0-9-amd64", b"KERNEL")
    with pytest.raises(NumavmError):
        A._extract_one(deb, A.BUSYBOX_FILE)


def test_deb_extract_matching_takes_every_match_by_its_group(tmp_path: Path) -> None:
    deb = tmp_path / "k.deb"
    deb.write_bytes(_deb({"./lib/modules/6/kernel/a/kvm.ko": b"K", "./lib/modules/6/modules.builtin": b"v",
                          "./lib/modules/6/kernel/b/other.ko": b"no", "./lib/modules/6/kernel/c/ccp.ko.xz": b"C"}))
    pattern = re.compile(r"^\./lib/modules/6/(?:kernel/.*/((?:kvm|ccp)\.ko(?:\.xz)?)|(modules\.builtin))$")
    assert A.extract_matching(deb, pattern) == {"kvm.ko": b"K", "modules.builtin": b"v", "ccp.ko.xz": b"C"}
    assert A._extract_one(deb, pattern) == ("kvm.ko", b"K")  # the first in the archive only


@pytest.mark.parametrize("path", ["./bin/busybox", "./usr/bin/busybox"])  # Debian 12, Debian 13
def test_busybox_extraction_from_either_release(tmp_path: Path, path: str) -> None:
    deb = tmp_path / "b.deb"
    deb.write_bytes(_deb({"./usr/share/doc/busybox-static/copyright": b"c", path: b"BUSYBOX",
                          "./usr/bin/busybox-other": b"no"}))
    assert A._extract_one(deb, A.BUSYBOX_FILE) == ("busybox", b"BUSYBOX")


def test_apt_output_parsing() -> None:
    dep = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert A.kernel_package_of(dep) == "linux-image-6.1.0-56-amd64"
    assert A.kernel_package_of("linux-image-amd64\n") is None
    pol = ("linux-image-6.1.0-56-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n"
           "busybox-static:\n  Installed: (none)\n  Candidate: (none)\n")
    assert A.candidates_of(pol) == {"linux-image-6.1.0-56-amd64": "6.1.192-2"}


def test_fetch_without_apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(A.shutil, "which", lambda name: None)
    with pytest.raises(NumavmError, match="--kernel"):
        A.fetch(tmp_path, log=lambda s: None)


def test_write_atomic_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        A._write_atomic(target, "not bytes", 0o644)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ================================================================ the oracle: fixtures


@pytest.fixture(scope="session")
def assets() -> A.Assets:
    try:
        return A.fetch(log=lambda s: None)
    except NumavmError as e:
        pytest.skip(f"no guest kernel/busybox: {e}")


@pytest.fixture(scope="session")
def guest_kernel(assets: A.Assets) -> Path:
    """The bzImage's vmlinux, unpacked on the host by numavm (xz on Debian 12, zstd on 13):
    QEMU starts it at its PVH entry, with no decompression in the emulated guest."""
    from numavm.guest.launch import unpacked_kernel
    return unpacked_kernel(assets.kernel, log=lambda s: None)


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    topo: Callable[[], Topology]
    command: list[str] | None = None
    add: tuple[tuple[str, str], ...] = ()
    exit_status: int = 0
    srat: Callable[[bytes], bytes] | None = None  # doctors the SRAT: the guest must then disagree


def _swap_apics(a: int, b: int) -> Callable[[bytes], bytes]:
    """An SRAT whose local-APIC entries for APIC ids `a` and `b` trade proximity domains."""
    def patch(srat: bytes) -> bytes:
        t = bytearray(srat)
        at: dict[int, int] = {}
        pos = 48
        while pos + 2 <= len(t) and t[pos + 1] >= 2:
            if t[pos] == 0:  # processor local APIC affinity: PXM bits 7:0 at +2, APIC id at +3
                at[t[pos + 3]] = pos
            pos += t[pos + 1]
        t[at[a] + 2], t[at[b] + 2] = t[at[b] + 2], t[at[a] + 2]
        t[9] = 0
        t[9] = -sum(t) & 0xFF
        return bytes(t)
    return patch


def _host_ls() -> str:
    return shutil.which("ls") or "/bin/ls"


CASES: dict[str, Case] = {
    "example": Case(lambda: config.example().build(host_nodes=(0,))),
    # node 1 spans [2G, 3G) and [4G, 6G): two SRAT ranges, and swiotlb lands on it
    "crosses-3g": Case(lambda: _topo(["id=0,size=2G,cpus=0", "id=1,size=3G,cpus=1"])),
    # PXM 0 is memory-only: Linux makes PXM 1 node 0 and PXM 0 node 1
    "memory-only-first": Case(lambda: _topo(["id=0,size=512M", "id=1,size=1G,cpus=0-1"])),
    # a CPU-only (memoryless) domain between a full one and a memory-only one
    "memoryless": Case(lambda: _topo(["id=0,size=1G,cpus=0-1", "id=1,size=0,cpus=2-3",
                                      "id=2,size=512M"], ("0:2=30", "1:2=40"))),
    "asymmetric": Case(lambda: _topo(
        ["id=0,size=512M,cpus=0", "id=1,size=512M,cpus=1", "id=2,size=512M,cpus=2"],
        ("0:1=20", "1:0=30", "0:2=40", "2:0=15", "1:2=25", "2:1=35"))),
    "64-domains": Case(lambda: _topo([f"id={i},size=32M,cpus={i}" for i in range(64)])),
    "classic": Case(lambda: MachineSpec(cpus=2, memory=256 * MiB).build(host_nodes=(0,))),
    # a host binary with its shared libraries, argv kept exactly, the exit status passed on
    "command": Case(lambda: config.example().build(host_nodes=(0,)),
                    command=["/opt/host/ls", "-d", "/sys/devices/system/node/node2", "no such 'file'"],
                    add=((_host_ls(), "/opt/host/ls"),), exit_status=2),
    # a real mismatch: vCPUs 1 and 2 (APIC 1 and 2) trade domains in the SRAT the guest reads
    "crossed-apics": Case(lambda: config.example().build(host_nodes=(0,)), srat=_swap_apics(1, 2)),
}
if shutil.which("numactl"):
    CASES["numactl"] = Case(lambda: config.example().build(host_nodes=(0,)),
                            command=["/usr/bin/numactl", "--hardware"],
                            add=((shutil.which("numactl") or "", "/usr/bin/numactl"),))
SLOW_FIRST = ["64-domains", "crosses-3g"]


@dataclass
class Boot:
    doc: dict[str, Any]
    srat: bytes | None
    console: str
    seconds: float
    returncode: int | None


def qemu_argv(layout: Layout, kernel: str, initrd: str, tables: Mapping[str, str],
              append: str = "console=ttyS0 nokaslr panic=-1 quiet", serial: str = "stdio",
              qemu: str = "qemu-system-x86_64") -> list[str]:
    """QEMU (TCG) booting `kernel` on the plan's RAM layout with numavm's SRAT and SLIT,
    on its own (no numavm memory, no QMP check): the oracle the engine is compared with.

    `tables` maps a signature ("SRAT", "SLIT", "HMAT") to a file with that table's
    bytes; QEMU supplies the rest (MADT, FADT, DSDT) and no SRAT of its own,
    since no ``-numa`` option is given.  ``max-ram-below-4g=3G`` puts RAM where
    numavm's layout does: [0, 3 GiB) and from 4 GiB.  The vCPUs and the TCG
    kernel parameters are the TCG engine's (`tcg_topology`, `tcg_cmdline`).
    One TCG thread for all vCPUs: with many vCPUs on few host cores it boots
    several times faster.
    """
    smp, devices = tcg_topology(layout)
    argv = [qemu, "-M", QEMU_PC_MACHINE, "-accel", "tcg,thread=single", "-cpu", QEMU_CPU,
            "-m", f"{layout.topology.memory >> 20}M", "-smp", *smp,
            *[a for dev in devices for a in ("-device", dev)]]
    for sig in NUMA_TABLES:
        if sig in tables:
            argv += ["-acpitable", f"file={tables[sig]}"]
    # the initrd is numavm's: its /init onlines CPUs a many-vCPU boot left offline (tcg_cmdline)
    argv += ["-kernel", kernel, "-initrd", initrd, "-append", tcg_cmdline(append, layout.topology.cpus, own_init=True),
             "-nographic", "-no-reboot", "-monitor", "none", "-serial", serial, "-net", "none"]
    return argv


def _boot(name: str, case: Case, kernel: Path, busybox: Path, work: Path) -> Boot:
    layout = plan_layout(case.topo())
    doc = plan_document(layout)
    blobs = build_tables(layout).blobs()
    if case.srat is not None:
        blobs["SRAT"] = case.srat(blobs["SRAT"])
    tables: dict[str, str] = {}
    for sig in NUMA_TABLES:
        if sig in blobs:
            (work / f"{sig}.dat").write_bytes(blobs[sig])
            tables[sig] = str(work / f"{sig}.dat")
    initrd = work / "initrd.gz"
    initrd.write_bytes(I.build_initramfs(busybox, case.command, [(Path(h), g) for h, g in case.add]))
    argv = qemu_argv(layout, str(kernel), str(initrd), tables)
    (work / "argv.json").write_text(json.dumps(argv))
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=BOOT_TIMEOUT, check=False)
        out, rc = r.stdout, r.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = e.stdout or b"", None
    console = out.decode("utf-8", "replace")
    (work / "console.txt").write_text(console)
    return Boot(doc, blobs.get("SRAT"), console, time.monotonic() - t0, rc)


@pytest.fixture(scope="session")
def boots(request: pytest.FixtureRequest, assets: A.Assets, guest_kernel: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Boot]]]:
    """Every selected case's guest, booted two at a time (one TCG thread each)."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    wanted = {item.callspec.params["case"] for item in request.session.items
              if hasattr(item, "callspec") and "case" in item.callspec.params}
    order = [n for n in SLOW_FIRST if n in wanted] + [n for n in CASES if n in wanted and n not in SLOW_FIRST]
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    futures = {n: pool.submit(_boot, n, CASES[n], guest_kernel, assets.busybox,
                              tmp_path_factory.mktemp(f"boot-{n}")) for n in order}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the oracle


@pytest.mark.qemu
@pytest.mark.parametrize("case", list(CASES))
def test_guest_sees_the_plan(case: str, boots: dict[str, Future[Boot]]) -> None:
    b = boots[case].result()
    tail = "\n".join(b.console.splitlines()[-40:])
    rep = I.parse_guest_report(b.console)
    assert rep is not None, f"{case}: no topology report after {b.seconds:.1f}s (rc {b.returncode}):\n{tail}"
    print(f"{case}: {b.seconds:.1f}s wall, guest uptime {rep.get('uptime')}s at report")
    assert rep["exit_status"] == CASES[case].exit_status, tail
    assert b.returncode == 0, f"QEMU exited {b.returncode}:\n{tail}"

    from_log = G.pxm_to_node_from_log(b.console)
    # Linux 6.12+ logs a PXM only with its memory: a CPU-only domain's node comes from sysfs
    from_guest = G.guest_pxm_to_node(b.doc, from_log, rep)
    if b.doc["numa"]:
        assert b.srat is not None and {"SRAT", "SLIT"} <= set(rep["acpi_tables"])
        # Linux's numbering rule, predicted two ways, and what the guest logged and shows
        assert from_guest == G.pxm_to_node_from_srat(b.srat) == G.pxm_to_node_from_plan(b.doc), tail
        assert from_log.items() <= from_guest.items()
    else:
        assert from_log == {} and not {"SRAT", "SLIT"} & set(rep["acpi_tables"])
    assert "NUMA: nodes only cover" not in b.console
    mismatches = G.compare_userspace(b.doc, rep, from_guest)
    if CASES[case].srat is not None:  # the guest obeyed the doctored SRAT: both comparisons must say so
        from numavm.check.verdict import evaluate
        assert mismatches == ["domain 0 (node 0): CPUs 0,2, plan wants 0-1",
                              "domain 0 (node 0): APIC ids 0,2, plan wants 0-1",
                              "domain 1 (node 1): CPUs 1,3, plan wants 2-3",
                              "domain 1 (node 1): APIC ids 1,3, plan wants 2-3"], mismatches
        report = evaluate(plan_layout(CASES[case].topo()), "userspace", "tcg", b.console, True, "test")
        assert not report.match and any("APIC" in m for m in report.mismatches), report.mismatches
        return
    assert mismatches == [], "\n".join(mismatches)

    if case == "command":
        assert "/sys/devices/system/node/node2" in b.console
        # GNU ls quotes a name holding ' with "": the argument arrived as one, unchanged
        assert "ls: cannot access \"no such 'file'\": No such file or directory" in b.console
    if case == "numactl":
        assert "available: 3 nodes (0-2)" in b.console
        assert "node 2 cpus:\n" in b.console.replace("\r", "") or "node 2 cpus: \n" in b.console.replace("\r", "")
