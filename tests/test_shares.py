"""--share and --host-root: the options, what the initramfs and QEMU get, and two TCG boots.

The unit tests need no guest.  The two boots (QEMU TCG, a few seconds each) prove, from inside
the guest: the 9p devices leave a disk at its planned address, a share's file reads as on the host, a read-write share's write reaches the host, a
read-only share refuses writes even after the guest remounts it read-write (QEMU refuses
them), no path leaves a share (absolute and relative symlinks pointing out, ``..``, a 9p attach
naming another directory, a device node), and --host-root runs the host's python3 with the
command's stdout exactly what it printed, in the user's directory, with the guest's own /proc.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from numavm.api import Machine
from numavm.errors import ConfigError
from numavm.guest import shares as G
from numavm.guest.initramfs import INIT_SCRIPT, initramfs_entries
from numavm.guest.launch import kernel_cmdline
from numavm.spec.shares import MSIZE, ROOT_TAG, Share, guest_cwd, parse_share, parse_shares
from numavm.vmm import tcg as T

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
ROOT = Path(__file__).resolve().parents[1]


def numavm(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "numavm", *args], capture_output=True, timeout=timeout,
                          env=env, cwd=cwd)


# ---------------------------------------------------------------- options


def test_share_syntax(tmp_path: Path) -> None:
    (tmp_path / "a,b").mkdir()
    assert parse_share(str(tmp_path)) == Share(str(tmp_path), str(tmp_path), False, "numavm-share0")
    assert parse_share(f"{tmp_path}:/mnt/x,rw", 3) == Share(str(tmp_path), "/mnt/x", True, "numavm-share3")
    assert parse_share(f"{tmp_path}:/mnt/x/,ro").guest == "/mnt/x"
    s = parse_share(f"{tmp_path}/a,,b:/m,,n,rw")  # a comma in a path is written twice
    assert (s.host, s.guest, s.rw) == (f"{tmp_path}/a,b", "/m,n", True)
    assert parse_share(s.option()) == Share(s.host, s.guest, s.rw, "numavm-share0")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "a,b")
    assert parse_share(str(link)).host == f"{tmp_path}/a,b"  # the directory itself is exported
    assert parse_share(str(link)).guest == str(link)  # seen where the user named it
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert parse_share(".") == Share(str(tmp_path), str(tmp_path), False, "numavm-share0")
    finally:
        os.chdir(here)


@pytest.mark.parametrize("text, message", [
    ("/nonexistent-numavm", "--share /nonexistent-numavm: no such file or directory"),
    ("/etc/passwd", "--share /etc/passwd: not a directory"),
    ("/tmp:rel", "the guest directory 'rel' must be absolute"),
    ("/tmp:/a/../b", "must not hold '..'"),
    ("/tmp:/", "cannot be / (--host-root"),
    ("/tmp:", "empty guest directory"),
    ("/tmp,rx", "unknown flag 'rx'"),
    (":/x", "no host directory"),
    ("", "expected HOST_DIR"),
])
def test_share_refusals(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_share(text)


def test_shares_together(tmp_path: Path) -> None:
    assert parse_shares(None) == ()
    both = parse_shares([str(tmp_path), f"/tmp:{tmp_path}/t,rw"], host_root=True)
    assert [s.tag for s in both] == [ROOT_TAG, "numavm-share0", "numavm-share1"]
    assert both[0] == Share("/", "/", False, ROOT_TAG)
    with pytest.raises(ConfigError, match="already"):
        parse_shares([str(tmp_path), f"/tmp:{tmp_path}"])
    with pytest.raises(ConfigError, match="at most 16"):
        parse_shares([str(tmp_path)] * 17)


def test_cwd_in_the_guest() -> None:
    shares = (Share("/home/u/src", "/src"), Share("/home/u/src/deep", "/deep"))
    assert guest_cwd(shares, "/home/u/src/x") == "/src/x"
    assert guest_cwd(shares, "/home/u/src") == "/src"
    assert guest_cwd(shares, "/home/u/src/deep/y") == "/deep/y"  # the longest host path wins
    assert guest_cwd(shares, "/home/u/srcx") is None
    assert guest_cwd((Share("/", "/", tag=ROOT_TAG),) + shares, "/etc") == "/etc"


def test_cli_errors_exit_2_in_one_line(tmp_path: Path) -> None:
    for args in (["--share", str(tmp_path / "missing")], ["--share", "/etc/passwd"],
                 ["--host-root", "--initrd", "/etc/passwd"], ["--share", f"{tmp_path}:relative"]):
        r = numavm("run", "--accel", "tcg", "-m", "64G", *args, "--", "true", timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 2 and err.count("\n") == 1 and err.startswith("numavm: error: --"), (args, err)


def test_refused_share_allocates_nothing(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match="no such file"):
        Machine(memory="64M").run(["true"], accel="tcg", shares=[str(tmp_path / "missing")])
    assert set(os.listdir("/proc/self/fd")) <= before


def test_host_root_share_dirs_must_exist_in_the_read_only_root(tmp_path: Path) -> None:
    shares = parse_shares([f"{tmp_path}:/nonexistent-numavm/x"], host_root=True)
    with pytest.raises(ConfigError, match="must be a directory on the host's /"):
        G.share_entries(shares, cwd="/", uid=0, gid=0, groups=[], environ={})
    # under a tmpfs the guest makes the directory itself
    G.share_entries(parse_shares([f"{tmp_path}:/tmp/numavm-x"], host_root=True), cwd="/", uid=0, gid=0,
                    groups=[], environ={})


# ---------------------------------------------------------------- what the guest and QEMU get


def test_qemu_exports_each_share_confined_and_read_only_unless_rw() -> None:
    args = T.share_args([Share("/srv/a,b", "/a", False, "numavm-share0"), Share("/srv/c", "/c", True, "numavm-share1")])
    assert args == [
        "-fsdev", "local,id=fs0,path=/srv/a,,b,security_model=none,multidevs=remap,readonly=on",
        "-device", "virtio-9p-pci,id=share0,fsdev=fs0,mount_tag=numavm-share0,bus=pci.0,disable-legacy=on",
        "-fsdev", "local,id=fs1,path=/srv/c,security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,id=share1,fsdev=fs1,mount_tag=numavm-share1,bus=pci.0,disable-legacy=on"]


@needs_qemu
def test_shares_after_the_disks_bridges(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    layout = Machine(cpus=2, domains=["id=0,size=256M,cpus=0", "id=1,size=256M,cpus=1"],
                     disks=[f"{disk},domain=1"]).layout
    with T.QemuMachine(layout, shares=parse_shares([str(tmp_path)])) as q:
        argv, _ = q.command(Path("/vmlinux"), None, "")
    devices = [argv[k + 1] for k, a in enumerate(argv) if a == "-device"]
    assert devices[0].startswith("pxb,") and devices[-1].startswith("virtio-9p-pci,")  # pxb slots unchanged


def test_pci_stays_on_with_shares() -> None:
    assert "pci=off" in kernel_cmdline("userspace", False)
    assert "pci=off" not in kernel_cmdline("userspace", False, shares=True)


def test_initramfs_members(tmp_path: Path) -> None:
    shares = parse_shares([f"{tmp_path}:/tmp/s", f"{tmp_path}:/tmp/w,rw"], host_root=True)
    env = {"PATH": "/usr/bin", "HOME": "/home/u", "LC_ALL": "C", "SECRET_TOKEN": "x", "PYTHONPATH": "/p"}
    entries = {e.path: e for e in G.share_entries(shares, cwd=f"{tmp_path}/sub", uid=1000, gid=100,
                                                  groups=[27, 100], environ=env, setpriv="/usr/bin/setpriv")}
    assert entries["etc/numavm/shares"].data.decode() == (
        f"{ROOT_TAG}\tro\t/\nnumavm-share0\tro\t/tmp/s\nnumavm-share1\trw\t/tmp/w\n")
    assert entries["etc/numavm/cwd"].data == b"/tmp/s/sub"  # in the share that holds it, not the root's view
    assert stat.S_IMODE(entries["etc/numavm/shared"].mode) == 0o755
    assert {p.rsplit("/", 1)[1] for p in entries if p.startswith("etc/numavm/env/")} == {
        "PATH", "HOME", "LC_ALL", "PYTHONPATH"}  # the user's, not numavm's whole environment
    assert entries["etc/numavm/root/uid"].data == b"1000" and entries["etc/numavm/root/groups"].data == b"27,100"
    assert entries["etc/numavm/root/setpriv"].data == b"/usr/bin/setpriv"
    assert entries["etc/numavm/root/writable"].data == b"/tmp\n/var/tmp\n/run\n/home/u\n"
    root = {e.path for e in G.share_entries(parse_shares([], host_root=True), cwd="/", uid=0, gid=0,
                                            groups=[], environ={}, setpriv=None)}
    assert "etc/numavm/root/setpriv" not in root  # root runs as root
    with pytest.raises(ConfigError, match="no setpriv"):
        G.share_entries(parse_shares([], host_root=True), cwd="/", uid=1000, gid=1000, groups=[], environ={},
                        setpriv=None)
    assert G.share_entries((), cwd="/") == []
    assert f"msize={MSIZE}" in G.SHARED_SCRIPT and "nodev" in G.SHARED_SCRIPT


def test_init_runs_the_command_and_the_shell_through_the_wrapper(tmp_path: Path) -> None:
    assert 'set -- /etc/numavm/shared "$@"' in INIT_SCRIPT and "setsid -c $w sh -l" in INIT_SCRIPT
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF" + bytes(60))
    extra = G.share_entries(parse_shares([str(tmp_path)]), cwd=str(tmp_path))
    paths = {e.path for e in initramfs_entries(busybox, ["true"], extra=extra)}
    assert {"etc/numavm/shared", "etc/numavm/shares", "etc/numavm/cwd", "init"} <= paths
    plain = {e.path for e in initramfs_entries(busybox, ["true"])}
    assert not any(p.startswith("etc/numavm/shar") for p in plain)


def test_wrapper_is_valid_sh(tmp_path: Path) -> None:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    (tmp_path / "shared").write_text(G.SHARED_SCRIPT)
    r = subprocess.run([sh, "-n", str(tmp_path / "shared")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_modules_merged_once() -> None:
    a, b = Path("/m/virtio_pci.ko"), Path("/n/virtio_pci.ko")
    assert G.merge_modules([a, Path("/m/virtio_blk.ko")], [b, Path("/n/9p.ko")]) == [
        a, Path("/m/virtio_blk.ko"), Path("/n/9p.ko")]


def test_environment_for_the_host_root() -> None:
    env = G.guest_env({"PATH": "/bin", "LC_TIME": "C", "LD_PRELOAD": "/evil.so", "NUMAVM_X": "1", "TERM": "xterm"})
    assert env == {"PATH": "/bin", "LC_TIME": "C", "TERM": "xterm"}
    assert G.guest_env({})["PATH"].startswith("/usr/local/sbin")


# ---------------------------------------------------------------- guests (QEMU TCG)


SHARE_SCRIPT = r"""
for d in /sys/bus/pci/devices/*; do echo "pci ${d##*/} $(cat $d/vendor):$(cat $d/device) node=$(cat $d/numa_node)"; done
cd /mnt/s
echo "read=$(cat f)"
for p in abs rel sub/rel2 ../secret /mnt/w/../../secret; do
  cat "$p" >/dev/null 2>&1 && echo "escaped $p: $(cat "$p")" || echo "refused $p"
done
head -c 1 mem >/dev/null 2>&1 && echo "escaped mem" || echo "refused mem"
echo guest-wrote > /mnt/w/out && echo "rw-write ok"
mknod /mnt/w/dev c 1 3 2>/dev/null; echo "rw-mknod=$?"
echo x > /mnt/s/new 2>/dev/null; echo "ro-create=$?"
mount -o remount,rw /mnt/s && echo "remounted rw"
echo x > /mnt/s/new 2>/dev/null; echo "ro-create-after-remount=$?"
echo x >> /mnt/s/f 2>/dev/null; echo "ro-append=$?"
rm /mnt/s/f 2>/dev/null; echo "ro-rm=$?"
mkdir /mnt/s/d 2>/dev/null; echo "ro-mkdir=$?"
chmod 777 /mnt/s/f 2>/dev/null; echo "ro-chmod=$?"
cd /
umount /mnt/s && mkdir -p /mnt/a && for a in .. "$PARENT" /; do
  if mount -t 9p -o trans=virtio,version=9p2000.L,ro,aname="$a" numavm-share0 /mnt/a 2>/dev/null; then
    echo "attach $a: $(ls /mnt/a | tr '\n' ' ')"; umount /mnt/a
  else
    echo "attach $a: refused"
  fi
done
"""


@needs_qemu
def test_guest_reads_writes_and_cannot_escape_a_share(tmp_path: Path) -> None:
    share, rw = tmp_path / "share", tmp_path / "rw"
    (share / "sub").mkdir(parents=True)
    rw.mkdir()
    (tmp_path / "secret").write_text("host-secret")
    data = os.urandom(3000).hex()
    (share / "f").write_text(data)
    (share / "abs").symlink_to(tmp_path / "secret")
    (share / "rel").symlink_to("../secret")
    (share / "sub" / "rel2").symlink_to("../../secret")
    can_mknod = True
    try:
        os.mknod(share / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))  # the host's /dev/mem
    except PermissionError:
        can_mknod = False
    before = {p.name: p.read_bytes() for p in share.iterdir() if p.is_file() and not p.is_char_device()}
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    domains = ["-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M,cpus=1"]
    r = numavm("run", "--accel", "tcg", *domains, "--disk", f"{disk},domain=1", "--timeout", "300",
               "--share", f"{share}:/mnt/s", "--share", f"{rw}:/mnt/w,rw",
               "--", "sh", "-c", SHARE_SCRIPT.replace("$PARENT", str(tmp_path)))
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    # the disk where the plan put it, on its node, with both 9p devices on QEMU's root bus beside it
    (planned,) = Machine.from_options([*domains, "--disk", f"{disk},domain=1"]).layout.pci.devices
    assert f"pci {planned.bdf} 0x1af4:0x1042 node=1\n" in out, out
    assert len([line for line in out.splitlines() if line.startswith("pci 0000:00:") and "0x1af4:0x1049" in line]) == 2
    assert f"read={data}\n" in out  # the host's bytes
    assert "escaped" not in out and "host-secret" not in out, out
    for p in ("abs", "rel", "sub/rel2", "../secret", "/mnt/w/../../secret"):
        assert f"refused {p}\n" in out
    if can_mknod:
        assert "refused mem\n" in out  # nodev: a device node in a share opens nothing
    assert "rw-write ok" in out and (rw / "out").read_text() == "guest-wrote\n"
    assert not (rw / "dev").exists() or not (rw / "dev").is_char_device(), out  # no host device node made
    assert "remounted rw" in out
    for op in ("ro-create", "ro-create-after-remount", "ro-append", "ro-rm", "ro-mkdir", "ro-chmod"):
        assert f"{op}=0" not in out and f"{op}=" in out, out
    # QEMU attaches every aname to the export's root: the share's files, never its parent's
    attaches = [line for line in out.splitlines() if line.startswith("attach ")]
    assert len(attaches) == 3, out
    listing = sorted(p.name for p in share.iterdir())
    for line in attaches:
        assert line.rsplit(": ", 1)[1].split() == listing, out
    assert {p.name: p.read_bytes() for p in share.iterdir() if p.is_file() and not p.is_char_device()} == before
    assert sorted(p.name for p in share.iterdir()) == sorted(["f", "abs", "rel", "sub"] + (["mem"] if can_mknod else []))


HOST_ROOT_PY = r"""
import os, sys
print(1)
sys.stdout.flush()
m = {l.split()[1]: l.split()[2] for l in open("/proc/mounts")}
print("exe", sys.executable, "cwd", os.getcwd(), "uid", os.getuid(), "nodes",
      sorted(n for n in os.listdir("/sys/devices/system/node") if n.startswith("node")),
      "root", m.get("/"), "proc", m.get("/proc"), "tmp", m.get("/tmp"), file=sys.stderr)
open("/tmp/x", "w").write("tmp ok")
try:
    open("numavm-guest-was-here", "w")
    print("cwd writable", file=sys.stderr)
except OSError as e:
    print("cwd read-only", e.errno, file=sys.stderr)
"""


@needs_qemu
def test_host_root_runs_the_hosts_python(tmp_path: Path) -> None:
    python3 = shutil.which("python3")
    if python3 is None:
        pytest.skip("needs a python3 on the host")
    r = numavm("run", "--accel", "tcg", "-c", "2", "-n", "id=0,size=256M,cpus=0", "-n", "id=1,size=256M,cpus=1",
               "--timeout", "300", "--host-root", "--", "python3", "-c", HOST_ROOT_PY, cwd=ROOT)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert r.stdout == b"1\n"  # exactly what the host's python3 printed
    facts = err[err.index("exe "):].split("\n", 1)[0].split()
    assert facts[facts.index("cwd") + 1] == str(ROOT)
    assert facts[facts.index("uid") + 1] == str(os.getuid())
    assert "'node0'," in err and "'node1']" in err  # the guest's NUMA view, not the host's
    assert facts[facts.index("root") + 1] == "9p" and facts[facts.index("proc") + 1] == "proc"
    assert facts[facts.index("tmp") + 1] == "tmpfs"
    assert "cwd read-only 30" in err  # EROFS: the host's / is read-only in the guest
    assert not (ROOT / "numavm-guest-was-here").exists()


@needs_qemu
def test_shares_and_bridges_share_qemus_root_bus(tmp_path: Path) -> None:
    doms = ["id=0,size=4M,cpus=0"] + [f"id={i},size=4M" for i in range(1, 30)]
    layout = Machine(cpus=1, domains=doms, disks=[f"d{i}.img,domain={i}" for i in range(30)]).layout
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(T.EngineRefusal, match="30 free slots.*30 for disks' bridges and 1 for shares"):
        T.QemuMachine(layout, shares=parse_shares([str(tmp_path)]))
    assert set(os.listdir("/proc/self/fd")) <= before  # refused before any memory or disk


def test_an_engine_without_a_9p_server_refuses_shares(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from numavm.vmm import engine as E

    import dataclasses

    select = E.select
    monkeypatch.setattr(E, "select", lambda *a, **k: dataclasses.replace(select(*a, **k), serves_shares=False))
    with pytest.raises(ConfigError, match="--share: the tcg engine cannot serve host directories yet"):
        Machine(memory="64M").run(["true"], accel="tcg", shares=[str(tmp_path)])


def test_mount_order_parents_first_and_symlinked_guest_dirs_resolved(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    shares = parse_shares([f"{tmp_path}/a/b:/tmp/x/y", f"{tmp_path}/a:/tmp/x"])
    table = {e.path: e.data for e in G.share_entries(shares, cwd="/")}["etc/numavm/shares"].decode()
    assert [line.split("\t")[2] for line in table.splitlines()] == ["/tmp/x", "/tmp/x/y"]
    rooted = parse_shares([f"{tmp_path}/link"], host_root=True)  # guest dir: the path as named, a symlink
    table = {e.path: e.data for e in G.share_entries(rooted, cwd="/", uid=0, gid=0, groups=[], environ={})}
    assert table["etc/numavm/shares"].decode().splitlines()[1].split("\t")[2] == f"{tmp_path}/a"


def test_pytest_plugin_passes_shares_to_run_not_to_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from numavm import pytest_plugin as P

    seen: dict[str, dict[str, object]] = {}
    m = Machine(memory="64M")
    monkeypatch.setattr(Machine, "run", lambda self, command=None, **kw: seen.setdefault("run", kw))
    monkeypatch.setattr(Machine, "check", lambda self, **kw: seen.setdefault("check", kw))
    assert {"shares", "host_root"} <= set(P.RUN_DEFAULTS)
    guest = P.Guest(m, None, {"shares": ["/srv"], "host_root": True, "timeout": 9})  # type: ignore[arg-type]
    guest.run("true")
    guest.check()
    assert seen["run"] == {"shares": ["/srv"], "host_root": True, "timeout": 9}
    assert seen["check"] == {"timeout": 9}


def test_an_interactive_shell_gets_the_host_terminals_size() -> None:
    import fcntl
    import struct
    import termios

    from numavm.api import _tty_size
    from numavm.guest.initramfs import TTY_SIZE_PARAM

    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 123, 0, 0))
        assert _tty_size(slave) == f" {TTY_SIZE_PARAM}37x123"
        assert _tty_size(None) == ""
    finally:
        os.close(master)
        os.close(slave)
    assert f'case "$a" in {TTY_SIZE_PARAM}*x*)' in INIT_SCRIPT  # /init sets it on ttyS1 before the shell
