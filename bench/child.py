"""numavm's side of the benchmarks, run in a fresh interpreter: `python -m bench.child MODE ...`.

Modes (each prints one JSON line on stderr at the end, with its own phase times):
  setup TOPO          build a KvmMachine, run a one-`out` guest; at that first port
                      exit write b"!" to stdout (the harness timestamps it)
  rss TOPO            build a KvmMachine, print "ready", wait for stdin to close
  exits N VARIANT     N port exits: VARIANT full (KvmMachine.run), bare (a Python
                      loop of vcpu.run() only) or c (a C loop of ioctl(KVM_RUN), --so)
TOPO: "example" or "D:C:S" (D domains, C vCPUs spread round-robin... see topology()).
"""

from __future__ import annotations

import json
import os
import sys
import time

T_START = time.monotonic()


def topology(spec_text: str):
    """The example, or D domains x C vCPUs of S MiB each ("64:64:32")."""
    from numavm.spec import config
    from numavm.spec.topology import MachineSpec, parse_numa

    if spec_text == "example":
        return config.example().build()
    d, c, s = (int(x) for x in spec_text.split(":"))
    per = c // d if c >= d else 0
    doms = []
    for i in range(d):
        if c >= d:
            lo = i * per
            hi = c - 1 if i == d - 1 else lo + per - 1
            cpus = f",cpus={lo}-{hi}" if hi > lo else f",cpus={lo}"
        else:
            cpus = f",cpus={i}" if i < c else ""
        doms.append(parse_numa(f"id={i},size={s}M{cpus}"))
    return MachineSpec(domains=doms).build()


def _machine(topo_text: str):
    from numavm.plan.layout import plan_layout
    from numavm.vmm.kvm.machine import KvmMachine

    layout = plan_layout(topology(topo_text))
    return KvmMachine(layout, name="bench")


def setup(topo_text: str) -> None:
    from numavm.vmm.run import Outcome

    from .guests import MARK_PORT, first_out_program, load_long_mode

    t_import = time.monotonic()
    m = _machine(topo_text)
    t_built = time.monotonic()
    seen: dict[str, float] = {}

    class Mark:
        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            if "first_exit" not in seen:
                os.write(1, b"!")
                seen["first_exit"] = time.monotonic()
                m.stop(Outcome.STOPPED, "first port exit")

    try:
        m.bus.register(MARK_PORT, 1, Mark())
        load_long_mode(m, first_out_program())
        t_loaded = time.monotonic()
        result = m.run(timeout=120)
    finally:
        m.close()
    t_closed = time.monotonic()
    if "first_exit" not in seen:
        raise SystemExit(f"no port exit: {result.outcome} {result.detail}")
    print(json.dumps({"imports": t_import - T_START, "build": t_built - t_import,
                      "load": t_loaded - t_built, "run_to_exit": seen["first_exit"] - t_loaded,
                      "teardown": t_closed - seen["first_exit"],
                      "vcpus": len(m.layout.apic_ids)}), file=sys.stderr)


def rss(topo_text: str) -> None:
    m = _machine(topo_text)
    try:
        assert m.memory is not None
        guest = sum(p.resident for p in m.memory.audit().values())
        os.write(1, b"ready\n")
        sys.stdin.read()
    finally:
        m.close()
    print(json.dumps({"guest_resident_audit": guest}), file=sys.stderr)


def exits(n: int, variant: str, so: str | None) -> None:
    import ctypes

    from numavm.vmm.run import Outcome

    from .guests import LOOP_PORT, MARK_PORT, load_long_mode, out_loop_program

    m = _machine("1:1:64")
    marks: list[float] = []
    try:
        load_long_mode(m, out_loop_program(n), all_vcpus=True)
        if variant == "full":
            class Mark:
                def read(self, offset: int, size: int) -> int:
                    return 0

                def write(self, offset: int, size: int, value: int) -> None:
                    marks.append(time.perf_counter())
                    if len(marks) == 2:
                        m.stop(Outcome.STOPPED, "loop done")

            m.bus.register(MARK_PORT, 1, Mark())
            result = m.run(timeout=600)
            if len(marks) != 2:
                raise SystemExit(f"loop did not finish: {result.outcome} {result.detail}")
            seconds = marks[1] - marks[0]
            unhandled = result.unhandled_writes.get(LOOP_PORT, 0)
        else:
            vcpu = m.vcpus[0]
            vcpu.run()  # up to the first mark
            if variant == "bare":
                run = vcpu.run
                t = time.perf_counter()
                for _ in range(n):
                    run()
                seconds = time.perf_counter() - t
            elif variant == "c":
                lib = ctypes.CDLL(so)
                lib.kvm_run_loop.restype = ctypes.c_long
                lib.kvm_run_loop.argtypes = [ctypes.c_int, ctypes.c_long]
                t = time.perf_counter()
                done = lib.kvm_run_loop(vcpu.fd, n)
                seconds = time.perf_counter() - t
                if done != n:
                    raise SystemExit(f"C loop: KVM_RUN failed after {done} of {n}")
            else:
                raise SystemExit(f"unknown variant {variant}")
            unhandled = n
            # the last run() returned at the final mark's exit? one more for it
            vcpu.run()
            io = vcpu.io_exit()
            if io.port != MARK_PORT:
                raise SystemExit(f"expected the end mark, got port {io.port:#x}")
    finally:
        m.close()
    print(json.dumps({"seconds": seconds, "n": n, "loop_exits": unhandled}), file=sys.stderr)


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "setup":
        setup(argv[1])
    elif mode == "rss":
        rss(argv[1])
    elif mode == "exits":
        exits(int(argv[1]), argv[2], argv[3] if len(argv) > 3 else None)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
