"""Build bench/kvmloop.c into a shared object (cached by content); None without a compiler."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

SRC = Path(__file__).with_name("kvmloop.c")


def kvmloop_so() -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    digest = hashlib.sha256(SRC.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"numavm-bench-kvmloop-{digest}.so"
    if not out.exists():
        tmp = out.with_suffix(".tmp.so")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SRC)], check=True)
        tmp.replace(out)
    return out
