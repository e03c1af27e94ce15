"""Fuzzing the command line in-process: generated bad machine specs and TOML files.

Every generated input holds at least one field that is bad on its own, so
the whole must be refused: exactly one stderr line starting
``numavm: error:``, exit status 2, no exception escaping `main`, and nothing
allocated (no new fds, threads, memfds or files in the temporary directory
or the cache).  Commands that run guests get the same inputs: they must
refuse them before they open /dev/kvm, create memory or start QEMU; a
``--kernel`` that does not exist makes any input that slipped through fail
the one-line assertion instead of booting.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from numavm.cli import main

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                database=None)


# ---------------------------------------------------------------- what "nothing allocated" means


def _snapshot(tmp: Path, cache: Path) -> dict[str, object]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the listing's own fd
    return {
        "fds": sorted(fds),
        "memfds": sorted(v for v in fds.values() if v.startswith("/memfd:")),
        "threads": threading.active_count(),
        "tasks": len(os.listdir("/proc/self/task")),
        "tmp": sorted(os.listdir(tmp)),
        "cache": sorted(os.listdir(cache)) if cache.exists() else [],
    }


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A private TMPDIR and XDG_CACHE_HOME for the whole module."""
    root = tmp_path_factory.mktemp("fuzz")
    tmp, cache = root / "tmp", root / "cache"
    tmp.mkdir()
    cache.mkdir()
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "XDG_CACHE_HOME")}
    os.environ.update(TMPDIR=str(tmp), XDG_CACHE_HOME=str(cache))
    old_tempdir, tempfile.tempdir = tempfile.tempdir, str(tmp)
    yield root, tmp, cache
    tempfile.tempdir = old_tempdir
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def refused(argv: list[str], tmp: Path, cache: Path) -> str:
    """Run `argv` in-process; assert the one-line refusal and that nothing was left allocated."""
    before = _snapshot(tmp, cache)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)  # an exception here is the failure "traceback"
    after = _snapshot(tmp, cache)
    text = err.getvalue()
    assert rc == 2, (argv, rc, text[-1000:])
    assert text.count("\n") == 1 and text.startswith("numavm: error: "), (argv, text[-2000:])
    assert out.getvalue() == "", argv
    assert after == before, (argv, before, after)
    return text


# ---------------------------------------------------------------- bad values, each bad on its own

ascii_ws = st.sampled_from(["", " ", "\t"])
junk_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
foreign_digits = st.sampled_from(["٤", "١٠", "۴", "४", "২", "๔", "４", "𝟒", "²", "½", "Ⅳ"])
not_a_count = st.one_of(
    junk_text.filter(lambda t: not re.fullmatch(r"[ \t]*[0-9]+[ \t]*", t)),
    foreign_digits,
    st.sampled_from(["1_0", "+2", "0x10", "1e2", "2.0", "nan", "-1", "0", "1025", "9" * 30, "", " "]),
    st.integers(1025, 10**30).map(str),
)
bad_size = st.one_of(
    junk_text.filter(lambda t: not re.fullmatch(r"[ \t]*[0-9]+[ \t]*([KMGTkmgt](i?[Bb])?|[Bb])?[ \t]*", t)),
    st.sampled_from(["1073741824BiB", "8IB", "1iB", "1GG", "1.5G", "1_024M", "١G", "-1G", "1P", "0", "3M",
                     "1K", "2049K", "65T", "99999999999999999999T", "1e9"]),
    st.builds(lambda d, s: d + s, foreign_digits, st.sampled_from(["", "M", "G"])),
)
bad_seconds = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "0", "0.0", "-1", "1e3", "1_0", "١", "", "1.2.3",
                     "+1", "0x10", "1e-3", " ", "1 s", "10s"]),
    junk_text.filter(lambda t: not re.fullmatch(r"[ \t]*([0-9]+(\.[0-9]*)?|\.[0-9]+)[ \t]*", t)),
)
LIST_RE = r"[ \t]*[0-9]+(-[0-9]+)?([ \t]*\+[ \t]*[0-9]+(-[0-9]+)?)*[ \t]*"
bad_list = st.one_of(
    st.sampled_from(["", "1-0", "0-99999999", "0+0", "a", "0,1", "0-", "-1", "٠", "1_0", "0--1", "++"]),
    junk_text.filter(lambda t: not re.fullmatch(LIST_RE, t)),
)
bad_policy = st.one_of(st.sampled_from(["bind", "bind:99", "bogus", "preferred:0+1", "interleave:٠", "local:0",
                                        "bind:0-", "weighted-interleave", ""]),
                       junk_text.filter(lambda t: ":" not in t and t.strip().lower() not in (
                           "local", "default", "ft", "first-touch", "interleave", "il", "rr", "round-robin")))
good_numa = st.builds(lambda i, size, cpus: f"id={i}" + (f",size={size}" if size else "") + (f",cpus={cpus}" if cpus else ""),
                      st.integers(0, 3), st.sampled_from(["", "64M", "1G", "0"]), st.sampled_from(["", "0", "1", "0-1"]))


@st.composite
def bad_numa(draw) -> str:  # type: ignore[no-untyped-def]
    """One -n value that is wrong whatever else is on the line."""
    kind = draw(st.sampled_from(["id", "size", "cpus", "policy", "hugepages", "key", "nokv", "noid", "twice", "junk"]))
    base = {"id": "0", "size": "64M", "cpus": "0"}
    if kind == "id":
        base["id"] = draw(st.one_of(
            foreign_digits, st.sampled_from(["1_0", "+2", "-1", "0x1", "9" * 25, "", "1.0"]),
            junk_text.filter(lambda t: not re.fullmatch(r"[ \t]*[0-9]+[ \t]*", t) and "," not in t)))
    elif kind == "size":
        base["size"] = draw(bad_size.filter(lambda t: "," not in t))
    elif kind == "cpus":
        base["cpus"] = draw(bad_list.filter(lambda t: "," not in t))
    parts = [f"{k}={v}" for k, v in base.items()]
    if kind == "policy":
        parts.append("domain_policy=" + draw(bad_policy.filter(lambda t: "," not in t)))
    elif kind == "hugepages":
        parts.append("hugepages=" + draw(junk_text.filter(
            lambda t: "," not in t and t.strip().lower() not in ("thp", "hugetlbfs", "none"))))
    elif kind == "key":
        parts.append(draw(st.sampled_from(["bogus", "node", "mem", "cpu"])) + "=1")
    elif kind == "nokv":
        parts.append(draw(st.sampled_from(["size", "x", "cpus"])))
    elif kind == "noid":
        parts = parts[1:]
    elif kind == "twice":
        parts.append("size=64M")
    elif kind == "junk":
        return draw(junk_text.filter(lambda t: "id=" not in t))
    draw(st.randoms()).shuffle(parts)
    return ",".join(parts)


bad_distance = st.one_of(
    st.sampled_from(["0:1=2_0", "0:1=٢٠", "0:1", "0=20", "0:1=10", "0:1=256", "0:1=0", "0:0=20", "0:9=20",
                     "a:b=c", "", "0:1=20=3", "-1:0=20", "0:1=nan"]),
    junk_text.filter(lambda t: not re.fullmatch(r"[ \t]*[0-9]+[ \t]*:[ \t]*[0-9]+[ \t]*=[ \t]*[0-9]+[ \t]*", t)),
)


@st.composite
def bad_argv(draw) -> list[str]:  # type: ignore[no-untyped-def]
    """A command with plausible options around at least one bad one."""
    command = draw(st.sampled_from(["plan", "plan", "export", "acpi", "check", "run"]))
    argv = [command]
    # plausible company, so that the bad field is not always alone
    if draw(st.booleans()):
        argv += ["-c", draw(st.sampled_from(["1", "2", "4"]))]
    if draw(st.booleans()):
        argv += ["-m", draw(st.sampled_from(["512M", "1G", "2G"]))]
    for spec in draw(st.lists(good_numa, max_size=3)):
        argv += ["-n", spec]
    bad = draw(st.sampled_from(["cpus", "memory", "numa", "distance", "host-nodes", "timeout", "prefault",
                                "accel", "stage", "to"]))
    guest = command in ("check", "run")
    if bad in ("timeout", "prefault", "accel") and not guest:
        bad = "cpus"
    if bad == "stage" and command != "check":
        bad = "memory"
    if bad == "to" and command != "export":
        bad = "numa"
    if bad == "host-nodes" and guest:
        bad = "distance"
    value = {
        "cpus": not_a_count, "memory": bad_size, "numa": bad_numa(), "distance": bad_distance,
        "host-nodes": bad_list.filter(lambda t: not re.fullmatch(LIST_RE, t.replace(",", "+"))),
        "timeout": bad_seconds, "prefault": bad_list,
        "accel": junk_text.filter(lambda t: t not in ("kvm", "tcg", "auto")),
        "stage": junk_text.filter(lambda t: t not in ("kernel", "userspace")),
        "to": junk_text.filter(lambda t: t not in ("qemu", "libvirt", "cloud-hypervisor", "bhyve", "toml")),
    }[bad]
    flag = {"cpus": "-c", "memory": "-m", "numa": "-n"}.get(bad, f"--{bad}")
    argv += [f"{flag}={draw(value)}"]  # "=": a value starting with "-" stays a value
    if command == "export" and bad != "to":
        argv += ["--to", "qemu"]
    if command == "acpi":
        argv += ["--out", "/nonexistent-numavm-fuzz/out"]
    if guest:
        argv += ["--kernel", "/nonexistent-numavm-fuzz/vmlinuz"]
    if command == "run" and draw(st.booleans()):
        argv += ["--", "true"]
    event(f"bad {bad}")
    return argv


@settings(max_examples=1200, **SETTINGS)  # type: ignore[arg-type]
@given(bad_argv())
def test_fuzz_bad_options_are_refused_in_one_line(sandbox, argv):
    _, tmp, cache = sandbox
    refused(argv, tmp, cache)


# ---------------------------------------------------------------- bad TOML files

toml_key = st.sampled_from(["cpus", "memory", "version", "distance", "distances", "domain", "id", "size",
                            "policy", "hugepages", "bogus"])
scalars = st.one_of(st.integers(-2**63, 2**63 - 1), st.booleans(), st.floats(allow_nan=True), junk_text,
                    st.sampled_from(["1G", "0-1", "bind:0", "0:1=20", "thp"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(toml_key, inner, max_size=3)), max_leaves=12)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, str):
        return json.dumps(v)  # JSON's string escapes are TOML's basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


# One line that is wrong on its own, whatever the rest of the file holds.
bad_toml_lines = st.one_of(
    st.builds(lambda v: f"bogus = {toml_value(v)}", values),
    st.builds(lambda v: f"version = {toml_value(v)}", values.filter(lambda v: v != 1 or isinstance(v, bool))),
    st.builds(lambda v: f"cpus = {toml_value(v)}",
              values.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024))),
    st.builds(lambda s: f"memory = {json.dumps(s)}", bad_size),
    st.builds(lambda s: f"distance = [{json.dumps(s)}]", bad_distance),
    st.builds(lambda v: f"domain = {toml_value(v)}", values.filter(lambda v: not isinstance(v, list))),
    st.builds(lambda d: "a = " + "[" * d + "]" * d, st.integers(17, 5000)),
    st.builds(lambda d: "a = " + "{b=" * d + "}" * d, st.integers(17, 5000)),
    st.builds(lambda d: "cpus." + ".".join(["a"] * d) + " = 1", st.integers(17, 5000)),
    st.just("cpus = 1\ncpus = 2"),
    st.just("[[domain]]\nid = 0\ncpus = \"0\"\nsize = \"1_024M\""),
)
good_toml_lines = st.sampled_from(["cpus = 2", 'memory = "1G"', "version = 1", "# a comment", "",
                                   '[[domain]]\nid = 0\ncpus = "0-1"\nsize = "512M"'])


@st.composite
def bad_toml(draw) -> bytes:  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["lines", "lines", "binary", "not-utf8", "huge"]))
    event(f"toml {kind}")
    if kind == "binary":  # anything, with a byte no UTF-8 text holds
        data = draw(st.binary(max_size=400))
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80"])) + data[at:]
    if kind == "huge":
        return b"# " + b"x" * ((1 << 20) + draw(st.integers(0, 1000))) + b"\ncpus = 2\n"
    top = draw(st.lists(good_toml_lines.filter(lambda l: not l.startswith("[")), max_size=3))
    bad = draw(bad_toml_lines)
    tail = draw(st.lists(good_toml_lines, max_size=2))
    lines = top + [bad] + tail
    text = "\n".join(lines) + "\n"
    if kind == "not-utf8":
        return text.encode() + b"# \xe9\n"
    return text.encode()


@settings(max_examples=800, **SETTINGS)  # type: ignore[arg-type]
@given(bad_toml(), st.sampled_from(["plan", "export", "check", "run"]))
def test_fuzz_bad_toml_files_are_refused_in_one_line(sandbox, data, command):
    root, tmp, cache = sandbox
    f = root / "machine.toml"
    f.write_bytes(data)
    argv = [command, "-f", str(f)]
    if command == "export":
        argv += ["--to", "toml"]
    if command in ("check", "run"):
        argv += ["--kernel", "/nonexistent-numavm-fuzz/vmlinuz"]
    refused(argv, tmp, cache)
