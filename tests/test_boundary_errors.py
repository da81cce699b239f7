"""Errors at the file boundaries name the key or file, the value and what to do: checkpoints
(read safely, never unpickled), private-state files, a full disk; no misleading warning."""

from __future__ import annotations

import errno
import logging
import pickle
import threading
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from client import reset_state
from client.state_store import PrivateStateError, PrivateStateStore
from common.errors import CheckpointError, DiskFullError, PermanentError
from common.model.clip import build_clip, weights_loaded_elsewhere
from server.run_dir import RunDirectory

FINGERPRINT = {"model-name": "pfedmma-tiny"}
NO_WEIGHTS = "No pretrained weights loaded"


class _Marker:
    """Unpickling this would create a file: proof that a checkpoint was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.path),))


def _retry_bait(marker: Path) -> bytes:
    """A pickle on which torch's safe reader raises TypeError (a 3-tuple BUILD state on an empty
    Tensor: ``set_(False, None, OrderedDict())``) before reaching a call that creates ``marker``.
    On a TypeError open_clip retries torch.load without weights_only."""
    make_marker = pickle.dumps(_Marker(str(marker)), protocol=4)[2:-1]  # without PROTO and STOP
    empty_tensor_with_bad_state = b"ctorch\nTensor\n)\x81\x89Nccollections\nOrderedDict\n)R\x87b"
    return b"\x80\x04" + empty_tensor_with_bad_state + make_marker + b"\x86."


def _expect_unreadable(path: Path, pretrained: str | None = None) -> str:
    pretrained = str(path) if pretrained is None else pretrained
    with pytest.raises(CheckpointError) as err:
        build_clip("pfedmma-tiny", pretrained)
    text = str(err.value)
    assert f"pretrained={pretrained!r}" in text and f"cannot read {path}" in text
    assert "safetensors file" in text and "state dict of tensors" in text and "never unpickled" in text
    assert "weights_only=False" not in text
    assert isinstance(err.value, PermanentError)
    return text


def test_a_garbage_checkpoint_names_the_key_the_file_and_the_formats(tmp_path: Path) -> None:
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"\x80\x03garbage that is not a checkpoint")
    _expect_unreadable(garbage)
    text_file = tmp_path / "weights.safetensors"
    text_file.write_text("not a safetensors file either\n")
    assert "SafetensorError" in _expect_unreadable(text_file)


def test_a_pickled_object_is_refused_and_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "executed"
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"visual.proj": _Marker(str(marker))}))
    _expect_unreadable(plain)
    # Where full unpickling is torch's default, open_clip's retry after a TypeError would run it.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    bait = tmp_path / "bait.pt"
    bait.write_bytes(_retry_bait(marker))
    _expect_unreadable(bait)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_names_the_file_the_model_and_the_difference(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(CheckpointError) as err:
        build_clip("pfedmma-tiny", str(path))
    text = str(err.value)
    assert f"pretrained={str(path)!r}: {path} does not fit model-name='pfedmma-tiny'" in text
    assert "'visual.proj': file [3, 3], model [128, 128]" in text and "tensors missing from the file" in text


def test_a_missing_file_or_unknown_tag_is_a_permanent_checkpoint_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=rf"pretrained='{missing}': no such checkpoint file"):
        build_clip("pfedmma-tiny", str(missing))
    with pytest.raises(CheckpointError, match=r"pretrained='opneai' is not a tag of model 'ViT-B-16'; valid tags: \[.*'openai'"):
        build_clip("ViT-B-16", "opneai")


def test_no_random_init_warning_when_the_weights_come_from_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        build_clip("pfedmma-tiny", "pfedmma-tiny-shapes", cache_dir=tmp_path)  # fills the cache
        build_clip("pfedmma-tiny", "pfedmma-tiny-shapes", cache_dir=tmp_path)  # built from it
    assert any(tmp_path.iterdir())
    assert NO_WEIGHTS not in caplog.text
    # Really random weights are still announced, and the filter is gone afterwards.
    with caplog.at_level(logging.WARNING):
        build_clip("pfedmma-tiny", "")
    assert NO_WEIGHTS in caplog.text


def test_the_warning_is_only_dropped_for_the_calling_thread(caplog: pytest.LogCaptureFixture) -> None:
    root = logging.getLogger()  # where open_clip logs it (with logging.warning)
    with caplog.at_level(logging.WARNING), weights_loaded_elsewhere():
        root.warning("%s for model 'here'.", NO_WEIGHTS)
        other = threading.Thread(target=root.warning, args=("%s for model 'there'.", NO_WEIGHTS))
        other.start()
        other.join()
    assert "'there'" in caplog.text and "'here'" not in caplog.text


def _store(tmp_path: Path, client: int = 0) -> PrivateStateStore:
    return PrivateStateStore(tmp_path / "state", "exp", client, FINGERPRINT)


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
    other = PrivateStateStore(tmp_path / "state", "other", 0, FINGERPRINT)
    other.save({"a": torch.ones(2)})
    state = str(tmp_path / "state")
    assert reset_state.main(["--state-dir", state, "--experiment", "exp", "--client", "1"]) == 0
    assert f"removed {tmp_path / 'state' / 'exp' / 'client-1.safetensors'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "state" / "exp").iterdir()) == ["client-0.safetensors"]
    assert reset_state.main(["--state-dir", state, "--experiment", "exp"]) == 0
    assert not any((tmp_path / "state" / "exp").iterdir()) and other.path.is_file()
    assert reset_state.main(["--state-dir", state, "--experiment", "../state"]) == 2
    assert "is not a namespace directly under" in capsys.readouterr().err
    assert reset_state.main(["--state-dir", state, "--experiment", "nope"]) == 2
    assert "no private state for experiment 'nope'" in capsys.readouterr().err
    assert other.path.is_file()


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space_in_safetensors(*args: object, **kwargs: object) -> None:
    # safetensors reports the system's error in its own exception type
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("failure", [_no_space, _no_space_in_safetensors])
def test_a_full_disk_names_the_state_file_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: object
) -> None:
    store = _store(tmp_path)
    store.save({"a": torch.ones(4)})
    before = store.path.read_bytes()
    monkeypatch.setattr("client.state_store.save_file", failure)
    with pytest.raises(DiskFullError) as err:
        store.save({"a": torch.zeros(4)})
    assert str(store.path) in str(err.value) and "state-dir" in str(err.value)
    assert err.value.filename == str(store.path) and isinstance(err.value, PermanentError)
    assert store.path.read_bytes() == before
    assert [p.name for p in store.path.parent.iterdir()] == ["client-0.safetensors"]  # no temporary left


def test_a_full_disk_names_the_run_directory_file_and_keeps_what_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = RunDirectory.create(tmp_path, 7, {"method": "pfedmma"}, "run-7")
    run_dir.save_global(1, {"w": torch.ones(2)})
    run_dir.write_summary({"status": "running"})
    saved = {p: p.read_bytes() for p in run_dir.path.rglob("*") if p.is_file()}

    monkeypatch.setattr("server.run_dir.save_file", _no_space_in_safetensors)
    with pytest.raises(DiskFullError) as err:
        run_dir.save_global(2, {"w": torch.zeros(2)})
    text = str(err.value)
    assert str(run_dir.global_path(2)) in text and "output-dir" in text and f"resume-from={str(run_dir.path)!r}" in text

    monkeypatch.setattr(Path, "write_text", _no_space)
    with pytest.raises(DiskFullError, match="summary.json"):
        run_dir.write_summary({"status": "done"})
    assert {p: p.read_bytes() for p in run_dir.path.rglob("*") if p.is_file()} == saved  # nothing torn, no temporaries
