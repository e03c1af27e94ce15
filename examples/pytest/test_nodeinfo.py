"""An example test suite for a NUMA-aware program, on three guest topologies.

numavm's pytest plugin (loaded because numavm is installed) gives each test a
`numavm_guest`: a machine with the topology named by the parameter, whose
`run()` boots Linux on it and runs a command there.  The program under test is
`nodeinfo.sh` (what a NUMA-aware program reads from /sys/devices/system/node),
and numactl where the host has it.  Run it with `pytest examples/pytest`; it is
skipped, with the reason, where no engine can run the guests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NODEINFO = Path(__file__).with_name("nodeinfo.sh")

TOPOLOGIES = {
    # two sockets, one vCPU each
    "two-nodes": ["-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M,cpus=1", "--distance", "0:1=21"],
    # four nodes on a ring: neighbours 16 apart, opposite corners 32
    "four-ring": ["-c", "4", "-m", "768M", *[a for i in range(4) for a in ("-n", f"id={i},cpus={i}")],
                  "--distance", "0:1=16", "--distance", "1:2=16", "--distance", "2:3=16",
                  "--distance", "0:3=16", "--distance", "0:2=32", "--distance", "1:3=32"],
    # a node with both vCPUs and a far memory-only node (CXL-like expander)
    "memory-only": ["-c", "2", "-n", "id=0,size=384M,cpus=0-1", "-n", "id=1,size=256M", "--distance", "0:1=40"],
}

machines = pytest.mark.parametrize("numavm_guest", list(TOPOLOGIES.values()), ids=list(TOPOLOGIES),
                                   indirect=True)


def cpulist(cpus: list[int]) -> str:
    """Linux's list format for a short sorted list ("0-1", "2", "-" for none)."""
    if not cpus:
        return "-"
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])


@machines
def test_nodeinfo_reports_each_planned_node(numavm_guest) -> None:
    plan = numavm_guest.plan.to_dict()
    r = numavm_guest.run(["/bin/nodeinfo"], add=[f"{NODEINFO}:/bin/nodeinfo"])
    assert r.status == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == len(plan["domains"])
    for line, dom in zip(lines, plan["domains"]):
        _, node, _, cpus, _, mem_kb, _, *dist = line.split()
        # here every domain's node number is its id: the memory-only one comes last
        assert int(node) == dom["id"]
        assert cpus == cpulist(dom["cpus"])
        assert [int(d) for d in dist] == plan["distances"][dom["id"]]
        # the kernel keeps some of each node for itself, never more than half of these
        assert dom["size"] // 2 < int(mem_kb) * 1024 <= dom["size"]
    assert r.stderr == b""
    # what the guest's sysfs showed, as numavm read it, agrees with the program
    assert sorted(r.topology.nodes) == [d["id"] for d in plan["domains"]]


@machines
@pytest.mark.skipif(not shutil.which("numactl"), reason="numactl is not installed on the host")
def test_numactl_hardware_shows_the_nodes_and_distances(numavm_guest) -> None:
    plan = numavm_guest.plan.to_dict()
    r = numavm_guest.run(["numactl", "--hardware"], add=[shutil.which("numactl")])
    assert r.status == 0, r.err
    n = len(plan["domains"])
    assert f"available: {n} nodes (0-{n - 1})" in r.out
    rows = r.out.split("node distances:")[1].strip().splitlines()[1:]
    assert [[int(v) for v in row.split(":")[1].split()] for row in rows] == plan["distances"]
    for dom in plan["domains"]:
        assert f"node {dom['id']} cpus: {' '.join(map(str, dom['cpus']))}".rstrip() in r.out


def test_a_program_that_fails_reports_its_status_and_stderr(numavm_guest) -> None:
    """Without a marker or parameter: the built-in example machine."""
    r = numavm_guest.run("nodeinfo_missing; echo done")
    assert r.status == 0 and r.out == "done\n"
    assert b"nodeinfo_missing" in r.stderr and b"not found" in r.stderr
    assert r.engine in ("kvm", "tcg") and r.engine_why
