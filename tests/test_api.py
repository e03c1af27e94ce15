"""numavm as a library (numavm.api) and its pytest plugin (numavm.pytest_plugin).

The machine from keywords, from the command line's options and from TOML is
one machine; its plan is `plan --json`'s document; its errors are the
command line's lines.  Real TCG boots prove `run()` (the command's streams
apart from the console, the guest's topology, the engine, the audit), two
machines running at once from threads, `check()`, and the plugin running
examples/pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import numavm
from numavm import cli
from numavm.api import CommandResult, GuestFailed, Machine, Verdict
from numavm.vmm.engine import detect
from numavm.errors import ConfigError
from numavm.vmm.run import Outcome

from kvmtest import KVM_ONLY_MODULES, needs_apt, needs_qemu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = (0,)  # policies checked against a one-node host, whatever runs the tests

TWO = ["-c", "2", "-m", "512M", "-n", "id=0,cpus=0", "-n", "id=1,cpus=1,domain_policy=bind:0",
       "--distance", "0:1=21"]
TWO_TOML = """\
cpus = 2
memory = "512M"
distance = ["0:1=21"]

[[domain]]
id = 0
cpus = "0"

[[domain]]
id = 1
cpus = [1]
policy = "bind:0"
"""


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("numavm: error: ")
    return err[len("numavm: error: "):]


# ---------------------------------------------------------------- machines and plans


def test_keywords_options_and_toml_make_one_machine(tmp_path: Path) -> None:
    want = Machine.from_options([*TWO, "--host-nodes", "0"]).plan().to_dict()
    path = tmp_path / "two.toml"
    path.write_text(TWO_TOML)
    same = [
        Machine(cpus=2, memory="512M", domains=["id=0,cpus=0", "id=1,cpus=1,domain_policy=bind:0"],
                distances=["0:1=21"], host_nodes=HOST),
        Machine(cpus=2, memory=512 << 20, domains=[{"id": 0, "cpus": "0"}, {"id": 1, "cpus": [1], "policy": "bind:0"}],
                distances=[[10, 21], [21, 10]], host_nodes=HOST),
        Machine(cpus=2, memory="512M", domains=["id=0,cpus=0", {"id": 1, "cpus": "1", "policy": "bind:0"}],
                distances={(0, 1): 21}, host_nodes=HOST),
        Machine.from_toml(path, host_nodes=HOST),
        Machine.from_toml(str(path), host_nodes=HOST),
        Machine.from_toml(TWO_TOML, host_nodes=HOST),
    ]
    for m in same:
        assert m.plan().to_dict() == want
    assert want["distances"] == [[10, 21], [21, 10]] and [d["cpus"] for d in want["domains"]] == [[0], [1]]
    assert want["domains"][1]["policy"] == {"mode": "bind", "nodes": [0]}


def test_plan_is_what_plan_json_prints() -> None:
    for options in ([], TWO, ["--like-host", "-m", "256M"], ["-f", str(ROOT / "examples" / "cxl-tiered.toml")]):
        r = subprocess.run([sys.executable, "-m", "numavm", "plan", "--json", *options], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        plan = Machine.from_options(options).plan()
        assert plan.to_dict() == json.loads(r.stdout) and json.loads(plan.to_json()) == json.loads(r.stdout)
    example = Machine.example().plan()
    assert example.to_dict() == Machine.from_options([]).plan().to_dict()
    assert example.topology.cpus == 4 and [d.id for d in example.layout.domains] == [0, 1, 2]
    assert "2 (memory-only)  512M" in example.text() and example.svg().startswith("<svg")
    classic = Machine().plan().to_dict()  # no keywords: the classic machine, not the example
    assert classic["numa"] is False and classic["cpus"] == 1 and classic["memory"] == 512 << 20


@pytest.mark.parametrize("options", [
    ["-n", "id=0,cpus=0"],  # no memory for a domain without size
    ["-n", "id=1,size=64M"],  # ids from 0
    ["-m", "12Q"],
    ["-c", "x"],
    ["-c", "2", "-m", "1G", "-n", "id=0,cpus=0", "-n", "id=1,cpus=1", "--distance", "0:1=5"],
    ["-n", "id=0,size=64M,cpus=0,domain_policy=bind:7", "--host-nodes", "0"],
    ["--hmat", "0:9,latency=10"],
    ["--bogus"],
])
def test_errors_are_the_command_lines_lines(options: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_error(["plan", *options], capsys)
    with pytest.raises(ConfigError) as e:
        Machine.from_options(options)
    assert str(e.value) == line


def test_keyword_errors_name_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    for kw, argv in (({"memory": "12Q"}, ["-m", "12Q"]), ({"cpus": 0}, ["-c", "0"]),
                     ({"domains": ["id=0,cpus=0,size=3M"]}, ["-n", "id=0,cpus=0,size=3M"]),
                     ({"domains": ["id=0,size=64M,cpus=0"], "distances": ["0:0=12"]},
                      ["-n", "id=0,size=64M,cpus=0", "--distance", "0:0=12"])):
        with pytest.raises(ConfigError) as e:
            Machine(**kw)  # type: ignore[arg-type]
        assert str(e.value) == cli_error(["plan", *argv], capsys)
    with pytest.raises(ConfigError, match=r"^domains\[0\]: expected a -n string or a mapping"):
        Machine(domains=[3])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"^domains: domain\[0\]: unknown key 'sise'"):
        Machine(domains=[{"id": 0, "sise": "1G"}])
    with pytest.raises(ConfigError, match=r"^distances: a 1x1 matrix for 2 domains"):
        Machine(memory="1G", domains=["id=0,cpus=0", "id=1"], distances=[[10]])
    with pytest.raises(ConfigError, match="must be a list of strings"):
        Machine.from_options("-c 2")  # type: ignore[arg-type]


def test_bad_run_input_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    m = Machine.from_options(TWO)
    log = tmp_path / "console.log"
    for kw, message in (({"timeout": -1}, "--timeout: expected a number of seconds more than 0"),
                        ({"timeout": "soon"}, "--timeout"),
                        ({"accel": "fast"}, "--accel: must be one of auto, kvm, tcg, got 'fast'"),
                        ({"prefault": [7]}, "--prefault: no domain 7 with memory"),
                        ({"hugepages": "giant"}, "--hugepages: must be one of thp, hugetlbfs"),
                        ({"kernel": tmp_path / "none"}, "--kernel: "),
                        ({"release": "no such release!"}, "--release")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            m.run("true", console_log=log, **kw)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=re.escape(message)):
            m.check(console_log=log, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^--stage: must be one of kernel, userspace"):
        m.check(stage="firmware")
    assert not log.exists()


def test_import_numavm_is_cheap_and_the_api_loads_no_kvm_code() -> None:
    code = ("import sys, numavm; first = sorted(m for m in sys.modules if m.startswith('numavm')); "
            "m = numavm.Machine.example(); m.plan().to_dict(); "
            "e = m.engine('tcg') if numavm.api.__name__ and __import__('shutil').which('qemu-system-x86_64') else None; "
            "import numavm.pytest_plugin; "
            f"print(first, sorted(m for m in sys.modules if m.startswith({KVM_ONLY_MODULES!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['numavm'] []"


# ---------------------------------------------------------------- real boots (TCG)


@needs_qemu
@needs_apt
def test_run_gives_status_streams_topology_engine_and_audit(monkeypatch) -> None:
    import threading

    import numavm.api
    m = Machine.from_options(TWO)
    logged: list[str] = []
    started: list[str] = []  # the engine calls GuestRun.on_start once, from this thread, once QEMU runs
    monkeypatch.setattr(numavm.api, "_read_results_soon",
                        lambda *mods: lambda: started.append(threading.current_thread().name))
    r = m.run(["sh", "-c", "cat /sys/devices/system/node/node1/distance; printf 'x\\0y'; echo oops >&2; exit 7"],
              accel="tcg", timeout=300, log=logged.append)
    assert started == ["MainThread"]
    assert isinstance(r, CommandResult)
    assert r.status == 7 and r.exit_code == 7 and r.outcome is Outcome.POWEROFF
    assert r.stdout == b"21 10\nx\0y" and r.stderr == b"oops\n"
    assert "@@NUMAVM-EXIT 7@@" in r.console and "numavm-dmesg" in r.console
    assert r.topology is not None and sorted(r.topology.nodes) == [0, 1]
    assert r.topology.nodes[1].cpus == {1} and r.topology.nodes[1].distance == (21, 10)
    assert r.topology.online_cpus == "0-1" and r.topology.kernel
    assert r.engine == "tcg" and r.engine_why.startswith("engine tcg (asked for)")
    assert f"numavm: {r.engine_why}" in logged
    assert "domain 1:" in r.placement and "bind" in r.placement
    # a callable or a stream takes the output as it comes, instead of the result
    chunks: list[bytes] = []
    r2 = m.run("echo to-sink; echo to-err >&2", accel="tcg", timeout=300, stdout=chunks.append)
    assert b"".join(chunks) == b"to-sink\n" and r2.stdout == b"" and r2.stderr == b"to-err\n"


@needs_qemu
@needs_apt
def test_two_machines_run_at_once_from_threads() -> None:
    machines = [Machine.from_options(TWO),
                Machine.from_options(["-c", "3", "-m", "768M", "-n", "id=0,cpus=0", "-n", "id=1,cpus=1",
                                      "-n", "id=2,cpus=2", "--distance", "0:2=33"])]
    spans: dict[int, tuple[float, float]] = {}
    threads: dict[int, str] = {}

    def run(k: int) -> CommandResult:
        start = time.monotonic()
        r = machines[k].run("cat /sys/devices/system/node/online; cat /sys/devices/system/node/node0/distance",
                            accel="tcg", timeout=300)
        spans[k] = (start, time.monotonic())
        threads[k] = threading.current_thread().name
        return r

    with ThreadPoolExecutor(2) as ex:
        a, b = ex.map(run, (0, 1))
    assert a.stdout == b"0-1\n10 21\n" and b.stdout == b"0-2\n10 20 33\n"
    assert sorted(a.topology.nodes) == [0, 1] and sorted(b.topology.nodes) == [0, 1, 2]  # type: ignore[union-attr]
    assert threads[0] != threads[1] and threading.main_thread().name not in threads.values()
    # both guests were running at the same time: each run began before the other ended
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


@needs_qemu
@needs_apt
def test_a_guest_that_does_not_power_off_raises_with_the_command_lines_line() -> None:
    with pytest.raises(GuestFailed, match=r"^guest timeout: no end after 1\.5 s$") as e:
        Machine.from_options(TWO).run("sleep 600", accel="tcg", timeout=1.5)
    assert e.value.exit_code == 73 and e.value.outcome is Outcome.TIMEOUT
    assert e.value.result.stdout == b""


@needs_qemu
@needs_apt
def test_check_returns_the_verdict() -> None:
    v = Machine.from_options(TWO).check(accel="tcg", timeout=300)
    assert isinstance(v, Verdict)
    assert v.match and v.mismatches == [] and v.exit_code == 0, v.mismatches
    assert v.stage == "userspace" and v.engine == "tcg" and v.outcome is Outcome.POWEROFF
    doc = v.to_dict()
    assert doc["match"] is True and doc["expected"] == Machine.from_options(TWO).plan().to_dict()
    assert "MATCH: the guest saw the planned topology" in v.text()
    assert "domain 1:" in v.placement


# ---------------------------------------------------------------- the pytest plugin


def pytest_in(where: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """pytest in a child process, the plugin loaded by its entry point only (no -p)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args],
                          cwd=where, capture_output=True, text=True, timeout=1200, env=env)


def test_the_plugin_is_registered_by_its_entry_point() -> None:
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="pytest11") if e.name == "numavm"] == ["numavm.pytest_plugin"]


def test_plugin_skips_with_the_reason_where_no_engine_can_run(tmp_path: Path) -> None:
    (tmp_path / "test_guest.py").write_text(
        "import pytest\n"
        "@pytest.mark.numavm('-c', '2', '-m', '256M', '-n', 'id=0,cpus=0', '-n', 'id=1,cpus=1')\n"
        "def test_marked(numavm_guest):\n"
        "    numavm_guest.run('true')\n"
        "@pytest.mark.numavm('-n', 'id=1,size=64M')\n"
        "def test_bad_machine(numavm_guest):\n"
        "    pass\n")
    env = dict(os.environ, PATH=str(tmp_path))  # no qemu-system-x86_64 on it
    r = pytest_in(tmp_path, "--numavm-accel", "tcg", env=env)
    out = r.stdout
    assert "1 skipped" in out and "1 error" in out, out
    assert re.search(r"SKIPPED .*numavm: no engine can run this guest here: --accel tcg: "
                     r"qemu-system-x86_64 not found", out), out
    # a machine that is not one is the test's mistake: an error with numavm's line, not a skip
    assert "ConfigError: -n/--numa: domain ids must run from 0" in out or "domain ids" in out, out


@pytest.mark.skipif(not (detect().kvm_usable and detect().emulated), reason="needs a KVM that emulates guest code")
def test_plugin_skips_on_a_kvm_that_cannot_reach_userspace(tmp_path: Path) -> None:
    (tmp_path / "test_guest.py").write_text("def test_example(numavm_guest):\n    numavm_guest.run('true')\n")
    r = pytest_in(tmp_path, "--numavm-accel", "kvm")
    assert "1 skipped" in r.stdout, r.stdout
    assert re.search(r"SKIPPED .*numavm: engine kvm \(asked for\): .*emulates guest .*cannot reach userspace",
                     r.stdout), r.stdout


@needs_qemu
@needs_apt
def test_the_example_suite_passes() -> None:
    """examples/pytest: a NUMA-aware program and numactl on three topologies, through the plugin."""
    r = pytest_in(ROOT, "-q", "examples/pytest")
    assert r.returncode == 0, r.stdout[-4000:]
    numactl = subprocess.run(["sh", "-c", "command -v numactl"], capture_output=True).returncode == 0
    assert re.search(rf"\b{7 if numactl else 4} passed\b", r.stdout), r.stdout[-2000:]
    assert numavm.__version__
