"""numavm.plan.cpuid: per-vCPU CPUID checked against a model of what Linux 6.1 derives from it.

`linux_view` follows arch/x86/kernel/cpu/{common,intel,amd,topology,cacheinfo}.c
of Linux 6.1 for one CPU (initial/extended APIC id, package, core, die and
LLC ids); `linux_warnings` replays smpboot.c's match_smt/match_llc pairing and
returns the "sched: CPU #N's X-sibling CPU #M is not on the same node!"
lines Linux would print.  The real-KVM test runs a real-mode guest on every
vCPU that executes CPUID and reports the registers through port I/O.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest

from numavm.vmm.kvm import ioctls as K
from numavm.plan.cpuid import (
    CMP_LEGACY_BIT,
    HTT_BIT,
    HYPERVISOR_BIT,
    KVM_CPUID_FEATURES,
    KVM_FEATURE_MSI_EXT_DEST_ID,
    NODEID_MSR_BIT,
    TOPOEXT_BIT,
    X2APIC_BIT,
    CpuidError,
    cpu_family_model,
    get_count_order,
    vcpu_cpuid,
    vendor,
)
from numavm.vmm.kvm.ioctls import KVM_CPUID_FLAG_SIGNIFCANT_INDEX as INDEXED
from numavm.vmm.kvm.ioctls import KvmCpuidEntry2
from numavm.plan.layout import Layout, plan_layout
from numavm.spec.topology import MachineSpec, parse_numa

Regs = tuple[int, int, int, int]
Table = dict[tuple[int, int], Regs]  # (function, index) -> eax, ebx, ecx, edx


# ---------------------------------------------------------------- layouts


def layout(*numa: str, cpus: int | None = None) -> Layout:
    spec = MachineSpec(cpus=cpus, domains=[parse_numa(n) for n in numa])
    return plan_layout(spec.build(host_nodes=(0,)))


LAYOUTS: dict[str, Callable[[], Layout]] = {
    # The reference: domain 0 vCPUs 0-1, domain 1 vCPUs 2-3, domain 2 memory only.
    "example": lambda: layout("id=0,size=64M,cpus=0-1", "id=1,size=64M,cpus=2-3", "id=2,size=32M"),
    "uneven-3+5": lambda: layout("id=0,size=64M,cpus=0-2", "id=1,size=64M,cpus=3-7"),
    "interleaved": lambda: layout("id=0,size=64M,cpus=0+2", "id=1,size=64M,cpus=1+3"),
    "memory-only-first": lambda: layout("id=0,size=64M", "id=1,size=64M,cpus=0-2",
                                        "id=2,size=64M,cpus=3"),
    "one-cpu-domains": lambda: layout(*(f"id={i},size=8M,cpus={i}" for i in range(6))),
    # The issue's machine: vCPU 129 has APIC id 256, whose low byte is vCPU 0's id.
    "past-255-128+1+1": lambda: layout("id=0,size=64M,cpus=0-127", "id=1,size=64M,cpus=128",
                                       "id=2,size=64M,cpus=129"),
    "1024-in-4": lambda: layout(*(f"id={i},size=64M,cpus={256 * i}-{256 * i + 255}"
                                  for i in range(4)), cpus=1024),
    "1024-300+724": lambda: layout("id=0,size=64M,cpus=0-299", "id=1,size=64M,cpus=300-1023",
                                   cpus=1024),
    "1024-in-128x8": lambda: layout(*(f"id={i},size=8M,cpus={8 * i}-{8 * i + 7}"
                                      for i in range(128)), cpus=1024),
}


# ---------------------------------------------------------------- host tables


def regs_of_vendor(name: str) -> tuple[int, int, int]:
    b = name.encode()
    ebx, edx, ecx = (int.from_bytes(b[i:i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def table(vendor_name: str, rows: Sequence[tuple[int, int, int, Regs]]) -> list[KvmCpuidEntry2]:
    """Entries from (function, index, flags, (eax, ebx, ecx, edx)) rows; leaf 0 gets the vendor."""
    out = []
    for function, index, flags, (eax, ebx, ecx, edx) in rows:
        if function == 0:
            ebx, ecx, edx = regs_of_vendor(vendor_name)
        out.append(KvmCpuidEntry2(function=function, index=index, flags=flags,
                                  eax=eax, ebx=ebx, ecx=ecx, edx=edx))
    return out


def intel_cache(type_: int, level: int, sharing: int, cores: int) -> int:
    return type_ | level << 5 | 1 << 8 | (sharing - 1) << 14 | (cores - 1) << 26


def intel_table(max_basic: int = 0x1F) -> list[KvmCpuidEntry2]:
    """A Sapphire-Rapids-like KVM_GET_SUPPORTED_CPUID (56 cores, 2 threads each)."""
    rows: list[tuple[int, int, int, Regs]] = [
        (0, 0, 0, (max_basic, 0, 0, 0)),
        (1, 0, 0, (0x000806F8, 0x00800800, 0xFFFA3223 | X2APIC_BIT, 0x1F8BFBFF)),
        (4, 0, INDEXED, (intel_cache(1, 1, 2, 64), 0x02C0003F, 0x3F, 0)),
        (4, 1, INDEXED, (intel_cache(2, 1, 2, 64), 0x01C0003F, 0x3F, 0)),
        (4, 2, INDEXED, (intel_cache(3, 2, 2, 64), 0x03C0003F, 0x7FF, 0)),
        (4, 3, INDEXED, (intel_cache(3, 3, 128, 64), 0x03C0003F, 0x1BFFF, 4)),
        (4, 4, INDEXED, (0, 0, 0, 0)),
        (0xB, 0, INDEXED, (1, 2, 0x100, 0x41)),
        (0xB, 1, INDEXED, (7, 112, 0x201, 0x41)),
        (0x40000000, 0, 0, (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)),
        (0x40000001, 0, 0, (0x01007EFB, 0, 0, 0)),
        (0x80000000, 0, 0, (0x80000008, 0, 0, 0)),
        (0x80000001, 0, 0, (0, 0, 0x121, 0x2C100800)),
        (0x80000006, 0, 0, (0, 0, 0x08007040, 0)),
        (0x80000008, 0, 0, (0x3934, 0, 0, 0)),
    ]
    if max_basic >= 0x1F:
        rows += [(0x1F, 0, INDEXED, (1, 2, 0x100, 0x41)), (0x1F, 1, INDEXED, (7, 112, 0x201, 0x41)),
                 (0x1F, 2, INDEXED, (0, 0, 2, 0x41))]
    return table("GenuineIntel", rows)


def amd_table(leaf1_eax: int = 0x00A10F11, topoext: bool = True) -> list[KvmCpuidEntry2]:
    """What this kind of host's KVM reports (an EPYC, family 0x19), topology leaves included."""
    rows: list[tuple[int, int, int, Regs]] = [
        (0, 0, 0, (0x1C, 0, 0, 0)),
        (1, 0, 0, (leaf1_eax, 0x01020800, 0x81202000 & ~HYPERVISOR_BIT, 0x078BFBFF)),
        (4, 0, INDEXED, (0, 0, 0, 0)),
        (0xB, 0, INDEXED, (0, 0, 0, 1)),
        (0x40000000, 0, 0, (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)),
        (0x40000001, 0, 0, (0x01007EFB, 0, 0, 0)),
        (0x80000000, 0, 0, (0x80000021, 0, 0, 0)),
        (0x80000001, 0, 0, (leaf1_eax, 0x40000000,
                            0x00000393 | (TOPOEXT_BIT if topoext else 0), 0x23D3FBFF)),
        (0x80000005, 0, 0, (0xFF48FF40, 0xFF48FF40, 0x20080140, 0x20080140)),
        (0x80000006, 0, 0, (0x5C002200, 0x6C004200, 0x04006140, 0x0A009140)),
        (0x80000008, 0, 0, (0x3030, 0x50020005, 0x7001, 0)),
        (0x8000001E, 0, 0, (0, 0, 0, 0)),
        (0x80000021, 0, 0, (0x204, 0, 6, 0)),
    ]
    if topoext:
        rows += [
            (0x8000001D, 0, INDEXED, (0x121, 0x01C0003F, 0x3F, 0)),
            (0x8000001D, 1, INDEXED, (0x122, 0x01C0003F, 0x3F, 0)),
            (0x8000001D, 2, INDEXED, (0x143, 0x01C0003F, 0x7FF, 2)),
            (0x8000001D, 3, INDEXED, (0x3C163, 0x03C0003F, 0x7FFF, 1)),  # L3 shared by 16
            (0x8000001D, 4, INDEXED, (0, 0, 0, 0)),
        ]
    return table("AuthenticAMD", rows)


HOSTS: dict[str, Callable[[], list[KvmCpuidEntry2]]] = {
    "intel": intel_table,
    "intel-max-leaf-0xa": lambda: intel_table(0xA),
    "amd-zen4": amd_table,
    "amd-zen1": lambda: amd_table(0x00800F12),  # family 0x17 model 0x01: LLC = ApicId[3]
    "amd-fam15h": lambda: amd_table(0x00600F20, topoext=True),
    "amd-no-topoext": lambda: amd_table(topoext=False),
    "amd-qemu64-no-topoext": lambda: qemu64_table(),
}


def qemu64_table() -> list[KvmCpuidEntry2]:
    """The nested-SVM harness's L1 (QEMU TCG `-cpu qemu64,+svm,+npt`): family 0xF, no
    TOPOEXT, extended leaves only up to 0x8000000A."""
    out = [e for e in amd_table(0x00060FB1, topoext=False) if not 0x8000000A < e.function < 0xC0000000]
    entry(out, 0x80000000).eax = 0x8000000A
    return out


# ---------------------------------------------------------------- a model of Linux 6.1


def lookup(entries: Sequence[KvmCpuidEntry2]) -> Callable[[int, int], Regs]:
    """CPUID as KVM answers it from a table: an absent (function, index) reads as zeros."""
    def cpuid(function: int, index: int = 0) -> Regs:
        for e in entries:
            if e.function == function and (e.index == index or not e.flags & INDEXED):
                return e.eax, e.ebx, e.ecx, e.edx
        return 0, 0, 0, 0
    return cpuid


@dataclass(frozen=True)
class LinuxCpu:
    apicid: int
    initial_apicid: int
    phys_proc_id: int
    core_id: int
    die_id: int
    cu_id: int  # 0xff: none
    llc_id: int
    smp_num_siblings: int
    topoext: bool
    xtopology: bool


def detect_extended_topology(cpuid: Callable[[int, int], Regs],
                             cpuid_level: int) -> dict[str, int] | None:
    """topology.c detect_extended_topology(); None when it returns -1."""
    leaf = None
    for candidate in (0x1F, 0xB):
        if cpuid_level >= candidate:
            _, ebx, ecx, _ = cpuid(candidate, 0)
            if ebx != 0 and (ecx >> 8) & 0xFF == 1:
                leaf = candidate
                break
    if leaf is None:
        return None
    eax, ebx, ecx, edx = cpuid(leaf, 0)
    initial_apicid = edx
    smt_siblings = ebx & 0xFFFF
    ht_mask_width = core_plus_mask_width = eax & 0x1F
    pkg_mask_width = die_plus_mask_width = eax & 0x1F
    die_present = False
    sub = 1
    while True:
        eax, ebx, ecx, edx = cpuid(leaf, sub)
        kind = (ecx >> 8) & 0xFF
        if kind == 2:
            core_plus_mask_width = die_plus_mask_width = eax & 0x1F
        if kind == 5:
            die_present = True
            die_plus_mask_width = eax & 0x1F
        if kind == 0:
            break
        pkg_mask_width = eax & 0x1F
        sub += 1
        assert sub < 64, "leaf 0xB never ends"
    core_select_mask = ((1 << pkg_mask_width) - 1) >> ht_mask_width
    die_select_mask = ((1 << die_plus_mask_width) - 1) >> core_plus_mask_width
    out = {
        "initial_apicid": initial_apicid,
        "apicid": initial_apicid,
        "core_id": (initial_apicid >> ht_mask_width) & core_select_mask,
        "phys_proc_id": initial_apicid >> pkg_mask_width,
        "smp_num_siblings": smt_siblings,
    }
    if die_present:
        out["die_id"] = (initial_apicid >> core_plus_mask_width) & die_select_mask
    return out


def cache_leaves(cpuid: Callable[[int, int], Regs], op: int) -> list[int]:
    """find_num_cache_leaves(): EAX of each subleaf until cache type 0."""
    out: list[int] = []
    while (eax := cpuid(op, len(out))[0]) & 0x1F:
        out.append(eax)
        assert len(out) < 64
    return out


def linux_view(entries: Sequence[KvmCpuidEntry2], lapic_id: int) -> LinuxCpu:
    """What Linux 6.1 (x86-64) computes for the CPU whose local APIC id is `lapic_id`."""
    cpuid = lookup(entries)
    cpuid_level = cpuid(0, 0)[0]
    ext_level = cpuid(0x80000000, 0)[0]
    leaf1 = cpuid(1, 0)
    family, model = cpu_family_model(leaf1[0])
    initial_apicid = leaf1[1] >> 24 & 0xFF  # generic_identify()
    phys_proc_id = initial_apicid
    smp_num_siblings = 1
    cu_id = 0xFF
    llc_id = None
    v = vendor(entries)
    if v == "GenuineIntel":
        # early_init_intel: detect_extended_topology_early() or detect_ht_early().
        ext = detect_extended_topology(cpuid, cpuid_level)
        assert ext is not None, "no valid leaf 0xB: Linux would guess SMT from CPUID.1 EBX[23:16]"
        apicid, initial_apicid = ext["apicid"], ext["initial_apicid"]
        phys_proc_id, core_id = ext["phys_proc_id"], ext["core_id"]
        die_id = ext.get("die_id", 0)
        smp_num_siblings = max(smp_num_siblings, ext["smp_num_siblings"])
        # init_intel_cacheinfo(): cpuid(4) ids are the APIC id with the sharing bits cleared.
        l2_id = l3_id = None
        for eax in cache_leaves(cpuid, 4):
            level = (eax >> 5) & 7
            msb = get_count_order(((eax >> 14) & 0xFFF) + 1)
            if level == 2:
                l2_id = apicid & ~((1 << msb) - 1)
            elif level == 3:
                l3_id = apicid & ~((1 << msb) - 1)
        llc_id = l3_id if l3_id is not None else l2_id
        if llc_id is None:
            llc_id = phys_proc_id
        return LinuxCpu(apicid, initial_apicid, phys_proc_id, core_id, die_id, cu_id, llc_id,
                        smp_num_siblings, False, True)

    assert v == "AuthenticAMD", v
    ext1_ecx = cpuid(0x80000001, 0)[2] if ext_level >= 0x80000001 else 0
    topoext = bool(ext1_ecx & TOPOEXT_BIT)
    assert not ext1_ecx & NODEID_MSR_BIT, "Linux would read MSR 0xC001100C for the die id"
    # early_init_amd_mc()
    coreid_bits = 0
    if ext_level >= 0x80000008:
        ecx = cpuid(0x80000008, 0)[2]
        max_cores = (ecx & 0xFF) + 1
        coreid_bits = (ecx >> 12) & 0xF
        if coreid_bits == 0:
            while (1 << coreid_bits) < max_cores:
                coreid_bits += 1
    if topoext:  # early_init_amd()
        smp_num_siblings = ((cpuid(0x8000001E, 0)[1] >> 8) & 0xFF) + 1
    apicid = lapic_id  # init_amd(): hard_smp_processor_id()
    # amd_detect_cmp()
    core_id = initial_apicid & ((1 << coreid_bits) - 1)
    phys_proc_id = initial_apicid >> coreid_bits
    llc_id = die_id = phys_proc_id
    xtopology = False
    if topoext:  # amd_get_topology()
        _, ebx, ecx, _ = cpuid(0x8000001E, 0)
        die_id = ecx & 0xFF
        assert (ecx >> 8) & 7 == 0, "nodes_per_socket > 1: legacy_fixup_core_id, AMD_DCM"
        if family == 0x15:
            cu_id = ebx & 0xFF
        if family >= 0x17:
            core_id = ebx & 0xFF
        ext = detect_extended_topology(cpuid, cpuid_level)
        if ext is not None:
            xtopology = True
            apicid, initial_apicid = ext["apicid"], ext["initial_apicid"]
            phys_proc_id, core_id = ext["phys_proc_id"], ext["core_id"]
            die_id = ext.get("die_id", die_id)
            smp_num_siblings = max(smp_num_siblings, ext["smp_num_siblings"])
        # cacheinfo_amd_init_llc_id()
        if ext_level >= 0x80000006 and cpuid(0x80000006, 0)[3]:
            if family < 0x17:
                llc_id = die_id
            elif family == 0x17 and model <= 0x1F:
                llc_id = apicid >> 3
            else:
                leaves = cache_leaves(cpuid, 0x8000001D)
                eax = cpuid(0x8000001D, len(leaves) - 1)[0] if leaves else 0
                if eax:
                    llc_id = apicid >> get_count_order(((eax >> 14) & 0xFFF) + 1)
    return LinuxCpu(apicid, initial_apicid, phys_proc_id, core_id, die_id, cu_id, llc_id,
                    smp_num_siblings, topoext, xtopology)


def linux_warnings(views: Sequence[LinuxCpu], node: Sequence[int]) -> list[str]:
    """smpboot.c set_cpu_sibling_map(): the topology_sane() warnings (SMT and LLC pairs)."""
    out = []
    for i, c in enumerate(views):
        for j, o in enumerate(views[:i]):
            same_pkg_die = c.phys_proc_id == o.phys_proc_id and c.die_id == o.die_id
            if c.topoext:
                smt = same_pkg_die and c.llc_id == o.llc_id and (
                    c.core_id == o.core_id or (c.cu_id != 0xFF and c.cu_id == o.cu_id))
            else:
                smt = same_pkg_die and c.core_id == o.core_id
            for name, matched in (("smt", smt), ("llc", c.llc_id == o.llc_id)):
                if matched and node[i] != node[j]:
                    out.append(f"sched: CPU #{i}'s {name}-sibling CPU #{j} is not on the same "
                               f"node! [node: {node[i]} != {node[j]}]. Ignoring dependency.")
    return out


def guest_views(supported: Sequence[KvmCpuidEntry2], lay: Layout) -> list[LinuxCpu]:
    return [linux_view(vcpu_cpuid(supported, lay, c), lay.apic_ids[c])
            for c in range(len(lay.apic_ids))]


def node_of(lay: Layout) -> list[int]:
    out = [-1] * len(lay.apic_ids)
    for d in lay.domains:
        for c in d.domain.cpus:
            out[c] = d.id
    return out


def one_to_one(ids: Sequence[int], nodes: Sequence[int]) -> bool:
    pairs = set(zip(ids, nodes))
    return len(pairs) == len({i for i, _ in pairs}) == len({n for _, n in pairs})


def assert_linux_matches(views: Sequence[LinuxCpu], lay: Layout, *, llc_is_package: bool = True) -> None:
    nodes = node_of(lay)
    assert linux_warnings(views, nodes) == []
    assert [v.apicid for v in views] == list(lay.apic_ids)
    assert [v.initial_apicid for v in views] == list(lay.apic_ids)
    assert one_to_one([v.phys_proc_id for v in views], nodes)
    assert [v.phys_proc_id for v in views] == [a >> lay.core_bits for a in lay.apic_ids]
    assert [(v.phys_proc_id, v.core_id) for v in views] == [
        (a >> lay.core_bits, a & ((1 << lay.core_bits) - 1)) for a in lay.apic_ids]
    assert all(v.smp_num_siblings == 1 for v in views)
    # Every LLC inside one domain; and normally exactly one per domain.
    llc_nodes: dict[int, set[int]] = {}
    for v, n in zip(views, nodes):
        llc_nodes.setdefault(v.llc_id, set()).add(n)
    assert all(len(s) == 1 for s in llc_nodes.values()), llc_nodes
    if llc_is_package:
        assert one_to_one([v.llc_id for v in views], nodes)


# ---------------------------------------------------------------- pure tests


@pytest.mark.parametrize("lay_name", sorted(LAYOUTS))
@pytest.mark.parametrize("host", sorted(HOSTS))
def test_linux_derives_the_domains(host: str, lay_name: str) -> None:
    lay = LAYOUTS[lay_name]()
    supported = HOSTS[host]()
    if host == "amd-zen1" and max(lay.apic_ids) > 0xFF and lay.core_bits < 3:
        with pytest.raises(CpuidError, match=r"family 0x17 model 0x1"):
            vcpu_cpuid(supported, lay, 0)
        return
    views = guest_views(supported, lay)
    # Zen 1 above 255 ids keeps Linux's hard-coded CCX (ApicId[3]) LLCs: inside packages.
    zen1_ccx = host == "amd-zen1" and max(lay.apic_ids) > 0xFF and lay.core_bits > 3
    assert_linux_matches(views, lay, llc_is_package=not zen1_ccx)
    if host.startswith("amd") and not zen1_ccx:
        # AMD's llc id is the package index itself.
        assert [v.llc_id for v in views] == [a >> lay.core_bits for a in lay.apic_ids]
    if host.startswith("amd"):
        # Past 255, numavm announces TOPOEXT itself where the host lacks it.
        assert all(v.topoext == (not host.endswith("no-topoext") or max(lay.apic_ids) > 0xFF)
                   for v in views)


def test_model_flags_a_cache_shared_across_domains() -> None:
    """The unmodified host table (one L3 for 128 threads) gives Linux's warning: the model bites."""
    lay = LAYOUTS["example"]()
    supported = intel_table()
    good = [vcpu_cpuid(supported, lay, c) for c in range(4)]
    bad = []
    for c, entries in enumerate(good):
        host_l3 = [e for e in entries if e.function == 4 and e.index == 3][0]
        host_l3.eax = intel_cache(3, 3, 128, 64)
        bad.append(linux_view(entries, lay.apic_ids[c]))
    warnings = linux_warnings(bad, node_of(lay))
    assert "sched: CPU #2's llc-sibling CPU #0 is not on the same node! [node: 1 != 0]. " \
           "Ignoring dependency." in warnings


def entry(entries: Sequence[KvmCpuidEntry2], function: int, index: int = 0) -> KvmCpuidEntry2:
    found = [e for e in entries if e.function == function
             and (e.index == index or not e.flags & INDEXED)]
    assert len(found) == 1, (hex(function), index, len(found))
    return found[0]


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_leaf_values_for_the_example(host: str) -> None:
    lay = LAYOUTS["example"]()  # APIC ids 0, 1, 2, 3; core_bits 1
    supported = HOSTS[host]()
    before = [bytes(e) for e in supported]
    for c, apic in enumerate(lay.apic_ids):
        t = vcpu_cpuid(supported, lay, c)
        assert entry(t, 0).eax >= 0xB
        l1 = entry(t, 1)
        assert l1.ebx >> 24 == apic and (l1.ebx >> 16) & 0xFF == 2
        assert l1.edx & HTT_BIT and l1.ecx & HYPERVISOR_BIT and l1.ecx & X2APIC_BIT
        assert l1.ebx & 0xFFFF == entry(supported, 1).ebx & 0xFFFF  # CLFLUSH size etc. kept
        for leaf in (0xB, 0x1F) if entry(t, 0).eax >= 0x1F else (0xB,):
            subs = [(e.index, e.eax, e.ebx, e.ecx, e.edx, e.flags) for e in t if e.function == leaf]
            assert subs == [(0, 0, 1, 0x100, apic, INDEXED), (1, 1, 2, 0x201, apic, INDEXED),
                            (2, 0, 0, 0x002, apic, INDEXED)]
        for e in t:
            if e.function in (4, 0x8000001D) and e.eax & 0x1F:
                assert e.flags & INDEXED
                level = (e.eax >> 5) & 7
                assert (e.eax >> 14) & 0xFFF == (1 if level >= 3 else 0)
                if e.function == 4:
                    assert e.eax >> 26 == 1
        kvm_pv = [bytes(e) for e in t if 0x40000000 <= e.function < 0x40000100]
        assert kvm_pv == [bytes(e) for e in supported if 0x40000000 <= e.function < 0x40000100]
        if vendor(t) == "AuthenticAMD":
            assert entry(t, 0x80000008).ecx & 0xF0FF == 1 << 12 | 1
            assert entry(t, 0x80000001).ecx & CMP_LEGACY_BIT
            if entry(t, 0x80000000).eax >= 0x8000001E:
                e = entry(t, 0x8000001E)
                assert (e.eax, e.ebx, e.ecx, e.edx) == (apic, apic & 1, apic >> 1, 0)
    assert [bytes(e) for e in supported] == before  # the input is never changed


def test_max_basic_leaf_is_raised_to_0xb() -> None:
    t = vcpu_cpuid(intel_table(0xA), LAYOUTS["example"](), 0)
    assert entry(t, 0).eax == 0xB
    assert not [e for e in t if e.function == 0x1F]


def test_one_vcpu_per_package_has_no_htt() -> None:
    lay = LAYOUTS["one-cpu-domains"]()
    assert lay.core_bits == 0
    for host in ("intel", "amd-zen4"):
        t = vcpu_cpuid(HOSTS[host](), lay, 5)
        l1 = entry(t, 1)
        assert l1.ebx >> 24 == 5 and (l1.ebx >> 16) & 0xFF == 1 and not l1.edx & HTT_BIT
        assert (entry(t, 0xB, 1).eax, entry(t, 0xB, 1).ebx) == (0, 1)
        if host == "amd-zen4":
            assert not entry(t, 0x80000001).ecx & CMP_LEGACY_BIT
            assert entry(t, 0x80000008).ecx & 0xF0FF == 0


def test_uneven_packages_report_their_own_size() -> None:
    lay = LAYOUTS["uneven-3+5"]()  # core_bits 3: APIC ids 0-2 and 8-12
    assert lay.apic_ids == (0, 1, 2, 8, 9, 10, 11, 12)
    for c, size in ((0, 3), (7, 5)):
        t = vcpu_cpuid(amd_table(), lay, c)
        assert entry(t, 0xB, 1).ebx == size and entry(t, 0xB, 1).eax == 3
        assert entry(t, 0x80000008).ecx & 0xF0FF == 3 << 12 | (size - 1)
        assert entry(t, 1).ebx >> 16 & 0xFF == 8


def test_wide_fields_saturate_at_1024_vcpus() -> None:
    lay = LAYOUTS["1024-300+724"]()
    assert lay.core_bits == 10
    t = vcpu_cpuid(intel_table(), lay, 1023)
    assert entry(t, 0xB, 0).edx == lay.apic_ids[1023] == 1024 + 723
    assert entry(t, 1).ebx >> 24 == (1024 + 723) & 0xFF
    assert (entry(t, 1).ebx >> 16) & 0xFF == 0xFF  # 1024 does not fit in 8 bits
    assert entry(t, 4, 3).eax >> 26 == 0x3F and (entry(t, 4, 3).eax >> 14) & 0xFFF == 1023


def test_zen1_hides_the_legacy_l3_descriptor_only_when_needed() -> None:
    zen1 = HOSTS["amd-zen1"]()
    assert cpu_family_model(entry(zen1, 1).eax) == (0x17, 0x01)
    t = vcpu_cpuid(zen1, LAYOUTS["example"](), 0)  # core_bits 1: apicid >> 3 would merge domains
    assert entry(t, 0x80000006).edx == 0
    t = vcpu_cpuid(zen1, LAYOUTS["uneven-3+5"](), 0)  # core_bits 3: ApicId[3] is the package
    assert entry(t, 0x80000006).edx == entry(zen1, 0x80000006).edx
    t = vcpu_cpuid(HOSTS["amd-zen4"](), LAYOUTS["example"](), 0)
    assert entry(t, 0x80000006).edx == entry(zen1, 0x80000006).edx


def test_amd_without_l3_descriptor_refuses_ids_above_255() -> None:
    supported = amd_table()
    entry(supported, 0x80000006).edx = 0
    assert_linux_matches(guest_views(supported, LAYOUTS["example"]()), LAYOUTS["example"]())
    with pytest.raises(CpuidError, match="without an L3 descriptor"):
        vcpu_cpuid(supported, LAYOUTS["1024-in-4"](), 0)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_x2apic_leaves_only_where_apic_ids_pass_254(host: str) -> None:
    """x2APIC and KVM's extended destination ids are announced exactly when an id passes 254."""
    supported = HOSTS[host]()
    host_features = entry(supported, KVM_CPUID_FEATURES).eax
    assert not host_features & KVM_FEATURE_MSI_EXT_DEST_ID  # KVM leaves it to the VMM
    wide = LAYOUTS["past-255-128+1+1"]()
    assert wide.needs_x2apic and max(wide.apic_ids) == 256
    for c in (0, 128, 129):
        t = vcpu_cpuid(supported, wide, c)
        assert entry(t, KVM_CPUID_FEATURES).eax == host_features | KVM_FEATURE_MSI_EXT_DEST_ID
        assert entry(t, 1).ecx & X2APIC_BIT
    narrow = layout(*(f"id={i},size=8M,cpus={2 * i}-{2 * i + 1}" for i in range(127)),
                    "id=127,size=8M,cpus=254")
    assert max(narrow.apic_ids) == 254 and not narrow.needs_x2apic
    t = vcpu_cpuid(supported, narrow, 254)
    assert entry(t, KVM_CPUID_FEATURES).eax == host_features


def test_x2apic_needs_kvm_paravirtual_leaf() -> None:
    supported = [e for e in amd_table() if e.function != KVM_CPUID_FEATURES]
    with pytest.raises(CpuidError, match="0x40000001"):
        vcpu_cpuid(supported, LAYOUTS["past-255-128+1+1"](), 0)


def test_amd_without_topoext_gets_it_past_255() -> None:
    """The nested-SVM harness's case: TOPOEXT, 0x8000001E and 0x8000001D from the legacy descriptors."""
    supported = HOSTS["amd-qemu64-no-topoext"]()
    assert cpu_family_model(entry(supported, 1).eax) == (0xF, 0x6B)
    assert entry(supported, 0x80000000).eax == 0x8000000A
    assert not entry(supported, 0x80000001).ecx & TOPOEXT_BIT
    assert not [e for e in supported if e.function == 0x8000001D]
    lay = LAYOUTS["past-255-128+1+1"]()
    t = vcpu_cpuid(supported, lay, 129)
    assert entry(t, 0x80000001).ecx & TOPOEXT_BIT
    assert entry(t, 0x80000000).eax == 0x8000001E
    e = entry(t, 0x8000001E)
    assert (e.eax, e.ebx & 0xFF, e.ecx & 0xFF) == (256, 0, 2)
    caches = [x for x in t if x.function == 0x8000001D]
    assert [x.index for x in caches] == [0, 1, 2, 3, 4] and all(x.flags & INDEXED for x in caches)
    kinds = [(x.eax & 0x1F, x.eax >> 5 & 7, (x.eax >> 14 & 0xFFF) + 1) for x in caches[:4]]
    assert kinds == [(1, 1, 1), (2, 1, 1), (3, 2, 1), (3, 3, 128)]  # the L3 is the package's
    assert caches[4].eax & 0x1F == 0
    l1d = caches[0]  # 0x80000005 ECX 0x20080140: 32 KiB, 8 ways, 64-byte lines
    assert (l1d.ebx & 0xFFF, l1d.ebx >> 22, l1d.ecx) == (63, 7, 32 * 1024 // 64 // 8 - 1)
    l2 = caches[2]  # 0x80000006 ECX 0x04006140: 1 MiB, code 6 = 8 ways
    assert (l2.ebx & 0xFFF, l2.ebx >> 22, l2.ecx) == (63, 7, 1024 * 1024 // 64 // 8 - 1)
    # With ids below 256 the host's leaves stay as they were.
    t = vcpu_cpuid(supported, LAYOUTS["example"](), 0)
    assert not entry(t, 0x80000001).ecx & TOPOEXT_BIT and not [x for x in t if x.function == 0x8000001D]


def test_newer_amd_topology_leaf_is_dropped() -> None:
    supported = amd_table() + [KvmCpuidEntry2(function=0x80000026, index=0, flags=INDEXED,
                                              eax=1, ebx=2, ecx=0x100, edx=0)]
    assert not [e for e in vcpu_cpuid(supported, LAYOUTS["example"](), 0)
                if e.function == 0x80000026]


def test_bad_arguments() -> None:
    lay = LAYOUTS["example"]()
    with pytest.raises(ValueError, match="vCPU 4"):
        vcpu_cpuid(amd_table(), lay, 4)
    with pytest.raises(CpuidError, match="leaf 0"):
        vcpu_cpuid([e for e in amd_table() if e.function != 0], lay, 0)


# ---------------------------------------------------------------- this host's KVM


from kvmtest import needs_kvm, real_mode_state, run_vcpu_threads  # noqa: E402


@needs_kvm
@pytest.mark.parametrize("lay_name", ["example", "uneven-3+5", "interleaved"])
def test_host_supported_table_gives_the_domains(kvm: K.Kvm, lay_name: str) -> None:
    lay = LAYOUTS[lay_name]()
    assert_linux_matches(guest_views(kvm.supported_cpuid(), lay), lay)


REPORT_PORT = 0x10
DONE_PORT = 0x11


def cpuid_program(queries: Sequence[tuple[int, int]]) -> bytes:
    """Real mode: for each (leaf, subleaf) CPUID, then `out 0x10, eax` of EAX, EBX, ECX, EDX."""
    code = bytearray()
    for leaf, sub in queries:
        code += b"\x66\xB8" + struct.pack("<I", leaf)     # mov eax, leaf
        code += b"\x66\xB9" + struct.pack("<I", sub)      # mov ecx, subleaf
        code += b"\x0F\xA2"                               # cpuid
        code += b"\x66\x89\xC6"                           # mov esi, eax
        code += b"\x66\x89\xF0\x66\xE7" + bytes([REPORT_PORT])  # mov eax, esi; out
        code += b"\x66\x89\xD8\x66\xE7" + bytes([REPORT_PORT])  # mov eax, ebx; out
        code += b"\x66\x89\xC8\x66\xE7" + bytes([REPORT_PORT])  # mov eax, ecx; out
        code += b"\x66\x89\xD0\x66\xE7" + bytes([REPORT_PORT])  # mov eax, edx; out
    code += b"\xE6" + bytes([DONE_PORT])                  # out 0x11, al
    code += b"\xF4"                                       # hlt (never re-run)
    return bytes(code)


# What the guest must see exactly: (leaf, register index, mask); KVM may change
# other bits at run time (leaf 1 EDX.APIC and ECX.OSXSAVE follow the guest's state).
def _checks(planned: Sequence[KvmCpuidEntry2]) -> list[tuple[int, int, int, int]]:
    """(leaf, subleaf, register, mask) for every topology register we set."""
    full = 0xFFFFFFFF
    out = [(0, 0, 0, full), (1, 0, 1, 0xFFFF0000), (1, 0, 2, HYPERVISOR_BIT), (1, 0, 3, HTT_BIT)]
    leaves = {(e.function, e.index) for e in planned}
    max_basic = entry(planned, 0).eax
    for leaf in (0xB, 0x1F):
        if leaf <= max_basic:
            out += [(leaf, sub, reg, full) for sub in range(3) for reg in range(4)]
    for function, index in sorted(leaves):
        if function == 4 or function == 0x8000001D:
            out.append((function, index, 0, full))
    if vendor(planned) == "AuthenticAMD":
        out += [(0x80000001, 0, 2, TOPOEXT_BIT | CMP_LEGACY_BIT | NODEID_MSR_BIT),
                (0x80000006, 0, 3, full), (0x80000008, 0, 2, 0xF0FF)]
        if (0x8000001E, 0) in leaves:
            out += [(0x8000001E, 0, reg, full) for reg in range(4)]
    return out


pytestmark = [pytest.mark.usefixtures("sigusr1_handler")]


REG_NAMES = ("EAX", "EBX", "ECX", "EDX")


@needs_kvm
@pytest.mark.parametrize("lay_name", ["example", "uneven-3+1"])
def test_guest_sees_the_planned_topology(kvm: K.Kvm, lay_name: str,
                                         request: pytest.FixtureRequest) -> None:
    """Every vCPU executes CPUID in the guest; what it sees must be what we planned.

    If this host's KVM overrides a topology register, the test names exactly
    which (leaf, subleaf, register, planned, seen) and is an expected failure.
    """
    lay = (LAYOUTS[lay_name]() if lay_name in LAYOUTS
           else layout("id=0,size=64M,cpus=0-2", "id=1,size=64M,cpus=3"))  # APIC ids 0,1,2,4
    supported = kvm.supported_cpuid()
    planned = [vcpu_cpuid(supported, lay, c) for c in range(len(lay.apic_ids))]
    checks = _checks(planned[0])
    queries = sorted({(leaf, sub) for leaf, sub, _, _ in checks})
    code = cpuid_program(queries)
    assert len(code) < 0x1000
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFB_D000)
        vm.set_identity_map_addr(0xFFFB_C000)
        vm.create_irqchip()
        vm.set_boot_cpu_id(lay.apic_ids[0])
        mem = mmap.mmap(-1, 0x10000, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        vm.set_user_memory_region(0, 0, 0x10000, K.host_address(mem))
        mem[0x1000:0x1000 + len(code)] = code
        vcpus = [vm.create_vcpu(a) for a in lay.apic_ids]
        stored: list[Table] = []
        for v, entries in zip(vcpus, planned):
            v.set_cpuid(entries)
            stored.append({(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx)
                           for e in v.get_cpuid()})
            v.set_mp_state(K.MpState.RUNNABLE)  # secondaries would wait for INIT/SIPI
            v.load_cpu_state(real_mode_state(cs_base=0, rip=0x1000))

        seen: dict[int, list[int]] = {}
        errors: dict[int, str] = {}

        def worker(v: K.Vcpu) -> None:
            values: list[int] = []
            try:
                while True:
                    reason = v.run()
                    if reason != K.KvmExit.IO:
                        errors[v.apic_id] = f"exit {reason!r} after {len(values)} values"
                        return
                    io = v.io_exit()
                    port, data = io.port, bytes(io.data)
                    del io
                    if port == DONE_PORT:
                        return
                    values.append(struct.unpack("<I", data)[0])
            finally:
                seen[v.apic_id] = values

        stuck = run_vcpu_threads(vcpus, worker, 60)
        assert not stuck, f"vCPUs {stuck} did not finish"
        assert not errors, errors
        mem.close()

    overridden = []
    for c, apic in enumerate(lay.apic_ids):
        got = {q: tuple(seen[apic][4 * i:4 * i + 4]) for i, q in enumerate(queries)}
        want = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in planned[c]}
        for leaf, sub, reg, mask in checks:
            w = want.get((leaf, sub), (0, 0, 0, 0))[reg] & mask
            g = got[(leaf, sub)][reg] & mask
            if w != g:
                s = stored[c].get((leaf, sub), (0, 0, 0, 0))[reg] & mask
                overridden.append(f"vCPU {c} (APIC {apic}) leaf {leaf:#x}.{sub} {REG_NAMES[reg]}"
                                  f" & {mask:#x}: planned {w:#x}, KVM_GET_CPUID2 {s:#x},"
                                  f" guest saw {g:#x}")
    if overridden:
        request.node.add_marker(pytest.mark.xfail(
            reason="host KVM overrides CPUID topology: " + "; ".join(overridden[:6]), strict=True))
    assert not overridden, overridden
    # What the guest saw, fed to the Linux model, gives the domains.
    views = []
    for c, apic in enumerate(lay.apic_ids):
        got = {q: tuple(seen[apic][4 * i:4 * i + 4]) for i, q in enumerate(queries)}
        entries = [KvmCpuidEntry2(function=f, index=i, flags=INDEXED, eax=r[0], ebx=r[1], ecx=r[2],
                                  edx=r[3]) for (f, i), r in got.items()]
        # The leaves the guest did not report (vendor, family, max extended leaf) as planned.
        entries += [e for e in planned[c] if (e.function, e.index) not in got]
        views.append(linux_view(entries, apic))
    assert_linux_matches(views, lay)
    # Subleaf 1 of leaf 0xB: x2APIC id and package shift as planned.
    for c, apic in enumerate(lay.apic_ids):
        got = {q: tuple(seen[apic][4 * i:4 * i + 4]) for i, q in enumerate(queries)}
        assert got[(0xB, 1)][3] == apic and got[(0xB, 1)][0] == lay.core_bits
        assert got[(1, 0)][1] >> 24 == apic & 0xFF
