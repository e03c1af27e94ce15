"""The TOML machine file (`-f/--config`) and the built-in example."""

from __future__ import annotations

from pathlib import Path

import pytest

from numavm.spec import config
from numavm.errors import ConfigError
from numavm.plan.layout import plan_layout
from numavm.spec.policy import Mode, Policy
from numavm.spec.units import GiB, MiB

EXAMPLE_FILE = Path(__file__).resolve().parent.parent / "examples" / "example.toml"
HOSTS = (0, 1, 2, 3)


def loads(text: str):
    return config.loads(text, "m.toml")


def load_error(text: str, host=HOSTS) -> str:
    with pytest.raises(ConfigError) as ei:
        loads(text).build(host_nodes=host)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def check_example(topo) -> None:
    assert topo.numa is True
    assert topo.cpus == 4
    assert topo.memory == 2 * GiB + 512 * MiB
    assert [(d.id, d.size, d.cpus) for d in topo.domains] == [
        (0, GiB, (0, 1)), (1, GiB, (2, 3)), (2, 512 * MiB, ())]
    assert all(d.policy == Policy() for d in topo.domains)
    assert topo.distances == ((10, 20, 30), (20, 10, 20), (30, 20, 10))


# ---------------------------------------------------------------- the example


def test_example_file_equals_builtin():
    assert EXAMPLE_FILE.read_text() == config.EXAMPLE_TOML


def test_example_file_builds_the_example():
    check_example(config.load(EXAMPLE_FILE).build(host_nodes=(0,)))


def test_builtin_example():
    check_example(config.example().build(host_nodes=(0,)))
    check_example(config.example().build())  # this host's nodes: no policy names one


def test_example_file_loads_by_str_path():
    check_example(config.load(str(EXAMPLE_FILE)).build(host_nodes=(0,)))


def test_example_lays_out():
    layout = plan_layout(config.example().build(host_nodes=(0,)))
    assert [len(d.ranges) for d in layout.domains] == [1, 1, 1]


# ---------------------------------------------------------------- pre-NUMA form


@pytest.mark.parametrize("text", [
    'cpus = 2\nmemory = "1G"\n',
    'version = 1\ncpus = 2\nmemory = "1G"\n',
    'cpus = 2\nmemory = 1073741824\n',
])
def test_pre_numa_form_is_the_classic_machine(text):
    t = loads(text).build(host_nodes=(0,))
    assert t.numa is False
    assert (t.cpus, t.memory) == (2, GiB)
    assert len(t.domains) == 1
    assert t.domains[0].cpus == (0, 1) and t.domains[0].size == GiB
    assert t.distances == ((10,),)


def test_pre_numa_form_from_a_file(tmp_path):
    p = tmp_path / "old.toml"
    p.write_text('cpus = 2\nmemory = "1G"\n')
    t = config.load(p).build(host_nodes=(0,))
    assert (t.numa, t.cpus, t.memory) == (False, 2, GiB)


def test_empty_file_is_the_default_classic_machine():
    t = loads("").build(host_nodes=(0,))
    assert (t.numa, t.cpus, t.memory) == (False, 1, 512 * MiB)


def test_only_cpus_or_only_memory():
    assert loads("cpus = 3\n").build(host_nodes=(0,)).memory == 512 * MiB
    assert loads('memory = "2G"\n').build(host_nodes=(0,)).cpus == 1


# ---------------------------------------------------------------- domains


def test_domains_with_arrays_and_policies():
    t = loads("""
version = 1
cpus = 3
memory = "3G"
[[domain]]
id = 0
cpus = [0, 1]
policy = "bind:1"
[[domain]]
id = 1
cpus = 2
size = "1G"
domain_policy = "rr"
[[domain]]
id = 2
""").build(host_nodes=HOSTS)
    assert [(d.size, d.cpus) for d in t.domains] == [(GiB, (0, 1)), (GiB, (2,)), (GiB, ())]
    assert t.domains[0].policy == Policy(Mode.BIND, (1,))
    assert t.domains[1].policy == Policy(Mode.INTERLEAVE, HOSTS)
    assert t.domains[2].policy == Policy()


def test_domain_size_bytes_and_zero():
    t = loads("""
[[domain]]
id = 0
size = 4194304
cpus = "0"
[[domain]]
id = 1
size = 0
cpus = "1"
""").build(host_nodes=(0,))
    assert [d.size for d in t.domains] == [4 * MiB, 0]


def test_domain_order_in_file_does_not_matter():
    t = loads('[[domain]]\nid = 1\nsize = "8M"\n[[domain]]\nid = 0\nsize = "4M"\ncpus = "0"\n').build(host_nodes=(0,))
    assert [d.size for d in t.domains] == [4 * MiB, 8 * MiB]


def test_file_domain_rules_name_the_file():
    msg = load_error('[[domain]]\nid = 0\nsize = "3M"\ncpus = "0"\n')
    assert msg.startswith("m.toml: domain id=0 size: must be a multiple of 2M"), msg
    msg = load_error('[[domain]]\nid = 0\nsize = "4M"\ncpus = "0"\npolicy = "bind:7"\n')
    # the file's key may be written policy or domain_policy; the node check says domain_policy
    assert msg.startswith(("m.toml: domain id=0 policy: host node 7 not online",
                           "m.toml: domain id=0 domain_policy: host node 7 not online")), msg
    msg = load_error('[[domain]]\nid = 0\nsize = "4M"\ncpus = "0"\n[[domain]]\nid = 0\nsize = "4M"\n')
    assert msg.startswith("m.toml: domain id=0: domain id 0 given twice"), msg


# ---------------------------------------------------------------- distances


def test_distance_entries():
    t = loads('distance = ["0:1=15"]\n[[domain]]\nid = 0\nsize = "4M"\ncpus = "0"\n'
              '[[domain]]\nid = 1\nsize = "4M"\n').build(host_nodes=(0,))
    assert t.distances == ((10, 15), (15, 10))


def test_distance_matrix():
    t = loads('distances = [[10, 21, 30], [22, 10, 40], [30, 40, 10]]\n'
              '[[domain]]\nid = 0\nsize = "4M"\ncpus = "0"\n'
              '[[domain]]\nid = 1\nsize = "4M"\n[[domain]]\nid = 2\nsize = "4M"\n').build(host_nodes=(0,))
    assert t.distances == ((10, 21, 30), (22, 10, 40), (30, 40, 10))


TWO_DOMAINS = '[[domain]]\nid = 0\nsize = "4M"\ncpus = "0"\n[[domain]]\nid = 1\nsize = "4M"\n'


@pytest.mark.parametrize("matrix,start", [
    ("[[10, 20], [20]]", "m.toml: distances: expected a square matrix"),
    ("[10, 20]", "m.toml: distances: expected a square matrix"),
    ('"10 20"', "m.toml: distances: expected a square matrix"),
    ("[[10, 20, 20], [20, 10, 20]]", "m.toml: distances: expected a square matrix"),
    ('[[10, "20"], [20, 10]]', "m.toml: distances[0][1]: expected a whole number"),
    ("[[10, 20.5], [20, 10]]", "m.toml: distances[0][1]: expected a whole number"),
    ("[[10, true], [20, 10]]", "m.toml: distances[0][1]: expected a whole number"),
    ("[[0, 20], [20, 10]]", "m.toml: distances[0][0]: a domain's distance to itself must be 10"),
    ("[[10, 5], [20, 10]]", "m.toml: distances[0][1]: distance must be 11..254"),
    ("[[10, 256], [256, 10]]", "m.toml: distances[0][1]: distance must be 11..254"),
    ("[[10, 20, 20], [20, 10, 20], [20, 20, 10]]", "m.toml: distances: a 3x3 matrix for 2 domains"),
])
def test_bad_matrix(matrix, start):
    msg = load_error(f"distances = {matrix}\n" + TWO_DOMAINS)
    assert msg.startswith(start), msg


def test_matrix_smaller_than_domains():
    msg = load_error("distances = [[10]]\n" + TWO_DOMAINS)
    assert msg.startswith("m.toml: distances"), msg


def test_matrix_and_entries_not_both():
    msg = load_error('distances = [[10, 20], [20, 10]]\ndistance = ["0:1=20"]\n' + TWO_DOMAINS)
    assert msg.startswith("m.toml: give distances (a matrix) or distance"), msg


def test_distance_entry_errors():
    msg = load_error('distance = ["0:1"]\n' + TWO_DOMAINS)
    assert msg.startswith("m.toml: distance[0]: expected I:J=D"), msg
    msg = load_error('distance = ["0:1=20", "0:1=9"]\n' + TWO_DOMAINS)
    assert msg.startswith("m.toml: distance[1] 0:1=9: distance must be 11..254"), msg


def test_distance_not_an_array():
    msg = load_error("distance = 5\n" + TWO_DOMAINS)
    assert msg.startswith("m.toml: distance"), msg


def test_distances_without_domains():
    msg = load_error('cpus = 1\ndistance = ["0:1=20"]\n')
    assert msg.startswith("--distance: ") or msg.startswith("m.toml"), msg


# ---------------------------------------------------------------- schema errors


@pytest.mark.parametrize("text,start", [
    ("cpu = 2\n", "m.toml: unknown key 'cpu'"),
    ("numa = true\n", "m.toml: unknown key 'numa'"),
    ("[[domains]]\nid = 0\n", "m.toml: unknown key 'domains'"),
    ('[[domain]]\nid = 0\nnode = 1\n', "m.toml: domain[0]: unknown key 'node'"),
    ('[[domain]]\nid = 0\nsize = "4M"\ncpus = "0"\n[[domain]]\nid = 1\nmem = "4M"\n',
     "m.toml: domain[1]: unknown key 'mem'"),
    ("version = 2\n", "m.toml: version must be 1..1, got 2"),
    ("version = 0\n", "m.toml: version must be 1..1, got 0"),
    ('version = "1"\n', "m.toml: version must be 1..1, got '1'"),
    ("version = 1.0\n", "m.toml: version must be 1..1"),
    ("version = true\n", "m.toml: version must be 1..1"),
    ("cpus = \n", "m.toml: not valid TOML"),
    ("[[domain]\n", "m.toml: not valid TOML"),
    ('cpus = "4"\n', "m.toml: cpus: expected a whole number"),
    ("cpus = 2.0\n", "m.toml: cpus: expected a whole number"),
    ("cpus = true\n", "m.toml: cpus: expected a whole number"),
    ('memory = "lots"\n', "m.toml: memory: expected a size"),
    ("memory = -1\n", "m.toml: memory: a size cannot be negative"),
    ("memory = 1.5\n", "m.toml: memory: expected a size"),
    ("domain = 5\n", "m.toml: domain must be an array of tables"),
    ("domain = [1, 2]\n", "m.toml: domain must be an array of tables"),
    ("[domain]\nid = 0\n", "m.toml: domain must be an array of tables"),
    ("[[domain]]\nsize = \"4M\"\n", "m.toml: domain[0]: id is required"),
    ('[[domain]]\nid = "0"\n', "m.toml: domain[0].id: expected a whole number"),
    ("[[domain]]\nid = -1\n", "m.toml: domain[0].id: must be 0 or more"),
    ('[[domain]]\nid = 0\nsize = true\n', "m.toml: domain id=0 size: "),
    ('[[domain]]\nid = 0\nsize = -4\n', "m.toml: domain id=0 size: a size cannot be negative"),
    ('[[domain]]\nid = 0\ncpus = "0,1"\n', "m.toml: domain id=0 cpus: "),
    ('[[domain]]\nid = 0\ncpus = [0, 0]\n', "m.toml: domain id=0 cpus: "),
    ('[[domain]]\nid = 0\ncpus = [-1]\n', "m.toml: domain id=0 cpus: "),
    ('[[domain]]\nid = 0\ncpus = ["0"]\n', "m.toml: domain id=0 cpus: "),
    ('[[domain]]\nid = 0\npolicy = "sometimes"\n', "m.toml: domain id=0 policy: unknown policy"),
    ('[[domain]]\nid = 0\npolicy = 3\n', "m.toml: domain id=0 policy: unknown policy"),
])
def test_schema_errors(text, start):
    msg = load_error(text)
    assert msg.startswith(start), msg


def test_negative_scalar_domain_cpus():
    msg = load_error('[[domain]]\nid = 0\nsize = "4M"\ncpus = -1\n')
    assert msg.startswith("m.toml: domain id=0 cpus: "), msg


def test_cannot_read(tmp_path):
    with pytest.raises(ConfigError) as ei:
        config.load(tmp_path / "missing.toml")
    assert str(ei.value).startswith("-f/--config: cannot read ")
    with pytest.raises(ConfigError, match=r"^-f/--config: .* is a directory; a regular file or a pipe"):
        config.load(tmp_path)  # a directory


def test_from_dict_direct():
    spec = config.from_dict({"cpus": 2, "memory": "64M"}, "dict")
    assert (spec.cpus, spec.memory, spec.domains, spec.distances) == (2, 64 * MiB, [], [])
    with pytest.raises(ConfigError, match=r"^dict: unknown key 'x'"):
        config.from_dict({"x": 1}, "dict")
