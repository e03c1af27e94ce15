"""`python -m bench.soak`: many consecutive `numavm check`s in one process; does anything grow?

Each run is `numavm.cli.main(["check", ...])` in this process, so whatever a
run fails to release (fds, threads, memfds, child processes, files in the
temporary directory, memory) piles up in the process that is measured.
After each run it records the process's open fds, threads, memfds, living
children, ``numavm-*`` entries in TMPDIR and resident memory (VmRSS), and
writes the summary into BENCHMARKS.md between the soak markers (`python -m
bench` keeps that section when it rewrites the file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import sys
import tempfile
import time
from pathlib import Path

from .runner import SOAK_BEGIN as BEGIN
from .runner import SOAK_END as END


def sample() -> dict[str, int]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    children = 0
    for task in os.listdir("/proc/self/task"):
        try:
            children += len(Path(f"/proc/self/task/{task}/children").read_text().split())
        except OSError:
            pass
    rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return {
        "fds": len(fds),
        "memfds": sum(1 for f in fds if f.startswith("/memfd:")),
        "threads": len(os.listdir("/proc/self/task")),
        "children": children,
        "temp": sum(1 for n in os.listdir(tempfile.gettempdir()) if n.startswith("numavm-")),
        "rss_kib": rss,
    }


def soak(argv: list[str], runs: int, log=print) -> dict:  # type: ignore[no-untyped-def]
    from numavm.cli import main

    samples, codes, seconds = [], [], []
    for i in range(runs):
        out, err = io.StringIO(), io.StringIO()
        t = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            codes.append(main(list(argv)))
        seconds.append(time.monotonic() - t)
        samples.append(sample())
        if codes[-1] != codes[0] or i == 0:
            log(f"run {i + 1}: exit {codes[-1]}: {err.getvalue().strip().splitlines()[-1:]}")
        if (i + 1) % 10 == 0 or i == 0:
            log(f"run {i + 1}/{runs}: {samples[-1]} ({seconds[-1]:.1f} s)")
    return {"argv": argv, "runs": runs, "codes": codes, "samples": samples, "seconds": seconds}


def summary(r: dict) -> tuple[str, list[str]]:
    """(table row, notes) for one soak."""
    s = r["samples"]
    first, last = s[0], s[-1]
    keys = ("fds", "threads", "memfds", "children", "temp")
    counts = ", ".join(f"{k} {first[k]}→{last[k]} (max {max(x[k] for x in s)})" for k in keys)
    settle = min(10, len(s) - 1)  # allocator and import caches fill during the first runs
    rss0, rss1 = s[settle]["rss_kib"] / 1024, last["rss_kib"] / 1024
    per_run = (rss1 - rss0) / max(len(s) - 1 - settle, 1) * 1024
    half = len(s) // 2  # growth that goes on to the end is a leak; growth that stops is caches settling
    late = (last["rss_kib"] - s[half]["rss_kib"]) / max(len(s) - 1 - half, 1)
    grows = [k for k in keys if last[k] > first[k]]
    ok = sum(1 for c in r["codes"] if c == 0)
    secs = sorted(r["seconds"])
    verdict = ("nothing grows" if not grows else f"grows: {', '.join(grows)}")
    row = (f"| {' '.join(r['argv'])} | {r['runs']} | {ok}/{r['runs']} | {counts} | "
           f"{s[0]['rss_kib'] / 1024:.1f} → {rss0:.1f} (run {settle + 1}) → {rss1:.1f} MiB, "
           f"{per_run:+.1f} KiB/run after run {settle + 1}, {late:+.1f} KiB/run over the last half | "
           f"{secs[len(secs) // 2]:.2f} s | {verdict} |")
    return row, []


def write_section(path: Path, rows: list[str], notes: list[str]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [BEGIN, "## Soak: consecutive checks in one process", "",
             f"Measured {now} by `python -m bench.soak {' '.join(sys.argv[1:])}`. Each run is "
             "`numavm.cli.main([\"check\", ...])` in the same process; after each, the process's open fds, "
             "threads, memfds, living children, `numavm-*` entries in a private TMPDIR and VmRSS are read. "
             "Counts are after run 1 → after the last run (max over all runs); RSS after run 1 → after run 11 "
             "(allocator and caches settle) → after the last, and its growth per run from run 11 on.", "",
             "| check | runs | exit 0 | counts | RSS | median run | counts verdict |", "|---|---|---|---|---|---|---|",
             *rows, "", *[f"- {n}" for n in notes], END]
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + "\n".join(block) + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(block) + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200, help="checks per engine (default 200)")
    p.add_argument("--engine", action="append", choices=("tcg", "kvm"),
                   help="repeatable; default: both")
    p.add_argument("--kvm-timeout", type=float, default=None,
                   help="end each KVM check after this many seconds (where KVM emulates guest code a "
                        "kernel-stage check takes ~45 s): the run then exercises the whole monitor "
                        "lifecycle and ends with exit 73")
    p.add_argument("--tcg-stage", choices=("kernel", "userspace"), default="userspace",
                   help="the TCG engine's check stage (default userspace; kernel is ~5x quicker)")
    p.add_argument("--note", action="append", default=[], help="a line for the report, repeatable")
    p.add_argument("--out", default="BENCHMARKS.md")
    args = p.parse_args(argv)
    rows, notes = [], list(args.note)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # a private TMPDIR: only this process's temporary files are counted
    tmp = tempfile.mkdtemp(prefix="soak-")
    os.environ["TMPDIR"] = tempfile.tempdir = tmp
    for engine in args.engine or ["tcg", "kvm"]:
        cmd = ["check", "--accel", engine]
        if engine == "tcg":
            cmd += ["--stage", args.tcg_stage]
        if engine == "kvm":
            cmd += ["--stage", "kernel"]
            if args.kvm_timeout:
                cmd += ["--timeout", f"{args.kvm_timeout:g}"]
        log(f"soak: {' '.join(cmd)} x {args.runs}")
        row, extra = summary(soak(cmd, args.runs, log))
        rows.append(row)
        notes += extra
        log(row)
    os.rmdir(tmp)  # fails (and says so) if a run left anything behind
    write_section(Path(args.out), rows, notes)
    log(f"wrote the soak section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
