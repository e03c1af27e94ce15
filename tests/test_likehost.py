"""--like-host: a guest shaped like the host, from fake 2- and 4-node sysfs trees and
from this machine's own (one node)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import numavm.spec.likehost
from numavm.cli import main
from numavm.errors import ConfigError
from numavm.spec.likehost import like_host
from numavm.host.memory import NODE_DIR, node_cpus, node_total
from numavm.spec.policy import Mode, Policy, host_online_nodes
from numavm.spec.topology import Topology, parse_numa
from numavm.spec.units import GiB, MiB


def fake_sysfs(root: Path, nodes: dict[int, tuple[str, int, str]], online: str | None = None) -> Path:
    """A /sys/devices/system/node tree: node -> (cpulist, MemTotal in KiB, distance row)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "online").write_text((online or ",".join(str(n) for n in nodes)) + "\n")
    for n, (cpulist, kib, dist) in nodes.items():
        d = root / f"node{n}"
        d.mkdir()
        (d / "cpulist").write_text(cpulist + "\n")
        (d / "meminfo").write_text(f"Node {n} MemTotal:       {kib} kB\nNode {n} MemFree:        {kib // 2} kB\n")
        (d / "distance").write_text(dist + "\n")
    return root


TWO = {0: ("0-3", 8 << 20, "10 21"), 1: ("4-7", 8 << 20, "21 10")}
# node 2 memory-only (no CPUs), node 3 CPU-only (no memory), asymmetric distances
FOUR = {0: ("0-1", 4 << 20, "10 16 32 33"), 1: ("2-3", 4 << 20, "17 10 30 31"),
        2: ("", 8 << 20, "32 30 10 40"), 3: ("4-5", 0, "33 31 41 10")}


def build(cpus: int | None, memory: int | None, root: Path, given: tuple[str, ...] = ()) -> tuple[Topology, list[str]]:
    shape = like_host(cpus, memory, root, [parse_numa(g) for g in given])
    return shape.spec.build(shape.online), shape.notes


def test_two_nodes_mirror_the_host(tmp_path: Path) -> None:
    t, notes = build(None, 4 * GiB, fake_sysfs(tmp_path / "node", TWO))
    assert notes == []
    assert t.numa and t.cpus == 8 and t.memory == 4 * GiB
    assert [(d.size, d.cpus, d.policy) for d in t.domains] == [
        (2 * GiB, (0, 1, 2, 3), Policy(Mode.BIND, (0,))), (2 * GiB, (4, 5, 6, 7), Policy(Mode.BIND, (1,)))]
    assert t.distances == ((10, 21), (21, 10))


def test_four_nodes_scaled_with_memory_only_cpu_only_and_asymmetric_distances(tmp_path: Path) -> None:
    t, notes = build(3, 1 * GiB, fake_sysfs(tmp_path / "node", FOUR))
    assert notes == []
    # 4G:4G:8G:0 of 1G -> 256M, 256M, 512M, CPU-only; 3 vCPUs over 2:2:0:2 CPUs -> 1, 1, 0, 1
    assert [(d.size, d.cpus, d.policy.nodes) for d in t.domains] == [
        (256 * MiB, (0,), (0,)), (256 * MiB, (1,), (1,)), (512 * MiB, (), (2,)), (0, (2,), (3,))]
    assert all(d.policy.mode is Mode.BIND for d in t.domains)
    assert t.distances == ((10, 16, 32, 33), (17, 10, 30, 31), (32, 30, 10, 40), (33, 31, 41, 10))


def test_shares_are_exact_and_every_node_gets_its_least(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "node", {0: ("0", 1 << 20, "10 20 20"), 1: ("1", 100 << 20, "20 10 20"),
                                          2: ("2-9", 1 << 20, "20 20 10")})
    t, _ = build(10, 1002 * MiB, root)
    assert sum(d.size for d in t.domains) == 1002 * MiB
    assert all(d.size % (2 * MiB) == 0 and d.size >= 4 * MiB for d in t.domains)
    assert t.domains[1].size > 900 * MiB
    assert [len(d.cpus) for d in t.domains] == [1, 1, 8]


def test_sizes_given_with_n(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "node", TWO)
    t, _ = build(None, None, root, ("id=1,size=3G,hugepages=thp",))
    assert [(d.size, d.hugepages) for d in t.domains] == [(512 * MiB, None), (3 * GiB, "thp")]
    t, _ = build(2, None, root, ("id=0,size=1G", "id=1,size=2G"))
    assert [d.size for d in t.domains] == [GiB, 2 * GiB] and t.memory == 3 * GiB
    t, _ = build(2, 3 * GiB, root, ("id=0,size=1G",))
    assert [d.size for d in t.domains] == [GiB, 2 * GiB]


def test_node_ids_with_a_gap_bind_the_right_nodes(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "node", {0: ("0", 1 << 20, "10 25"), 2: ("1", 1 << 20, "25 10")}, online="0,2")
    t, _ = build(None, None, root)
    assert [d.policy for d in t.domains] == [Policy(Mode.BIND, (0,)), Policy(Mode.BIND, (2,))]
    assert t.distances == ((10, 25), (25, 10))


def test_unreadable_distances_are_said(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "node", {0: ("0", 1 << 20, "10 20 30"), 1: ("1", 1 << 20, "20 10")})
    t, notes = build(None, None, root)
    assert t.distances == ((10, 20), (20, 10))
    assert len(notes) == 1 and "distances are unreadable" in notes[0]


@pytest.mark.parametrize("cpus,memory,given,words", [
    (1, None, (), ["-c/--cpus", "a vCPU for each of the host's 2 nodes with CPUs", "got 1"]),
    (None, 6 * MiB, (), ["-m/--memory", "at least 4M for each of the host's 2 nodes", "8M"]),
    (None, 1 * GiB, ("id=0,size=2G",), ["less than the sizes given"]),
    (None, 3 * GiB, ("id=0,size=1G", "id=1,size=1G"), ["differs from the sizes given"]),
    (None, None, ("id=0,cpus=0",), ["-n/--numa id=0", "size= and hugepages= only"]),
    (None, None, ("id=0,policy=bind:0",), ["size= and hugepages= only"]),
    (None, None, ("id=2,size=1G",), ["no domain 2", "domains 0..1"]),
    (None, 1 * GiB + 1, (), ["multiple of 2M"]),
])
def test_refusals(tmp_path: Path, cpus: int | None, memory: int | None, given: tuple[str, ...],
                  words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        build(cpus, memory, fake_sysfs(tmp_path / "node", TWO), given)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    """The real sysfs: one domain per online node; on a one-node host it says so."""
    online = host_online_nodes()
    assert main(["plan", "--json", "--like-host", "-m", "1G"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert [d["policy"] for d in doc["domains"]] == [{"mode": "bind", "nodes": [n]} for n in online]
    assert doc["cpus"] == sum(len(node_cpus(n)) for n in online) and doc["memory"] == GiB
    if len(online) == 1:
        assert f"numavm: --like-host: this host has one NUMA node (node {online[0]}): the guest gets one domain" \
            in out.err
        assert doc["numa"] and doc["domains"][0]["cpus"] == list(range(doc["cpus"]))
    else:
        assert "one NUMA node" not in out.err
        rows = [[int(x) for x in (NODE_DIR / f"node{n}" / "distance").read_text().split()] for n in online]
        assert doc["distances"] == rows
    assert node_total(online[0]) is not None


def test_cli_with_a_fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(numavm.spec.likehost, "NODE_DIR", fake_sysfs(tmp_path / "node", FOUR))
    assert main(["export", "--to", "toml", "--like-host", "-c", "6", "-m", "2G", "--host-nodes", "0-3"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert 'policy = "bind:3"' in out.out and "[10, 16, 32, 33]," in out.out


@pytest.mark.parametrize("extra,word", [(["--distance", "0:1=20"], "--distance"),
                                        (["-f", "examples/example.toml"], "-f/--config")])
def test_cli_refuses_what_the_host_gives(extra: list[str], word: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--like-host", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--like-host: the host gives the domains and distances" in err and word in err


@pytest.mark.parametrize("command", ["run", "check"])
def test_run_and_check_accept_it(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad input after --like-host is refused before anything runs: the option is parsed and used."""
    assert main([command, "--like-host", "-c", "0"]) == 2
    assert "-c/--cpus" in capsys.readouterr().err
