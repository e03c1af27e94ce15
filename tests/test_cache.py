"""The cache is optional, and what it holds is whole.

A read-only or full cache (real tmpfs mounts) still runs a guest, from a
private directory removed at exit; when nothing can be written one line says
what is needed.  Truncated cache files are not trusted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from numavm.host import cache as C
from numavm.guest import launch as G
from numavm.guest.assets import cached
from numavm.vmm.engine import qemu_binary
from numavm.guest.initramfs import build_initramfs, cached_initramfs


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip()}")


@pytest.fixture
def mounts(tmp_path):  # type: ignore[no-untyped-def]
    """mount(name, options) -> a tmpfs under tmp_path, unmounted afterwards."""
    done: list[Path] = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        mount_tmpfs(where, options)
        done.append(where)
        return where

    yield mount
    for where in reversed(done):
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def assets():  # type: ignore[no-untyped-def]
    a = cached()
    if a is None:
        pytest.skip("no guest kernel in the cache (numavm fetch)")
    return a


def fill(where: Path) -> None:
    """Fill a small tmpfs to the last byte."""
    with open(where / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    try:
        with open(where / "filler", "ab") as f:
            while True:
                f.write(b"\0")
                f.flush()
    except OSError:
        pass


# ---------------------------------------------------------------- units


def test_store_writes_whole_files_in_the_cache(tmp_path):
    path = C.store("x.bin", b"abc" * 1000, print, root=tmp_path)
    assert path == tmp_path / "x.bin" and path.read_bytes() == b"abc" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temporary left


def test_store_falls_back_to_a_private_dir_for_a_read_only_cache(mounts, monkeypatch, tmp_path):
    ro = mounts("ro", "ro,size=1m")
    monkeypatch.setattr(C, "_private", None)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    said: list[str] = []
    path = C.store("x.bin", b"data", said.append, root=ro)
    try:
        assert path.parent.name.startswith(f"numavm-cache-{os.getpid()}-") and path.read_bytes() == b"data"
        assert len(said) == 1 and "Read-only file system" in said[0]
        assert C.find("x.bin", root=ro) == path
    finally:
        assert C._private is not None
        C._private.close()
    assert not path.parent.exists()


def test_store_says_what_it_needs_when_nothing_can_be_written(mounts, monkeypatch):
    full = mounts("full", "size=1m")
    fill(full)
    monkeypatch.setattr(C, "_private", None)
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(full))
    with pytest.raises(C.CacheError, match=rf"^cannot keep x.bin \(2.0 MiB\): the cache {full}: No space left "
                                           rf"on device; {full}: No space left on device; "):
        C.store("x.bin", b"\1" * (2 << 20), print, root=full)
    if C._private is not None:
        C._private.close()


@pytest.mark.parametrize("left", ["half", "empty"])
def test_a_truncated_vmlinux_in_the_cache_is_unpacked_again(assets, tmp_path, monkeypatch, left):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    said: list[str] = []
    first = G.unpacked_kernel(assets.kernel, said.append)
    assert first.parent == tmp_path / "numavm" and any("unpacked" in s for s in said)
    whole = first.read_bytes()
    # what a crash mid-write without the rename would leave (an empty file cannot even be mapped)
    first.write_bytes(whole[: len(whole) // 2] if left == "half" else b"")
    said.clear()
    again = G.unpacked_kernel(assets.kernel, said.append)
    assert again == first and any("unpacked" in s for s in said)
    assert again.read_bytes() == whole
    said.clear()
    assert G.unpacked_kernel(assets.kernel, said.append) == first and said == []  # now trusted


def test_prune_keeps_the_newest_of_each_pattern(tmp_path):
    for i, name in enumerate(["a-1", "a-2", "a-3", "b-1", "b-2", "other"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(i * 10**9, i * 10**9))
    C.prune(tmp_path, ("a-*", "b-*"), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-3", "b-2", "other"]
    C.prune(tmp_path / "missing", ("a-*",), 0)  # nothing there: nothing to do, no error


def test_old_unpacked_kernels_go_and_a_used_one_stays(assets, tmp_path, monkeypatch):
    """A new kernel's image evicts the least recently used beyond KERNELS_KEPT; using an
    image (found by its note) makes it recent, however old its file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "numavm"
    used = G.unpacked_kernel(assets.kernel, lambda s: None)
    os.utime(used, ns=(0, 0))
    stale = [cache / f"vmlinux-{i:016x}" for i in range(G.KERNELS_KEPT)]
    for i, q in enumerate(stale):
        q.write_bytes(b"not an ELF")
        os.utime(q, ns=((i + 1) * 10**9, (i + 1) * 10**9))
    assert G.unpacked_kernel(assets.kernel, lambda s: None) == used  # used: now the newest
    (real_note,) = cache.glob("vmlinux-src-id-*")
    for i in range(G.KERNEL_NOTES_KEPT):  # older notes of kernel files long gone
        q = cache / f"vmlinux-src-id-{i:08x}"
        q.write_text(f"/gone/{i}|1|2|3\n{i:016x}\n")
        os.utime(q, ns=(i * 10**9, i * 10**9))
    other = tmp_path / "vmlinuz-other"
    other.write_bytes(assets.kernel.read_bytes() + b"\0")  # another kernel file: another image
    new = G.unpacked_kernel(other, lambda s: None)
    assert new != used and new.parent == cache
    kept = sorted(cache.glob("vmlinux-" + "[0-9a-f]" * 16))
    assert kept == sorted([used, new, *stale[-(G.KERNELS_KEPT - 2):]])
    notes = set(cache.glob("vmlinux-src-id-*"))  # the notes are not images, and are pruned apart
    assert len(notes) == G.KERNEL_NOTES_KEPT and real_note in notes
    assert cache / "vmlinux-src-id-00000000" not in notes


def test_a_truncated_initramfs_in_the_cache_is_built_again(assets, tmp_path):
    data = cached_initramfs(assets.busybox, cache_dir=tmp_path)
    (path,) = tmp_path.glob("initramfs-*.cpio.gz")
    path.write_bytes(data[:-100])
    assert cached_initramfs(assets.busybox, cache_dir=tmp_path) == data
    assert path.read_bytes() == data


def test_a_note_is_recalled_only_for_its_whole_identity(tmp_path):
    """Notes are named by a CRC-32 of the identity, which may collide: the note holds the whole
    identity and only that one recalls it."""
    from numavm.host.cache import _note_name, note, recall
    note("k", "/a|1|2|3", "v1", tmp_path)
    assert recall("k", "/a|1|2|3", tmp_path) == "v1"
    assert recall("k", "/a|1|2|4", tmp_path) is None and recall("j", "/a|1|2|3", tmp_path) is None
    (tmp_path / _note_name("k", "/b")).write_text("/c\nforged\n")  # another identity, same name
    assert recall("k", "/b", tmp_path) is None


def test_a_repeated_initramfs_is_found_by_what_it_is_made_of(assets, tmp_path, monkeypatch):
    """A second run with the same busybox and command takes the image without building the
    archive (nor reading busybox); a changed busybox, another command or a forged identity
    file is a miss that builds the right image."""
    import shutil

    from numavm.guest import initramfs as I
    bb = tmp_path / "busybox"
    shutil.copy2(assets.busybox, bb)
    cache = tmp_path / "cache"
    data = cached_initramfs(bb, ["true"], cache_dir=cache)
    built = []
    real = I.initramfs_entries
    monkeypatch.setattr(I, "initramfs_entries", lambda *a, **k: built.append(a) or real(*a, **k))
    assert cached_initramfs(bb, ["true"], cache_dir=cache) == data and built == []
    assert cached_initramfs(bb, ["false"], cache_dir=cache) != data and len(built) == 1
    with open(bb, "ab") as f:  # a new busybox (still an ELF file): a new image
        f.write(b"\0")
    assert cached_initramfs(bb, ["true"], cache_dir=cache) != data and len(built) == 2
    (ident,) = [p for p in cache.glob("initramfs-id-*") if b'"true"' in p.read_bytes()
                and str(bb.stat().st_size).encode() in p.read_bytes()]
    text = ident.read_text().splitlines()
    ident.write_text(text[0].replace('"true"', '"trux"') + "\n" + text[1] + "\n")  # a crc32 collision
    expected = build_initramfs(bb, ["true"])
    n = len(built)
    assert cached_initramfs(bb, ["true"], cache_dir=cache) == expected and len(built) == n + 1
    # three archives (true, false, true with the new busybox), each found by one identity
    assert len(list(cache.glob("initramfs-id-*"))) == 3 and len(list(cache.glob("initramfs-*.cpio.gz"))) == 3


# ---------------------------------------------------------------- the command line


def numavm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "numavm", *args], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not qemu_binary(), reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_check_runs_with_an_unwritable_cache(kind, mounts, assets, tmp_path):
    cache = mounts("cache", "ro,size=1m" if kind == "read-only" else "size=1m")
    if kind == "full":
        fill(cache)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = numavm({"XDG_CACHE_HOME": str(cache), "TMPDIR": str(tmp)},
               "check", "--accel", "tcg", "--stage", "kernel", "--kernel", str(assets.kernel))
    assert r.returncode == 0, r.stderr[-2000:]
    why = "Read-only file system" if kind == "read-only" else "No space left on device"
    assert f"the cache {cache}/numavm cannot be written ({why}): using {tmp}/numavm-cache-" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp.iterdir()) == []  # the private directory went with the run


def test_check_says_what_it_needs_when_nothing_can_be_written(assets, tmp_path):
    """The cache and every temporary directory Python would try are full: one line, exit 1.

    Python's tempfile falls back from TMPDIR to /tmp, /var/tmp and the working
    directory, so they are covered with full tmpfs mounts in a mount namespace of
    the command's own (unshare -m).
    """
    import shlex
    import shutil
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) for a private mount namespace")
    fill_cmd = "head -c 2m /dev/zero > {d}/filler 2>/dev/null || true; "
    script = "set -e; "
    env = dict(os.environ, XDG_CACHE_HOME="/tmp", TMPDIR="/tmp")
    python = sys.executable
    # A checkout (and its .venv) under /tmp would vanish under the tmpfs: see it elsewhere.
    src = Path(__file__).resolve().parents[1]
    covered = ("/tmp", "/var/tmp")
    if any(src.is_relative_to(d) for d in covered):
        if not Path(python).is_relative_to(src):
            pytest.skip(f"the checkout is under {covered} and the interpreter {python} outside it")
        alias = "/run/numavm-test-src"
        script += f"mkdir -p {alias}; mount --bind {shlex.quote(str(src))} {alias}; "
        python = alias + "/" + str(Path(python).relative_to(src))
        env["PYTHONPATH"] = alias
    for d in covered:
        script += f"mount -t tmpfs -o size=1m tmpfs {d}; " + fill_cmd.format(d=d)
    script += ("cd /tmp; exec " + shlex.join([python, "-m", "numavm", "check", "--accel", "tcg",
                                              "--stage", "kernel", "--kernel", str(assets.kernel)]))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       env=env, capture_output=True, text=True, timeout=300)
    if "unshare:" in r.stderr or "mount:" in r.stderr:
        pytest.skip(f"no private mount namespace here: {r.stderr.strip()}")
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("numavm: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "XDG_CACHE_HOME" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_fetch_into_a_read_only_cache_is_one_line(mounts):
    ro = mounts("ro", "ro,size=1m")
    r = numavm({}, "fetch", "--cache", str(ro / "numavm"))
    if "apt" in r.stderr and "Read-only" not in r.stderr:
        pytest.skip(f"apt cannot resolve the packages here: {r.stderr.strip()}")
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines()[-1] == (f"numavm: error: fetch: cannot write the cache {ro}/numavm: Read-only "
                                         f"file system; free space there or name a writable directory with "
                                         f"--cache or XDG_CACHE_HOME")
    assert "Traceback" not in r.stderr
