"""Host memory for the guest: memfds, one per guest NUMA domain or one for all.

Host memory is a `Memfd`: a memfd mapped once, shared, which owns the fd and
the mapping.  Each domain with memory gets a `Segment`, a window of a memfd
under the domain's host policy.  Per domain (the default) each segment has a
memfd of its own (``numavm:<machine>:domain<ID>``); unified (for QEMU, whose
``pc`` machine takes its RAM from one memory backend) one memfd
(``numavm:<machine>:ram``) holds the domains end to end, in QEMU's RAM offset
order (numavm.vmm.tcg checks it), and each segment is its domain's range of it.
The policy is applied with mbind(2) over the window before any page is touched, then read back with
get_mempolicy(2) at the window's start so what the kernel holds is on record.
A policy on a shared memory object holds for every mapping of it (shmem keeps
it per range of the object), so another process mapping the memfd allocates
under it too.  A policy naming offline host nodes, a mode the kernel lacks,
or huge pages the host has not reserved are refused before anything is
allocated.

By job, one module each: `host` (facts from sysfs and /proc), `checks`
(policies, nodemasks, huge pages and room, before anything is allocated),
`segment` (memfds and the per-domain windows: mbind, prefault), `guestmap`
(guest-physical routes and KVM slots), `audit` (numa_maps, move_pages).
The names below are re-exported here.

`GuestMemory` builds the segments of a `Layout` and routes guest-physical
accesses to them; `regions()` gives KVM its memory slots (a domain split by
the 3-4 GiB hole keeps one segment and gets two slots) and `backing_fds()`
the memfds for another process.  `Segment.prefault` populates pages from
threads pinned to the CPUs of the policy's nodes, and `placement()` /
`audit()` report where the pages really are, from /proc/self/numa_maps (and
move_pages(2) where the kernel merged neighbouring windows into one VMA).

No access loops over pages or bytes in Python: copies are slice assignments
on memoryviews, population is fallocate(2) then madvise(MADV_POPULATE_WRITE)
over large chunks.
"""
from __future__ import annotations

from numavm.host.memory.host import (CGROUP_ROOT, MEMINFO, MODE_SINCE, MOUNTINFO, NODE_DIR, POPULATE_SINCE, PROC_CGROUP,
                                     READBACK_BITS, Room, THP_DIR, _memory_cgroups, hugetlb_page_size, kernel_version, meminfo,
                                     memory_rooms, node_cpus, node_distances, node_free, node_total, policy_cpus)
from numavm.host.memory.checks import (HUGEPAGES, MPOL_F_ADDR, MPOL_F_NODE, MPOL_F_NUMA_BALANCING, MPOL_F_RELATIVE_NODES,
                                       MPOL_F_STATIC_NODES, MPOL_MF_STRICT, MPOL_MODE_FLAGS, check_hugetlb, check_memory,
                                       check_policy, domain_hugepages, nodemask)
from numavm.host.memory.audit import (MAPS, MOVE_PAGES_BATCH, NUMA_MAPS, Placement, pages_per_node, parse_numa_maps_line,
                                      range_placements, read_numa_maps)
from numavm.host.memory.segment import (GuestAddressError, MADV_HUGEPAGE, MADV_POPULATE_READ, MADV_POPULATE_WRITE, MEMFD_NAME_MAX,
                                        Anonymous, MFD_CLOEXEC, MFD_HUGETLB, Memfd, PrefaultResult, ProgressFn, Segment)
from numavm.host.memory.guestmap import BackingFd, GuestMemory, Region
