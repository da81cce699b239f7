"""The one place that decides every parameter's role: frozen, private or shared.

Roles are decided structurally, by the class of the module that owns the parameter, never
by a substring of its name. Everything else (``requires_grad``, the optimiser, the upload,
the private store, the tests) asks this module.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from common.adapters import PrivateProjection, SharedProjection

log = logging.getLogger(__name__)


class Role(enum.Enum):
    FROZEN = "frozen"
    PRIVATE = "private"
    SHARED = "shared"


_ROLE_OF_MODULE: dict[type[nn.Module], Role] = {
    SharedProjection: Role.SHARED,
    PrivateProjection: Role.PRIVATE,
}


def parameter_roles(model: nn.Module) -> dict[str, Role]:
    """Map every parameter name of ``model`` to its role."""
    roles = {name: Role.FROZEN for name, _ in model.named_parameters()}
    for module_name, module in model.named_modules():
        role = _ROLE_OF_MODULE.get(type(module))
        if role is None:
            continue
        for pname, _ in module.named_parameters():
            roles[f"{module_name}.{pname}"] = role
    return roles


def apply_roles(model: nn.Module) -> dict[str, Role]:
    """Set ``requires_grad`` from the roles and log the parameter count per role."""
    roles = parameter_roles(model)
    counts: Counter[Role] = Counter()
    for name, param in model.named_parameters():
        param.requires_grad_(roles[name] is not Role.FROZEN)
        counts[roles[name]] += param.numel()
    log.info(
        "parameters: frozen %s | private %s | shared %s",
        f"{counts[Role.FROZEN]:,}", f"{counts[Role.PRIVATE]:,}", f"{counts[Role.SHARED]:,}",
    )
    return roles


def parameters_with_role(model: nn.Module, *wanted: Role) -> dict[str, nn.Parameter]:
    roles = parameter_roles(model)
    return {n: p for n, p in model.named_parameters() if roles[n] in wanted}


def role_state(model: nn.Module, role: Role) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters with ``role``, keyed by name."""
    return {n: p.detach().cpu().clone() for n, p in parameters_with_role(model, role).items()}


def load_role_state(model: nn.Module, role: Role, state: Mapping[str, torch.Tensor]) -> None:
    """Strictly copy ``state`` into the parameters with ``role``: same names, same shapes."""
    params = parameters_with_role(model, role)
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


def build_optimizer(
    model: nn.Module, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD over the trainable (private + shared) parameters only."""
    trainable = list(parameters_with_role(model, Role.PRIVATE, Role.SHARED).values())
    return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
