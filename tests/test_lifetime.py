"""Nothing outlives numavm: children die with it, a killed run's temp dirs go with the next run.

numavm is killed with SIGKILL (no handler runs) at several points of a real
boot on each engine; afterwards no process it started is left, no process
holds its guest memory, and the next run removes its temporary directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from numavm.host.lifetime import OwnedDir, sweep

ROOT = Path(__file__).resolve().parent.parent

from kvmtest import needs_apt, needs_kvm_engine, needs_qemu  # noqa: E402



# ---------------------------------------------------------------- helpers


def wait_for(pred, timeout: float, what: str, step: float = 0.002):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds no memory or files)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def dontfork_mappings(pid: int) -> int:
    """How many of `pid`'s mappings are marked MADV_DONTFORK: the KVM engine's guest RAM
    (private anonymous memory, numavm.host.memory.Anonymous); nothing else here uses it."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if line.startswith("VmFlags:") and " dc" in line)


def memfd_inodes(pid: int) -> set[tuple[int, int]]:
    """(dev, inode) of every numavm guest-memory memfd `pid` holds."""
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:numavm:"):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    out.add((st.st_dev, st.st_ino))
            except OSError:
                pass
    except OSError:
        pass
    return out


def holders(inodes: set[tuple[int, int]]) -> list[str]:
    """Every open fd on the host that is one of `inodes`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                found.append(f"pid {pid} fd {fd}")
    return found


def start(tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TMPDIR=str(tmp))
    return subprocess.Popen([sys.executable, "-m", "numavm", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(stream, needle: bytes, timeout: float) -> bytes:  # type: ignore[no-untyped-def]
    """Read `stream` (a pipe) until `needle` shows up; what was read."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    buf = b""
    end = time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0 or not sel.select(left):
            raise AssertionError(f"no {needle!r} in {buf[-2000:]!r}")
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            raise AssertionError(f"stream ended without {needle!r}: {buf[-2000:]!r}")
        buf += chunk
    sel.close()
    return buf


def kill_and_audit(proc: subprocess.Popen[bytes]) -> dict:  # type: ignore[type-arg]
    """SIGKILL numavm; wait until everything it started is gone; return what was seen."""
    kids = children(proc.pid)
    grandkids = [g for k in kids for g in children(k)]
    inodes = memfd_inodes(proc.pid)
    for k in kids:
        inodes |= memfd_inodes(k)
    proc.kill()
    proc.wait()
    for p in kids + grandkids:
        wait_for(lambda p=p: not running(p), 10, f"child {p} of the killed numavm to die")
    assert not holders(inodes), "guest memory still held after numavm died"
    for s in (proc.stdout, proc.stderr):
        if s is not None:
            s.close()
    return {"children": kids, "memfds": len(inodes)}


def owned(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("numavm-*"))


# ---------------------------------------------------------------- units


def test_child_dies_when_numavm_is_killed(tmp_path):
    """A child started with die_with_parent() gets SIGKILL when its parent is SIGKILLed."""
    code = ("import subprocess, sys, time\n"
            "from numavm.host.lifetime import die_with_parent\n"
            "p = subprocess.Popen(['sleep', '600'], preexec_fn=die_with_parent())\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert running(child)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    wait_for(lambda: not running(child), 10, "sleep to die with its parent")


def test_child_without_it_survives(tmp_path):
    """The control: the same child started plainly outlives its SIGKILLed parent (the test can fail)."""
    code = ("import subprocess, time\n"
            "p = subprocess.Popen(['sleep', '600'])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    parent.stdout.close()
    time.sleep(0.5)
    try:
        assert running(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_sweep_removes_only_dead_owners_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"numavm-tcg-{dead.pid}-abc").mkdir()
    (tmp_path / f"numavm-tcg-{dead.pid}-abc" / "qmp.sock").write_text("")
    (tmp_path / f"numavm-tcg-{os.getppid()}-live").mkdir()  # a live owner: kept
    (tmp_path / "numavm-tcg-notours").mkdir()  # not our naming: kept
    locked = tmp_path / f"numavm-tcg-{dead.pid}-locked"  # a dead pid here, but the lock is held
    locked.mkdir()                                       # (an owner in another pid namespace)
    import fcntl
    fd = os.open(locked, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with OwnedDir("tcg") as mine:  # creating one sweeps first
            assert mine.path.name.startswith(f"numavm-tcg-{os.getpid()}-")
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
                [f"numavm-tcg-{os.getppid()}-live", "numavm-tcg-notours", locked.name, mine.path.name])
            assert sweep("tcg") == []  # our own is never swept
        assert not mine.path.exists()
    finally:
        os.close(fd)
    assert sweep("tcg") == [locked]


def test_a_cache_write_killed_midway_is_swept_by_the_next(tmp_path):
    """write_atomic's temporary file outlives a writer killed by SIGKILL; the next write into
    that directory removes it, but never a live writer's, nor a file not of its naming."""
    from numavm.host.cache import write_atomic
    target = tmp_path / "vmlinux-x"
    writer = ("import os, sys, time; from pathlib import Path; from numavm.host.lifetime import owned_tmp_file; "
              "fd, tmp = owned_tmp_file(Path(sys.argv[1])); os.write(fd, b'half'); print(tmp, flush=True); "
              "os.kill(os.getpid(), 9) if sys.argv[2] == 'die' else time.sleep(60)")
    live = subprocess.Popen([sys.executable, "-c", writer, str(target), "live"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert live.stdout is not None
        busy = Path(live.stdout.readline().strip())
        killed = subprocess.run([sys.executable, "-c", writer, str(target), "die"], capture_output=True,
                                text=True, cwd=ROOT, timeout=60)
        assert killed.returncode == -signal.SIGKILL
        orphan = Path(killed.stdout.strip())
        other = tmp_path / ".notes.tmp"
        other.write_text("")
        assert orphan.exists() and busy.exists()
        write_atomic(target, b"whole")
        assert target.read_bytes() == b"whole"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, busy.name, other.name])
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- real boots


@needs_qemu
@needs_apt
def test_sigkill_during_a_tcg_boot_leaves_nothing(tmp_path):
    args = ("run", "--accel", "tcg", "--verbose", "--timeout", "300", "--", "sleep", "300")
    seen = []
    # 1. before QEMU starts: as soon as the engine is chosen
    proc = start(tmp_path, *args)
    read_until(proc.stderr, b"numavm: engine tcg", 60)
    seen.append(kill_and_audit(proc))

    # 2. QEMU started, paused by -S, numavm not yet past its QMP checks (no console yet)
    proc = start(tmp_path, *args)
    qemu = wait_for(lambda: children(proc.pid), 60, "QEMU to start", step=0.001)
    assert proc.poll() is None
    seen.append(kill_and_audit(proc))
    assert seen[-1]["children"] == qemu

    # 3. the guest runs: its console is streaming
    proc = start(tmp_path, *args)
    read_until(proc.stderr, b"Linux", 120)  # --verbose: the console is on stderr
    assert children(proc.pid), "QEMU should be running"
    seen.append(kill_and_audit(proc))
    assert seen[-1]["memfds"] >= 1 and seen[-1]["children"]

    assert owned(tmp_path), "the killed runs left their directories (as SIGKILL allows)"
    # the next run removes what the killed ones left
    r = subprocess.run([sys.executable, "-m", "numavm", "check", "--accel", "tcg", "--stage", "kernel"],
                       env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert owned(tmp_path) == []


@needs_kvm_engine
@needs_apt
@pytest.mark.kvm_boot
def test_sigkill_during_a_kvm_boot_leaves_nothing(tmp_path):
    args = ("check", "--accel", "kvm", "--stage", "kernel", "--verbose", "--timeout", "900")
    # early: the engine is chosen; then mid-boot: the guest kernel is printing
    for needle in (b"numavm: engine kvm", b"Linux version"):
        proc = start(tmp_path, *args)
        read_until(proc.stderr, needle, 600)  # a loaded host's emulating KVM: minutes
        if needle == b"Linux version":
            assert dontfork_mappings(proc.pid), "the guest's memory should be mapped by now"
        seen = kill_and_audit(proc)
        assert seen["children"] == []  # the KVM engine starts no process
    assert owned(tmp_path) == []


@needs_qemu
@needs_apt
def test_consecutive_checks_in_one_process_release_everything(tmp_path, monkeypatch):
    """bench.soak's measure, briefly: nothing a check allocates outlives it in the monitor process."""
    import tempfile

    from bench.soak import sample, soak
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # what this (pytest's) process holds already, an earlier test's exiting child among it
    before = sample()
    r = soak(["check", "--accel", "tcg", "--stage", "kernel"], 3, log=lambda s: None)
    assert r["codes"] == [0, 0, 0]
    first, last = r["samples"][0], r["samples"][-1]
    for key in ("fds", "threads", "memfds", "children", "temp"):
        assert last[key] == first[key], (key, r["samples"])
    assert first["temp"] == 0
    for key in ("memfds", "children"):
        assert first[key] <= before[key], (key, before, r["samples"])
    assert list(tmp_path.iterdir()) == []


def test_a_child_can_be_started_without_a_capability():
    """die_with_parent(drop_caps=...) takes the capability out of the child's bounding set (the
    TCG engine starts QEMU without CAP_MKNOD); the parent keeps its own."""
    from numavm.host.libc import CAP_MKNOD
    from numavm.host.lifetime import die_with_parent

    def bounding(text: str) -> int:
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("CapBnd:")), 16)

    mine = bounding(Path("/proc/self/status").read_text())
    child = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True, check=True,
                           preexec_fn=die_with_parent(drop_caps=(CAP_MKNOD,))).stdout
    assert not bounding(child) & 1 << CAP_MKNOD
    assert bounding(child) | 1 << CAP_MKNOD == mine | 1 << CAP_MKNOD  # nothing else dropped
    assert bounding(Path("/proc/self/status").read_text()) == mine
