"""The benchmark harness end to end: `python -m bench --quick --only ...` writes a table
in which both numavm and its peer were measured.  Behaviour only: no timing is asserted."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from numavm.vmm.engine import detect

ROOT = Path(__file__).resolve().parent.parent
host = detect()
pytestmark = pytest.mark.skipif(not host.kvm_usable, reason=f"needs a usable /dev/kvm: {host.reason}")
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None

MEASURED = re.compile(r"[\d.]+ / \*\*[\d.]+\*\* / [\d.]+")


def _row(text: str, title_start: str, peer: str) -> list[str]:
    """Cells of the results row of `title_start` (its first line) or of its `peer` line."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    out, current = [], None
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] != "″":
            current = cells[0]
        if current and current.startswith(title_start) and cells[3] == peer:
            out = cells
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "setup-example,exits",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.exists()
    return out.read_text()


def test_report_has_host_method_table_and_commands(report: str) -> None:
    for heading in ("## Host", "## Method", "## Results", "## What each row measures", "## Commands"):
        assert heading in report
    assert "emulates guest code" in report
    assert "python -m bench --quick --only setup-example,exits" in report


def test_setup_row_measures_both_sides(report: str) -> None:
    row = _row(report, "Setup: launch to first guest instruction, example", "QEMU-KVM")
    assert row, report
    assert MEASURED.search(row[2]), row  # numavm
    if HAVE_QEMU:
        assert MEASURED.search(row[4]), row  # QEMU-KVM
        assert re.fullmatch(r"[\d.]+", row[5]), row  # the median ratio


def test_exit_row_measures_numavm_and_the_bare_loops(report: str) -> None:
    first = _row(report, "Port I/O exit", "QEMU-KVM")
    assert first and MEASURED.search(first[2]), first  # numavm, on the row's first line
    bare = _row(report, "Port I/O exit", "bare KVM_RUN, Python loop")
    assert bare and MEASURED.search(bare[4]), bare
    if HAVE_QEMU:
        assert MEASURED.search(first[4]), first
    if shutil.which("cc") or shutil.which("gcc"):
        assert "Python share of one exit" in report


def test_unknown_group_is_refused() -> None:
    r = subprocess.run([sys.executable, "-m", "bench", "--only", "nonsense"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unknown" in r.stderr
