"""numavm's cache, which is optional: a run works from a private place when it cannot be written.

The cache (``$XDG_CACHE_HOME/numavm``) holds what is slow to make again:
Debian's kernel and busybox, unpacked vmlinux images, compressed initramfs
images.  Every file lands whole or not at all (`write_atomic`: a temporary
file, fsync, rename; the temporary file of a writer that was killed is removed
by the next write there), and readers check what they take from it.  When the
cache is read-only or full, `store` puts the file in a directory private to
this run instead (removed when numavm ends, or by the next run if it was
killed, see `numavm.host.lifetime`), and says so once; when neither can take the
file, one line says what is needed.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from numavm.errors import NumavmError
from numavm.host.lifetime import OwnedDir, owned_tmp_file
from numavm.spec.units import MiB

Log = Callable[[str], object]


class CacheError(NumavmError):
    """Neither the cache nor a private temporary directory can take a file."""


def cache_root() -> Path:
    """numavm's cache: ``$XDG_CACHE_HOME/numavm`` or ``~/.cache/numavm``."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "numavm"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one."""
    fd, tmp = owned_tmp_file(path)  # a writer killed mid-way leaves it to the next writer to remove
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def probe(directory: Path) -> None:
    """Raise the OSError a write into `directory` would meet (read-only, no permission), early."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=directory)
    os.close(fd)
    os.unlink(tmp)


_private: OwnedDir | None = None


def private_dir() -> Path:
    """This run's private directory for what the cache cannot take; removed at exit."""
    global _private
    if _private is None:
        _private = OwnedDir("cache")
        atexit.register(_private.close)
    return _private.path


def store(name: str, data: bytes, log: Log, mode: int = 0o644, root: Path | None = None) -> Path:
    """`data` as `name` in the cache, or in this run's private directory when the cache
    cannot take it; the path it is at.  CacheError when neither can."""
    cache = root if root is not None else cache_root()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        write_atomic(cache / name, data, mode)
        return cache / name
    except OSError as e:
        first = e
    try:
        where = private_dir()
        write_atomic(where / name, data, mode)
    except OSError as e:  # FileNotFoundError from tempfile when no temporary directory is usable
        tmp = f"{_private.path.parent}: {e.strerror}" if _private else f"no usable temporary directory ({e})"
        raise CacheError(
            f"cannot keep {name} ({len(data) / MiB:.1f} MiB): the cache {cache}: {first.strerror}; "
            f"{tmp}; free space there or point XDG_CACHE_HOME or TMPDIR at a writable directory") from None
    log(f"numavm: the cache {cache} cannot be written ({first.strerror}): using {where} for this run")
    return where / name


@contextmanager
def locked(directory: Path, name: str, log: Log, what: str) -> Iterator[None]:
    """Hold the cache's lock `name` (an flock on ``directory/.name.lock``): one numavm at a time
    fetches or unpacks into a cache however many start at once; a waiting one says so, once.
    A directory that cannot take the lock file has nothing to share: no lock then."""
    import fcntl

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd: int | None = os.open(directory / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"numavm: waiting for another numavm {what} in {directory}")
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def prune(root: Path, patterns: tuple[str, ...], keep: int) -> None:
    """Keep the `keep` newest files (by mtime) matching each glob pattern in `root`; remove the
    rest.  Best effort: a reader that already opened a removed file keeps its inode, and one that
    only found its name makes the file again."""
    try:
        for pattern in patterns:
            found = [(q.stat().st_mtime_ns, q) for q in root.glob(pattern)]
            for _, q in sorted(found, key=lambda t: t[0], reverse=True)[keep:]:
                q.unlink(missing_ok=True)
    except OSError:  # a file removed under us, a cache that cannot be written: keep what is there
        pass


def find(name: str, root: Path | None = None) -> Path | None:
    """`name` in the cache or in this run's private directory, if it is there."""
    for where in (root if root is not None else cache_root(), _private.path if _private else None):
        if where is not None and (where / name).is_file():
            return where / name
    return None


# What is slow to learn about a file (its digest, the image built from it) is noted under a
# short name and looked up by the file's identity; the note holds the whole identity, compared
# exactly, so the short name (a CRC-32, cheap: hashlib's import alone is ~15 ms) may collide.


def _note_name(kind: str, identity: str) -> str:
    return f"{kind}-id-{zlib.crc32(identity.encode()):08x}"


def note(kind: str, identity: str, value: str, root: Path | None = None, keep: int | None = None) -> None:
    """Remember `value` for `identity` (one line, e.g. a file's path, size, mtime and inode),
    keeping the `keep` most recently used notes of this kind when given; best effort: a cache
    that cannot take it only costs the next run the slow way."""
    try:
        path = store(_note_name(kind, identity), f"{identity}\n{value}\n".encode(), lambda line: None, root=root)
    except CacheError:
        return
    if keep is not None:
        prune(path.parent, (f"{kind}-id-*",), keep)


def recall(kind: str, identity: str, root: Path | None = None) -> str | None:
    """The value `note` remembered for `identity`, or None; a recalled note counts as used."""
    path = find(_note_name(kind, identity), root)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            if f.readline().rstrip("\n") != identity:
                return None
            value = f.readline().rstrip("\n")
        os.utime(path)
    except (OSError, UnicodeDecodeError):
        return None
    return value
