"""The host side of a run's shares on numavm's own 9p server (the KVM engine).

`open_roots` opens each shared directory once, ``O_PATH | O_DIRECTORY``, before anything of
the machine is allocated: the descriptor, not the path, is what the 9p server serves from
(numavm.devices.p9.confine), so a directory renamed or replaced on the host later does not
change what the guest sees.  `fid_budget` makes room for the descriptors the servers hold:
each fid is one, an open directory being listed two, and RLIMIT_NOFILE's soft limit is often
1024 while its hard limit is far higher; the soft limit is raised toward the hard one for the
run and put back after it.
"""

from __future__ import annotations

import os
import resource
from typing import Sequence

from numavm.errors import ConfigError
from numavm.spec.shares import HOST_ROOT_OPT, ROOT_TAG, SHARE_OPT, Share

__all__ = ["open_roots", "close_roots", "fid_budget", "restore_nofile", "option_of", "FD_RESERVE", "MIN_FIDS",
           "WANT_FIDS"]

FD_RESERVE = 256  # descriptors left to numavm itself (KVM's vCPU and eventfds, disks, pipes)
MIN_FIDS = 64  # below this a guest cannot even list a directory tree: the run is refused
# Each share's fid limit where RLIMIT_NOFILE allows it.  A guest keeps a fid (here: a descriptor)
# for every file it has looked up while its inode is cached (cache=loose keeps them until it
# evicts the inode), about two per file: with 4096 fids, `ls -l` of 2,000 files in one
# directory got ENFILE for its last ~90 in L1.
WANT_FIDS = 1 << 16


def option_of(share: Share) -> str:
    return HOST_ROOT_OPT if share.tag == ROOT_TAG else f"{SHARE_OPT} {share.host}"


def open_roots(shares: Sequence[Share]) -> list[int]:
    """One ``O_PATH | O_DIRECTORY`` descriptor per share, in order; ConfigError (nothing left
    open) when a directory went away or is no longer one since the options were checked."""
    fds: list[int] = []
    try:
        for s in shares:
            try:
                fds.append(os.open(s.host, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as e:
                raise ConfigError(f"{option_of(s)}: {(e.strerror or 'cannot be opened').lower()}") from None
    except BaseException:
        close_roots(fds)
        raise
    return fds


def close_roots(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fid_budget(shares: int, want: int) -> tuple[int, tuple[int, int] | None]:
    """Each of `shares` servers' fid limit (`want`, or less when RLIMIT_NOFILE leaves less room)
    and the RLIMIT_NOFILE to restore after the run (None: unchanged).  The soft limit is raised
    toward what the fids need, and the hard one too where numavm may (CAP_SYS_RESOURCE: root; an
    init that never raised it leaves 4096), up to the kernel's fs.nr_open.  ConfigError when
    not even MIN_FIDS fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    need = FD_RESERVE + _open_fds() + 2 * want * shares
    old = None
    if soft != inf and soft < need:
        target = min(need, _nr_open())
        # the hard limit raised too where numavm may (root), else the soft one up to the hard one
        attempts = [(target, hard)] if hard == inf or hard >= target else [(target, target), (hard, hard)]
        for limits in attempts:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            except (OSError, ValueError):
                continue
            old, soft = (soft, hard), limits[0]
            break
    room = (soft if soft != resource.RLIM_INFINITY else need) - FD_RESERVE - _open_fds()
    fids = min(want, room // (2 * shares)) if shares else want
    if fids < MIN_FIDS:
        restore_nofile(old)
        raise ConfigError(f"{SHARE_OPT}: RLIMIT_NOFILE ({soft}) leaves room for {max(fids, 0)} open files per "
                          f"share, fewer than {MIN_FIDS}; raise it (ulimit -n)")
    return fids, old


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def restore_nofile(old: tuple[int, int] | None) -> None:
    if old is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, old)
        except (OSError, ValueError):
            pass


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64
