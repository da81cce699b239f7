"""Server strategies, one per file, by the name a method gives in its ``strategy`` attribute."""

from __future__ import annotations

from server.strategies.evaluate_only import EvaluateOnly
from server.strategies.pfedmoap import PFedMoAPStrategy
from server.strategies.shared_fedavg import SharedFedAvg

STRATEGIES: dict[str, type[SharedFedAvg]] = {
    "fedavg": SharedFedAvg,
    "evaluate-only": EvaluateOnly,
    "pfedmoap": PFedMoAPStrategy,
}

__all__ = ["STRATEGIES", "EvaluateOnly", "PFedMoAPStrategy", "SharedFedAvg"]
