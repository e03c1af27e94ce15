"""What the guest does with its devices: the driver modules in numavm's initramfs, the report's
PCI lines, and check's comparison of devices, nodes and generic initiators (numavm.guest.modules,
numavm.guest.initramfs, numavm.check)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import stat
from pathlib import Path

import pytest

from numavm import Machine
from numavm.check.compare import compare_devices, compare_userspace, guest_pxm_to_node
from numavm.check.linux_numa import compare_kernel, expected_view, parse_kernel_log
from numavm.check.report import GuestReport
from numavm.check.verdict import CheckReport, render
from numavm.guest import initramfs
from numavm.guest.modules import (ModulesUnavailable, decompress, depends, load_order, modules_dep, modules_for,
                                  ordered_modules, parse_modules_dep)
from numavm.plan.layout import Layout


def ko(name: str, deps: list[str]) -> bytes:
    """A stand-in module: an ELF header and a modinfo section with depends= and name=."""
    return b"\x7fELF" + b"\0" * 60 + b"\0depends=" + ",".join(deps).encode() + b"\0name=" + name.encode() + b"\0"


# Debian 12's 6.1 modules as their modinfo names them (virtio_pci's real depends= order)
KOS = {"virtio_ring": ko("virtio_ring", []), "virtio": ko("virtio", ["virtio_ring"]),
       "virtio_pci_modern_dev": ko("virtio_pci_modern_dev", []),
       "virtio_pci_legacy_dev": ko("virtio_pci_legacy_dev", []),
       "virtio_pci": ko("virtio_pci", ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"]),
       "virtio_blk": ko("virtio_blk", ["virtio", "virtio_ring"])}


# ---------------------------------------------------------------- modules


def test_modules_dep_and_load_order() -> None:
    assert depends(KOS["virtio_pci"]) == ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"]
    dep = modules_dep(KOS)
    assert "virtio_blk.ko: virtio.ko virtio_ring.ko\n" in dep
    deps = parse_modules_dep(dep + "kernel/drivers/block/nbd.ko.xz: kernel/x/virtio-ring.ko.zst\n")
    assert deps["nbd"] == ["virtio_ring"]
    order = load_order(modules_for(["virtio-blk"]), deps, KOS)
    assert order == ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_pci",
                     "virtio_blk"]
    for k, name in enumerate(order):  # every module after what it needs
        assert all(order.index(d) < k for d in deps[name])
    # 6.12 builds virtio, virtio_ring and virtio_pci in: only virtio_blk is left to load
    assert load_order(["virtio_pci", "virtio_blk"], deps, KOS,
                      builtin=["virtio", "virtio_ring", "virtio-pci", "virtio_pci_modern_dev",
                               "virtio_pci_legacy_dev"]) == ["virtio_blk"]
    with pytest.raises(ModulesUnavailable, match="virtio_ring .needed by virtio."):
        load_order(["virtio_blk"], deps, ["virtio", "virtio_blk"])
    with pytest.raises(ModulesUnavailable, match="cycle"):
        load_order(["a"], {"a": ["b"], "b": ["a"]}, ["a", "b"])


def test_modules_for_device_kinds() -> None:
    assert modules_for([]) == ()
    assert modules_for(["virtio-blk", "virtio-blk"]) == ("virtio_pci", "virtio_blk")


def test_decompress_every_module_form() -> None:
    data = KOS["virtio"]
    assert decompress("virtio.ko", data) == data
    assert decompress("virtio.ko.xz", lzma.compress(data, check=lzma.CHECK_CRC32)) == data
    assert decompress("virtio.ko.gz", gzip.compress(data)) == data
    zstandard = pytest.importorskip("zstandard")
    assert decompress("virtio.ko.zst", zstandard.ZstdCompressor().compress(data)) == data


def test_ordered_modules_from_a_cache_directory(tmp_path: Path) -> None:
    for name, data in KOS.items():
        (tmp_path / f"{name}.ko").write_bytes(data)
    (tmp_path / "modules.dep").write_text(modules_dep(KOS))
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci_legacy_dev.ko\n")
    got = ordered_modules(tmp_path, ["virtio_blk", "virtio_pci"])
    assert [p.name for p in got] == ["virtio_ring.ko", "virtio.ko", "virtio_blk.ko", "virtio_pci_modern_dev.ko",
                                     "virtio_pci.ko"]


# ---------------------------------------------------------------- the initramfs


@pytest.fixture
def busybox(tmp_path: Path) -> Path:
    p = tmp_path / "busybox"
    p.write_bytes(b"\x7fELF fake busybox")
    return p


@pytest.fixture
def mods(tmp_path: Path) -> list[Path]:
    d = tmp_path / "mods"
    d.mkdir()
    for name, data in KOS.items():
        (d / f"{name}.ko").write_bytes(data)
    (d / "modules.dep").write_text(modules_dep(KOS))
    return ordered_modules(d, modules_for(["virtio-blk"]))


def test_initramfs_has_modules_only_with_devices(busybox: Path, mods: list[Path]) -> None:
    plain = {e.path: e for e in initramfs.initramfs_entries(busybox)}
    assert not any(p.startswith("lib/numavm") or p in ("etc/numavm/modules", "sbin/insmod") for p in plain)
    with_mods = {e.path: e for e in initramfs.initramfs_entries(busybox, modules=mods)}
    assert set(with_mods) - set(plain) == {"lib", "lib/numavm", "etc/numavm", "etc/numavm/modules", "sbin/insmod",
                                           *(f"lib/numavm/{p.name}" for p in mods)}
    assert with_mods["etc/numavm/modules"].data.decode().split() == [p.stem for p in mods]
    assert with_mods["lib/numavm/virtio_blk.ko"].data == KOS["virtio_blk"]
    assert stat.S_ISLNK(with_mods["sbin/insmod"].mode)
    # /init loads the list, in order, before it reads the topology
    script = initramfs.INIT_SCRIPT
    assert script.index('insmod "/lib/numavm/$m.ko"') < script.index("/sys/devices/system/node/node[0-9]*")
    assert "< /etc/numavm/modules" in script


def test_initramfs_refuses_a_compressed_module(busybox: Path, tmp_path: Path) -> None:
    bad = tmp_path / "virtio.ko"
    bad.write_bytes(lzma.compress(KOS["virtio"]))
    with pytest.raises(Exception, match="not an uncompressed kernel module"):
        initramfs.initramfs_entries(busybox, modules=[bad])


def test_initramfs_cache_identity_includes_the_modules(busybox: Path, mods: list[Path], tmp_path: Path) -> None:
    plain = initramfs._identity(busybox, None, False)
    assert plain is not None and len(json.loads(plain)) == 3  # the identity images had before modules
    with_mods = initramfs._identity(busybox, None, False, mods)
    assert with_mods != plain and all(str(p) in with_mods for p in mods)
    cache = tmp_path / "cache"
    a = initramfs.cached_initramfs(busybox, cache_dir=cache)
    b = initramfs.cached_initramfs(busybox, cache_dir=cache, modules=mods)
    assert a != b and gzip.decompress(b).count(b".ko\x00") == len(mods)
    assert initramfs.cached_initramfs(busybox, cache_dir=cache, modules=mods) == b
    assert initramfs.cached_initramfs(busybox, cache_dir=cache) == a


# ---------------------------------------------------------------- report and comparison


def machine(tmp_path: Path) -> Layout:
    """vCPU domains 0 and 2, domain 1 only a generic initiator's, domain 3 memory-only."""
    disks = []
    for name, size in (("a.img", 64 << 20), ("b.img", 1 << 20), ("c.img", 4096)):
        p = tmp_path / name
        p.write_bytes(b"")
        os.truncate(p, size)
        disks.append(str(p))
    return Machine.from_options([
        "-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=0", "-n", "id=2,size=256M,cpus=1",
        "-n", "id=3,size=128M", "--disk", f"{disks[0]},domain=2", "--disk", f"{disks[1]},domain=1,initiator",
        "--disk", f"{disks[2]},domain=2,readonly"]).plan().layout


def report_of(layout: Layout, **change: object) -> dict:
    """The report a correct guest prints for `layout` (numbering by Linux's rule)."""
    exp = expected_view(layout)
    p2n = exp.pxm_to_node
    n2p = {n: p for p, n in p2n.items()}
    topo = layout.topology
    nodes = {}
    for node in sorted(n2p):
        d = topo.domains[n2p[node]]
        nodes[str(node)] = {"cpulist": ",".join(map(str, d.cpus)), "memtotal_kb": d.size // 1024 - 8000 if d.size else 0,
                            "present_kb": d.size // 1024, "distance": [topo.distances[d.id][n2p[j]] for j in sorted(n2p)]}
    names = {"0000:02:00.0": "vda", "0000:04:00.0": "vdb", "0000:04:01.0": "vdc"}
    sizes = {"0000:02:00.0": 2048, "0000:04:00.0": 131072, "0000:04:01.0": 8}
    pci = {"0000:00:00.0": {"vendor": "0x8086", "device": "0x1237", "class": "0x060000", "numa_node": -1}}
    for dev in layout.pci.devices:
        pci[dev.bdf] = {"vendor": "0x1af4", "device": "0x1042", "class": "0x018000", "numa_node": p2n[dev.domain],
                        "block": [{"name": names[dev.bdf], "sectors": sizes[dev.bdf], "logical_block_size": 512}]}
    doc = {"nodes": nodes, "online_cpus": "0-1", "online_nodes": f"0-{len(nodes) - 1}",
           "cpu_apic_ids": {"0": 0, "1": 1}, "kernel": "6.1.0-57-amd64",
           "has_generic_initiator_nodes": ",".join(str(p2n[d]) for d in sorted(topo.initiators)),
           "pci": pci, "modules": {"virtio_ring": 0, "virtio": 0, "virtio_pci": 0, "virtio_blk": 0}}
    doc.update(change)
    return doc


def test_report_parses_devices(tmp_path: Path) -> None:
    lay = machine(tmp_path)
    r = GuestReport.from_document(report_of(lay))
    assert r.generic_initiator_nodes == {2}
    f = r.pci["0000:02:00.0"]
    assert (f.vendor, f.device, f.pci_class, f.numa_node) == (0x1AF4, 0x1042, 0x018000, 2)
    assert r.pci["0000:00:00.0"].numa_node == -1 and r.pci["0000:00:00.0"].block == ()
    assert [(b.name, b.sectors, b.logical_block_size) for b in r.pci["0000:04:00.0"].block] == [("vdb", 131072, 512)]
    assert r.modules == {"virtio_ring": 0, "virtio": 0, "virtio_pci": 0, "virtio_blk": 0}
    # a report from before devices: none of it
    old = GuestReport.from_document({"nodes": {}})
    assert old.pci is None and old.generic_initiator_nodes is None and old.modules is None
    assert GuestReport.from_document({"pci": {"x": {"vendor": "zz", "numa_node": "1"}}}).pci["x"].vendor is None


def test_report_lines_from_the_real_init() -> None:
    """The awk in /init writes what GuestReport reads (a console captured from a TCG boot with two
    virtio-blk-pci devices, one behind a pxb on node 1: tests/data/console-virtio-blk.txt)."""
    text = (Path(__file__).parent / "data" / "console-virtio-blk.txt").read_text(errors="replace")
    r = GuestReport.from_document(initramfs.parse_guest_report(text))
    assert r.pci is not None and r.pci["0000:02:00.0"].numa_node == 1
    assert r.pci["0000:02:00.0"].block[0].name == "vdb" and r.pci["0000:00:05.0"].block[0].sectors == 16384
    assert r.generic_initiator_nodes == frozenset()
    assert set(r.modules or {}) == {"virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio",
                                    "virtio_pci", "virtio_blk"} and not any((r.modules or {}).values())


def test_compare_devices_match(tmp_path: Path) -> None:
    lay = machine(tmp_path)
    assert expected_view(lay).pxm_to_node == {0: 0, 2: 1, 1: 2, 3: 3}
    r = GuestReport.from_document(report_of(lay))
    # the log names only domains with vCPUs or memory; the initiator's node comes from sysfs
    log = {0: 0, 2: 1, 3: 3}
    pmap = guest_pxm_to_node(lay, log, r)
    assert pmap == {0: 0, 2: 1, 3: 3, 1: 2}
    assert compare_devices(lay, r, pmap) == []
    assert compare_userspace(lay, r, pmap) == []


@pytest.mark.parametrize("change, words", [
    ({"has_generic_initiator_nodes": ""}, "generic initiator nodes: guest none, plan wants 2"),
    ({"modules": {"virtio": 0, "virtio_blk": 1}}, "module virtio_blk: insmod failed in the guest (status 1)"),
    ({"pci": {}}, "disk 0 (0000:04:00.0, domain 2): not among the guest's PCI devices"),
])
def test_compare_devices_mismatch(tmp_path: Path, change: dict, words: str) -> None:
    lay = machine(tmp_path)
    r = GuestReport.from_document(report_of(lay, **change))
    bad = compare_devices(lay, r, expected_view(lay).pxm_to_node)
    assert any(words in b for b in bad), bad


def test_compare_devices_node_size_and_name(tmp_path: Path) -> None:
    lay = machine(tmp_path)
    doc = report_of(lay)
    doc["pci"]["0000:04:00.0"]["numa_node"] = 0
    doc["pci"]["0000:04:00.0"]["block"][0].update(sectors=5, name="sdz")
    doc["pci"]["0000:02:00.0"]["device"] = "0x1001"
    bad = compare_devices(lay, GuestReport.from_document(doc), expected_view(lay).pxm_to_node)
    assert bad == [
        "disk 0 (0000:04:00.0, domain 2): numa_node 0, plan wants 1 (domain 2)",
        "disk 0 (0000:04:00.0, domain 2): block device 'sdz', plan wants a virtio disk (vd...)",
        f"disk 0 (0000:04:00.0, domain 2): 5 sectors, the image {lay.topology.disks[0].path} has 131072",
        "disk 1 (0000:02:00.0, domain 1): ids 1af4:1001, plan wants 1af4:1042",
    ]
    doc = report_of(lay)
    doc["pci"]["0000:04:00.0"]["numa_node"] = 0
    assert compare_devices(lay, GuestReport.from_document(doc), expected_view(lay).pxm_to_node) == [
        "disk 0 (0000:04:00.0, domain 2): numa_node 0, plan wants 1 (domain 2)"]


def test_classic_machine_devices_have_no_node(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(4096))
    lay = Machine.from_options(["-c", "1", "-m", "256M", "--disk", str(img)]).plan().layout
    doc = {"has_generic_initiator_nodes": "", "pci": {"0000:02:00.0": {
        "vendor": "0x1af4", "device": "0x1042", "class": "0x018000", "numa_node": -1,
        "block": [{"name": "vda", "sectors": 8, "logical_block_size": 512}]}}}
    assert compare_devices(lay, GuestReport.from_document(doc), None) == []
    doc["pci"]["0000:02:00.0"]["numa_node"] = 0
    assert compare_devices(lay, GuestReport.from_document(doc), None) == [
        "disk 0 (0000:02:00.0, domain 0): numa_node 0, plan wants -1"]


def test_kernel_stage_does_not_want_the_initiator_logged(tmp_path: Path) -> None:
    """Linux logs a generic initiator's SRAT entry at debug level: the kernel stage wants no line
    for a domain with only an initiator, but its node's zonelist."""
    lay = machine(tmp_path)
    exp = expected_view(lay)
    log = "\n".join([
        "[0.0] Linux version 6.1.0-57-amd64 (x)",
        "[0.0] SRAT: PXM 0 -> APIC 0x00 -> Node 0", "[0.0] SRAT: PXM 2 -> APIC 0x01 -> Node 1",
        "[0.0] ACPI: SRAT: Node 0 PXM 0 [mem 0x00000000-0x0fffffff]",
        "[0.0] ACPI: SRAT: Node 1 PXM 2 [mem 0x10000000-0x1fffffff]",
        "[0.0] ACPI: SRAT: Node 3 PXM 3 [mem 0x20000000-0x27ffffff]",
        "[0.0] Initmem setup node 0 [mem 0x0000000000001000-0x000000000fffffff]",
        "[0.0] Initmem setup node 1 [mem 0x0000000010000000-0x000000001fffffff]",
        "[0.0] Initmem setup node 3 [mem 0x0000000020000000-0x0000000027ffffff]",
        *(f"[0.0] Fallback order for Node {n}: {' '.join(map(str, o))}" for n, o in exp.fallback.items()),
        "[0.0] Built 4 zonelists, mobility grouping on.  Total pages: 1"])
    assert compare_kernel(exp, parse_kernel_log(log)) == []
    text = render(CheckReport("kernel", "tcg", lay, parse_kernel_log(log), boot="stopped"))
    lines = text.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("domain 1: node")))
    assert lines[at].split()[-3:] == ["2", "not", "logged"]
    want = [str(n) for n in exp.fallback[2]]
    assert next(line for line in lines[at:] if "fallback order" in line).split()[-2 * len(want):] == want * 2


def test_verdict_shows_devices(tmp_path: Path) -> None:
    lay = machine(tmp_path)
    guest = GuestReport.from_document(report_of(lay))
    rep = CheckReport("userspace", "tcg", lay, parse_kernel_log(""), guest, pxm_to_node={0: 0, 2: 1, 3: 3, 1: 2},
                      boot="poweroff")
    text = render(rep)
    assert "disk 0 (0000:04:00.0): node  " in text.replace("node   ", "node  ")
    row = next(line for line in text.splitlines() if line.startswith("disk 1 (0000:02:00.0): node"))
    assert row.split()[-2:] == ["2", "2"]
    row = next(line for line in text.splitlines() if "vda 2048 sectors" in line)
    assert " ".join(row.split()) == "block device vd? 2048 sectors, logical block 512 B vda 2048 sectors, logical block 512 B"
    assert next(line for line in text.splitlines() if line.startswith("generic initiator nodes")).split()[-2:] == ["2", "2"]
    doc = rep.document()
    assert doc["devices"]["generic_initiator_nodes"] == {"expected": [2], "observed": [2]}
    assert doc["devices"]["pci"][1] == {"address": "0000:02:00.0", "kind": "virtio-blk", "domain": 1,
                                        "node": {"expected": 2, "observed": 2},
                                        "block": {"expected": {"sectors": 2048, "logical_block_size": 512}, "observed": {"name": "vda", "sectors": 2048,
                                                                                  "logical_block_size": 512}}}
    json.dumps(doc)


def test_kernel_cmdline_has_pci_only_with_devices(tmp_path: Path) -> None:
    from numavm.guest.launch import kernel_cmdline

    plain = Machine.from_options(["-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M,cpus=1"])
    line = kernel_cmdline("userspace", False, topology=plain.topology)
    assert " pci=off" in line and "noearly" not in line
    line = kernel_cmdline("userspace", False, topology=machine(tmp_path).topology)
    assert " pci=noearly" in line and "pci=off" not in line


# ---------------------------------------------------------------- a real guest loads them


def test_modules_load_and_report_under_qemu(tmp_path: Path) -> None:
    """Debian's kernel with numavm's initramfs and the modules a virtio-blk machine needs, under
    QEMU q35 (its own platform: a virtio-blk-pci disk behind a pxb-pcie of node 1) with the
    machine's kernel command line: every module loads, the disk shows on node 1 with its size."""
    import shutil
    import subprocess

    from numavm.guest.assets import cached
    from numavm.guest.launch import kernel_cmdline
    from numavm.guest.modules import device_modules

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64")
    assets = cached()
    if assets is None:
        pytest.skip("no guest kernel in numavm's cache (numavm fetch)")
    mods = device_modules(assets, ["virtio-blk"], log=lambda s: None)
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(initramfs.build_initramfs(assets.busybox, modules=mods))
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    os.truncate(disk, 48 << 20)
    topo = machine(tmp_path).topology
    cmdline = kernel_cmdline("userspace", False, topology=topo)
    r = subprocess.run(
        ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "512M", "-smp", "2", "-nographic",
         "-no-reboot", "-object", "memory-backend-ram,id=m0,size=256M", "-object", "memory-backend-ram,id=m1,size=256M",
         "-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1,memdev=m1",
         "-kernel", str(assets.kernel), "-initrd", str(initrd), "-append", cmdline,
         "-device", "pxb-pcie,id=pxb1,bus_nr=1,numa_node=1,bus=pcie.0",
         "-device", "pcie-root-port,id=rp1,bus=pxb1,chassis=1",
         "-drive", f"file={disk},if=none,id=d0,format=raw",
         "-device", "virtio-blk-pci,drive=d0,bus=rp1,disable-legacy=on"],
        capture_output=True, timeout=300)
    doc = initramfs.parse_guest_report(r.stdout.decode(errors="replace"))
    assert doc is not None, r.stdout.decode(errors="replace")[-3000:]
    rep = GuestReport.from_document(doc)
    assert rep.modules == {p.stem: 0 for p in mods}
    disks = {a: f for a, f in (rep.pci or {}).items() if f.block}
    assert len(disks) == 1, rep.pci
    (f,) = disks.values()
    assert (f.vendor, f.device, f.numa_node) == (0x1AF4, 0x1042, 1)
    assert [(b.name, b.sectors, b.logical_block_size) for b in f.block] == [("vda", (48 << 20) // 512, 512)]
    assert rep.generic_initiator_nodes == frozenset()


@pytest.mark.parametrize("other_release", [False, True])
def test_check_under_tcg_with_a_generic_initiator_only_domain(tmp_path: Path, other_release: bool) -> None:
    """`numavm check` end to end (the TCG engine's pxb + virtio-blk-pci): a disk on domain 1 and an
    initiator disk on domain 2, which has neither memory nor vCPUs; Linux makes domain 2 node 2,
    lists it in has_generic_initiator, and puts the disk there.  On the other Debian release's
    kernel too (6.12 on a Debian 12 host: virtio_pci built in, only virtio_blk loaded)."""
    import shutil
    import subprocess
    import sys

    from numavm.guest.aptrelease import host_release
    from numavm.guest.assets import cached

    release = ("trixie" if host_release() == "bookworm" else "bookworm") if other_release else None
    if shutil.which("qemu-system-x86_64") is None or cached(release=release) is None:
        pytest.skip(f"needs qemu-system-x86_64 and numavm's cached guest kernel (numavm fetch"
                    f"{' --release ' + release if release else ''})")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p, size in ((a, 16 << 20), (b, 8 << 20)):
        p.write_bytes(b"")
        os.truncate(p, size)
    r = subprocess.run([sys.executable, "-m", "numavm", "check", "--accel", "tcg", "--json",
                        *(["--release", release] if release else []),
                        "--disk", f"{a},domain=1", "--disk", f"{b},domain=2,initiator", "-c", "2",
                        "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M,cpus=1", "-n", "id=2,size=0",
                        "--distance", "0:2=30", "--distance", "1:2=25"], capture_output=True, text=True, timeout=600)
    doc = json.loads(r.stdout)
    assert doc["match"] and r.returncode == 0, "\n".join(doc["mismatches"]) + r.stderr[-2000:]
    dev = doc["devices"]
    assert dev["generic_initiator_nodes"] == {"expected": [2], "observed": [2]}
    assert [(d["address"], d["node"]) for d in dev["pci"]] == [
        ("0000:02:00.0", {"expected": 1, "observed": 1}), ("0000:04:00.0", {"expected": 2, "observed": 2})]
    assert [d["block"]["observed"]["sectors"] for d in dev["pci"]] == [32768, 16384]
    assert set(dev["modules"].values()) == {0}
    assert doc["observed"]["userspace"]["nodes"]["2"]["cpulist"] == ""


# ---------------------------------------------------------------- HMAT with a generic initiator


HMAT_GI = ["-c", "1", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M", "-n", "id=2,size=0",
           "--hmat", "0:0,latency=100,bandwidth=20000", "--hmat", "0:1,latency=300,bandwidth=8000",
           "--hmat", "2:1,latency=150,bandwidth=16000"]


def test_hmat_initiator_may_be_a_generic_initiator(tmp_path: Path) -> None:
    """Linux's hmat.c: every initiator of the tables competes for a target's access0, only those
    with CPUs for access1; so the memory-only domain's access0 is the device's, access1 domain 0's."""
    from numavm import ConfigError
    from numavm.check.linux_numa import hmat_access

    img = tmp_path / "a.img"
    img.write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match="a domain needs memory .* or a generic initiator"):
        Machine.from_options(HMAT_GI)  # domain 2 holds nothing yet
    with pytest.raises(ConfigError, match=r"initiator 1 has no vCPUs; an initiator is a domain with cpus= or a "
                                          r"generic initiator \(--disk FILE,domain=1,initiator\)"):
        Machine.from_options(HMAT_GI + ["--disk", f"{img},domain=2,initiator", "--disk", f"{img},domain=1",
                                        "--hmat", "1:0,latency=100,bandwidth=100"])  # a disk, not an initiator
    m = Machine.from_options(HMAT_GI + ["--disk", f"{img},domain=2,initiator"])
    from numavm.plan.render import hmat_links
    acc = hmat_access(hmat_links(m.topology), [0, 1], [0])
    assert acc[1][0]["initiators"] == [2] and acc[1][0]["read_latency"] == 150
    assert acc[1][1]["initiators"] == [0] and acc[1][1]["read_latency"] == 300
    # the HMAT names the device's domain among its initiators; iasl reads it
    from numavm.plan import acpi
    from test_acpi import disassemble
    d = disassemble(acpi.build_tables(m.plan().layout).blobs()["HMAT"], tmp_path, "gi-HMAT")
    assert [v for n, v in d.fields if n == "Initiator Proximity Domain List"][:2] == ["00000000", "00000002"], \
        [f for f in d.fields if "Initiator" in f[0]]


def test_check_hmat_with_a_generic_initiator_under_tcg(tmp_path: Path) -> None:
    """End to end: the guest's memory-only node links access0 to the generic initiator's node and
    access1 to the CPU node, with their figures."""
    import shutil
    import subprocess
    import sys

    from numavm.guest.assets import cached

    if shutil.which("qemu-system-x86_64") is None or cached() is None:
        pytest.skip("needs qemu-system-x86_64 and numavm's cached guest kernel (numavm fetch)")
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    r = subprocess.run([sys.executable, "-m", "numavm", "check", "--accel", "tcg", "--json", *HMAT_GI,
                        "--disk", f"{img},domain=2,initiator"], capture_output=True, text=True, timeout=600)
    doc = json.loads(r.stdout)
    assert doc["match"] and r.returncode == 0, "\n".join(doc["mismatches"]) + r.stderr[-2000:]
    assert doc["observed"]["userspace"]["pxm_to_node"] == {"0": 0, "2": 1, "1": 2}
    access = doc["observed"]["userspace"]["nodes"]["2"]["access"]
    assert (access["0"]["initiators"], access["0"]["read_latency"]) == ([1], 150)
    assert (access["1"]["initiators"], access["1"]["read_latency"]) == ([0], 300)


def test_export_to_qemu_leaves_a_generic_initiator_out_of_the_hmat(tmp_path: Path) -> None:
    """QEMU 7.2 refuses `-numa hmat-lb,initiator=N` for a node without CPUs ("it isn't an initiator
    proximity domain"): export leaves such links out, and says so."""
    from numavm.peers.export import export

    img = tmp_path / "a.img"
    img.write_bytes(bytes(4096))
    m = Machine.from_options(HMAT_GI + ["--disk", f"{img},domain=2,initiator"])
    e = export(m.topology, "qemu")
    text, warnings = e.text, e.warnings
    assert "initiator=2" not in text and "hmat-lb,initiator=0,target=1" in text
    assert any("--hmat 2:1: QEMU takes no HMAT initiator without vCPUs" in w for w in warnings)


def test_modules_go_to_a_private_directory_when_the_cache_cannot_take_them(tmp_path: Path, monkeypatch) -> None:
    import errno

    from numavm.guest import modules as M
    from numavm.guest.assets import Assets

    cache = tmp_path / "cache"
    cache.mkdir()
    a = Assets(cache / "vmlinuz-6.1.0-57-amd64", cache / "busybox", "6.1.0-57-amd64", "linux-image-x", "1")
    roots = []

    def extract(assets, log, release, dirs, names, dirname, root):  # type: ignore[no-untyped-def]
        roots.append(root)
        if root == cache:
            raise OSError(errno.EROFS, "Read-only file system")
        return root / "modules-6.1.0-57-amd64"

    monkeypatch.setattr(M, "_extract", extract)
    lines: list[str] = []
    got = M.extract_modules(a, lines.append)
    assert roots[0] == cache and got.parent == roots[1] != cache
    assert "cannot keep the kernel's modules (Read-only file system)" in lines[0]
