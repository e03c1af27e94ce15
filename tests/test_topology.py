"""Parsing of the machine options and every rule `MachineSpec.build()` applies.

Each rule violation must be one `ConfigError` whose message starts with the
option it is about (``-n/--numa id=1 size: ...``, ``-m/--memory: ...``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from numavm.errors import ConfigError, NumavmError
from numavm.spec.policy import Mode, Policy, host_online_nodes, parse_policy
from numavm.spec.topology import (
    DEFAULT_MEMORY,
    MAX_CPUS,
    MAX_DOMAINS,
    DomainSpec,
    MachineSpec,
    Topology,
    parse_distance,
    parse_numa,
)
from numavm.spec.units import GiB, KiB, MiB, TiB, format_list, format_size, parse_list, parse_size

REPO = Path(__file__).resolve().parent.parent

ONE_HOST = (0,)
FOUR_HOSTS = (0, 1, 2, 3)


def build(*numa: str, cpus: int | None = None, memory: str | int | None = None,
          distances: tuple[str, ...] = (), host: tuple[int, ...] = ONE_HOST) -> Topology:
    """Build a topology from option strings, as the command line would."""
    spec = MachineSpec(
        cpus=cpus,
        memory=parse_size(memory, "-m/--memory") if memory is not None else None,
        domains=[parse_numa(n) for n in numa],
        distances=[parse_distance(d) for d in distances],
    )
    return spec.build(host_nodes=host)


def build_error(*numa: str, **kw) -> str:
    with pytest.raises(ConfigError) as ei:
        build(*numa, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def sizes(topo: Topology) -> list[int]:
    return [d.size for d in topo.domains]


# ================================================================ SIZE


@pytest.mark.parametrize("text,want", [
    ("0", 0),
    ("4096", 4096),
    ("1k", KiB), ("1K", KiB),
    ("512m", 512 * MiB), ("512M", 512 * MiB),
    ("4g", 4 * GiB), ("4G", 4 * GiB),
    ("1t", TiB), ("2T", 2 * TiB),
    (" 2M ", 2 * MiB),
    ("1GiB", GiB), ("1gib", GiB), ("1GB", GiB),
    ("16b", 16),
])
def test_parse_size_ok(text, want):
    assert parse_size(text, "-m/--memory") == want


def test_parse_size_passes_ints_through():
    assert parse_size(0, "f") == 0
    assert parse_size(GiB, "f") == GiB


@pytest.mark.parametrize("text", ["", " ", "G", "1.5G", "-1G", "1P", "1E", "one", "1 G G", "0x10", "1,5G", "1G+1M"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError) as ei:
        parse_size(text, "-m/--memory")
    assert str(ei.value).startswith("-m/--memory: ")


@pytest.mark.parametrize("value", [True, False, -1])
def test_parse_size_rejects_bool_and_negative(value):
    with pytest.raises(ConfigError) as ei:
        parse_size(value, "mem")
    assert str(ei.value).startswith("mem: ")


@pytest.mark.parametrize("n,text", [(GiB, "1G"), (1536 * MiB, "1536M"), (4096, "4K"), (4097, "4097"),
                                    (TiB, "1T"), (0, "0")])
def test_format_size(n, text):
    assert format_size(n) == text
    assert parse_size(text, "x") == n


def test_parse_size_huge_number_is_a_config_error():
    with pytest.raises(ConfigError):
        parse_size("1" + "0" * 5000, "-m/--memory")


# ================================================================ LIST


@pytest.mark.parametrize("text,want", [
    ("0", (0,)),
    ("3", (3,)),
    ("0-1+4", (0, 1, 4)),
    ("0-3+6", (0, 1, 2, 3, 6)),
    ("4+0-1", (0, 1, 4)),
    (" 1 + 2 ", (1, 2)),
    ("5-5", (5,)),
    (7, (7,)),
    ([3, 1, 2], (1, 2, 3)),
    ([], ()),
])
def test_parse_list_ok(text, want):
    assert parse_list(text, "f") == want


@pytest.mark.parametrize("text", ["", "  ", "0,1", "a", "0-", "-1", "0--1", "1-2-3", "0+", "+0", "0++1", "0 1",
                                  "1.0"])
def test_parse_list_rejects_syntax(text):
    with pytest.raises(ConfigError) as ei:
        parse_list(text, "-n/--numa cpus")
    assert str(ei.value).startswith("-n/--numa cpus: ")


def test_parse_list_rejects_backwards_range():
    with pytest.raises(ConfigError, match=r"^f: range 3-1 runs backwards"):
        parse_list("3-1", "f")


def test_parse_list_rejects_duplicates():
    with pytest.raises(ConfigError, match=r"^f: 1 named more than once"):
        parse_list("0-2+1", "f")
    with pytest.raises(ConfigError, match=r"^f: "):
        parse_list([1, 1], "f")


def test_parse_list_rejects_very_long_list():
    with pytest.raises(ConfigError, match=r"^f: .*too long"):
        parse_list("0-70000", "f")


@pytest.mark.parametrize("value", [True, [True], [-1], [1, "2"], [1.0]])
def test_parse_list_rejects_non_integers(value):
    with pytest.raises(ConfigError, match=r"^f: "):
        parse_list(value, "f")


def test_parse_list_rejects_negative_scalar():
    with pytest.raises(ConfigError):
        parse_list(-1, "f")


def test_parse_list_huge_number_is_a_config_error():
    with pytest.raises(ConfigError):
        parse_list("1" * 5000, "-n/--numa cpus")


def test_parse_list_duplicate_report_is_fast():
    code = textwrap.dedent("""
        from numavm.spec.units import parse_list
        from numavm.errors import ConfigError
        try:
            parse_list("0-32767+0-32767", "f")
        except ConfigError:
            pass
    """)
    try:
        subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=3, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("parse_list took more than 3 s to report a duplicate")


@pytest.mark.parametrize("items,text", [((0, 1, 2, 5), "0-2+5"), ((), ""), ((3,), "3"), ((0, 2, 4), "0+2+4")])
def test_format_list(items, text):
    assert format_list(items) == text
    if text:
        assert parse_list(text, "f") == items


# ================================================================ -n


def test_parse_numa_full():
    d = parse_numa("id=1,size=1G,cpus=0-1+4,domain_policy=bind:0")
    assert d.id == 1
    assert d.size == GiB
    assert d.cpus == (0, 1, 4)
    assert d.policy == Policy(Mode.BIND, (0,))
    assert d.origin == "-n/--numa id=1"


def test_parse_numa_minimal():
    d = parse_numa("id=0")
    assert (d.id, d.size, d.cpus, d.policy) == (0, None, None, Policy())


def test_parse_numa_repeated_cpus_as_qemu():
    assert parse_numa("id=0,cpus=0,cpus=2").cpus == (0, 2)
    assert parse_numa("id=0,cpus=3-4,cpus=0+1,cpus=7").cpus == (0, 1, 3, 4, 7)


def test_parse_numa_repeated_cpus_overlapping():
    with pytest.raises(ConfigError, match=r"^-n/--numa cpus: vCPU 2 named more than once"):
        parse_numa("id=0,cpus=0-2,cpus=2")


def test_parse_numa_keys_any_order_and_case():
    d = parse_numa("CPUS=1,Size=4M,ID=2")
    assert (d.id, d.size, d.cpus) == (2, 4 * MiB, (1,))


def test_parse_numa_policy_key_alias():
    assert parse_numa("id=0,policy=local").policy == Policy(Mode.LOCAL)


def test_parse_numa_size_zero():
    assert parse_numa("id=0,size=0,cpus=0").size == 0


@pytest.mark.parametrize("text,start", [
    ("size=1G", "-n/--numa: id= is required"),
    ("", "-n/--numa: id= is required"),
    ("id=0,id=1", "-n/--numa: id given twice"),
    ("id=0,size=1G,size=2G", "-n/--numa: size given twice"),
    ("id=0,domain_policy=local,policy=local", "-n/--numa: domain_policy given twice"),
    ("id=0,node=1", "-n/--numa: unknown key 'node'"),
    ("id=0,1G", "-n/--numa: expected key=value"),
    ("id=x", "-n/--numa id: expected a whole number"),
    ("id=", "-n/--numa id: expected a whole number"),
    ("id=-1", "-n/--numa id: must be 0 or more"),
    ("id=1,size=lots", "-n/--numa id=1 size: "),
    ("id=1,cpus=0,1", "-n/--numa: expected key=value"),
    ("id=1,cpus=", "-n/--numa cpus: "),
    ("id=1,cpus=2-1", "-n/--numa cpus: "),
    ("id=1,domain_policy=sometimes", "-n/--numa id=1 domain_policy: unknown policy 'sometimes'"),
])
def test_parse_numa_errors(text, start):
    with pytest.raises(ConfigError) as ei:
        parse_numa(text)
    assert str(ei.value).startswith(start), str(ei.value)


# ================================================================ policies


@pytest.mark.parametrize("text,mode,nodes", [
    ("default", Mode.DEFAULT, ()),
    ("local", Mode.LOCAL, ()),
    ("first-touch", Mode.LOCAL, ()),
    ("ft", Mode.LOCAL, ()),
    ("bind:0", Mode.BIND, (0,)),
    ("bind:0-1+3", Mode.BIND, (0, 1, 3)),
    ("preferred:2", Mode.PREFERRED, (2,)),
    ("prefer:1", Mode.PREFERRED, (1,)),
    ("preferred-many:0+2", Mode.PREFERRED_MANY, (0, 2)),
    ("interleave", Mode.INTERLEAVE, ()),
    ("interleave:0-1", Mode.INTERLEAVE, (0, 1)),
    ("il", Mode.INTERLEAVE, ()),
    ("il:1", Mode.INTERLEAVE, (1,)),
    ("round-robin", Mode.INTERLEAVE, ()),
    ("round-robin:0-3", Mode.INTERLEAVE, (0, 1, 2, 3)),
    ("rr", Mode.INTERLEAVE, ()),
    ("rr:2+3", Mode.INTERLEAVE, (2, 3)),
    ("weighted-interleave:0-1", Mode.WEIGHTED_INTERLEAVE, (0, 1)),
    ("BIND:0", Mode.BIND, (0,)),
    ("Round-Robin", Mode.INTERLEAVE, ()),
])
def test_parse_policy(text, mode, nodes):
    assert parse_policy(text, "p") == Policy(mode, nodes)


@pytest.mark.parametrize("text,start", [
    ("sometimes", "p: unknown policy 'sometimes'"),
    ("", "p: unknown policy"),
    ("local:0", "p: local takes no nodes"),
    ("ft:0", "p: ft takes no nodes"),
    ("default:0", "p: default takes no nodes"),
    ("bind", "p: bind needs host nodes"),
    ("preferred", "p: preferred needs one host node"),
    ("prefer", "p: prefer needs one host node"),
    ("preferred-many", "p: preferred-many needs host nodes"),
    ("weighted-interleave", "p: weighted-interleave needs host nodes"),
    ("preferred:0-1", "p: preferred takes exactly one host node"),
    ("bind:", "p nodes: "),
    ("bind:x", "p nodes: "),
    ("bind:0,1", "p nodes: "),
])
def test_parse_policy_errors(text, start):
    with pytest.raises(ConfigError) as ei:
        parse_policy(text, "p")
    assert str(ei.value).startswith(start), str(ei.value)


def test_policy_labels():
    assert [m.label for m in Mode] == ["default", "preferred", "bind", "interleave", "local",
                                        "preferred-many", "weighted-interleave"]
    assert str(Policy(Mode.BIND, (0, 1))) == "bind:0-1"
    assert str(Policy()) == "default"


def test_domain_policy_reaches_the_topology():
    t = build("id=0,size=4M,cpus=0,domain_policy=bind:1", "id=1,size=4M,domain_policy=prefer:3",
              host=FOUR_HOSTS)
    assert t.domains[0].policy == Policy(Mode.BIND, (1,))
    assert t.domains[1].policy == Policy(Mode.PREFERRED, (3,))


def test_interleave_without_nodes_means_every_online_node():
    for alias in ("interleave", "il", "round-robin", "rr"):
        t = build(f"id=0,size=4M,cpus=0,domain_policy={alias}", host=FOUR_HOSTS)
        assert t.domains[0].policy == Policy(Mode.INTERLEAVE, FOUR_HOSTS)
        t = build(f"id=0,size=4M,cpus=0,domain_policy={alias}", host=ONE_HOST)
        assert t.domains[0].policy == Policy(Mode.INTERLEAVE, (0,))


def test_default_policy_has_no_nodes():
    t = build("id=0,size=4M,cpus=0")
    assert t.domains[0].policy == Policy(Mode.DEFAULT, ())


@pytest.mark.parametrize("pol", ["bind:1", "preferred:1", "prefer:2", "preferred-many:0+1", "interleave:1",
                                 "il:0-1", "rr:3", "round-robin:1", "weighted-interleave:0-1"])
def test_policy_node_not_online(pol):
    msg = build_error("id=0,size=4M,cpus=0", f"id=1,size=4M,domain_policy={pol}", host=ONE_HOST)
    assert msg.startswith("-n/--numa id=1 domain_policy: host node"), msg
    assert "not online" in msg
    assert "(online: 0)" in msg


def test_policy_missing_nodes_named():
    msg = build_error("id=0,size=4M,cpus=0,domain_policy=bind:0-5", host=FOUR_HOSTS)
    assert msg == "-n/--numa id=0 domain_policy: host nodes 4-5 not online (online: 0-3)"
    msg = build_error("id=0,size=4M,cpus=0,domain_policy=preferred:7", host=(0, 2))
    assert msg == "-n/--numa id=0 domain_policy: host node 7 not online (online: 0+2)"


def test_policy_nodes_fine_on_a_bigger_host():
    t = build("id=0,size=4M,cpus=0,domain_policy=bind:1-3", "id=1,size=4M,domain_policy=weighted-interleave:0+2",
              host=FOUR_HOSTS)
    assert t.domains[0].policy.nodes == (1, 2, 3)


def test_build_defaults_to_this_hosts_online_nodes():
    online = host_online_nodes()
    assert 0 in online
    spec = MachineSpec(domains=[parse_numa("id=0,size=4M,cpus=0,domain_policy=interleave")])
    assert spec.build().domains[0].policy.nodes == online
    bad = max(online) + 1
    with pytest.raises(ConfigError, match=rf"host node {bad} not online"):
        MachineSpec(domains=[parse_numa(f"id=0,size=4M,cpus=0,domain_policy=bind:{bad}")]).build()


def test_host_online_nodes_reads_sysfs_syntax(tmp_path):
    p = tmp_path / "online"
    p.write_text("0-1,4\n")
    assert host_online_nodes(p) == (0, 1, 4)
    assert host_online_nodes(tmp_path / "missing") == (0,)


# ================================================================ distances


def test_parse_distance():
    assert parse_distance("0:1=20") == (0, 1, 20, "--distance 0:1=20")
    assert parse_distance(" 2 : 3 = 255 ")[:3] == (2, 3, 255)


@pytest.mark.parametrize("text,start", [
    ("0-1=20", "--distance: expected I:J=D"),
    ("0:1", "--distance: expected I:J=D"),
    ("0:1:20", "--distance: expected I:J=D"),
    ("", "--distance: expected I:J=D"),
    ("a:1=20", "--distance: expected a whole number"),
    ("0:1=x", "--distance: expected a whole number"),
    ("0:1=", "--distance: expected a whole number"),
    ("-1:0=20", "--distance: must be 0 or more"),
    ("0:1=20=30", "--distance: expected a whole number"),
])
def test_parse_distance_errors(text, start):
    with pytest.raises(ConfigError) as ei:
        parse_distance(text)
    assert str(ei.value).startswith(start), str(ei.value)


THREE = ("id=0,size=4M,cpus=0", "id=1,size=4M,cpus=1", "id=2,size=4M")


def test_default_distances():
    assert build(*THREE).distances == ((10, 20, 20), (20, 10, 20), (20, 20, 10))


def test_distance_symmetric_when_one_direction_given():
    t = build(*THREE, distances=("0:2=30",))
    assert t.distances == ((10, 20, 30), (20, 10, 20), (30, 20, 10))
    t = build(*THREE, distances=("2:0=30",))
    assert t.distances[0][2] == t.distances[2][0] == 30


def test_distance_both_directions_asymmetric():
    t = build(*THREE, distances=("0:1=15", "1:0=25"))
    assert t.distances[0][1] == 15 and t.distances[1][0] == 25
    t = build(*THREE, distances=("1:0=25", "0:1=15"))  # order does not matter
    assert t.distances[0][1] == 15 and t.distances[1][0] == 25


def test_distance_repeated_same_value_is_fine():
    t = build(*THREE, distances=("0:1=15", "0:1=15"))
    assert t.distances[0][1] == t.distances[1][0] == 15


@pytest.mark.parametrize("d", [11, 12, 100, 254, 255])
def test_distance_allowed_values(d):
    t = build(*THREE, distances=(f"0:1={d}",))
    assert t.distances[0][1] == d


@pytest.mark.parametrize("d", [0, 1, 9, 10, 256, 1000])
def test_distance_off_diagonal_out_of_range(d):
    msg = build_error(*THREE, distances=(f"0:1={d}",))
    assert msg.startswith(f"--distance 0:1={d}: distance must be 11..254, or 255"), msg


def test_distance_diagonal_must_be_10():
    assert build(*THREE, distances=("1:1=10",)).distances[1][1] == 10
    msg = build_error(*THREE, distances=("1:1=20",))
    assert msg.startswith("--distance 1:1=20: a domain's distance to itself must be 10"), msg


def test_distance_names_missing_domain():
    msg = build_error(*THREE, distances=("0:3=20",))
    assert msg.startswith("--distance 0:3=20: no domain 3 (domains 0..2)"), msg
    msg = build_error(*THREE, distances=("7:0=20",))
    assert msg.startswith("--distance 7:0=20: no domain 7"), msg


def test_distance_conflicting_repeat():
    msg = build_error(*THREE, distances=("0:1=15", "0:1=16"))
    assert msg.startswith("--distance 0:1=16: distance 0:1 already given as 15"), msg


def test_distance_without_domains():
    msg = build_error(distances=("0:1=20",))
    assert msg.startswith("--distance: "), msg


def test_distance_unreachable_255():
    t = build(*THREE, distances=("1:2=255",))
    assert t.distances[1][2] == t.distances[2][1] == 255


def test_distance_error_is_one_line_even_with_newline():
    with pytest.raises(ConfigError) as ei:
        build(*THREE, distances=("0:1=\n5",))
    assert "\n" not in str(ei.value)


# ================================================================ classic machine (no -n)


def test_classic_defaults():
    t = MachineSpec().build(host_nodes=ONE_HOST)
    assert t.numa is False
    assert t.cpus == 1
    assert t.memory == DEFAULT_MEMORY == 512 * MiB
    assert len(t.domains) == 1
    d = t.domains[0]
    assert (d.id, d.size, d.cpus, d.policy) == (0, 512 * MiB, (0,), Policy())
    assert t.distances == ((10,),)


def test_classic_with_cpus_and_memory():
    t = MachineSpec(cpus=8, memory=5 * GiB).build(host_nodes=ONE_HOST)
    assert t.numa is False
    assert (t.cpus, t.memory) == (8, 5 * GiB)
    assert t.domains[0].cpus == tuple(range(8)) and t.domains[0].size == 5 * GiB


@pytest.mark.parametrize("mem,start", [
    (0, "-m/--memory: must be at least 4M"),
    (2 * MiB, "-m/--memory: must be at least 4M"),
    (5 * MiB, "-m/--memory: must be a multiple of 2M"),
    (GiB + 1, "-m/--memory: must be a multiple of 2M"),
    (65 * TiB, "-m/--memory: at most 64T"),
])
def test_memory_rules(mem, start):
    with pytest.raises(ConfigError) as ei:
        MachineSpec(memory=mem).build(host_nodes=ONE_HOST)
    assert str(ei.value).startswith(start), str(ei.value)


def test_memory_minimum_and_maximum_accepted():
    assert MachineSpec(memory=4 * MiB).build(host_nodes=ONE_HOST).memory == 4 * MiB
    assert MachineSpec(memory=64 * TiB).build(host_nodes=ONE_HOST).memory == 64 * TiB


# ================================================================ vCPU count


@pytest.mark.parametrize("n", [0, -1, MAX_CPUS + 1, 10**9])
def test_cpus_out_of_range(n):
    with pytest.raises(ConfigError) as ei:
        MachineSpec(cpus=n).build(host_nodes=ONE_HOST)
    assert str(ei.value).startswith("-c/--cpus: must be 1..1024"), str(ei.value)
    msg = build_error("id=0,size=4M,cpus=0", cpus=n)
    assert msg.startswith("-c/--cpus: must be 1..1024"), msg


def test_cpus_max_accepted():
    assert MachineSpec(cpus=MAX_CPUS).build(host_nodes=ONE_HOST).cpus == 1024
    assert build(f"id=0,size=4M,cpus=0-{MAX_CPUS - 1}", cpus=MAX_CPUS).cpus == 1024


def test_cpus_inferred_from_domains():
    t = build("id=0,size=4M,cpus=0-2", "id=1,size=4M,cpus=3+4")
    assert t.cpus == 5
    assert t.numa is True


def test_cpus_inferred_max():
    assert build(f"id=0,size=4M,cpus=0-{MAX_CPUS - 1}").cpus == MAX_CPUS
    msg = build_error(f"id=0,size=4M,cpus=0-{MAX_CPUS}")
    assert msg.startswith("-n/--numa cpus: 1024 is past the largest allowed, 1023"), msg


def test_cpus_explicit_matches_domains():
    t = build("id=0,size=4M,cpus=0-1", "id=1,size=4M,cpus=2-3", cpus=4)
    assert t.cpus == 4


def test_vcpu_in_two_domains():
    msg = build_error("id=0,size=4M,cpus=0-1", "id=1,size=4M,cpus=1-2")
    assert msg.startswith("-n/--numa id=1: vCPU 1 is already in domain 0"), msg


def test_vcpu_in_no_domain_with_cpus_given():
    msg = build_error("id=0,size=4M,cpus=0-1", "id=1,size=4M", cpus=4)
    assert msg.startswith("-n/--numa: vCPUs 2-3 are in no domain"), msg


def test_vcpu_in_no_domain_gap_when_inferred():
    msg = build_error("id=0,size=4M,cpus=0", "id=1,size=4M,cpus=3")
    assert msg.startswith("-n/--numa: vCPUs 1-2 are in no domain"), msg


def test_vcpu_beyond_cpus():
    msg = build_error("id=0,size=4M,cpus=0-1", "id=1,size=4M,cpus=2-4", cpus=4)
    assert msg.startswith("-n/--numa id=1: vCPU 4 does not exist (-c/--cpus 4"), msg


def test_no_domain_has_cpus():
    msg = build_error("id=0,size=4M", "id=1,size=4M")
    assert msg.startswith("-n/--numa: vCPUs 0 are in no domain"), msg


# ================================================================ domain ids


def test_ids_in_any_order_are_sorted():
    t = build("id=1,size=8M,cpus=1", "id=0,size=4M,cpus=0")
    assert [d.id for d in t.domains] == [0, 1]
    assert sizes(t) == [4 * MiB, 8 * MiB]
    assert t.domains[1].cpus == (1,)


def test_ids_must_be_contiguous():
    msg = build_error("id=0,size=4M,cpus=0", "id=2,size=4M")
    assert msg.startswith("-n/--numa: domain ids must run 0..1 without gaps; id=1 is missing"), msg


def test_ids_must_start_at_zero():
    msg = build_error("id=1,size=4M,cpus=0")
    assert msg.startswith("-n/--numa: domain ids must run 0..0 without gaps; id=0 is missing"), msg


def test_duplicate_id():
    msg = build_error("id=0,size=4M,cpus=0", "id=0,size=4M")
    assert msg.startswith("-n/--numa id=0: domain id 0 given twice"), msg


def test_256_domains_allowed_257_not():
    doms = ["id=0,size=4M,cpus=0"] + [f"id={i},size=4M" for i in range(1, MAX_DOMAINS)]
    t = build(*doms)
    assert len(t.domains) == MAX_DOMAINS == 256
    assert len(t.distances) == 256 and all(len(r) == 256 for r in t.distances)
    msg = build_error(*doms, f"id={MAX_DOMAINS},size=4M")
    assert msg.startswith("-n/--numa: at most 256 domains, got 257"), msg


# ================================================================ sizes


def test_memory_only_domain():
    t = build("id=0,size=4M,cpus=0", "id=1,size=8M")
    assert t.domains[1].cpus == ()
    assert t.domains[1].size == 8 * MiB


def test_cpu_only_domain():
    t = build("id=0,size=4M,cpus=0", "id=1,size=0,cpus=1")
    assert t.domains[1].size == 0
    assert t.domains[1].cpus == (1,)
    assert t.memory == 4 * MiB


def test_domain_with_neither_memory_nor_cpus():
    msg = build_error("id=0,size=4M,cpus=0", "id=1,size=0")
    assert msg.startswith("-n/--numa id=1: a domain needs memory (size=) or vCPUs (cpus=)"), msg


def test_no_domain_has_memory():
    msg = build_error("id=0,size=0,cpus=0", "id=1,size=0,cpus=1")
    assert msg.startswith("-n/--numa: at least one domain needs memory"), msg


def test_total_is_sum_of_sizes_without_m():
    t = build("id=0,size=1G,cpus=0", "id=1,size=512M,cpus=1", "id=2,size=0,cpus=2")
    assert t.memory == 1536 * MiB
    assert sizes(t) == [GiB, 512 * MiB, 0]


def test_sizes_must_sum_to_m():
    assert build("id=0,size=1G,cpus=0", "id=1,size=1G", memory="2G").memory == 2 * GiB
    msg = build_error("id=0,size=1G,cpus=0", "id=1,size=1G", memory="3G")
    assert msg.startswith("-m/--memory: 3G differs from the domains' sizes, which add up to 2G"), msg


def test_split_equally():
    t = build("id=0,cpus=0", "id=1,cpus=1", memory="2G")
    assert sizes(t) == [GiB, GiB]


def test_split_in_2m_granules():
    t = build("id=0,cpus=0", "id=1", "id=2", memory="1G")
    assert sum(sizes(t)) == GiB
    assert all(s % (2 * MiB) == 0 for s in sizes(t))
    assert max(sizes(t)) - min(sizes(t)) <= 2 * MiB
    assert sorted(sizes(t)) == [340 * MiB, 342 * MiB, 342 * MiB]


def test_split_what_is_left_after_given_sizes():
    t = build("id=0,size=256M,cpus=0", "id=1", "id=2,size=0,cpus=1", "id=3", memory="1G")
    assert sizes(t) == [256 * MiB, 384 * MiB, 0, 384 * MiB]
    assert t.memory == GiB


def test_split_needs_m():
    msg = build_error("id=0,size=1G,cpus=0", "id=1")
    assert msg.startswith("-m/--memory: needed when a domain has no size= (-n/--numa id=1)"), msg


def test_split_m_less_than_given():
    msg = build_error("id=0,size=1G,cpus=0", "id=1", memory="512M")
    assert msg.startswith("-m/--memory: 512M is less than the sizes given (1G)"), msg


def test_split_leaves_too_little():
    msg = build_error("id=0,size=1022M,cpus=0", "id=1", memory="1G")  # 2M left
    assert msg.startswith("-m/--memory: "), msg
    assert "-n/--numa id=1" in msg and "4M" in msg
    msg = build_error("id=0,size=1G,cpus=0", "id=1", memory="1G")  # nothing left
    assert msg.startswith("-m/--memory: "), msg
    # 6M for two domains: 3 granules give 4M and 2M, and 2M is too small
    msg = build_error("id=0,size=1018M,cpus=0", "id=1", "id=2", memory="1G")
    assert msg.startswith("-m/--memory: 6M left for 2 domain(s) without size= gives -n/--numa id=2 2M"), msg
    assert sizes(build("id=0,size=1016M,cpus=0", "id=1", "id=2", memory="1G")) == \
        [1016 * MiB, 4 * MiB, 4 * MiB]
    assert build("id=0,size=1016M,cpus=0", "id=1", memory="1G").domains[1].size == 8 * MiB


def test_split_leaves_exactly_4m():
    assert build("id=0,size=1018M,cpus=0", "id=1", memory="1022M").domains[1].size == 4 * MiB


@pytest.mark.parametrize("size,start", [
    ("3M", "-n/--numa id=1 size: must be a multiple of 2M"),
    ("1G+1", None),  # syntax error
    ("1025K", "-n/--numa id=1 size: must be a multiple of 2M"),
    ("2M", "-n/--numa id=1 size: must be at least 4M (or 0 for CPU-only)"),
    ("65T", "-n/--numa id=1 size: at most 64T"),
])
def test_domain_size_rules(size, start):
    msg = build_error("id=0,size=4M,cpus=0", f"id=1,size={size}") if start else None
    if start is None:
        with pytest.raises(ConfigError) as ei:
            parse_numa(f"id=1,size={size}")
        assert str(ei.value).startswith("-n/--numa id=1 size: ")
    else:
        assert msg.startswith(start), msg


def test_domain_size_minimum_accepted():
    t = build("id=0,size=4M,cpus=0", "id=1,size=6M")
    assert sizes(t) == [4 * MiB, 6 * MiB]


def test_domains_total_limit():
    msg = build_error("id=0,size=40T,cpus=0", "id=1,size=40T")
    assert msg.startswith("-n/--numa: domains total 80T, at most 64T"), msg


def test_topology_is_immutable_and_domain_of_cpu():
    t = build("id=0,size=4M,cpus=0+2", "id=1,size=4M,cpus=1")
    assert t.domain_of_cpu(2).id == 0
    assert t.domain_of_cpu(1).id == 1
    with pytest.raises(KeyError):
        t.domain_of_cpu(3)
    with pytest.raises(Exception):
        t.cpus = 3  # type: ignore[misc]


def test_config_error_is_a_numavm_error():
    assert issubclass(ConfigError, NumavmError)


def test_domainspec_default_origin():
    assert DomainSpec(0).origin == "-n/--numa"
