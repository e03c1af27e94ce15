"""Guest-physical layout: ranges around the 3-4 GiB hole, APIC ids, e820, table area."""

from __future__ import annotations

import pytest

from numavm.spec import config
from numavm.plan.layout import (
    EBDA_START,
    HIGH_RAM_BASE,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    LEGACY_END,
    LOW_RAM_LIMIT,
    RSDP_ADDR,
    TABLE_AREA_START,
    E820Entry,
    E820Type,
    Layout,
    Range,
    plan_layout,
)
from numavm.spec.topology import MachineSpec, Topology, parse_distance, parse_numa
from numavm.spec.units import GiB, KiB, MiB, TiB

HOSTS = (0, 1, 2, 3)


def topo(*numa: str, cpus: int | None = None, memory: int | None = None) -> Topology:
    return MachineSpec(cpus=cpus, memory=memory, domains=[parse_numa(n) for n in numa]).build(host_nodes=HOSTS)


def lay(*numa: str, cpus: int | None = None, memory: int | None = None) -> Layout:
    layout = plan_layout(topo(*numa, cpus=cpus, memory=memory))
    check_invariants(layout)
    return layout


def rng(a: int, b: int) -> Range:
    return Range(a, b)


# ---------------------------------------------------------------- interval helpers


def merge(intervals) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if a == b:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def subtract(base, holes) -> list[tuple[int, int]]:
    out = []
    for a, b in merge(base):
        cur = a
        for h0, h1 in merge(holes):
            if h1 <= cur or h0 >= b:
                continue
            if h0 > cur:
                out.append((cur, h0))
            cur = max(cur, h1)
        if cur < b:
            out.append((cur, b))
    return merge(out)


def contained(inner: tuple[int, int], outer) -> bool:
    return any(a <= inner[0] and inner[1] <= b for a, b in merge(outer))


# ---------------------------------------------------------------- invariants


def check_invariants(layout: Layout) -> None:
    t = layout.topology
    assert [d.id for d in layout.domains] == [d.id for d in t.domains] == list(range(len(t.domains)))

    # ranges: ascending, contiguous from 0, skipping exactly the 3-4 GiB hole
    all_ranges = [r for d in layout.domains for r in d.ranges]
    assert all_ranges, "some domain has memory"
    assert all_ranges[0].start == 0
    for prev, nxt in zip(all_ranges, all_ranges[1:]):
        assert nxt.start == prev.end or (prev.end == LOW_RAM_LIMIT and nxt.start == HIGH_RAM_BASE), (prev, nxt)
    for r in all_ranges:
        assert r.start < r.end
        assert r.end <= LOW_RAM_LIMIT or r.start >= HIGH_RAM_BASE, r
        assert IOAPIC_ADDR not in r and LAPIC_ADDR not in r
    assert layout.ram_top == all_ranges[-1].end

    for d in layout.domains:
        assert d.segment_size == d.domain.size
        assert sum(r.size for r in d.ranges) == d.domain.size
        if d.domain.size == 0:
            assert d.slots == () and d.ranges == ()
        assert 1 <= len(d.slots) <= 2 or d.domain.size == 0
        off = 0
        for s in d.slots:
            assert s.offset == off
            off += s.guest.size
        for r in d.ranges:
            assert layout.domain_at(r.start) is d
            assert layout.domain_at(r.end - 1) is d

    # APIC ids: one per vCPU, distinct, one package per domain with vCPUs
    assert len(layout.apic_ids) == t.cpus
    assert len(set(layout.apic_ids)) == t.cpus
    cb = layout.core_bits
    widest = max(len(d.domain.cpus) for d in layout.domains)
    assert cb == (widest - 1).bit_length()
    packages = []
    for d in layout.domains:
        assert d.apic_ids == tuple(layout.apic_ids[c] for c in d.domain.cpus)
        if d.domain.cpus:
            pk = {a >> cb for a in d.apic_ids}
            assert len(pk) == 1, "one package per domain"
            packages.append(pk.pop())
            assert sorted(a & ((1 << cb) - 1) for a in d.apic_ids) == list(range(len(d.apic_ids)))
    assert packages == list(range(len(packages))), "packages numbered by domain rank"

    # e820: sorted, no overlaps, RAM = domains' ranges minus the non-RAM legacy entries
    e = layout.e820
    for x in e:
        assert x.start < x.end
    for prev, nxt in zip(e, e[1:]):
        assert prev.end <= nxt.start, (prev, nxt)
    ram = [(x.start, x.end) for x in e if x.type == E820Type.RAM]
    non_ram = [(x.start, x.end) for x in e if x.type != E820Type.RAM]
    domain_ram = [(r.start, r.end) for r in all_ranges]
    assert merge(ram) == subtract(domain_ram, non_ram)
    for x in non_ram:
        assert x[1] <= LEGACY_END
        assert contained(x, domain_ram), "legacy areas lie inside guest RAM"
    assert sum(b - a for a, b in ram) + sum(b - a for a, b in non_ram) == t.memory

    # the ACPI table area: inside the first domain's RAM, not RAM in e820
    ta = layout.table_area
    first = layout.domain_at(0)
    assert first is not None and first is layout.domain_at(ta.start) is layout.domain_at(ta.end - 1)
    assert contained((ta.start, ta.end), [(r.start, r.end) for r in first.ranges])
    assert not subtract([(ta.start, ta.end)], non_ram), "table area is not RAM in e820"
    assert not any(x.start < ta.end and ta.start < x.end for x in e if x.type == E820Type.RAM)
    assert any(x.start <= ta.start and ta.end <= x.end and x.type == E820Type.ACPI for x in e)
    assert not any(x.start <= layout.rsdp_addr < x.end for x in e if x.type == E820Type.RAM)
    assert first.domain.id == min(d.id for d in t.domains if d.size)


# ---------------------------------------------------------------- the 3 GiB boundary


def test_domain_ending_exactly_at_3g():
    L = lay("id=0,size=3G,cpus=0", "id=1,size=1G,cpus=1")
    assert L.domains[0].ranges == (rng(0, 3 * GiB),)
    assert L.domains[1].ranges == (rng(4 * GiB, 5 * GiB),)
    assert L.domains[1].slots[0].offset == 0
    assert L.ram_top == 5 * GiB


def test_domains_ending_exactly_at_3g_then_memoryless_then_memory():
    L = lay("id=0,size=2G,cpus=0", "id=1,size=1G", "id=2,size=0,cpus=1", "id=3,size=512M")
    assert L.domains[1].ranges == (rng(2 * GiB, 3 * GiB),)
    assert L.domains[2].ranges == ()
    assert L.domains[3].ranges == (rng(4 * GiB, 4 * GiB + 512 * MiB),)


def test_domain_crossing_3g():
    L = lay("id=0,size=2G,cpus=0", "id=1,size=2G,cpus=1", "id=2,size=1G")
    d1 = L.domains[1]
    assert d1.ranges == (rng(2 * GiB, 3 * GiB), rng(4 * GiB, 5 * GiB))
    assert [s.offset for s in d1.slots] == [0, GiB]
    assert d1.segment_size == 2 * GiB  # one host segment
    assert L.domains[2].ranges == (rng(5 * GiB, 6 * GiB),)
    assert L.domain_at(3 * GiB - 1) is d1 and L.domain_at(4 * GiB) is d1
    assert L.domain_at(3 * GiB) is None and L.domain_at(4 * GiB - 1) is None
    assert L.domain_at(6 * GiB) is None


def test_domain_crossing_3g_unevenly():
    L = lay("id=0,size=2900M,cpus=0", "id=1,size=300M")
    d1 = L.domains[1]
    assert d1.ranges == (rng(2900 * MiB, 3 * GiB), rng(4 * GiB, 4 * GiB + 128 * MiB))
    assert [s.offset for s in d1.slots] == [0, 172 * MiB]


def test_domain_zero_crossing_3g():
    L = lay("id=0,size=6G,cpus=0")
    assert L.domains[0].ranges == (rng(0, 3 * GiB), rng(4 * GiB, 7 * GiB))
    assert [s.offset for s in L.domains[0].slots] == [0, 3 * GiB]


def test_classic_machine_over_3g():
    L = plan_layout(MachineSpec(cpus=2, memory=8 * GiB).build(host_nodes=HOSTS))
    check_invariants(L)
    assert L.topology.numa is False
    assert L.domains[0].ranges == (rng(0, 3 * GiB), rng(4 * GiB, 9 * GiB))
    assert L.e820[-2:] == (E820Entry(LEGACY_END, 3 * GiB, E820Type.RAM),
                           E820Entry(4 * GiB, 9 * GiB, E820Type.RAM))


def test_classic_machine_default():
    L = plan_layout(MachineSpec().build(host_nodes=HOSTS))
    check_invariants(L)
    assert L.domains[0].ranges == (rng(0, 512 * MiB),)
    assert L.apic_ids == (0,)
    assert L.core_bits == 0


def test_all_below_3g_has_no_high_ram():
    L = lay("id=0,size=1G,cpus=0", "id=1,size=1G")
    assert all(x.end <= LOW_RAM_LIMIT for x in L.e820)
    assert L.ram_top == 2 * GiB


def test_huge_machine():
    L = lay("id=0,size=32T,cpus=0-511", "id=1,size=32T,cpus=512-1023")
    assert L.domains[0].ranges == (rng(0, 3 * GiB), rng(4 * GiB, 32 * TiB + GiB))
    assert L.domains[1].ranges == (rng(32 * TiB + GiB, 64 * TiB + GiB),)


# ---------------------------------------------------------------- memory-only and memoryless


def test_memory_only_domain():
    L = lay("id=0,size=1G,cpus=0-1", "id=1,size=512M")
    d1 = L.domains[1]
    assert d1.ranges == (rng(GiB, GiB + 512 * MiB),)
    assert d1.apic_ids == ()
    assert d1.domain.cpus == ()


def test_memoryless_domain_in_the_middle():
    L = lay("id=0,size=1G,cpus=0", "id=1,size=0,cpus=1-2", "id=2,size=1G,cpus=3")
    assert L.domains[1].ranges == () and L.domains[1].slots == ()
    assert L.domains[2].ranges == (rng(GiB, 2 * GiB),)
    assert len(L.domains[1].apic_ids) == 2
    for a in range(0, 2 * GiB, 256 * MiB):
        assert L.domain_at(a) is not L.domains[1]


def test_memoryless_domain_zero():
    # Domain 0 cannot be at address 0 when it has no memory; the next one is.
    L = lay("id=0,size=0,cpus=0", "id=1,size=64M")
    assert L.domains[0].ranges == ()
    assert L.domains[1].ranges == (rng(0, 64 * MiB),)
    assert L.domain_at(L.table_area.start) is L.domains[1]


def test_apic_packages_skip_memory_only_domains():
    L = lay("id=0,size=4M,cpus=0-1", "id=1,size=4M", "id=2,size=4M,cpus=2-3")
    assert L.core_bits == 1
    assert L.apic_ids == (0, 1, 2, 3)
    assert L.domains[2].apic_ids == (2, 3)


# ---------------------------------------------------------------- APIC ids


def test_apic_ids_interleaved_vcpus():
    L = lay("id=0,size=4M,cpus=0+2", "id=1,size=4M,cpus=1+3")
    assert L.core_bits == 1
    assert L.apic_ids == (0, 2, 1, 3)
    assert L.domains[0].apic_ids == (0, 1)
    assert L.domains[1].apic_ids == (2, 3)


def test_apic_ids_uneven_domains():
    L = lay("id=0,size=4M,cpus=0-2", "id=1,size=4M,cpus=3", "id=2,size=4M,cpus=4-8")
    assert L.core_bits == 3
    assert L.domains[0].apic_ids == (0, 1, 2)
    assert L.domains[1].apic_ids == (8,)
    assert L.domains[2].apic_ids == (16, 17, 18, 19, 20)


def test_apic_ids_one_vcpu_per_domain():
    L = lay("id=0,size=4M,cpus=0", "id=1,size=4M,cpus=1", "id=2,size=4M,cpus=2")
    assert L.core_bits == 0
    assert L.apic_ids == (0, 1, 2)


def test_1024_vcpus_one_domain():
    L = lay("id=0,size=64M,cpus=0-1023", cpus=1024)
    assert L.core_bits == 10
    assert L.apic_ids == tuple(range(1024))
    assert max(L.apic_ids) >= 255


def test_1024_vcpus_four_domains():
    L = lay(*(f"id={i},size=16M,cpus={i * 256}-{i * 256 + 255}" for i in range(4)))
    assert L.topology.cpus == 1024
    assert L.core_bits == 8
    assert len(set(L.apic_ids)) == 1024
    assert sum(1 for a in L.apic_ids if a >= 255) > 0
    assert {a >> 8 for a in L.domains[3].apic_ids} == {3}


def test_1024_vcpus_uneven():
    L = lay("id=0,size=16M,cpus=0-999", "id=1,size=16M,cpus=1000-1023")
    assert L.core_bits == 10
    assert L.domains[1].apic_ids == tuple(range(1024, 1048))
    assert len(set(L.apic_ids)) == 1024


def test_256_domains_1024_vcpus():
    L = lay(*(f"id={i},size=4M,cpus={4 * i}-{4 * i + 3}" for i in range(256)))
    assert len(L.domains) == 256
    assert L.core_bits == 2
    assert len(set(L.apic_ids)) == 1024
    assert max(L.apic_ids) == 1023
    for i, d in enumerate(L.domains):
        assert d.ranges == (rng(4 * MiB * i, 4 * MiB * (i + 1)),)
        assert {a >> 2 for a in d.apic_ids} == {i}
    assert L.ram_top == GiB


def test_256_domains_crossing_the_hole():
    L = lay("id=0,size=16G,cpus=0-3", *(f"id={i},size=16G" for i in range(1, 256)))
    assert L.ram_top == 256 * 16 * GiB + GiB
    assert L.domains[0].ranges == (rng(0, 3 * GiB), rng(4 * GiB, 17 * GiB))
    assert L.domains[255].ranges[-1].end == L.ram_top


def test_256_domains_mostly_memoryless():
    L = lay("id=0,size=4M", *(f"id={i},size=0,cpus={i - 1}" for i in range(1, 256)))
    assert L.topology.cpus == 255
    assert L.core_bits == 0
    assert L.apic_ids == tuple(range(255))
    assert all(d.ranges == () for d in L.domains[1:])


# ---------------------------------------------------------------- e820 and the table area


def test_e820_of_the_example():
    L = plan_layout(config.example().build(host_nodes=HOSTS))
    check_invariants(L)
    assert L.e820 == (
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(0x9FC00, 0xA0000, E820Type.RESERVED),
        E820Entry(0xA0000, 0xE0000, E820Type.ACPI),
        E820Entry(0xE0000, 0x100000, E820Type.RESERVED),
        E820Entry(0x100000, 2560 * MiB, E820Type.RAM),
    )
    assert [d.ranges for d in L.domains] == [
        (rng(0, GiB),), (rng(GiB, 2 * GiB),), (rng(2 * GiB, 2560 * MiB),)]


def test_table_area():
    L = lay("id=0,size=4M,cpus=0", "id=1,size=4M")
    assert L.table_area == rng(TABLE_AREA_START, RSDP_ADDR) == rng(0xA0000, 0xE0000)
    assert L.table_area.size == 256 * KiB
    assert L.rsdp_addr == 0xE0000
    assert L.table_area.start in L.domains[0].ranges[0] and L.table_area.end - 1 in L.domains[0].ranges[0]
    assert EBDA_START < TABLE_AREA_START < RSDP_ADDR < LEGACY_END
    # Linux scans 0xE0000-0xFFFFF for the RSDP, on a 16-byte boundary
    assert 0xE0000 <= L.rsdp_addr < 0x100000 and L.rsdp_addr % 16 == 0


def test_e820_smallest_machine():
    L = lay("id=0,size=4M,cpus=0")
    assert L.e820[-1] == E820Entry(LEGACY_END, 4 * MiB, E820Type.RAM)


@pytest.mark.parametrize("numa", [
    ("id=0,size=3G,cpus=0", "id=1,size=4M"),
    ("id=0,size=3070M,cpus=0", "id=1,size=4M"),
    ("id=0,size=1G,cpus=0", "id=1,size=0,cpus=1", "id=2,size=3G", "id=3,size=0,cpus=2"),
    ("id=0,size=4M,cpus=0", "id=1,size=5G", "id=2,size=4M"),
])
def test_invariants_around_the_hole(numa):
    lay(*numa)


def test_range_helpers():
    r = rng(10, 20)
    assert r.size == 10
    assert 10 in r and 19 in r and 20 not in r and 9 not in r
    assert "x" not in r
    assert str(rng(0, 0x1000)) == "0x000000000-0x000001000"


def test_distances_do_not_affect_layout():
    a = plan_layout(topo("id=0,size=1G,cpus=0", "id=1,size=1G"))
    spec = MachineSpec(domains=[parse_numa("id=0,size=1G,cpus=0"), parse_numa("id=1,size=1G")],
                       distances=[parse_distance("0:1=40")])
    b = plan_layout(spec.build(host_nodes=HOSTS))
    assert [d.ranges for d in a.domains] == [d.ranges for d in b.domains]
    assert a.e820 == b.e820
