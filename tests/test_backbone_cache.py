"""The per-node backbone cache: built once, then memory-mapped with identical outputs."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from common.model.clip import build_clip


def _features(model, size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(torch.ones(1, 3, size, size))


def test_second_build_maps_the_cache_and_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    source = build_clip("pfedmma-tiny", "").model
    checkpoint = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), checkpoint)
    cache = tmp_path / "cache"

    first = build_clip("pfedmma-tiny", str(checkpoint), cache_dir=cache).model
    (cached_file,) = cache.iterdir()

    calls: list[object] = []
    real_create = open_clip.create_model

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pretrained"))
        return real_create(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", spy)
    second = build_clip("pfedmma-tiny", str(checkpoint), cache_dir=cache).model
    assert calls == [None]  # no checkpoint read: the weights come from the mapped cache
    torch.testing.assert_close(_features(second), _features(source), rtol=0, atol=0)
    torch.testing.assert_close(_features(first), _features(source), rtol=0, atol=0)
    assert not any(p.requires_grad for p in second.parameters())
    assert sorted(p.name for p in cache.iterdir()) == [cached_file.name]  # no temp files left


def test_random_init_is_seeded_and_keyed_by_seed(tmp_path: Path) -> None:
    a = build_clip("pfedmma-tiny", "", init_seed=1).model
    torch.manual_seed(999)  # the global RNG must not matter
    b = build_clip("pfedmma-tiny", "", init_seed=1).model
    c = build_clip("pfedmma-tiny", "", init_seed=2, cache_dir=tmp_path).model
    d = build_clip("pfedmma-tiny", "", init_seed=1, cache_dir=tmp_path).model
    assert torch.equal(_features(a), _features(b)) and torch.equal(_features(a), _features(d))
    assert not torch.equal(_features(a), _features(c))
    assert len(list(tmp_path.iterdir())) == 2
