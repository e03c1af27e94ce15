"""Guest assets from Debian's packages: a kernel image and a static busybox.

`fetch()` asks apt which versioned kernel package `linux-image-amd64` points
at, downloads that package and `busybox-static` with `apt-get download` (no
install on the host), takes `boot/vmlinuz-*` and `bin/busybox` (Debian 13:
`usr/bin/busybox`) out of the .deb files and keeps them in numavm's cache
with a small manifest.  A second call is a no-op while apt's candidate
versions match the manifest.

`release=` names another release of the host's distribution (trixie on a
Debian 12 host, bookworm on Debian 13): apt then reads that release from the
host's own mirrors through a private configuration (numavm.guest.aptrelease), and
the assets go to the cache's subdirectory named after it.

Reading a .deb needs nothing but the stdlib: it is an `ar` archive whose
`data.tar.{xz,gz,bz2}` member holds the files (`dpkg-deb` is used for a
compression Python cannot read, such as zstd).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from numavm.guest.aptrelease import PrivateApt, check_release, host_release
from numavm.host.cache import cache_root, locked, probe
from numavm.host.cache import write_atomic as _write_atomic
from numavm.errors import NumavmError
from numavm.host.lifetime import OwnedDir, die_with_parent

if TYPE_CHECKING:  # subprocess is imported where Debian's packages are fetched: a cached run skips it
    import subprocess

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MANIFEST = "assets.json"
# What is taken out of the packages: Debian 12 ships /bin/busybox, Debian 13 (merged /usr) /usr/bin/busybox.
KERNEL_FILE = re.compile(r"^(?:\./)?boot/(vmlinuz-[^/]+)$")
BUSYBOX_FILE = re.compile(r"^(?:\./)?(?:usr/)?bin/(busybox)$")
MANIFEST_SCHEMA = 1

Log = Callable[[str], object]


@dataclass(frozen=True)
class Assets:
    kernel: Path  # the bzImage
    busybox: Path  # a static busybox
    kernel_version: str  # the kernel release, as `uname -r` prints it (6.1.0-56-amd64)
    kernel_package: str = ""  # linux-image-6.1.0-56-amd64
    kernel_package_version: str = ""  # 6.1.192-2
    busybox_version: str = ""  # 1:1.35.0-4+deb12u1+b1


def release_cache(cache_dir: Path | None, release: str | None) -> Path:
    """Where the assets of `release` live: the cache itself for the host's own
    release (or None), its subdirectory `release` for another one."""
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    if release is None or release == host_release():
        return cache
    return cache / check_release(release)


def cached(cache_dir: Path | None = None, release: str | None = None) -> Assets | None:
    """What the cache holds, without asking apt: `run` and `check` use this,
    `numavm fetch` refreshes it (asking apt costs over a second)."""
    cache = release_cache(cache_dir, release)
    doc = _read_manifest(cache)
    if doc is None:
        return None
    assets = _assets(cache, doc)
    return assets if assets.kernel.is_file() and assets.busybox.is_file() else None


def fetch(cache_dir: Path | None = None, log: Log = print, release: str | None = None,
          reuse: bool = False, spill: Callable[[], Path] | None = None) -> Assets:
    """The Debian kernel and busybox-static in `cache_dir` (default `cache_root()`),
    of the host's release or of `release` (see `release_cache`).

    One numavm at a time fetches into a cache (`numavm.host.cache.locked`); with `reuse`, what
    the cache holds once the lock is ours is used without asking apt (runs that started
    together download once).  `spill`: a directory for the files when the cache cannot take
    them, so that a full cache costs no second download."""
    cache = release_cache(cache_dir, release)
    with locked(cache, "fetch", log, "fetching Debian's kernel and busybox"):
        if reuse:
            have = cached(cache_dir, release)
            if have is not None:
                return have
        if not (shutil.which("apt-get") and shutil.which("apt-cache")):
            raise NumavmError("no apt-get on this machine to fetch Debian's kernel and busybox; "
                              "pass --kernel (and --initrd) instead")
        if release is None or cache == release_cache(cache_dir, None):
            return _fetch(cache, log, [], None, spill)
        with PrivateApt(release, cache / "apt", log) as apt:
            return _fetch(cache, log, apt.options, apt, spill)


def _fetch(cache: Path, log: Log, opts: list[str], apt: PrivateApt | None,
           spill: Callable[[], Path] | None = None) -> Assets:
    cached = _read_manifest(cache)
    kpkg, kver, bver = _resolve(log, cached, opts, apt)
    if cached is not None and _current(cached, cache, kpkg, kver, bver):
        assets = _assets(cache, cached)
        log(f"assets: cached {assets.kernel_package} {assets.kernel_package_version} -> {assets.kernel}; "
            f"{BUSYBOX_PACKAGE} {assets.busybox_version} -> {assets.busybox}")
        return assets
    home = cache
    try:
        probe(cache)  # a cache that cannot be written fails before the downloads, not after
    except OSError as e:
        if spill is None:
            raise
        cache = _spilled(cache, spill, e, log)
    with OwnedDir("assets") as tmp:  # a killed fetch's downloads go with the next run
        work = tmp.path  # private (0700): as root, apt downloads unsandboxed here
        kernel_deb = _download(kpkg, kver, work, log, opts)
        busybox_deb = _download(BUSYBOX_PACKAGE, bver, work, log, opts)
        kname, kdata = _extract_one(kernel_deb, KERNEL_FILE)
        _, bdata = _extract_one(busybox_deb, BUSYBOX_FILE)
    release = kname.removeprefix("vmlinuz-")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "kernel": {"package": kpkg, "version": kver, "file": kname, "release": release},
        "busybox": {"package": BUSYBOX_PACKAGE, "version": bver, "file": "busybox"},
    }

    def keep(where: Path) -> None:
        _write_atomic(where / kname, kdata, 0o644)
        _write_atomic(where / "busybox", bdata, 0o755)
        _write_atomic(where / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), 0o644)

    try:
        keep(cache)
    except OSError as e:  # a full cache: what was downloaded goes to the spill, not downloaded again
        if spill is None or cache != home:
            raise
        cache = _spilled(cache, spill, e, log)
        keep(cache)
    kernel_path = cache / kname
    busybox_path = cache / "busybox"
    if cached is not None and cache == home:  # drop an older kernel the new manifest no longer names
        old = cached.get("kernel", {}).get("file")
        if isinstance(old, str) and old != kname and "/" not in old:
            (cache / old).unlink(missing_ok=True)
    assets = _assets(cache, manifest)
    log(f"assets: fetched {kpkg} {kver} -> {kernel_path} (kernel {release}); "
        f"{BUSYBOX_PACKAGE} {bver} -> {busybox_path}")
    return assets


def _spilled(cache: Path, spill: Callable[[], Path], e: OSError, log: Log) -> Path:
    where = spill()
    log(f"numavm: the cache {cache} cannot be written ({e.strerror}): fetching into {where}")
    return where


# ---------------------------------------------------------------- apt


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import subprocess

    env = dict(os.environ, LC_ALL="C")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False,
                          preexec_fn=die_with_parent())


def kernel_package_of(depends_output: str) -> str | None:
    """The versioned image package in `apt-cache depends linux-image-amd64` output."""
    for line in depends_output.splitlines():
        m = re.match(r"^\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and m.group(1) != KERNEL_META_PACKAGE and not m.group(1).startswith("<"):
            return m.group(1)
    return None


def candidates_of(policy_output: str) -> dict[str, str]:
    """{package: candidate version} from `apt-cache policy PKG...` output ('(none)' left out)."""
    out: dict[str, str] = {}
    pkg = None
    for line in policy_output.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            pkg = line.rstrip()[:-1]
            continue
        m = re.match(r"^\s+Candidate:\s*(\S+)", line)
        if m and pkg is not None and m.group(1) != "(none)":
            out[pkg] = m.group(1)
    return out


def _lookup(opts: list[str]) -> tuple[str, str, str] | None:
    dep = _run(["apt-cache", *opts, "depends", KERNEL_META_PACKAGE])
    kpkg = kernel_package_of(dep.stdout) if dep.returncode == 0 else None
    if kpkg is None:
        return None
    cands = candidates_of(_run(["apt-cache", *opts, "policy", kpkg, BUSYBOX_PACKAGE]).stdout)
    kver, bver = cands.get(kpkg), cands.get(BUSYBOX_PACKAGE)
    if kver is None or bver is None:
        return None
    return kpkg, kver, bver


def _resolve(log: Log, cached: dict[str, Any] | None, opts: list[str],
             apt: PrivateApt | None) -> tuple[str, str, str]:
    # numavm's private lists (another release) are numavm's to refresh; the host's are the host's,
    # updated here only when they know no kernel at all.
    found = None if apt is not None and apt.stale() else _lookup(opts)
    if found is None:
        if apt is not None:
            error = apt.update()
        else:
            log("assets: apt knows no kernel package yet; running apt-get update")
            upd = _run(["apt-get", "update"])
            tail = (upd.stderr or upd.stdout).strip().splitlines()[-1:] or [""]
            error = None if upd.returncode == 0 else tail[0] or f"exit {upd.returncode}"
        found = _lookup(opts)
        if found is None:
            if cached is not None:  # offline, with a cache: use what we have
                k, b = cached["kernel"], cached["busybox"]
                log("assets: apt cannot say which versions are current; using the cache")
                return k["package"], k["version"], b["version"]
            what = f"release {apt.release}: " if apt is not None else ""
            why = f"apt-get update: {error}" if error else "after apt-get update"
            raise NumavmError(f"{what}apt knows no package behind {KERNEL_META_PACKAGE} or "
                              f"{BUSYBOX_PACKAGE} ({why}); pass --kernel instead")
        if error:
            log(f"assets: apt-get update reported: {error}")
    return found


def _download(pkg: str, version: str, work: Path, log: Log, opts: list[str]) -> Path:
    log(f"assets: downloading {pkg} {version}")
    r = _run(["apt-get", *opts, "download", f"{pkg}={version}"], cwd=work)
    debs = sorted(work.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or not debs:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise NumavmError(f"apt-get download {pkg}={version} failed: "
                          f"{msg[-1] if msg else 'exit ' + str(r.returncode)}; pass --kernel instead")
    return debs[0]


# ---------------------------------------------------------------- .deb reading


def ar_members(f: IO[bytes]) -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of each member of an `ar` archive (a .deb)."""
    if f.read(8) != b"!<arch>\n":
        raise NumavmError("not a .deb (ar) archive")
    pos = 8
    while True:
        f.seek(pos)
        hdr = f.read(60)
        if len(hdr) < 60:
            return
        if hdr[58:60] != b"`\n":
            raise NumavmError("corrupt ar member header in .deb")
        name = hdr[0:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(hdr[48:58].decode("ascii").strip() or "0")
        yield name, pos + 60, size
        pos += 60 + size + (size & 1)


class _Window:
    """A read-only file object over [offset, offset+size) of another one."""

    def __init__(self, f: IO[bytes], offset: int, size: int) -> None:
        self._f, self._off, self._size, self._pos = f, offset, size, 0

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        if n is None or n < 0 or n > left:
            n = left
        self._f.seek(self._off + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readable(self) -> bool:
        return True


def _extract_one(deb: Path, pattern: re.Pattern[str]) -> tuple[str, bytes]:
    """The first regular file in `deb`'s data whose path matches: (group 1, contents)."""
    found = _scan_deb(deb, pattern, first=True)
    if not found:
        raise NumavmError(f"{deb.name}: no file matching {pattern.pattern}")
    return next(iter(found.items()))


def download(pkg: str, version: str, work: Path, log: Log = print) -> Path:
    """`apt-get download PKG=VERSION` into `work` (no install): the .deb's path."""
    return _download(pkg, version, work, log, [])


def extract_matching(deb: Path, pattern: re.Pattern[str]) -> dict[str, bytes]:
    """Every regular file in `deb`'s data whose path matches: {the first group that matched:
    contents}, in one pass."""
    return _scan_deb(deb, pattern, first=False)


def _scan_deb(deb: Path, pattern: re.Pattern[str], first: bool) -> dict[str, bytes]:
    """The matching files of `deb`'s data.tar (only the first one with `first`), keyed by the
    first group that matched; Python reads gz/xz/bz2, dpkg-deb the rest (zstd)."""
    import subprocess
    import tarfile  # only when fetching: a boot does not pay for it (nor for subprocess)

    found: dict[str, bytes] = {}

    def scan(stream: IO[bytes]) -> None:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                m = pattern.match(member.name)
                if m and member.isfile():
                    fobj = tar.extractfile(member)
                    assert fobj is not None
                    found[next(g for g in m.groups() if g is not None)] = fobj.read()
                    if first:
                        return

    with open(deb, "rb") as f:
        for name, off, size in ar_members(f):
            if not name.startswith("data.tar"):
                continue
            if name[len("data.tar"):] in ("", ".gz", ".xz", ".bz2"):
                scan(_Window(f, off, size))  # type: ignore[arg-type]
                return found
            if not shutil.which("dpkg-deb"):
                raise NumavmError(f"{deb.name}: data compression Python cannot read and no dpkg-deb")
            proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                    preexec_fn=die_with_parent())
            try:
                assert proc.stdout is not None
                scan(proc.stdout)
            finally:
                if proc.stdout is not None:
                    proc.stdout.close()
                proc.kill()  # stopped early with `first`: the rest of the archive is not wanted
                proc.wait()
            return found
    raise NumavmError(f"{deb.name}: no data.tar member")


# ---------------------------------------------------------------- cache


def _read_manifest(cache: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((cache / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    try:
        if doc["schema"] != MANIFEST_SCHEMA:
            return None
        for key in ("package", "version", "file", "release"):
            if not isinstance(doc["kernel"][key], str):
                return None
        for key in ("version", "file"):
            if not isinstance(doc["busybox"][key], str):
                return None
    except (KeyError, TypeError):
        return None
    return doc  # type: ignore[no-any-return]


def _current(doc: dict[str, Any], cache: Path, kpkg: str, kver: str, bver: str) -> bool:
    k, b = doc["kernel"], doc["busybox"]
    return bool(k["package"] == kpkg and k["version"] == kver and b["version"] == bver
                and (cache / k["file"]).is_file() and (cache / b["file"]).is_file())


def _assets(cache: Path, doc: dict[str, Any]) -> Assets:
    k, b = doc["kernel"], doc["busybox"]
    return Assets(kernel=cache / k["file"], busybox=cache / b["file"], kernel_version=k["release"],
                  kernel_package=k["package"], kernel_package_version=k["version"],
                  busybox_version=b["version"])
