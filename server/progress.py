"""End-of-round bookkeeping: one printed line, one metrics row, one global checkpoint;
and at the end the evaluation tables (docs/paper.md §4) of the selected round."""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from common.arrays import from_record
from common.metrics import per_domain_means, summarize
from server.round_stats import client_order, merge_device
from server.run_dir import RunDirectory
from server.strategies import SharedFedAvg


class RunFailed(RuntimeError):
    """The run stops after ``server_round``: ``reason``, and per client what went wrong."""

    def __init__(self, server_round: int, reason: str, clients: dict[str, str]) -> None:
        super().__init__(f"run failed after round {server_round}: {reason}; see summary.json")
        self.server_round, self.reason, self.clients = server_round, reason, dict(clients)


class RoundReporter:
    """Called by the strategy loop after each round (as its ``evaluate_fn``)."""

    def __init__(
        self,
        strategy: SharedFedAvg,
        run_dir: RunDirectory,
        num_rounds: int,
        model_selection: str = "last",
        history: list[dict[str, Any]] | None = None,
        method: dict[str, Any] | None = None,
    ) -> None:
        self.method = dict(method or {})  # the run's method.json record
        self.strategy = strategy
        self.run_dir = run_dir
        self.num_rounds = num_rounds
        self.model_selection = model_selection
        self.started = self.last = time.monotonic()
        self.history: list[dict[str, Any]] = list(history or [])  # rounds completed before a resume
        self.warned_gpus: set[int] = set()

    def end_round(self, loop_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if loop_round == 0:  # the state before the first round of this process
            if self.strategy.round_offset == 0:
                self.run_dir.save_global(0, from_record(arrays))
            return None
        server_round = self.strategy.real_round(loop_round)
        self.run_dir.save_server_state(server_round, *self.strategy.server_state())
        self.run_dir.save_global(server_round, from_record(arrays))
        now = time.monotonic()
        stats = self.strategy.stats(server_round)
        summary = summarize(stats.counted) if stats.counted else {}
        row = {
            "round": server_round,
            "method": self.method.get("method"),
            "train-loss": stats.train_metrics.get("train-loss"),
            "train-accuracy": stats.train_metrics.get("train-accuracy"),
            "local-accuracy": summary.get("local"),
            "full-eval": stats.full_eval,
            "evaluation": {k: v for k, v in summary.items()},
            "per-client": {str(c): v for c, v in sorted(stats.evaluation.items())},
            "clients-in-mean": len(stats.counted),
            "skipped-images": {str(c): n for c, n in sorted(stats.skipped_images.items())},
            "excluded": {str(c): why for c, why in sorted(stats.excluded.items())},
            "permanent-errors": dict(sorted(stats.permanent.items())),
            "domains": {str(c): d for c, d in sorted(stats.domains.items())},
            # Where each client ran (type, GPU name, dtype, peak memory): common.device.device_report.
            "device": {str(c): d for c, d in sorted(stats.devices.items())},
            "per-domain-local": per_domain_means(stats.evaluation, stats.domains) if stats.domains else {},
            "private-source": {str(c): v for c, v in sorted(stats.private_sources.items())},
            "sampled": stats.sampled_train,
            "valid-replies": stats.valid,
            "rejected-replies": len(stats.rejected),
            "rejections": dict(stats.rejected),
            "bytes-received": stats.bytes_received,
            # Tensor values each client received (train + evaluate instructions) and sent back.
            "communication": self.strategy.communication(server_round),
            **self.strategy.round_record(server_round),
            "seconds": round(now - self.last, 2),
        }
        self.last = now
        self.history.append(row)
        self.run_dir.append_round(row)
        print(_progress_line(row, self.num_rounds), flush=True)
        self._warn_unused_gpus(stats.devices)
        failure = self.strategy.round_failure(server_round)
        if failure is not None:
            clients = dict(stats.permanent) or {f"node {k.split('#')[0]}": v for k, v in stats.rejected.items()}
            raise RunFailed(server_round, failure, clients)
        return None

    def _warn_unused_gpus(self, devices: dict[int, dict[str, Any]]) -> None:
        """Once per client: it trains on the CPU although its machine has GPUs (common.device)."""
        new = sorted(c for c, d in devices.items() if d.get("gpus-unused") and c not in self.warned_gpus)
        if new:
            self.warned_gpus.update(new)
            print(f"[pfedmma] WARNING: client(s) {', '.join(map(str, new))} run on the CPU although their machine has "
                  "GPUs: give simulated clients a share (--federation-config \"... client-resources-num-gpus=0.25\"), "
                  "or a deployment's clientapp a GPU", flush=True)

    def selected_round(self) -> int | None:
        """The round whose results are reported: the last full evaluation, or best mean val accuracy."""
        candidates = [r for r in self.history if r["full-eval"] and r["evaluation"]]
        if not candidates:
            return None
        if self.model_selection == "val":
            best = max(candidates, key=lambda r: (r["evaluation"].get("val", -1.0), r["round"]))
            return int(best["round"])
        return int(candidates[-1]["round"])

    def finish(self, failed: RunFailed | None = None) -> dict[str, Any]:
        """Write summary.json (and, for a run that succeeded, the evaluation tables); print the final line."""
        chosen = self.selected_round() if failed is None else None
        final: dict[str, Any] = {}
        if chosen is not None:
            row = next(r for r in self.history if r["round"] == chosen)
            per_client = {int(c): v for c, v in row["per-client"].items()}
            domains = {int(c): d for c, d in row.get("domains", {}).items()}
            excluded = {int(c): why for c, why in row.get("excluded", {}).items()}
            final = self.run_dir.write_evaluation(chosen, per_client, domains, self.model_selection, excluded)
            print(f"[pfedmma] evaluation at round {chosen} (model selection: {self.model_selection}):", flush=True)
            print(final["table"], flush=True)
        last = self.history[-1] if self.history else {}
        summary = {
            "status": "failed" if failed is not None else "completed",
            "failure": None if failed is None else {"round": failed.server_round, "reason": failed.reason, "clients": failed.clients},
            "method": self.method.get("method"),
            "parameters": self.method.get("parameters", {}),
            "communication": communication_summary(self.history),
            "rounds-completed": len(self.history),
            "model-selection": self.model_selection,
            "selected-round": chosen,
            "evaluation": final.get("summary", {}),
            "per-domain-local": final.get("per-domain-local", {}),
            "final-local-accuracy": last.get("local-accuracy"),
            "final-train-loss": last.get("train-loss"),
            "total-bytes-received": sum(r["bytes-received"] for r in self.history),
            "total-rejected-replies": sum(r["rejected-replies"] for r in self.history),
            # Image files each client left out under skip-corrupt (the largest count it reported).
            "skipped-images": _skipped_images(self.history),
            "device": _devices(self.history),
            "wall-seconds": round(time.monotonic() - self.started, 2),
            "run-dir": str(self.run_dir.path),
        }
        self.run_dir.write_summary(summary)
        if failed is not None:
            print(f"[pfedmma] FAILED ({summary['method']}) after round {failed.server_round}: {failed.reason}:", flush=True)
            for who, why in failed.clients.items():
                print(f"[pfedmma]   {who}: {why}", flush=True)
            print(f"[pfedmma] failed: summary in {self.run_dir.path / 'summary.json'}", flush=True)
        else:
            print(f"[pfedmma] done ({summary['method']}): {summary['rounds-completed']} rounds; results in {self.run_dir.path}", flush=True)
        return summary


def communication_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """Mean tensor values per client per round, each way, and the run's totals."""
    cells = [c for row in history for c in row.get("communication", {}).values()]
    up = [c["floats-up"] for c in cells]
    down = [c["floats-down"] for c in cells]
    return {
        "floats-up-per-client-round": sum(up) / len(up) if up else 0.0,
        "floats-down-per-client-round": sum(down) / len(down) if down else 0.0,
        "total-floats-up": sum(up),
        "total-floats-down": sum(down),
    }


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _progress_line(row: dict[str, Any], num_rounds: int) -> str:
    ev = row["evaluation"]
    extra = "".join(f" {name} {_fmt(ev[key])}" for key, name in (("base", "base"), ("novel", "novel"), ("hm3", "HM3")) if key in ev)
    return (
        f"[pfedmma] round {row['round']}/{num_rounds} | train loss {_fmt(row['train-loss'])} "
        f"acc {_fmt(row['train-accuracy'])} | local {_fmt(row['local-accuracy'])}{extra} | "
        f"replies {row['valid-replies']}/{row['sampled']} ok, {row['rejected-replies']} rejected{_counted(row)} | "
        f"{row['bytes-received'] / 1024:.1f} KiB in{_privacy(row)} | {row['seconds']:.1f}s"
    )


def _privacy(row: dict[str, Any]) -> str:
    """The DP budget spent so far, when the run accounts one."""
    epsilon = (row.get("privacy") or {}).get("epsilon")
    return f" | DP epsilon {epsilon:.2f} (delta {row['privacy']['delta']:g})" if epsilon is not None else ""


def _counted(row: dict[str, Any]) -> str:
    """Says how many clients the means cover when some evaluations were left out."""
    skipped = sum(row.get("skipped-images", {}).values())
    note = f" | {skipped} image(s) left out (skip-corrupt)" if skipped else ""
    if not row["excluded"]:
        return note
    return f"{note} | means over {row['clients-in-mean']} of {len(row['per-client'])} clients ({len(row['excluded'])} never trained)"


def _devices(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each client's latest device report, with its peak memory over the whole run."""
    devices: dict[str, dict[str, Any]] = {}
    for row in history:
        for client, report in row.get("device", {}).items():
            devices[client] = merge_device(devices.get(client, {}), report)
    return dict(sorted(devices.items(), key=lambda kv: client_order(kv[0])))


def _skipped_images(history: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in history:
        for client, n in row.get("skipped-images", {}).items():
            counts[client] = max(counts.get(client, 0), n)
    return dict(sorted(counts.items()))
