"""numavm.host.memory against the real kernel: memfds, mbind, get_mempolicy, numa_maps.

Written for a host with node 0 online (any host has it); policies naming
other nodes are refused or rejected by the kernel, which the tests use.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from numavm.host import libc as _libc
from numavm.errors import ConfigError, NumavmError
from numavm.plan.layout import Layout, plan_layout
from numavm.host.memory import (MODE_SINCE, MPOL_F_ADDR, MPOL_F_NODE, BackingFd, GuestAddressError,
                                GuestMemory, Placement, PrefaultResult, ProgressFn, Segment, check_hugetlb,
                                kernel_version, meminfo, nodemask, pages_per_node, parse_numa_maps_line,
                                read_numa_maps)
from numavm.spec.policy import Mode, Policy, host_online_nodes, parse_policy
from numavm.vmm.tcg import qemu_ram_offset
from numavm.spec.topology import MachineSpec, parse_numa
from numavm.spec.units import GiB, KiB, MiB

def _fds(mem: GuestMemory) -> dict[int, int]:
    """Domain id -> memfd of a per-domain guest memory."""
    return {int(b.id.removeprefix("domain")): b.fd for b in mem.backing_fds()}


def _prefault_all(mem: GuestMemory, threads: int | None = None,
                  progress: ProgressFn | None = None) -> dict[int, PrefaultResult]:
    """Prefault each segment in turn; `progress` sees totals across all."""
    total = sum(s.size for s in mem.segments.values())
    base = 0
    out = {}
    for d, seg in mem.segments.items():
        cb = None
        if progress is not None:
            cb = (lambda b: lambda done, _t: progress(b + done, total))(base)
        out[d] = seg.prefault(threads, cb)
        base += seg.size
    return out


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


def _memfd_files() -> set[tuple[int, int]]:
    """numavm's memfds open here, as files (an mmap object holds its own dup of the fd)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:numavm:"):
                st = os.stat(f"/proc/self/fd/{fd}")
                out.add((st.st_dev, st.st_ino))
        except OSError:
            continue
    return out


def _layout(*specs: str, host_nodes: tuple[int, ...] = (0,)) -> Layout:
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


@pytest.mark.parametrize("unified", [False, True])
def test_kernel_rejection_names_domain_and_policy(unified: bool) -> None:
    # Pretend the node is online: the kernel itself refuses it, after domain 0
    # (and, unified, the one memfd) was already made; everything made is released.
    layout = _layout("id=0,size=64M,cpus=0", f"id=1,size=64M,cpus=1,domain_policy=bind:{NOT_ONLINE}",
                     host_nodes=tuple(range(NOT_ONLINE + 1)))
    before, memfds = _counts(), _memfds()
    with pytest.raises(_libc.HostError) as e:
        GuestMemory(layout, machine="t", online=tuple(range(NOT_ONLINE + 1)), unified=unified)
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
        assert set(_fds(mem)) == {0, 1}
        assert os.readlink(f"/proc/self/fd/{_fds(mem)[1]}").startswith("/memfd:numavm:split:domain1")
        audit = mem.audit()
        assert audit[1].policy == Policy(Mode.BIND, (0,)) and audit[0].policy == Policy()
        text = mem.describe()
        assert "slot 2: guest 0x100000000-0x180000000 -> segment +0x40000000" in text


def _vma_flags(addr: int) -> set[str]:
    """The VmFlags of this process's mapping that starts at `addr` (/proc/self/smaps)."""
    text = Path("/proc/self/smaps").read_text()
    at = text.index(f"{addr:x}-")
    return set(text[text.index("VmFlags:", at):].split("\n", 1)[0].split()[1:])


def test_unshared_guest_memory_is_private_anonymous_memory_under_each_policy() -> None:
    """The KVM engine's memory (shared=False): no memfd, each domain's policy applied and read
    back, advised for THP (where the host's THP setting allows) and kept out of forked children."""
    from numavm.host.memory.host import _thp_mode

    before, memfds = _counts(), _memfds()
    with GuestMemory(_layout(*SPLIT), machine="anon", shared=False) as mem:
        s0, s1 = mem.segments[0], mem.segments[1]
        assert mem.backing_fds() == [] and s0.fd == s1.fd == -1 and _memfds() == memfds
        assert s1.policy_readback == Policy(Mode.BIND, (0,))
        mem.write(4 * GiB, b"high")  # the part of domain 1 above the hole
        assert _through_segment(s1, 1 * GiB, 4) == b"high" and mem.read(4 * GiB, 4) == b"high"
        # one 4K page, or the 2 MiB huge page around it (512 pages)
        assert mem.audit()[1].pages in ({0: 1}, {0: 512}) and mem.audit()[1].policy == Policy(Mode.BIND, (0,))
        flags = _vma_flags(s1.addr)
        assert "dc" in flags  # MADV_DONTFORK
        thp = _thp_mode() not in ("never", "unknown")
        assert ("hg" in flags) == thp  # MADV_HUGEPAGE
        text = mem.describe()
        assert "domain 1: 3G anonymous memory 'numavm:anon:domain1', mapped at" in text
        assert ("4K + THP pages" in text) == thp
    assert _counts() == before


def test_unified_guest_memory_is_always_shared() -> None:
    with pytest.raises(ValueError, match="always shared"):
        GuestMemory(_layout(*SPLIT), machine="x", unified=True, shared=False)


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
            mem.view(2 * GiB - 1, 2)  # one view is one mapping
        with pytest.raises(GuestAddressError, match="negative length"):
            mem.read(0, -1)
        # nothing was written by the refused calls
        assert mem.read(3 * GiB - 4, 4) == b"\0" * 4
        assert mem.read(2 * GiB - 1, 1) == b"\0"


def test_guest_memory_access_straddling_two_domains() -> None:
    """RAM is contiguous across domains: a loader's image may cross from one segment into the next."""
    with GuestMemory(_layout(*SPLIT), machine="straddle") as mem:
        mem.write(2 * GiB - 3, b"abcdef")
        assert mem.read(2 * GiB - 3, 6) == b"abcdef"
        assert _through_segment(mem.segments[0], 2 * GiB - 3, 3) == b"abc"
        assert _through_segment(mem.segments[1], 0, 3) == b"def"


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
        results = _prefault_all(mem, threads=1, progress=lambda d, t: calls.append((d, t)))
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


def test_prefault_keeps_data_and_zero_fills() -> None:
    # fallocate(2) then MADV_POPULATE_WRITE: written pages keep their bytes, the rest read zero.
    with Segment(8 * MiB, Policy(Mode.BIND, (0,)), machine="pf") as seg:
        seg.write(MiB + 5, b"numavm")
        seg.prefault(threads=1)
        assert seg.read(MiB + 5, 6) == b"numavm"
        assert seg.read(0, MiB) == bytes(MiB) and seg.read(2 * MiB, 6 * MiB) == bytes(6 * MiB)
        assert seg.placement().bytes_on(0) == 8 * MiB


def test_prefault_without_fallocate(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    calls = []

    def refuse(*args: object) -> int:
        calls.append(args)
        raise _libc.HostError(errno.EOPNOTSUPP, "fallocate")

    monkeypatch.setattr(_libc, "fallocate", refuse)
    with Segment(16 * MiB, Policy(Mode.BIND, (0,)), machine="pf") as seg:
        result = seg.prefault(threads=1)
        assert calls  # tried, refused: the madvise populated alone
        assert result.bytes == 16 * MiB
        assert seg.placement().bytes_on(0) == 16 * MiB


def test_unified_prefault_stays_in_its_window() -> None:
    layout = _layout("id=0,size=16M,cpus=0", "id=1,size=32M,cpus=1,domain_policy=bind:0")
    with GuestMemory(layout, machine="win", unified=True) as mem:
        assert mem.memfd is not None
        mem.segments[1].prefault(threads=1)
        assert os.lseek(mem.memfd.fd, 0, os.SEEK_DATA) == 16 * MiB  # nothing allocated in domain 0
        audit = mem.audit()
        assert audit[0].resident == 0 and audit[1].bytes_on(0) == 32 * MiB


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


def test_a_big_unaligned_write_is_populated_first_and_lands_whole(monkeypatch) -> None:
    """Segment.write maps the pages of a write of POPULATE_BEFORE_WRITE or more with one
    MADV_POPULATE_WRITE before copying: an unaligned one ending at the segment's end, too."""
    from numavm.host import libc
    from numavm.host.memory.segment import MADV_POPULATE_WRITE, POPULATE_BEFORE_WRITE
    calls: list[tuple[int, int, int]] = []
    real = libc.madvise

    def madvise(addr: int, n: int, advice: int) -> None:
        real(addr, n, advice)  # raises if the range were not page-aligned or past the mapping
        calls.append((addr, n, advice))

    monkeypatch.setattr(libc, "madvise", madvise)
    with Segment(8 * MiB, Policy(Mode.BIND, (0,)), machine="big") as seg:
        data = os.urandom(POPULATE_BEFORE_WRITE + 5)
        at = seg.size - len(data)
        lo = at // 4096 * 4096
        seg.write(at, data)
        assert calls[-1:] == [(seg.addr + lo, seg.size - lo, MADV_POPULATE_WRITE)]
        assert seg.read(at, len(data)) == data
        assert seg.placement().bytes_on(0) == seg.size - lo
        seg.write(0, b"small")  # below the threshold: copied, no madvise
        assert len(calls) == 1


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


# ---------------------------------------------------------------- unified (one memfd, for QEMU)

UNIFIED = ("id=0,size=2G,cpus=0,domain_policy=preferred:0", "id=1,size=3G,cpus=1,domain_policy=bind:0")
PREFERRED0, BIND0 = Policy(Mode.PREFERRED, (0,)), Policy(Mode.BIND, (0,))


def _policy_at(addr: int) -> Policy:
    """get_mempolicy(MPOL_F_ADDR) at one host address of this process."""
    mode, mask = ctypes.c_int(), (ctypes.c_ulong * 16)()
    _libc.get_mempolicy(ctypes.byref(mode), mask, 16 * 64 + 1, addr, MPOL_F_ADDR)
    return Policy(Mode(mode.value), tuple(n for n in range(16 * 64) if mask[n // 64] >> (n % 64) & 1))


def _node_of(addr: int) -> int:
    """The host node of the page at `addr` (get_mempolicy MPOL_F_NODE | MPOL_F_ADDR)."""
    node = ctypes.c_int()
    _libc.get_mempolicy(ctypes.byref(node), None, 0, addr, MPOL_F_NODE | MPOL_F_ADDR)
    return node.value


def _lines_in(addr: int, size: int) -> dict[int, Placement]:
    """numa_maps lines of the mappings starting in [addr, addr+size), by offset."""
    return {a - addr: p for a, p in read_numa_maps().items() if addr <= a < addr + size}


def test_unified_one_memfd_routes_to_qemu_ram_offsets() -> None:
    files = _memfd_files()
    with GuestMemory(_layout(*UNIFIED), machine="uni", unified=True) as mem:
        ram = mem.memfd
        assert ram is not None
        s0, s1 = mem.segments[0], mem.segments[1]
        # one memfd, named for the whole RAM, sized for both domains
        assert len(_memfd_files() - files) == 1
        assert mem.backing_fds() == [BackingFd("ram", ram.fd, 5 * GiB)]
        assert os.readlink(f"/proc/self/fd/{ram.fd}").startswith("/memfd:numavm:uni:ram")
        assert os.fstat(ram.fd).st_size == 5 * GiB
        # each domain is a window of it, end to end in domain order
        assert (s0.offset, s0.size, s1.offset, s1.size) == (0, 2 * GiB, 2 * GiB, 3 * GiB)
        assert s0.fd == s1.fd == ram.fd
        assert (s0.addr, s1.addr) == (ram.addr, ram.addr + 2 * GiB)
        assert [(r.guest_phys, r.size, r.host_addr - ram.addr) for r in mem.regions()] == [
            (0, 2 * GiB, 0), (2 * GiB, 1 * GiB, 2 * GiB), (4 * GiB, 2 * GiB, 3 * GiB)]
        # (guest address, offset in the memfd = QEMU's RAM offset): first and last byte of each range
        cases = [(0, 0), (2 * GiB - 1, 2 * GiB - 1), (2 * GiB, 2 * GiB), (3 * GiB - 1, 3 * GiB - 1),
                 (4 * GiB, 3 * GiB), (6 * GiB - 1, 5 * GiB - 1)]
        for i, (gpa, off) in enumerate(cases):
            mem.write(gpa, bytes([0x60 + i]))
        for i, (gpa, off) in enumerate(cases):
            assert qemu_ram_offset(gpa) == off
            assert ctypes.string_at(ram.addr + off, 1) == bytes([0x60 + i]), hex(gpa)
            assert mem.read(gpa, 1) == bytes([0x60 + i])
            seg, seg_off = mem.locate(gpa)
            assert seg.offset + seg_off == off
        v = mem.view(4 * GiB + 4096, 8)
        v[:] = b"viewtest"
        assert ctypes.string_at(ram.addr + 3 * GiB + 4096, 8) == b"viewtest"
        v.release()
        # each domain's policy, read back at its start and holding to its last byte
        assert s0.policy_readback == PREFERRED0 and s1.policy_readback == BIND0
        assert _policy_at(ram.addr + 2 * GiB - PAGE) == PREFERRED0
        assert _policy_at(ram.addr + 5 * GiB - PAGE) == BIND0
        # numa_maps: the one mapping split at the domain boundary, each part with its policy
        lines = _lines_in(ram.addr, ram.size)
        assert sorted(lines) == [0, 2 * GiB]
        assert lines[0].policy == PREFERRED0 and lines[2 * GiB].policy == BIND0
        assert lines[0].policy_text == "prefer:0" and lines[2 * GiB].policy_text == "bind:0"
        audit = mem.audit()
        assert audit[0].policy == PREFERRED0 and audit[1].policy == BIND0
        # pages touched: domain 0 two (first, last byte), domain 1 four and the view's
        assert audit[0].bytes_on(0) == 2 * PAGE and audit[1].bytes_on(0) == 5 * PAGE
        assert s1.placement() == audit[1]
        text = mem.describe()
        assert "guest RAM: 5G memfd 'numavm:uni:ram'" in text
        assert "domain 1: 3G at +0x80000000 of memfd 'numavm:uni:ram'" in text
        assert "slot 2: guest 0x100000000-0x180000000 -> segment +0x40000000" in text


def test_private_domains_audit_only_their_touched_pages() -> None:
    # The KVM engine's anonymous domains may merge into one VMA; the audit then asks
    # move_pages only about what mincore reports resident, and still counts per domain.
    layout = _layout("id=0,size=64M,cpus=0,domain_policy=bind:0", "id=1,size=64M,cpus=1,domain_policy=bind:0")
    with GuestMemory(layout, machine="priv", shared=False) as mem:
        mem.write(0, b"\1" * (4 * MiB))  # whole 2 MiB pages: THP or not, the same
        mem.write(64 * MiB + 8 * MiB, b"\2" * (2 * MiB))
        audit = mem.audit()
        assert audit[0].bytes_on(0) == 4 * MiB and audit[1].bytes_on(0) == 2 * MiB
        seg = mem.segments[1]
        assert pages_per_node(seg.addr, seg.size) == {0: 2 * MiB // PAGE}
        assert pages_per_node(seg.addr, 8 * MiB) == {}  # nothing touched there


def test_unified_equal_policies_share_a_vma_yet_audit_per_domain() -> None:
    # Neighbouring ranges under one policy are one VMA (one numa_maps line):
    # the audit then counts each domain's pages over its own range.
    layout = _layout("id=0,size=16M,cpus=0,domain_policy=bind:0", "id=1,size=32M,cpus=1,domain_policy=bind:0")
    with GuestMemory(layout, machine="merge", unified=True) as mem:
        assert mem.memfd is not None
        mem.write(0, b"\1" * (4 * MiB))
        mem.write(16 * MiB, b"\2" * (8 * MiB))
        assert sorted(_lines_in(mem.memfd.addr, mem.memfd.size)) == [0]  # merged
        audit = mem.audit()
        assert audit[0].policy == audit[1].policy == BIND0
        assert audit[0].bytes_on(0) == 4 * MiB and audit[1].bytes_on(0) == 8 * MiB
        assert set(audit[0].pages) == set(audit[1].pages) == {0}
        assert pages_per_node(mem.memfd.addr, mem.memfd.size) == {0: 12 * MiB // PAGE}
        results = _prefault_all(mem, threads=1)
        assert results[0].bytes == 16 * MiB and results[1].bytes == 32 * MiB
        audit = mem.audit()
        assert audit[0].bytes_on(0) == 16 * MiB and audit[1].bytes_on(0) == 32 * MiB


def test_unified_skips_memoryless_domains() -> None:
    layout = _layout("id=0,size=64M,cpus=0", "id=1,size=0,cpus=1", "id=2,size=32M,domain_policy=bind:0")
    with GuestMemory(layout, machine="ml", unified=True) as mem:
        assert list(mem.segments) == [0, 2]
        assert mem.segments[2].offset == 64 * MiB
        assert mem.backing_fds()[0].size == 96 * MiB
        assert mem.audit()[2].policy == BIND0 and mem.audit()[0].policy == Policy()


CHILD = textwrap.dedent("""
    # What QEMU does with mem-path=/proc/self/fd/N,share=on: open, map shared, write.
    import ctypes, json, mmap, os, sys
    from numavm.host import libc as _libc
    from numavm.host.memory import MPOL_F_ADDR, MPOL_F_NODE
    fd, size, sig_at, fill_at, fill = (int(a) for a in sys.argv[1:6])
    f = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    m = mmap.mmap(f, size, flags=mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    m[sig_at:sig_at + 12] = b"qemu was here"[:12]
    m[fill_at:fill_at + fill] = b"\\x5a" * fill
    def policy(off):
        mode, mask = ctypes.c_int(), (ctypes.c_ulong * 16)()
        _libc.get_mempolicy(ctypes.byref(mode), mask, 16 * 64 + 1, addr + off, MPOL_F_ADDR)
        return [mode.value, [n for n in range(1024) if mask[n // 64] >> (n % 64) & 1]]
    def node(off):
        n = ctypes.c_int()
        _libc.get_mempolicy(ctypes.byref(n), None, 0, addr + off, MPOL_F_NODE | MPOL_F_ADDR)
        return n.value
    print(json.dumps({"policy0": policy(0), "policy1": policy(fill_at), "policy1_high": policy(sig_at),
                      "node_sig": node(sig_at), "node_fill": node(fill_at)}))
""")


def test_unified_memfd_mapped_by_another_process_follows_the_domain_policy() -> None:
    with GuestMemory(_layout(*UNIFIED), machine="qemu", unified=True) as mem:
        (ram,) = mem.backing_fds()
        sig_at = qemu_ram_offset(4 * GiB + 8192)  # domain 1, above the hole
        fill_at, fill = 2 * GiB, 1 * MiB  # domain 1's first MiB
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        out = subprocess.run([sys.executable, "-c", CHILD, str(ram.fd), str(ram.size), str(sig_at),
                              str(fill_at), str(fill)],
                             pass_fds=(ram.fd,), env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        child = json.loads(out.stdout)
        # the other process's mapping sees each range's policy (shmem keeps it per range) ...
        assert child["policy0"] == [int(Mode.PREFERRED), [0]]
        assert child["policy1"] == child["policy1_high"] == [int(Mode.BIND), [0]]
        # ... and allocated its pages under it
        assert child["node_sig"] == 0 and child["node_fill"] == 0
        # The pages are the child's: none is mapped here yet ...
        assert mem.audit()[1].resident == 0
        # ... until the audit maps what the memfd holds, without allocating anything else
        mapped = mem.map_resident()
        assert mapped == fill + PAGE  # the filled MiB and the signature's page, nothing more
        assert mem.audit()[1].bytes_on(0) == fill + PAGE and mem.audit()[0].resident == 0
        assert mem.read(4 * GiB + 8192, 12) == b"qemu was her"
        assert mem.read(2 * GiB, fill) == b"\x5a" * fill
        assert _node_of(mem.segments[1].addr) == 0
        audit = mem.audit()
        assert audit[1].policy == BIND0
        assert audit[1].bytes_on(0) >= fill + PAGE and set(audit[1].pages) == {0}
        assert audit[0].resident == 0


def test_unified_close_releases_everything() -> None:
    before, memfds = _counts(), _memfds()
    files = _memfd_files()
    mem = GuestMemory(_layout(*UNIFIED), machine="uc", unified=True)
    assert len(_memfd_files() - files) == 1
    mem.write(4 * GiB, b"x")
    v = mem.view(0, 16)
    with pytest.raises(NumavmError, match="memoryviews of it are still alive"):
        mem.close()
    assert mem.read(4 * GiB, 1) == b"x"  # still mapped, still routed
    v.release()
    mem.close()
    assert _counts() == before and _memfds() == memfds
    assert mem.backing_fds() == [] and all(s.closed for s in mem.segments.values())
    mem.close()
    assert _counts() == before
    with pytest.raises(NumavmError, match="closed"):
        mem.read(0, 1)
    with pytest.raises(NumavmError, match="closed"):
        list(mem.regions())


def test_hugepages_per_domain() -> None:
    """-n ...,hugepages= picks a domain's pages; `none` opts out of the machine's --hugepages."""
    lay = plan_layout(MachineSpec(domains=[parse_numa("id=0,size=64M,cpus=0,hugepages=thp"),
                                           parse_numa("id=1,size=64M,cpus=1")]).build(host_nodes=(0,)))
    with GuestMemory(lay, machine="huge") as mem:
        assert mem.segments[0].hugepages == "thp" and mem.segments[1].hugepages is None
    lay = plan_layout(MachineSpec(domains=[parse_numa("id=0,size=64M,cpus=0,hugepages=none"),
                                           parse_numa("id=1,size=64M,cpus=1")]).build(host_nodes=(0,)))
    with GuestMemory(lay, machine="huge", hugepages="thp") as mem:
        assert mem.segments[0].hugepages is None and mem.segments[1].hugepages == "thp"
    # one memfd for QEMU has one kind of page
    lay = plan_layout(MachineSpec(domains=[parse_numa("id=0,size=64M,cpus=0,hugepages=thp"),
                                           parse_numa("id=1,size=64M,cpus=1")]).build(host_nodes=(0,)))
    before = _counts()
    with pytest.raises(ConfigError, match="same hugepages"):
        GuestMemory(lay, machine="huge", unified=True)
    assert _counts() == before and not _memfds()


@pytest.mark.skipif(meminfo().get("HugePages_Free", 0) > 0, reason="this host has huge pages reserved")
def test_hugetlbfs_domain_refused_without_reserved_pages() -> None:
    lay = plan_layout(MachineSpec(domains=[parse_numa("id=0,size=64M,cpus=0"),
                                           parse_numa("id=1,size=64M,cpus=1,hugepages=hugetlbfs")]).build(host_nodes=(0,)))
    before = _counts()
    with pytest.raises(ConfigError, match="domain 1: hugepages=hugetlbfs needs"):
        GuestMemory(lay, machine="huge")
    assert _counts() == before and not _memfds()
