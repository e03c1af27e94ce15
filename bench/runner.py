"""`python -m bench`: run the benchmarks, alternating numavm and its peers, and write BENCHMARKS.md.

Method, for every benchmark: warm-up rounds (each side once, discarded), then
counted rounds; a round runs numavm, then each peer, once (A B A B ...), so
slow drifts of the host hit every side alike.  Each side's min/median/max is
reported, and the median over rounds of the per-round ratio numavm/peer.
Nothing here is asserted: timings go into the table only.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .proc import BenchError

RUNS = 5
WARMUP = 1
QUICK_RUNS = 2


@dataclass
class Side:
    name: str  # "numavm", "QEMU-KVM", ...
    fn: Callable[[], float] | None  # one sample; None: not measurable (reason in `missing`)
    missing: str = ""
    command: str = ""  # how to run this side by hand, for the Commands section
    samples: list[float | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def ok(self) -> list[float]:
        return [s for s in self.samples if s is not None]


@dataclass
class Bench:
    key: str  # for --only (the group name also selects)
    group: str
    title: str
    unit: str  # "s", "ms", "µs", "GiB/s", "MiB"
    numavm: Side
    peers: list[Side]
    runs: int = RUNS
    warmup: int = WARMUP
    higher_is_better: bool = False
    goal: str = ""
    goal_met: Callable[["Bench"], str] | None = None  # "yes"/"no"/"n/a" with a reason
    notes: list[str] = field(default_factory=list)
    extra: Callable[["Bench"], list[str]] | None = None  # derived lines, after the run
    skipped: str = ""  # a reason: the whole benchmark did not run

    def sides(self) -> list[Side]:
        return [self.numavm, *self.peers]


def median_ratio(a: Side, b: Side) -> float | None:
    pairs = [x / y for x, y in zip(a.samples, b.samples) if x is not None and y is not None and y > 0]
    return statistics.median(pairs) if pairs else None


def med(side: Side) -> float | None:
    vals = side.ok()
    return statistics.median(vals) if vals else None


def _sample(side: Side) -> float | None:
    if side.fn is None:
        return None
    try:
        v = side.fn()
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise BenchError("no value")
        return float(v)
    except BenchError as e:
        side.errors.append(str(e))
    except Exception as e:  # a harness bug should not lose the other rows
        side.errors.append(f"{type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
    return None


def run_bench(b: Bench, log: Callable[[str], None]) -> None:
    if b.skipped:
        log(f"[{b.key}] skipped: {b.skipped}")
        return
    sides = b.sides()
    for w in range(b.warmup):
        for s in sides:
            if s.fn is not None:
                log(f"[{b.key}] warm-up {w + 1}/{b.warmup}: {s.name}")
                _sample(s)
        for s in sides:  # warm-up failures are kept only if every counted run fails too
            s.errors.clear()
    for r in range(b.runs):
        for s in sides:
            if s.fn is None:
                continue
            v = _sample(s)
            s.samples.append(v)
            shown = "failed: " + s.errors[-1][:200] if v is None else f"{v:.6g} {b.unit}"
            log(f"[{b.key}] run {r + 1}/{b.runs}: {s.name}: {shown}")


# ---------------------------------------------------------------- report

def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def triple(side: Side, unit: str) -> str:
    vals = side.ok()
    if side.fn is None:
        return f"not measured: {side.missing}"
    if not vals:
        return "failed: " + (side.errors[-1][:160] if side.errors else "no sample")
    s = f"{fmt(min(vals), unit)} / **{fmt(statistics.median(vals), unit)}** / {fmt(max(vals), unit)}"
    if len(vals) < len(side.samples):
        s += f" ({len(side.samples) - len(vals)} failed)"
    return s


def table(benches: list[Bench]) -> list[str]:
    lines = ["| benchmark | unit | numavm min / **median** / max | peer | peer min / **median** / max "
             "| median ratio numavm/peer | counted runs | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for b in benches:
        goal = b.goal
        if b.goal_met is not None and not b.skipped:
            goal += f" — {b.goal_met(b)}"
        if b.skipped:
            lines.append(f"| {b.title} | {b.unit} | skipped: {b.skipped} | | | | 0 | {b.goal} |")
            continue
        first = True
        for p in b.peers or [None]:
            n_cell = triple(b.numavm, b.unit) if first else "″"
            if p is None:
                lines.append(f"| {b.title} | {b.unit} | {n_cell} | – | – | – | {b.runs} | {goal} |")
            else:
                ratio = median_ratio(b.numavm, p)
                rtxt = "–" if ratio is None else f"{ratio:.3g}"
                lines.append(f"| {b.title if first else '″'} | {b.unit} | {n_cell} | {p.name} | "
                             f"{triple(p, b.unit)} | {rtxt} | {b.runs} | {goal if first else ''} |")
            first = False
    return lines


def write_report(path: Path, benches: list[Bench], argv: list[str], host_lines: list[str],
                 elapsed: float, profile: list[str]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    out = ["# Benchmarks: numavm against QEMU, side by side", "",
           f"Generated {now} by `{cmd}` in {elapsed:.0f} s. Rerun it from the repository root "
           "(`python -m bench --help`); `--quick` is a smoke run with small sizes and 2 counted runs.", "",
           "## Host", "", *host_lines, "",
           "## Method", "",
           "Every benchmark runs warm-up rounds (each side once, discarded), then counted rounds in which "
           "numavm and each peer run once in turn (A B A B ...). The table gives each side's min / median / "
           "max over the counted runs, and the median over rounds of the per-round ratio numavm/peer "
           "(below 1 means numavm takes less, or — for GiB/s rows — reaches less). Times are taken in the "
           "harness process with a monotonic clock, from just before a child process is spawned to the "
           "moment its output is read, the same way for numavm and QEMU. No timing is asserted anywhere.",
           "", "## Results", "", *table(benches), ""]
    out += ["## What each row measures", ""]
    for b in benches:
        out.append(f"### {b.title}")
        out.append("")
        out += [f"- {n}" for n in b.notes]
        if b.extra is not None and not b.skipped:
            try:
                out += [f"- {n}" for n in b.extra(b)]
            except Exception as e:  # derived lines must not lose the report
                out.append(f"- (derived values unavailable: {e})")
        for s in b.sides():
            if s.errors:
                uniq = list(dict.fromkeys(s.errors))
                out.append(f"- {s.name} errors: " + "; ".join(u[:300] for u in uniq[:3]))
        out.append("")
    out += ["## Commands", "", "The sides as run (paths and sizes as on this host):", "", "```"]
    seen = set()
    for b in benches:
        for s in b.sides():
            if s.command and s.command not in seen:
                seen.add(s.command)
                out.append(f"# {b.title}: {s.name}")
                out.append(s.command)
    out += ["```", ""]
    if profile:
        out += ["## Profile of the slowest numavm side", "", *profile, ""]
    # the soak section is measured by `python -m bench.soak`, separately: keep it
    old = path.read_text() if path.exists() else ""
    if SOAK_BEGIN in old and SOAK_END in old:
        out += [SOAK_BEGIN + old.split(SOAK_BEGIN, 1)[1].split(SOAK_END, 1)[0] + SOAK_END, ""]
    path.write_text("\n".join(out))


SOAK_BEGIN, SOAK_END = "<!-- soak -->", "<!-- /soak -->"  # bench.soak's section


# ---------------------------------------------------------------- main

GROUPS = ("boot", "setup", "prefault", "rss", "exits", "scale", "check", "disk")


def build(quick: bool, only: set[str] | None) -> list[Bench]:
    import importlib

    out: list[Bench] = []
    for g in GROUPS:
        if only is not None and g not in only and not any(k.startswith(g) for k in only):
            continue
        for b in importlib.import_module(f"{__package__}.{g}").benches(quick):
            if only is None or g in only or b.key in only:
                if quick:
                    b.runs = min(b.runs, QUICK_RUNS)
                    b.warmup = min(b.warmup, 1)
                out.append(b)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 counted runs, small sizes, "
                   "no KVM-backed kernel boots")
    p.add_argument("--only", metavar="NAME,...", help=f"groups ({', '.join(GROUPS)}) or benchmark keys")
    p.add_argument("--out", metavar="FILE", default="BENCHMARKS.md", help="report (default BENCHMARKS.md)")
    p.add_argument("--profile", action="store_true",
                   help="also profile numavm's slowest side with py-spy (or cProfile) into the report")
    args = p.parse_args(argv)
    only = None if not args.only else {x.strip() for x in args.only.split(",") if x.strip()}
    if only is not None:
        unknown = [x for x in only if not any(x == g or x.startswith(g) for g in GROUPS)]
        if unknown:
            p.error(f"--only: unknown {', '.join(unknown)} (groups: {', '.join(GROUPS)})")
    from .hostinfo import host_lines

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.monotonic()
    benches = build(args.quick, only)
    for b in benches:
        run_bench(b, log)
    profile: list[str] = []
    if args.profile:
        from .profiling import profile_slowest
        profile = profile_slowest(benches, log)
    write_report(Path(args.out), benches, argv, host_lines(), time.monotonic() - start, profile)
    log(f"wrote {args.out}")
    return 0
