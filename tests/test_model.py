"""Building the frozen CLIP from a (model name, pretrained) pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.errors import CheckpointError
from common.model.clip import build_clip, resolve_pretrained


def test_pretrained_file_path_loads_identical_weights(tmp_path: Path) -> None:
    torch.manual_seed(123)
    source = build_clip("pfedmma-tiny", "").model
    checkpoint = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), checkpoint)

    loaded = build_clip("pfedmma-tiny", str(checkpoint)).model  # the path users take
    images, text = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), source.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(text), source.encode_text(text), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen, logit_scale included


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"model-name='ViT-Q-99' is unknown; valid names: \[.*'pfedmma-tiny'.*'ViT-B-16'"):
        build_clip("ViT-Q-99", "")


def test_unknown_tag_lists_valid_tags_and_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pretrained='opneai' is not a tag of model 'ViT-B-16'; valid tags: \[.*'openai'"):
        build_clip("ViT-B-16", "opneai")
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        build_clip("pfedmma-tiny", str(missing))


def test_openai_weights_get_quick_gelu() -> None:
    # OpenAI CLIP was trained with QuickGELU (docs/paper.md §1); the tag must switch it on.
    assert resolve_pretrained("ViT-B-16", "openai") == ("openai", True)
    assert resolve_pretrained("ViT-B-16-quickgelu", "openai") == ("openai", False)
    assert resolve_pretrained("ViT-B-16", "") == (None, False)


def test_bundled_checkpoint_is_found_on_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower runs the app from an unpacked bundle without weights; the installed project has them.
    torch.manual_seed(7)
    source = build_clip("pfedmma-tiny", "").model
    weights = tmp_path / "site" / "common" / "weights"
    weights.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights / "unit-test-tiny.safetensors"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    loaded = build_clip("pfedmma-tiny", "unit-test-tiny").model
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), source.encode_image(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="a bundled checkpoint name"):
        build_clip("pfedmma-tiny", "no-such-bundled-name")
