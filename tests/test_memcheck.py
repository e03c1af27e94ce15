"""Memory is checked before it is committed: the host, the memory cgroups above us, the bound nodes.

A prefault that cannot fit is refused with one line and exit 2 before any
guest memory exists; a guest that could outgrow what is available gets a
warning.  The cgroup test puts numavm in a real memory cgroup with a limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from numavm.host import memory as M
from numavm.cli import main
from numavm.errors import ConfigError
from numavm.plan.layout import plan_layout
from numavm.spec.topology import MachineSpec, parse_numa
from numavm.spec.units import GiB, MiB


def layout(*numa: str, memory: int | None = None):  # type: ignore[no-untyped-def]
    spec = MachineSpec(memory=memory, domains=[parse_numa(n) for n in numa])
    return plan_layout(spec.build((0, 1)))


def test_rooms_include_the_host():
    rooms = M.memory_rooms()
    host = [r for r in rooms if "MemAvailable" in r.where]
    assert len(host) == 1 and 0 < host[0].bytes <= M.meminfo()["MemTotal"] * 1024


def test_prefault_beyond_the_tightest_room_is_refused():
    lay = layout("id=0,size=2G,cpus=0", "id=1,size=2G,cpus=1")
    rooms = [M.Room(8 * GiB, "the host (MemAvailable)"), M.Room(3 * GiB, "memory cgroup /x")]
    with pytest.raises(ConfigError, match=r"^--prefault: .*4G, and memory cgroup /x leaves room for 3.0 GiB"):
        M.check_memory(lay, None, None, rooms=rooms, online=(0, 1))
    # only domain 1: 2G fits, but the whole guest could outgrow the cgroup
    (warning,) = M.check_memory(lay, frozenset({1}), None, rooms=rooms, online=(0, 1))
    assert "up to 4G" in warning and "memory cgroup /x" in warning
    assert M.check_memory(lay, frozenset(), None, rooms=[M.Room(5 * GiB, "h")], online=(0, 1)) == []


def test_bound_domains_must_fit_their_nodes(tmp_path):
    for node, free_kb in ((0, 1 << 20), (1, 8 << 20)):  # node 0: 1 GiB free, node 1: 8 GiB
        d = tmp_path / f"node{node}"
        d.mkdir()
        (d / "meminfo").write_text(f"Node {node} MemTotal: 9999999 kB\nNode {node} MemFree: {free_kb} kB\n")
    rooms = [M.Room(64 * GiB, "the host (MemAvailable)")]
    lay = layout("id=0,size=2G,cpus=0,domain_policy=bind:0", "id=1,size=2G,cpus=1,domain_policy=bind:1")
    with pytest.raises(ConfigError, match=r"domain 0 bound to node 0 needs 2G, and it has 1.0 GiB free"):
        M.check_memory(lay, None, None, rooms=rooms, node_root=tmp_path, online=(0, 1))
    M.check_memory(lay, frozenset({1}), None, rooms=rooms, node_root=tmp_path, online=(0, 1))
    # bound to every online node: the host's MemAvailable decides, not MemFree
    M.check_memory(lay, None, None, rooms=rooms, node_root=tmp_path, online=(0,))


def test_hugetlbfs_is_checked_against_the_pool_first():
    lay = layout("id=0,size=64G,cpus=0,hugepages=hugetlbfs")
    free = M.meminfo().get("HugePages_Free", 0)
    if free * 2 * MiB >= 64 * GiB:
        pytest.skip("this host has 64 GiB of free huge pages")
    with pytest.raises(ConfigError, match="hugepages=hugetlbfs needs 32768 free"):
        M.check_memory(lay, frozenset(), None, rooms=[M.Room(1 << 50, "h")], online=(0, 1))


def test_cli_refuses_a_prefault_beyond_the_host(capsys):
    avail = M.meminfo()["MemAvailable"] * 1024
    size = f"{avail // GiB + 8}G"
    for accel in ("tcg", "kvm"):
        rc = main(["run", "--accel", accel, "-m", size, "--prefault", "--", "true"])
        err = capsys.readouterr().err
        if "--accel" in err and rc == 2 and "--prefault" not in err:
            continue  # that engine cannot run here at all
        assert rc == 2, err
        assert err.startswith("numavm: error: --prefault: the guest's memory to populate is ") and \
            "the host (MemAvailable)" in err and err.count("\n") == 1


def _own_memory_cgroup() -> tuple[Path, bool] | None:
    found = M._memory_cgroups(M.PROC_CGROUP, M.MOUNTINFO)
    return found[0] if found else None


@pytest.fixture
def memory_cgroup():  # type: ignore[no-untyped-def]
    """A child memory cgroup of ours limited to 1 GiB, or a skip saying why there can't be one."""
    own = _own_memory_cgroup()
    if own is None:
        pytest.skip("no memory cgroup controller mounted here")
    parent, v2 = own
    path = parent / f"numavm-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup under {parent}: {e.strerror}")
    try:
        (path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(1 << 30))
        yield path, v2
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                import time
                time.sleep(0.1)


def test_prefault_beyond_a_real_memory_cgroup_is_refused(memory_cgroup):
    path, v2 = memory_cgroup
    procs = path / "cgroup.procs"

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    r = subprocess.run([sys.executable, "-m", "numavm", "run", "--accel", "tcg", "-m", "2G", "--prefault",
                        "--", "true"], capture_output=True, text=True, timeout=120, preexec_fn=enter)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("numavm: error: --prefault:"), r.stderr
    assert f"memory cgroup {path}" in lines[0]
    # nothing was committed: the cgroup's peak stayed far below the guest's 2 GiB
    peak_file = path / ("memory.peak" if v2 else "memory.max_usage_in_bytes")
    if peak_file.exists():
        assert int(peak_file.read_text()) < 256 * MiB
