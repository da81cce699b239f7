"""Print, for every method, its trainable parameters per client by role and the tensor values
that cross the network per client per round, computed from the modules themselves.

    python scripts/method_sizes.py                                  # the paper's setting (ViT-B-16)
    python scripts/method_sizes.py --set model-name=pfedmma-tiny prompt-tokens=8 adapter-start=2 adapter-end=4

Traffic assumes every client is sampled and evaluated each round and, for pFedMoAP, that the
other clients have all uploaded (so a client gets min(K, N) - 1 experts); ``--clients`` sets N.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig
from common.methods import METHODS
from common.model.roles import Role


def _value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--clients", type=int, default=10, help="number of clients N (paper: 10)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    base = RunConfig.from_flower({k: _value(v) for k, v in overrides.items()})
    print(f"model {base.model_name}, {args.clients} clients; values per client (per round for traffic)\n")
    print("| method | trainable | shared | private | up | down (train) | down (evaluate) |")
    print("|---|---|---|---|---|---|---|")
    for name, cls in METHODS.items():
        method = cls(base.model_copy(update={"method": name}))
        state = method.initial_state()
        shared = sum(math.prod(t.shape) for t in state[Role.SHARED].values())
        private = sum(math.prod(t.shape) for t in state[Role.PRIVATE].values())
        experts = min(base.pfedmoap_experts, args.clients) - 1 if method.extra_records else 0
        up = shared if method.trains else 0
        down_train = shared * (1 + experts) if method.trains else 0
        down_eval = shared * (1 + experts)
        print(f"| {name} | {shared + private:,} | {shared:,} | {private:,} | {up:,} | {down_train:,} | {down_eval:,} |")


if __name__ == "__main__":
    main()
