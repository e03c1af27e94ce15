"""numavm.memory against the real kernel: memfds, mbind, get_mempolicy, numa_maps.

Written for a host with node 0 online (any host has it); policies naming
other nodes are refused or rejected by the kernel, which the tests use.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from numavm import _libc
from numavm.errors import ConfigError, NumavmError
from numavm.layout import plan_layout
from numavm.memory import (MODE_SINCE, GuestAddressError, GuestMemory, Placement, Segment,
                           check_hugetlb, kernel_version, meminfo, nodemask,
                           parse_numa_maps_line, read_numa_maps)
from numavm.policy import Mode, Policy, host_online_nodes, parse_policy
from numavm.topology import MachineSpec, parse_numa
from numavm.units import GiB, KiB, MiB

PAGE = os.sysconf("SC_PAGE_SIZE")
ONLINE = host_online_nodes()
NOT_ONLINE = max(ONLINE) + 1

pytestmark = pytest.mark.skipif(not Path("/proc/self/numa_maps").exists(),
                                reason="needs a NUMA-enabled kernel (/proc/self/numa_maps)")


def _supported(text: str) -> bool:
    since = MODE_SINCE.get(parse_policy(text, "t").mode)
    return since is None or kernel_version() >= since


MODES = ["default", "preferred:0", "bind:0", "interleave:0", "local",
         "preferred-many:0", "weighted-interleave:0"]


def _counts() -> tuple[int, int]:
    """(open fds, mapping lines) of this process."""
    return len(os.listdir("/proc/self/fd")), len(Path("/proc/self/maps").read_text().splitlines())


def _memfds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:numavm:"):
            out.append(target)
    return out


def _layout(*specs: str, host_nodes: tuple[int, ...] = (0,)):
    return plan_layout(MachineSpec(domains=[parse_numa(s) for s in specs]).build(host_nodes=host_nodes))


def _through_segment(seg: Segment, offset: int, n: int) -> bytes:
    """Bytes at `offset` read through the segment's own mapping, by address."""
    return ctypes.string_at(seg.addr + offset, n)


# ---------------------------------------------------------------- policies


@pytest.mark.parametrize("text", MODES)
def test_policy_applied_read_back_and_pages_on_node0(text: str) -> None:
    if not _supported(text):
        pytest.skip(f"{text} needs a newer kernel than {os.uname().release}")
    policy = parse_policy(text, "test")
    with Segment(16 * MiB, policy, domain=3, machine="t") as seg:
        # get_mempolicy(MPOL_F_ADDR)
        assert seg.policy_readback == policy
        # numa_maps, before any page exists
        before = seg.placement()
        assert before.policy == policy
        assert before.resident == 0
        assert os.readlink(f"/proc/self/fd/{seg.fd}").startswith("/memfd:numavm:t:domain3")
        data = bytes(range(256)) * (4 * MiB // 256)
        seg.write(0, data)
        assert seg.read(0, len(data)) == data
        after = seg.placement()
        assert after.policy == policy
        assert after.bytes_on(0) >= 4 * MiB
        assert set(after.pages) == {0}
        assert "kernel reports" in seg.describe()


def test_numa_maps_words() -> None:
    addr, p = parse_numa_maps_line(
        "7f00aa000000 prefer (many):0-1,3 file=/memfd:numavm:x:domain0\\040(deleted) dirty=3 "
        "N0=2 N3=1 kernelpagesize_kB=4")
    assert addr == 0x7F00AA000000
    assert p.policy == Policy(Mode.PREFERRED_MANY, (0, 1, 3))
    assert p.pages == {0: 2, 3: 1} and p.page_size == 4 * KiB
    _, p = parse_numa_maps_line("7f00 weighted interleave:0 file=/x N0=5 kernelpagesize_kB=2048")
    assert p.policy == Policy(Mode.WEIGHTED_INTERLEAVE, (0,)) and p.resident == 5 * 2 * MiB
    _, p = parse_numa_maps_line("7f00 bind=static:1 anon=1 N1=1 kernelpagesize_kB=4")
    assert p.policy == Policy(Mode.BIND, (1,)) and p.policy_text == "bind=static:1"
    _, p = parse_numa_maps_line("7f00 default file=/memfd:numavm:N9=9:domain0")
    assert p.policy == Policy() and p.pages == {}


def test_nodemask_maxnode_is_bits_plus_one() -> None:
    mask, maxnode = nodemask((0,))
    assert list(mask) == [1] and maxnode == 65
    mask, maxnode = nodemask((0, 63, 64))
    assert list(mask) == [1 | 1 << 63, 1] and maxnode == 129
    mask, maxnode = nodemask(())
    assert list(mask) == [0] and maxnode == 65


def test_offline_node_refused_before_anything_is_allocated() -> None:
    before, memfds = _counts(), _memfds()
    with pytest.raises(ConfigError) as e:
        Segment(64 * MiB, Policy(Mode.BIND, (NOT_ONLINE,)), domain=1, machine="t")
    assert f"node {NOT_ONLINE} not online" in str(e.value) and "online: 0" in str(e.value)
    assert "domain 1" in str(e.value)
    # and through a layout that the topology accepted (built for a bigger host)
    layout = _layout("id=0,size=2G,cpus=0", f"id=1,size=3G,cpus=1,domain_policy=bind:{NOT_ONLINE}",
                     host_nodes=tuple(range(NOT_ONLINE + 1)))
    with pytest.raises(ConfigError, match=f"domain 1 domain_policy: host node {NOT_ONLINE} not online"):
        GuestMemory(layout, machine="t")
    assert _counts() == before and _memfds() == memfds


def test_kernel_rejection_names_domain_and_policy() -> None:
    # Pretend the node is online: the kernel itself refuses it, after domain 0
    # was already made; everything made is released.
    layout = _layout("id=0,size=64M,cpus=0", f"id=1,size=64M,cpus=1,domain_policy=bind:{NOT_ONLINE}",
                     host_nodes=tuple(range(NOT_ONLINE + 1)))
    before, memfds = _counts(), _memfds()
    with pytest.raises(_libc.HostError) as e:
        GuestMemory(layout, machine="t", online=tuple(range(NOT_ONLINE + 1)))
    assert str(e.value).startswith(f"domain 1: mbind(bind:{NOT_ONLINE}): E")
    assert _counts() == before and _memfds() == memfds


def test_policy_shape_checked() -> None:
    with pytest.raises(ConfigError, match="bind needs host nodes"):
        Segment(4 * MiB, Policy(Mode.BIND, ()))
    with pytest.raises(ConfigError, match="local takes no nodes"):
        Segment(4 * MiB, Policy(Mode.LOCAL, (0,)))


def test_interleave_without_nodes_means_all_online() -> None:
    with Segment(4 * MiB, Policy(Mode.INTERLEAVE, ())) as seg:
        assert seg.policy_readback == Policy(Mode.INTERLEAVE, ONLINE)


# ---------------------------------------------------------------- guest memory

SPLIT = ("id=0,size=2G,cpus=0", "id=1,size=3G,cpus=1,domain_policy=bind:0")


def test_guest_memory_routes_across_the_hole() -> None:
    with GuestMemory(_layout(*SPLIT), machine="split") as mem:
        regions = list(mem.regions())
        s0, s1 = mem.segments[0], mem.segments[1]
        assert [(r.slot, r.guest_phys, r.size) for r in regions] == [
            (0, 0, 2 * GiB), (1, 2 * GiB, 1 * GiB), (2, 4 * GiB, 2 * GiB)]
        assert [r.host_addr for r in regions] == [s0.addr, s1.addr, s1.addr + 1 * GiB]
        assert s1.policy_readback == Policy(Mode.BIND, (0,))
        assert s0.size == 2 * GiB and s1.size == 3 * GiB
        # (guest address, segment, offset): first and last byte of each range
        cases = [(0, s0, 0), (2 * GiB - 1, s0, 2 * GiB - 1),
                 (2 * GiB, s1, 0), (3 * GiB - 1, s1, 1 * GiB - 1),
                 (4 * GiB, s1, 1 * GiB), (6 * GiB - 1, s1, 3 * GiB - 1)]
        for i, (gpa, seg, off) in enumerate(cases):
            mem.write(gpa, bytes([0x40 + i]))
        for i, (gpa, seg, off) in enumerate(cases):
            assert _through_segment(seg, off, 1) == bytes([0x40 + i]), hex(gpa)
            assert mem.read(gpa, 1) == bytes([0x40 + i])
            assert mem.locate(gpa) == (seg, off)
        # a multi-byte write ending at the last byte of the low range
        mem.write(3 * GiB - 8, b"ABCDEFGH")
        assert _through_segment(s1, 1 * GiB - 8, 8) == b"ABCDEFGH"
        # zero-copy view: writes through it show in the segment
        v = mem.view(4 * GiB + 4096, 16)
        v[:] = b"0123456789abcdef"
        assert _through_segment(s1, 1 * GiB + 4096, 16) == b"0123456789abcdef"
        v.release()
        assert set(mem.fds()) == {0, 1}
        assert os.readlink(f"/proc/self/fd/{mem.fds()[1]}").startswith("/memfd:numavm:split:domain1")
        audit = mem.audit()
        assert audit[1].policy == Policy(Mode.BIND, (0,)) and audit[0].policy == Policy()
        text = mem.describe()
        assert "slot 2: guest 0x100000000-0x180000000 -> segment +0x40000000" in text


def test_guest_memory_bounds() -> None:
    with GuestMemory(_layout(*SPLIT), machine="bounds") as mem:
        with pytest.raises(GuestAddressError, match=r"0xc0000000 is outside RAM \(in the 3-4 GiB hole\)"):
            mem.write(3 * GiB, b"x")
        with pytest.raises(GuestAddressError, match=r"0xbffffffc-0xc0000004 .* runs past the end of RAM at 0xc0000000"):
            mem.write(3 * GiB - 4, b"12345678")
        with pytest.raises(GuestAddressError, match=r"0x180000000 is outside RAM \(RAM ends at 0x180000000\)"):
            mem.read(6 * GiB, 1)
        with pytest.raises(GuestAddressError, match="runs past the end of RAM"):
            mem.view(6 * GiB - 1, 2)
        with pytest.raises(GuestAddressError, match="spans two memory slots"):
            mem.read(2 * GiB - 1, 2)
        with pytest.raises(GuestAddressError, match="negative length"):
            mem.read(0, -1)
        # nothing was written by the refused calls
        assert mem.read(3 * GiB - 4, 4) == b"\0" * 4
        assert mem.read(2 * GiB - 1, 1) == b"\0"


def test_memoryless_domain_has_no_segment() -> None:
    with GuestMemory(_layout("id=0,size=64M,cpus=0", "id=1,size=0,cpus=1")) as mem:
        assert list(mem.segments) == [0]
        assert len(list(mem.regions())) == 1


# ---------------------------------------------------------------- prefault


def test_prefault_bind0_lands_on_node0_with_progress() -> None:
    calls: list[tuple[int, int]] = []
    with Segment(64 * MiB, Policy(Mode.BIND, (0,)), machine="pf") as seg:
        assert seg.placement().resident == 0
        result = seg.prefault(progress=lambda done, total: calls.append((done, total)))
        p = seg.placement()
        assert p.bytes_on(0) >= 64 * MiB * 99 // 100
        assert p.resident == p.bytes_on(0)
        assert calls and calls[-1] == (64 * MiB, 64 * MiB)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)
        assert len(calls) > 1  # chunked
        assert result.bytes == 64 * MiB and result.threads >= 1
        assert set(result.cpus) <= os.sched_getaffinity(0)


def test_prefault_one_thread_and_guest_memory_totals() -> None:
    calls: list[tuple[int, int]] = []
    with GuestMemory(_layout("id=0,size=16M,cpus=0", "id=1,size=32M,cpus=1,domain_policy=bind:0")) as mem:
        results = mem.prefault(threads=1, progress=lambda d, t: calls.append((d, t)))
        assert results[0].threads == 1 and results[1].threads == 1
        assert calls[-1] == (48 * MiB, 48 * MiB)
        audit = mem.audit()
        assert audit[0].bytes_on(0) >= 16 * MiB * 99 // 100
        assert audit[1].bytes_on(0) >= 32 * MiB * 99 // 100


def test_prefault_callback_error_propagates_and_stops() -> None:
    def boom(done: int, total: int) -> None:
        raise RuntimeError("stop")

    with Segment(32 * MiB, machine="pf") as seg:
        with pytest.raises(RuntimeError, match="stop"):
            seg.prefault(progress=boom)


# ---------------------------------------------------------------- huge pages


def test_hugetlbfs_refused_without_reserved_pages() -> None:
    info = meminfo()
    free = info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0)
    page = info.get("Hugepagesize", 2048) * KiB
    need = free + 1
    before, memfds = _counts(), _memfds()
    with pytest.raises(ConfigError, match="hugepages=hugetlbfs needs .* free .* huge pages"):
        check_hugetlb({0: need * page}, {0: Policy()})
    if free == 0:
        with pytest.raises(ConfigError, match="vm.nr_hugepages"):
            Segment(page, machine="t", hugepages="hugetlbfs")
        with pytest.raises(ConfigError, match="domains 0-1: hugepages=hugetlbfs"):
            GuestMemory(_layout(*SPLIT), hugepages="hugetlbfs")
    assert _counts() == before and _memfds() == memfds


def test_hugepages_word_checked() -> None:
    with pytest.raises(ConfigError, match="hugepages must be one of thp, hugetlbfs"):
        Segment(4 * MiB, hugepages="1G")


def test_thp_advised_before_touching() -> None:
    with Segment(8 * MiB, Policy(Mode.BIND, (0,)), machine="thp", hugepages="thp") as seg:
        seg.write(0, b"\1" * (4 * MiB))
        smaps = Path("/proc/self/smaps").read_text()
        head = f"{seg.addr:x}-"
        block = smaps[smaps.index(head):].split("VmFlags:", 1)[1].splitlines()[0]
        assert " hg" in block  # VM_HUGEPAGE
        assert seg.placement().bytes_on(0) >= 4 * MiB


# ---------------------------------------------------------------- cleanup


def test_close_releases_everything_and_is_idempotent() -> None:
    before = _counts()
    mem = GuestMemory(_layout(*SPLIT), machine="c")
    assert _counts()[0] > before[0] and _counts()[1] > before[1]
    mem.write(0, b"x")
    mem.close()
    assert _counts() == before
    mem.close()
    assert _counts() == before
    with pytest.raises(NumavmError, match="closed"):
        mem.read(0, 1)


def test_exception_inside_with_releases_everything() -> None:
    before = _counts()
    with pytest.raises(RuntimeError):
        with GuestMemory(_layout(*SPLIT), machine="c") as mem:
            mem.write(4 * GiB, b"y")
            raise RuntimeError("guest failed")
    assert _counts() == before


def test_close_refused_while_views_alive() -> None:
    before = _counts()
    seg = Segment(4 * MiB, machine="v")
    v = seg.view(0, 16)
    with pytest.raises(NumavmError, match="memoryviews of it are still alive"):
        seg.close()
    assert not seg.closed
    v.release()
    seg.close()
    assert seg.closed and _counts() == before


def test_read_numa_maps_finds_the_segment() -> None:
    with Segment(4 * MiB, Policy(Mode.PREFERRED, (0,)), machine="nm") as seg:
        found = read_numa_maps({seg.addr})
        assert isinstance(found[seg.addr], Placement)
        assert found[seg.addr].policy_text == "prefer:0"
