"""Hostile input gets one line and exit 2: TOML files, numbers, units, timeouts, kernels, /dev/kvm.

Each case here is one issue 13 found accepted, or answered with a traceback
or the wrong exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from numavm.spec import config
from numavm.cli import main
from numavm.vmm.engine import KVM_DEVNO, choose, detect, device_kind, qemu_binary
from numavm.errors import ConfigError
from numavm.spec.units import parse_int, parse_seconds, parse_size

from kvmtest import KVM_ONLY_MODULES  # noqa: E402


def one_error(capsys, argv: list[str]) -> str:  # type: ignore[no-untyped-def]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (argv, rc, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("numavm: error: "), err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- numbers and units


@pytest.mark.parametrize("argv", [
    ["-c", "٤"], ["-c", "1_0"], ["-c", "+2"], ["-c", " 2\u00a0"], ["-c", "２"],
    ["-n", "id=0,cpus=0", "-n", "id=1", "--distance", "0:1=2_0"],
    ["-n", "id=0,cpus=0", "-n", "id=1", "--distance", "0:1=٢٠"],
    ["-n", "id=٠,cpus=0"], ["-n", "id=0,cpus=٠"], ["-n", "id=0,cpus=0,size=1_024M"],
    ["-m", "1073741824BiB"], ["-m", "8IB"], ["-m", "1GG"], ["-m", "1iB"], ["-m", "١G"], ["-m", "1.5G"],
    ["--prefault", "x"],
])
def test_loose_numbers_are_refused(capsys, argv):
    cmd = ["check", "--timeout", "1"] if argv[0] == "--prefault" else ["plan"]
    one_error(capsys, cmd + argv)


@pytest.mark.parametrize("text,n", [("1G", 1 << 30), ("1g", 1 << 30), ("1GiB", 1 << 30), ("1GB", 1 << 30),
                                    ("2048K", 2 << 20), ("2048kib", 2 << 20), ("4096", 4096), ("4096B", 4096),
                                    (" 512M ", 512 << 20), ("512 M", 512 << 20)])
def test_documented_sizes(text, n):
    assert parse_size(text, "x") == n


def test_ints_and_seconds():
    assert parse_int(" 12 ", "x") == 12 and parse_int("-3", "x") == -3
    assert parse_seconds("30", "x") == 30.0 and parse_seconds("0.5", "x") == 0.5 and parse_seconds(".5", "x") == 0.5
    for bad in ("nan", "inf", "-inf", "1e3", "0", "0.0", "-1", "1_0", "١", "", "1.2.3", "+1"):
        with pytest.raises(ConfigError, match="^x: expected a number of seconds more than 0"):
            parse_seconds(bad, "x")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-5", "1e9", "١"])
def test_timeout_must_be_finite_and_positive(capsys, value):
    err = one_error(capsys, ["run", f"--timeout={value}", "--", "true"])
    assert err.startswith("numavm: error: --timeout: expected a number of seconds more than 0")


# ---------------------------------------------------------------- TOML files


def test_toml_not_utf8(capsys, tmp_path):
    f = tmp_path / "m.toml"
    f.write_bytes(b"cpus = 2\n# caf\xe9\n")
    err = one_error(capsys, ["plan", "-f", str(f)])
    assert "not UTF-8" in err and "line 2" in err


@pytest.mark.parametrize("body", [
    "a = " + "[" * 100_000 + "]" * 100_000,
    "a = " + "{b=" * 100_000 + "}" * 100_000,
    "cpus = " + "[" * 17 + "1" + "]" * 17,
    "cpus." + ".".join(["a"] * 50_000) + " = 1",
    "[domain." + ".".join(["a"] * 50_000) + "]",
    "x = [" + ",".join(["1.5"] * 300) + "]",
])
def test_toml_deep_or_long_keys_refused_fast(capsys, tmp_path, body):
    f = tmp_path / "m.toml"
    f.write_text(body + "\n")
    t = time.monotonic()
    err = one_error(capsys, ["plan", "-f", str(f)])
    assert time.monotonic() - t < 30  # a guard against a hang, not a timing assertion
    assert "nested more than 16 deep" in err or "more than 16 dots" in err


def test_toml_brackets_in_strings_and_comments_do_not_count():
    text = 'cpus = 2  # [[[[[[[[[[[[[[[[[[[[\nmemory = "512M"\n' + "\n".join(
        f'# {"[" * 20}' for _ in range(3))
    spec = config.loads(text + '\n', "t")
    assert spec.cpus == 2
    with pytest.raises(ConfigError, match="^t: memory: expected a size"):  # not by the shape check
        config.loads('memory = """\n[[[[[[[[[[[[[[[[[[[[[[[[[[.......................\n"""\n', "t")


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom"])
def test_toml_endless_files_are_refused_quickly(capsys, path):
    err = one_error(capsys, ["plan", "-f", path])
    assert "is a character device; a regular file or a pipe such as <(...) is needed" in err


def test_toml_too_big(capsys, tmp_path):
    f = tmp_path / "m.toml"
    f.write_text("# " + "x" * (1 << 20) + "\ncpus = 2\n")
    assert "over the size limit of 1 MiB" in one_error(capsys, ["plan", "-f", str(f)])


def test_toml_from_a_pipe_still_works():
    """`-f <(...)`: the shell passes /dev/fd/N, a pipe whose writer exists."""
    rd, wr = os.pipe()
    r = subprocess.Popen([sys.executable, "-m", "numavm", "plan", "--json", "-f", f"/dev/fd/{rd}"],
                         stdout=subprocess.PIPE, text=True, pass_fds=(rd,))
    os.close(rd)
    with open(wr, "w") as f:
        f.write("cpus = 3\n")
    out, _ = r.communicate(timeout=60)
    assert r.returncode == 0 and '"cpus": 3' in out


def test_toml_from_a_named_fifo_is_refused(capsys, tmp_path):
    """A named FIFO may have no writer, and the read would wait for ever."""
    fifo = tmp_path / "m.toml"
    os.mkfifo(fifo)
    assert "is a FIFO; a regular file or a pipe such as <(...) is needed" in one_error(
        capsys, ["plan", "-f", str(fifo)])


def test_toml_directory(capsys, tmp_path):
    assert "is a directory; a regular file or a pipe such as <(...) is needed" in one_error(
        capsys, ["plan", "-f", str(tmp_path)])


# ---------------------------------------------------------------- kernels


@pytest.fixture
def cached_kernel():  # type: ignore[no-untyped-def]
    from numavm.guest.assets import cached
    a = cached()
    if a is None:
        pytest.skip("no guest kernel in the cache (numavm fetch)")
    return a.kernel


@pytest.mark.skipif(not qemu_binary(), reason="qemu-system-x86_64 is not installed")
def test_bad_kernels_are_bad_input(capsys, tmp_path, cached_kernel):
    data = cached_kernel.read_bytes()
    from numavm.guest.launch import unpacked_kernel
    vmlinux = unpacked_kernel(cached_kernel, lambda s: None).read_bytes()
    cases = {"garbage": b"garbage" * 100, "empty": b"", "truncated-bzImage": data[: len(data) // 3],
             "truncated-vmlinux": vmlinux[: len(vmlinux) // 3], "elf-header-only": vmlinux[:64]}
    for name, blob in cases.items():
        f = tmp_path / name
        f.write_bytes(blob)
        rc = main(["check", "--accel", "tcg", "--kernel", str(f)])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("numavm: error:")]
        assert rc == 2, (name, err)
        assert len(errors) == 1 and errors[0].startswith(f"numavm: error: --kernel: {f}"), (name, err)
    assert main(["check", "--accel", "tcg", "--kernel", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------- check's timeout


@pytest.mark.skipif(not qemu_binary(), reason="qemu-system-x86_64 is not installed")
def test_check_reports_a_timeout_as_one(cached_kernel):
    r = subprocess.run([sys.executable, "-m", "numavm", "check", "--accel", "tcg", "--timeout", "0.3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 73, r.stderr
    # the last line says so; on a loaded host QEMU may not even have started within 0.3 s
    assert r.stderr.splitlines()[-1].startswith("numavm: guest timeout: "), r.stderr
    assert "MISMATCH" in r.stdout  # the table still shows what was (not) seen


# ---------------------------------------------------------------- /dev/kvm


def test_engine_names_what_dev_kvm_really_is(tmp_path):
    cases = {Path("/dev/null"): "character device 1:3 (null)", tmp_path: "a directory"}
    f = tmp_path / "kvm"
    f.write_text("")
    cases[f] = "a regular file"
    os.mkfifo(tmp_path / "fifo")
    cases[tmp_path / "fifo"] = "a FIFO"
    for dev, what in cases.items():
        assert device_kind(dev) == what
        host = detect(dev, sysfs=Path("/sys/module"))  # kvm_pvm is loaded here: not what is named
        assert not host.kvm_usable
        assert host.reason == f"{dev} is {what}, not KVM's device (character device 10:232)"
        if qemu_binary():
            engine = choose("auto", host)
            assert engine.name == "tcg" and what in engine.why


def test_the_real_dev_kvm(tmp_path):
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm")
    assert device_kind(Path("/dev/kvm")) == "KVM's device"
    st = os.stat("/dev/kvm")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == KVM_DEVNO
    host = detect()
    assert host.kvm_usable and "not KVM's device" not in host.reason


def test_auto_falls_back_to_kvm_where_tcg_refuses_the_layout():
    """The engine says why it refused (EngineRefusal.reason); nothing parses its message."""
    if not qemu_binary():
        pytest.skip("needs qemu-system-x86_64 (the fallback starts from TCG)")
    from numavm.vmm.engine import HostVirt, KvmEngine, TcgEngine, select
    from numavm.plan.layout import plan_layout
    from numavm.spec.topology import MachineSpec, parse_numa

    wide = plan_layout(MachineSpec(cpus=256, domains=[parse_numa("id=0,size=64M,cpus=0-255")])
                       .build(host_nodes=(0,)))
    emulating = HostVirt(True, True, "/dev/kvm is kvm_pvm, which emulates guest kernel code")
    engine = select("auto", wide, emulating)
    assert isinstance(engine, KvmEngine) and engine.emulates_guest_code
    assert engine.why == ("engine kvm: TCG cannot run this layout (APIC id 255 (vCPU 255) passes 254, so "
                          "the guest needs x2APIC, and QEMU's pc machine takes at most 255 vCPUs with "
                          "xAPIC ids (QEMU 7.2's TCG has no x2APIC)), though "
                          "/dev/kvm is kvm_pvm, which emulates guest kernel code")
    with pytest.raises(ConfigError, match=r"^--accel tcg: APIC id 255 .* at most 255 vCPUs .*; "
                                          r"use --accel kvm$"):
        select("tcg", wide)
    # 130 vCPUs, but vCPU 129's APIC id is 256: refused for the id, not the count.
    past = plan_layout(MachineSpec(domains=[parse_numa("id=0,size=64M,cpus=0-127"),
                                            parse_numa("id=1,size=64M,cpus=128"),
                                            parse_numa("id=2,size=64M,cpus=129")]).build(host_nodes=(0,)))
    engine = select("auto", past, emulating)
    assert isinstance(engine, KvmEngine)
    assert "APIC id 256 (vCPU 129) passes 254, so the guest needs x2APIC" in engine.why
    with pytest.raises(ConfigError, match=r"APIC id 256 \(vCPU 129\) passes 254"):
        select("tcg", past)
    with pytest.raises(ConfigError, match="at most 255 vCPUs"):  # no KVM to fall back to
        select("auto", wide, HostVirt(False, False, "/dev/kvm does not exist"))
    narrow = plan_layout(config.example().build(host_nodes=(0,)))
    tcg = select("auto", narrow, emulating)
    assert isinstance(tcg, TcgEngine) and not tcg.counts_exits and tcg.cpus_checked_before_run


def test_a_tcg_run_loads_nothing_of_kvm():
    """--accel tcg: choosing, checking and the TCG engine's module import no KVM code."""
    code = ("import sys; from numavm import cli; from numavm.vmm import engine, run; import numavm.vmm.tcg; "
            "from numavm.guest import launch; "
            "from numavm.plan.layout import plan_layout; from numavm.spec import config; "
            "e = engine.select('tcg', plan_layout(config.example().build(host_nodes=(0,)))) "
            "if engine.qemu_binary() else None; "
            f"print(sorted(m for m in sys.modules if m.startswith({KVM_ONLY_MODULES!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
