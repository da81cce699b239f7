"""The one place that decides every parameter's role: frozen, private or shared.

Roles are decided structurally, by the class of the module that owns the parameter, never
by a substring of its name. Each method states its table (module class -> role) once, in its
own file; everything else (``requires_grad``, the optimiser, the upload, the private store,
resume, the server's accepted key set, the tests) asks a :class:`Roles` built from that table.
A parameter owned by no listed class is frozen.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)


class Role(enum.Enum):
    FROZEN = "frozen"
    PRIVATE = "private"
    SHARED = "shared"


class Roles:
    """A method's module-class -> role table, and every question asked of it."""

    def __init__(self, table: Mapping[type[nn.Module], Role]) -> None:
        self.table = dict(table)

    def of(self, model: nn.Module) -> dict[str, Role]:
        """Map every parameter name of ``model`` to its role (the one predicate)."""
        roles = {name: Role.FROZEN for name, _ in model.named_parameters()}
        for module_name, module in model.named_modules():
            role = self.table.get(type(module))
            if role is None:
                continue
            prefix = f"{module_name}." if module_name else ""
            for pname, _ in module.named_parameters():
                roles[f"{prefix}{pname}"] = role
        return roles

    def apply(self, model: nn.Module) -> dict[str, Role]:
        """Set ``requires_grad`` from the roles and log the parameter count per role."""
        roles = self.of(model)
        for name, param in model.named_parameters():
            param.requires_grad_(roles[name] is not Role.FROZEN)
        counts = self.counts(model)
        log.info(
            "parameters: frozen %s | private %s | shared %s",
            f"{counts[Role.FROZEN]:,}", f"{counts[Role.PRIVATE]:,}", f"{counts[Role.SHARED]:,}",
        )
        return roles

    def counts(self, model: nn.Module) -> dict[Role, int]:
        roles = self.of(model)
        counts: Counter[Role] = Counter({role: 0 for role in Role})
        for name, param in model.named_parameters():
            counts[roles[name]] += param.numel()
        return dict(counts)

    def parameters(self, model: nn.Module, *wanted: Role) -> dict[str, nn.Parameter]:
        roles = self.of(model)
        return {n: p for n, p in model.named_parameters() if roles[n] in wanted}

    def state(self, model: nn.Module, role: Role) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the parameters with ``role``, keyed by name."""
        return {n: p.detach().cpu().clone() for n, p in self.parameters(model, role).items()}

    def load(self, model: nn.Module, role: Role, state: Mapping[str, torch.Tensor]) -> None:
        """Strictly copy ``state`` into the parameters with ``role``: same names, same shapes."""
        params = self.parameters(model, role)
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise KeyError(
                f"{role.value} state does not match the model: "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        with torch.no_grad():
            for name, param in params.items():
                value = state[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: shape {tuple(value.shape)}, model has {tuple(param.shape)}")
                param.copy_(value.to(device=param.device, dtype=param.dtype))
