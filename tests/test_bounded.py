"""Bounded by design (issue 27): every input limited before it is read, every output error
handled, one fetch per cache.

One test (or a parametrized family) per numbered case of the issue.  Commands run as child
processes under an address-space limit (RLIMIT_AS) and a timeout, so a regression fails the
test instead of taking the host's memory, as `--initrd /dev/zero` once did.  Time bounds are
generous guards against hangs, not timing assertions.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from numavm.errors import ConfigError
from numavm.vmm.engine import qemu_binary

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
AS_LIMIT = 1 << 30  # far above what a refused input needs (~40 MiB), far below the host's memory
GUARD = 20  # seconds: a hang, not a slow run


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def numavm(*args: str, input: str | bytes | None = None, stdout: int | None = subprocess.PIPE,
           env: dict[str, str] | None = None, timeout: float = GUARD) -> subprocess.CompletedProcess[bytes]:
    """`python -m numavm ARGS` with this checkout's code, capped in memory and time."""
    e = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    data = input.encode() if isinstance(input, str) else input
    return subprocess.run([sys.executable, "-m", "numavm", *args], input=data, stdout=stdout,
                          stderr=subprocess.PIPE, env=e, timeout=timeout, preexec_fn=_limits,
                          stdin=None if data is not None else subprocess.DEVNULL)


def one_line(r: subprocess.CompletedProcess[bytes], status: int = 2) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == status, (r.returncode, err[-2000:])
    assert err.count("\n") == 1 and err.startswith("numavm: error: "), err[-2000:]
    return err


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    f = tmp_path_factory.mktemp("bounded") / "sparse-10G"
    with open(f, "wb") as h:
        h.truncate(10 << 30)
    return f


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    f = tmp_path / "fifo"
    os.mkfifo(f)
    return f


# ---------------------------------------------------------------- 1. files read without limit

FILE_OPTIONS = [("--initrd", "a regular file"), ("--add", "a regular file"), ("--kernel", "a regular file")]


@pytest.mark.parametrize("option,allowed", FILE_OPTIONS)
@pytest.mark.parametrize("what", ["/dev/zero", "/dev/urandom", "fifo", "directory", "sparse"])
def test_guest_files_are_checked_before_they_are_read(option, allowed, what, fifo, sparse, tmp_path):
    path = {"fifo": str(fifo), "directory": str(tmp_path), "sparse": str(sparse)}.get(what, what)
    t = time.monotonic()
    r = numavm("run", "--accel", "tcg", option, path, "--", "true")
    err = one_line(r)
    assert time.monotonic() - t < 10
    assert err.startswith(f"numavm: error: {option}: {path} "), err
    if what == "sparse":
        assert "over the size limit" in err
    else:
        assert allowed in err and ("character device" in err or "FIFO" in err or "directory" in err), err


@pytest.mark.parametrize("what", ["/dev/zero", "/dev/urandom", "directory", "sparse"])
def test_text_inputs_are_checked_before_they_are_read(what, sparse, tmp_path):
    path = {"directory": str(tmp_path), "sparse": str(sparse)}.get(what, what)
    for argv in (["plan", "-f", path], ["import", "--from", "qemu", path]):
        err = one_line(numavm(*argv))
        assert "over the size limit" in err if what == "sparse" else "a regular file or a pipe" in err


def test_text_input_over_the_limit_is_said_so_not_not_utf8():
    text = "-smp 2 " + "é" * (1 << 20)  # valid UTF-8, over 1 MiB: cut mid-character, it was "not UTF-8"
    err = one_line(numavm("import", "--from", "qemu", input=text))
    assert "over the size limit of 1 MiB" in err and "UTF-8" not in err


@pytest.mark.parametrize("argv", [["plan", "-f"], ["import", "--from", "qemu"]])
def test_a_named_fifo_is_refused_and_a_pipe_is_read(argv, fifo):
    """A named FIFO without a writer hung the read; `<(...)` (a pipe, /dev/fd/N) still works."""
    t = time.monotonic()
    assert "is a FIFO" in one_line(numavm(*argv, str(fifo)))
    assert time.monotonic() - t < 10
    rd, wr = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "numavm", *argv, f"/dev/fd/{rd}", "--json"], pass_fds=(rd,),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         preexec_fn=_limits)
    os.close(rd)
    threading.Thread(target=lambda: (os.write(wr, b"cpus = 2\n" if argv[0] == "plan" else b"-smp 2"),
                                     os.close(wr)), daemon=True).start()
    out, err = p.communicate(timeout=GUARD)
    assert p.returncode == 0, err
    assert json.loads(out)["cpus"] == 2


def test_bounded_read_stops_at_the_limit(tmp_path):
    from numavm.host.files import read_input, read_stream

    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert read_input(f, "--opt", 100) == b"x" * 100
    with pytest.raises(ConfigError, match=r"^--opt: .* over the size limit of 99 bytes$"):
        read_input(f, "--opt", 99)
    with open("/dev/zero", "rb") as z, pytest.raises(ConfigError, match="over the size limit of 1 KiB"):
        read_stream(z, "import", "stdin", 1024)


# ---------------------------------------------------------------- 2. ranges expanded before they are checked

BIG = 50_000  # repeats: ~650 KB of input, each a range of 65,536 members


@pytest.mark.parametrize("peer,text", [
    ("libvirt", "<domain><vcpu>4</vcpu><cpu><numa><cell id='0' cpus='{r}' memory='1048576'/></numa></cpu></domain>"),
    ("libvirt", "<domain><vcpu>4</vcpu><numatune><memnode cellid='0' mode='strict' nodeset='{r}'/></numatune>"
                "<cpu><numa><cell id='0' cpus='0-3' memory='1048576'/></numa></cpu></domain>"),
    ("qemu", "-smp 4 -m 1G -numa node,mem=1G,cpus={q}"),
    ("cloud-hypervisor", "--cpus boot=4 --memory size=0 --memory-zone id=z,size=1G "
                         "--numa guest_numa_id=0,cpus=[{r}],memory_zones=z"),
    ("bhyve", "-c 4 -m 1G -n id=0,size=1G -o domains.0.cpus={r}"),
])
def test_import_ranges_are_checked_before_expansion(peer, text):
    body = text.format(r=",".join(["0-65535"] * BIG), q=",cpus=".join(["0-65535"] * BIG))
    t = time.monotonic()
    err = one_line(numavm("import", "--from", peer, input=body[: (1 << 20) - 1]))
    assert time.monotonic() - t < 10
    assert "65535 is past the largest allowed" in err, err


def test_numa_ranges_are_checked_before_expansion():
    arg = "id=0,size=1G," + ",".join(["cpus=0-65535"] * 10_000)  # ~130 KiB, one argument
    err = one_line(numavm("plan", "-n", arg))
    assert "65535 is past the largest allowed, 1023" in err
    arg = "id=0,size=1G," + ",".join(f"cpus={i}" for i in range(1024)) + ",cpus=7"
    assert "vCPU 7 named more than once" in one_line(numavm("plan", "-c", "1024", "-n", arg))


def test_qemu_numa_cpu_is_linear():
    text = "-smp 1024 -m 1G -numa node,mem=1G " + " ".join(["-numa cpu,node-id=0,socket-id=0"] * 30_000)
    t = time.monotonic()
    err = one_line(numavm("import", "--from", "qemu", input=text))
    assert time.monotonic() - t < 10
    assert "at most one per vCPU" in err
    # one per vCPU, each naming its socket: accepted, quickly
    text = "-smp 1024,sockets=1024 -m 1G -numa node,mem=1G " + " ".join(
        f"-numa cpu,node-id=0,socket-id={s}" for s in range(1024))
    r = numavm("import", "--from", "qemu", "--json", input=text)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cpus"] == 1024


def test_shell_words_are_split_in_linear_time():
    from numavm.peers import shell_words

    t = time.monotonic()
    assert shell_words("-m '" + "x" * 900_000 + "'") == ["-m", "x" * 900_000]
    assert time.monotonic() - t < 5  # shlex took minutes for a word this long


# ---------------------------------------------------------------- 3. tracebacks


@pytest.mark.skipif(not qemu_binary(), reason="qemu-system-x86_64 is not installed")
def test_an_elf_that_is_no_kernel_is_bad_input():
    err = one_line(numavm("run", "--accel", "tcg", "--kernel", "/bin/ls", "--", "true"))
    assert "--kernel: /bin/ls: an x86-64 ELF file, but not a Linux kernel" in err


@pytest.mark.parametrize("toml", [
    "cpus = " + "9" * 5000,
    "cpus = 0x" + "f" * 5000,
    "cpus = 0b" + "1" * 20000,
    '[[domain]]\nid = 0\nsize = 0o' + "7" * 5000,
])
def test_huge_toml_numbers_are_one_line(tmp_path, toml):
    f = tmp_path / "m.toml"
    f.write_text(toml + "\n")
    err = one_line(numavm("plan", "-f", str(f)))
    assert "numavm's numbers fit 64" in err


@pytest.mark.parametrize("peer,text", [
    ("qemu", "-m {n}"),
    ("qemu", "-smp 1 -object memory-backend-ram,id=m,size={n} -numa node,memdev=m"),
    ("cloud-hypervisor", "--cpus boot=1 --memory size={n}"),
    ("bhyve", "-c 1 -m {n}"),
    ("libvirt", "<domain><vcpu>1</vcpu><memory>{n}</memory></domain>"),
])
def test_huge_peer_numbers_are_one_line(peer, text):
    one_line(numavm("import", "--from", peer, input=text.format(n="9" * 5000)))


def test_an_unknown_xml_encoding_is_no_traceback():
    r = numavm("import", "--from", "libvirt", input="<?xml version='1.0' encoding='x-no-such'?>"
               "<domain><vcpu>1</vcpu><memory>1048576</memory></domain>")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr  # read as the UTF-8 it is


BIG_MACHINE = ["-c", "256"] + [a for i in range(64) for a in ("-n", f"id={i},size=64M,cpus={4 * i}-{4 * i + 3}")]


@pytest.mark.parametrize("argv", [["plan"], ["plan", "--json"], ["export", "--to", "libvirt"]])
def test_a_full_disk_on_stdout_is_one_line(argv):
    with open("/dev/full", "wb") as full:
        r = numavm(*argv, stdout=full.fileno())
    err = one_line(r, status=1)
    assert "cannot write stdout: No space left on device" in err


def test_acpi_to_a_full_stdout_is_one_line(tmp_path):
    with open("/dev/full", "wb") as full:
        r = numavm("acpi", "--out", str(tmp_path / "t"), stdout=full.fileno())
    assert "cannot write stdout" in one_line(r, status=1)


@pytest.mark.parametrize("argv", [["plan", "--json", *BIG_MACHINE], ["plan", *BIG_MACHINE],
                                  ["export", "--to", "qemu", *BIG_MACHINE]])
def test_a_closed_pipe_ends_quietly_with_141(argv):
    p = subprocess.Popen([sys.executable, "-m", "numavm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=_limits)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(10)
    p.stdout.close()  # `| head -c 10`
    err = p.stderr.read().decode()
    rc = p.wait(GUARD)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert rc in (0, 141), (rc, err)  # 0 when everything fitted the pipe before it closed


def _handles_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        if "State:\tZ" in status:
            return True  # ended: nothing left to wait for
        caught = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return True  # gone: nothing left to wait for
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01, 0.03])
@pytest.mark.parametrize("how", [["-m", "numavm"], ["-c", "import sys; sys.argv[0] = 'numavm'; "
                                                          "from numavm.cli import main; sys.exit(main())"]])
def test_a_signal_at_start_up_ends_with_130(sig, delay, how):
    """From the moment numavm's code runs (as `python -m numavm` or the console script, which
    imports numavm.cli first), during its imports too: 130, no traceback."""
    p = subprocess.Popen([sys.executable, *how, "import", "--from", "qemu"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=_limits)
    end = time.monotonic() + GUARD
    while not _handles_sigterm(p.pid) and time.monotonic() < end:
        pass
    time.sleep(delay)
    p.send_signal(sig)
    out, err = p.communicate(timeout=GUARD)  # stdin stays open until then: import waits for it
    assert p.returncode == 130, (p.returncode, err.decode()[-2000:])
    assert b"Traceback" not in err


# ---------------------------------------------------------------- 4. silent loss


def _plan(*argv: str, input: str | None = None) -> dict[str, object]:
    r = numavm(*argv, input=input)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("peer", ["libvirt", "qemu"])
def test_hmat_round_trips_through_libvirt_and_qemu(peer):
    toml = str(EXAMPLES / "cxl-tiered.toml")
    text = numavm("export", "--to", peer, "-f", toml).stdout.decode()
    back = _plan("import", "--from", peer, "--json", input=text)
    want = _plan("plan", "--json", "-f", toml)
    assert back == want
    assert back["hmat"]


def test_qemu_hmat_that_numavm_cannot_express_is_one_line():
    base = "-smp 1 -m 1G -numa node,cpus=0,mem=1G "
    assert "memory only" in one_line(numavm("import", "--from", "qemu", input=base + (
        "-numa hmat-lb,initiator=0,target=0,hierarchy=first-level,data-type=access-latency,latency=5")))
    assert "cache=" in one_line(numavm("import", "--from", "libvirt", input=(
        "<domain><vcpu>1</vcpu><cpu><numa><cell id='0' cpus='0' memory='1048576'/><interconnects>"
        "<latency initiator='0' target='0' cache='1' type='access' value='5'/></interconnects></numa></cpu>"
        "</domain>")))


def test_bhyve_export_of_cpu_only_domains_is_no_minus_m_0():
    argv = ["-c", "2", "-n", "id=0,size=0,cpus=0-1", "-n", "id=1,size=1G"]
    r = numavm("export", "--to", "bhyve", *argv)
    text = r.stdout.decode()
    assert r.returncode == 0 and "-m 0" not in text and "-m 1G" in text, text
    assert b"memory goes to CPU-only domain 0" in r.stderr
    back = _plan("import", "--from", "bhyve", "--json", input=text)
    assert back["cpus"] == 2


def test_toml_policy_and_domain_policy_together_is_an_error(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[[domain]]\nid = 0\nsize = "1G"\ncpus = "0"\npolicy = "local"\ndomain_policy = "default"\n')
    assert "policy and domain_policy" in one_line(numavm("plan", "-f", str(f)))


# ---------------------------------------------------------------- 5. one fetch per cache

FAKE_FETCH = r"""
import os, sys, time
from pathlib import Path
from numavm.guest import assets as A
from numavm.guest.launch import guest_assets
kernel, busybox, count = (Path(p) for p in sys.argv[1:4])

def download(pkg, version, work, log, opts):
    with open(count, "a") as f:
        f.write(pkg + "\n")
    time.sleep(0.5)  # long enough for the others to arrive
    out = work / (pkg + ".deb")
    out.write_bytes(b"")
    return out

A._resolve = lambda log, cached, opts, apt: ("linux-image-fake", "1", "1")
A._download = download
A._extract_one = lambda deb, name: (("vmlinuz-fake", kernel.read_bytes()) if "linux" in deb.name
                                    else ("busybox", busybox.read_bytes()))
import shutil
shutil.which = lambda name: "/usr/bin/" + name
a = guest_assets(None, lambda line: print(line, flush=True))
print("vmlinux", a.vmlinux, flush=True)
"""


@pytest.fixture
def real_assets():  # type: ignore[no-untyped-def]
    from numavm.guest.assets import cached
    a = cached()
    if a is None:
        pytest.skip("no guest kernel in the cache (numavm fetch)")
    return a


def _fake_fetches(n: int, cache: Path, real, count: Path) -> list[str]:  # type: ignore[no-untyped-def]
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONPATH=str(ROOT), TMPDIR=str(cache.parent))
    procs = [subprocess.Popen([sys.executable, "-c", FAKE_FETCH, str(real.kernel), str(real.busybox), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
             for _ in range(n)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def test_runs_started_together_fetch_and_unpack_once(real_assets, tmp_path):
    cache, count = tmp_path / "cache", tmp_path / "downloads"
    outs = _fake_fetches(4, cache, real_assets, count)
    assert sorted(count.read_text().split()) == ["busybox-static", "linux-image-fake"], outs
    files = sorted(p.name for p in (cache / "numavm").iterdir())
    assert len([n for n in files if n.startswith("vmlinux-") and "-id-" not in n]) == 1, files
    assert len([n for n in files if n.startswith("vmlinux-src-id-")]) == 1, files
    for out in outs:  # a run that waited said so, once per lock
        assert out.count("waiting for another numavm fetching") <= 1, out
    assert sum("waiting for another numavm" in out for out in outs) >= 1, outs
    assert len({line.split()[1] for out in outs for line in out.splitlines() if line.startswith("vmlinux ")}) == 1


def test_a_full_cache_downloads_once(real_assets, tmp_path):
    from test_cache import mount_tmpfs

    full = tmp_path / "full"
    mount_tmpfs(full, "size=2m")  # takes the lock and the probe, not an 8 MB kernel
    try:
        count = tmp_path / "downloads"
        outs = _fake_fetches(1, full, real_assets, count)
        assert sorted(count.read_text().split()) == ["busybox-static", "linux-image-fake"], outs
        assert "cannot be written" in outs[0], outs
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


# ---------------------------------------------------------------- 6. errors are one line


@pytest.mark.skipif(not qemu_binary(), reason="qemu-system-x86_64 is not installed")
def test_bad_input_of_run_is_one_line(tmp_path):
    for argv in (["--initrd", str(tmp_path / "none")], ["--add", "/dev/zero"], ["--kernel", "/bin/ls"]):
        err = one_line(numavm("run", "--accel", "tcg", *argv, "--", "true"))
        assert "engine" not in err, err


def test_like_host_prints_only_its_error():
    err = one_line(numavm("plan", "--like-host", "-c", "1025"))
    assert "-c/--cpus" in err and "--like-host" not in err


# ---------------------------------------------------------------- disk images (the next input numavm opens)


def test_disk_images_are_regular_files_or_block_devices(tmp_path, fifo):
    from numavm.host.files import open_image

    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 8192)
    fd, size = open_image(img, "--disk", writable=True)
    os.close(fd)
    assert size == 8192
    for path, kind in (("/dev/zero", "character device"), (str(fifo), "FIFO"), (str(tmp_path), "directory")):
        with pytest.raises(ConfigError, match=rf"^--disk: {path} is a {kind}; a regular file or a block device"):
            open_image(path, "--disk", writable=False)
    with pytest.raises(ConfigError, match="^--disk: cannot open"):
        open_image(tmp_path / "none", "--disk", writable=False)
