"""What tests that run guests share: skip marks with the reason (`needs_kvm`: /dev/kvm opens;
`needs_kvm_engine`: numavm's KVM engine can boot a guest here; `needs_qemu`; `needs_apt`: guest assets can be had), kick(), and the
CPU states small guest programs start in (the `kvm` and `sigusr1_handler` fixtures are in
conftest.py)."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from types import MappingProxyType
from typing import Callable, Sequence

import pytest

from numavm.vmm.kvm import cpu
from numavm.vmm.kvm import ioctls as K
from numavm.errors import NumavmError
from numavm.vmm.engine import detect, qemu_binary


def _kvm_unusable() -> str | None:
    try:
        K.Kvm().close()
    except NumavmError as e:
        return str(e)
    return None


_UNUSABLE = _kvm_unusable()
needs_kvm = pytest.mark.skipif(_UNUSABLE is not None, reason=f"/dev/kvm unusable: {_UNUSABLE}")
HOST = detect()
needs_kvm_engine = pytest.mark.skipif(not HOST.kvm_usable, reason=f"needs a usable /dev/kvm: {HOST.reason}")
needs_qemu = pytest.mark.skipif(not qemu_binary(), reason="qemu-system-x86_64 is not installed")
needs_apt = pytest.mark.skipif(not (os.path.exists("/usr/bin/apt-get") or os.environ.get("NUMAVM_KERNEL")),
                               reason="guest assets come from Debian's packages (apt-get)")
# the modules only the KVM engine needs: tests that the API and the TCG engine never import them
KVM_ONLY_MODULES = ("numavm.vmm.kvm", "numavm.plan.cpuid", "numavm.devices")


def kick(vcpu: K.Vcpu, thread: threading.Thread) -> None:
    """Get a vCPU thread out of KVM_RUN: immediate_exit, then a signal until it ends."""
    vcpu.immediate_exit = True
    while thread.is_alive():
        assert thread.ident is not None
        signal.pthread_kill(thread.ident, signal.SIGUSR1)
        thread.join(0.05)


def run_vcpu_threads(vcpus: Sequence[K.Vcpu], worker: Callable[[K.Vcpu], None],
                     timeout: float) -> list[int]:
    """Run `worker(vcpu)` in one thread per vCPU (KVM_RUN releases the GIL); kick out and
    return the APIC ids of those still running after `timeout` seconds."""
    threads = [threading.Thread(target=worker, args=(v,)) for v in vcpus]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [(v, t) for v, t in zip(vcpus, threads) if t.is_alive()]
    for v, t in stuck:
        kick(v, t)
    return [v.apic_id for v, _ in stuck]


def real_mode_state(cs_base: int, rip: int) -> cpu.CpuState:
    """16-bit real mode with CS at `cs_base` (a multiple of 16) and IP = `rip`."""
    if cs_base % 16 or cs_base >= 1 << 20:
        raise ValueError(f"real-mode CS base {cs_base:#x} is not a paragraph below 1 MiB")
    cs = cpu.SegmentDescriptor(base=cs_base, limit=0xFFFF, selector=cs_base >> 4,
                 type=cpu.SEG_TYPE_CODE_XR_ACCESSED)
    return cpu.CpuState(segments=MappingProxyType({"cs": cs}),
                    regs=MappingProxyType({"rip": rip, "rflags": cpu.RFLAGS_RESERVED}))


def with_regs(state: cpu.CpuState, **regs: int) -> cpu.CpuState:
    """`state` with more general registers set."""
    return dataclasses.replace(state, regs={**state.regs, **regs})

