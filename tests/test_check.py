"""`numavm check` and `numavm run` end to end: a real Linux guest reads our tables.

Userspace stage under the TCG engine (QEMU on numavm's memory and tables)
for the machines the issues name; kernel stage on real KVM for the same
machines, where KVM works; the two engines must report the same topology.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest


from kvmtest import needs_apt, needs_kvm_engine, needs_qemu  # noqa: E402


MACHINES = {
    "example": [],
    "crossing-3G": ["-n", "id=0,size=2G,cpus=0", "-n", "id=1,size=3G,cpus=1"],
    "memory-only+memoryless": ["-n", "id=0,size=256M", "-n", "id=1,size=0,cpus=0-1",
                               "-n", "id=2,size=256M,cpus=2", "--distance", "0:1=15", "--distance", "1:0=25"],
    "64-domains": ["-c", "64", *[a for i in range(64) for a in ("-n", f"id={i},size=32M,cpus={i}")]],
}


def uneven(shape: str, size: str = "64M") -> list[str]:
    """Domains holding the vCPU counts of `shape` ("1+0+3": a memory-only one in the middle)."""
    counts = [int(n) for n in shape.split("+")]
    args, first = ["-c", str(sum(counts))], 0
    for i, n in enumerate(counts):
        args += ["-n", f"id={i},size={size}" + (f",cpus={first}-{first + n - 1}" if n else "")]
        first += n
    return args


# Domains with different vCPU counts, in every order: wherever a package is not full the APIC
# ids have holes, which QEMU cannot make with -smp alone (tcg_topology adds -device vCPUs).
UNEVEN = ["1+2", "2+1", "1+1+2", "1+2+1", "2+1+1", "2+3", "3+2", "3+0+3", "1+3", "3+1"]


def numavm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "numavm", *args], capture_output=True, text=True,
                          timeout=timeout)


def check(engine: str, stage: str, machine: list[str]) -> dict:
    r = numavm("check", "--accel", engine, "--stage", stage, "--json", *machine)
    assert r.stdout, r.stderr
    doc = json.loads(r.stdout)
    assert r.returncode == (0 if doc["match"] else 1)
    assert doc["match"], "\n".join(doc["mismatches"]) + "\n" + r.stderr[-2000:]
    return doc


@needs_qemu
@needs_apt
@pytest.mark.parametrize("name", sorted(MACHINES))
def test_userspace_stage_under_tcg(name: str) -> None:
    doc = check("tcg", "userspace", MACHINES[name])
    assert doc["stage"] == "userspace" and doc["engine"] == "tcg"
    nodes = doc["observed"]["userspace"]["nodes"]
    assert len(nodes) == len(doc["expected"]["domains"])


@needs_qemu
@needs_apt
@pytest.mark.parametrize("shape", UNEVEN)
def test_uneven_domains_boot_under_tcg(shape: str) -> None:
    """Each vCPU in its domain, every domain seen, and the guest reached userspace in time.

    Before tcg_topology padded QEMU's possible CPUs past 8, a package after the boot vCPU's
    holding two or more -device vCPUs stalled the guest (lost logical-mode IPIs) until timeout.
    """
    r = numavm("check", "--accel", "tcg", "--stage", "userspace", "--json", "--timeout", "240",
               "--verbose", *uneven(shape))
    assert r.stdout, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["match"], "\n".join(doc["mismatches"]) + "\n" + r.stderr[-3000:]
    assert r.returncode == 0 and doc["engine"] == "tcg"
    assert "soft lockup" not in r.stderr and "self-detected stall" not in r.stderr
    ids = sorted(a for d in doc["expected"]["domains"] for a in d["apic_ids"])
    qemu = next(line for line in r.stderr.splitlines() if line.startswith("qemu: "))
    assert ("-device" in qemu) == (ids != list(range(len(ids))))  # only 2+1 has no hole


@needs_qemu
@needs_kvm_engine
@needs_apt
@pytest.mark.kvm_boot
@pytest.mark.parametrize("name", ["example", "crossing-3G", "1+0+2"])
def test_both_engines_see_the_same_topology(name: str) -> None:
    """Kernel stage on KVM and on TCG: the same node numbering, ranges, APIC map, zonelists.
    1+0+2: uneven domains (holes in the APIC ids) around a memory-only one."""
    docs = {}
    machine = MACHINES[name] if name in MACHINES else uneven(name)

    def run(engine: str) -> None:
        docs[engine] = check(engine, "kernel", machine)

    t = threading.Thread(target=run, args=("kvm",))  # the KVM boot is the slow one here
    t.start()
    run("tcg")
    t.join()
    assert "kvm" in docs, "the KVM engine's check failed (see above)"
    facts = ("pxm_to_node", "apic_to_node", "srat_ranges", "fallback", "zonelists")
    kvm, tcg = docs["kvm"]["observed"]["kernel"], docs["tcg"]["observed"]["kernel"]
    assert {k: kvm[k] for k in facts} == {k: tcg[k] for k in facts}
    assert not kvm["warnings"] and not tcg["warnings"]


@needs_qemu
@needs_apt
def test_check_reports_a_mismatch_with_exit_1(tmp_path) -> None:
    """A guest handed another machine's SRAT must fail the check, naming what differs."""
    r = numavm("check", "--accel", "tcg", "--json", "--initrd", "/dev/null", "--timeout", "60")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and not doc["match"]
    assert any("topology report" in m or "boot" in m for m in doc["mismatches"])


@needs_qemu
@needs_apt
def test_run_returns_the_guest_commands_status() -> None:
    r = numavm("run", "--accel", "tcg", "--", "sh", "-c", "grep -c . /sys/devices/system/node/online; exit 7")
    assert r.returncode == 7, r.stderr[-2000:]
    assert "engine tcg" in r.stderr


@needs_qemu
@needs_apt
def test_run_timeout_has_its_own_exit_code() -> None:
    r = numavm("run", "--accel", "tcg", "--timeout", "0.5", "--", "sleep", "30")
    assert r.returncode == 73, r.stderr[-2000:]
    assert "timeout" in r.stderr


def test_bad_input_is_refused_before_anything_runs() -> None:
    r = numavm("check", "--accel", "warp")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--accel" in r.stderr
    r = numavm("run", "--timeout", "-1")
    assert r.returncode == 2 and "--timeout" in r.stderr
    r = numavm("check", "-n", "id=0,size=3M,cpus=0")
    assert r.returncode == 2 and "size" in r.stderr


@needs_qemu
@needs_apt
def test_kernel_stage_under_tcg_stops_at_the_zonelists() -> None:
    """TCG: the watch stops the guest at "Built N zonelists", not after SMP bring-up."""
    r = numavm("check", "--accel", "tcg", "--stage", "kernel", "--json", "--verbose")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["match"], doc["mismatches"]
    assert doc["boot"].startswith("stopped") and doc["observed"]["kernel"]["zonelists"] == 3
    assert "smp: Brought up" not in r.stderr


def test_kernel_stage_watch_finds_a_marker_split_across_chunks() -> None:
    from numavm.guest.launch import KernelStageWatch
    from numavm.vmm.run import Outcome

    stops = []
    w = KernelStageWatch(until_smp=False)
    w.stop = lambda outcome, detail: stops.append(outcome)
    for chunk in ["Fallback order for Node 0: 0 \n", "Bui", "lt 3 zone", "lists, mobility"]:
        w(chunk)
    assert stops == [Outcome.STOPPED]
    w("more")
    assert stops == [Outcome.STOPPED]  # once
    stops.clear()
    w = KernelStageWatch(until_smp=True)
    w.stop = lambda outcome, detail: stops.append(outcome)
    w("Built 3 zonelists\n")
    assert not stops
    w("smp: Brought up 3 nodes, 4 CPUs\n")
    assert stops == [Outcome.STOPPED]


def test_tcg_cpu_check_wants_the_plans_apic_ids_one_socket_per_domain() -> None:
    from numavm.spec import config
    from numavm.plan.layout import plan_layout
    from numavm.vmm.tcg import check_cpus

    layout = plan_layout(config.example().build(host_nodes=(0,)))  # apic 0-1 domain 0, 2-3 domain 1
    good = [({"socket-id": a >> 1, "core-id": a & 1}, a) for a in range(4)]
    assert check_cpus(layout, good) is None
    assert "APIC ids" in check_cpus(layout, good[:3])
    mixed = [({"socket-id": 0 if a < 3 else 1}, a) for a in range(4)]  # socket 0 spans two domains
    assert "socket 0" in check_cpus(layout, mixed)


def test_a_machine_whose_numa_lines_outgrow_the_log_ring_gets_a_larger_one() -> None:
    """256 domains x 1,024 vCPUs lost the fallback orders of nodes 0-120 ("** 121 printk
    messages dropped **") to the default 128 KiB ring; small machines keep their command line."""
    from numavm.guest.launch import LOG_BUF_DEFAULT, kernel_cmdline
    from numavm.spec.topology import MachineSpec, parse_numa

    small = MachineSpec(domains=[parse_numa("id=0,size=1G,cpus=0-1"), parse_numa("id=1,size=1G,cpus=2-3")]).build()
    assert kernel_cmdline("kernel", False, topology=small) == kernel_cmdline("kernel", False)
    big = MachineSpec(domains=[parse_numa(f"id={i},size=16M,cpus={4 * i}-{4 * i + 3}") for i in range(256)]).build()
    line = kernel_cmdline("kernel", True, "quiet", big)
    size = int(line.split("log_buf_len=")[1].split()[0])
    # a power of two holding 256 fallback lines of 256 node numbers each, twice, beside the default ring
    assert size & (size - 1) == 0 and size >= 2 * 256 * 256 * 4 + LOG_BUF_DEFAULT
    assert line.endswith(" quiet") and line.count("log_buf_len=") == 1
    mine = kernel_cmdline("kernel", True, "log_buf_len=4M", big)  # the user's value wins
    assert mine.count("log_buf_len=") == 1 and mine.endswith("log_buf_len=4M")


def test_userspace_cmdline_is_quiet_and_tcg_presets_lpj() -> None:
    from numavm.guest.launch import kernel_cmdline, tcg_cmdline

    line = kernel_cmdline("userspace", False)
    assert "loglevel=5" in line and "earlyprintk" in line
    assert "ignore_loglevel" in kernel_cmdline("kernel", False)
    tcg = tcg_cmdline(line + " lpj=123")
    assert tcg.startswith(line + " lpj=123") and tcg.count("lpj=") == 1  # the user's value stays
    assert "tsc=reliable" in tcg and "maxcpus=" not in tcg  # another init would keep one CPU
    assert tcg_cmdline(line + " tsc=unstable").count("tsc=") == 1


def test_tcg_boots_one_cpu_and_init_brings_the_rest_online() -> None:
    """numavm's /init onlines the CPUs that maxcpus=1 left offline, only when the line says so."""
    from numavm.guest.launch import TCG_ONLINE_FROM_INIT, tcg_cmdline
    from numavm.guest.initramfs import INIT_SCRIPT, ONLINE_CPUS_MARK

    many = TCG_ONLINE_FROM_INIT
    own = tcg_cmdline("console=ttyS0", many, own_init=True).split()
    assert "maxcpus=1" in own and ONLINE_CPUS_MARK in own
    assert "maxcpus=1" not in tcg_cmdline("console=ttyS0", many - 1, own_init=True)  # few CPUs: all at boot
    assert f'*" {ONLINE_CPUS_MARK} "*)' in INIT_SCRIPT and "/online" in INIT_SCRIPT
    # before the report reads sysfs and dmesg
    assert INIT_SCRIPT.index(ONLINE_CPUS_MARK) < INIT_SCRIPT.index("/sys/devices/system/node/node[0-9]*")
    for user in ("maxcpus=2", "nr_cpus=4"):  # the user's limit stays, and nothing is onlined
        line = tcg_cmdline(f"console=ttyS0 {user}", many, own_init=True)
        assert "maxcpus=1" not in line and ONLINE_CPUS_MARK not in line


@needs_qemu
@needs_apt
def test_prefault_chosen_domain_and_the_placement_audit() -> None:
    """--prefault 0 populates domain 0 under its policy; the audit printed after the run shows it."""
    r = numavm("run", "--accel", "tcg", "--prefault", "0",
               "-n", "id=0,size=64M,cpus=0,domain_policy=bind:0", "-n", "id=1,size=64M,cpus=1", "--", "true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prefaulted domain 0: 64 MiB" in r.stderr and "prefaulted domain 1" not in r.stderr
    audit = r.stderr[r.stderr.index("guest memory placement"):]
    d0 = audit[audit.index("domain 0:"):audit.index("domain 1:")]
    assert "policy bind:0, kernel reports bind:0 (get_mempolicy) and bind:0 (numa_maps)" in d0
    assert "N0 64.0 MiB" in d0  # every page of the prefaulted domain, on the bound node
    # domain 1 was not prefaulted: the audit still sees the pages QEMU's guest used there
    d1 = audit[audit.index("domain 1:"):]
    used = re.search(r"resident ([\d.]+) MiB, N0 ([\d.]+) MiB", d1)
    assert used and 0 < float(used.group(1)) == float(used.group(2)) <= 64


@needs_kvm_engine
@needs_apt
@pytest.mark.kvm_boot
def test_interleaved_vcpus_fall_back_to_kvm_and_match() -> None:
    """QEMU cannot number interleaved vCPUs, so auto picks KVM; with 64 MiB domains the kernel
    image straddles domain 0 and domain 1, which the loader must write across segments."""
    r = numavm("check", "--json", "-n", "id=0,size=64M,cpus=0+2", "-n", "id=1,size=64M,cpus=1+3")
    doc = json.loads(r.stdout)
    assert doc["engine"] == "kvm" and "TCG cannot run this layout" in r.stderr
    assert doc["match"], "\n".join(doc["mismatches"])
    if doc["observed"]["kernel"]["version"] < [6, 12]:  # 6.12+ does not log it (see linux_numa)
        assert doc["observed"]["kernel"]["apic_to_node"] == {"0": 0, "1": 0, "2": 1, "3": 1}  # vCPUs 0+2: package 0
    else:
        assert doc["stage"] == "kernel" and any(n.startswith("APIC->node") for n in doc["notes"])


@needs_kvm_engine
@needs_apt
@pytest.mark.kvm_boot
def test_apic_id_256_on_the_kvm_engine() -> None:
    """128, 1 and 1 vCPUs: vCPU 129's APIC id is 256.  TCG refuses it (x2APIC), auto says so and
    runs KVM, where the guest keeps every SRAT processor entry (x2APIC mode, KVM's extended
    destination ids): 294.6 s by hand and 171.48 s in the suite on this emulating host."""
    r = numavm("check", "--json", "--timeout", "1500", "-n", "id=0,size=256M,cpus=0-127",
               "-n", "id=1,size=128M,cpus=128", "-n", "id=2,size=128M,cpus=129", timeout=1800)
    doc = json.loads(r.stdout)
    assert doc["engine"] == "kvm" and "APIC id 256 (vCPU 129) passes 254" in r.stderr, r.stderr
    assert doc["match"], "\n".join(doc["mismatches"])
    assert "ignored" not in json.dumps(doc["observed"])
    if doc["observed"]["kernel"]["version"] < [6, 12]:  # 6.12+ does not log it (see linux_numa)
        seen = doc["observed"]["kernel"]["apic_to_node"]
        assert len(seen) == 130 and seen["256"] == 2 and seen["128"] == 1 and seen["127"] == 0


@needs_qemu
@needs_apt
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_to_run_kills_qemu_and_cleans_up(sig: str, tmp_path) -> None:
    """numavm run under TCG: a signal ends QEMU too, with exit 130 and no temp dir left."""
    import signal
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "numavm", "run", "--accel", "tcg", "--",
                          "sh", "-c", "echo started; sleep 60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        out = ""
        while "started" not in out and time.monotonic() < deadline:
            line = p.stdout.readline() if p.stdout else ""
            if not line:
                break
            out += line
        assert "started" in out, "the guest did not reach its command"
        qemu = [d for d in os.listdir("/proc") if d.isdigit() and _parent(int(d)) == p.pid]
        assert qemu, "QEMU runs as numavm's child"
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err[-2000:]
    assert all(not os.path.exists(f"/proc/{q}") or _parent(int(q)) != p.pid for q in qemu)
    assert not list(tmp_path.iterdir()), "numavm left files in TMPDIR"


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_tcg_refuses_what_qemu_cannot_run_as_planned() -> None:
    """Before anything runs: a 256-domain SLIT is past -acpitable's limit; >255 vCPUs past pc's."""
    from numavm.errors import ConfigError
    from numavm.plan.layout import plan_layout
    from numavm.vmm.tcg import check_tcg
    from numavm.spec.topology import MachineSpec, parse_numa

    big = MachineSpec(domains=[parse_numa(f"id={i},size=4M" + (",cpus=0" if i == 0 else ""))
                               for i in range(256)]).build(host_nodes=(0,))
    with pytest.raises(ConfigError, match="SLIT is 65580"):
        check_tcg(plan_layout(big))
    wide = MachineSpec(cpus=256, domains=[parse_numa("id=0,size=64M,cpus=0-255")]).build(host_nodes=(0,))
    with pytest.raises(ConfigError, match="at most 255 vCPUs"):
        check_tcg(plan_layout(wide))
    ok = MachineSpec(domains=[parse_numa(f"id={i},size=4M,cpus={i}") for i in range(255)]).build(host_nodes=(0,))
    assert check_tcg(plan_layout(ok))[0] == ["255,sockets=255,cores=1,threads=1,maxcpus=255"]


def test_fallback_model_matches_what_linux_printed() -> None:
    """Zonelist orders Linux 6.1 printed: the 3-node reference boot (shared/reference) and a
    256-node boot on this host's KVM (4 domains with vCPUs, equal distances), where ties go by
    node id because no CPU is in its node's mask yet when the zonelists are built."""
    from numavm.spec.config import example
    from numavm.plan.layout import plan_layout
    from numavm.check.linux_numa import expected_view
    from numavm.spec.topology import MachineSpec, parse_numa

    assert expected_view(plan_layout(example().build(host_nodes=(0,)))).fallback == {
        0: [0, 1, 2], 1: [1, 2, 0], 2: [2, 1, 0]}
    big = MachineSpec(domains=[parse_numa(f"id={i},size=16M" + (f",cpus={i}" if i < 4 else ""))
                               for i in range(256)]).build(host_nodes=(0,))
    fb = expected_view(plan_layout(big)).fallback
    assert fb[254] == [254, 255, *range(254)]
    assert fb[255] == [255, *range(255)]


def test_each_kernel_versions_log_is_read_as_that_version_writes_it() -> None:
    """Linux 6.12 logs no SRAT processor entries and leaves a memoryless node out of its own
    zonelist (both measured on Debian's 6.1 and 6.12 under TCG): the kernel stage expects each
    version's wording, notes what 6.12 cannot show, and still fails a 6.1 log that lacks it."""
    from numavm.plan.layout import plan_layout
    from numavm.check.linux_numa import compare_kernel, expected_view, parse_kernel_log, unlogged
    from numavm.spec.topology import MachineSpec, parse_distance, parse_numa

    spec = MachineSpec(domains=[parse_numa(t) for t in MACHINES["memory-only+memoryless"][1::2]
                                if t.startswith("id=")],
                       distances=[parse_distance("0:1=15"), parse_distance("1:0=25")])
    layout = plan_layout(spec.build(host_nodes=(0,)))
    # what each kernel printed for this machine (node 0 is the memoryless CPU domain 1)
    assert expected_view(layout, (6, 1)).fallback == {0: [0, 1, 2], 1: [1, 2], 2: [2, 1]}
    assert expected_view(layout, (6, 12)).fallback == {0: [1, 2], 1: [1, 2], 2: [2, 1]}

    def log(version: str, cpus: bool) -> str:
        exp = expected_view(layout, tuple(int(x) for x in version.split(".")[:2]))  # type: ignore[arg-type]
        lines = [f"[    0.000000] Linux version {version}-amd64 (debian-kernel@lists.debian.org)"]
        node_to_pxm = {n: p for p, n in exp.pxm_to_node.items()}
        if cpus:
            lines += [f"[    0.0] SRAT: PXM {node_to_pxm[n]} -> APIC 0x{a:02x} -> Node {n}"
                      for a, n in exp.apic_to_node.items()]
        for n, ranges in exp.srat_ranges.items():
            for s, e in ranges:
                lines.append(f"[    0.0] ACPI: SRAT: Node {n} PXM {node_to_pxm[n]} [mem {s:#010x}-{e - 1:#010x}]")
                lines.append(f"[    0.0] Initmem setup node {n} [mem {s:#018x}-{e - 1:#018x}]")
        lines += [f"[    0.0] Fallback order for Node {n}: {' '.join(map(str, o))} " for n, o in exp.fallback.items()]
        lines.append(f"[    0.0] Built {len(exp.fallback)} zonelists, mobility grouping on.  Total pages: 1")
        return "\n".join(lines)

    for version, cpus in (("6.1.0", True), ("6.12.118", False)):
        seen = parse_kernel_log(log(version, cpus))
        exp = expected_view(layout, seen.version)
        assert compare_kernel(exp, seen) == [], version
        assert bool(unlogged(exp, seen)) == (not cpus)
    # a 6.1 log without them is a mismatch, not a kernel that does not print them
    seen = parse_kernel_log(log("6.1.0", False))
    assert any(m.startswith("APIC->node") for m in compare_kernel(expected_view(layout, seen.version), seen))
    # and 6.1's zonelists are not 6.12's
    seen = parse_kernel_log(log("6.1.0", True).replace("Linux version 6.1.0", "Linux version 6.12.0"))
    assert any("fallback order" in m for m in compare_kernel(expected_view(layout, seen.version), seen))


@needs_qemu
@needs_apt
@pytest.mark.parametrize("stage", ["kernel", "userspace"])
def test_the_other_debian_releases_kernel_gets_the_same_verdict(stage: str) -> None:
    """`--release` boots the other Debian release's kernel (6.12 on Debian 12, 6.1 on 13) on
    the machine with a memory-only and a memoryless domain: it must match as this host's does."""
    from numavm.guest.aptrelease import host_release

    other = {"bookworm": "trixie", "trixie": "bookworm"}.get(host_release() or "")
    if other is None:
        pytest.skip("the host is neither Debian 12 nor 13")
    r = numavm("check", "--release", other, "--accel", "tcg", "--stage", stage, "--json",
               *MACHINES["memory-only+memoryless"])
    if not r.stdout and "apt" in r.stderr:
        pytest.skip(f"cannot fetch {other}'s kernel: {r.stderr.strip()[-300:]}")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["match"], doc["mismatches"]
    version = doc["observed"]["kernel"]["version"]
    assert version[:1] == [6] and (version[1] >= 12) == (other == "trixie")
    assert bool(doc["notes"]) == (stage == "kernel" and other == "trixie")
    if stage == "userspace":  # the APIC -> node map, from sysfs and /proc/cpuinfo on either kernel
        assert doc["observed"]["userspace"]["apic_to_node"] == {"0": 0, "1": 0, "2": 1}


def _qemu_apic_ids(smp: list[str], devices: list[str]) -> tuple[list[int], dict[int, int], int]:
    """What QEMU makes of tcg_topology's options: present APIC ids (in QEMU's order), each id's
    socket, and the possible CPUs (QEMU's topology.h: id = socket << ceil(log2(cores)) | core)."""
    (value,) = smp
    first, *rest = value.split(",")
    opts = {k: int(v) for k, v in (o.split("=") for o in rest)}
    cores, bits = opts["cores"], (opts["cores"] - 1).bit_length()
    assert opts["threads"] == 1 and opts["sockets"] * cores == opts["maxcpus"]
    slots = [(s, c) for s in range(opts["sockets"]) for c in range(cores)]
    placed = slots[:int(first)]  # -smp N: the first N slots, socket-major
    for dev in devices:
        props = dict(p.split("=") for p in dev.split(",")[1:])
        assert dev.startswith("qemu64-x86_64-cpu,") and props["thread-id"] == "0"
        placed.append((int(props["socket-id"]), int(props["core-id"])))
    assert len(set(placed)) == len(placed) and all(c < cores for _, c in placed)
    ids = [s << bits | c for s, c in placed]
    return ids, {s << bits | c: s for s, c in placed}, opts["maxcpus"]


@pytest.mark.parametrize("shape", UNEVEN + ["2+2", "3+3", "1+1+1", "4+4", "1+7", "3+1+1", "1+0+1+0+2"])
def test_tcg_topology_gives_the_plans_apic_ids_and_keeps_linux_off_logical_mode(shape: str) -> None:
    """The argv QEMU gets: exactly the plan's APIC ids in vCPU order, one socket per domain, and
    wherever the ids have a hole more than 8 possible CPUs (QEMU 7.2 loses xAPIC logical-mode
    IPIs to ids past a hole; Linux uses that mode only with at most 8 possible CPUs)."""
    from numavm.plan.layout import plan_layout
    from numavm.vmm.tcg import LINUX_FLAT_MAX_CPUS, tcg_topology
    from numavm.spec.topology import MachineSpec, parse_numa

    args = uneven(shape)
    spec = MachineSpec(cpus=int(args[1]), domains=[parse_numa(a) for a in args[3::2]])
    layout = plan_layout(spec.build(host_nodes=(0,)))
    smp, devices = tcg_topology(layout)
    ids, socket_of, possible = _qemu_apic_ids(smp, devices)
    assert ids == list(layout.apic_ids)  # QEMU's CPU order is Linux's CPU numbering
    for d in layout.domains:
        assert len({socket_of[a] for a in d.apic_ids}) <= 1  # a package never spans domains
    holes = ids != list(range(len(ids)))
    assert bool(devices) == holes
    if holes:
        assert possible > LINUX_FLAT_MAX_CPUS
    else:  # nothing added where -smp alone gives the ids
        assert possible == len([d for d in layout.domains if d.apic_ids]) << layout.core_bits


def test_a_console_message_inside_a_log_line_is_taken_out() -> None:
    """CI (Debian 13 guest on L1): a live printk landed inside /init's dmesg copy of the
    Initmem line, so check saw no node 0 setup.  The line is whole again for the parser."""
    from numavm.check.linux_numa import parse_kernel_log
    text = ("numavm-dmesg: [    0.155239] Initmem setup node 0 [mem 0x000000000[   21.202320] hrtimer: "
            "interrupt took 23926354 ns\n0001000-0x000000001fffffff]\n"
            "numavm-dmesg: [    0.157646] Initmem setup node 1 [mem 0x0000000020000000-0x000000003fffffff]\n"
            "[    1.141353] Built 2 zonelists, mobility grouping on.  Total pages: 262046\n")
    v = parse_kernel_log(text)
    assert v.initmem == {0: (0x1000, 0x20000000), 1: (0x20000000, 0x40000000)}
    assert v.zonelists == 2



def test_a_console_message_inside_the_dmesg_prefix_is_taken_out() -> None:
    """CI again (Debian 13 guest on L1): the live printk split /init's "numavm-dmesg: " prefix,
    and taking every message out in one pass also took out the SRAT line it had split."""
    from numavm.check.linux_numa import parse_kernel_log
    text = ("numavm-dmesg: [    0.049663] ACPI: SRAT: Node 0 PXM 0 [mem 0x00000000-0x3fffffff]\n"
            "numavm-dmes[   20.020418] hrtimer: interrupt took 19711881 ns\n"
            "g: [    0.050123] ACPI: SRAT: Node 1 PXM 1 [mem 0x40000000-0x7fffffff]\n"
            "numavm-dmesg: [    0.050180] ACPI: SRAT: Node 2 PXM 2 [mem 0x80000000-0x9fffffff]\n"
            "numavm-dmesg: [    0.088767] Initmem setup node 0 [mem 0x00[   21.1] a\n[   21.2] b\n0001000-0x3fffffff]\n")
    for crlf in (False, True):
        v = parse_kernel_log(text.replace("\n", "\r\n") if crlf else text)
        assert v.pxm_to_node == {0: 0, 1: 1, 2: 2}
        assert v.srat_ranges == {0: [(0, 0x40000000)], 1: [(0x40000000, 0x80000000)], 2: [(0x80000000, 0xa0000000)]}
        assert v.initmem == {0: (0x1000, 0x40000000)}
