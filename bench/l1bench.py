"""numavm's KVM engine against QEMU-KVM on a hardware-virtualization KVM (L1, bench/l1.py).

`python -m bench.l1bench [--runs N] [--fastest-only] [--out BENCHMARKS.md] [--console FILE]` boots L1 once and
measures inside it, alternating the sides each round:

- launch to the guest's NUMA-ready line ("Built N zonelists") and to its
  userspace topology report (numavm's /init, `@@NUMAVM-TOPOLOGY-END@@`), the
  example machine: numavm `check --accel kvm --stage userspace --verbose`
  against QEMU-KVM with the same topology (`numavm export --to qemu`), the
  same initramfs, kernel command line and kernel, once as the vmlinux through
  PVH with qboot and once as the bzImage with SeaBIOS (`--fastest-only`: qboot only);
- a 1-vCPU, 2-domain machine likewise, launch to numavm's exit vs QEMU's;
- one port-I/O exit (bench/exits.py's guest loop), numavm vs QEMU-KVM.

The figures go into a section of BENCHMARKS.md (replaced on each run).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from . import l1

SECTION = "## numavm-KVM vs QEMU-KVM on a hardware-virtualization KVM (L1)"
UP = b"@@NUMAVM-TOPOLOGY-END@@"
READY = rb"Built \d+ zonelists"
SMALL = ["-c", "1", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M"]
# one side takes ~20 s in an idle L1 and ~60 s in a busy one; a side that hangs is recorded
# (with its console's tail) and the round goes on, rather than holding the whole run for long
SIDE_TIMEOUT = 300.0


# ---------------------------------------------------------------- inside L1


def _machine(small: bool):  # type: ignore[no-untyped-def]
    from numavm.spec import config
    from numavm.spec.topology import MachineSpec, parse_numa
    if not small:
        return config.example().build()
    return MachineSpec(cpus=1, domains=[parse_numa("id=0,size=256M,cpus=0"), parse_numa("id=1,size=256M")]).build()


def _qemu_argv(kernel: str, initrd: str, cmdline: str, small: bool, qboot: bool) -> list[str]:
    from numavm.peers.export import qemu_args
    topo = _machine(small)
    fw = ["-bios", "/usr/share/qemu/qboot.rom"] if qboot else []
    return ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", *fw, *qemu_args(topo), "-kernel", kernel,
            "-initrd", initrd, "-append", cmdline, "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot"]


def _sample(argv: list[str]) -> dict[str, float | None]:
    """Launch to the NUMA-ready line, to the userspace report, and to the process's exit."""
    import re

    from .proc import Spawned, child_env
    out: dict[str, float | None] = {}
    with Spawned(argv, env=child_env(), cwd=str(l1.ROOT), stderr_to_stdout=True) as c:
        try:
            out["ready"] = c.wait_for_re(READY, SIDE_TIMEOUT)
            out["userspace"] = c.wait_for(UP, SIDE_TIMEOUT)
            c.finish(SIDE_TIMEOUT)
        except Exception:
            _progress(f"l1bench: a side failed; the end of its output:\n{bytes(c.out[-4000:]).decode(errors='replace')}")
            raise
        out["exit"] = time.monotonic() - c.t0
        m = re.findall(rb"\"uptime\":([\d.]+)", bytes(c.out))
        out["guest_uptime"] = float(m[-1]) if m else None
    return out


def _progress(line: str) -> None:
    """A line on stderr and on L1's console too: the console is the only output of L1 that the
    host sees while L1 runs (and keeps if L1 dies), so a run that stops shows where."""
    print(line, file=sys.stderr, flush=True)
    try:
        with open("/dev/console", "w") as con:
            con.write(line[:500] + "\n")
    except OSError:
        pass


def inner(runs: int, fastest_only: bool = False) -> int:
    from numavm.guest.launch import guest_assets, guest_initrd, kernel_cmdline

    from .exits import numavm_sample, qemu_sample
    assets = guest_assets(None, lambda s: None)
    initrd = Path(os.environ.get("TMPDIR", "/tmp")) / "l1bench-initrd.gz"
    initrd.write_bytes(guest_initrd(None, assets.busybox, None, []))
    cmdline = kernel_cmdline("userspace", False)
    numavm = [sys.executable, "-m", "numavm", "check", "--accel", "kvm", "--stage", "userspace", "--verbose"]
    sides = {}
    for small in (False, True):
        tag = "small" if small else "example"
        sides[f"{tag}/numavm-KVM"] = numavm + (SMALL if small else [])
        sides[f"{tag}/QEMU-KVM vmlinux+qboot"] = _qemu_argv(str(assets.vmlinux), str(initrd), cmdline, small, True)
        if not fastest_only:
            sides[f"{tag}/QEMU-KVM bzImage+SeaBIOS"] = _qemu_argv(str(assets.kernel), str(initrd), cmdline, small,
                                                                  False)
    results: dict[str, list] = {k: [] for k in sides}
    results["exits/numavm-KVM"] = []
    results["exits/QEMU-KVM"] = []
    for r in range(runs):
        for name, argv in sides.items():
            try:
                results[name].append(_sample(argv))
            except Exception as e:  # noqa: BLE001 - a failed side is a row entry, not a crash
                results[name].append({"error": str(e)[-600:]})
            _progress(f"l1bench: round {r} {name}: {results[name][-1]}")
        for name, fn in (("exits/numavm-KVM", lambda: numavm_sample(20000, "full")),
                         ("exits/QEMU-KVM", lambda: qemu_sample(20000))):
            try:
                results[name].append({"us": fn()})
            except Exception as e:  # noqa: BLE001
                results[name].append({"error": str(e)[-300:]})
    results["argv"] = {k: v for k, v in sides.items()}  # type: ignore[assignment]
    print("@@L1BENCH " + json.dumps(results), flush=True)
    return 0


# ---------------------------------------------------------------- on the host


def _cell(samples: list[dict], key: str) -> str:
    vals = [s[key] for s in samples if s.get(key) is not None]
    errs = [s["error"] for s in samples if "error" in s]
    if not vals:
        return "failed: " + (errs[0] if errs else "no value")
    txt = f"{min(vals):.1f} / **{statistics.median(vals):.1f}** / {max(vals):.1f}"
    return txt + (f" ({len(errs)} failed)" if errs else "")


def _host() -> str:
    """The Debian release, and the QEMU under L1 (its TCG emulates L1; the same QEMU runs in L1)."""
    try:
        rel = "Debian " + Path("/etc/debian_version").read_text().strip()
    except OSError:
        rel = "not Debian"
    v = l1.qemu_version()
    return f"{rel}, QEMU {v[0]}.{v[1]}" if v else rel


def report(results: dict, runs: int, l1_seconds: float, flags: str = "") -> str:
    lines = [SECTION, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m bench.l1bench --runs "
             f"{runs}{flags}`: one L1 boot ({l1_seconds:.0f} s in all), in it {runs} rounds, each side once per round "
             "(min / **median** / max, seconds unless said). L1 is QEMU TCG emulating an AMD CPU with SVM+NPT, "
             "so numavm's Python and both VMMs run emulated too: the figures compare the sides, they are not "
             "bare-metal times. Same kernel (Debian's), same initramfs (numavm's, no command), same kernel "
             "command line, same topology (`numavm export --to qemu`); QEMU with `-cpu host`. "
             f"Host: {_host()}.", "",
             "| machine | side | launch to NUMA-ready | launch to userspace report | launch to exit |",
             "|---|---|---|---|---|"]
    for tag, title in (("example", "example (4 vCPUs, 3 domains)"), ("small", "1 vCPU, 2 domains")):
        for side in ("numavm-KVM", "QEMU-KVM vmlinux+qboot", "QEMU-KVM bzImage+SeaBIOS"):
            s = results.get(f"{tag}/{side}", [])
            if not s:
                continue  # a side left out (--fastest-only)
            lines.append(f"| {title} | {side} | {_cell(s, 'ready')} | {_cell(s, 'userspace')} | "
                         f"{_cell(s, 'exit')} |")
    lines += ["", "| port-I/O exit (µs per exit, 20,000 exits) | numavm-KVM | QEMU-KVM |", "|---|---|---|",
              f"| | {_cell(results.get('exits/numavm-KVM', []), 'us')} | "
              f"{_cell(results.get('exits/QEMU-KVM', []), 'us')} |", ""]
    # the guest's own clock at its report: launch to report minus this is the VMM's start-up
    lines.append("Guest uptime at the report (the guest's own clock, seconds): " + "; ".join(
        f"{name}: " + ", ".join(f"{s['guest_uptime']:.1f}" for s in samples if s.get("guest_uptime"))
        for name, samples in results.items() if "/" in name and not name.startswith("exits/")
        and any(s.get("guest_uptime") for s in samples)) + ".")
    failed = [(name, i, smp["error"]) for name, samples in results.items() if isinstance(samples, list)
              for i, smp in enumerate(samples) if "error" in smp]
    if failed:
        lines += ["", "Failed samples (the end of what each printed):"]
        lines += [f"- {name}, round {i}: {' '.join(err.split())[-400:]}" for name, i, err in failed]
    lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.l1bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--fastest-only", action="store_true",
                   help="QEMU only with vmlinux+qboot (its faster side in most runs), not also with bzImage+SeaBIOS")
    p.add_argument("--console", metavar="FILE", help="write L1's whole console (its kernel log, each "
                   "side's result as it ends) to FILE")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.inner:
        return inner(ns.runs, ns.fastest_only)
    why = l1.unavailable()
    if why:
        print(f"l1bench: {why}", file=sys.stderr)
        return 1
    argv = [sys.executable, "-m", "bench.l1bench", "--inner", "--runs", str(ns.runs)]
    cases, r = l1.run_cases([l1.Case("bench", argv + (["--fastest-only"] if ns.fastest_only else []), timeout=7200)],
                            timeout=7800)
    if ns.console:
        Path(ns.console).write_text(r.console)
    c = cases.get("bench")
    line = next((ln for ln in (c.stdout if c else "").splitlines() if ln.startswith("@@L1BENCH ")), None)
    if line is None:
        print(f"l1bench: no results ({r.detail}); {c.stderr[-2000:] if c else r.stderr[-2000:]!r}\n"
              f"L1's console, last lines:\n{r.console[-3000:]}", file=sys.stderr)
        return 1
    text = report(json.loads(line[len("@@L1BENCH "):]), ns.runs, r.seconds,
                  " --fastest-only" if ns.fastest_only else "")
    print(text)
    out = Path(ns.out)
    old = out.read_text() if out.exists() else ""
    if SECTION in old:
        head, _, rest = old.partition(SECTION)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1:] if nxt >= 0 else "")
    out.write_text(old.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
