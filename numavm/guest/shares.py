"""The guest side of `--share` and `--host-root`: what numavm's initramfs carries for them.

Whatever the engine (QEMU's virtio-9p under TCG, numavm's own device under KVM), the guest
sees one virtio-9p device per share, known by its mount tag (numavm.spec.shares).  The
initramfs gets:

* the 9p drivers of Debian's kernel (9p, 9pnet, 9pnet_virtio, netfs, fscache as 6.1 needs,
  and virtio_pci; overlay for --host-root), taken out of the kernel package by
  numavm.guest.modules and loaded by /init with the machine's other drivers, before it
  reports (`share_modules`);
* ``/etc/numavm/shares``: one line per share, ``TAG<TAB>ro|rw<TAB>GUEST_DIR``;
* ``/etc/numavm/shared`` (`SHARED_SCRIPT`): /init runs the command through it.  It mounts
  every share (``mount -t 9p -o trans=virtio,version=9p2000.L,msize=MSIZE,...``) and runs
  the command in the user's directory; with --host-root it first mounts the host's ``/`` at
  /newroot read-only with the guest's own /proc, /sys, /dev (and /dev/shm, /dev/pts), a
  tmpfs on /tmp, /var/tmp and /run, an overlay on HOME (the host's HOME read-only below, a
  tmpfs taking the writes above, so ~/.local, a pyenv or a venv there still run; a tmpfs
  where the overlay cannot be mounted), and runs the command chrooted there, with the
  user's environment (`guest_env`) and, for a user other than root, the user's uid, gid and
  groups (the host's own util-linux ``setpriv``, seen through the root share).  It runs
  with the command's stdout and stderr already on their serial ports, so what goes wrong
  (a share that does not mount) is on the user's stderr, and the status is 1.

Mount options: read-only shares (and the root) are mounted ``ro`` and ``cache=loose`` (the
guest keeps what it read: a Python start stats hundreds of files, each a round trip
otherwise; a file the host changes during the run may be seen late); read-write ones
``cache=mmap`` (writes go to the host as they are made, and mmap works).  Every share is
``nodev``: a device node in a shared directory opens nothing in the guest.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from numavm.errors import ConfigError
from numavm.guest.initramfs import Entry
from numavm.spec.shares import MSIZE, ROOT_TAG, Share, guest_cwd

if TYPE_CHECKING:
    from numavm.guest.launch import GuestAssets

Log = Callable[[str], None]

SHARES_TABLE = "etc/numavm/shares"
SHARED_SCRIPT_PATH = "etc/numavm/shared"  # /init's command wrapper (see initramfs.INIT_SCRIPT)
ROOT_DIR = "etc/numavm/root"  # uid, gid, groups, setpriv: who runs the command under --host-root
ENV_DIR = "etc/numavm/env"  # NAME -> value, the command's environment under --host-root
CWD_FILE = "etc/numavm/cwd"
NEWROOT = "/newroot"

# Debian 12's 6.1 builds all of these as modules; what they need comes from modules.dep.
NINEP_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
OVERLAY_MODULES = ("overlay",)  # --host-root: HOME as the host's, writable, writes kept in the guest
NINEP_MODULE_DIRS = ("drivers/virtio", "net/9p", "fs/9p", "fs/netfs", "fs/fscache", "fs/overlayfs")
NINEP_MODULES_DIR = "modules-shares-{release}"

# tmpfs over what a program run from a read-only root must be able to write; HOME gets an
# overlay (the host's HOME below, a tmpfs above), or a tmpfs where that cannot be mounted
WRITABLE = ("/tmp", "/var/tmp", "/run")

# The host environment the command gets under --host-root (a login's, plus what steers Python
# and locales); the rest of numavm's environment (its own settings, TMPDIR on the host...) stays.
ENV_NAMES = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM",
             "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
             "PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONSAFEPATH", "PYTHONUTF8")
ENV_PREFIXES = ("LC_",)

MOUNT_OPTS = f"trans=virtio,version=9p2000.L,msize={MSIZE},nodev"
RO_OPTS = "ro,cache=loose"
RW_OPTS = "rw,cache=mmap"

SHARED_SCRIPT = r"""#!/bin/sh
# numavm: mount the shares (and the host's root), then run "$@" there.  /init runs the
# command through this script, its stdout and stderr already the command's serial ports.
fail() { echo "numavm: guest: $*" >&2; exit 1; }
E=/etc/numavm
opts() { [ "$1" = rw ] && echo "@MOUNT@,@RW@" || echo "@MOUNT@,@RO@"; }
root=""
if grep -q '^@ROOT_TAG@	' $E/shares; then
  root=@NEWROOT@
  mkdir -p $root
  mount -t 9p -o "$(opts ro)" @ROOT_TAG@ $root || fail "cannot mount the host's / (9p tag @ROOT_TAG@)"
  mount -t proc proc $root/proc || fail "cannot mount /proc in the host's root"
  mount -t sysfs sysfs $root/sys || fail "cannot mount /sys in the host's root"
  mount -t devtmpfs devtmpfs $root/dev || fail "cannot mount /dev in the host's root"
  mkdir -p $root/dev/pts $root/dev/shm 2>/dev/null
  mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $root/dev/pts 2>/dev/null
  mount -t tmpfs -o mode=1777 tmpfs $root/dev/shm 2>/dev/null
  cwd=$(cat $E/cwd 2>/dev/null; echo x); cwd=${cwd%x}
  uid=$(cat $E/root/uid); gid=$(cat $E/root/gid)
  # a tmpfs on each writable directory; the user's directory, if under one, stays visible
  home=$(cat $E/root/home 2>/dev/null)
  while IFS= read -r d; do
    # a HOME inside a directory made a tmpfs above (HOME=/tmp/u) is made there, the user's
    [ "$d" = "$home" ] && [ ! -d "$root$d" ] && mkdir -p "$root$d" 2>/dev/null && chown "$uid:$gid" "$root$d"
    [ -d "$root$d" ] || continue
    keep=""
    case "$cwd" in "$d"/*) [ -d "$root$cwd" ] && mkdir -p /keep && mount -o bind "$root$cwd" /keep && keep=1 ;; esac
    mode=1777; o=""
    [ "$d" = /run ] && mode=755
    if [ "$d" = "$home" ]; then
      # HOME: the host's files (dotfiles, ~/.local, a pyenv...) below, the guest's writes above
      mkdir -p /ovl && mount -t tmpfs -o mode=755 tmpfs /ovl && mkdir -p /ovl/up /ovl/work &&
        chown "$(stat -c %u:%g "$root$d")" /ovl/up && chmod "$(stat -c %a "$root$d")" /ovl/up &&
        mount -t overlay -o "lowerdir=$root$d,upperdir=/ovl/up,workdir=/ovl/work" overlay "$root$d" &&
        { [ -z "$keep" ] || umount /keep; continue; }
      mode=700; o=",uid=$uid,gid=$gid"
    fi
    mount -t tmpfs -o "mode=$mode$o" tmpfs "$root$d" || fail "cannot mount a tmpfs on $d"
    if [ -n "$keep" ]; then
      mkdir -p "$root$cwd" && mount -o move /keep "$root$cwd"
    fi
  done < $E/root/writable
fi
while IFS='	' read -r tag mode dir; do
  [ "$tag" = @ROOT_TAG@ ] && continue
  mkdir -p "$root$dir" 2>/dev/null
  mount -t 9p -o "$(opts "$mode")" "$tag" "$root$dir" || fail "cannot mount share $dir (9p tag $tag)"
done < $E/shares
if [ -z "$root" ]; then
  [ -f $E/cwd ] && { d=$(cat $E/cwd; echo x); cd "${d%x}" 2>/dev/null; }
  exec "$@"
fi
# the command in the host's root: its environment, its directory, the user's ids
n=$#
set -- "$@" env -i
for f in $E/env/*; do
  [ -f "$f" ] || continue
  v=$(cat "$f"; echo x)
  set -- "$@" "${f##*/}=${v%x}"
done
set -- "$@" chroot $root /bin/sh -c 'cd "$1" 2>/dev/null || cd /; shift; exec "$@"' sh "${cwd:-/}"
if [ -f $E/root/setpriv ]; then
  set -- "$@" "$(cat $E/root/setpriv)" --reuid="$uid" --regid="$gid"
  g=$(cat $E/root/groups)
  if [ -n "$g" ]; then set -- "$@" --groups="$g"; else set -- "$@" --clear-groups; fi
  set -- "$@" --
fi
i=0
while [ $i -lt $n ]; do  # the command after what runs it
  set -- "$@" "$1"
  shift
  i=$((i + 1))
done
exec "$@"
""".replace("@MOUNT@", MOUNT_OPTS).replace("@RO@", RO_OPTS).replace("@RW@", RW_OPTS).replace(
    "@ROOT_TAG@", ROOT_TAG).replace("@NEWROOT@", NEWROOT)


def share_modules(assets: GuestAssets, log: Log, host_root: bool = False) -> list[Path]:
    """The 9p drivers' module files (in load order) for the guest's kernel, and overlayfs's with
    `host_root`, fetched once into the cache by numavm.guest.modules; [] for a --kernel numavm
    did not fetch (its 9p must then be built in, and numavm says so)."""
    if assets.debian is None:
        log("numavm: --kernel: numavm knows no modules for this kernel; its virtio-pci and 9p drivers "
            "must be built in for the guest to mount the shares")
        return []
    from numavm.guest.modules import extract_modules, ordered_modules

    where = extract_modules(assets.debian, log, assets.release, dirs=NINEP_MODULE_DIRS,
                            dirname=NINEP_MODULES_DIR)
    return ordered_modules(where, NINEP_MODULES + (OVERLAY_MODULES if host_root else ()))


def merge_modules(*lists: Sequence[Path]) -> list[Path]:
    """Module files in order, each name once (the disks' and the shares' drivers share virtio)."""
    out: list[Path] = []
    names: set[str] = set()
    for paths in lists:
        for p in paths:
            if p.name not in names:
                names.add(p.name)
                out.append(p)
    return out


def guest_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The user's environment for a command in the host's root (`ENV_NAMES`, `ENV_PREFIXES`)."""
    out = {k: v for k, v in environ.items()
           if (k in ENV_NAMES or k.startswith(ENV_PREFIXES)) and "\0" not in v and "=" not in k}
    out.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return out


def _file(path: str, data: str | bytes) -> Entry:
    return Entry(path, stat.S_IFREG | 0o644, data.encode() if isinstance(data, str) else data)


def share_entries(shares: Sequence[Share], cwd: str | None = None, uid: int | None = None,
                  gid: int | None = None, groups: Sequence[int] | None = None,
                  environ: Mapping[str, str] | None = None, setpriv: str | None = "") -> list[Entry]:
    """The initramfs members for these shares (numavm.spec.shares.parse_shares); [] for none.

    The defaults are this process's: `cwd` its directory, `uid`/`gid`/`groups` its ids,
    `environ` its environment, `setpriv` the host's ``setpriv`` ("" to look it up, None: none)."""
    if not shares:
        return []
    host_root = any(s.tag == ROOT_TAG for s in shares)
    for s in shares:
        if any(c in s.guest for c in "\t\n") or any(c in s.tag for c in "\t\n /"):
            raise ConfigError(f"--share {s.host}: a tab or newline in {s.guest!r}")
    if host_root:  # a guest path through a host symlink: where the host's / resolves it, as the guest would
        shares = [Share(s.host, os.path.realpath(s.guest), s.rw, s.tag) if s.tag != ROOT_TAG and os.path.isdir(s.guest)
                  else s for s in shares]
    # parents before children: a share inside another's guest directory is mounted on top of it
    ordered = sorted(shares, key=lambda s: (s.tag != ROOT_TAG, len(PurePosixPath(s.guest).parts)))
    lines = "".join(f"{s.tag}\t{'rw' if s.rw else 'ro'}\t{s.guest}\n" for s in ordered)
    out = [_file(SHARES_TABLE, lines), Entry(SHARED_SCRIPT_PATH, stat.S_IFREG | 0o755, SHARED_SCRIPT.encode())]
    cwd = os.getcwd() if cwd is None else cwd
    where = guest_cwd(tuple(shares), cwd)
    if where is not None:
        out.append(_file(CWD_FILE, where))
    if host_root:
        uid = os.getuid() if uid is None else uid
        gid = os.getgid() if gid is None else gid
        groups = sorted(set(os.getgroups()) - {gid}) if groups is None else list(groups)
        env = guest_env(os.environ if environ is None else environ)
        home = env.get("HOME", "")
        writable = list(WRITABLE)
        if home.startswith("/") and home != "/" and PurePosixPath(home).is_absolute() and "\n" not in home:
            writable.append(str(PurePosixPath(home)))
            out.append(_file(f"{ROOT_DIR}/home", str(PurePosixPath(home))))
        out.append(_file(f"{ROOT_DIR}/writable", "".join(f"{d}\n" for d in writable)))
        for s in shares:  # the root is read-only: a share's directory must be there, or in a tmpfs
            under = any(s.guest == d or s.guest.startswith(d + "/") for d in writable)
            if s.tag != ROOT_TAG and not under and not os.path.isdir(s.guest):
                raise ConfigError(f"--share {s.host}: with --host-root the guest directory {s.guest} must be a "
                                  f"directory on the host's / (read-only in the guest) or under "
                                  f"{', '.join(writable)}")
        out += [_file(f"{ROOT_DIR}/uid", str(uid)), _file(f"{ROOT_DIR}/gid", str(gid)),
                _file(f"{ROOT_DIR}/groups", ",".join(map(str, groups)))]
        if setpriv == "":
            setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
        if uid != 0:
            if not setpriv:
                raise ConfigError("--host-root: the host has no setpriv (util-linux) to run the command as "
                                  f"uid {uid} in the guest")
            out.append(_file(f"{ROOT_DIR}/setpriv", setpriv))
        for k, v in sorted(env.items()):
            out.append(_file(f"{ENV_DIR}/{k}", v))
    return out


__all__ = ["NINEP_MODULES", "SHARED_SCRIPT", "guest_env", "merge_modules", "share_entries", "share_modules"]
