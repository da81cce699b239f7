"""scripts/make_certs.sh: every private key readable by its owner only, whoever runs it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.local_superlink import REPO

SCRIPT = REPO / "scripts" / "make_certs.sh"
PRIVATE = ("ca.key", "superlink.key", "supernode-0", "supernode-1")
PUBLIC = ("ca.crt", "superlink.crt", "supernode-0.pub", "supernode-1.pub")
NOBODY = 65534

needs_tools = pytest.mark.skipif(not shutil.which("openssl"), reason="make_certs.sh needs openssl")


def _make(out: Path, as_user: int | None, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(script), "--out", str(out), "--nodes", "2"]
    if as_user is not None:  # drop to an unprivileged user, as a non-root operator would run it
        command = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd="/")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _check_files(out: Path) -> None:
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
    # A folder the unprivileged user can reach (pytest's tmp_path is root's, mode 0700), with a
    # copy of the script (the checkout may not be readable by that user either).
    work = Path(tempfile.mkdtemp(prefix="pfedmma-certs-"))
    try:
        work.chmod(0o777)
        script = work / "make_certs.sh"
        shutil.copy(SCRIPT, script)
        script.chmod(0o755)
        out = work / "certs"
        result = _make(out, NOBODY, script)
        assert result.returncode == 0, result.stderr
        _check_files(out)
        for name in PRIVATE:
            assert (out / name).stat().st_uid == NOBODY, name  # still the operator's, nobody else's
        assert "sudo chown 49999:49999" in result.stderr  # and it says how to hand them to the containers
    finally:
        shutil.rmtree(work)


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
    assert all((out / n).stat().st_uid == 49999 for n in ("superlink.key", "supernode-0", "supernode-1"))
    assert (out / "ca.key").stat().st_uid == 0  # the CA key never goes into a container
