"""The C library and system calls numavm uses, each declared once.

Every failure becomes a `HostError` whose message carries the call, the
errno's name and its meaning, built in one place (`_raise`).  Modeled on
pyudev's _ctypeslib: signatures as data, an errcheck that raises.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .errors import NumavmError


class HostError(NumavmError, OSError):
    """A system call failed; `errno` is kept for callers that branch on it."""

    def __init__(self, err: int, what: str) -> None:
        name = errno.errorcode.get(err, f"errno {err}")
        OSError.__init__(self, err, f"{what}: {name} ({os.strerror(err)})")

    def __str__(self) -> str:
        return str(self.strerror)


def _raise(err: int, what: str) -> None:
    raise HostError(err, what)


def raise_from_oserror(exc: OSError, what: str) -> None:
    """Re-raise an OSError from the stdlib (fcntl.ioctl, os.*) as a HostError."""
    raise HostError(exc.errno or 0, what) from None


libc = ctypes.CDLL(None, use_errno=True)


def _errcheck(result: int, func: object, args: tuple) -> int:
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
