"""The HMAT: the machine options that describe it, their rules, and the table as iasl reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from numavm import acpi, config
from numavm.acpi.hmat import build_hmat
from numavm.cli import main
from numavm.errors import ConfigError
from numavm.layout import plan_layout
from numavm.topology import MachineSpec, parse_hmat, parse_hmat_cache, parse_numa
from numavm.units import MiB

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
