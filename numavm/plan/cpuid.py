"""Per-vCPU CPUID whose topology matches the guest NUMA domains (pure: no ioctls).

`vcpu_cpuid(supported, layout, cpu)` copies KVM's supported table and rewrites
the topology leaves so that a Linux guest derives exactly the layout's
topology: one package per domain that has vCPUs, one core per vCPU, no SMT
(APIC id = package << core_bits | core, `numavm.plan.layout`), and every cache either
private to a core or shared by exactly one package, hence by one domain.
Linux then never prints "sched: CPU #N's llc-sibling CPU #M is not on the same
node! [node: X != Y]. Ignoring dependency." (smpboot.c match_llc /
topology_sane), which it does when two CPUs with one `cpu_llc_id` sit in two
nodes, as with a QEMU/Cloud Hypervisor guest whose one big package spans nodes.

What Linux 6.1 derives from each leaf (arch/x86/kernel/cpu/{common,intel,amd,
topology,cacheinfo}.c), and what we put there:

leaf 0x0   EAX, the max basic leaf (`cpuid_level`): raised to >= 0xB, since
           Linux reads 0xB (0x1F) only when `cpuid_level` reaches it.
leaf 0x1   EBX[31:24] -> `initial_apicid` (8 bits): the APIC id's low byte.
           EBX[23:16] (addressable ids per package) and EDX.HTT: Linux uses
           them (detect_ht_early) only without a valid leaf 0xB on Intel, and
           not at all on AMD; set to 1 << core_bits (255 at most: 8 bits) and
           HTT = that > 1, as hardware does.  ECX[31] hypervisor: set.  The
           x2APIC bit stays as KVM reports it.
leaf 0xB   detect_extended_topology(): subleaf 0 (SMT) EBX != 0 and type 1
           makes the leaf valid (sets X86_FEATURE_XTOPOLOGY on Intel);
           EDX -> `initial_apicid` and `apicid` (full x2APIC id); subleaf 0
           EBX -> smp_num_siblings (1: no SMT); the shift of the last valid
           level (subleaf 1, core: core_bits) -> phys_proc_id = apicid >>
           core_bits = package index; cpu_core_id = (apicid >> 0) & mask =
           core index; subleaf 1 EBX / smp_num_siblings -> x86_max_cores (the
           vCPUs of this package).  Subleaf 2 has type 0: the end.
leaf 0x1F  The same, when the max basic leaf covers it (Linux prefers it).
leaf 0x4   Intel init_intel_cacheinfo(): for each cache subleaf (until type 0)
           of level 2 and 3, id = apicid & ~(2**get_count_order(EAX[25:14]+1)
           - 1); `cpu_llc_id` = the L3's id (else the L2's).  L1/L2: EAX[25:14]
           = 0 (private per core, we have no SMT), L3 and beyond: (1 <<
           core_bits) - 1, so the L3 id is package << core_bits: one LLC per
           package.  EAX[31:26] = (1 << core_bits) - 1 (63 at most), read
           only by detect_num_cpu_cores() when leaf 0xB is unusable.
0x80000001 ECX: TOPOEXT (bit 22) selects the AMD path below; kept as KVM
           reports it, but set (with 0x8000001D built from the legacy cache
           descriptors 0x80000005/6 and the max extended leaf raised to
           0x8000001E) where APIC ids pass 255 on a host without it.  CmpLegacy (bit 1) is set as HTT is (the AMD meaning of
           HTT: cores, not threads); NodeId MSR (bit 19) is cleared so Linux
           never reads MSR 0xC001100C for a die id.
0x80000008 AMD ECX[7:0] NC = vCPUs in this package - 1 (255 at most) ->
           x86_max_cores; ECX[15:12] ApicIdCoreIdSize = core_bits ->
           x86_coreid_bits (early_init_amd_mc); amd_detect_cmp() then sets
           phys_proc_id = cpu_die_id = cpu_llc_id = initial_apicid >> bits,
           the package index (from the 8-bit leaf 1 id).
0x8000001D AMD cache topology (read when TOPOEXT): same EAX[25:14] rule as
           leaf 4.  cacheinfo_amd_init_llc_id() (family >= 0x17, except 0x17
           models <= 0x1F) sets cpu_llc_id = apicid >> get_count_order(
           EAX[25:14] of the last cache subleaf + 1) = apicid >> core_bits =
           the package index.  The sysfs shared_cpu_map uses the same count.
0x8000001E AMD (when TOPOEXT): EAX = extended APIC id; EBX[7:0] core id (index
           in the package) -> cpu_core_id (family >= 0x17; family 0x15:
           cu_id), EBX[15:8] = 0: one thread per core -> smp_num_siblings = 1;
           ECX[7:0] node id = package index -> cpu_die_id (and, before family
           0x17, cpu_llc_id); ECX[10:8] = 0: one node per package ->
           nodes_per_socket = 1.  amd_get_topology() then runs
           detect_extended_topology() (leaf 0xB, full 32-bit ids) and
           cacheinfo_amd_init_llc_id().
0x80000006 EDX (the legacy L3 descriptor): non-zero makes
           cacheinfo_amd_init_llc_id() run.  Only on family 0x17 models
           <= 0x1F (Zen 1), where Linux hard-codes cpu_llc_id = apicid >> 3,
           and only if core_bits != 3, it is zeroed so that cpu_llc_id keeps
           amd_detect_cmp()'s package index; the caches stay visible through
           0x8000001D.
0x80000026 AMD extended topology (read by newer kernels before 0xB): dropped,
           so they fall back to leaf 0xB.
0x40000000 and the other KVM paravirt leaves: kept as KVM reports them, but
           where an APIC id passes 254 (`Layout.needs_x2apic`), 0x40000001 EAX
           gets KVM_FEATURE_MSI_EXT_DEST_ID (bit 15) and leaf 1 ECX the x2APIC
           bit: Linux then runs x2APIC in physical mode without interrupt
           remapping and brings up ids up to 32767 (try_to_enable_x2apic).

Past 255, Linux's AMD package and LLC come from the 8-bit leaf 1 id
(amd_detect_cmp) unless TOPOEXT sends it to leaf 0xB and 0x8000001E (32-bit
ids) and a legacy L3 descriptor sends its LLC to the node id (family < 0x17)
or to 0x8000001D (later families).  So numavm announces TOPOEXT itself on AMD
hosts without it (older AMD, the nested-SVM harness's qemu64) and refuses
(`CpuidError`) only where no L3 descriptor exists or Zen 1's hard-coded
ApicId >> 3 LLC would merge packages (core_bits < 3), rather than hand the
guest packages merged across nodes.  Intel takes everything from leaf 0xB
and leaf 4 with the 32-bit id.  Hygon CPUs get the AMD leaves, but Linux
hard-codes their socket as ApicId >> 6 and their LLC as ApicId >> 3: right
only when core_bits is 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from numavm.errors import NumavmError
from numavm.vmm.kvm.ioctls import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KvmCpuidEntry2
from numavm.plan.layout import Layout

__all__ = [
    "CpuidError", "VcpuTopology", "vcpu_topology", "vcpu_cpuid",
    "HYPERVISOR_BIT", "HTT_BIT", "X2APIC_BIT", "TOPOEXT_BIT", "CMP_LEGACY_BIT",
    "NODEID_MSR_BIT", "LEAF_TYPE_SMT", "LEAF_TYPE_CORE", "cpu_family_model",
    "KVM_CPUID_FEATURES", "KVM_FEATURE_MSI_EXT_DEST_ID",
    "vendor", "get_count_order",
]

# Leaf 1.
HTT_BIT = 1 << 28  # EDX
X2APIC_BIT = 1 << 21  # ECX
HYPERVISOR_BIT = 1 << 31  # ECX
# Leaf 0x80000001 ECX.
CMP_LEGACY_BIT = 1 << 1
NODEID_MSR_BIT = 1 << 19
TOPOEXT_BIT = 1 << 22
# KVM's paravirtual features leaf: EAX bit 15, the IOAPIC and MSI destination ids
# past 255 (Linux: kvm_msi_ext_dest_id()).
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_MSI_EXT_DEST_ID = 1 << 15
# Leaf 0xB / 0x1F level types (ECX[15:8]).
LEAF_TYPE_INVALID = 0
LEAF_TYPE_SMT = 1
LEAF_TYPE_CORE = 2

_EXT_TOPOLOGY_LEAVES = (0xB, 0x1F)
_CACHE_SHARING_MASK = 0xFFF << 14  # EAX[25:14] of leaves 4 and 0x8000001D
_CORES_MASK = 0x3F << 26  # EAX[31:26] of leaf 4
_AMD_VENDORS = ("AuthenticAMD", "HygonGenuine")


class CpuidError(NumavmError):
    """The host's CPUID cannot express the layout's topology to a Linux guest."""


@dataclass(frozen=True)
class VcpuTopology:
    """Where one vCPU sits: what the CPUID leaves describe."""

    cpu: int
    apic_id: int
    package: int  # index among domains with vCPUs = apic_id >> core_bits
    core: int  # index within the package = apic_id & ((1 << core_bits) - 1)
    core_bits: int
    package_cpus: int  # vCPUs in this package (this domain)

    @property
    def ids_per_package(self) -> int:
        return 1 << self.core_bits


def vcpu_topology(layout: Layout, cpu: int) -> VcpuTopology:
    if not 0 <= cpu < len(layout.apic_ids):
        raise ValueError(f"vCPU {cpu} outside 0..{len(layout.apic_ids) - 1}")
    apic = layout.apic_ids[cpu]
    bits = layout.core_bits
    for d in layout.domains:
        if cpu in d.domain.cpus:
            return VcpuTopology(cpu=cpu, apic_id=apic, package=apic >> bits,
                                core=apic & ((1 << bits) - 1), core_bits=bits,
                                package_cpus=len(d.domain.cpus))
    raise ValueError(f"vCPU {cpu} is in no domain")


def get_count_order(n: int) -> int:
    """Linux's get_count_order(): log2 rounded up (n >= 1)."""
    return (n - 1).bit_length()


def vendor(entries: Iterable[KvmCpuidEntry2]) -> str:
    """The leaf 0 vendor string ("GenuineIntel", "AuthenticAMD", ...), "" without leaf 0."""
    for e in entries:
        if e.function == 0:
            return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode(
                "latin-1")
    return ""


def cpu_family_model(eax: int) -> tuple[int, int]:
    """Family and model from leaf 1 EAX, as Linux's x86_family()/x86_model() compute them."""
    family = (eax >> 8) & 0xF
    if family == 0xF:
        family += (eax >> 20) & 0xFF
    model = (eax >> 4) & 0xF
    if family >= 6:
        model += ((eax >> 16) & 0xF) << 4
    return family, model


def _copy(e: KvmCpuidEntry2) -> KvmCpuidEntry2:
    return KvmCpuidEntry2.from_buffer_copy(e)


def _entry(function: int, index: int = 0, *, indexed: bool, eax: int = 0, ebx: int = 0,
           ecx: int = 0, edx: int = 0) -> KvmCpuidEntry2:
    return KvmCpuidEntry2(function=function, index=index,
                          flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX if indexed else 0,
                          eax=eax & 0xFFFFFFFF, ebx=ebx & 0xFFFFFFFF,
                          ecx=ecx & 0xFFFFFFFF, edx=edx & 0xFFFFFFFF)


def _find(entries: list[KvmCpuidEntry2], function: int, index: int = 0) -> KvmCpuidEntry2 | None:
    for e in entries:
        if e.function == function and (
                e.index == index or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return e
    return None


def _cache_sharing(eax: int, topo: VcpuTopology) -> int:
    """EAX with [25:14] = sharing threads - 1: a core's own below L3, the package's from L3."""
    level = (eax >> 5) & 0x7
    sharing = topo.ids_per_package if level >= 3 else 1
    return (eax & ~_CACHE_SHARING_MASK) | (sharing - 1) << 14


def _ext_topology(function: int, topo: VcpuTopology) -> list[KvmCpuidEntry2]:
    x2apic = topo.apic_id
    return [
        _entry(function, 0, indexed=True, eax=0, ebx=1,
               ecx=0 | LEAF_TYPE_SMT << 8, edx=x2apic),
        _entry(function, 1, indexed=True, eax=topo.core_bits, ebx=topo.package_cpus,
               ecx=1 | LEAF_TYPE_CORE << 8, edx=x2apic),
        _entry(function, 2, indexed=True, eax=0, ebx=0,
               ecx=2 | LEAF_TYPE_INVALID << 8, edx=x2apic),
    ]


def vcpu_cpuid(supported: Sequence[KvmCpuidEntry2], layout: Layout,
               cpu: int) -> list[KvmCpuidEntry2]:
    """vCPU `cpu`'s CPUID table: `supported` (copied, never changed) with its topology leaves.

    Raises CpuidError when the host's CPUID leaves Linux no way to see the
    layout's packages (AMD APIC ids above 255 where Linux reads the 8-bit id).
    """
    topo = vcpu_topology(layout, cpu)
    max_apic = max(layout.apic_ids)
    out = [_copy(e) for e in supported
           if e.function not in _EXT_TOPOLOGY_LEAVES and e.function != 0x80000026]

    leaf0 = _find(out, 0)
    if leaf0 is None:
        raise CpuidError("the supported CPUID has no leaf 0")
    leaf0.eax = max(leaf0.eax, 0xB)
    is_amd = vendor(out) in _AMD_VENDORS

    ids = min(topo.ids_per_package, 0xFF)
    leaf1 = _find(out, 1)
    if leaf1 is None:
        leaf1 = _entry(1, indexed=False)
        out.append(leaf1)
    leaf1.ebx = (topo.apic_id & 0xFF) << 24 | ids << 16 | (leaf1.ebx & 0xFFFF)
    leaf1.ecx |= HYPERVISOR_BIT
    leaf1.edx = leaf1.edx | HTT_BIT if ids > 1 else leaf1.edx & ~HTT_BIT
    family, model = cpu_family_model(leaf1.eax)

    for function in _EXT_TOPOLOGY_LEAVES:
        if function <= leaf0.eax:
            out.extend(_ext_topology(function, topo))

    cores_minus_1 = min(topo.ids_per_package - 1, 0x3F)
    for e in out:
        if e.function == 4 and e.eax & 0x1F:  # a cache subleaf (type != 0)
            e.eax = (_cache_sharing(e.eax, topo) & ~_CORES_MASK) | cores_minus_1 << 26
        elif e.function == 0x8000001D and e.eax & 0x1F:
            e.eax = _cache_sharing(e.eax, topo)

    if layout.needs_x2apic:
        _x2apic_leaves(out, leaf1)

    ext0 = _find(out, 0x80000000)
    max_ext = ext0.eax if ext0 is not None else 0
    ext1 = _find(out, 0x80000001)
    topoext = ext1 is not None and bool(ext1.ecx & TOPOEXT_BIT)
    if is_amd and not topoext and max_apic > 0xFF and ext0 is not None and ext1 is not None:
        # Linux's AMD path reads 32-bit ids (leaf 0xB, 0x8000001E) only with TOPOEXT:
        # announce it and describe the caches in 0x8000001D ourselves.
        ext1.ecx |= TOPOEXT_BIT
        topoext = True
        if not any(e.function == 0x8000001D for e in out):
            out.extend(_amd_cache_leaves(out, topo))
        ext0.eax = max_ext = max(max_ext, 0x8000001E)
    if is_amd and ext1 is not None:
        ext1.ecx = ext1.ecx | CMP_LEGACY_BIT if ids > 1 else ext1.ecx & ~CMP_LEGACY_BIT
        ext1.ecx &= ~NODEID_MSR_BIT
    e8 = _find(out, 0x80000008) if max_ext >= 0x80000008 else None
    if is_amd and e8 is not None:  # (EAX, the address sizes, must come from KVM)
        nc = min(topo.package_cpus - 1, 0xFF)
        e8.ecx = (e8.ecx & ~0xF0FF) | topo.core_bits << 12 | nc
    if max_ext >= 0x8000001E:
        out = [e for e in out if e.function != 0x8000001E]
        out.append(_entry(0x8000001E, indexed=False, eax=topo.apic_id,
                          ebx=topo.core & 0xFF, ecx=topo.package & 0xFF))  # 1 thread/core, 1 node/package

    if is_amd:
        _amd_llc(out, topo, max_apic, topoext=topoext, family=family, model=model,
                 has_e6=max_ext >= 0x80000006)
    return out


def _x2apic_leaves(out: list[KvmCpuidEntry2], leaf1: KvmCpuidEntry2) -> None:
    """What a Linux guest needs to keep APIC ids past 254 without interrupt remapping.

    x2apic_setup()/try_to_enable_x2apic(): x2APIC mode (the CPUID bit; the vCPU
    starts in it, numavm.vmm.kvm.cpu.x2apic_base), a KVM guest (leaf 0x40000000) so that
    x2APIC without IR is allowed, and KVM_FEATURE_MSI_EXT_DEST_ID (leaf
    0x40000001 EAX bit 15), without which Linux caps the APIC ids it brings
    online at 255 ("x2apic_set_max_apicid(255)").
    """
    leaf1.ecx |= X2APIC_BIT
    features = _find(out, KVM_CPUID_FEATURES)
    if features is None:
        raise CpuidError("APIC ids past 254 need KVM's paravirtual CPUID leaf 0x40000001 "
                         "(KVM_FEATURE_MSI_EXT_DEST_ID), which this host's KVM does not report")
    features.eax |= KVM_FEATURE_MSI_EXT_DEST_ID


# AMD's 4-bit associativity codes (CPUID 0x80000006 ECX/EDX [15:12]), in ways; 0xF: full.
_AMD_ASSOC = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 8: 16, 0xA: 32, 0xB: 48, 0xC: 64, 0xD: 96,
              0xE: 128}


def _amd_cache_leaves(out: list[KvmCpuidEntry2], topo: VcpuTopology) -> list[KvmCpuidEntry2]:
    """CPUID 0x8000001D (leaf 4's format) built from the legacy descriptors in 0x80000005
    (L1d ECX, L1i EDX) and 0x80000006 (L2 ECX, L3 EDX), as Linux's amd_cpuid4() reads
    them; the L3 (and anything past L2) shared by the package, the rest per core."""
    e5, e6 = _find(out, 0x80000005), _find(out, 0x80000006)
    # (type, level, size in bytes, ways or 0 for fully associative, line size, lines per tag)
    caches: list[tuple[int, int, int, int, int, int]] = []
    for reg, type_ in ((e5.ecx if e5 else 0, 1), (e5.edx if e5 else 0, 2)):  # L1d, L1i
        if reg:
            ways = reg >> 16 & 0xFF
            caches.append((type_, 1, (reg >> 24) * 1024, 0 if ways == 0xFF else ways,
                           reg & 0xFF, reg >> 8 & 0xFF))
    if e6 is not None:
        l2, l3 = e6.ecx, e6.edx
        if l2:
            caches.append((3, 2, (l2 >> 16) * 1024, _AMD_ASSOC.get(l2 >> 12 & 0xF, 0),
                           l2 & 0xFF, l2 >> 8 & 0xF))
        if l3:
            caches.append((3, 3, (l3 >> 18) * 512 * 1024, _AMD_ASSOC.get(l3 >> 12 & 0xF, 0),
                           l3 & 0xFF, l3 >> 8 & 0xF))
    leaves = []
    for i, (type_, level, size, ways, line, per_tag) in enumerate(caches):
        line = line or 64
        full = ways == 0
        sets = max(size // (line * (ways or 1)), 1) if not full else 1
        eax = _cache_sharing(type_ | level << 5 | 1 << 8 | (1 << 9 if full else 0), topo)
        ebx = (line - 1) | (max(per_tag, 1) - 1) << 12 | (max(ways if not full else size // line, 1) - 1) << 22
        leaves.append(_entry(0x8000001D, i, indexed=True, eax=eax, ebx=ebx & 0xFFFFFFFF,
                             ecx=sets - 1, edx=0))
    leaves.append(_entry(0x8000001D, len(caches), indexed=True))  # type 0: the end
    return leaves


def _amd_llc(out: list[KvmCpuidEntry2], topo: VcpuTopology, max_apic: int, *, topoext: bool,
             family: int, model: int, has_e6: bool) -> None:
    """Keep Linux's AMD cpu_llc_id on the package, or refuse (see the module docstring).

    cacheinfo_amd_init_llc_id() runs only with TOPOEXT and a non-zero legacy
    L3 descriptor (0x80000006 EDX); otherwise cpu_llc_id stays
    amd_detect_cmp()'s package index, computed from the 8-bit CPUID.1 id.
    """
    e6 = _find(out, 0x80000006) if has_e6 else None
    l3_desc = e6 is not None and e6.edx != 0
    zen1 = family == 0x17 and model <= 0x1F
    if e6 is not None and topoext and l3_desc and zen1 and topo.core_bits != 3 and (
            max_apic <= 0xFF or topo.core_bits < 3):
        # Zen 1: Linux takes cpu_llc_id = apicid >> 3, which would merge
        # packages (core_bits < 3) or split them (> 3).  Hide the descriptor;
        # above 255 ids with core_bits > 3, CCX-sized groups of 8 ids stay
        # inside one package, which is still correct.
        e6.edx = 0
        l3_desc = False
    if (not topoext or not l3_desc) and max_apic > 0xFF:
        why = ("without TOPOEXT" if not topoext
               else f"on family {family:#x} model {model:#x} with {topo.core_bits} core bits"
               if zen1 else "without an L3 descriptor in CPUID 0x80000006")
        raise CpuidError(
            f"APIC id {max_apic} exceeds 255: a Linux guest {why} takes its package and "
            "LLC from the 8-bit CPUID.1 APIC id and would merge packages across NUMA domains")
