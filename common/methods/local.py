"""Local (the paper's ablation): pFedMMA's adapters with nothing averaged. Every tensor, the
cross-tower projections included, stays on its client, which trains alone; only the example
count crosses the network.
"""

from __future__ import annotations

from common.methods.pfedmma import PFedMMA
from common.model.adapters import CrossTowerProjection, TowerProjection
from common.model.roles import Role, Roles


class Local(PFedMMA):
    name = "local"
    summary = "pFedMMA's adapters, all private: every client trains alone, nothing is averaged"
    roles = Roles({TowerProjection: Role.PRIVATE, CrossTowerProjection: Role.PRIVATE})
    setting_keys = ("local-learning-rate",)
    learning_rate_key = "local-learning-rate"
