"""Row 1: launch to guest NUMA-ready (the kernel's "Built N zonelists" line), example topology."""

from __future__ import annotations

import json
import subprocess
import sys

from numavm.spec import config
from numavm.vmm.engine import detect
from numavm.peers.export import qemu_args

from .proc import QEMU, ROOT, BenchError, Spawned, child_env, shell
from .runner import Bench, Side

READY = rb"Built \d+ zonelists"
TIMEOUT = float(__import__("os").environ.get("BENCH_BOOT_TIMEOUT", "1800"))
EMULATED_PAIRS = 3  # KVM-backed boots take ~30-60 s each on an emulating KVM
QBOOT = "/usr/share/qemu/qboot.rom"


def numavm_check_available() -> str:
    """'' when `numavm check --stage kernel --accel kvm` exists, else why not."""
    r = subprocess.run([sys.executable, "-m", "numavm", "check", "--help"], capture_output=True, text=True,
                       env=child_env(), cwd=str(ROOT), timeout=60)
    if r.returncode != 0 or "--stage" not in r.stdout:
        return "`numavm check --stage` is not available in this tree yet (TODO: rerun once it lands)"
    return ""


def guest_kernel() -> tuple[str, str]:
    """(vmlinux ELF path, kernel command line) exactly as `numavm check --stage kernel` uses them."""
    from numavm.guest.launch import guest_assets, kernel_cmdline

    assets = guest_assets(None, lambda s: None)
    return str(assets.vmlinux), kernel_cmdline("kernel", detect().emulated)


def numavm_argv(extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "numavm", "check", "--stage", "kernel", "--accel", "kvm", "--json",
            "--verbose", *(extra or [])]


def numavm_sample(argv: list[str], info: list[dict]) -> float:
    with Spawned(argv, env=child_env(), cwd=str(ROOT), stderr_to_stdout=True) as c:
        t = c.wait_for_re(READY, TIMEOUT)
        c.finish(TIMEOUT)
        text = c.out.decode(errors="replace")
        start = text.rfind('\n{\n')
        try:
            doc = json.loads(text[start + 1:]) if start >= 0 else {}
        except ValueError:
            doc = {}
        info.append({"match": doc.get("match"), "boot": doc.get("boot"), "exit_s": None})
    return t


def qemu_argv(accel: str, vmlinux: str, cmdline: str, topo=None) -> list[str]:
    topo = topo or config.example().build()
    bios = ["-bios", QBOOT] if __import__("os").path.exists(QBOOT) else []
    return [QEMU or "qemu-system-x86_64", "-accel", accel, *bios, *qemu_args(topo), "-kernel", vmlinux,
            "-append", cmdline, "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-monitor", "none", "-no-reboot"]


def qemu_sample(argv: list[str]) -> float:
    if QEMU is None:
        raise BenchError("qemu-system-x86_64 not installed")
    with Spawned(argv) as q:
        return q.wait_for_re(READY, TIMEOUT)


def benches(quick: bool) -> list[Bench]:
    host = detect()
    missing = numavm_check_available()
    title = "Boot: launch to guest NUMA-ready (\"Built N zonelists\"), example"
    if missing:
        return [Bench("boot", "boot", title, "s", Side("numavm", None, missing=missing), [],
                      skipped=missing, goal="≤ 0.25 × QEMU-KVM")]
    try:
        vmlinux, cmdline = guest_kernel()
    except Exception as e:  # no apt, no network: say so in the table
        why = f"guest kernel unavailable: {e}"
        return [Bench("boot", "boot", title, "s", Side("numavm", None, missing=why), [], skipped=why)]
    info: list[dict] = []
    kvm_boot_skipped = quick and host.emulated
    skip_why = ("--quick on a host whose KVM emulates guest code: KVM-backed boots take 30-60 s each, "
                "skipped")
    n_argv, k_argv, t_argv = numavm_argv(), qemu_argv("kvm", vmlinux, cmdline), qemu_argv("tcg", vmlinux, cmdline)
    n = Side("numavm", None if kvm_boot_skipped else (lambda: numavm_sample(n_argv, info)),
             missing=skip_why, command=shell(n_argv))
    k = Side("QEMU-KVM", None if kvm_boot_skipped else (lambda: qemu_sample(k_argv)), missing=skip_why,
             command=shell(k_argv))
    t = Side("QEMU-TCG", lambda: qemu_sample(t_argv), command=shell(t_argv))
    runs = EMULATED_PAIRS if host.emulated else 5
    warmup = 0 if host.emulated else 1

    def met(b: Bench) -> str:
        from .runner import median_ratio
        r = median_ratio(n, k)
        return "n/a" if r is None else ("met" if r <= 0.25 else "not met") + f" ({r:.2f} × QEMU-KVM)"

    def extra(b: Bench) -> list[str]:
        if not info:
            return []
        return ["numavm check's verdicts: " + "; ".join(f"match={i['match']} ({i['boot']})" for i in info)]

    notes = [
        "Launch (process spawned) to the guest kernel's `Built N zonelists` line on the serial console, "
        "timestamped by the harness as the line arrives; the process is then left to stop (numavm) or "
        "killed (QEMU).",
        f"numavm: `{shell(n_argv[1:])}`; `--verbose` echoes the guest console to stderr, which the harness "
        "reads. numavm check stops the VM itself at that line (stage kernel). The line comes from "
        "numavm's serial device in a Python thread, as QEMU's comes from its 16550 model.",
        "QEMU: `numavm export --to qemu` of the example (QEMU builds its own SRAT/SLIT from -numa), the "
        "same kernel as numavm boots — the vmlinux ELF numavm unpacks from Debian's bzImage and caches "
        "(QEMU boots it through PVH, so neither side runs the in-guest decompressor) — and the same "
        f"command line (`{cmdline}`), qboot as firmware (as numavm's TCG engine uses), `-serial stdio`.",
    ]
    if host.emulated:
        notes.append(f"This host's KVM emulates guest code ({host.reason}): KVM-backed boots take tens of "
                     f"seconds, so this row runs {EMULATED_PAIRS} counted rounds and no warm-up"
                     + ("; in --quick the KVM-backed boots are skipped and only QEMU-TCG runs." if quick else "."))
    return [Bench("boot", "boot", title, "s", n, [k, t], runs=runs, warmup=warmup,
                  goal="≤ 0.25 × QEMU-KVM", goal_met=met, extra=extra, notes=notes)]
