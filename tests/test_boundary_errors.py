"""Errors at the file boundaries name the key or file, the value and what to do: checkpoints
(read safely, never unpickled), private-state files, a full disk; no misleading warning."""

from __future__ import annotations

import errno
import logging
import pickle
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import save_file

from client import reset_state
from client.state_store import PrivateStateError, PrivateStateStore
from common.errors import CheckpointError, DiskFullError, PermanentError
from common.model.clip import build_clip

FINGERPRINT = {"model-name": "pfedmma-tiny"}


class _Marker:
    """Unpickling this would create a file: proof that a checkpoint was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("kind", ["garbage", "pickle", "wrong-shape"])
def test_a_bad_checkpoint_names_the_key_and_file_and_is_never_unpickled(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / ("weights.safetensors" if kind == "wrong-shape" else "weights.pt")
    if kind == "garbage":
        path.write_bytes(b"\x80\x03garbage that is not a checkpoint")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"visual.proj": _Marker(str(marker))}))
    else:
        save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(CheckpointError) as err:
        build_clip("pfedmma-tiny", str(path))
    text = str(err.value)
    assert f"pretrained={str(path)!r}" in text and "model-name='pfedmma-tiny'" in text
    assert "weights_only=False" not in text and "never unpickled" in text
    assert isinstance(err.value, PermanentError)
    assert not marker.exists()


def test_no_random_init_warning_when_the_weights_come_from_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        build_clip("pfedmma-tiny", "pfedmma-tiny-shapes", cache_dir=tmp_path)  # fills the cache
        build_clip("pfedmma-tiny", "pfedmma-tiny-shapes", cache_dir=tmp_path)  # built from it
    assert any(tmp_path.iterdir())
    assert "No pretrained weights loaded" not in caplog.text
    # Really random weights are still announced, and the filter is gone afterwards.
    with caplog.at_level(logging.WARNING):
        build_clip("pfedmma-tiny", "")
    assert "No pretrained weights loaded" in caplog.text


def _store(tmp_path: Path, client: int = 0) -> PrivateStateStore:
    return PrivateStateStore(RecordDict(), tmp_path / "state", "exp", client, FINGERPRINT)


def test_a_truncated_private_state_names_the_file_and_how_to_start_over(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save({"a": torch.ones(4)})
    store.path.write_bytes(store.path.read_bytes()[:20])
    with pytest.raises(PrivateStateError) as err:
        _store(tmp_path).load()
    text = str(err.value)
    assert str(store.path) in text and "truncated" in text
    assert f"python -m client.reset_state --state-dir {tmp_path / 'state'} --experiment exp --client 0" in text


def test_reset_removes_exactly_the_named_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for client in (0, 1):
        _store(tmp_path, client).save({"a": torch.ones(2)})
    other = PrivateStateStore(RecordDict(), tmp_path / "state", "other", 0, FINGERPRINT)
    other.save({"a": torch.ones(2)})
    state = str(tmp_path / "state")
    assert reset_state.main(["--state-dir", state, "--experiment", "exp", "--client", "1"]) == 0
    assert f"removed {tmp_path / 'state' / 'exp' / 'client-1.safetensors'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "state" / "exp").iterdir()) == ["client-0.safetensors"]
    assert reset_state.main(["--state-dir", state, "--experiment", "exp"]) == 0
    assert not any((tmp_path / "state" / "exp").iterdir()) and other.path.is_file()
    assert reset_state.main(["--state-dir", state, "--experiment", "../state"]) == 2
    assert reset_state.main(["--state-dir", state, "--experiment", "nope"]) == 2
    assert "no private state for experiment 'nope'" in capsys.readouterr().err
    assert other.path.is_file()


def test_a_full_disk_names_the_file_and_keeps_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    store.save({"a": torch.ones(4)})
    before = store.path.read_bytes()

    def no_space(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("client.state_store.save_file", no_space)
    with pytest.raises(DiskFullError) as err:
        store.save({"a": torch.zeros(4)})
    assert str(store.path) in str(err.value) and "state-dir" in str(err.value)
    assert store.path.read_bytes() == before
    assert [p.name for p in store.path.parent.iterdir()] == ["client-0.safetensors"]  # no temporary left
