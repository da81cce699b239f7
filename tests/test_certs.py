"""scripts/make_certs.sh: every private key readable by its owner only, whoever runs it; the
output folder and the certificates readable by others, the containers' user among them."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.local_superlink import REPO

SCRIPT = REPO / "scripts" / "make_certs.sh"
PRIVATE = ("ca.key", "superlink.key", "supernode-0", "supernode-1")
PUBLIC = ("ca.crt", "superlink.crt", "supernode-0.pub", "supernode-1.pub")
NOBODY = 65534
CONTAINER_UID = 49999  # the image's user (docker/Dockerfile)
OTHER = 54321  # a uid that owns nothing here

needs_tools = pytest.mark.skipif(not shutil.which("openssl"), reason="make_certs.sh needs openssl")


def _make(out: Path, as_user: int | None, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(script), "--out", str(out), "--nodes", "2"]
    if as_user is not None:  # drop to an unprivileged user, as a non-root operator would run it
        command = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd="/")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _can_read(uid: int, path: Path) -> bool:
    """Whether `uid` can open `path` for reading (through every folder above it)."""
    result = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat", str(path)],
                            capture_output=True, timeout=30, check=False)
    return result.returncode == 0


@contextlib.contextmanager
def _open_workdir() -> Iterator[Path]:
    """A folder every uid can pass through (pytest's tmp_path is root's, mode 0700)."""
    work = Path(tempfile.mkdtemp(prefix="pfedmma-certs-"))
    try:
        work.chmod(0o777)
        yield work
    finally:
        shutil.rmtree(work)


def _check_files(out: Path) -> None:
    # Enterable by anyone (a container mounting the whole folder reads ca.crt), listable too.
    assert _mode(out) == 0o755, f"{out}: {oct(_mode(out))}"
    for name in PRIVATE:
        assert _mode(out / name) == 0o600, f"{name}: {oct(_mode(out / name))}"
    for name in PUBLIC:
        assert _mode(out / name) == 0o644, f"{name}: {oct(_mode(out / name))}"
    # The files are what they claim: a certificate openssl reads, keys that load.
    check = subprocess.run(["openssl", "x509", "-in", str(out / "superlink.crt"), "-noout", "-subject"], capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "superlink" in check.stdout
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

    load_pem_private_key((out / "superlink.key").read_bytes(), password=None)
    load_ssh_private_key((out / "supernode-0").read_bytes(), password=None)


@needs_tools
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="switching to a non-root user needs root and setpriv")
def test_keys_are_owner_only_when_a_non_root_user_runs_it() -> None:
    # A copy of the script in a folder the unprivileged user can reach (the checkout may not be
    # readable by that user either).
    with _open_workdir() as work:
        script = work / "make_certs.sh"
        shutil.copy(SCRIPT, script)
        script.chmod(0o755)
        out = work / "site" / "certs"  # the parent is new too: it must not end up 0700
        result = _make(out, NOBODY, script)
        assert result.returncode == 0, result.stderr
        _check_files(out)
        assert _mode(out.parent) == 0o755, oct(_mode(out.parent))
        for name in PRIVATE:
            assert (out / name).stat().st_uid == NOBODY, name  # still the operator's, nobody else's
            assert not _can_read(OTHER, out / name), name
        for name in PUBLIC:
            assert _can_read(OTHER, out / name), name
        assert "sudo chown 49999:49999" in result.stderr  # and it says how to hand them to the containers


@needs_tools
@pytest.mark.skipif(os.geteuid() == 0, reason="covered by the setpriv test when root")
def test_keys_are_owner_only_for_the_current_user(tmp_path: Path) -> None:
    result = _make(tmp_path / "certs", None)
    assert result.returncode == 0, result.stderr
    _check_files(tmp_path / "certs")


@needs_tools
@pytest.mark.skipif(os.geteuid() != 0, reason="giving keys to uid 49999 needs root")
def test_as_root_the_container_keys_go_to_the_container_user(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = _make(out, None)
    assert result.returncode == 0, result.stderr
    _check_files(out)
    assert all((out / n).stat().st_uid == CONTAINER_UID for n in ("superlink.key", "supernode-0", "supernode-1"))
    assert (out / "ca.key").stat().st_uid == 0  # the CA key never goes into a container


@needs_tools
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="acting as other uids needs root and setpriv")
def test_the_container_user_can_enter_the_folder_and_read_only_its_files() -> None:
    """What a container (uid 49999) that mounts the whole folder sees: ca.crt and its keys,
    never ca.key; another uid gets the certificates and no key at all. Also when the folder
    was left 0700 by an older version of the script: re-running repairs it."""
    with _open_workdir() as work:
        out = work / "certs"
        out.mkdir(mode=0o700)
        out.chmod(0o700)
        result = _make(out, None)
        assert result.returncode == 0, result.stderr
        _check_files(out)
        assert _can_read(CONTAINER_UID, out / "ca.crt")
        assert _can_read(CONTAINER_UID, out / "supernode-0") and _can_read(CONTAINER_UID, out / "superlink.key")
        assert not _can_read(CONTAINER_UID, out / "ca.key")
        for name in PUBLIC:
            assert _can_read(OTHER, out / name), name
        for name in PRIVATE:
            assert not _can_read(OTHER, out / name), name
