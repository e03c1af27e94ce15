"""Profile numavm's slowest side with py-spy (sampling, every thread) and summarise where time goes."""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .proc import ROOT, child_env, shell
from .runner import Bench

RATE = 100


def _target(benches: list[Bench]) -> tuple[str, list[str]] | None:
    """(title, argv) of the numavm side with the largest median time (seconds rows only)."""
    best = None
    for b in benches:
        if b.unit != "s" or b.skipped or not b.numavm.ok():
            continue
        med = sorted(b.numavm.ok())[len(b.numavm.ok()) // 2]
        if best is None or med > best[0]:
            best = (med, b)
    if best is None:
        return None
    b = best[1]
    if b.group == "boot":
        from .boot import numavm_argv
        return b.title, numavm_argv()
    topo = b.numavm.command.split("setup ")[-1].split()[0] if "setup " in b.numavm.command else "example"
    return b.title, [sys.executable, "-m", "bench.child", "setup", topo]


def summarise(collapsed: str, top: int = 12) -> list[str]:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        if frames and frames[0].startswith(("thread", "process")):
            threads[frames[0]] += count
        fr = [f for f in frames if not f.startswith(("process", "thread"))]
        if fr:
            own[fr[-1]] += count
        for f in set(fr):
            incl[f] += count
    if not total:
        return ["(no samples)"]
    out = [f"{total} samples at {RATE} Hz of active (non-idle) Python threads.", "",
           "| own time (leaf frame) | share |", "|---|---|"]
    out += [f"| `{f}` | {c / total:.0%} |" for f, c in own.most_common(top)]
    out += ["", "| inclusive (frame anywhere on the stack) | share |", "|---|---|"]
    out += [f"| `{f}` | {c / total:.0%} |" for f, c in incl.most_common(top)]
    return out


def profile_slowest(benches: list[Bench], log: Callable[[str], None]) -> list[str]:
    target = _target(benches)
    if target is None:
        return ["No numavm side measured in seconds: nothing to profile."]
    title, argv = target
    spy = shutil.which("py-spy")
    if spy is None:
        return [f"py-spy is not installed (`pip install py-spy`); the slowest numavm side was: {title}."]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.txt"
        cmd = [spy, "record", "--nonblocking", "--threads", "--rate", str(RATE), "--format", "raw",
               "-o", str(out), "--", *argv]
        log(f"[profile] {shell(cmd)}")
        subprocess.run(cmd, env=child_env(), cwd=str(ROOT), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=1800)
        text = out.read_text() if out.exists() else ""
    return [f"Target: numavm's side of “{title}” (the largest numavm median among the rows in seconds), "
            f"sampled by `{shell(cmd[:9])} -- {shell(argv)}`.", "", *summarise(text)]
