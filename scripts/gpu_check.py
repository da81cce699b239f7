"""Everything the GPU path needs checked, in one run that prints and writes a report.

    bash scripts/gpu_check.sh                       # on a GPU machine: at most 10 minutes on one GPU
    bash scripts/gpu_check.sh --device cpu --quick  # every part on the CPU in a few minutes (CI)

Parts (each a line in the report, ``ok`` or ``FAILED``):

1. environment: torch, CUDA, the GPU, its compute capability, native bf16;
2. CPU-fp32 parity of every method's logits and adapter gradients on the device, in fp32 without
   TF32 (relative difference <= 1e-4) and under the ClientApp's autocast (argmax agreement);
3. one train and one evaluate message per method through the ClientApp, amp on and off (on a CPU
   both are fp32: one run): seconds, the dtype the client reports, peak GPU memory;
4. peak memory of one pFedMMA training step, ViT-B/16 at batch 32 with C = 50 and C = 500 classes
   (quick: the tiny CLIP);
5. ``scripts/bench_step.py --batch 32`` (quick: the tiny CLIP at C = 10);
6. a 2-round ``flwr run`` simulation with 4 clients at 0.25 GPU each, every client's device read
   back from metrics.jsonl;
7. the warm worker serving a train message on the device.

``scripts/gpu_check.sh`` then runs ``pytest -m gpu``. The report is ``OUT/gpu-check.json`` and
``OUT/gpu-check.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from common.device import configure_determinism, native_bf16, precision, simulation_resources
from common.methods import METHODS

Report = dict[str, Any]


def environment(device: torch.device) -> Report:
    info: Report = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                    "cpus": os.cpu_count(), "device": str(device), "cuda-available": torch.cuda.is_available()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(gpu=torch.cuda.get_device_name(device), capability=f"{major}.{minor}", gpus=torch.cuda.device_count(),
                    memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                    native_bf16=native_bf16(device), amp_dtype=precision(device, True).name)
    return {"ok": True, **info}


def _amp_settings(device: torch.device) -> tuple[bool, ...]:
    """amp on and off; on a CPU both are fp32 (common.device.precision), so one is enough."""
    return (False, True) if device.type == "cuda" else (False,)


def parity(device: torch.device) -> Report:
    from tests.gpu_parity import check

    rows = [check(name, device, amp).row() for name in METHODS for amp in _amp_settings(device)]
    return {"ok": all(r["ok"] for r in rows), "rows": rows}


def messages(device: torch.device, work_dir: Path) -> Report:
    """A train and an evaluate message per method through ``client.work``, as a node runs them."""
    from client import work
    from common.arrays import to_record
    from common.config import RunConfig
    from common.methods import method_for
    from common.model.roles import Role
    from tests.conftest import pyproject_run_config
    from tests.flower_messages import context, instruction
    from tests.gpu_parity import experts

    rows = []
    for name in METHODS:
        for amp in _amp_settings(device):
            config = {**pyproject_run_config(), "method": name, "amp": amp, "local-epochs": 1,
                      "state-dir": str(work_dir / f"state-{name}-{amp}")}
            method = method_for(RunConfig.from_flower(config))
            shared = method.initial_state()[Role.SHARED]
            ctx = context(config, 0)
            for kind in ("train", "evaluate") if method.trains else ("evaluate",):
                msg = instruction(shared, kind, 1, node_id=ctx.node_id)
                for record, tensors in experts(method).items():
                    msg.content[record] = to_record(tensors)
                started = time.perf_counter()
                reply = work.handle(msg, ctx)
                seconds = time.perf_counter() - started
                reported = dict(reply.content.config_records.get("device", {})) if not reply.has_error() else {}
                ok = not reply.has_error() and reported.get("type") == device.type
                rows.append({"method": name, "amp": amp, "kind": kind, "seconds": round(seconds, 2), "ok": ok,
                             "dtype": reported.get("dtype"), "peak-memory-mb": reported.get("peak-memory-mb"),
                             "error": reply.error.reason if reply.has_error() else None})
    return {"ok": all(r["ok"] for r in rows), "rows": rows}


def step_memory(device: torch.device, quick: bool) -> Report:
    """Peak memory of one pFedMMA training step (forward, backward, SGD step) at batch 32."""
    from common.config import RunConfig
    from common.methods import StepInputs, method_for
    from common.model.clip import build_clip

    model_name = "pfedmma-tiny" if quick else "ViT-B-16"
    blocks = (2, 4) if quick else (5, 12)
    rows = []
    for classes in (50, 500):
        cfg = RunConfig.from_flower({"model-name": model_name, "pretrained": "", "adapter-start": blocks[0],
                                     "adapter-end": blocks[1], "method": "pfedmma"})
        method = method_for(cfg)
        bundle = build_clip(cfg.model_name, "", device, init_seed=0)
        method.attach(bundle.model)
        for role, tensors in method.initial_state().items():
            method.roles.load(bundle.model, role, {k: v.to(device) for k, v in tensors.items()})
        names = [f"class number {i}" for i in range(classes)]
        classifier = method.classifier(bundle.model, bundle.tokenizer, names, device, StepInputs())
        optimizer = method.optimizer(bundle.model)
        chosen = precision(device, True)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(32, 3, bundle.image_size, bundle.image_size, generator=gen).to(device)
        labels = torch.randint(0, classes, (32,), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        classifier.set_training(True)
        with chosen.autocast(device):
            loss, _ = classifier.loss(images, labels)
        scaler = chosen.scaler(device)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows.append({"model": model_name, "classes": classes, "batch": 32, "dtype": chosen.name,
                     "step-seconds": round(time.perf_counter() - started, 3),
                     "peak-gpu-memory-mb": round(peak, 1) if peak is not None else None,
                     "process-max-rss-mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                     "ok": bool(torch.isfinite(loss).item())})
        del classifier, optimizer, bundle
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"ok": all(r["ok"] for r in rows), "rows": rows}


def bench_step(device: torch.device, quick: bool) -> Report:
    command = [sys.executable, str(REPO / "scripts" / "bench_step.py"), "--batch", "32", "--device", str(device)]
    if quick:
        command += ["--models", "pfedmma-tiny", "--classes", "10", "--repeats", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"ok": done.returncode == 0 and bool(lines) and lines[-1].startswith("speed-up"), "command": " ".join(command[1:]),
            "output": lines[-12:], "stderr": done.stderr[-2000:] if done.returncode else ""}


def simulation(device: torch.device, work_dir: Path) -> Report:
    """`flwr run` with 4 clients, each at the automatic GPU share (0.25 on one GPU)."""
    from tests.local_superlink import flwr_run, stop_processes_under

    home, runs = work_dir / "flwr-home", work_dir / "runs"
    home.mkdir()
    config = (f"num-server-rounds=2 local-epochs=1 shots=4 test-per-class=2 output-dir='{runs}' "
              f"state-dir='{work_dir / 'sim-state'}'")
    try:
        done = flwr_run(home, config, supernodes=4, timeout=900)
    finally:
        stop_processes_under(home)
    found = sorted(runs.rglob("metrics.jsonl"))
    rows = [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()] if found else []
    devices = {client: d.get("type") for row in rows for client, d in row.get("device", {}).items()}
    ok = len(rows) == 2 and len(devices) == 4 and set(devices.values()) == {device.type}
    return {"ok": ok, "federation": f"num-supernodes=4 {simulation_resources(4)}".strip(), "rounds": len(rows),
            "devices": {c: rows[-1]["device"][c] for c in sorted(rows[-1]["device"])} if rows else {},
            "output": (done.stdout + done.stderr)[-1500:] if not ok else ""}


def warm_worker(device: torch.device, work_dir: Path) -> Report:
    from flwr.app import Context, RecordDict

    from client import warm
    from common.config import RunConfig
    from common.methods import method_for
    from common.model.roles import Role
    from tests.conftest import pyproject_run_config
    from tests.flower_messages import instruction

    config = {**pyproject_run_config(), "state-dir": str(work_dir / "warm-state"), "local-epochs": 1}
    node: dict[str, bool | float | int | str] = {"partition-id": 0, "num-partitions": 3,
                                                  "warm-worker-dir": str(work_dir / "warm"), "warm-worker-idle": 10}
    ctx = Context(run_id=7, node_id=100, node_config=node, state=RecordDict(), run_config=config)
    shared = method_for(RunConfig.from_flower(config)).initial_state()[Role.SHARED]
    started = time.perf_counter()
    reply = warm.handle(instruction(shared, "train", 1, node_id=100), ctx)
    seconds = time.perf_counter() - started
    reported = dict(reply.content.config_records.get("device", {})) if reply is not None and not reply.has_error() else {}
    return {"ok": reported.get("type") == device.type, "seconds": round(seconds, 2), "device": reported}


def _markdown(report: Report) -> str:
    lines = [f"# GPU check ({report['environment'].get('gpu', report['environment']['device'])})", ""]
    for part, result in report.items():
        lines.append(f"## {part}: {'ok' if result.get('ok') else 'FAILED'}")
        rows = result.get("rows")
        if rows:
            keys = list(rows[0])
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows]
        else:
            lines += ["", "```", json.dumps({k: v for k, v in result.items() if k != "ok"}, indent=2), "```"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny CLIP everywhere: minutes on a CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--skip", default="", help="comma list of parts to leave out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    configure_determinism(False)
    args.out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    parts: dict[str, Callable[[], Report]] = {
        "environment": lambda: environment(device),
        "parity": lambda: parity(device),
        "messages": lambda: messages(device, work_dir),
        "step-memory": lambda: step_memory(device, args.quick),
        "bench-step": lambda: bench_step(device, args.quick),
        "simulation": lambda: simulation(device, work_dir),
        "warm-worker": lambda: warm_worker(device, work_dir),
    }
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    report: Report = {}
    for name, part in parts.items():
        if name in skipped:
            continue
        started = time.monotonic()
        try:
            result = part()
        except Exception as err:  # noqa: BLE001 - one broken part must not hide the others' figures
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        result["seconds"] = round(time.monotonic() - started, 1)
        report[name] = result
        print(f"[gpu-check] {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", flush=True)
        (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu-check.md").write_text(_markdown(report))
    print(_markdown(report), flush=True)
    failed = [name for name, result in report.items() if not result["ok"]]
    print(f"[gpu-check] {'FAILED: ' + ', '.join(failed) if failed else 'all parts ok'}; report in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
