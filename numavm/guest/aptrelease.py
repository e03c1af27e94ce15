"""Another release's packages through the host's apt, with nothing changed on the host.

`numavm fetch --release trixie` on a Debian 12 host (or `--release bookworm`
on Debian 13) needs apt to see that release's package lists.  `PrivateApt`
gives apt a configuration of its own under numavm's cache: a sources file
naming the other release on the host's own mirrors (every source of the
host's release, its suite renamed: bookworm -> trixie, bookworm-security ->
trixie-security, same URIs, components and keyring), and its own lists,
package cache and an empty dpkg status.  apt's `-o Dir::...` options point
apt-get and apt-cache there; the host's sources, lists and status are only
read.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from numavm.errors import ConfigError, NumavmError

if TYPE_CHECKING:
    import subprocess

# A release codename or suite name as apt takes it (trixie, bookworm, sid, stable).
_RELEASE_RE = re.compile(r"^[a-z][a-z0-9]{1,31}$")
LISTS_MAX_AGE = 24 * 3600  # refresh the private package lists once a day

Log = Callable[[str], object]


def check_release(release: str, option: str = "--release") -> str:
    """`release` if it looks like a codename; else ConfigError naming `option`."""
    if not _RELEASE_RE.match(release):
        raise ConfigError(f"{option}: expected a release codename such as trixie or bookworm, "
                          f"got {release!r}")
    return release


def host_release(os_release: str = "/etc/os-release") -> str | None:
    """The host's release codename (VERSION_CODENAME in os-release), if it says."""
    try:
        with open(os_release) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "VERSION_CODENAME":
                    return value.strip().strip("\"'") or None
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class Source:
    """One package index the host's apt reads: `Repo-URI`, suite and component."""

    uri: str
    suite: str
    component: str
    entry: str  # apt's Sourcesentry: "FILE:N", N the line (.list) or stanza (.sources)


def host_sources(indextargets: str) -> list[Source]:
    """The binary package indexes in `apt-get indextargets --format` output (see `_INDEX_FORMAT`)."""
    out = []
    for line in indextargets.splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[4] == "deb":
            out.append(Source(parts[0], parts[1], parts[2], parts[3]))
    return out


_INDEX_FORMAT = "$(REPO_URI)\t$(RELEASE)\t$(COMPONENT)\t$(SOURCESENTRY)\t$(TARGET_OF)"


def signed_by(entry: str) -> str | None:
    """The keyring a sources entry ("FILE:N") names with Signed-By / signed-by=, if any."""
    path, _, num = entry.rpartition(":")
    try:
        n = int(num)
        text = Path(path).read_text()
    except (ValueError, OSError):
        return None
    if path.endswith(".sources"):  # deb822: N counts stanzas
        stanzas = [s for s in re.split(r"\n\s*\n", text)
                   if any(ln.strip() and not ln.lstrip().startswith("#") for ln in s.splitlines())]
        if not 1 <= n <= len(stanzas):
            return None
        m = re.search(r"^Signed-By:[ \t]*(\S.*)$", stanzas[n - 1], re.M | re.I)
        return m.group(1).strip() if m and not m.group(1).strip().startswith("-----BEGIN") else None
    lines = text.splitlines()  # one-line format: N counts lines
    if not 1 <= n <= len(lines):
        return None
    m = re.search(r"\[([^]]*)\]", lines[n - 1])
    if m:
        for opt in m.group(1).split():
            key, _, value = opt.partition("=")
            if key.lower() == "signed-by" and value:
                return value
    return None


def sources_for(release: str, host: str, sources: list[Source],
                keyring: Callable[[str], str | None] = signed_by) -> str:
    """A deb822 sources file for `release`: every host source of suite `host` or
    `host-*`, its suite renamed (bookworm-updates -> trixie-updates)."""
    groups: dict[tuple[str, str, str | None], list[str]] = {}
    for s in sources:
        if s.suite != host and not s.suite.startswith(host + "-"):
            continue  # another origin's suite (a vendor's repository): not ours to rename
        key = (s.uri, release + s.suite[len(host):], keyring(s.entry))
        if s.component not in groups.setdefault(key, []):
            groups[key].append(s.component)
    stanzas = []
    for (uri, suite, key), comps in groups.items():
        lines = ["Types: deb", f"URIs: {uri}", f"Suites: {suite}", f"Components: {' '.join(comps)}"]
        if key:
            lines.append(f"Signed-By: {key}")
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)


def renamed_sources(release: str) -> str:
    """This host's sources renamed to `release` (deb822 text, "" if none can be):
    what `PrivateApt` and .ci/other-release's root point apt at."""
    host = host_release()
    if host is None:
        raise NumavmError("--release: this host's /etc/os-release names no VERSION_CODENAME, so "
                          "numavm cannot tell which of apt's sources to point at another release")
    targets = _apt(["apt-get", "indextargets", "--format", _INDEX_FORMAT, "Identifier: Packages"])
    return sources_for(release, host, host_sources(targets.stdout))


def _apt(argv: list[str]) -> subprocess.CompletedProcess[str]:
    import subprocess  # only when apt runs: a run from the cache never starts a process

    env = dict(os.environ, LC_ALL="C")
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False)


class PrivateApt:
    """apt options for `release`'s packages, with state in `root` (created 0700).

    Use as a context manager: it holds a lock on `root` so that two numavm
    processes do not run apt on the same lists at once.
    """

    def __init__(self, release: str, root: Path, log: Log) -> None:
        self.release, self.root, self.log = release, root, log
        self._lock: int | None = None

    @property
    def options(self) -> list[str]:
        r = self.root
        return ["-o", f"Dir::Etc::sourcelist={r / 'sources.list'}",  # empty: the .sources file says it
                "-o", f"Dir::Etc::sourceparts={r / 'sources.list.d'}",
                "-o", f"Dir::Etc::preferences={r / 'preferences'}",  # none: the host's pins are the host's
                "-o", f"Dir::Etc::preferencesparts={r / 'preferences.d'}",
                "-o", f"Dir::State={r / 'state'}",
                "-o", f"Dir::State::status={r / 'status'}",  # nothing installed: candidates only
                "-o", f"Dir::Cache={r / 'cache'}"]

    def __enter__(self) -> PrivateApt:
        text = renamed_sources(self.release)
        if not text:
            raise NumavmError(f"--release {self.release}: apt has no source for this host's release "
                              f"({host_release()}) whose suite numavm could rename; nothing to fetch from")
        r = self.root
        for d in (r, r / "sources.list.d", r / "preferences.d", r / "state" / "lists" / "partial",
                  r / "cache" / "archives" / "partial"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = os.open(r / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        _replace(r / "sources.list.d" / "numavm.sources", text)
        _replace(r / "sources.list", "")
        _replace(r / "status", "")
        _replace(r / "preferences", "")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def stale(self) -> bool:
        """Whether the private lists are missing or older than LISTS_MAX_AGE."""
        lists = [p for p in (self.root / "state" / "lists").glob("*_Packages*")]
        return not lists or time.time() - min(p.stat().st_mtime for p in lists) > LISTS_MAX_AGE

    def update(self) -> str | None:
        """apt-get update on the private lists; the last error line, if any.

        Not every renamed suite exists (sid has no sid-security): an error is
        for the caller to weigh against what the lists that did come hold.
        """
        self.log(f"assets: apt-get update for {self.release} (private lists in {self.root})")
        r = _apt(["apt-get", *self.options, "update"])
        errors = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.startswith(("E:", "Err:"))]
        if r.returncode == 0 and not errors:
            return None
        tail = (r.stderr or r.stdout).strip().splitlines()
        return errors[-1] if errors else (tail[-1] if tail else f"exit {r.returncode}")


def _replace(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    from numavm.host.cache import write_atomic
    write_atomic(path, text.encode())
