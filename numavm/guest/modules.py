"""The guest kernel's modules a machine's devices need, from Debian's kernel package.

Debian 12's 6.1 kernel has virtio, virtio_ring, virtio_pci (with virtio_pci_modern_dev and
virtio_pci_legacy_dev) and virtio_blk as modules; 6.12 builds more of them in.  numavm's
initramfs carries the ones a machine with devices needs (`device_modules`), and its /init
loads them with busybox's insmod, in dependency order, before it reports
(numavm.guest.initramfs).  A machine without devices needs none, and gets none.

The modules come from the same kernel package numavm boots (`assets.Assets`): downloaded once
with `apt-get download` (the release's private apt configuration for another release), the
virtio and block drivers and ``modules.builtin`` taken out of it, and kept, uncompressed
(busybox's insmod reads neither zstd nor, built without it, xz), in numavm's cache as
``modules-<kernel release>/`` next to that kernel.  Debian's package ships no modules.dep
(depmod writes it when the package is installed), so numavm writes one in depmod's format from
each module's own ``depends=`` (its .modinfo section) and takes the load order from it; a module
modules.builtin names is left out.  bench/l1.py keeps its own set (kvm-amd, 9p) in
``l1-modules-<release>/`` through the same functions.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from numavm.errors import NumavmError
from numavm.guest.assets import Assets

Log = Callable[[str], object]

# What each device kind's driver needs loaded (its dependencies come from modules.dep).
DEVICE_MODULES: Mapping[str, tuple[str, ...]] = {
    "virtio-blk": ("virtio_pci", "virtio_blk"),
}
# Where those live in the kernel package (lib/modules/<release>/kernel/...): all of it is taken,
# since which of them a driver depends on is known only from modules.dep.
DEVICE_MODULE_DIRS = ("drivers/virtio", "drivers/block")
MODULES_DIR = "modules-{release}"
ORDER_FILE = "order"  # in the guest: /etc/numavm/modules, one name a line, in load order


class ModulesUnavailable(NumavmError):
    """The guest kernel's modules cannot be had (no package to take them from, or one is missing)."""


def key(name: str) -> str:
    """A module's name as the kernel compares them ("virtio-pci" and "virtio_pci" are one)."""
    return name.replace("-", "_")


def decompress(name: str, data: bytes) -> bytes:
    """A module file's ELF bytes, whatever Debian compressed it with (.ko, .ko.xz, .ko.zst, .ko.gz)."""
    if name.endswith(".xz"):
        import lzma

        return lzma.decompress(data)
    if name.endswith(".zst"):
        from numavm.plan.boot.bzimage import _zstd

        out, _ = _zstd(memoryview(data), name)
        return out
    if name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    return data


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` as {module: [what it needs, as names]} (kernel/a/b/virtio_blk.ko.xz: ...)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep:
            out[key(module_name(path))] = [key(module_name(d)) for d in deps.split()]
    return out


def depends(ko: bytes) -> list[str]:
    """The modules a module file says it needs (its modinfo ``depends=``), names with "_"."""
    m = re.search(rb"\0depends=([^\0]*)\0", ko) or re.match(rb"depends=([^\0]*)\0", ko)
    return [key(x) for x in m.group(1).decode().split(",") if x] if m else []


def modules_dep(kos: Mapping[str, bytes]) -> str:
    """depmod's modules.dep for these modules ({name: ELF bytes}): ``name.ko: dep.ko ...``,
    each line's list closed over dependencies, nearest first, as depmod writes them."""
    direct = {key(n): depends(data) for n, data in kos.items()}
    lines = []
    for name in sorted(direct):
        closed: list[str] = []
        todo = list(direct[name])
        while todo:
            d = todo.pop(0)
            if d not in closed and d != name:
                closed.append(d)
                todo += direct.get(d, [])
        lines.append(f"{name}.ko:" + "".join(f" {d}.ko" for d in closed))
    return "\n".join(lines) + "\n"


def module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0]


def load_order(wanted: Iterable[str], deps: Mapping[str, Sequence[str]], available: Iterable[str],
               builtin: Iterable[str] = ()) -> list[str]:
    """`wanted` and everything they need, each after what it needs (names with "_").

    A module the kernel has built in (`builtin`) needs no loading; one that is neither built in
    nor `available` is an error (ModulesUnavailable naming it)."""
    have = {key(a) for a in available}
    inside = {key(b) for b in builtin}
    out: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        name = key(name)
        if name in out or name in inside:
            return
        if name in path:
            raise ModulesUnavailable(f"module dependency cycle: {' -> '.join(path + (name,))}")
        if name not in have:
            why = f" (needed by {path[-1]})" if path else ""
            raise ModulesUnavailable(f"kernel module {name}{why} is neither built in nor in the kernel package")
        for dep in deps.get(name, ()):
            visit(dep, path + (name,))
        out.append(name)

    for name in wanted:
        visit(name, ())
    return out


def modules_for(kinds: Iterable[str]) -> tuple[str, ...]:
    """The driver modules for these device kinds (numavm.plan.pci's VIRTIO_BLK...), in order."""
    out: list[str] = []
    for kind in kinds:
        mods = DEVICE_MODULES.get(kind)
        if mods is None:
            raise NumavmError(f"no guest driver modules known for a {kind} device")
        out += [m for m in mods if m not in out]
    return tuple(out)


# ---------------------------------------------------------------- the cache


def cached_modules(assets: Assets, dirname: str = MODULES_DIR) -> Path | None:
    """The directory of `assets`' kernel's extracted modules, or None when not extracted yet."""
    d = assets.kernel.parent / dirname.format(release=assets.kernel_version)
    return d if (d / "modules.dep").is_file() else None


def extract_modules(assets: Assets, log: Log = print, release: str | None = None,
                    dirs: Sequence[str] = DEVICE_MODULE_DIRS, names: Iterable[str] = (),
                    dirname: str = MODULES_DIR) -> Path:
    """The modules under `dirs` (and any module named in `names`) of `assets`' kernel package,
    uncompressed, with modules.dep and modules.builtin, in the cache next to the kernel:
    downloaded and extracted once (a whole directory renamed into place)."""
    found = cached_modules(assets, dirname)
    if found is not None:
        return found
    try:
        return _extract(assets, log, release, dirs, names, dirname, assets.kernel.parent)
    except OSError as e:  # a read-only or full cache: this run's private directory instead
        from numavm.host.cache import private_dir

        where = private_dir()
        log(f"numavm: the cache {assets.kernel.parent} cannot keep the kernel's modules ({e.strerror}): "
            f"extracting into {where}")
        try:
            return _extract(assets, log, release, dirs, names, dirname, where)
        except OSError as e2:
            raise ModulesUnavailable(f"cannot keep the guest kernel's modules: {assets.kernel.parent}: "
                                     f"{e.strerror}; {where}: {e2.strerror}") from None


def _extract(assets: Assets, log: Log, release: str | None, dirs: Sequence[str], names: Iterable[str],
             dirname: str, root: Path) -> Path:
    final = root / dirname.format(release=assets.kernel_version)
    if (final / "modules.dep").is_file():
        return final
    if not assets.kernel_package or not assets.kernel_package_version:
        raise ModulesUnavailable("numavm's cache does not say which kernel package its kernel came from "
                                 "(run `numavm fetch`)")
    from numavm.guest import assets as _assets

    alternatives = "|".join([*(re.escape(d) + r"/(?:.*/)?[^/]+" for d in dirs),
                             *(r"(?:.*/)?" + re.escape(n) for n in
                               {v for n in names for v in (n, n.replace("-", "_"), n.replace("_", "-"))})])
    pattern = re.compile(rf"^(?:\./)?(?:usr/)?lib/modules/[^/]+/(?:kernel/((?:{alternatives})\.ko(?:\.xz|\.zst|\.gz)?)"
                         rf"|(modules\.dep)|(modules\.builtin))$")
    with tempfile.TemporaryDirectory(prefix="numavm-modules-", dir=root) as tmp:
        work = Path(tmp)
        deb = _download(assets, work, log, release)
        files = _assets.extract_matching(deb, pattern)
        deb.unlink()
        stage = work / "modules"
        stage.mkdir()
        kos: dict[str, bytes] = {}
        for fname, data in files.items():
            if fname.startswith("modules."):
                (stage / fname).write_bytes(data)
            else:
                kos[key(module_name(fname))] = decompress(fname, data)
        for name, data in kos.items():
            (stage / f"{name}.ko").write_bytes(data)
        (stage / "modules.dep").write_text(modules_dep(kos))
        os.chmod(stage, 0o755)
        try:
            os.rename(stage, final)
        except OSError:  # another process got there first
            if not (final / "modules.dep").is_file():
                raise
    log(f"numavm: kernel modules of {assets.kernel_package} {assets.kernel_package_version} -> {final}")
    return final


def _download(assets: Assets, work: Path, log: Log, release: str | None) -> Path:
    from numavm.guest import assets as _assets
    from numavm.guest.aptrelease import PrivateApt, host_release

    if release is None or release == host_release():
        return _assets.download(assets.kernel_package, assets.kernel_package_version, work, log)
    with PrivateApt(release, assets.kernel.parent / "apt", log) as apt:
        return _assets._download(assets.kernel_package, assets.kernel_package_version, work, log, apt.options)


def ordered_modules(directory: Path, wanted: Iterable[str]) -> list[Path]:
    """The .ko files in `directory` (an `extract_modules` result) to load for `wanted`, in order."""
    deps = parse_modules_dep((directory / "modules.dep").read_text())
    builtin_file = directory / "modules.builtin"
    builtin = [module_name(line) for line in builtin_file.read_text().split()] if builtin_file.is_file() else []
    available = [p.name[:-3] for p in directory.glob("*.ko")]
    return [directory / f"{name}.ko" for name in load_order(wanted, deps, available, builtin)]


def device_modules(assets: Assets, kinds: Iterable[str], log: Log = print,
                   release: str | None = None) -> list[Path]:
    """What an engine asks for: the module files the guest must load (in order) to drive
    devices of these kinds with `assets`' kernel; [] without devices (nothing is fetched)."""
    wanted = modules_for(kinds)
    if not wanted:
        return []
    return ordered_modules(extract_modules(assets, log, release), wanted)


__all__ = ["DEVICE_MODULES", "ModulesUnavailable", "cached_modules", "decompress",
           "device_modules", "extract_modules", "load_order", "modules_for", "ordered_modules",
           "parse_modules_dep"]
