"""Device, precision and determinism choices (common.device), what the server keeps of a client's
device report, the bounded wait for nodes, and how simulations get their GPU share."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from client.trainer import train
from common import device as dev
from common.config import RunConfig
from common.methods import StepInputs, method_for
from server.compare.cli import federation_size, parse_args
from server.compare.plan import PlanError
from server.compare.runner import Target
from server.node_wait import NodesMissing, wait_for_nodes
from server.validation import device_info
from tests.conftest import REPO
from tests.gpu_parity import FP32_TOLERANCE, Parity


def test_a_client_that_sees_gpu_hardware_but_was_given_none_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_WARNED", set())
    monkeypatch.setattr(dev, "gpu_hardware_visible", lambda: False)
    with caplog.at_level(logging.WARNING, logger="common.device"):
        assert dev.pick_device() == torch.device("cpu")
    assert not caplog.records  # a CPU machine: nothing to say
    monkeypatch.setattr(dev, "gpu_hardware_visible", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray sets for a client with num_gpus = 0
    with caplog.at_level(logging.WARNING, logger="common.device"):
        assert dev.pick_device() == torch.device("cpu")
    (record,) = caplog.records
    assert "was given none" in record.getMessage() and "client-resources-num-gpus" in record.getMessage()
    with pytest.raises(ValueError, match="expected 'auto', 'cpu' or 'cuda"):
        dev.pick_device("tpu")


def test_precision_is_bf16_where_native_fp16_with_a_scaler_elsewhere_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dev.precision(cpu, True) == dev.FP32 and dev.precision(cuda, False) == dev.FP32
    monkeypatch.setattr(dev, "native_bf16", lambda device: True)  # A100, H100, L4 ...
    assert (dev.precision(cuda, True).name, dev.precision(cuda, True).autocast_dtype, dev.precision(cuda, True).scaled) == (
        "bf16", torch.bfloat16, False)
    monkeypatch.setattr(dev, "native_bf16", lambda device: False)  # T4, V100: bf16 only emulated
    chosen = dev.precision(cuda, True)
    assert (chosen.name, chosen.autocast_dtype, chosen.scaled) == ("fp16", torch.float16, True)
    assert chosen.scaler(cpu).is_enabled() and not dev.FP32.scaler(cpu).is_enabled()


def test_the_fp16_path_trains_through_its_grad_scaler(tiny_cfg: RunConfig) -> None:
    """The GradScaler path of client.trainer.train, run on the CPU's fp16 autocast."""
    method = method_for(tiny_cfg)
    from client.runtime import shared_model

    bundle = shared_model(tiny_cfg, torch.device("cpu"))
    model = bundle.model
    for role, tensors in method.initial_state().items():
        method.roles.load(model, role, tensors)
    classifier = method.classifier(model, bundle.tokenizer, ["a", "b"], "cpu", StepInputs(generator=torch.Generator().manual_seed(0)))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1] * 4)
    fp16 = dev.Precision("fp16", torch.float16, True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)
    result = train(classifier, loader, method.optimizer(model), 1, torch.device("cpu"), fp16)
    assert result.num_examples == 8 and torch.isfinite(torch.tensor(result.loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert changed  # the scaled step reached the optimiser (unscaled: finite, applied)


def test_determinism_flags_are_set_both_ways() -> None:
    try:
        dev.configure_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.deterministic
    finally:
        dev.configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cuda.matmul.allow_tf32


def test_the_cpu_device_report(monkeypatch: pytest.MonkeyPatch) -> None:
    report = dev.device_report(torch.device("cpu"), dev.FP32, False)
    assert (report["type"], report["dtype"], report["name"], report["peak-memory-mb"]) == ("cpu", "fp32", "cpu", 0.0)
    ConfigRecord(dict(report))  # only what a ConfigRecord carries
    monkeypatch.setattr(dev, "gpu_hardware_visible", lambda: True)
    assert dev.device_report(torch.device("cpu"), dev.FP32, False)["gpus-unused"] is True


def test_the_run_output_warns_about_clients_that_left_their_gpus_unused(capsys: pytest.CaptureFixture[str]) -> None:
    from server.progress import RoundReporter

    reporter = RoundReporter.__new__(RoundReporter)
    reporter.warned_gpus = set()
    reporter._warn_unused_gpus({0: {"type": "cpu", "gpus-unused": True}, 1: {"type": "cuda"}})
    reporter._warn_unused_gpus({0: {"type": "cpu", "gpus-unused": True}})  # said once per client
    out = capsys.readouterr().out
    assert out.count("WARNING: client(s) 0 run on the CPU although their machine has GPUs") == 1


@pytest.mark.parametrize(("clients", "gpus", "share"), [(4, 1, 0.25), (2, 1, 0.5), (1, 1, 1.0), (10, 1, 0.25), (8, 2, 0.25), (2, 4, 1.0), (3, 0, 0.0)])
def test_the_automatic_gpu_share(clients: int, gpus: int, share: float) -> None:
    assert dev.gpus_per_client(clients, gpus) == share
    if gpus:
        assert 1 / share <= dev.CLIENTS_PER_GPU


def test_the_simulation_resources() -> None:
    assert dev.simulation_resources(4, gpus=0.25) == "client-resources-num-gpus=0.25"
    assert dev.simulation_resources(4, gpus=0.0, cpus=2) == "client-resources-num-cpus=2"


def test_a_clients_device_report_is_bounded_before_it_is_recorded() -> None:
    forged = ConfigRecord({
        "type": "cuda", "dtype": "bf16", "name": "H200\n[pfedmma] round 5/5 forged" + "x" * 10_000,
        "peak-memory-mb": 1234.5, "total-memory-mb": float("inf"), "deterministic": True, "secret": "ignored",
    })
    info = device_info(forged)
    assert set(info) == {"type", "dtype", "name", "peak-memory-mb", "deterministic"}  # inf and unknown keys dropped
    assert device_info(ConfigRecord({"gpus-unused": True, "name": 5})) == {"gpus-unused": True}
    assert "\n" not in str(info["name"]) and len(str(info["name"])) == 64
    assert info["peak-memory-mb"] == 1234.5
    assert device_info(ConfigRecord({"peak-memory-mb": -1.0})) == {} and device_info(None) == {}


class _Grid:
    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def get_node_ids(self) -> list[int]:
        return list(range(10, 10 + (self.counts.pop(0) if len(self.counts) > 1 else self.counts[0])))


def test_the_wait_for_nodes_returns_once_enough_connect_and_gives_up_naming_the_setting() -> None:
    clock = iter(range(10_000))
    lines: list[str] = []
    nodes = wait_for_nodes(_Grid([0, 1, 3]), 3, timeout=60, say=lines.append, clock=lambda: float(next(clock)), sleep=lambda s: None)
    assert nodes == [10, 11, 12]
    clock = iter(range(0, 10_000, 10))
    with pytest.raises(NodesMissing) as err:
        wait_for_nodes(_Grid([2]), 10, timeout=120, say=lines.append, clock=lambda: float(next(clock)), sleep=lambda s: None)
    text = str(err.value)
    assert "2 of min-available-nodes=10" in text and "node-wait-timeout=120 s" in text and "10, 11" in text
    assert any("waiting for nodes: 2 of min-available-nodes=10" in line for line in lines)  # progress while waiting


def test_compare_takes_the_node_count_from_the_preset_and_refuses_too_few(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = REPO / "conf" / "base-to-novel-oxford-pets.toml"
    monkeypatch.setattr(dev, "gpus_per_client", lambda n, gpu_count=None: 0.25)  # as on a one-GPU machine
    args = parse_args(["--preset", str(preset)])
    assert "10 clients, 0.25 GPU each" in federation_size(args, {"min-available-nodes": 10, "min-train-nodes": 10})
    assert args.supernodes == 10 and args.gpus_per_client == 0.25
    args = parse_args(["--preset", str(preset), "--supernodes", "4"])
    with pytest.raises(PlanError, match="below the preset's min-available-nodes=10"):
        federation_size(args, {"min-available-nodes": 10})
    args = parse_args(["--preset", str(REPO / "conf" / "miniature.toml"), "--gpus-per-client", "0"])
    assert federation_size(args, {"min-available-nodes": 2}) == "simulation, 4 clients, CPU only"


def test_the_simulation_command_carries_the_gpu_share(tmp_path: Path) -> None:
    from server.compare.plan import plan_runs

    (run,) = plan_runs(tmp_path, {"seed": 0}, ["pfedmma"], [0], {})
    command = Target(REPO, supernodes=10, gpus_per_client=0.25).command(run, tmp_path / "runs", tmp_path / "state")
    assert command[command.index("--federation-config") + 1] == "num-supernodes=10 client-resources-num-gpus=0.25"
    cpu = Target(REPO, supernodes=4).command(run, tmp_path / "runs", tmp_path / "state")
    assert cpu[cpu.index("--federation-config") + 1] == "num-supernodes=4"


def test_a_parity_result_outside_its_bound_is_not_ok() -> None:
    assert Parity("pfedmma", "cuda", "fp32", FP32_TOLERANCE / 2, FP32_TOLERANCE / 2, 1.0).ok()
    assert not Parity("pfedmma", "cuda", "fp32", 10 * FP32_TOLERANCE, 0.0, 1.0).ok()
    assert not Parity("pfedmma", "cuda", "bf16", 0.5, None, 0.5).ok()


def test_a_simulated_client_is_held_to_its_gpu_share_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    calls: list[tuple[float, object]] = []
    ray = types.SimpleNamespace(
        is_initialized=lambda: True,
        get_runtime_context=lambda: types.SimpleNamespace(get_assigned_resources=lambda: {"GPU": 0.25, "CPU": 2.0}),
    )
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(dev, "_BOUNDED", set())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, device: calls.append((share, device)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a GPU")
    assert dev.bound_gpu_share(torch.device("cpu")) is None and not calls
    assert dev.bound_gpu_share(torch.device("cuda:0")) == 0.25
    assert calls == [(0.25, torch.device("cuda:0"))]
    assert dev.bound_gpu_share(torch.device("cuda:0")) is None and len(calls) == 1  # once per process
    monkeypatch.delitem(sys.modules, "ray")
    assert dev.assigned_gpu_share() is None  # outside a simulation: the whole card
