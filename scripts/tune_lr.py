"""Choose every method's learning rate by one procedure, on validation data only.

For each method that trains, run the preset with its learning rate set to the paper's value
times each multiplier of ``--multipliers``, on a tuning seed that no reported run uses, with
Local/Base/Novel measured on the validation split (``eval-split='val'``), once after the last round. The chosen
multiplier is the one with the highest validation HM3 (ties: the smaller). Every method gets
the same grid, rounds and seeds; the test split is never read.

    python scripts/tune_lr.py --preset conf/miniature.toml           # docs/miniature-benchmark.md

Writes ``<out>/chosen.json`` and ``<out>/tuning.md`` and prints the run-config lines to put
in the preset. Runs finished earlier are reused (each grid point is a pfedmma-compare folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from common.config import RunConfig
from common.methods import METHODS
from server.compare.cli import main as compare

# Every method that trains, by the run-config key of its learning rate (pFedMoAP's gate, a
# network trained from scratch, keeps its own lr: docs/methods.md).
LR_KEYS = {name: method.learning_rate_key for name, method in METHODS.items() if method.trains}
PAPER = RunConfig().to_flower()  # the config model's defaults are the papers' values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", type=Path, required=True)
    p.add_argument("--methods", default=",".join(LR_KEYS), help=f"comma list of {', '.join(LR_KEYS)}")
    p.add_argument("--multipliers", default="3,10,30,100", help="of the paper's lr (default: 3,10,30,100)")
    p.add_argument("--seed", type=int, default=100, help="the tuning seed; keep it out of the reported seeds")
    p.add_argument("--supernodes", type=int, default=None, help="default: the preset's min-available-nodes, at least 4")
    p.add_argument("--gpus-per-client", type=float, default=None, help="GPU share per client (default: from this machine's GPUs)")
    p.add_argument("--out", type=Path, default=Path("results/tune"))
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in LR_KEYS]
    if unknown:
        p.error(f"--methods: {unknown} cannot be tuned; valid: {', '.join(LR_KEYS)}")
    args.multipliers = [float(m) for m in args.multipliers.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table: dict[str, dict[str, float]] = {}
    for method in args.methods:
        key = LR_KEYS[method]
        for mult in args.multipliers:
            lr = PAPER[key] * mult
            folder = args.out / f"{method}-x{mult:g}"
            federation = [*(["--supernodes", str(args.supernodes)] if args.supernodes else []),
                          *(["--gpus-per-client", str(args.gpus_per_client)] if args.gpus_per_client is not None else [])]
            code = compare([
                "--preset", str(args.preset), "--methods", method, "--seeds", str(args.seed), "--out", str(folder),
                *federation, "--set", "eval-split='val'", "--set", "eval-every=0", "--set", f"{key}={lr!r}",
            ])
            if code != 0:
                print(f"[tune] {method} x{mult:g}: the run failed (exit {code}); see {folder}", flush=True)
                continue
            result = json.loads((folder / "results.json").read_text())["methods"][0]["metrics"]
            table.setdefault(method, {})[f"{mult:g}"] = result["hm3"]["mean"]
    chosen = {}
    lines = ["| method | lr key | " + " | ".join(f"x{m:g}" for m in args.multipliers) + " | chosen |", "|---|---|" + "---|" * (len(args.multipliers) + 1)]
    for method, scores in table.items():
        best = max(scores, key=lambda m: (scores[m], -float(m)))
        key = LR_KEYS[method]
        chosen[method] = {"key": key, "multiplier": float(best), "learning-rate": PAPER[key] * float(best), "val-hm3": scores}
        cells = [f"{100 * scores[f'{m:g}']:.2f}" if f"{m:g}" in scores else "failed" for m in args.multipliers]
        lines.append(f"| {method} | {key} | " + " | ".join(cells) + f" | x{best} ({PAPER[key] * float(best):g}) |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chosen.json").write_text(json.dumps({"preset": str(args.preset), "seed": args.seed, "chosen": chosen}, indent=2) + "\n")
    (args.out / "tuning.md").write_text("Validation HM3 (%) per lr multiplier of the paper's value\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print("\n[tune] preset lines:\n" + "\n".join(f"{c['key']} = {c['learning-rate']:g}  # {m}" for m, c in chosen.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
