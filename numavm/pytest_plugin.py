"""numavm's pytest plugin: tests that run commands in a guest with a given NUMA topology.

Installing numavm is enough: pytest loads this module through the ``pytest11`` entry
point in numavm's pyproject.toml.  It gives a marker and a fixture::

    import pytest

    @pytest.mark.numavm("-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M,cpus=1")
    def test_two_nodes(numavm_guest):
        r = numavm_guest.run("cat /sys/devices/system/node/online")
        assert r.status == 0 and r.out == "0-1\\n"

    @pytest.mark.parametrize("numavm_guest", [["-n", "id=0,size=256M,cpus=0"], "machine.toml",
                                              numavm.Machine(cpus=2, ...)], indirect=True)
    def test_each(numavm_guest): ...

The machine is the marker's positional arguments (the command line's machine options)
or its keywords `toml=` (a path or TOML text) or `Machine(...)`'s keywords (`cpus=`,
`memory=`, `domains=`, `distances=`...); an indirect parameter (a `numavm.Machine`, a list
of options, a TOML path or text, or a dict of keywords) takes precedence.  The marker's
`accel=`, `timeout=` (default 300 s), `add=`, `kernel=`, `release=`, `shares=` (``--share``'s
strings) and `host_root=` are the defaults of every `numavm_guest.run()`; ``pytest --numavm-accel tcg`` sets the engine for all tests.

`numavm_guest.run(command, **kw)` boots the machine, runs the command and returns a
`numavm.CommandResult` (status, stdout, stderr, the guest's topology, engine, placement);
each call is a fresh boot (a few seconds under TCG).  The test is skipped, with the reason,
where no engine can run the guest here (no /dev/kvm and no QEMU, a KVM that emulates guest
code and cannot reach userspace, a layout the available engine refuses) or where numavm
cannot get a guest kernel.  A machine that is not valid fails the test with numavm's
one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from numavm.api import CommandResult, Machine, Plan, Verdict
    from numavm.vmm.engine import Engine

MARKER = ("numavm(*options, toml=None, accel='auto', timeout=300, add=(), kernel=None, release=None, "
          "shares=(), host_root=False, "
          "**machine_keywords): the machine the numavm_guest fixture boots (numavm's machine options, "
          "a TOML path or text, or numavm.Machine keywords)")
RUN_DEFAULTS = ("accel", "timeout", "add", "kernel", "release", "shares", "host_root")
CHECK_IGNORES = ("add", "shares", "host_root")  # run()'s alone: check() boots numavm's report only
DEFAULT_TIMEOUT = 300.0
_assets_problem: dict[tuple[str | None, str | None], str | None] = {}  # per (kernel, release), per session


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--numavm-accel", metavar="kvm|tcg|auto", default=None,
                     help="numavm: the engine for every numavm_guest (default: each marker's accel, else auto)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


class Guest:
    """A machine to run commands in, with the engine that will run it; from the `numavm_guest` fixture."""

    def __init__(self, machine: Machine, engine: Engine, defaults: Mapping[str, Any]) -> None:
        self.machine = machine
        self.engine = engine  # `.name`, `.why`
        self.defaults = dict(defaults)

    @property
    def plan(self) -> Plan:
        return self.machine.plan()

    def run(self, command: Sequence[str] | str | None = None, **kw: Any) -> CommandResult:
        """Boot the guest and run `command` (`numavm.Machine.run`; the marker's defaults apply)."""
        return self.machine.run(command, **{**self.defaults, **kw})

    def check(self, **kw: Any) -> Verdict:
        """`numavm check` on this machine (`numavm.Machine.check`)."""
        kw = {**{k: v for k, v in self.defaults.items() if k not in CHECK_IGNORES}, **kw}
        return self.machine.check(**kw)

    def __repr__(self) -> str:
        return f"<numavm guest {self.machine!r} on {self.engine.name}>"


def machine_from(source: Any) -> Machine:
    """A `numavm.Machine` from what a test names: a Machine, a list of machine options, a TOML
    path or text, or a dict of Machine keywords."""
    from numavm.api import Machine
    from numavm.errors import ConfigError

    if isinstance(source, Machine):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Machine.from_toml(source)
    if isinstance(source, Mapping):
        return Machine(**source)
    if isinstance(source, Sequence):
        return Machine.from_options(list(source))
    raise ConfigError(f"numavm_guest: a machine is a numavm.Machine, a list of options, a TOML path or text, "
                      f"or a dict of Machine keywords, got {source!r}")


@pytest.fixture
def numavm_guest(request: pytest.FixtureRequest) -> Guest:
    """A guest with the topology the test names (marker `numavm` or an indirect parameter)."""
    from numavm.errors import ConfigError
    from numavm.vmm.engine import ACCELS

    marker = request.node.get_closest_marker("numavm")
    args: tuple[Any, ...] = marker.args if marker else ()
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    defaults = {k: kwargs.pop(k) for k in RUN_DEFAULTS if k in kwargs}
    defaults.setdefault("timeout", DEFAULT_TIMEOUT)
    forced = request.config.getoption("--numavm-accel")
    if forced is not None:
        defaults["accel"] = forced
    accel = defaults.get("accel", "auto")
    if accel not in ACCELS:
        raise ConfigError(f"numavm: accel must be one of {', '.join(ACCELS)}, got {accel!r}")
    toml = kwargs.pop("toml", None)
    if hasattr(request, "param"):
        machine = machine_from(request.param)
    elif toml is not None:
        machine = machine_from(toml)
    elif kwargs:
        machine = machine_from(kwargs)
    else:
        machine = machine_from(list(args))  # none at all: the built-in example, as on the command line
    try:
        engine = machine.engine(accel)
    except ConfigError as e:
        pytest.skip(f"numavm: no engine can run this guest here: {e}")
    if engine.emulates_guest_code:
        pytest.skip(f"numavm: {engine.why}: the guest cannot reach userspace to run commands")
    problem = _assets(defaults.get("kernel"), defaults.get("release"))
    if problem:
        pytest.skip(f"numavm: no guest kernel: {problem}")
    return Guest(machine, engine, defaults)


def _assets(kernel: Any, release: str | None) -> str | None:
    """Why numavm cannot get the guest's kernel and busybox (fetched once per session), or None."""
    from numavm.errors import ConfigError, NumavmError
    from numavm.guest.launch import guest_assets

    key = (None if kernel is None else os.fspath(kernel), release)
    if key not in _assets_problem:
        try:
            guest_assets(key[0], lambda line: None, release)
            _assets_problem[key] = None
        except ConfigError:
            raise  # the test named a kernel or release that is not one: its mistake
        except (NumavmError, OSError) as e:
            _assets_problem[key] = " ".join(str(e).split())
    return _assets_problem[key]
