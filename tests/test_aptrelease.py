"""numavm.guest.aptrelease: another release's packages through a private apt configuration.

Unit tests on apt's own output formats and both sources formats; one real
run (skipped without apt or its network) fetches the other Debian release's
kernel and busybox and proves the host's apt state was not touched.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from numavm.guest import aptrelease as R
from numavm.guest import assets as A
from numavm.cli import main
from numavm.errors import ConfigError

OTHER = {"bookworm": "trixie", "trixie": "bookworm"}


def test_release_names() -> None:
    assert R.check_release("trixie") == "trixie"
    for bad in ("", "Trixie", "13", "../x", "trixie/updates", "a b", "x" * 40):
        with pytest.raises(ConfigError, match="^--release: expected a release codename"):
            R.check_release(bad)


def test_bad_release_is_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["fetch", "--cache", str(tmp_path), "--release", "../etc"]) == 2
    assert main(["check", "--release", "x y"]) == 2
    assert main(["run", "--release", "trixie", "--kernel", "/k"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "--release" in err[0] and "--release" in err[1] and "--kernel" in err[2]
    assert list(tmp_path.iterdir()) == []


def test_host_release(tmp_path: Path) -> None:
    f = tmp_path / "os-release"
    f.write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n')
    assert R.host_release(str(f)) == "trixie"
    f.write_text('ID=debian\nVERSION_CODENAME=""\n')
    assert R.host_release(str(f)) is None
    assert R.host_release(str(tmp_path / "missing")) is None


def test_sources_renamed_with_their_keyrings(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\n# a comment inside the stanza\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "# a comment between stanzas\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /k/security.gpg\n")
    one_line = tmp_path / "vendor.list"
    one_line.write_text("# vendor\ndeb [arch=amd64 signed-by=/k/vendor.gpg] http://vendor.example/apt "
                        "bookworm-extra main\ndeb http://other.example/apt stable main\n")
    targets = "\n".join([
        f"http://mirror.example/debian/\tbookworm\tmain\t{deb822}:1\tdeb",
        f"http://mirror.example/debian/\tbookworm\tcontrib\t{deb822}:1\tdeb",
        f"http://mirror.example/debian/\tbookworm-updates\tmain\t{deb822}:1\tdeb",
        f"http://mirror.example/debian-security/\tbookworm-security\tmain\t{deb822}:2\tdeb",
        f"http://vendor.example/apt/\tbookworm-extra\tmain\t{one_line}:2\tdeb",
        f"http://other.example/apt/\tstable\tmain\t{one_line}:3\tdeb",  # not the host's suite
        f"http://mirror.example/debian/\tbookworm\tmain\t{deb822}:1\tdeb-src",  # sources: not wanted
        "a line apt would not print",
    ])
    sources = R.host_sources(targets)
    assert len(sources) == 6
    assert R.signed_by(sources[0].entry) == "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert R.signed_by(sources[3].entry) == "/k/security.gpg"
    assert R.signed_by(sources[4].entry) == "/k/vendor.gpg"
    assert R.signed_by(sources[5].entry) is None
    assert R.signed_by(f"{deb822}:9") is None and R.signed_by("/nonexistent:1") is None
    text = R.sources_for("trixie", "bookworm", sources)
    assert text == (
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: trixie\nComponents: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: trixie-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security/\nSuites: trixie-security\n"
        "Components: main\nSigned-By: /k/security.gpg\n\n"
        "Types: deb\nURIs: http://vendor.example/apt/\nSuites: trixie-extra\nComponents: main\n"
        "Signed-By: /k/vendor.gpg\n")
    assert R.sources_for("trixie", "noble", sources) == ""


def test_release_cache_location(tmp_path: Path) -> None:
    host = R.host_release()
    assert A.release_cache(tmp_path, None) == tmp_path
    if host is not None:
        assert A.release_cache(tmp_path, host) == tmp_path  # the host's own release: the cache itself
    assert A.release_cache(tmp_path, "someotherrelease") == tmp_path / "someotherrelease"


def _apt_state() -> dict[str, str]:
    """What the host's apt keeps: its lists and dpkg's status, by content."""
    out = {}
    for p in [Path("/var/lib/dpkg/status"), *sorted(Path("/var/lib/apt/lists").glob("*"))]:
        if p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.skipif(shutil.which("apt-get") is None or OTHER.get(R.host_release() or "") is None,
                    reason="needs apt on Debian 12 or 13")
def test_fetch_the_other_release() -> None:
    """The other Debian release's kernel and busybox, into the shared cache; the host's apt untouched."""
    other = OTHER[R.host_release() or ""]
    before = _apt_state()
    try:
        got = A.fetch(log=lambda s: None, release=other)
    except Exception as e:  # noqa: BLE001 - the mirror may be unreachable from here
        pytest.skip(f"cannot fetch {other}: {e}")
    assert _apt_state() == before
    assert got.kernel.parent == A.cache_root() / other and got.kernel.is_file()
    assert got.kernel_version.startswith("6.12." if other == "trixie" else "6.1.")
    assert A.cached(release=other) == got
    r = subprocess.run([str(got.busybox), "echo", "ok"], capture_output=True, text=True, check=True)
    assert r.stdout == "ok\n"
