"""What numavm starts dies with it, and what a killed numavm left is removed by the next run.

Children (QEMU, dpkg-deb) get PR_SET_PDEATHSIG=SIGKILL between fork and
exec (`die_with_parent`), so a numavm killed by SIGKILL or the OOM killer
takes them along: the kernel sends the signal when the thread that forked
the child exits, so children are started from the thread that waits for
them (the run's own thread).  Memfds need nothing: the kernel frees them
with the last process holding them.

Private temporary directories (`OwnedDir`) carry their owner's pid in
their name and stay flock()ed by it while they live; a later numavm removes
those whose lock it can take and whose owner pid is gone (`sweep`).  The
lock settles pid reuse and pid namespaces sharing /tmp; the pid settles the
instant between mkdtemp and flock.  The cache's temporary files (`owned_tmp_file`,
written then renamed into place) work the same way, swept from their own directory.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable

from numavm.host import libc as _libc
_OWNED = re.compile(r"^numavm-(?:[a-z]+)-(\d+)-[A-Za-z0-9_]+$")
_OWNED_TMP = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def die_with_parent(drop_caps: tuple[int, ...] = ()) -> Callable[[], None]:
    """A subprocess `preexec_fn`: the child gets SIGKILL when numavm's forking thread dies, and
    runs without the capabilities `drop_caps` (dropped from its bounding set, so the program it
    execs cannot have them even as root; where numavm may not drop them, it has none to lose).

    Runs in the child between fork and exec, so it only calls prctl and
    getppid (no locks, no imports); a parent already gone by then (the fork
    raced its death) ends the child at once.
    """
    parent = os.getpid()
    prctl = _libc.prctl
    sig = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_libc.PR_SET_PDEATHSIG, sig, 0, 0, 0)
        for cap in drop_caps:
            try:
                prctl(_libc.PR_CAPBSET_DROP, cap, 0, 0, 0)
            except OSError:  # EPERM without CAP_SETPCAP: not root, so no such capability anyway
                pass
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class OwnedDir:
    """A private directory under the temp dir, locked by this process while it lives."""

    def __init__(self, kind: str) -> None:
        sweep(kind)
        self.path = Path(tempfile.mkdtemp(prefix=f"numavm-{kind}-{os.getpid()}-"))
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # released by the kernel however we end
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "OwnedDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep(kind: str, root: Path | None = None) -> list[Path]:
    """Remove the `numavm-KIND-*` directories whose owner has died; returns them."""
    base = Path(root if root is not None else tempfile.gettempdir())
    try:
        entries = list(base.glob(f"numavm-{kind}-*"))
    except OSError:
        return []
    return [path for path in entries if (m := _OWNED.match(path.name))
            and _remove_if_orphaned(path, int(m.group(1)), lambda p: shutil.rmtree(p, ignore_errors=True))]


def owned_tmp_file(path: Path) -> tuple[int, Path]:
    """A temporary file beside `path` (for a write then rename), locked by this process while
    its fd is open; a later `sweep_tmp_files` removes it if its writer was killed."""
    sweep_tmp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel however we end
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


def sweep_tmp_files(directory: Path) -> list[Path]:
    """Remove the `owned_tmp_file`s in `directory` whose writer has died; returns them."""
    try:
        entries = list(directory.glob(".*.tmp"))
    except OSError:
        return []
    return [path for path in entries if (m := _OWNED_TMP.match(path.name))
            and _remove_if_orphaned(path, int(m.group(1)), lambda p: p.unlink(missing_ok=True))]


def _remove_if_orphaned(path: Path, pid: int, remove: Callable[[Path], object]) -> bool:
    """Remove `path` if its owner `pid` is gone and its lock is free (the pid settles the
    instant between creating and locking; the lock settles pid reuse and pid namespaces)."""
    if pid == os.getpid() or _alive(pid):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its owner still holds it (another pid namespace)
    else:
        remove(path)
        return True
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has released everything it held
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
