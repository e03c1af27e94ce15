"""numavm import: each peer's reader on hand-written inputs, its errors, and the
round trip export --to X | import --from X, property-tested over generated machines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numavm.cli import main
from numavm.errors import ConfigError
from numavm.peers.export import export
from numavm.plan.layout import plan_layout
from numavm.peers import FORMATS, import_topology, read
from numavm.peers.libvirt import parse_xml
from numavm.plan.render import plan_document
from numavm.spec.policy import Mode, Policy
from numavm.spec.topology import DomainSpec, MachineSpec, Topology, parse_distance, parse_numa
from numavm.spec.units import GiB, MiB

HOST = (0, 1, 2, 3)  # the host nodes the generated policies name (checked against these, not this host)


def imported(fmt: str, text: str) -> Topology:
    return import_topology(fmt, text, HOST)[0]


def machine(*numa: str, cpus: int | None = None, memory: int | None = None,
            distances: tuple[str, ...] = ()) -> Topology:
    return MachineSpec(cpus=cpus, memory=memory, domains=[parse_numa(n) for n in numa],
                       distances=[parse_distance(d) for d in distances]).build(host_nodes=HOST)


def refused(fmt: str, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        imported(fmt, text)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- machines, generated

ALL_MODES = tuple(Mode)


@st.composite
def machines(draw, modes: tuple[Mode, ...] = ALL_MODES, memory_only: bool = True, cpu_only: bool = True,
             distances: bool = True, hugepages: bool = True, classic: bool = True,
             cpu_only_policy: bool = True) -> Topology:  # type: ignore[no-untyped-def]
    if classic and draw(st.integers(0, 7)) == 0:
        return MachineSpec(cpus=draw(st.integers(1, 8)),
                           memory=draw(st.integers(2, 4096)) * 2 * MiB).build(host_nodes=HOST)
    n = draw(st.integers(1, 6))
    ncpus = draw(st.integers(1, 12))
    owner = [draw(st.integers(0, n - 1)) for _ in range(ncpus)]
    owner[0] = draw(st.integers(0, n - 1))
    doms = []
    for i in range(n):
        cpus = tuple(c for c in range(ncpus) if owner[c] == i)
        if not cpus and not memory_only:  # give it a vCPU of its own
            owner.append(i)
            cpus = (len(owner) - 1,)
        zero_ok = cpu_only and cpus
        size = draw(st.sampled_from([0] if zero_ok else [2]) | st.integers(2, 1024)) * 2 * MiB
        if size == 2 * MiB:
            size = 4 * MiB
        mode = draw(st.sampled_from(modes)) if size or cpu_only_policy else Mode.DEFAULT
        if mode in (Mode.DEFAULT, Mode.LOCAL):
            nodes: tuple[int, ...] = ()
        elif mode is Mode.PREFERRED:
            nodes = (draw(st.sampled_from(HOST)),)
        else:  # preferred-many over one node reads back as preferred, which acts the same
            nodes = tuple(sorted(draw(st.sets(st.sampled_from(HOST), min_size=2 if mode is Mode.PREFERRED_MANY else 1))))
        huge = draw(st.sampled_from([None, "thp", "hugetlbfs"])) if hugepages and size else None
        doms.append(DomainSpec(i, size, cpus, Policy(mode, nodes), huge))
    if not any(d.size for d in doms):
        doms[-1].size = 64 * MiB
    dist = []
    if distances and n > 1:
        for i in range(n):
            for j in range(n):
                if i != j and draw(st.integers(0, 2)) == 0:
                    dist.append((i, j, draw(st.integers(11, 255)), "test"))
    return MachineSpec(cpus=len(owner), domains=doms, distances=dist).build(host_nodes=HOST)


# what each peer says exactly (no policy local where the peer has none, no per-domain pages...)
EXPRESSIBLE = {
    "qemu": machines(modes=(Mode.DEFAULT, Mode.BIND, Mode.PREFERRED, Mode.INTERLEAVE, Mode.PREFERRED_MANY),
                     hugepages=False, cpu_only_policy=False),
    "libvirt": machines(modes=(Mode.DEFAULT, Mode.BIND, Mode.PREFERRED, Mode.INTERLEAVE, Mode.PREFERRED_MANY),
                        hugepages=False, cpu_only_policy=False),
    "cloud-hypervisor": machines(modes=(Mode.DEFAULT,), hugepages=False),
    "bhyve": machines(modes=(Mode.DEFAULT, Mode.LOCAL, Mode.BIND, Mode.PREFERRED, Mode.INTERLEAVE),
                      memory_only=False, distances=False, hugepages=False),
}
SETTINGS = dict(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan(t: Topology) -> dict[str, object]:
    return plan_document(plan_layout(t))


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_gives_back_the_same_plan(fmt: str) -> None:
    @settings(**SETTINGS)  # type: ignore[arg-type]
    @given(EXPRESSIBLE[fmt])
    def check(t: Topology) -> None:
        back = imported(fmt, export(t, fmt).text)
        assert back == t
        assert plan(back) == plan(t)
    check()


def test_round_trip_with_a_bound_zone_in_cloud_hypervisor() -> None:
    t = machine("id=0,size=1G,cpus=0-1,policy=bind:2", "id=1,size=512M,cpus=2", "id=2,size=64M",
                distances=("0:1=15", "1:0=25", "0:2=40"))
    assert imported("cloud-hypervisor", export(t, "cloud-hypervisor").text) == t


@pytest.mark.parametrize("fmt", FORMATS)
def test_what_a_round_trip_loses_the_export_said(fmt: str) -> None:
    """Any machine: what comes back differs only where export warned, and it is what the
    peer's text says (exporting it again gives the same text); a text import refuses was warned about."""
    @settings(**SETTINGS)  # type: ignore[arg-type]
    @given(machines())
    def check(t: Topology) -> None:
        first = export(t, fmt)
        try:
            back = imported(fmt, first.text)
        except ConfigError:  # the peer's text is no machine numavm can run (bhyve without memory-only domains)
            assert first.warnings
            return
        if back != t:
            assert first.warnings, (t, back)
        assert export(back, fmt).text == first.text
    check()


# ---------------------------------------------------------------- QEMU

def test_qemu_full_command_line() -> None:
    text = r"""
    # a hand-written line, as a user would paste it
    qemu-system-x86_64 -enable-kvm -M q35 -cpu host -nographic \
      -smp 6,sockets=3,cores=2 --m 3G -drive file=disk.img,if=virtio \
      -object memory-backend-memfd,id=ram0,size=1G,host-nodes=0-1,host-nodes=3,policy=bind,prealloc=on \
      -object memory-backend-ram,id=ram1,size=1536M,policy=preferred,host-nodes=1-2 \
      -object memory-backend-memfd,id=ram2,size=512M,hugetlb=on,policy=interleave,host-nodes=0-3 \
      -object rng-random,id=rng0,filename=/dev/urandom \
      -numa node,nodeid=0,cpus=0-1,memdev=ram0 -numa node,nodeid=1,memdev=ram1 \
      -numa node,nodeid=2,cpus=4,cpus=5,memdev=ram2 \
      -numa cpu,node-id=1,socket-id=1 \
      -numa dist,src=0,dst=1,val=21 -numa dist,src=1,dst=0,val=31 -numa dist,src=0,dst=2,val=40
    """
    t, notes = import_topology("qemu", text, HOST)
    assert t.cpus == 6 and t.memory == 3 * GiB
    d0, d1, d2 = t.domains
    assert (d0.size, d0.cpus, d0.policy) == (GiB, (0, 1), Policy(Mode.BIND, (0, 1, 3)))
    assert (d1.size, d1.cpus, d1.policy) == (1536 * MiB, (2, 3), Policy(Mode.PREFERRED_MANY, (1, 2)))
    assert (d2.cpus, d2.policy, d2.hugepages) == ((4, 5), Policy(Mode.INTERLEAVE, (0, 1, 2, 3)), "hugetlbfs")
    assert t.distances == ((10, 21, 40), (31, 10, 20), (40, 20, 10))
    assert any("--prefault 0" in n for n in notes)
    left_out = [n for n in notes if n.startswith("left out")]
    assert left_out and "-cpu" in left_out[0] and "-drive" in left_out[0] and "rng-random" in left_out[0]


def test_qemu_classic_and_megabytes() -> None:
    t = imported("qemu", "qemu-system-x86_64 -smp 3 -m 768")
    assert (t.numa, t.cpus, t.memory) == (False, 3, 768 * MiB)
    t = imported("qemu", "qemu-system-x86_64 -smp cpus=2 -m size=1G -numa node,cpus=0-1,mem=1024")
    assert t.numa and t.domains[0].size == GiB


def test_qemu_memoryless_node_and_thread_ids() -> None:
    t = imported("qemu", "-smp 4,sockets=2,cores=1,threads=2 -m 1G "
                         "-object memory-backend-ram,id=m,size=1G -numa node,memdev=m -numa node "
                         "-numa cpu,node-id=0,socket-id=0 -numa cpu,node-id=1,socket-id=1,thread-id=0 "
                         "-numa cpu,node-id=1,socket-id=1,thread-id=1")
    assert [(d.size, d.cpus) for d in t.domains] == [(GiB, (0, 1)), (0, (2, 3))]


@pytest.mark.parametrize("text,words", [
    ("-smp 4,maxcpus=8 -m 1G", ["maxcpus=8", "hotplug"]),
    ("-smp 2 -m 1G,slots=2,maxmem=4G", ["maxmem=4G", "hotplug"]),
    ("-smp 1 -m 1G -numa node -numa hmat-lb,initiator=0,target=0,hierarchy=first-level,"
     "data-type=access-latency,latency=5", ["hierarchy=first-level", "memory only"]),
    ("-smp 1 -m 1G -object memory-backend-file,id=m,size=1G,mem-path=/dev/hugepages -numa node,cpus=0,memdev=m",
     ["memory-backend-file", "mem-path=/dev/hugepages"]),
    ("-smp 1 -m 1G -numa node,cpus=0,memdev=nope", ["memdev=nope", "no -object"]),
    ("-smp 1 -m 1G -object memory-backend-ram,id=m,size=1G,policy=bind -numa node,cpus=0,memdev=m",
     ["policy=bind", "host-nodes"]),
    ("-smp 1 -m 1G -object memory-backend-ram,id=m,size=1G,policy=weird,host-nodes=0 -numa node,cpus=0,memdev=m",
     ["policy=weird"]),
    ("-smp 1 -m 1G -object memory-backend-ram,id=m,size=1G,discard-data=on -numa node,cpus=0,memdev=m",
     ["discard-data"]),
    ("-smp 2 -m 1G -object memory-backend-ram,id=m,size=1G -numa node,cpus=0,memdev=m", ["vCPUs 1", "no domain"]),
    ("-smp 2 -m 2G -object memory-backend-ram,id=m,size=1G -numa node,cpus=0-1,memdev=m", ["differs"]),
    ("-smp 1 -m 1G -numa node,cpus=0,mem=1G -numa hmat-lb,initiator=0,target=0,data-type=read-bandwidth,"
     "bandwidth=1000", ["bandwidth=1000", "whole number of MiB/s"]),
    ("-smp 1 -m 1G -mem-path /dev/hugepages", ["-mem-path"]),
    ("-smp 1 -m 1G -numa node,cpus=0,mem=1G -numa dist,src=0,dst=1,val=20", ["no domain 1"]),
    ("-smp 1 -m 'unclosed", ["not a shell command line"]),
    ("-smp 2 -m 1G -numa node,mem=1G -numa cpu,node-id=0,socket-id=5", ["socket-id 5"]),
    ("-smp 5,sockets=2 -m 1G", ["sockets*dies*clusters*cores*threads = 4, not 5"]),
    ("-smp 100000,sockets=1000 -m 1G", ["at most 1024 vCPUs"]),
])
def test_qemu_refusals_name_what(text: str, words: list[str]) -> None:
    msg = refused("qemu", text)
    assert msg.startswith("import --from qemu: ")
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------- libvirt

LIBVIRT = """<domain type='kvm'>
  <name>db</name>
  <memory unit='GiB'>3</memory>
  <currentMemory unit='GiB'>3</currentMemory>
  <vcpu placement='static' cpuset='0-7'>4</vcpu>
  <memoryBacking><hugepages/></memoryBacking>
  <numatune>
    <memory mode='interleave' nodeset='0-3'/>
    <memnode cellid='0' mode='strict' nodeset='1,3'/>
    <memnode cellid='2' mode='preferred' nodeset='2'/>
  </numatune>
  <devices><disk type='file'/></devices>
  <cpu mode='host-passthrough'>
    <numa>
      <cell id='0' cpus='0-2,^1' memory='1048576'>
        <distances><sibling id='0' value='10'/><sibling id='1' value='16'/><sibling id='2' value='32'/></distances>
      </cell>
      <cell id='1' cpus='1,3' memory='1' unit='GiB'>
        <distances><sibling id='0' value='16'/><sibling id='1' value='10'/></distances>
      </cell>
      <cell id='2' memory='1024' unit='MiB' memAccess='shared'/>
    </numa>
  </cpu>
</domain>
"""


def test_libvirt_domain() -> None:
    t, notes = import_topology("libvirt", LIBVIRT, HOST)
    assert (t.cpus, t.memory) == (4, 3 * GiB)
    assert [(d.size, d.cpus, d.policy, d.hugepages) for d in t.domains] == [
        (GiB, (0, 2), Policy(Mode.BIND, (1, 3)), "hugetlbfs"),
        (GiB, (1, 3), Policy(Mode.INTERLEAVE, (0, 1, 2, 3)), "hugetlbfs"),
        (GiB, (), Policy(Mode.PREFERRED, (2,)), "hugetlbfs")]
    assert t.distances == ((10, 16, 32), (16, 10, 20), (32, 20, 10))
    assert any("cpuset" in n for n in notes)
    assert any("do not name every cell" in n for n in notes)


def test_libvirt_classic() -> None:
    t = imported("libvirt", "<domain><vcpu>2</vcpu><memory unit='MiB'>768</memory></domain>")
    assert (t.numa, t.cpus, t.memory) == (False, 2, 768 * MiB)


@pytest.mark.parametrize("xml,words", [
    ("<!DOCTYPE domain [<!ENTITY a 'aaaa'>]><domain><vcpu>&a;</vcpu></domain>", ["DOCTYPE"]),
    ("<!DOCTYPE domain SYSTEM 'file:///etc/passwd'><domain/>", ["DOCTYPE"]),
    ("<domain><vcpu>1</vcpu>", ["not well-formed"]),
    ("<vm/>", ["<vm>", "<domain>"]),
    ("<domain><vcpu current='2'>4</vcpu><memory>1048576</memory></domain>", ["current='2'", "hotplug"]),
    ("<domain><vcpu>1</vcpu><maxMemory slots='4' unit='GiB'>8</maxMemory><memory>1048576</memory></domain>",
     ["<maxMemory>"]),
    ("<domain><vcpu>1</vcpu><memory unit='furlong'>1</memory></domain>", ["furlong"]),
    ("<domain><vcpu>1</vcpu><memory>-2048</memory></domain>", ["<memory>: cannot be negative"]),
    ("\ud800", ["not UTF-8"]),
    ("<domain><vcpu>1</vcpu><memory>1048576</memory><numatune><memory mode='strict' nodeset='0'/></numatune>"
     "</domain>", ["<numatune>", "classic"]),
    ("<domain><vcpu>1</vcpu><numatune><memory mode='strict' placement='auto'/></numatune>"
     "<cpu><numa><cell id='0' cpus='0' memory='1048576'/></numa></cpu></domain>", ["placement='auto'"]),
    ("<domain><vcpu>1</vcpu><numatune><memnode cellid='0' mode='restrictive' nodeset='0'/></numatune>"
     "<cpu><numa><cell id='0' cpus='0' memory='1048576'/></numa></cpu></domain>", ["restrictive"]),
    ("<domain><vcpu>1</vcpu><numatune><memnode cellid='3' mode='strict' nodeset='0'/></numatune>"
     "<cpu><numa><cell id='0' cpus='0' memory='1048576'/></numa></cpu></domain>", ["cellid='3'"]),
    ("<domain><vcpu>1</vcpu><cpu><numa><cell id='0' cpus='0' memory='1000'/></numa></cpu></domain>",
     ["<cell id='0'>", "multiple of 2M"]),
])
def test_libvirt_refusals_name_what(xml: str, words: list[str]) -> None:
    msg = refused("libvirt", xml)
    for w in words:
        assert w in msg, msg


def test_xml_without_a_dtd_no_entity_is_expanded() -> None:
    """ElementTree itself expands internal entities (on 3.11 and 3.13 alike); numavm's parser
    refuses any DOCTYPE, so no entity is declared, and an undeclared one is an error."""
    for bomb in ('<!DOCTYPE d [<!ENTITY a "x"><!ENTITY b "&a;&a;">]><d>&b;</d>',
                 '<!DOCTYPE d SYSTEM "file:///etc/passwd"><d/>'):
        with pytest.raises(ConfigError, match=r"^the XML has a DOCTYPE \(d\)"):
            parse_xml(bomb)
    with pytest.raises(ConfigError, match="undefined entity"):
        parse_xml("<d>&a;</d>")
    root = parse_xml('<?xml version="1.0"?><!-- c --><d a="1"><e><![CDATA[x<y]]></e>&lt;</d>')
    assert (root.get("a"), root.find("e").text, root.text) == ("1", "x<y", None)  # type: ignore[union-attr]


# ---------------------------------------------------------------- Cloud Hypervisor

def test_cloud_hypervisor_zones_and_nodes() -> None:
    text = ("cloud-hypervisor --kernel vmlinux --cpus boot=4 --memory size=0 "
            "--memory-zone id=a,size=512M,host_numa_node=1 id=b,size=512M,host_numa_node=1 "
            "--memory-zone id=c,size=1G,hugepages=on,prefault=on "
            "--numa guest_numa_id=0,cpus=[0-1,3],distances=[1@15],memory_zones=[a,b] "
            "guest_numa_id=1,cpus=[2],memory_zones=c --disk path=x.img")
    t, notes = import_topology("cloud-hypervisor", text, HOST)
    assert [(d.size, d.cpus, d.policy, d.hugepages) for d in t.domains] == [
        (GiB, (0, 1, 3), Policy(Mode.BIND, (1,)), None), (GiB, (2,), Policy(), "hugetlbfs")]
    assert t.distances == ((10, 15), (15, 10))
    assert any("--prefault 1" in n for n in notes)
    assert any("--kernel" in n and "--disk" in n for n in notes if n.startswith("left out"))


def test_cloud_hypervisor_classic() -> None:
    t = imported("cloud-hypervisor", "cloud-hypervisor --cpus boot=2 --memory size=1G")
    assert (t.numa, t.cpus, t.memory) == (False, 2, GiB)


@pytest.mark.parametrize("text,words", [
    ("--cpus boot=2,max=4 --memory size=1G", ["max=4", "hotplug"]),
    ("--cpus boot=1 --memory size=1G,hotplug_size=1G", ["hotplug_size"]),
    ("--cpus boot=1 --memory size=0 --memory-zone id=a,size=1G,file=/x --numa guest_numa_id=0,cpus=[0],memory_zones=a",
     ["file="]),
    ("--cpus boot=1 --memory size=0 --memory-zone id=a,size=1G --memory-zone id=b,size=1G "
     "--numa guest_numa_id=0,cpus=[0],memory_zones=a", ["id=b", "in no --numa"]),
    ("--cpus boot=1 --memory size=1G --numa guest_numa_id=0,cpus=[0]", ["size=1G", "size=0"]),
    ("--cpus boot=1 --memory size=0 --memory-zone id=a,size=1G --numa guest_numa_id=0,cpus=[0],memory_zones=z",
     ["memory_zones", "id=z"]),
    ("--cpus boot=1 --memory size=0 --memory-zone id=a,size=1G,host_numa_node=0 id=b,size=1G "
     "--numa guest_numa_id=0,cpus=[0],memory_zones=[a,b]", ["differ"]),
    ("--cpus boot=1 --memory size=0 --memory-zone id=a,size=1G "
     "--numa guest_numa_id=0,cpus=[0],memory_zones=a,sgx_epc_sections=[x]", ["sgx"]),
    ("--cpus boot=1 --memory size=0 --memory-zone id=a,size=1G,host_numa_node=0", ["host_numa_node", "classic"]),
    ("--cpus boot=1,bogus=2", ["bogus"]),
])
def test_cloud_hypervisor_refusals_name_what(text: str, words: list[str]) -> None:
    msg = refused("cloud-hypervisor", text)
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------- bhyve

def test_bhyve_domains_and_options() -> None:
    text = ("bhyve -AHP -c 4 -m 2048 -s 0,hostbridge -s 31,lpc -l com1,stdio -p 0:2 "
            "-n id=0,size=1G,cpus=0-1,domain_policy=round-robin -o domains.0.domain_policy=first-touch:1,3 "
            "-n id=1,size=1G,cpus=2,domain_policy=prefer:2 -o domains.1.cpus=2,3 vm0")
    t, notes = import_topology("bhyve", text, HOST)
    assert t.memory == 2 * GiB
    assert [(d.cpus, d.policy) for d in t.domains] == [((0, 1), Policy(Mode.BIND, (1, 3))),
                                                       ((2, 3), Policy(Mode.PREFERRED, (2,)))]
    assert any("-p 0:2" in n for n in notes)
    assert any("-s" in n and "-l" in n for n in notes if n.startswith("left out"))


def test_bhyve_classic() -> None:
    t = imported("bhyve", "bhyve -c cpus=2,sockets=2 -m 1G vm")
    assert (t.numa, t.cpus, t.memory) == (False, 2, GiB)


@pytest.mark.parametrize("text,words", [
    ("bhyve -c 2 -m 1G -n id=0,size=1G vm", ["id=0", "cpus="]),
    ("bhyve -c 2,maxcpus=4 -m 1G vm", ["maxcpus", "hotplug"]),
    ("bhyve -c 1 -m 1G -n id=0,size=1G,cpus=0,bogus=1 vm", ["bogus"]),
    ("bhyve -c 1 -m 1G -o domains.0.color=red vm", ["domains.0.color"]),
    ("bhyve -c 1 -m 1G -n id=0,cpus=0,domain_policy=bogus:0 vm", ["domain_policy", "unknown policy"]),
    ("bhyve -c 1 -m 1G -Q vm", ["-Q"]),
    ("bhyve -c 1 -m 1G vm other", ["one VM name"]),
    ("bhyve -c 1,cpus=2 -m 1G vm", ["cpus given twice"]),
])
def test_bhyve_refusals_name_what(text: str, words: list[str]) -> None:
    msg = refused("bhyve", text)
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------- the command line

def test_cli_reads_a_file_and_stdin(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "vm.xml"
    f.write_text(export(machine("id=0,size=1G,cpus=0-1", "id=1,size=512M", distances=("0:1=17",)), "libvirt").text)
    assert main(["import", "--from", "libvirt", str(f)]) == 0
    toml = capsys.readouterr().out
    assert main(["plan", "--json", "-f", _write(tmp_path / "m.toml", toml)]) == 0
    planned = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f.read_bytes())))
    assert main(["import", "--from", "libvirt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == planned
    assert planned["distances"] == [[10, 17], [17, 10]]


def _write(p: Path, text: str) -> str:
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("argv,start", [
    (["import", "--from", "vmware", "/dev/null"], "--from: must be one of qemu, libvirt, cloud-hypervisor, bhyve"),
    (["import", "--from", "qemu", "/nonexistent/x"], "import: cannot read /nonexistent/x"),
    (["import", "--from", "qemu", "--host-nodes", "0"], None),
])
def test_cli_errors_are_one_line_exit_2(argv: list[str], start: str | None, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
        b"-smp 1 -m 1G -object memory-backend-ram,id=m,size=1G,host-nodes=1,policy=bind -numa node,cpus=0,memdev=m")))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("numavm: error: ")
    if start is None:  # a policy on a node --host-nodes does not have
        assert "host node 1 not online (online: 0)" in err
    else:
        assert err.startswith("numavm: error: " + start), err


def test_cli_refuses_bytes_that_are_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"-smp \xff")
    assert main(["import", "--from", "qemu", str(f)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_cli_pipeline_export_then_import(tmp_path: Path) -> None:
    """The shell pipeline the README shows, through the installed command."""
    numavm = Path(sys.executable).parent / "numavm"
    for fmt in FORMATS:
        exp = subprocess.run([numavm, "export", "--to", fmt, "-n", "id=0,size=1G,cpus=0", "-n", "id=1,size=1G,cpus=1",
                              "--distance", "0:1=21" if fmt != "bhyve" else "0:1=20"],
                             capture_output=True, text=True, check=True)
        imp = subprocess.run([numavm, "import", "--from", fmt], input=exp.stdout, capture_output=True, text=True)
        assert imp.returncode == 0, imp.stderr
        assert imp.stdout == subprocess.run([numavm, "export", "--to", "toml", "-n", "id=0,size=1G,cpus=0", "-n",
                                             "id=1,size=1G,cpus=1", "--distance",
                                             "0:1=21" if fmt != "bhyve" else "0:1=20"],
                                            capture_output=True, text=True, check=True).stdout


def test_every_reader_rejects_empty_reads_gracefully() -> None:
    for fmt in FORMATS:
        if fmt == "libvirt":
            assert "not well-formed" in refused(fmt, "")
        else:
            t = imported(fmt, "")  # no options: the peer's default machine
            assert not t.numa and t.cpus == 1


def test_read_keeps_spec_unbuilt() -> None:
    imp = read("qemu", "-smp 1 -m 1G -numa node,cpus=0,mem=1G")
    assert imp.spec.domains[0].origin == "-numa node,nodeid=0"


# ---------------------------------------------------------------- bad input never escapes as a traceback

@st.composite
def mangled(draw, fmt: str) -> str:  # type: ignore[no-untyped-def]
    """A peer's text for a generated machine with a few cuts, swaps and junk inserted."""
    text = export(draw(machines()), fmt).text
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["cut", "insert", "dup"]))
        if kind == "cut":
            text = text[:k] + text[k + draw(st.integers(1, 12)):]
        elif kind == "insert":
            junk = draw(st.sampled_from([",", "=", "[", "]", "-", "--", " ", "'", '"', "<", ">", "&", "0", "99999",
                                         "-1", "x", "@", "\\", "\n", "é", "١", ",,", "<!DOCTYPE a>", "&amp;"])
                        | st.text(max_size=6))
            text = text[:k] + junk + text[k:]
        else:
            j = draw(st.integers(k, min(len(text), k + 40)))
            text = text[:j] + text[k:j] + text[j:]
    return text


@pytest.mark.parametrize("fmt", FORMATS)
def test_mangled_input_is_a_one_line_error_or_a_machine(fmt: str) -> None:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mangled(fmt))
    def check(text: str) -> None:
        try:
            t = imported(fmt, text)
        except ConfigError as e:
            assert str(e).startswith(f"import --from {fmt}: ")
            return
        assert isinstance(t, Topology)
    check()
