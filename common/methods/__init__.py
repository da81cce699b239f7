"""The methods of the paper's table, one file each, and the registry that maps the ``method``
run-config value to its class. Adding a method: one new file plus one line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.methods.base import Method, StepInputs
from common.methods.fedavg_mma import FedAvgMMA
from common.methods.fedpgp import FedPGP
from common.methods.local import Local
from common.methods.pfedmma import PFedMMA
from common.methods.pfedmoap import PFedMoAP
from common.methods.promptfl import PromptFL
from common.methods.zeroshot import ZeroShot

if TYPE_CHECKING:
    from common.config import RunConfig

METHODS: dict[str, type[Method]] = {
    "pfedmma": PFedMMA,
    "zeroshot": ZeroShot,
    "local": Local,
    "fedavg-mma": FedAvgMMA,
    "promptfl": PromptFL,
    "fedpgp": FedPGP,
    "pfedmoap": PFedMoAP,
}

__all__ = ["METHODS", "Method", "StepInputs", "method_for"]


def method_for(cfg: RunConfig) -> Method:
    """The method object of a validated run config (``cfg.method`` is a key of METHODS)."""
    return METHODS[cfg.method](cfg)
