"""numavm export: each peer's syntax, parsed back and compared option by option;
the QEMU command line is also started (TCG, paused) and inspected over QMP."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
import xml.etree.ElementTree as ET

import pytest

from numavm.errors import ConfigError
from numavm.peers.export import FORMATS, QEMU_BINARY, Export, export, qemu_args
from numavm.spec.devices import parse_disk
from numavm.spec.policy import Mode, Policy
from numavm.spec.topology import DomainSpec, MachineSpec, Topology, parse_distance, parse_numa
from numavm.spec.units import GiB, MiB

from kvmtest import needs_qemu  # noqa: E402

# ---------------------------------------------------------------- machines


def example() -> Topology:
    """4 vCPUs; 0: 1G vCPUs 0-1 bind:0; 1: 1G vCPUs 2-3; 2: 512M memory-only."""
    return MachineSpec(
        cpus=4,
        domains=[DomainSpec(0, 1 * GiB, (0, 1), Policy(Mode.BIND, (0,))),
                 DomainSpec(1, 1 * GiB, (2, 3)),
                 DomainSpec(2, 512 * MiB)],
        distances=[parse_distance("0:1=20"), parse_distance("0:2=30"), parse_distance("1:2=20")],
    ).build(host_nodes=(0,))


def machine(*numa: str, cpus: int | None = None, memory: int | None = None,
            distances: tuple[str, ...] = (), host_nodes: tuple[int, ...] = (0,)) -> Topology:
    return MachineSpec(cpus=cpus, memory=memory, domains=[parse_numa(n) for n in numa],
                       distances=[parse_distance(d) for d in distances]).build(host_nodes=host_nodes)


def classic() -> Topology:
    return MachineSpec(cpus=2, memory=1 * GiB).build(host_nodes=(0,))


DISKS = ("a.img,domain=1,readonly", "b,,c.img", "gi.img,domain=2,initiator", "d.img,domain=1")


def with_disks(*disks: str, numa: tuple[str, ...] = ("id=0,size=1G,cpus=0-1", "id=1,size=1G,cpus=2-3", "id=2,size=0"),
               cpus: int | None = 4) -> Topology:
    """Disks on domains 0, 1 and 2 (which holds nothing but a generic initiator); default DISKS:
    0 a.img on 1 read-only, 1 "b,c.img" on 0, 2 gi.img the initiator of 2, 3 d.img on 1."""
    return MachineSpec(cpus=cpus, domains=[parse_numa(n) for n in numa],
                       disks=[parse_disk(d) for d in disks or DISKS]).build(host_nodes=(0,))


def argv(e: Export) -> list[str]:
    """The command line as the shell would split it, after checking its layout."""
    lines = e.text.split("\n")
    assert lines[-1] == "" and all(line.endswith(" \\") for line in lines[:-2])
    assert not lines[-2].endswith("\\")
    return shlex.split(e.text.replace("\\\n", " "))


def options(words: list[str]) -> list[tuple[str, str]]:
    """[-opt, value, -opt, value, ...] as pairs."""
    assert len(words) % 2 == 0, words
    pairs = list(zip(words[::2], words[1::2]))
    assert all(o.startswith("-") for o, _ in pairs), pairs
    return pairs


# ---------------------------------------------------------------- QEMU text

EXAMPLE_QEMU = [
    ("-machine", "pc,max-ram-below-4g=3G"),
    ("-smp", "4,sockets=2,cores=2"),
    ("-m", "2560M"),
    ("-object", "memory-backend-ram,id=mem0,size=1G,host-nodes=0,policy=bind"),
    ("-object", "memory-backend-ram,id=mem1,size=1G"),
    ("-object", "memory-backend-ram,id=mem2,size=512M"),
    ("-numa", "node,nodeid=0,cpus=0-1,memdev=mem0"),
    ("-numa", "node,nodeid=1,cpus=2-3,memdev=mem1"),
    ("-numa", "node,nodeid=2,memdev=mem2"),
    ("-numa", "dist,src=0,dst=1,val=20"),
    ("-numa", "dist,src=0,dst=2,val=30"),
    ("-numa", "dist,src=1,dst=2,val=20"),
]


def test_qemu_example_options():
    e = export(example(), "qemu")
    words = argv(e)
    assert words[0] == QEMU_BINARY
    assert options(words[1:]) == EXAMPLE_QEMU
    assert e.warnings == []
    assert qemu_args(example()) == words[1:]
    assert len(e.text.splitlines()) == 1 + len(EXAMPLE_QEMU)  # one option per line


def test_qemu_classic_is_smp_and_m_only():
    e = export(classic(), "qemu")
    assert options(argv(e)[1:]) == [("-machine", "pc,max-ram-below-4g=3G"), ("-smp", "2"), ("-m", "1G")]
    assert e.warnings == []


def test_qemu_non_contiguous_cpus_and_asymmetric_distances():
    t = machine("id=0,size=1G,cpus=0+2", "id=1,size=1G,cpus=1+3", distances=("0:1=20", "1:0=30"))
    warnings: list[str] = []
    got = options(qemu_args(t, warnings))
    assert ("-smp", "4") in got  # no sockets=: they would span domains
    assert ("-numa", "node,nodeid=0,cpus=0,cpus=2,memdev=mem0") in got
    assert ("-numa", "node,nodeid=1,cpus=1,cpus=3,memdev=mem1") in got
    # asymmetric: QEMU needs both directions of every pair
    assert [v for o, v in got if v.startswith("dist")] == ["dist,src=0,dst=1,val=20", "dist,src=1,dst=0,val=30"]
    assert len(warnings) == 1 and "-smp" in warnings[0]


def test_qemu_unequal_domains_get_plain_smp():
    t = machine("id=0,size=64M,cpus=0-2", "id=1,size=64M,cpus=3")
    got = options(qemu_args(t))
    assert ("-smp", "4") in got


def test_qemu_policies_and_host_node_ranges():
    t = machine("id=0,size=64M,cpus=0,policy=bind:0-1+3", "id=1,size=64M,cpus=1,policy=preferred:2",
                "id=2,size=64M,cpus=2,policy=interleave", "id=3,size=64M,cpus=3,policy=local",
                "id=4,size=64M,cpus=4,policy=preferred-many:1+3",
                "id=5,size=64M,cpus=5,policy=weighted-interleave:0-1",
                host_nodes=(0, 1, 2, 3))
    warnings: list[str] = []
    objs = [v for o, v in options(qemu_args(t, warnings)) if o == "-object"]
    assert objs == [
        "memory-backend-ram,id=mem0,size=64M,host-nodes=0-1,host-nodes=3,policy=bind",
        "memory-backend-ram,id=mem1,size=64M,host-nodes=2,policy=preferred",
        "memory-backend-ram,id=mem2,size=64M,host-nodes=0-3,policy=interleave",
        "memory-backend-ram,id=mem3,size=64M",
        "memory-backend-ram,id=mem4,size=64M,host-nodes=1,host-nodes=3,policy=preferred",
        "memory-backend-ram,id=mem5,size=64M,host-nodes=0-1,policy=interleave",
    ]
    assert len(warnings) == 3
    assert warnings[0].startswith("domain 3:") and "no policy local" in warnings[0]
    assert warnings[1].startswith("domain 4:") and "preferred-many" in warnings[1]
    assert warnings[2].startswith("domain 5:") and "weighted-interleave" in warnings[2]


def test_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        export(example(), "vmware")
    msg = str(err.value)
    assert msg.startswith("--to:") and "'vmware'" in msg
    assert all(f in msg for f in FORMATS)


# ---------------------------------------------------------------- QEMU runs



def run_qemu(topo: Topology) -> dict[str, object]:
    """Start QEMU paused with the exported options, ask QMP, quit; return answers by id."""
    args = argv(export(topo, "qemu"))
    assert args[1:] == qemu_args(topo)
    cmd = [*args, "-S", "-display", "none", "-nodefaults", "-monitor", "none", "-serial", "none",
           "-accel", "tcg", "-qmp", "stdio"]
    asks = [{"execute": "qmp_capabilities", "id": "caps"},
            {"execute": "query-status", "id": "status"},
            {"execute": "query-memdev", "id": "memdev"},
            {"execute": "query-cpus-fast", "id": "cpus"},
            {"execute": "human-monitor-command", "arguments": {"command-line": "info numa"}, "id": "numa"},
            {"execute": "quit", "id": "quit"}]
    p = subprocess.run(cmd, input="".join(json.dumps(a) + "\n" for a in asks),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", f"QEMU refused {shlex.join(cmd)}:\n{p.stderr}"
    answers: dict[str, object] = {}
    for line in p.stdout.splitlines():
        msg = json.loads(line)
        if "error" in msg:
            raise AssertionError(f"QMP error: {msg}")
        if "id" in msg:
            answers[msg["id"]] = msg["return"]
    assert set(answers) == {a["id"] for a in asks}
    return answers


def numa_info(text: str) -> dict[int, tuple[tuple[int, ...], int]]:
    """HMP 'info numa' as {node: (cpus, size in MiB)}."""
    cpus = {int(n): tuple(int(c) for c in v.split()) for n, v in re.findall(r"node (\d+) cpus:([ \d]*)", text)}
    sizes = {int(n): int(v) for n, v in re.findall(r"node (\d+) size: (\d+) MB", text)}
    assert int(re.match(r"(\d+) nodes", text).group(1)) == len(cpus) == len(sizes)
    return {n: (cpus[n], sizes[n]) for n in cpus}


def check_qemu_machine(topo: Topology) -> dict[str, object]:
    got = run_qemu(topo)
    assert got["status"]["status"] == "prelaunch"
    memdevs = {m["id"]: m for m in got["memdev"]}
    assert set(memdevs) == {f"mem{d.id}" for d in topo.domains if d.size}
    for d in topo.domains:
        if d.size:
            assert memdevs[f"mem{d.id}"]["size"] == d.size
    assert numa_info(got["numa"]) == {d.id: (d.cpus, d.size // MiB) for d in topo.domains}
    cpus = sorted(got["cpus"], key=lambda c: c["cpu-index"])
    assert [c["props"]["node-id"] for c in cpus] == [topo.domain_of_cpu(i).id for i in range(topo.cpus)]
    return got


@needs_qemu
@pytest.mark.qemu
def test_qemu_runs_example():
    got = check_qemu_machine(example())
    mem0 = next(m for m in got["memdev"] if m["id"] == "mem0")
    assert (mem0["policy"], mem0["host-nodes"]) == ("bind", [0])
    # one socket per domain with vCPUs, as numavm's packages
    assert [c["props"]["socket-id"] for c in sorted(got["cpus"], key=lambda c: c["cpu-index"])] == [0, 0, 1, 1]


@needs_qemu
@pytest.mark.qemu
def test_qemu_runs_memoryless_domain():
    check_qemu_machine(machine("id=0,size=1G,cpus=0", "id=1,size=0,cpus=1"))


@needs_qemu
@pytest.mark.qemu
def test_qemu_runs_domain_crossing_3g():
    got = check_qemu_machine(machine("id=0,size=2G,cpus=0", "id=1,size=3G,cpus=1"))
    assert sum(m["size"] for m in got["memdev"]) == 5 * GiB


@needs_qemu
@pytest.mark.qemu
def test_qemu_runs_policies_on_host_node_0():
    t = machine("id=0,size=64M,cpus=0,policy=bind:0", "id=1,size=64M,cpus=1,policy=preferred:0",
                "id=2,size=64M,cpus=2,policy=interleave:0", "id=3,size=64M,cpus=3,policy=local",
                "id=4,size=64M,cpus=4,policy=preferred-many:0",
                "id=5,size=64M,cpus=5,policy=weighted-interleave:0")
    got = check_qemu_machine(t)
    seen = {m["id"]: (m["policy"], m["host-nodes"]) for m in got["memdev"]}
    assert seen == {"mem0": ("bind", [0]), "mem1": ("preferred", [0]), "mem2": ("interleave", [0]),
                    "mem3": ("default", []), "mem4": ("preferred", [0]), "mem5": ("interleave", [0])}


@needs_qemu
@pytest.mark.qemu
def test_qemu_runs_split_cpus_and_asymmetric_distances():
    check_qemu_machine(machine("id=0,size=64M,cpus=0+2", "id=1,size=64M,cpus=1+3",
                               "id=2,size=64M", distances=("0:1=20", "1:0=30", "0:2=255")))


@needs_qemu
@pytest.mark.qemu
def test_qemu_runs_classic():
    got = run_qemu(classic())
    assert got["status"]["status"] == "prelaunch"
    # plain -m: only the machine's own RAM backend
    assert [(m["id"], m["size"], m["policy"]) for m in got["memdev"]] == [("pc.ram", 1 * GiB, "default")]
    assert len(got["cpus"]) == 2


# ---------------------------------------------------------------- libvirt


def test_libvirt_example_elements():
    e = export(example(), "libvirt")
    assert e.warnings == []
    root = ET.fromstring(e.text)
    assert root.tag == "domain" and root.attrib == {"type": "kvm"}
    assert [c.tag for c in root] == ["name", "memory", "vcpu", "numatune", "os", "features", "cpu"]
    assert root.findtext("name") == "numavm"
    assert (root.find("memory").attrib, root.findtext("memory")) == ({"unit": "KiB"}, str(2560 * 1024))
    assert root.findtext("vcpu") == "4"
    assert [m.attrib for m in root.find("numatune")] == [{"cellid": "0", "mode": "strict", "nodeset": "0"}]
    assert root.find("os/type").attrib == {"arch": "x86_64", "machine": "pc"}
    assert root.find("features/acpi") is not None
    assert root.find("cpu/topology").attrib == {"sockets": "2", "dies": "1", "cores": "2", "threads": "1"}
    cells = root.findall("cpu/numa/cell")
    assert [c.attrib for c in cells] == [
        {"id": "0", "cpus": "0-1", "memory": "1048576", "unit": "KiB"},
        {"id": "1", "cpus": "2-3", "memory": "1048576", "unit": "KiB"},
        {"id": "2", "memory": "524288", "unit": "KiB"},  # memory-only: no cpus
    ]
    matrix = [[int(s.get("value")) for s in c.findall("distances/sibling")] for c in cells]
    assert matrix == [list(r) for r in example().distances]
    assert [[s.get("id") for s in c.findall("distances/sibling")] for c in cells] == [["0", "1", "2"]] * 3


def test_libvirt_classic_has_no_numa():
    root = ET.fromstring(export(classic(), "libvirt").text)
    assert root.find("cpu") is None and root.find("numatune") is None
    assert root.findtext("memory") == str(1024 * 1024) and root.findtext("vcpu") == "2"


def test_libvirt_policies_and_warnings():
    t = machine("id=0,size=64M,cpus=0+2,policy=interleave", "id=1,size=64M,cpus=1,policy=preferred:1",
                "id=2,size=64M,cpus=3,policy=preferred-many:0+2", "id=3,size=64M,cpus=4,policy=local",
                "id=4,size=0,cpus=5", host_nodes=(0, 1, 2))
    e = export(t, "libvirt")
    root = ET.fromstring(e.text)
    assert [m.attrib for m in root.find("numatune")] == [
        {"cellid": "0", "mode": "interleave", "nodeset": "0-2"},
        {"cellid": "1", "mode": "preferred", "nodeset": "1"},
        {"cellid": "2", "mode": "preferred", "nodeset": "0,2"},
    ]
    assert root.find("cpu/numa/cell[@id='0']").get("cpus") == "0,2"
    assert root.find("cpu/topology") is None
    assert root.find("cpu/numa/cell[@id='4']").get("memory") == "0"
    assert len(e.warnings) == 4
    assert e.warnings[0].startswith("domain 2:") and "preferred-many" in e.warnings[0]
    assert e.warnings[1].startswith("domain 3:") and "no policy local" in e.warnings[1]
    assert "own package" in e.warnings[2]
    assert e.warnings[3].startswith("domain 4 is CPU-only")


def test_libvirt_warns_about_max_ram_below_4g():
    e = export(machine("id=0,size=2G,cpus=0", "id=1,size=3G,cpus=1"), "libvirt")
    assert len(e.warnings) == 1 and "max-ram-below-4g" in e.warnings[0]


# ---------------------------------------------------------------- Cloud Hypervisor


def test_cloud_hypervisor_example_options():
    e = export(example(), "cloud-hypervisor")
    assert e.warnings == []
    assert argv(e) == [
        "cloud-hypervisor",
        "--cpus", "boot=4,topology=1:2:1:2",
        "--memory", "size=0",
        "--memory-zone", "id=mem0,size=1G,host_numa_node=0", "id=mem1,size=1G", "id=mem2,size=512M",
        "--numa",
        "guest_numa_id=0,cpus=[0-1],distances=[1@20,2@30],memory_zones=mem0",
        "guest_numa_id=1,cpus=[2-3],distances=[0@20,2@20],memory_zones=mem1",
        "guest_numa_id=2,distances=[0@30,1@20],memory_zones=mem2",
    ]


def test_cloud_hypervisor_classic():
    assert argv(export(classic(), "cloud-hypervisor")) == ["cloud-hypervisor", "--cpus", "boot=2", "--memory", "size=1G"]


def test_cloud_hypervisor_policies_warn():
    t = machine("id=0,size=64M,cpus=0,policy=interleave", "id=1,size=64M,cpus=1,policy=bind:0-1",
                "id=2,size=64M,cpus=2,policy=preferred:1", "id=3,size=0,cpus=3+5",
                "id=4,size=64M,cpus=4,policy=bind:1", host_nodes=(0, 1))
    e = export(t, "cloud-hypervisor")
    words = argv(e)
    zones = words[words.index("--memory-zone") + 1: words.index("--numa")]
    assert zones == ["id=mem0,size=64M", "id=mem1,size=64M,host_numa_node=0",
                     "id=mem2,size=64M,host_numa_node=1", "id=mem4,size=64M,host_numa_node=1"]
    nodes = words[words.index("--numa") + 1:]
    assert nodes[3] == "guest_numa_id=3,cpus=[3,5],distances=[0@20,1@20,2@20,4@20]"  # no memory_zones
    assert "topology=" not in words[words.index("--cpus") + 1]
    policy_warnings = [w for w in e.warnings if w.startswith("domain ")]
    assert [w.split(":")[0] for w in policy_warnings] == ["domain 0", "domain 1", "domain 2"]
    assert "cannot interleave" in policy_warnings[0]
    assert "one host node" in policy_warnings[1]
    assert "cannot prefer" in policy_warnings[2]


# ---------------------------------------------------------------- bhyve


def test_bhyve_example_options_and_warnings():
    e = export(example(), "bhyve")
    assert argv(e) == ["bhyve", "-c", "4", "-m", "2G",
                       "-n", "id=0,size=1G,cpus=0-1,domain_policy=first-touch:0",
                       "-n", "id=1,size=1G,cpus=2-3",
                       "numavm"]
    assert len(e.warnings) == 3
    assert "distances" in e.warnings[0]
    assert "memory-only domain 2" in e.warnings[1] and "2G instead of 2560M" in e.warnings[1]
    assert e.warnings[2].startswith("domain 0:") and "strict bind" in e.warnings[2]


def test_bhyve_classic():
    e = export(classic(), "bhyve")
    assert argv(e) == ["bhyve", "-c", "2", "-m", "1G", "numavm"] and e.warnings == []


def test_bhyve_policy_names_lists_and_renumbering():
    t = machine("id=0,size=64M,cpus=0+2,policy=prefer:1", "id=1,size=64M",
                "id=2,size=64M,cpus=1,policy=round-robin:0+2", "id=3,size=64M,cpus=3,policy=first-touch",
                "id=4,size=64M,cpus=4,policy=weighted-interleave:0-1", host_nodes=(0, 1, 2))
    e = export(t, "bhyve")
    assert options(argv(e)[1:-1]) == [
        ("-c", "5"), ("-m", "256M"),
        ("-n", "id=0,size=64M,domain_policy=prefer:1"), ("-o", "domains.0.cpus=0,2"),
        ("-n", "id=1,size=64M,cpus=1"), ("-o", "domains.1.domain_policy=round-robin:0,2"),
        ("-n", "id=2,size=64M,cpus=3,domain_policy=first-touch"),
        ("-n", "id=3,size=64M,cpus=4,domain_policy=round-robin:0-1"),
    ]
    assert len(e.warnings) == 3  # distances are all default: no distance warning
    assert "memory-only domain 1" in e.warnings[0]
    assert "renumbered 2->1, 3->2, 4->3" in e.warnings[1]
    assert e.warnings[2].startswith("domain 4:") and "weighted-interleave" in e.warnings[2]


# ---------------------------------------------------------------- disks


def test_qemu_disks_pxb_blockdev_device_initiator():
    e = export(with_disks(), "qemu")
    got = options(argv(e)[1:])
    assert ("-numa", "node,nodeid=2") in got  # the initiator's domain: no memory, no vCPUs
    assert got[got.index(("-numa", "dist,src=1,dst=2,val=20")) + 1:] == [
        ("-device", "pxb,id=pxb0,bus_nr=1,bus=pci.0,numa_node=0"),
        ("-device", "pxb,id=pxb1,bus_nr=3,bus=pci.0,numa_node=1"),  # bus_nr steps by 2: the pxb's own bridge
        ("-device", "pxb,id=pxb2,bus_nr=5,bus=pci.0,numa_node=2"),
        ("-blockdev", "driver=raw,node-name=drive0,file.driver=file,file.filename=a.img,read-only=on"),
        ("-device", "virtio-blk-pci,id=disk0,drive=drive0,bus=pxb1,addr=0x0"),
        ("-blockdev", "driver=raw,node-name=drive1,file.driver=file,file.filename=b,,c.img"),
        ("-device", "virtio-blk-pci,id=disk1,drive=drive1,bus=pxb0,addr=0x0"),
        ("-blockdev", "driver=raw,node-name=drive2,file.driver=file,file.filename=gi.img"),
        ("-device", "virtio-blk-pci,id=disk2,drive=drive2,bus=pxb2,addr=0x0"),
        ("-blockdev", "driver=raw,node-name=drive3,file.driver=file,file.filename=d.img"),
        ("-device", "virtio-blk-pci,id=disk3,drive=drive3,bus=pxb1,addr=0x1"),
        ("-object", "acpi-generic-initiator,id=gi2,pci-dev=disk2,node=2"),
    ]
    assert e.warnings == ["-object acpi-generic-initiator (the generic initiator of disk(s) 2) needs QEMU 9.0 or "
                          "later; older QEMU refuses the command line"]


def test_qemu_disks_of_a_classic_machine_have_a_pxb_without_node():
    t = MachineSpec(cpus=1, memory=GiB, disks=[parse_disk("x.img")]).build(host_nodes=(0,))
    e = export(t, "qemu")
    assert options(argv(e)[1:])[3:] == [
        ("-device", "pxb,id=pxb0,bus_nr=1,bus=pci.0"),
        ("-blockdev", "driver=raw,node-name=drive0,file.driver=file,file.filename=x.img"),
        ("-device", "virtio-blk-pci,id=disk0,drive=drive0,bus=pxb0,addr=0x0")]
    assert e.warnings == []


def test_libvirt_disks_behind_pci_expander_buses():
    e = export(with_disks(), "libvirt")
    root = ET.fromstring(e.text)
    assert [c.tag for c in root][-1] == "devices"
    ctrl = root.findall("devices/controller")
    assert [c.attrib for c in ctrl] == [{"type": "pci", "index": str(k), "model": m} for k, m in
                                        enumerate(["pci-root"] + ["pci-expander-bus"] * 3)]
    assert [(c.find("model").get("name"), c.find("target").get("busNr"), c.findtext("target/node"))
            for c in ctrl[1:]] == [("pxb", "1", "0"), ("pxb", "3", "1"), ("pxb", "5", "2")]
    disks = root.findall("devices/disk")
    assert [d.attrib for d in disks] == [{"type": "file", "device": "disk"}] * 4
    assert [(d.find("driver").attrib, d.find("source").get("file"), d.find("target").attrib,
             d.find("readonly") is not None, d.find("address").attrib) for d in disks] == [
        ({"name": "qemu", "type": "raw"}, path, {"dev": dev, "bus": "virtio"}, ro,
         {"type": "pci", "domain": "0x0000", "bus": bus, "slot": slot, "function": "0x0"})
        for path, dev, ro, bus, slot in [("a.img", "vda", True, "0x02", "0x00"), ("b,c.img", "vdb", False, "0x01", "0x00"),
                                         ("gi.img", "vdc", False, "0x03", "0x00"), ("d.img", "vdd", False, "0x02", "0x01")]]
    # domain 2 holds only the initiator: an empty cell, as libvirt writes a hostdev's initiator cells
    assert root.find("cpu/numa/cell[@id='2']").attrib == {"id": "2", "memory": "0", "unit": "KiB"}
    assert e.warnings == ["disk 2 (gi.img): libvirt takes a generic initiator (<acpi nodeset=.../>) on <hostdev> "
                          "only, not on <disk>; it is not a generic initiator of domain 2 there"]


def test_libvirt_leaves_out_a_path_xml_cannot_carry():
    e = export(with_disks("ok.img", "bad\x01.img", numa=("id=0,size=1G,cpus=0",), cpus=1), "libvirt")
    root = ET.fromstring(e.text)
    assert [d.find("source").get("file") for d in root.findall("devices/disk")] == ["ok.img"]
    assert e.warnings == ["disk 1 ('bad\\x01.img'): its path has characters XML 1.0 cannot carry; left out"]


def test_cloud_hypervisor_disks_on_segments():
    e = export(with_disks(), "cloud-hypervisor")
    words = argv(e)
    assert words[words.index("--numa") + 1: words.index("--platform")] == [
        "guest_numa_id=0,cpus=[0-1],distances=[1@20,2@20],memory_zones=mem0,pci_segments=[1]",
        "guest_numa_id=1,cpus=[2-3],distances=[0@20,2@20],memory_zones=mem1,pci_segments=[2]",
        "guest_numa_id=2,distances=[0@20,1@20],device_id=disk2,pci_segments=[3]"]
    assert words[words.index("--platform"):] == [
        "--platform", "num_pci_segments=4",
        "--disk", "path=a.img,readonly=on,id=disk0,pci_segment=2", 'path="b,c.img",id=disk1,pci_segment=1',
        "path=gi.img,id=disk2,pci_segment=3", "path=d.img,id=disk3,pci_segment=2"]
    assert e.warnings == ["--numa device_id= (generic initiator domain(s) 2) needs Cloud Hypervisor v51 or later",
                          'the path of disk(s) 1 is quoted (it holds , " [ or ]), which Cloud Hypervisor reads back as '
                          "written from v48 on; older versions keep the quotes in the path"]


def test_cloud_hypervisor_initiator_only_on_a_node_of_its_own():
    e = export(with_disks("g0.img,initiator", "g1.img,domain=1,initiator", "g2.img,domain=1,initiator",
                          numa=("id=0,size=1G,cpus=0", "id=1,size=0"), cpus=1), "cloud-hypervisor")
    words = argv(e)
    assert "guest_numa_id=1,distances=[0@20],device_id=disk1,pci_segments=[2]" in words
    assert not any("device_id=disk0" in w or "device_id=disk2" in w for w in words)
    assert [w.split(":")[0] for w in e.warnings] == ["disk 0 (g0.img)", "disk 2 (g2.img)", "--numa device_id= (generic "
                                                                                         "initiator domain(s) 1) needs Cloud Hypervisor v51 or later"]
    assert "domain 0 has vCPUs" in e.warnings[0] and "names one device_id" in e.warnings[1]


def test_bhyve_disks_lose_their_domain():
    e = export(with_disks(), "bhyve")
    assert options(argv(e)[1:-1])[-3:] == [("-s", "1:0:0,virtio-blk,a.img,ro"), ("-s", "1:1:0,virtio-blk,gi.img"),
                                           ("-s", "1:2:0,virtio-blk,d.img")]
    assert e.warnings == [
        "domain 2 holds neither memory nor vCPUs: bhyve wants cpus= in every domain; left out",
        "disk 1 ('b,c.img'): bhyve splits -s at every comma, so this path cannot be given; left out",
        "bhyve cannot place a device on a NUMA domain: the disks (on domain(s) 1-2) sit on PCI buses without a "
        "proximity domain",
        "disk 2 (gi.img): bhyve has no generic initiators; it is not a generic initiator of domain 2 there"]


def test_bhyve_classic_disks_say_nothing_lost():
    t = MachineSpec(cpus=1, memory=GiB, disks=[parse_disk("x.img,readonly"), parse_disk("y.img")]).build(host_nodes=(0,))
    e = export(t, "bhyve")
    assert argv(e) == ["bhyve", "-c", "1", "-m", "1G", "-s", "1:0:0,virtio-blk,x.img,ro", "-s", "1:1:0,virtio-blk,y.img",
                       "numavm"]
    assert e.warnings == []


def test_toml_disks():
    doc = tomllib.loads(export(with_disks(), "toml").text)
    assert doc["disk"] == [{"path": "a.img", "domain": 1, "readonly": True}, {"path": "b,c.img", "domain": 0},
                           {"path": "gi.img", "domain": 2, "initiator": True}, {"path": "d.img", "domain": 1}]
    t = MachineSpec(cpus=1, memory=GiB, disks=[parse_disk('q"\\\t\n.img')]).build(host_nodes=(0,))
    assert tomllib.loads(export(t, "toml").text)["disk"] == [{"path": 'q"\\\t\n.img', "domain": 0}]
    t = MachineSpec(cpus=1, memory=GiB, disks=[parse_disk("\udcff.img"), parse_disk("ok.img")]).build(host_nodes=(0,))
    e = export(t, "toml")  # a command line's non-UTF-8 bytes (surrogate escapes): TOML cannot hold them
    assert tomllib.loads(e.text)["disk"] == [{"path": "ok.img", "domain": 0}]
    assert e.warnings == ["disk 0 ('\\udcff.img'): its path is not UTF-8, which a TOML file must be; left out"]


@needs_qemu
@pytest.mark.qemu
def test_qemu_runs_disks_behind_their_pxb(tmp_path):
    """QEMU (7.2 here: no acpi-generic-initiator) takes the exported disks: after SeaBIOS has
    numbered the buses, each disk sits behind its domain's pxb (bus bus_nr + 1, numavm's slot)
    and the read-only one is read-only."""
    for name in ("a.img", "b,c.img", "d.img"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
    t = with_disks(*(f"{tmp_path}/{d}" for d in ("a.img,domain=1,readonly", "b,,c.img", "d.img,domain=1")),
                   numa=("id=0,size=64M,cpus=0-1", "id=1,size=64M,cpus=2-3"))
    cmd = [QEMU_BINARY, *qemu_args(t), "-display", "none", "-nodefaults", "-monitor", "none", "-serial", "none",
           "-accel", "tcg", "-qmp", "stdio"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def ask(msg):
            p.stdin.write(json.dumps(msg) + "\n")
            p.stdin.flush()
            while True:
                line = json.loads(p.stdout.readline())
                if "return" in line or "error" in line:
                    assert "error" not in line, line
                    return line["return"]

        ask({"execute": "qmp_capabilities"})
        for _ in range(100):  # until the firmware has numbered the pxbs' bridges
            buses = {b["bus"]: b for b in ask({"execute": "query-pci"})}
            bridges = [d for b in buses.values() for d in b["devices"] if "pci_bridge" in d]
            if bridges and all(d["pci_bridge"]["bus"]["secondary"] for d in bridges):
                break
            subprocess.run(["sleep", "0.1"])
        blk = {}  # (bus, slot) -> virtio-blk, through every bridge
        todo = list(ask({"execute": "query-pci"}))
        while todo:
            b = todo.pop()
            for d in b["devices"]:
                if d["id"]["vendor"] == 0x1AF4:
                    blk[(d["bus"], d["slot"])] = d["qdev_id"]
                if "pci_bridge" in d:
                    todo.append({"bus": d["pci_bridge"]["bus"]["secondary"], "devices": d["pci_bridge"]["devices"]})
        assert blk == {(4, 0): "disk0", (2, 0): "disk1", (4, 1): "disk2"}  # pxb1 bus_nr 3, pxb0 bus_nr 1
        for pxb, node in (("pxb0", 0), ("pxb1", 1)):
            assert ask({"execute": "qom-get", "arguments": {"path": f"/machine/peripheral/{pxb}",
                                                            "property": "numa_node"}}) == node
        ro = {b["qdev"].split("/")[3]: (b["inserted"]["file"], b["inserted"]["ro"])
              for b in ask({"execute": "query-block"}) if "inserted" in b}
        assert ro == {"disk0": (f"{tmp_path}/a.img", True), "disk1": (f"{tmp_path}/b,c.img", False),
                      "disk2": (f"{tmp_path}/d.img", False)}
        ask({"execute": "quit"})
    finally:
        p.kill()
        p.communicate()


PCI_INIT = b"""#!/bin/busybox sh
/bin/busybox mkdir -p /sys
/bin/busybox mount -t sysfs sysfs /sys
for d in /sys/bus/pci/devices/*; do
  echo "PCI $(/bin/busybox basename $d) $(/bin/busybox cat $d/vendor) $(/bin/busybox cat $d/numa_node)"
done
/bin/busybox poweroff -f
"""


@needs_qemu
@pytest.mark.qemu
def test_qemu_boots_the_exported_disks_on_their_nodes(tmp_path):
    """Linux booted by QEMU (TCG) from the exported command line: each virtio-blk device's
    numa_node is its disk's domain (the pxb's _PXM), at bus bus_nr + 1."""
    import gzip
    import stat

    from numavm.guest.assets import cached
    from numavm.guest.initramfs import Entry, cpio_newc

    assets = cached()
    if assets is None:
        pytest.skip("no guest kernel in numavm's cache (numavm fetch)")
    initrd = tmp_path / "init.cpio.gz"
    initrd.write_bytes(gzip.compress(cpio_newc([
        Entry("bin", stat.S_IFDIR | 0o755), Entry("bin/busybox", stat.S_IFREG | 0o755, assets.busybox.read_bytes()),
        Entry("init", stat.S_IFREG | 0o755, PCI_INIT)])))
    for name in ("a.img", "b.img", "c.img"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
    t = with_disks(f"{tmp_path}/a.img,domain=1,readonly", f"{tmp_path}/b.img", f"{tmp_path}/c.img,domain=1",
                   numa=("id=0,size=256M,cpus=0", "id=1,size=256M,cpus=1"), cpus=2)
    p = subprocess.run([QEMU_BINARY, *qemu_args(t), "-kernel", str(assets.kernel), "-initrd", str(initrd),
                        "-append", "console=ttyS0 panic=-1 quiet", "-nodefaults", "-display", "none",
                        "-serial", "stdio", "-monitor", "none", "-no-reboot", "-accel", "tcg"],
                       capture_output=True, text=True, timeout=300)
    seen = {bdf: int(node) for bdf, vendor, node in re.findall(r"PCI (\S+) (\S+) (-?\d+)", p.stdout)
            if vendor == "0x1af4"}
    assert seen == {"0000:04:00.0": 1, "0000:02:00.0": 0, "0000:04:01.0": 1}, p.stdout[-2000:]


# ---------------------------------------------------------------- TOML


def test_toml_example_document():
    e = export(example(), "toml")
    assert e.warnings == []
    assert tomllib.loads(e.text) == {
        "version": 1, "cpus": 4, "memory": "2560M",
        "distances": [[10, 20, 30], [20, 10, 20], [30, 20, 10]],
        "domain": [{"id": 0, "size": "1G", "cpus": "0-1", "policy": "bind:0"},
                   {"id": 1, "size": "1G", "cpus": "2-3"},
                   {"id": 2, "size": "512M"}],
    }


def test_toml_classic_writes_version_cpus_memory_only():
    assert tomllib.loads(export(classic(), "toml").text) == {"version": 1, "cpus": 2, "memory": "1G"}


TOML_MACHINES = {
    "example": example,
    "classic": classic,
    "mixed": lambda: machine("id=0,size=1536M,cpus=0-1+4,policy=interleave", "id=1,size=0,cpus=2-3",
                             "id=2,size=2G,cpus=5,policy=preferred-many:0+2",
                             distances=("0:1=15", "1:0=25", "0:2=255"), host_nodes=(0, 1, 2)),
    "disks": with_disks,
}


@pytest.mark.parametrize("name", sorted(TOML_MACHINES))
def test_toml_round_trips(name):
    topo = TOML_MACHINES[name]()
    doc = tomllib.loads(export(topo, "toml").text)
    from numavm.spec.units import parse_list, parse_size
    from numavm.spec.policy import parse_policy

    assert doc["cpus"] == topo.cpus
    assert parse_size(doc["memory"], "memory") == topo.memory
    if not topo.numa:
        assert set(doc) == {"version", "cpus", "memory"}
        return
    assert tuple(tuple(r) for r in doc["distances"]) == topo.distances
    got = tuple((d["id"], parse_size(d["size"], "size"), parse_list(d["cpus"], "cpus") if "cpus" in d else (),
                 parse_policy(d["policy"], "policy") if "policy" in d else Policy())
                for d in doc["domain"])
    assert got == tuple((d.id, d.size, d.cpus, d.policy) for d in topo.domains)
    assert [(d["path"], d["domain"], d.get("readonly", False), d.get("initiator", False)) for d in doc.get("disk", [])] == \
        [(d.path, d.domain, d.readonly, d.initiator) for d in topo.disks]


@pytest.mark.parametrize("name", sorted(TOML_MACHINES))
def test_toml_loads_back_through_numavm_config(name):
    config = pytest.importorskip("numavm.spec.config")
    if not hasattr(config, "loads"):
        pytest.skip("numavm.spec.config has no loads()")
    topo = TOML_MACHINES[name]()
    assert config.loads(export(topo, "toml").text, "export").build(host_nodes=(0, 1, 2)) == topo


def test_every_format_ends_with_newline():
    for f in FORMATS:
        assert export(example(), f).text.endswith("\n")
