"""Bad config, bad data and failing clients are named early, at the boundary where they occur.

Unit level: dataset-specific options, the ServerApp's checks before round 1, and the client's
error replies that the server reads as permanent. tests/test_fail_early_e2e.py runs the same
situations through `flwr run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import evaluate_handler, train_handler
from common.arrays import to_record
from common.config import ConfigError, RunConfig
from common.data.federated import client_data
from common.data.registry import resolve_domains
from common.errors import PERMANENT_ERROR_CODE
from common.methods import method_for
from common.model.roles import Role
from server.preflight import preflight
from tests.conftest import pyproject_run_config
from tests.test_datasets import make_coop


def _cfg(**overrides: object) -> RunConfig:
    return RunConfig.from_flower({**pyproject_run_config(), **overrides})


# -- dataset-specific options -----------------------------------------------------------------


def test_a_coop_dataset_runs_with_the_default_config(tmp_path: Path) -> None:
    """The app's default `dataset-domains` (the miniature's) must not leak into other datasets."""
    make_coop(tmp_path, "oxford_pets")
    cfg = _cfg(**{"dataset": "oxford_pets", "data-dir": str(tmp_path), "shots": 0, "min-available-nodes": 2})
    data = client_data(cfg, 0, 1, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert len(data.train) > 0 and "novel" in data.evals


def test_domains_default_per_dataset() -> None:
    assert resolve_domains("shapes", ()) == ("striped",)  # the miniature's style
    assert resolve_domains("office_caltech10", ()) == ("amazon", "caltech", "dslr", "webcam")
    assert resolve_domains("shapes", ("all",)) == ("solid", "outline", "striped", "noisy")
    assert resolve_domains("oxford_pets", ()) == ()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset": "oxford_pets", "dataset-domains": "striped"}, "dataset-domains='striped': dataset 'oxford_pets' has no domains; leave dataset-domains empty"),
        ({"dataset": "domainnet", "dataset-domains": "clipart,cartoon"}, "dataset-domains='clipart,cartoon': unknown ['cartoon'] for dataset 'domainnet'; valid: clipart, infograph"),
        ({"dataset-domains": "solid,solid"}, "dataset-domains='solid,solid': repeated names"),
    ],
)
def test_bad_domains_name_the_key_the_value_and_what_is_valid(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(**overrides)
    assert message in str(err.value)


# -- the ServerApp's checks before round 1 ----------------------------------------------------


def test_preflight_passes_the_default_run() -> None:
    preflight(_cfg(), num_clients=4)


def test_adapter_range_beyond_the_model_depth_is_refused_before_round_1() -> None:
    with pytest.raises(ConfigError) as err:
        preflight(_cfg(**{"adapter-end": 99}), num_clients=4)
    text = str(err.value)
    assert "adapter-end=99" in text and "the model's towers have 4 text and 4 image blocks" in text


def test_an_unknown_model_or_pretrained_tag_is_refused_before_round_1() -> None:
    with pytest.raises(ConfigError, match="model-name='ViT-Q-99' is unknown"):
        preflight(_cfg(**{"model-name": "ViT-Q-99"}), num_clients=2)
    with pytest.raises(ConfigError, match="pretrained='laion-nonsense' is not a tag of model 'pfedmma-tiny'"):
        preflight(_cfg(pretrained="laion-nonsense"), num_clients=2)


def test_more_clients_than_base_classes_is_refused_before_round_1(tmp_path: Path) -> None:
    make_coop(tmp_path, "dtd")  # 3 classes: 1 base, 2 novel
    cfg = _cfg(**{"dataset": "dtd", "data-dir": str(tmp_path), "shots": 0})
    preflight(cfg, num_clients=1)
    with pytest.raises(ConfigError) as err:
        preflight(cfg, num_clients=3)
    assert "dataset 'dtd', partition 'base-to-novel' with 3 clients" in str(err.value)


def test_an_invalid_split_file_is_refused_before_round_1_when_the_server_can_read_it(tmp_path: Path) -> None:
    make_coop(tmp_path, "dtd")
    split = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_text("{not json")
    with pytest.raises(ConfigError) as err:
        preflight(_cfg(**{"dataset": "dtd", "data-dir": str(tmp_path), "shots": 0}), num_clients=1)
    assert f"split file {split} is not valid JSON" in str(err.value)


def test_data_the_server_cannot_see_is_left_to_the_clients(tmp_path: Path) -> None:
    preflight(_cfg(**{"dataset": "dtd", "data-dir": str(tmp_path / "only-on-the-nodes")}), num_clients=2)


# -- the client's permanent error replies -----------------------------------------------------


def _message(cfg: RunConfig, kind: str) -> Message:
    shared = method_for(cfg).initial_state()[Role.SHARED]
    content = RecordDict({"arrays": to_record(shared), "config": ConfigRecord({"server-round": 1})})
    kind_ = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    return Message(content=content, message_type=kind_, dst_node_id=1)


def _context(run_config: dict, partition_id: int = 1) -> Context:
    return Context(
        run_id=7, node_id=1, node_config={"partition-id": partition_id, "num-partitions": 2},
        state=RecordDict(), run_config=run_config,
    )


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"dataset": "dtd", "data-dir": "/nonexistent/data"}, "DatasetError: data directory /nonexistent/data for dataset 'dtd' does not exist"),
        ({"pretrained": "/nonexistent/weights.safetensors"}, "pretrained='/nonexistent/weights.safetensors'"),
    ],
)
def test_a_client_replies_a_permanent_error_naming_itself_and_the_problem(
    run_config: dict, overrides: dict, named: str
) -> None:
    run_config = {**run_config, **overrides}
    cfg = RunConfig.from_flower(run_config)
    for handler, kind in ((train_handler, "train"), (evaluate_handler, "evaluate")):
        reply = handler(_message(cfg, kind), _context(run_config))
        assert reply.has_error() and reply.error.code == PERMANENT_ERROR_CODE
        assert reply.error.reason.startswith("client 1: ") and named in reply.error.reason
        assert "\n" not in reply.error.reason  # one line per client in the summary


@pytest.mark.usefixtures("server_task_identity")
def test_an_unreadable_private_state_is_a_permanent_error_with_the_path(run_config: dict, tmp_path: Path) -> None:
    run_config = {**run_config, "experiment-name": "exp"}
    cfg = RunConfig.from_flower(run_config)
    path = Path(run_config["state-dir"]) / "exp" / "client-1.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # truncated
    reply = train_handler(_message(cfg, "train"), _context(run_config))
    assert reply.has_error() and reply.error.code == PERMANENT_ERROR_CODE
    assert str(path) in reply.error.reason


def test_summary_of_a_failed_run_is_machine_readable(tmp_path: Path) -> None:
    """What tests/test_fail_early_e2e.py and the compare command read from summary.json."""
    from server.compare.runner import _failure

    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "failure": {"round": 1, "reason": "r", "clients": {"client 0": "DatasetError: x"}}}))
    assert _failure(tmp_path) == "r (client 0: DatasetError: x)"
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert _failure(tmp_path) is None

