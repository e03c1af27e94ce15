"""The HMAT: the machine options that describe it, their rules, and the table as iasl reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from numavm.plan import acpi

from numavm.spec import config
from numavm.plan.acpi.hmat import build_hmat
from numavm.cli import main
from numavm.errors import ConfigError
from numavm.plan.layout import plan_layout
from numavm.spec.topology import MachineSpec, parse_hmat, parse_hmat_cache, parse_numa
from numavm.spec.units import MiB

from test_acpi import check_header, disassemble, hexval

DOMAINS = ("id=0,size=1G,cpus=0-1", "id=1,size=1G,cpus=2-3", "id=2,size=512M")
LINKS = ("0:0,latency=100,bandwidth=20000", "1:1,latency=100,bandwidth=20000",
         "0:1,latency=150,bandwidth=15000", "1:0,latency=150,bandwidth=15000",
         "0:2,read-latency=300,write-latency=400,bandwidth=8000", "1:2,latency=350,bandwidth=6000")
CACHES = ("2,size=256M,level=1,line=64,assoc=direct,policy=writeback",)


def topo(links=LINKS, caches=CACHES, domains=DOMAINS):
    spec = MachineSpec(domains=[parse_numa(d) for d in domains], hmat=[parse_hmat(h) for h in links],
                       caches=[parse_hmat_cache(c) for c in caches])
    return spec.build(host_nodes=(0,))


def error(links=(), caches=(), domains=DOMAINS) -> str:
    with pytest.raises(ConfigError) as ei:
        topo(links, caches, domains)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_parse_link_both_directions_and_separately() -> None:
    a = parse_hmat("0:2,latency=300,bandwidth=8000")
    assert (a.initiator, a.target, a.read_latency, a.write_latency, a.read_bandwidth, a.write_bandwidth) == \
        (0, 2, 300, 300, 8000, 8000)
    b = parse_hmat("1:2, read-latency=300, write_latency=400, read-bandwidth=9000")
    assert (b.read_latency, b.write_latency, b.read_bandwidth, b.write_bandwidth) == (300, 400, 9000, None)


def test_parse_cache_defaults_and_values() -> None:
    c = parse_hmat_cache("2,size=256M")
    assert (c.domain, c.size, c.level, c.line, c.assoc, c.policy) == (2, 256 * MiB, 1, 64, "none", "none")
    c = parse_hmat_cache("2,size=1G,level=2,line=128,assoc=complex,policy=writethrough")
    assert (c.level, c.line, c.assoc, c.policy) == (2, 128, "complex", "writethrough")


@pytest.mark.parametrize("text, words", [
    ("0:2", "give latency="),
    ("0-2,latency=1", "expected I:T"),
    ("0:2,latency=1,read-latency=2", "read-latency given twice"),
    ("0:2,latency=0", "--hmat 0:2 latency: must be 1..4294967 ns, got 0"),
    ("0:2,latency=4294968", "must be 1..4294967 ns"),
    ("0:2,bandwidth=4294967296", "must be 1..4294967295 MB/s"),
    ("0:2,bandwidth=-1", "must be 1..4294967295 MB/s"),
    ("0:2,speed=1", "unknown key 'speed'"),
    ("0:2,latency=x", "expected a whole number"),
    ("0:2,latency", "expected key=value"),
])
def test_link_syntax_errors(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_hmat(text)
    assert words in str(ei.value) and str(ei.value).startswith("--hmat")


@pytest.mark.parametrize("text, words", [
    ("2", "size= is required"),
    ("2,size=0", "size: must be more than 0"),
    ("2,size=1G,level=4", "level: must be 1..3, got 4"),
    ("2,size=1G,line=0", "line: must be 1..65535 bytes"),
    ("2,size=1G,line=65536", "line: must be 1..65535 bytes"),
    ("2,size=1G,assoc=full", "assoc: must be none, direct, complex, got 'full'"),
    ("2,size=1G,policy=wb", "policy: must be none, writeback, writethrough"),
    ("2,size=1G,ways=4", "unknown key 'ways'"),
])
def test_cache_syntax_errors(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_hmat_cache(text)
    assert words in str(ei.value) and str(ei.value).startswith("--hmat-cache")


def test_rules() -> None:
    assert "no domain 3 (domains 0..2)" in error(("0:3,latency=1",))
    assert "initiator 2 has no vCPUs" in error(("2:0,latency=1",))
    assert "target 0 has no memory" in error(("1:0,latency=1",),
                                             domains=("id=0,size=0,cpus=0", "id=1,size=1G,cpus=1"))
    assert "0:2 already given" in error(("0:2,latency=1", "0:2,bandwidth=1"))
    assert "no domain 5" in error(caches=("5,size=1M",))
    assert "already has a level 1 cache" in error(caches=("2,size=1M", "2,size=2M"))
    assert "a level 2 cache needs level 1" in error(caches=("2,size=1M,level=2",))
    with pytest.raises(ConfigError, match="the HMAT needs NUMA domains"):
        MachineSpec(hmat=[parse_hmat("0:0,latency=1")]).build(host_nodes=(0,))


def test_values_the_base_unit_cannot_encode() -> None:
    # 1 ns and 70000 ns: one base unit (1000 ps) would need entry 70000 > 65534
    msg = error(("0:0,latency=1", "0:2,latency=70000"))
    assert msg.startswith("--hmat 0:2 read-latency: the HMAT cannot encode 70000 ns beside 1 ns (--hmat 0:0)")
    # the same spread with a common divisor is fine: 65534 * 1000 ps
    assert topo(("0:0,latency=1", "0:2,latency=65534"), ())
    msg = error(("0:0,bandwidth=1", "0:2,bandwidth=65535"))
    assert "65535 MB/s beside 1 MB/s" in msg
    assert topo(("0:0,bandwidth=10", "0:2,bandwidth=655340"), ())  # base 10 MB/s, entry 65534


def test_toml_hmat(tmp_path: Path) -> None:
    text = config.EXAMPLE_TOML.replace("[[domain]]", 'hmat = ["0:2,latency=300,bandwidth=8000"]\n'
                                       'hmat_cache = ["2,size=64M,assoc=direct"]\n\n[[domain]]', 1)
    t = config.loads(text, "m.toml").build(host_nodes=(0,))
    assert [(lk.initiator, lk.target, lk.read_latency) for lk in t.hmat] == [(0, 2, 300)]
    assert [(c.domain, c.size, c.assoc) for c in t.caches] == [(2, 64 * MiB, "direct")]
    with pytest.raises(ConfigError, match=r"m.toml: hmat\[0\] 2:0: initiator 2 has no vCPUs"):
        config.loads(text.replace('"0:2,', '"2:0,'), "m.toml").build(host_nodes=(0,))
    with pytest.raises(ConfigError, match="hmat must be an array of strings"):
        config.loads(text.replace('hmat = ["0:2,latency=300,bandwidth=8000"]', "hmat = 3"), "m.toml")


def test_cli_errors_exit_2_before_anything(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["acpi", "--out", str(tmp_path / "out")] + [a for d in DOMAINS for a in ("-n", d)]
    assert main(argv + ["--hmat", "2:0,latency=5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--hmat 2:0: initiator 2 has no vCPUs" in err
    assert not (tmp_path / "out").exists()
    assert main(argv + ["--hmat-cache", "2,size=1G,assoc=8way"]) == 2
    assert "--hmat-cache 2 assoc" in capsys.readouterr().err


def test_no_hmat_without_figures() -> None:
    assert build_hmat(topo((), ())) is None
    assert "HMAT" not in acpi.build_tables(plan_layout(topo((), ()))).blobs()


def test_hmat_under_iasl(tmp_path: Path) -> None:
    t = topo()
    tables = acpi.build_tables(plan_layout(t))
    blob = tables.blobs()["HMAT"]
    d = disassemble(blob, tmp_path, "HMAT")
    check_header(d, "HMAT", len(blob), 2)
    assert "HMAT" in [n for n, _ in tables.addresses]
    types = [hexval(v) for v in d.all("Structure Type")]
    assert types == [0, 0, 0, 1, 1, 1, 1, 2]
    assert [hexval(v) for v in d.all("Memory Proximity Domain")] == [0, 1, 2, 2]
    assert [hexval(v) for v in d.all("Processor Proximity Domain Valid")] == [0, 0, 0]
    assert [hexval(v) for v in d.all("Data Type")] == [1, 2, 4, 5]
    assert [hexval(v) for v in d.all("Memory Hierarchy")] == [0] * 4
    assert [hexval(v) for v in d.all("Initiator Proximity Domains #")] == [2] * 4
    assert [hexval(v) for v in d.all("Target Proximity Domains #")] == [3] * 4
    assert [hexval(v) for v in d.all("Initiator Proximity Domain List")] == [0, 1] * 4
    assert [hexval(v) for v in d.all("Target Proximity Domain List")] == [0, 1, 2] * 4
    bases = [hexval(v) for v in d.all("Entry Base Unit")]
    entries = [hexval(v) for v in d.all("Entry")]
    tables_ = [entries[k * 6:(k + 1) * 6] for k in range(4)]
    # what Linux computes: entry * base, latencies from ps to ns
    values = [[e * b // (1000 if k < 2 else 1) for e in row] for k, (row, b) in enumerate(zip(tables_, bases))]
    assert values == [[100, 150, 300, 150, 100, 350],  # read latency, initiator 0 then 1
                      [100, 150, 400, 150, 100, 350],  # write latency
                      [20000, 15000, 8000, 15000, 20000, 6000],
                      [20000, 15000, 8000, 15000, 20000, 6000]]
    assert hexval(d.one("Memory Side Cache Size")) == 256 * MiB
    assert [hexval(d.one(n)) for n in ("Total Cache Levels", "Cache Level", "Cache Associativity",
                                       "Write Policy", "Cache Line Size")] == [1, 1, 1, 1, 64]
    assert hexval(d.one("SMBIOS Handle #")) == 0


# ---------------------------------------------------------------- what Linux makes of it


def plan_doc(links=LINKS, caches=CACHES, domains=DOMAINS) -> dict:
    from numavm.plan.render import plan_document
    return plan_document(plan_layout(topo(links, caches, domains)))


def test_linux_picks_the_best_initiators_type_by_type() -> None:
    """Measured in Debian's 6.1 and 6.12 guests: node 2 reports initiator 1's figures, though
    initiator 0 reads it faster (300 ns): write latency, walked first, chose initiator 1."""
    acc = plan_doc()["hmat"]["linux"]["access"]
    want2 = {"read_latency": 350, "write_latency": 350, "read_bandwidth": 6000, "write_bandwidth": 6000,
             "initiators": [1]}
    assert acc["2"] == {"0": want2, "1": want2}
    assert acc["0"]["0"]["initiators"] == [0] and acc["1"]["1"]["initiators"] == [1]
    # a target no initiator has figures for keeps every candidate, with zeros
    part = plan_doc(("0:2,latency=300,bandwidth=8000", "0:0,latency=100,bandwidth=20000"))["hmat"]["linux"]
    assert part["access"]["1"]["0"] == {"read_latency": 0, "write_latency": 0, "read_bandwidth": 0,
                                        "write_bandwidth": 0, "initiators": [0]}
    # caches alone: no localities, no links
    assert plan_doc((), CACHES)["hmat"]["linux"]["access"]["2"]["0"]["initiators"] == []


def test_memory_tiers_from_hmat() -> None:
    from numavm.check.linux_numa import hmat_access, memory_tiers
    doc = plan_doc()
    acc = hmat_access(doc["hmat"]["links"], [0, 1, 2], [0, 1])
    # 576 * 700 / 200 * 40000 / 12000 = 6720: tier 52 (measured in 6.12)
    assert memory_tiers(acc, [0, 1, 2], [0, 1], (6, 12)) == {0: 4, 1: 4, 2: 52}
    assert memory_tiers(acc, [0, 1, 2], [0, 1], (6, 1)) == {0: 4, 1: 4, 2: 4}
    # a DRAM node without figures: HMAT's algorithm is not registered (measured: tier 4)
    part = hmat_access(plan_doc(("0:2,latency=300,bandwidth=8000", "0:0,latency=100,bandwidth=20000"))
                       ["hmat"]["links"], [0, 1, 2], [0, 1])
    assert memory_tiers(part, [0, 1, 2], [0, 1], (6, 12)) == {0: 4, 1: 4, 2: 4}
    # DRAM nodes more than 10% apart: likewise
    skew = hmat_access(plan_doc(("0:0,latency=100,bandwidth=20000", "1:1,latency=120,bandwidth=20000",
                                 "0:2,latency=300,bandwidth=8000"))["hmat"]["links"], [0, 1, 2], [0, 1])
    assert memory_tiers(skew, [0, 1, 2], [0, 1], (6, 12))[2] == 4


def test_compare_hmat_finds_each_difference() -> None:
    from numavm.check.compare import compare_hmat
    doc = plan_doc()
    acc = doc["hmat"]["linux"]["access"]
    nodes = {str(t): {"access": {a: dict(v) for a, v in acc[str(t)].items()}} for t in range(3)}
    nodes["2"]["memory_side_cache"] = {"1": {"size": 256 * MiB, "line_size": 64, "indexing": 0, "write_policy": 0}}
    seen = {"nodes": nodes, "memory_tiers": {"4": "0-1", "52": "2"}}
    pmap = {0: 0, 1: 1, 2: 2}
    assert compare_hmat(doc, seen, pmap, (6, 12)) == ([], [])
    bad, _ = compare_hmat(doc, seen, pmap, (6, 1))
    assert bad == ["domain 2 (node 2): memory tier 52, plan wants 4 (before 6.10 every node is DRAM)"]
    nodes["2"]["access"]["1"]["read_latency"] = 300
    nodes["2"]["access"]["0"]["initiators"] = [0, 1]
    nodes["2"]["memory_side_cache"]["1"]["indexing"] = 2
    bad, _ = compare_hmat(doc, seen, pmap, (6, 12))
    assert bad == ["domain 2 (node 2) access0 initiators: guest [0, 1], plan wants [1]",
                   "domain 2 (node 2) access1 read_latency: guest 300 ns, plan wants 350 ns",
                   "domain 2 (node 2) memory-side cache level 1 indexing: guest 2, plan wants 0"]
    del nodes["1"]["access"]
    bad, _ = compare_hmat(doc, {"nodes": nodes}, pmap, (6, 12))
    assert "domain 1 (node 1) access0: not in the guest's sysfs (nodeN/access0/initiators)" in bad
    assert "memory tiers: the guest's report has none (/sys/devices/virtual/memory_tiering)" in bad
    # no HMAT planned: the guest must show no access classes
    bad, _ = compare_hmat(plan_doc((), ()), seen, pmap, (6, 12))
    assert bad[0].startswith("HMAT: the plan has none, but the guest reports access classes")


# ---------------------------------------------------------------- proven in a guest

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from test_check import needs_apt, needs_qemu  # noqa: E402

GUEST_MACHINES = {
    "full": [a for d in DOMAINS for a in ("-n", d)] + [a for h in LINKS for a in ("--hmat", h)]
    + [a for c in CACHES for a in ("--hmat-cache", c)],
    # a DRAM node without figures; a memory-only domain numbered first (node 2 in the guest)
    "partial": ["-n", "id=0,size=512M", "-n", "id=1,size=1G,cpus=0-1", "-n", "id=2,size=1G,cpus=2-3",
                "--hmat", "1:0,latency=300,bandwidth=8000", "--hmat", "1:1,latency=100,bandwidth=20000",
                "--hmat-cache", "0,size=64M,assoc=complex,policy=writethrough",
                "--hmat-cache", "0,size=128M,level=2,line=128"],
    "cxl-example": ["-f", str(Path(__file__).resolve().parent.parent / "examples" / "cxl-tiered.toml")],
}
# memory tiers on Linux 6.10+ (before: every node in tier 4); the far CPU-less node lands below
HMAT_TIERS = {"full": {"4": "0-1", "52": "2"}, "cxl-example": {"4": "0-1", "31": "2"}}


def _releases() -> list[str | None]:
    from numavm.guest.aptrelease import host_release
    other = {"bookworm": "trixie", "trixie": "bookworm"}.get(host_release() or "")
    return [None] + ([other] if other else [])


@needs_qemu
@needs_apt
@pytest.mark.parametrize("release", _releases())
@pytest.mark.parametrize("name", sorted(GUEST_MACHINES))
def test_guest_sysfs_shows_the_hmat(name: str, release: str | None) -> None:
    """`check` under TCG on each Debian release's kernel: access0/access1, links, caches, tiers."""
    r = subprocess.run([sys.executable, "-m", "numavm", "check", "--accel", "tcg", "--stage", "userspace",
                        "--json", *(["--release", release] if release else []), *GUEST_MACHINES[name]],
                       capture_output=True, text=True, timeout=900)
    assert r.stdout, r.stderr
    doc = json.loads(r.stdout)
    assert doc["match"], "\n".join(doc["mismatches"]) + "\n" + r.stderr[-2000:]
    user = doc["observed"]["userspace"]
    version = tuple(int(x) for x in user["kernel"].split(".")[:2])
    with_access = [n for n, v in user["nodes"].items() if v.get("access")]
    with_cache = [n for n, v in user["nodes"].items() if v.get("memory_side_cache")]
    assert len(with_access) == 3 and len(with_cache) == 1  # the comparison had something to compare
    tiers = user["memory_tiers"]
    if name in HMAT_TIERS and version >= (6, 10):
        assert tiers == HMAT_TIERS[name]
    else:
        assert tiers == {"4": "0-2"}


def test_kvm_engine_places_the_hmat_where_the_xsdt_points() -> None:
    tables = acpi.build_tables(plan_layout(topo()))
    at = tables.address_of("HMAT")
    assert at in tables.xsdt.entries
    placed = dict(tables.placements())
    assert placed[at] == tables.blobs()["HMAT"]


def test_plan_shows_the_hmat(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [a for d in DOMAINS for a in ("-n", d)] + [a for h in LINKS for a in ("--hmat", h)] + \
        [a for c in CACHES for a in ("--hmat-cache", c)]
    assert main(["plan", *argv, "--svg", str(tmp_path / "p.svg")]) == 0
    out = capsys.readouterr().out
    assert "  0          2       300/400  8000/8000" in out
    assert "domain 2: level 1, 256M, line 64 B, associativity direct, write policy writeback" in out
    assert "domain 2: 350/350 ns, 6000/6000 MB/s from initiator domain(s) 1; memory tier 52" in out
    svg = (tmp_path / "p.svg").read_text()
    assert 'class="hmat"' in svg and "tier 52; L1 cache 256M" in svg
    assert main(["plan", "--json", *argv]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["hmat"]["links"][2] == {"initiator": 0, "target": 2, "read_latency": 300, "write_latency": 400,
                                       "read_bandwidth": 8000, "write_bandwidth": 8000}
    assert doc["hmat"]["caches"] == [{"domain": 2, "size": 256 * MiB, "level": 1, "line": 64, "assoc": "direct",
                                      "policy": "writeback"}]
    assert doc["hmat"]["linux"]["memory_tiers"] == {"0": 4, "1": 4, "2": 52}
    assert main(["plan", "--json", *[a for d in DOMAINS for a in ("-n", d)]]) == 0
    assert json.loads(capsys.readouterr().out)["hmat"] == {"links": [], "caches": []}


# ---------------------------------------------------------------- export


def _export(to: str, links=LINKS, caches=CACHES, domains=DOMAINS):
    from numavm.peers.export import export
    return export(topo(links, caches, domains), to)


def test_export_qemu_hmat_options() -> None:
    e = _export("qemu")
    assert "-machine pc,max-ram-below-4g=3G,hmat=on" in e.text
    # the memory-only node is attached to the initiator Linux picks from numavm's HMAT
    assert "-numa node,nodeid=2,memdev=mem2,initiator=1" in e.text
    assert "-numa hmat-lb,initiator=0,target=2,hierarchy=memory,data-type=write-latency,latency=400" in e.text
    assert "-numa hmat-lb,initiator=1,target=2,hierarchy=memory,data-type=read-bandwidth,bandwidth=6000M" in e.text
    assert e.text.count("hmat-lb") == 24
    assert "-numa hmat-cache,node-id=2,size=256M,level=1,associativity=direct,policy=write-back,line=64" in e.text
    assert e.warnings == []
    plain = _export("qemu", (), ())
    assert "hmat" not in plain.text


def test_export_qemu_says_what_it_cannot_express() -> None:
    # node 0's best initiator is 1, but QEMU attaches a node with vCPUs to itself
    e = _export("qemu", ("0:0,latency=200,bandwidth=1000", "1:0,latency=100,bandwidth=2000"), ("1,size=1M",))
    assert e.warnings[0].startswith("domain 0: QEMU attaches a node with vCPUs to itself in its HMAT; numavm's "
                                    "lets Linux link it to initiator domain(s) 1")
    assert any("QEMU takes a memory-side cache only for a node with latency and bandwidth" in w
               for w in e.warnings)
    assert "hmat-cache" not in e.text


def test_export_libvirt_interconnects_and_cache() -> None:
    import xml.etree.ElementTree as ET
    e = _export("libvirt")
    numa = ET.fromstring(e.text).find("cpu/numa")
    lat = [(x.get("initiator"), x.get("target"), x.get("type"), x.get("value"))
           for x in numa.findall("interconnects/latency")]
    assert lat[0] == ("1", "2", "read", "350")  # the memory-only cell's initiator comes first
    assert ("0", "2", "write", "400") in lat and len(lat) == 12
    bw = {(x.get("initiator"), x.get("target"), x.get("type")): (x.get("value"), x.get("unit"))
          for x in numa.findall("interconnects/bandwidth")}
    assert bw[("0", "2", "read")] == (str(8000 * 1024), "KiB")
    cache = numa.find("cell[@id='2']/cache")
    assert cache.attrib == {"level": "1", "associativity": "direct", "policy": "writeback"}
    assert cache.find("size").attrib == {"value": str(256 * 1024), "unit": "KiB"}
    assert cache.find("line").attrib == {"value": "64", "unit": "B"}
    assert e.warnings == []


@pytest.mark.parametrize("peer, name", [("cloud-hypervisor", "Cloud Hypervisor"), ("bhyve", "bhyve")])
def test_export_peers_without_hmat_say_so(peer: str, name: str) -> None:
    e = _export(peer)
    assert f"{name} has no HMAT: the latency and bandwidth figures (6 --hmat entries) are left out" in e.warnings[0]
    assert f"{name} has no HMAT: the memory-side caches of domain(s) 2 are left out" == e.warnings[1]
    assert "hmat" not in e.text.lower()


def test_export_toml_round_trips_the_hmat() -> None:
    t = topo()
    back = config.loads(_export("toml").text, "x.toml").build(host_nodes=(0,))
    assert [dataclass_values(x) for x in back.hmat] == [dataclass_values(x) for x in t.hmat]
    assert [dataclass_values(x) for x in back.caches] == [dataclass_values(x) for x in t.caches]


def dataclass_values(x) -> tuple:
    import dataclasses
    return tuple(v for k, v in dataclasses.asdict(x).items() if k != "origin")


@needs_qemu
@needs_apt
@pytest.mark.parametrize("release", _releases())
def test_qemu_builds_the_same_hmat_from_the_export(release: str | None, tmp_path: Path) -> None:
    """QEMU booted with `export --to qemu` builds its own HMAT (hmat-lb, hmat-cache, initiator=):
    the guest's sysfs must show what numavm's plan says."""
    from numavm.guest import assets as A, initramfs as I
    from numavm.check import compare as G
    from numavm.peers.export import qemu_args
    from numavm.guest.launch import unpacked_kernel
    from numavm.check.linux_numa import kernel_version
    from numavm.plan.render import plan_document

    t = topo()
    a = A.fetch(log=lambda s: None, release=release)
    kernel = unpacked_kernel(a.kernel, log=lambda s: None)
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(I.build_initramfs(a.busybox))
    argv = ["qemu-system-x86_64", *qemu_args(t), "-accel", "tcg", "-cpu", "qemu64", "-kernel", str(kernel),
            "-initrd", str(initrd), "-append", "console=ttyS0 nokaslr panic=-1 quiet", "-nographic",
            "-no-reboot", "-monitor", "none", "-serial", "stdio", "-net", "none"]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    rep = I.parse_guest_report(r.stdout)
    assert rep is not None, r.stdout[-3000:] + r.stderr
    assert "HMAT" in rep["acpi_tables"]
    doc = plan_document(plan_layout(t))
    pmap = G.guest_pxm_to_node(doc, G.pxm_to_node_from_log(r.stdout), rep)
    bad, _ = G.compare_hmat(doc, rep, pmap, kernel_version(rep["kernel"]))
    assert bad == [], "\n".join(bad)
    assert rep["nodes"]["2"]["access"]["0"]["initiators"] == [1]


def test_an_hmat_too_large_for_the_table_area_is_bad_input() -> None:
    from numavm.plan.acpi.hmat import build_hmat
    from numavm.spec.topology import hmat_size
    n = 100
    domains = [f"id={i},size=4M,cpus={i}" for i in range(n)]
    links = [f"{i}:{t},latency=100,bandwidth=1000" for i in range(n) for t in range(n)]
    msg = error(links, (), domains)
    assert msg.startswith("--hmat: 100 initiators x 100 targets make an HMAT of") and "at most 65535" in msg
    # the estimate is the table's real size
    t = topo([f"{i}:{t},latency=100,bandwidth=1000" for i in range(60) for t in range(3)], (), domains)
    assert len(build_hmat(t).to_bytes()) == hmat_size(n, 60, 3, 4, 0)


# The KVM engine's HMAT: tests/test_hwvirt.py's `hmat` case (check at userspace on kvm_amd, from
# the guest's sysfs); here /dev/kvm only emulates and a guest would need minutes for its kernel stage.
