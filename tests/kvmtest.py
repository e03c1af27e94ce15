"""What tests that run guests on /dev/kvm share: a skip mark with the reason, and kick()
(the `kvm` and `sigusr1_handler` fixtures are in conftest.py)."""

from __future__ import annotations

import signal
import threading

import pytest

from numavm import kvm as K
from numavm.errors import NumavmError


def _kvm_unusable() -> str | None:
    try:
        K.Kvm().close()
    except NumavmError as e:
        return str(e)
    return None


_UNUSABLE = _kvm_unusable()
needs_kvm = pytest.mark.skipif(_UNUSABLE is not None, reason=f"/dev/kvm unusable: {_UNUSABLE}")


def kick(vcpu: K.Vcpu, thread: threading.Thread) -> None:
    """Get a vCPU thread out of KVM_RUN: immediate_exit, then a signal until it ends."""
    vcpu.immediate_exit = True
    while thread.is_alive():
        assert thread.ident is not None
        signal.pthread_kill(thread.ident, signal.SIGUSR1)
        thread.join(0.05)
