"""Spawning the sides: console readers, QMP, /proc readings, cleanup.

Every timing here is taken in the harness process with time.monotonic(), from
just before the child is spawned to the moment its output is read, so numavm
and QEMU are observed the same way.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

QEMU = shutil.which("qemu-system-x86_64")
ROOT = Path(__file__).resolve().parent.parent  # the repository: children import numavm from it


class BenchError(RuntimeError):
    """A side could not be measured (the reason goes into the table)."""


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class Spawned:
    """A child with stdout (and optionally stdin) as pipes; output kept with timestamps."""

    def __init__(self, argv: Sequence[str], *, stdin: bool = False, env: dict[str, str] | None = None,
                 stderr_to_stdout: bool = False, cwd: str | None = None) -> None:
        self.argv = list(argv)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if stderr_to_stdout else subprocess.PIPE,
            env=env, cwd=cwd, start_new_session=True)
        self.out = bytearray()
        self.err = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, marker: bytes, timeout: float, start: int = 0) -> float:
        """Seconds from spawn until `marker` appears on stdout (searched from byte `start`)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = self.t0 + timeout
        while True:
            if self.out.find(marker, max(0, start)) >= 0:
                return time.monotonic() - self.t0
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no {marker!r} within {timeout:g} s; last output: {self.tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                now = time.monotonic()
                if not chunk:
                    self.proc.wait(5)
                    raise BenchError(f"exited ({self.proc.returncode}) before {marker!r}: {self.tail()}")
                self.out += chunk
                if self.out.find(marker, max(0, start)) >= 0:
                    return now - self.t0

    def wait_for_re(self, pattern: bytes, timeout: float) -> float:
        """Seconds from spawn until the regex `pattern` matches stdout."""
        import re
        rx = re.compile(pattern)
        deadline = self.t0 + timeout
        pos = 0
        while True:
            if rx.search(self.out):
                return time.monotonic() - self.t0
            pos = len(self.out)
            # wait for any new byte, then look again (a line arrives in pieces)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no /{pattern.decode()}/ within {timeout:g} s; last output: {self.tail()}")
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout.fileno()], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                now = time.monotonic()
                if not chunk:
                    self.proc.wait(5)
                    raise BenchError(f"exited ({self.proc.returncode}) before /{pattern.decode()}/: "
                                     f"{self.tail()}")
                self.out += chunk
                if rx.search(self.out, max(0, pos - 200)):
                    return now - self.t0

    def tail(self, n: int = 300) -> str:
        err = b""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            try:
                err = self.proc.stderr.read() or b""
            except (OSError, ValueError):
                pass
        text = (bytes(self.out[-n:]) + b" | " + err[-n:]).decode(errors="replace")
        return " ".join(text.split())

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the child's process group and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(30)
        finally:
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass

    def finish(self, timeout: float = 60) -> int:
        """Wait for a normal exit (reading what is left), then clean up."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
            self.out += out or b""
            self.err = err or b""
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"did not exit within {timeout:g} s; last output: {self.tail()}")
        return self.proc.returncode

    def __enter__(self) -> "Spawned":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def python_child(module_args: Sequence[str], **kw) -> Spawned:
    """`python -m bench.child ...`: numavm's side in a fresh interpreter."""
    return Spawned([sys.executable, "-m", "bench.child", *module_args], env=child_env(), cwd=str(ROOT), **kw)


def need_qemu() -> str:
    if QEMU is None:
        raise BenchError("qemu-system-x86_64 not installed")
    return QEMU


# ---------------------------------------------------------------- QMP over stdio

class Qmp:
    """QEMU with `-qmp stdio`; `ready()` is the time until query-status answers."""

    def __init__(self, args: Sequence[str], accel: str = "kvm") -> None:
        self.spawned = Spawned([need_qemu(), "-accel", accel, "-display", "none", "-nodefaults",
                                "-qmp", "stdio", *args], stdin=True)
        self._pos = 0

    def command(self, name: str, timeout: float = 120) -> dict:
        self.spawned.send(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            self.spawned.wait_for(b"\n", timeout, self._pos)
            line_end = self.spawned.out.index(b"\n", self._pos)
            line = bytes(self.spawned.out[self._pos:line_end])
            self._pos = line_end + 1
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "return" in msg or "error" in msg:
                if "error" in msg:
                    raise BenchError(f"QMP {name}: {msg['error']}")
                return msg["return"]

    def ready(self, timeout: float = 300) -> float:
        """Seconds from spawn until QEMU answers query-status (initialisation done)."""
        self.spawned.wait_for(b'{"QMP"', timeout)
        self._pos = self.spawned.out.index(b"\n") + 1
        self.command("qmp_capabilities", timeout)
        self.command("query-status", timeout)
        return time.monotonic() - self.spawned.t0

    def close(self) -> None:
        self.spawned.kill()

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- /proc

def smaps_rss(pid: int) -> list[tuple[str, int, int]]:
    """(name, size bytes, Rss bytes) of every mapping of `pid`."""
    out: list[tuple[str, int, int]] = []
    name, size = "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(None, 1)[0] if line.strip() else ""
        if "-" in first and not first.endswith(":"):
            parts = line.split(None, 5)
            name = parts[5] if len(parts) > 5 else ""
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            size = hi - lo
        elif first == "Rss:":
            out.append((name, size, int(line.split()[1]) * 1024))
    return out


_TMP: Path | None = None


def scratch(name: str, data: bytes) -> Path:
    """A file in this run's scratch directory (removed at exit)."""
    global _TMP
    if _TMP is None:
        import atexit
        import tempfile
        _TMP = Path(tempfile.mkdtemp(prefix="numavm-bench-"))
        atexit.register(shutil.rmtree, _TMP, True)
    p = _TMP / name
    p.write_bytes(data)
    return p


def shell(argv: Sequence[str], limit: int = 600) -> str:
    """The command as typed; a long one (hundreds of -numa options) abridged in the middle."""
    import shlex
    text = " ".join(shlex.quote(a) for a in argv)
    if len(text) <= limit:
        return text
    return text[:limit // 2] + f" ... [{len(argv)} words in all; the middle is numavm's QEMU export of the " \
        "same topology: `python -m numavm export --to qemu ...`] ... " + text[-limit // 3:]
