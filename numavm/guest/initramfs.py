"""numavm's own initramfs: busybox, an /init that reports the guest's topology, a command.

`build_initramfs()` writes a cpio ``newc`` archive itself (110-byte ASCII
headers, names and data padded to 4 bytes, a ``TRAILER!!!`` entry) and
compresses it with gzip (or xz, or not at all).  Every mtime, owner and
inode number is fixed, so the same inputs give the same bytes and the result
can be cached by content hash.

The /init script (busybox sh) mounts proc, sysfs and devtmpfs, prints the
kernel's SRAT/NUMA log lines, then the guest's topology as ONE line of
compact JSON between the lines ``@@NUMAVM-TOPOLOGY-BEGIN@@`` and
``@@NUMAVM-TOPOLOGY-END@@``::

    {"nodes": {"0": {"cpulist": "0-1", "memtotal_kb": 985208, "present_kb": 1048188,
                     "distance": [10, 20, 30]}, ...},
     "online_cpus": "0-3", "possible_cpus": "0-3", "possible_nodes": "0-2",
     "online_nodes": "0-2", "memtotal_kb": 2530452, "acpi_tables": ["APIC", ...],
     "cpu_apic_ids": {"0": 0, "1": 1, "2": 2, "3": 3},
     "kernel": "6.1.0-56-amd64", "uptime": 3.54, "cmdline": "console=ttyS0 ..."}

(`cpu_apic_ids`: each online CPU's APIC id, /proc/cpuinfo's ``apicid``: with
the nodes' cpulists it gives the APIC -> node map on every kernel version;
Linux 6.12 stopped logging it.)  What Linux made of an HMAT comes with it: a
memory node's ``"access": {"0": {"read_latency": 100, "write_latency": 100,
"read_bandwidth": 20000, "write_bandwidth": 20000, "initiators": [0]}, "1": ...}``
(nodeN/accessA/initiators: ns, MB/s and the linked initiator nodes), its
``"memory_side_cache": {"1": {"size": ..., "line_size": 64, "indexing": 0,
"write_policy": 0}}``, and ``"memory_tiers": {"4": "0-1", "52": "2"}`` (each
/sys/devices/virtual/memory_tiering/memory_tierK's nodelist).  Devices: ``"pci":
{"0000:02:00.0": {"vendor": "0x1af4", "device": "0x1042", "class": "0x018000", "numa_node": 1,
"block": [{"name": "vda", "sectors": 32768, "logical_block_size": 512, "ro": 0}]}, ...}`` (every PCI
function, the platform's own included; a virtio disk's /sys/block entry), and
``"has_generic_initiator_nodes": "2"`` where the kernel has that list (5.10+).  A machine with
devices gets their driver modules (numavm.guest.modules) in /lib/numavm, listed in load order in
/etc/numavm/modules; /init insmods them first and reports each one's status in ``"modules":
{"virtio_ring": 0, ...}``.

then runs the user's command, if any, with its argv exactly as given (each
argument is a file under /etc/numavm/argv/, read back by the script, never
pasted into it), its stdin /dev/null, its stdout on the second serial port
(ttyS1, COM2) and its stderr on the third (ttyS2, COM3), both in raw mode, so
the host gets them byte for byte and apart from the console; or, with
/etc/numavm/shell, an interactive shell whose terminal is ttyS1.  Then it
prints ``@@NUMAVM-EXIT <status>@@`` on the console and powers off.  A kernel
without those ports gets ``@@NUMAVM-NO-STREAMS@@`` and the command's output
on the console.  `parse_guest_report()` finds the report and the status in
captured console output.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

from numavm.errors import NumavmError

TOPOLOGY_BEGIN = "@@NUMAVM-TOPOLOGY-BEGIN@@"
TOPOLOGY_END = "@@NUMAVM-TOPOLOGY-END@@"
EXIT_MARK = "@@NUMAVM-EXIT"
NO_STREAMS_MARK = "@@NUMAVM-NO-STREAMS@@"  # the guest kernel found no ttyS1/ttyS2
SHELL_FLAG = "/etc/numavm/shell"
ARGV_DIR = "/etc/numavm/argv"
MODULES_LIST = "/etc/numavm/modules"  # the kernel modules /init loads, one name a line, in load order
MODULES_DIR = "/lib/numavm"  # NAME.ko for each
SHARED = "/etc/numavm/shared"  # the command's wrapper with --share/--host-root (numavm.guest.shares)
MTIME = 0  # every entry's mtime: deterministic output

COMPRESSIONS = ("gzip", "xz", "none")

# Applets /init uses; linked at build time so /init runs before `busybox --install`.
INIT_APPLETS = ("sh", "mount", "cat", "echo", "printf", "sed", "tr", "ls", "grep", "dmesg", "awk",
                "uname", "poweroff", "reboot", "sync", "sleep", "mkdir", "test", "[")

# On the kernel command line: /init brings every offline CPU online before it reports.
# A dotted word the kernel takes for an unknown module's parameter and ignores.
ONLINE_CPUS_MARK = "numavm.online_cpus=all"
# On the kernel command line of an interactive shell's guest: the host terminal's ROWSxCOLS,
# which /init gives the shell's tty (a serial line has no way to learn it).
TTY_SIZE_PARAM = "numavm.tty="

INIT_SCRIPT = r"""#!/bin/sh
# numavm guest init: report the topology, run the command, power off.
# Every process costs milliseconds in an emulated guest: one awk reads the
# kernel log and sysfs and writes the whole report.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ TERM=linux
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
cd /
# the drivers of the machine's devices (numavm.guest.modules), each after what it needs;
# each one's insmod status goes into the report
mods=""
if [ -f @MODULES_LIST@ ]; then
  while read -r m; do
    insmod "@MODULES_DIR@/$m.ko"
    mods="$mods $m=$?"
  done < @MODULES_LIST@
fi
# A TCG boot starts one CPU (maxcpus=1, see guest.tcg_cmdline) and marks the
# command line: the others come up here, before anything reads the topology
# (their llc-sibling warnings reach dmesg before the report reads it).
read -r cmdline < /proc/cmdline
case " $cmdline " in
  *" @ONLINE_MARK@ "*)
    for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
      read -r v < "$f" && [ "$v" = 1 ] || echo 1 > "$f"
    done ;;
esac

nodes=""
for d in /sys/devices/system/node/node[0-9]*; do
  [ -d "$d" ] && nodes="$nodes ${d##*/node}"
done
tables=""
for t in /sys/firmware/acpi/tables/*; do
  [ -f "$t" ] && tables="$tables ${t##*/}"
done
# what Linux made of the HMAT: access classes' initiator links, memory-side caches, memory tiers
# PCI devices (numavm's host bridges' and QEMU's), and a virtio disk's block device
pci=""
for t in /sys/bus/pci/devices/*; do
  [ -e "$t" ] && pci="$pci $t"
done
blk=""
for t in /sys/bus/pci/devices/*/virtio*/block/*; do
  [ -e "$t" ] && blk="$blk $t"
done
hmat=""
for t in /sys/devices/system/node/node*/access[01]/initiators/node* \
         /sys/devices/system/node/node*/memory_side_cache/index* /sys/devices/virtual/memory_tiering/memory_tier*; do
  [ -e "$t" ] && hmat="$hmat $t"
done
# the kernel's NUMA lines (the console may be quiet), then the report as one line of JSON
dmesg 2>/dev/null | awk -v nodes="$nodes" -v tables="$tables" -v hmat="$hmat" -v pci="$pci" -v blk="$blk" \
  -v mods="$mods" '
function rd(f,   r, l, sep) { r = ""; sep = ""; while ((getline l < f) > 0) { r = r sep l; sep = "\n" }
  close(f); sub(/\n+$/, "", r); return r }
function js(s,   o, i, c, n) { o = ""; n = length(s)
  for (i = 1; i <= n; i++) { c = substr(s, i, 1)
    if (c == "\\" || c == "\"") o = o "\\" c; else if (c < " ") o = o " "; else o = o c }
  return "\"" o "\"" }
function num(s) { return s ~ /^-?[0-9]+$/ ? s : "null" }
/SRAT|SLIT|NUMA|Initmem setup|Fallback order|zonelists|sibling|not on the same node|software IO TLB/ {
  print "numavm-dmesg: " $0 }
END {
  # pages the kernel found present in each node s ranges (all zones), in kB
  f = "/proc/zoneinfo"
  while ((getline l < f) > 0) { split(l, w, " ")
    if (w[1] == "Node") { n = w[2]; sub(",", "", n) } else if (w[1] == "present") p[n] += w[2] }
  close(f)
  N = "/sys/devices/system/node"; C = "/sys/devices/system/cpu"
  # HMAT paths: .../nodeT/accessA/initiators/nodeI, .../nodeT/memory_side_cache/indexL, .../memory_tierK
  k = split(hmat, hs, " "); tiers = ""
  for (i = 1; i <= k; i++) { m = split(hs[i], w, "/")
    if (w[m] ~ /^memory_tier[0-9]+$/) { id = w[m]; sub(/memory_tier/, "", id)
      tiers = tiers (tiers == "" ? "" : ",") "\"" id "\":" js(rd(hs[i] "/nodelist")) }
    else if (w[m] ~ /^index[0-9]+$/) { n = w[m - 2]; sub(/node/, "", n); id = w[m]; sub(/index/, "", id)
      c = "\"" id "\":{\"size\":" num(rd(hs[i] "/size")) ",\"line_size\":" num(rd(hs[i] "/line_size")) \
          ",\"indexing\":" num(rd(hs[i] "/indexing")) ",\"write_policy\":" num(rd(hs[i] "/write_policy")) "}"
      cache[n] = cache[n] (cache[n] == "" ? "" : ",") c }
    else if (w[m - 2] ~ /^access[0-9]+$/) { n = w[m - 3]; sub(/node/, "", n); a = w[m - 2]; sub(/access/, "", a)
      id = w[m]; sub(/node/, "", id); link[n, a] = link[n, a] (link[n, a] == "" ? "" : ",") id } }
  j = ""; k = split(nodes, ns, " ")
  for (i = 1; i <= k; i++) { n = ns[i]; d = N "/node" n
    mt = ""; f = d "/meminfo"
    while ((getline l < f) > 0) if (l ~ /MemTotal:/) { split(l, w, " "); mt = w[4] }
    close(f)
    dist = rd(d "/distance"); gsub(/^[ \n]+|[ \n]+$/, "", dist); gsub(/[ \n]+/, ",", dist)
    j = j (i > 1 ? "," : "") "\"" n "\":{\"cpulist\":" js(rd(d "/cpulist")) ",\"memtotal_kb\":" num(mt) \
        ",\"present_kb\":" ((n in p) ? p[n] * 4 : 0) ",\"distance\":[" dist "]"
    acc = ""
    for (a = 0; a <= 1; a++) { f = d "/access" a "/initiators/"; rl = rd(f "read_latency")
      if (rl == "") continue
      acc = acc (acc == "" ? "" : ",") "\"" a "\":{\"read_latency\":" num(rl) ",\"write_latency\":" \
          num(rd(f "write_latency")) ",\"read_bandwidth\":" num(rd(f "read_bandwidth")) ",\"write_bandwidth\":" \
          num(rd(f "write_bandwidth")) ",\"initiators\":[" link[n, a] "]}" }
    if (acc != "") j = j ",\"access\":{" acc "}"
    if (n in cache) j = j ",\"memory_side_cache\":{" cache[n] "}"
    j = j "}" }
  t = ""; k = split(tables, ts, " ")
  for (i = 1; i <= k; i++) t = t (i > 1 ? "," : "") js(ts[i])
  mt = ""; f = "/proc/meminfo"
  while ((getline l < f) > 0) if (l ~ /^MemTotal:/) { split(l, w, " "); mt = w[2] }
  close(f)
  up = rd("/proc/uptime"); sub(/ .*/, "", up); if (up == "") up = "null"
  a = ""; cpu = ""; f = "/proc/cpuinfo"
  while ((getline l < f) > 0) {
    if (l ~ /^processor[ \t]*:/) { cpu = l; sub(/^[^:]*: */, "", cpu) }
    else if (l ~ /^apicid[ \t]*:/ && cpu != "") { v = l; sub(/^[^:]*: */, "", v)
      a = a (a == "" ? "" : ",") "\"" cpu "\":" num(v); cpu = "" } }
  close(f)
  printf "\n@@NUMAVM-TOPOLOGY-BEGIN@@\n{\"nodes\":{%s}", j
  printf ",\"online_cpus\":%s,\"possible_cpus\":%s", js(rd(C "/online")), js(rd(C "/possible"))
  printf ",\"possible_nodes\":%s,\"online_nodes\":%s", js(rd(N "/possible")), js(rd(N "/online"))
  printf ",\"has_cpu_nodes\":%s,\"has_memory_nodes\":%s", js(rd(N "/has_cpu")), js(rd(N "/has_memory"))
  if ((getline l < (N "/has_generic_initiator")) >= 0) { close(N "/has_generic_initiator")
    printf ",\"has_generic_initiator_nodes\":%s", js(rd(N "/has_generic_initiator")) }
  # block devices by PCI address: .../devices/BDF/virtioK/block/vdX
  k = split(blk, bs, " ")
  for (i = 1; i <= k; i++) { m = split(bs[i], w, "/"); b = w[m - 3]
    bl[b] = bl[b] (bl[b] == "" ? "" : ",") "{\"name\":" js(w[m]) ",\"sectors\":" num(rd(bs[i] "/size")) \
      ",\"logical_block_size\":" num(rd(bs[i] "/queue/logical_block_size")) ",\"ro\":" num(rd(bs[i] "/ro")) "}" }
  d = ""; k = split(pci, ps, " ")
  for (i = 1; i <= k; i++) { m = split(ps[i], w, "/"); b = w[m]
    d = d (d == "" ? "" : ",") js(b) ":{\"vendor\":" js(rd(ps[i] "/vendor")) ",\"device\":" js(rd(ps[i] "/device")) \
      ",\"class\":" js(rd(ps[i] "/class")) ",\"numa_node\":" num(rd(ps[i] "/numa_node"))
    if (b in bl) d = d ",\"block\":[" bl[b] "]"
    d = d "}" }
  printf ",\"pci\":{%s}", d
  if (mods != "") { k = split(mods, ms, " "); d = ""
    for (i = 1; i <= k; i++) { split(ms[i], w, "="); d = d (i > 1 ? "," : "") js(w[1]) ":" num(w[2]) }
    printf ",\"modules\":{%s}", d }
  printf ",\"memtotal_kb\":%s,\"acpi_tables\":[%s],\"cpu_apic_ids\":{%s}", num(mt), t, a
  if (tiers != "") printf ",\"memory_tiers\":{%s}", tiers
  printf ",\"kernel\":%s,\"uptime\":%s,\"cmdline\":%s}", js(rd("/proc/sys/kernel/osrelease")), up, js(rd("/proc/cmdline"))
  printf "\n@@NUMAVM-TOPOLOGY-END@@\n"
}'

st=0
if [ -e /etc/numavm/shell ]; then
  # interactive: a shell whose terminal (controlling tty, stdin, stdout, stderr)
  # is the command port; the host puts its own terminal in raw mode
  /bin/busybox --install -s 2>/dev/null
  w=""; [ -x @SHARED@ ] && w=@SHARED@  # --share/--host-root: the shell in their view
  # the host terminal's size, as numavm started (@TTY_SIZE@ROWSxCOLS on the command line);
  # a tty forgets its size when its last file closes, so fd 9 holds it open meanwhile
  exec 9<>/dev/ttyS1
  for a in $cmdline; do
    case "$a" in @TTY_SIZE@*x*) r=${a#@TTY_SIZE@}; stty -F /dev/ttyS1 rows "${r%x*}" cols "${r#*x}" 2>/dev/null ;; esac
  done
  setsid -c $w sh -l </dev/ttyS1 >/dev/ttyS1 2>&1 9>&-
  st=$?
  exec 9>&-
elif [ -d /etc/numavm/argv ]; then
  /bin/busybox --install -s 2>/dev/null
  set --
  i=0
  while [ -e "/etc/numavm/argv/$i" ]; do
    a=$(cat "/etc/numavm/argv/$i"; echo x)
    set -- "$@" "${a%x}"
    i=$((i + 1))
  done
  # --share/--host-root (numavm.guest.shares): the command runs through the script that mounts them
  [ -x @SHARED@ ] && set -- @SHARED@ "$@"
  # the command's stdout and stderr each get a serial port of their own, raw
  # (no CR before LF, every byte as written); the console keeps the kernel log
  # and this report.  Closing a tty waits until its output has left the UART.
  if stty -F /dev/ttyS1 raw -echo 2>/dev/null && stty -F /dev/ttyS2 raw -echo 2>/dev/null; then
    "$@" </dev/null >/dev/ttyS1 2>/dev/ttyS2
    st=$?
  else
    printf '\n@@NUMAVM-NO-STREAMS@@\n'
    "$@" </dev/null
    st=$?
  fi
  sync
fi
printf '\n@@NUMAVM-EXIT %d@@\n' "$st"
poweroff -f
sleep 5
reboot -f
""".replace("@ONLINE_MARK@", ONLINE_CPUS_MARK).replace("@TTY_SIZE@", TTY_SIZE_PARAM).replace("@SHARED@", SHARED).replace("@MODULES_LIST@", MODULES_LIST).replace(
    "@MODULES_DIR@", MODULES_DIR)


# ---------------------------------------------------------------- cpio newc


@dataclass(frozen=True)
class Entry:
    """One archive member; `path` without a leading slash."""

    path: str
    mode: int  # file type and permission bits, as st_mode
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def _pad4(n: int) -> bytes:
    return b"\0" * (-n & 3)


def cpio_newc(entries: Iterable[Entry]) -> bytes:
    """A cpio ``newc`` archive of `entries` in the order given, with the trailer."""
    parts: list[bytes] = []
    ino = 0
    for e in list(entries) + [Entry("TRAILER!!!", 0)]:
        ino += 1
        trailer = e.path == "TRAILER!!!"
        name = e.path.encode() + b"\0"
        fields = (
            0 if trailer else ino,  # c_ino
            e.mode,  # c_mode
            0, 0,  # c_uid, c_gid
            2 if stat.S_ISDIR(e.mode) else 1 if not trailer else 0,  # c_nlink
            MTIME,  # c_mtime
            len(e.data),  # c_filesize
            0, 0,  # c_devmajor, c_devminor
            e.rdev[0], e.rdev[1],  # c_rdevmajor, c_rdevminor
            len(name),  # c_namesize
            0,  # c_check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        parts += [header, name, _pad4(len(header) + len(name)), e.data, _pad4(len(e.data))]
    return b"".join(parts)


# ---------------------------------------------------------------- building


def _guest_path(path: str) -> str:
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if not parts or ".." in parts:
        raise NumavmError(f"initramfs: guest path {path!r} must be absolute, without '..'")
    return "/".join(parts)


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-fA-F]+\)\s*$")
_LOADERS = ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-x86-64.so.2")


def parse_ldd(output: str) -> list[str]:
    """Absolute paths of the libraries (and the loader) in `ldd`/`ld.so --list` output."""
    out: list[str] = []
    for line in output.splitlines():
        if "=> not found" in line:
            raise NumavmError(f"initramfs: a shared library is missing on the host: {line.strip()}")
        m = _LDD_LINE.match(line)
        if m and m.group(2) not in out:
            out.append(m.group(2))
    return out


def shared_libraries(path: Path) -> list[str]:
    """The host paths of the shared libraries an ELF executable needs, loader included.

    Resolved by the host's dynamic loader (`ldd`, or the loader's ``--list``);
    a static executable needs none.
    """
    if not _is_elf(path):
        return []
    cmds: list[list[str]] = []
    if shutil.which("ldd"):
        cmds.append(["ldd", str(path)])
    cmds += [[ld, "--list", str(path)] for ld in _LOADERS if os.access(ld, os.X_OK)]
    if not cmds:
        raise NumavmError(f"initramfs: no ldd or dynamic loader on the host to resolve {path}'s libraries")
    import subprocess  # only for --add: a run without it never starts a process

    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           env=dict(os.environ, LC_ALL="C"))
        text = r.stdout + r.stderr
        if "not a dynamic executable" in text or "statically linked" in text:
            return []
        if r.returncode == 0:
            return parse_ldd(r.stdout)
    raise NumavmError(f"initramfs: cannot resolve the shared libraries of {path}: {text.strip()}")


class _Tree:
    """Archive members by path; parents are created as directories."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _dirs(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            d = "/".join(parts[:k])
            e = self.entries.get(d)
            if e is None:
                self.entries[d] = Entry(d, stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(e.mode):
                raise NumavmError(f"initramfs: /{d} is a file but /{path} needs it to be a directory")

    def add(self, entry: Entry, replace: bool = True) -> None:
        self._dirs(entry.path)
        old = self.entries.get(entry.path)
        if old is not None and stat.S_ISDIR(old.mode) and stat.S_ISDIR(entry.mode):
            return
        if old is not None and not replace:
            return
        if old is not None and stat.S_ISDIR(old.mode):
            raise NumavmError(f"initramfs: /{entry.path} is a directory")
        self.entries[entry.path] = entry

    def sorted(self) -> list[Entry]:
        # parents sort before their children ("a" < "a/b"); "/" sorts before other bytes we use
        return [self.entries[k] for k in sorted(self.entries, key=lambda p: p.split("/"))]


def _host_file(path: Path) -> tuple[int, bytes]:
    try:
        from numavm.host.files import MAX_ADD, read_input

        st = os.stat(path)  # follows symlinks: the guest gets the file itself
        if not stat.S_ISREG(st.st_mode):
            raise NumavmError(f"initramfs: {path} is not a regular file")
        return (st.st_mode & 0o7777) or 0o644, read_input(path, "initramfs", MAX_ADD)
    except OSError as e:
        raise NumavmError(f"initramfs: cannot read {path}: {e.strerror}") from None


def initramfs_entries(busybox: Path, command: Sequence[str] | None = None,
                      add: Iterable[tuple[Path, str]] = (), shell: bool = False,
                      modules: Sequence[Path] = (), extra: Sequence[Entry] = ()) -> list[Entry]:
    """The archive's members, sorted, before compression.

    `extra`: more members, as they are (numavm.guest.shares' table and scripts).

    `shell`: no command; /init gives an interactive shell on the command port.
    `modules`: kernel module files (uncompressed ELF .ko, numavm.guest.modules.device_modules)
    /init loads in this order before it reports; none, and the archive has no trace of them.
    """
    if shell and command is not None:
        raise NumavmError("initramfs: an interactive shell takes no command")
    tree = _Tree()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run"):
        tree.add(Entry(d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755)))
    tree.add(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    tree.add(Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    _, bb = _host_file(Path(busybox))
    if not bb.startswith(b"\x7fELF"):
        raise NumavmError(f"initramfs: {busybox} is not an ELF executable")
    tree.add(Entry("bin/busybox", stat.S_IFREG | 0o755, bb))
    for applet in INIT_APPLETS:
        tree.add(Entry(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox"))
    tree.add(Entry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    tree.add(Entry("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n"))
    tree.add(Entry("etc/group", stat.S_IFREG | 0o644, b"root:x:0:\n"))
    libs: list[str] = []
    for host, guest in add:
        host = Path(host)
        mode, data = _host_file(host)
        tree.add(Entry(_guest_path(guest), stat.S_IFREG | mode, data))
        libs += [lib for lib in shared_libraries(host) if lib not in libs]
    for lib in libs:
        mode, data = _host_file(Path(lib))
        # a user's own file at that path wins over the host's library
        tree.add(Entry(_guest_path(lib), stat.S_IFREG | mode, data), replace=False)
    if modules:
        names = []
        for path in modules:
            _, data = _host_file(Path(path))
            if not data.startswith(b"\x7fELF"):
                raise NumavmError(f"initramfs: {path} is not an uncompressed kernel module (busybox's insmod "
                                  "reads no compressed ones)")
            name = Path(path).name.removesuffix(".ko")
            names.append(name)
            tree.add(Entry(f"{MODULES_DIR.lstrip('/')}/{name}.ko", stat.S_IFREG | 0o644, data))
        tree.add(Entry(MODULES_LIST.lstrip("/"), stat.S_IFREG | 0o644, "".join(f"{n}\n" for n in names).encode()))
        tree.add(Entry("sbin/insmod", stat.S_IFLNK | 0o777, b"../bin/busybox"))
    for e in extra:
        tree.add(e)
    if shell:
        tree.add(Entry(SHELL_FLAG.lstrip("/"), stat.S_IFREG | 0o644))
    if command is not None:
        if not command:
            raise NumavmError("initramfs: the command is empty")
        tree.add(Entry(ARGV_DIR.lstrip("/"), stat.S_IFDIR | 0o755))
        for k, arg in enumerate(command):
            if "\0" in arg:
                raise NumavmError(f"initramfs: argument {k} of the command holds a NUL byte")
            tree.add(Entry(f"{ARGV_DIR.lstrip('/')}/{k}", stat.S_IFREG | 0o644, arg.encode()))
    return tree.sorted()


def compress(data: bytes, method: str = "gzip") -> bytes:
    if method == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if method == "xz":  # the kernel's xz decoder wants CRC32 (or no) checks
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if method == "none":
        return data
    raise NumavmError(f"initramfs: compression must be one of {', '.join(COMPRESSIONS)}, got {method!r}")


def build_initramfs(busybox: Path, command: list[str] | None = None,
                    add: Iterable[tuple[Path, str]] = (), compress: str = "gzip",
                    shell: bool = False, modules: Sequence[Path] = (), extra: Sequence[Entry] = ()) -> bytes:
    """The initramfs as bytes: cpio newc, compressed with `compress` (gzip, xz or none)."""
    return _compress(cpio_newc(initramfs_entries(busybox, command, add, shell, modules, extra)), compress)


_compress = compress

CACHE_KEEP = 8  # compressed images kept in the cache, newest first


def cached_initramfs(busybox: Path, command: list[str] | None = None,
                     add: Iterable[tuple[Path, str]] = (), cache_dir: Path | None = None,
                     shell: bool = False, modules: Sequence[Path] = (), extra: Sequence[Entry] = ()) -> bytes:
    """`build_initramfs()` (gzip), compressed once per distinct archive and kept in numavm's cache.

    The archive is built (cheap: concatenation), then looked up by the SHA-256
    of its uncompressed bytes; compressing busybox costs ~0.1 s a run
    otherwise.  Without `add` or `extra`, a run first looks the image up by what it is
    made of (`_identity`, a `note` in the cache), so a repeated run neither
    reads busybox nor hashes the archive.  The newest CACHE_KEEP images are
    kept.  A cache that cannot be written is not an error.
    """
    from numavm.host.cache import cache_root, note, prune, recall, write_atomic

    root = cache_dir if cache_dir is not None else cache_root()
    add = list(add)
    ident = None if add or extra else _identity(Path(busybox), command, shell, modules)
    if ident is not None:
        digest, _, size = (recall("initramfs", ident, root) or "").partition(" ")
        data = _whole(root / f"initramfs-{digest}.cpio.gz", int(size)) if size.isdigit() else None
        if data is not None:
            return data
    import hashlib  # only when the image is not known by its identity: its import alone is ~15 ms

    raw = cpio_newc(initramfs_entries(busybox, command, add, shell, modules, extra))
    digest = hashlib.sha256(raw).hexdigest()[:20]
    path = root / f"initramfs-{digest}.cpio.gz"
    data = _whole(path, len(raw))
    if data is None:
        data = _compress(raw, "gzip")
        try:
            root.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except OSError:
            return data
    if ident is not None:
        note("initramfs", ident, f"{digest} {len(raw)}", root, keep=CACHE_KEEP)
    prune(root, ("initramfs-*.cpio.gz",), CACHE_KEEP)
    return data


def _identity(busybox: Path, command: list[str] | None, shell: bool,
              modules: Sequence[Path] = ()) -> str | None:
    """What an image without added files is made of, as one line: busybox and this module
    (which holds /init and the archive's whole recipe) each by path, size, mtime and inode,
    so a changed file is a new identity; the command; whether it is a shell; and the kernel
    modules, each the same way, in load order (none: the identity images had before modules)."""
    try:
        files = [(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
                 for p in (busybox, Path(__file__), *map(Path, modules)) for st in (p.stat(),)]
    except OSError:
        return None  # initramfs_entries says what is wrong with busybox or a module
    if not modules:
        return json.dumps([files, command, shell])
    return json.dumps([files[:2], command, shell, files[2:]])


def _whole(path: Path, raw_size: int) -> bytes | None:
    """The gzip image at `path` if whole (its trailer ends with the uncompressed size mod
    2**32), marked recently used; else None."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b" and int.from_bytes(data[-4:], "little") == raw_size & 0xFFFFFFFF:
            os.utime(path)  # recently used: kept by the pruning
            return data
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- reading the console


_KLOG = re.compile(r"\[\s*\d+\.\d+\][^\n]*(?:\n|$)")
_EXIT = re.compile(re.escape(EXIT_MARK) + r" (-?\d+)@@")


def _parse_block(block: str) -> dict[str, Any] | None:
    text = block.replace("\r", "")
    for candidate in (text.strip(), _KLOG.sub("", text).replace("\n", "").strip(),
                      text.replace("\n", "").strip()):
        try:
            doc = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return None


def parse_guest_report(console_text: str) -> dict[str, Any] | None:
    """The guest's topology report in captured console output, or None.

    Returns the JSON object the /init printed, plus ``exit_status``: the
    command's status (0 when there was no command), or None when the guest
    never printed it; and ``streams``: False when the guest had no ports for
    the command's stdout and stderr, which then went to the console.  Kernel log lines that land inside the block are
    dropped.  The last complete block wins.
    """
    text = console_text.replace("\r", "")
    doc = None
    end = len(text)
    while doc is None:
        e = text.rfind(TOPOLOGY_END, 0, end)
        if e < 0:
            return None
        b = text.rfind(TOPOLOGY_BEGIN, 0, e)
        if b < 0:
            return None
        doc = _parse_block(text[b + len(TOPOLOGY_BEGIN):e])
        end = b
    statuses = _EXIT.findall(text[e:])
    doc["exit_status"] = int(statuses[-1]) if statuses else None
    doc["streams"] = NO_STREAMS_MARK not in text[e:]  # False: the command's output went to the console
    return doc
