"""Fixtures shared by the test modules."""

from __future__ import annotations

from typing import Iterator

import pytest

from numavm import kvm as K


@pytest.fixture
def kvm() -> Iterator[K.Kvm]:
    """An open /dev/kvm; tests that take it are marked `kvmtest.needs_kvm`."""
    with K.Kvm() as k:
        yield k
