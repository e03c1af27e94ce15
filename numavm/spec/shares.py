"""Host directories the guest sees: `--share HOST_DIR[:GUEST_DIR][,rw]` and `--host-root`.

A share is a host directory exported to the guest over virtio-9p (9P2000.L) under a mount
tag, and mounted by numavm's /init at its guest path (numavm.guest.shares).  `--host-root`
is one more share: the host's `/`, read-only, under `ROOT_TAG`, which /init makes the
command's root.  These are run options, not part of the machine: `plan` and `export` never
see them, and nothing here opens anything but the directories' metadata.

What an engine's 9p device must give the guest (the TCG engine: QEMU's own; the KVM engine:
its own device), so that one /init serves both:

* a virtio-9p device per share, its mount tag `Share.tag` (``ROOT_TAG``, or
  ``numavm-share<k>`` for the k-th `--share`, at most `MAX_TAG` bytes);
* 9P2000.L with messages up to `MSIZE` bytes (the largest the guest's virtio transport
  asks for: Linux 6.1's 9pnet_virtio takes at most 125 pages of a 128-entry queue);
* the share's directory and nothing outside it (``..`` at its top is its top, symlinks
  are the guest's to follow, never the server's; any ``aname`` attaches the share's top),
  and for a read-only share every modifying request refused (EROFS), whatever the guest's
  own mount says;
* qid paths unique across the host filesystems a share spans: the root share holds /proc,
  /sys, /dev, /run... whose roots are inode 1 or 2, each on its own device, and the guest
  mounts with cache=loose, which takes two directories with one qid path for one (QEMU:
  ``multidevs=remap``; its default made the guest's /sys land on its /proc);
* for the root share, the host's mounts inside it crossed as the host's own path lookup
  crosses them (/home, /boot or /usr may be filesystems of their own): the guest must see
  the host's `/` as a user of the host sees it.  A plain share may stop at mount points
  or not; QEMU crosses them, and so does numavm's own server on the KVM engine
  (numavm.devices.p9.server, ``cross_mounts``), so a share looks the same on both engines.

On the KVM engine each share is a virtio-9p function of the run's PCI layout
(numavm.plan.layout.with_shares), its directory opened by numavm.host.shares.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

from numavm.errors import ConfigError

SHARE_OPT = "--share"
HOST_ROOT_OPT = "--host-root"
ROOT_TAG = "numavm-root"
TAG_PREFIX = "numavm-share"
MAX_TAG = 31  # bytes of a 9p mount tag we ever use (virtio-9p's config holds a 16-bit length)
MSIZE = 512000  # 9p message size the guest mounts with: Linux 6.1's virtio transport's maximum
MAX_SHARES = 16  # each a PCI function on the TCG engine's root bus, beside the disks' bridges
MAX_PATH = 4096


@dataclass(frozen=True)
class Share:
    """One exported directory: `host` (absolute, symlinks resolved) at `guest` (absolute)."""

    host: str
    guest: str
    rw: bool = False
    tag: str = ""

    def option(self) -> str:
        """The `--share` argument that gives this share back (commas in paths doubled)."""
        text = self.host.replace(",", ",,")
        if self.guest != self.host:
            text += ":" + self.guest.replace(",", ",,")
        return text + (",rw" if self.rw else "")


def root_share() -> Share:
    """`--host-root`: the host's `/`, read-only, which the guest's command gets as its root."""
    return Share("/", "/", False, ROOT_TAG)


def parse_share(text: str, index: int = 0, opt: str = SHARE_OPT) -> Share:
    """``HOST_DIR[:GUEST_DIR][,rw|,ro]``, checked: HOST_DIR an existing directory (resolved, so the
    export is the directory itself, not a symlink someone may later point elsewhere), GUEST_DIR
    absolute, without ``..``, not ``/`` (that is --host-root).  A comma in a path is written
    twice; the first colon separates the two paths."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{opt}: expected HOST_DIR[:GUEST_DIR][,rw], got {text!r}")
    if len(text) > 2 * MAX_PATH + 8:
        raise ConfigError(f"{opt}: longer than {2 * MAX_PATH + 8} characters")
    if "\0" in text or "\n" in text:
        raise ConfigError(f"{opt}: {text!r} holds a NUL or newline")
    parts = text.replace(",,", "\0").split(",")
    paths = parts[0].replace("\0", ",")
    rw = False
    for flag in parts[1:]:
        flag = flag.strip().lower()
        if flag == "rw":
            rw = True
        elif flag == "ro":
            rw = False
        elif flag:
            raise ConfigError(f"{opt} {paths}: unknown flag {flag!r} (flags: rw, ro)")
    host, colon, guest = paths.partition(":")
    if not host:
        raise ConfigError(f"{opt}: no host directory in {text!r}")
    if colon and not guest:
        raise ConfigError(f"{opt} {host}: empty guest directory after ':'")
    resolved = _host_dir(host, opt)
    guest = guest if colon else os.path.abspath(host)
    return Share(resolved, _guest_dir(guest, f"{opt} {host}"), rw, f"{TAG_PREFIX}{index}")


def _host_dir(path: str, opt: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{opt} {path}: {e.strerror.lower() if e.strerror else 'cannot be read'}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{opt} {path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{opt} {path}: not readable")
    return os.path.realpath(path)


def _guest_dir(path: str, where: str) -> str:
    p = PurePosixPath(path)
    if not p.is_absolute():
        raise ConfigError(f"{where}: the guest directory {path!r} must be absolute")
    if ".." in p.parts:
        raise ConfigError(f"{where}: the guest directory {path!r} must not hold '..'")
    norm = str(p)
    if norm == "/":
        raise ConfigError(f"{where}: the guest directory cannot be / (--host-root gives the host's /)")
    if len(norm.encode()) > MAX_PATH:
        raise ConfigError(f"{where}: the guest directory is longer than {MAX_PATH} bytes")
    return norm


def parse_shares(texts: object, host_root: bool = False) -> tuple[Share, ...]:
    """Every `--share` (a string or a list of them; `Share`s pass as they are, retagged), and
    the root share first with `host_root`.  Two shares at one guest directory are refused."""
    if texts is None:
        texts = ()
    if isinstance(texts, (str, Share)):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise ConfigError(f"{SHARE_OPT}: expected a list of HOST_DIR[:GUEST_DIR][,rw], got {type(texts).__name__}")
    if len(texts) > MAX_SHARES:
        raise ConfigError(f"{SHARE_OPT}: at most {MAX_SHARES} shares, got {len(texts)}")
    out: list[Share] = [root_share()] if host_root else []
    seen: dict[str, str] = {}
    for k, t in enumerate(texts):
        if isinstance(t, Share):
            s = Share(_host_dir(t.host, SHARE_OPT), _guest_dir(t.guest, f"{SHARE_OPT} {t.host}"), t.rw,
                      f"{TAG_PREFIX}{k}")
        else:
            s = parse_share(t, k)
        if s.guest in seen:
            raise ConfigError(f"{SHARE_OPT} {s.host}: guest directory {s.guest} is already {seen[s.guest]}'s")
        seen[s.guest] = s.host
        out.append(s)
    return tuple(out)


def guest_cwd(shares: tuple[Share, ...], cwd: str) -> str | None:
    """Where the host directory `cwd` is in the guest: under the share (longest host path
    first) that holds it, else None."""
    best: tuple[int, str] | None = None
    for s in shares:
        host = s.host.rstrip("/")
        if cwd == s.host or cwd.startswith(host + "/"):
            rel = cwd[len(host):].lstrip("/")
            where = str(PurePosixPath(s.guest) / rel) if rel else s.guest
            if best is None or len(host) > best[0]:
                best = (len(host), where)
    return None if best is None else best[1]


__all__ = ["HOST_ROOT_OPT", "MAX_SHARES", "MSIZE", "ROOT_TAG", "SHARE_OPT", "Share", "guest_cwd",
           "parse_share", "parse_shares", "root_share"]
