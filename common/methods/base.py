"""What a method is, in one class: the modules it attaches to the frozen CLIP, which of their
tensors are private or shared (a module-class -> role table), its classifier and loss, its
optimiser, and the name of the server strategy that pairs with it.

A method file subclasses :class:`Method`; ``common/methods/__init__.py`` maps the ``method``
run-config value to it. The ClientApp, the ServerApp and the tests ask the method object; an
``if method == ...`` outside a method file is the sign that something belongs in one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from open_clip import CLIP
from torch import nn

from common.methods.classifiers import Classifier
from common.model.clip import ModelDims, model_dims
from common.model.roles import Role, Roles

if TYPE_CHECKING:
    from common.config import RunConfig

# The config keys every method's tensors depend on; a method adds its own ``model_keys``.
BASE_MODEL_KEYS = ("method", "model-name", "pretrained", "seed")


@dataclass(frozen=True)
class StepInputs:
    """What one message gives a method besides the shared tensors."""

    # Named tensor records the server sent beside "arrays" (pFedMoAP: the non-local experts).
    extras: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    # Seeded per (seed, client, round): the source of every random draw inside the step.
    generator: torch.Generator | None = None


class Method:
    """Base of every method; the defaults describe a method that attaches nothing."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what is trained, what crosses the network
    strategy: ClassVar[str] = "fedavg"  # a key of server.strategies.STRATEGIES
    roles: ClassVar[Roles] = Roles({})
    attribute: ClassVar[str] = ""  # the model attribute its modules hang under, e.g. "mma"
    model_keys: ClassVar[tuple[str, ...]] = ()  # config keys that shape or initialise its tensors
    setting_keys: ClassVar[tuple[str, ...]] = ()  # further config keys it reads (learning rates...)
    extra_records: ClassVar[tuple[str, ...]] = ()  # names of the extra records its messages carry
    trains: ClassVar[bool] = True
    # The run-config key of its (main) SGD learning rate: read by the optimiser, tuned by scripts/tune_lr.py.
    learning_rate_key: ClassVar[str] = "learning-rate"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    # -- what the method attaches ------------------------------------------------------------

    def check(self, dims: ModelDims) -> None:
        """Raise, naming the key, when the config cannot work with a model of ``dims``."""

    def build_modules(self, dims: ModelDims) -> nn.Module | None:
        """The trainable modules (random draws here come from the run's seed), or None."""
        return None

    def wire(self, model: CLIP, modules: nn.Module) -> None:
        """Make ``model`` use ``modules``; by default they only hang under ``attribute``."""
        model.add_module(self.attribute, modules)

    # -- its client step ---------------------------------------------------------------------

    def classifier(
        self, model: CLIP, tokenizer: Callable, class_names: Sequence[str], device: torch.device | str, inputs: StepInputs
    ) -> Classifier:
        raise NotImplementedError(f"method {self.name!r} defines no classifier")

    @property
    def learning_rate(self) -> float:
        return float(getattr(self.cfg, self.learning_rate_key.replace("-", "_")))

    def param_groups(self, model: nn.Module) -> list[dict]:
        trainable = self.roles.parameters(model, Role.PRIVATE, Role.SHARED)
        return [{"params": list(trainable.values()), "lr": self.learning_rate}] if trainable else []

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The client's own SGD over its trainable tensors (a fresh one per message)."""
        groups = self.param_groups(model)
        if not groups:
            raise ValueError(f"method {self.name!r} has nothing to train")
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    # -- provided ----------------------------------------------------------------------------

    def modules(self, dims: ModelDims) -> nn.Module | None:
        """The trainable modules, initialised from the run's seed alone: every client agrees."""
        self.check(dims)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return self.build_modules(dims)

    def attach(self, model: CLIP) -> None:
        """Attach the method's modules to a frozen ``model`` and set ``requires_grad`` by role."""
        modules = self.modules(model_dims(self.cfg.model_name))
        if modules is not None:
            parameter = next(model.parameters())
            modules.to(device=parameter.device, dtype=parameter.dtype)
            self.wire(model, modules)
        self.roles.apply(model)

    def initial_state(self) -> dict[Role, dict[str, torch.Tensor]]:
        """The common initial tensors per role, named as on the model, without a backbone.

        The server seeds the global shared state from this; clients start private state from it.
        """
        holder = nn.Module()
        modules = self.modules(model_dims(self.cfg.model_name))
        if modules is not None:
            holder.add_module(self.attribute, modules)
        return {role: self.roles.state(holder, role) for role in (Role.SHARED, Role.PRIVATE)}

    def fingerprint(self) -> dict[str, str]:
        """What must match for a stored private state or a cached model to be reusable."""
        flat = self.cfg.to_flower()
        return {k: str(flat[k]) for k in (*BASE_MODEL_KEYS, *self.model_keys)}

    def settings(self) -> dict[str, object]:
        """The config values this method reads, for the run directory's record."""
        flat = self.cfg.to_flower()
        return {k: flat[k] for k in (*self.model_keys, *self.setting_keys)}
