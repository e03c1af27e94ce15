"""The C library and system calls numavm uses, each declared once.

Every failure becomes a `HostError` whose message carries the call, the
errno's name and its meaning, built in one place (`_raise`).  Modeled on
pyudev's _ctypeslib: signatures as data, an errcheck that raises.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import NoReturn

from numavm.errors import NumavmError


class HostError(NumavmError, OSError):
    """A system call failed; `errno` is kept for callers that branch on it."""

    def __init__(self, err: int, what: str) -> None:
        name = errno.errorcode.get(err, f"errno {err}")
        OSError.__init__(self, err, f"{what}: {name} ({os.strerror(err)})")

    def __str__(self) -> str:
        return str(self.strerror)


def _raise(err: int, what: str) -> NoReturn:
    raise HostError(err, what)


def rewrap(exc: HostError, what: str) -> HostError:
    """The same failure (errno) named for what numavm was doing."""
    return HostError(exc.errno or 0, what)


def raise_from_oserror(exc: OSError, what: str) -> NoReturn:
    """Re-raise an OSError from the stdlib (fcntl.ioctl, os.*) as a HostError."""
    raise HostError(exc.errno or 0, what) from None


libc = ctypes.CDLL(None, use_errno=True)


def _errcheck(result: int, func: object, args: tuple[object, ...]) -> int:
    if result == -1:
        _raise(ctypes.get_errno(), getattr(func, "__name__", "libc"))
    return result


def declare(name: str, restype: type, *argtypes: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """Bind libc's `name` with its signature and the raising errcheck."""
    fn = getattr(libc, name)
    fn.restype = restype
    fn.argtypes = argtypes
    fn.errcheck = _errcheck
    return fn


# syscall(2) for calls glibc wraps late or not at all (mbind, get_mempolicy).
syscall = declare("syscall", ctypes.c_long, ctypes.c_long)
syscall.argtypes = None  # variadic: callers pass ctypes-typed arguments


def _syscall_numbers() -> dict[str, int]:
    return {
        # arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h
        "x86_64": {"mbind": 237, "get_mempolicy": 239, "move_pages": 279, "openat2": 437},
        "aarch64": {"mbind": 235, "get_mempolicy": 236, "move_pages": 239, "openat2": 437},
    }.get(os.uname().machine, {})  # what platform.machine() reads, without loading it


_SYSCALLS = _syscall_numbers()


def declare_syscall(name: str, restype: type, *argtypes: type) -> "functools.partial[int]":
    """Bind the system call `name` through syscall(2), for calls glibc does not wrap.

    Each gets its own function pointer (``libc["syscall"]`` is not cached), so
    its fixed signature and its name in errors are its own.
    """
    number = _SYSCALLS.get(name)
    fn = libc["syscall"]
    fn.restype = restype
    fn.argtypes = (ctypes.c_long, *argtypes)
    fn.errcheck = _errcheck  # type: ignore[assignment]
    fn.__name__ = name
    if number is None:
        def missing(*args: object) -> int:
            _raise(errno.ENOSYS, f"{name} (no system call number known for this architecture)")
        return functools.partial(missing)
    return functools.partial(fn, number)


# Memory: madvise(2) through glibc; the NUMA policy calls through syscall(2)
# (glibc leaves them to libnuma).  The nodemask arguments follow the kernel's
# convention: `maxnode` is the number of bits in the mask plus one.
madvise = declare("madvise", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
# int mincore(void *addr, size_t length, unsigned char *vec): one byte per page, bit 0 = resident
mincore = declare("mincore", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
# long mbind(unsigned long start, unsigned long len, unsigned long mode,
#            const unsigned long *nmask, unsigned long maxnode, unsigned flags)
mbind = declare_syscall("mbind", ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.POINTER(ctypes.c_ulong), ctypes.c_ulong, ctypes.c_uint)
# long get_mempolicy(int *policy, unsigned long *nmask, unsigned long maxnode,
#                    unsigned long addr, unsigned long flags)
get_mempolicy = declare_syscall("get_mempolicy", ctypes.c_long, ctypes.POINTER(ctypes.c_int),
                                ctypes.POINTER(ctypes.c_ulong), ctypes.c_ulong, ctypes.c_void_p,
                                ctypes.c_ulong)
# long move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags):
# only to report pages' nodes (nodes NULL); glibc leaves it to libnuma.
move_pages = declare_syscall("move_pages", ctypes.c_long, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
# int fallocate(int fd, int mode, off_t offset, off_t len): os.posix_fallocate may fall back to
# writing every block.
fallocate = declare("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)

# Files: openat2(2) (Linux 5.6+; glibc 2.36 has no wrapper).  long openat2(int dirfd, const char
# *path, struct open_how *how, size_t size); struct open_how is three u64s: flags, mode, resolve
# (include/uapi/linux/openat2.h).  The caller chooses the RESOLVE_* bits: the 9p device confines
# every guest-named path with them (numavm.devices.p9.confine), the engine hands it `openat2`.


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2 = declare_syscall("openat2", ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(OpenHow),
                           ctypes.c_size_t)


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int, resolve: int) -> int:
    """A new file descriptor for ``path`` under ``dirfd``; HostError (an OSError) with the errno otherwise."""
    how = OpenHow(flags, mode, resolve)
    return int(_openat2(dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))


# Process lifetime: prctl(2).  PR_SET_PDEATHSIG: the signal a child gets when
# the thread that forked it exits (include/uapi/linux/prctl.h).
PR_SET_PDEATHSIG = 1
# PR_CAPBSET_DROP: a capability out of the bounding set, so no program this process execs gets
# it, root or not (linux/capability.h: CAP_MKNOD, making device nodes).
PR_CAPBSET_DROP = 24
CAP_MKNOD = 27
# PR_SET_VMA_ANON_NAME (Linux 5.17+, CONFIG_ANON_VMA_NAME): a name for anonymous memory in
# /proc/PID/maps, as "[anon:NAME]".
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0
prctl = declare("prctl", ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                ctypes.c_ulong)
