"""What tests that run guests on /dev/kvm share: a skip mark with the reason (the `kvm`
fixture is in conftest.py)."""

from __future__ import annotations

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
