"""``pfedmma-weights`` and the loader's architecture check.

Released CLIP weights become one safetensors file that records the open_clip model name (and
QuickGELU) it must be loaded as; the loader refuses it under any other model-name. A tiny CLIP
with QuickGELU stands in for OpenAI's ViT-B/16 (nothing can be downloaded here): its state dict
in OpenAI's key layout (open_clip keeps OpenAI's tensor names) and a real TorchScript archive of
it (``torch.jit.script``; OpenAI's files are TorchScript). The full-size ViT-B-16 route, with the
architecture inferred by open_clip's OpenAI code, is in the slow suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import pickle
import tomllib
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from common.config import ConfigError, RunConfig
from common.errors import CheckpointError
from common.model.checkpoint import architecture_metadata, is_torchscript
from common.model.clip import build_clip, freeze, resolve_pretrained
from common.model.prepare_weights import main
from server.preflight import preflight
from tests.conftest import REPO, pyproject_run_config

TINY = "pfedmma-tiny"


def _convert(*args: str) -> str:
    """Run the command; its printed report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def _features(model: open_clip.CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = open_clip.get_tokenizer(TINY)(["a photo of a red circle.", "a photo of a blue square."])
    return model.encode_image(images), model.encode_text(text)


def _assert_same_features(a: open_clip.CLIP, b: open_clip.CLIP) -> None:
    for x, y in zip(_features(a), _features(b), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.fixture(scope="module")
def source_model() -> nn.Module:
    """A QuickGELU tiny CLIP, as OpenAI's models are; frozen as build_clip's are, since torch's
    attention takes another (equally right, not bit-identical) path for trainable weights."""
    torch.manual_seed(3)
    model = open_clip.create_model(TINY, force_quick_gelu=True).eval()
    freeze(model)
    return model


@pytest.fixture(scope="module")
def converted(source_model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(source, written file, report) for the model's state dict in OpenAI's layout."""
    folder = tmp_path_factory.mktemp("weights")
    source, out = folder / "tiny-openai.pt", folder / "tiny.safetensors"
    torch.save(source_model.state_dict(), source)
    report = _convert("--source", str(source), "--format", "openai", "--model-name", TINY, "--out", str(out))
    return source, out, report


def test_an_openai_state_dict_is_written_with_its_architecture_recorded(
    converted: tuple[Path, Path, str], source_model: nn.Module
) -> None:
    source, out, report = converted
    assert f"{TINY}-quickgelu" not in open_clip.list_models()  # so the plain name is recorded, with the flag
    meta = _metadata(out)
    assert meta["model_name"] == TINY and meta["quick_gelu"] == "true"
    assert meta["source_file"] == "tiny-openai.pt" and meta["source_sha256"] == _sha256(source)
    assert meta["source_format"] == "openai" and meta["tag"] == "openai"
    assert meta["open_clip_version"] == open_clip.__version__
    state = source_model.state_dict()
    params = sum(p.numel() for p in source_model.parameters())
    for line in (f"wrote {out}", f"model-name  {TINY} (QuickGELU)", f"tensors     {len(state)}",
                 f"parameters  {params:,}", f"bytes       {out.stat().st_size:,}", f"sha256      {_sha256(out)}"):
        assert line in report
    assert out.stat().st_mode & 0o044 == 0o044  # readable by a container's other user
    assert not [p for p in out.parent.iterdir() if "partial" in p.name]


def test_the_loader_builds_the_recorded_activation_and_reproduces_the_source(
    converted: tuple[Path, Path, str], source_model: nn.Module
) -> None:
    _, out, _ = converted
    loaded = build_clip(TINY, str(out)).model
    assert any(isinstance(m, QuickGELU) for m in loaded.modules())
    _assert_same_features(loaded, source_model)
    # What the file route gave before: the config's GELU around the same weights, silently different.
    gelu = open_clip.create_model(TINY).eval()
    gelu.load_state_dict(source_model.state_dict())
    freeze(gelu)
    assert not torch.allclose(_features(gelu)[0], _features(source_model)[0])


def test_the_wrong_model_name_is_refused_naming_the_right_one(converted: tuple[Path, Path, str]) -> None:
    _, out, _ = converted
    with pytest.raises(CheckpointError) as err:
        build_clip("ViT-B-16", str(out))
    text = str(err.value)
    assert f"records that its weights are for model-name='{TINY}' (QuickGELU), not model-name='ViT-B-16'" in text
    assert text.endswith(f"Set model-name='{TINY}'")


def test_a_torchscript_archive_is_read_without_unpickling_and_converted(source_model: nn.Module, tmp_path: Path) -> None:
    archive = tmp_path / "tiny-jit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript for new exports
        torch.jit.script(source_model).save(str(archive))
    assert is_torchscript(archive)
    # Given to the run directly, it is refused with the way out (the loader never runs TorchScript).
    with pytest.raises(CheckpointError, match=r"TorchScript archive .*pfedmma-weights --source FILE --format openai"):
        build_clip(TINY, str(archive))
    out = tmp_path / "from-jit.safetensors"
    report = _convert("--source", str(archive), "--model-name", TINY, "--out", str(out))  # --format auto
    assert "TorchScript archive, openai format" in report
    meta = _metadata(out)
    assert (meta["model_name"], meta["quick_gelu"], meta["source_format"]) == (TINY, "true", "openai")
    _assert_same_features(build_clip(TINY, str(out)).model, source_model)


def test_a_quickgelu_model_name_is_recorded_where_open_clip_has_one(
    source_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ViT-B-16 has ViT-B-16-quickgelu; give the tiny model the same twin, for this test only.
    twin = f"{TINY}-quickgelu"
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, twin, {**open_clip.get_model_config(TINY), "quick_gelu": True})
    source, out = tmp_path / "tiny.pt", tmp_path / "tiny.safetensors"
    torch.save(source_model.state_dict(), source)
    report = _convert("--source", str(source), "--format", "openai", "--model-name", TINY, "--out", str(out))
    assert f"recorded as '{twin}', not '{TINY}': OpenAI's weights use QuickGELU" in report
    assert (_metadata(out)["model_name"], _metadata(out)["quick_gelu"]) == (twin, "true")
    with pytest.raises(CheckpointError) as err:
        build_clip(TINY, str(out))
    assert "its GELU blocks would load these QuickGELU weights without any error" in str(err.value)
    assert str(err.value).endswith(f"Set model-name='{twin}'")
    _assert_same_features(build_clip(twin, str(out)).model, source_model)


def _recorded(tmp_path: Path, model_name: str, quick_gelu: bool) -> Path:
    """A file that records an architecture; its one tensor is never read by these checks."""
    path = tmp_path / f"{model_name}-openai.safetensors"
    save_file({"logit_scale": torch.zeros(())}, str(path), metadata=architecture_metadata(model_name, quick_gelu))
    return path


def test_openai_weights_recorded_as_quickgelu_refuse_vit_b_16(tmp_path: Path) -> None:
    path = _recorded(tmp_path, "ViT-B-16-quickgelu", True)
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("ViT-B-16", str(path))
    assert str(err.value) == (
        f"pretrained={str(path)!r}: {path} records that its weights are for model-name='ViT-B-16-quickgelu' "
        "(QuickGELU), not model-name='ViT-B-16': its GELU blocks would load these QuickGELU weights without any "
        "error and compute wrong features. Set model-name='ViT-B-16-quickgelu'"
    )
    assert resolve_pretrained("ViT-B-16-quickgelu", str(path)) == (str(path), True)


def _cfg(**overrides: object) -> RunConfig:
    return RunConfig.from_flower({**pyproject_run_config(), **overrides})


def test_the_server_preflight_names_the_mismatch_when_it_has_the_file(tmp_path: Path) -> None:
    path = _recorded(tmp_path, "ViT-B-16-quickgelu", True)
    with pytest.raises(ConfigError) as err:
        preflight(_cfg(**{"model-name": "ViT-B-16", "pretrained": str(path)}), num_clients=None)
    assert "the run cannot start" in str(err.value) and "Set model-name='ViT-B-16-quickgelu'" in str(err.value)
    preflight(_cfg(**{"model-name": "ViT-B-16-quickgelu", "pretrained": str(path)}), num_clients=None)
    # A file only the clients have is theirs to check.
    absent = tmp_path / "on-the-clients-only" / "ViT-B-16-quickgelu-openai.safetensors"
    preflight(_cfg(**{"model-name": "ViT-B-16", "pretrained": str(absent)}), num_clients=None)


def test_a_file_without_a_recorded_architecture_loads_with_one_warning(
    source_model: nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in source_model.state_dict().items()}, str(path))
    with caplog.at_level(logging.WARNING, logger="common.model.clip"):
        build_clip(TINY, str(path))
        build_clip(TINY, str(path))
    warned = [r.getMessage() for r in caplog.records if "records no architecture" in r.getMessage()]
    assert len(warned) == 1
    assert f"model-name='{TINY}' (GELU)" in warned[0] and "pfedmma-weights" in warned[0]


class _Marker:
    """Creates a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.path, "w")


def test_a_pickled_object_is_refused_without_being_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "executed"
    zipped, plain = tmp_path / "zipped.pt", tmp_path / "plain.pt"
    torch.save({"visual.proj": _Marker(str(marker))}, zipped)
    plain.write_bytes(pickle.dumps({"visual.proj": _Marker(str(marker))}, protocol=2))
    for path in (zipped, plain):
        with pytest.raises(SystemExit) as exit_:
            main(["--source", str(path), "--format", "openai", "--model-name", TINY, "--out", str(tmp_path / "x.safetensors")])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--source {str(path)!r}: cannot read it as weights" in err and "never unpickled" in err
        assert "weights_only=False" not in err
    assert not marker.exists()
    assert not (tmp_path / "x.safetensors").exists()


def test_help_explains_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    flat = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for part in ("--source", "--format {auto,openai,open_clip}", "--model-name", "--out", "--tag", "QuickGELU",
                 "~/.cache/pfedmma/weights/<model-name>-<tag>.safetensors", "ViT-B-16-quickgelu"):
        assert "".join(part.split()) in flat


def test_a_bad_format_is_refused_naming_the_allowed_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--source", "ViT-B-16.pt", "--format", "onnx"])
    assert exit_.value.code == 2
    assert "invalid choice: 'onnx' (choose from 'auto', 'openai', 'open_clip')" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "is a state dict, which does not say whose weights it holds: pass --format openai"),
        (["--model-name", "pfedmma-tiyn"], "--model-name 'pfedmma-tiyn' is not an open_clip model name; did you mean 'pfedmma-tiny'"),
        (["--model-name", "ViT-B-16"], "does not fit model 'ViT-B-16': tensors missing from the file"),
        (["--model-name", TINY, "--out", "weights.pt"], "--out 'weights.pt': the file name must end in .safetensors"),
        (["--model-name", TINY, "--tag", "a b"], "--tag 'a b': use letters, digits"),
    ],
)
def test_bad_inputs_are_refused_naming_the_value(
    converted: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    source, _, _ = converted
    with pytest.raises(SystemExit) as exit_:
        main(["--source", str(source), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_an_existing_file_is_kept_unless_overwrite(converted: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    source, out, _ = converted
    before = _sha256(out)
    with pytest.raises(SystemExit):
        main(["--source", str(source), "--format", "openai", "--model-name", TINY, "--out", str(out)])
    assert f"--out {str(out)!r} exists; pass --overwrite" in capsys.readouterr().err
    assert _sha256(out) == before


def test_open_clip_weights_keep_their_config_activation_and_default_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    torch.manual_seed(5)
    gelu = open_clip.create_model(TINY).eval()
    freeze(gelu)
    source = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in gelu.state_dict().items()}, str(source))
    report = _convert("--source", str(source), "--model-name", TINY)  # --format auto: open_clip's
    out = tmp_path / "home" / ".cache" / "pfedmma" / "weights" / f"{TINY}-open_clip_model.safetensors"
    assert f"wrote {out}" in report and "open_clip format" in report
    meta = _metadata(out)
    assert (meta["model_name"], meta["quick_gelu"], meta["source_format"]) == (TINY, "false", "open_clip")
    loaded = build_clip(TINY, str(out)).model
    assert not any(isinstance(m, QuickGELU) for m in loaded.modules())
    _assert_same_features(loaded, gelu)


def test_the_command_is_installed_as_pfedmma_weights() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pfedmma-weights"] == "common.model.prepare_weights:main"


@pytest.mark.slow
def test_a_vit_b_16_torchscript_archive_becomes_vit_b_16_quickgelu(tmp_path: Path) -> None:
    """OpenAI's route at full size: fp16 archive, architecture and name inferred, output checked
    against open_clip's own OpenAI model. Random weights stand in for OpenAI's (about 30 s on CPU)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu").eval()
    open_clip.model.convert_weights_to_fp16(model)  # as OpenAI's archives hold them
    archive = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(archive))
    out = tmp_path / "ViT-B-16-quickgelu-openai.safetensors"
    report = _convert("--source", str(archive), "--out", str(out))
    assert "model-name  ViT-B-16-quickgelu (QuickGELU)" in report and "parameters  149,620,737" in report
    assert "computes what open_clip's OpenAI model" in report
    with pytest.raises(CheckpointError, match=r"Set model-name='ViT-B-16-quickgelu'$"):
        build_clip("ViT-B-16", str(out))
