"""The presets in conf/: valid run configs, and the miniature is the app's default."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig
from server.compare.plan import PlanError, read_preset
from server.preflight import preflight
from tests.conftest import REPO, pyproject_run_config

PRESETS = sorted((REPO / "conf").glob("*.toml"))


def test_there_is_a_preset_per_paper_experiment() -> None:
    names = {p.stem for p in PRESETS}
    coop = {"caltech101", "oxford-pets", "oxford-flowers", "food101", "dtd", "sun397", "ucf101"}
    assert {f"base-to-novel-{d}" for d in coop} <= names
    assert {"miniature", "ci", "cifar100-dirichlet", "domainnet", "office-caltech10"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_is_a_valid_run_config_that_says_what_it_reproduces(path: Path) -> None:
    values = read_preset(path)
    assert set(values) <= set(pyproject_run_config())  # Flower refuses keys pyproject.toml lacks
    cfg = RunConfig.from_flower({**pyproject_run_config(), **values})
    assert path.read_text().startswith("# Preset:")
    if path.stem != "ci":
        assert "# Reproduces:" in path.read_text()
    if path.stem.startswith("base-to-novel-"):
        assert cfg.partition == "base-to-novel" and cfg.domains == ()
        assert (cfg.num_server_rounds, cfg.local_epochs, cfg.shots, cfg.learning_rate) == (50, 2, 16, 0.001)


PAPER_PRESETS = [p for p in PRESETS if p.stem not in ("miniature", "ci")]
OPENAI_WEIGHTS = "~/.cache/pfedmma/weights/ViT-B-16-quickgelu-openai.safetensors"


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=lambda p: p.stem)
def test_paper_presets_load_openai_weights_from_a_local_file_as_quickgelu(path: Path) -> None:
    # OpenAI's weights need QuickGELU (docs/paper.md section 1); the file is made offline by pfedmma-weights.
    cfg = RunConfig.from_flower({**pyproject_run_config(), **read_preset(path)})
    assert (cfg.model_name, cfg.pretrained) == ("ViT-B-16-quickgelu", OPENAI_WEIGHTS)
    text = path.read_text()
    assert "pfedmma-weights --source ViT-B-16.pt --format openai" in text and 'pretrained = "openai"' in text


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=lambda p: p.stem)
def test_paper_presets_pass_the_server_preflight_without_the_weights_file(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The clients have the weights (and the data); a server without them must not stop the run.
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = RunConfig.from_flower({**pyproject_run_config(), **read_preset(path)})
    assert not Path(cfg.pretrained).expanduser().exists()
    preflight(cfg, num_clients=None)


def test_the_miniature_preset_is_the_default_run_config() -> None:
    assert tomllib.loads((REPO / "conf" / "miniature.toml").read_text()) == pyproject_run_config()


def test_a_preset_must_be_flat_toml(tmp_path: Path) -> None:
    nested = tmp_path / "nested.toml"
    nested.write_text("[tool]\nseed = 1\n")
    with pytest.raises(PlanError, match="not run-config keys"):
        read_preset(nested)
    broken = tmp_path / "broken.toml"
    broken.write_text("seed = \n")
    with pytest.raises(PlanError, match="not valid TOML"):
        read_preset(broken)
    with pytest.raises(PlanError, match="no such file"):
        read_preset(tmp_path / "missing.toml")


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=lambda p: p.stem)
def test_paper_presets_list_every_key_so_no_miniature_default_leaks_in(path: Path) -> None:
    # Flower fills a missing key from pyproject.toml, i.e. from the miniature.
    assert set(read_preset(path)) == set(pyproject_run_config())


def test_the_configuration_reference_documents_every_key() -> None:
    """docs/config.md is the reference the README points to: every run-config and node-config key is in it."""
    from common.config import NodeConfig

    text = (REPO / "docs" / "config.md").read_text()
    documented = set(re.findall(r"`([a-z0-9]+(?:-[a-z0-9]+)+|[a-z]+)`", text))
    run_keys = {name.replace("_", "-") for name in RunConfig.model_fields}
    node_keys = {name.replace("_", "-") for name in NodeConfig.model_fields} | {
        "warm-worker", "warm-worker-dir", "warm-worker-idle", "warm-worker-gpu-idle"}  # read by client.warm
    assert not run_keys - documented, f"run-config keys missing from docs/config.md: {sorted(run_keys - documented)}"
    assert not node_keys - documented, f"node-config keys missing from docs/config.md: {sorted(node_keys - documented)}"
