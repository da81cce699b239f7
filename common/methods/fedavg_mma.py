"""FedAvg-MMA (the paper's ablation): pFedMMA's adapters with every adapter tensor averaged by
the server, so no client keeps anything of its own (no personalisation).
"""

from __future__ import annotations

from common.methods.pfedmma import PFedMMA
from common.model.adapters import CrossTowerProjection, TowerProjection
from common.model.roles import Role, Roles


class FedAvgMMA(PFedMMA):
    name = "fedavg-mma"
    summary = "pFedMMA's adapters, all shared: every adapter tensor is averaged (no personalisation)"
    roles = Roles({TowerProjection: Role.SHARED, CrossTowerProjection: Role.SHARED})
    setting_keys = ("fedavg-mma-learning-rate",)
    learning_rate_key = "fedavg-mma-learning-rate"
