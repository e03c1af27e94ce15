"""Fixtures shared by the test modules."""

from __future__ import annotations

import signal
from typing import Iterator

import pytest

from numavm.vmm.kvm import ioctls as K
@pytest.fixture
def kvm() -> Iterator[K.Kvm]:
    """An open /dev/kvm; tests that take it are marked `kvmtest.needs_kvm`."""
    with K.Kvm() as k:
        yield k


@pytest.fixture(scope="module")
def sigusr1_handler() -> Iterator[None]:
    """A no-op SIGUSR1 handler: its only job is to make KVM_RUN return EINTR when kicked."""
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    yield
    signal.signal(signal.SIGUSR1, old)
