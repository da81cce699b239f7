"""The run configuration: one validated object built from Flower's ``run_config``.

Keys are kebab-case, exactly as in ``[tool.flwr.app.config]`` of ``pyproject.toml`` and in
``flwr run --run-config``. A bad value fails here, naming the key, the value and what is
allowed, before any model is built or any message sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from common.errors import PermanentError

PositiveInt = Field(gt=0)
DP_CLIENT_SIDE = ("client-fixed", "client-adaptive")  # dp modes in which each client clips its own update


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class ConfigError(PermanentError, ValueError):
    """A run-config or node-config value is invalid."""


class RunConfig(BaseModel):
    """Every run option. Defaults are the paper's settings where the paper has one."""

    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True
    )

    # federation
    num_server_rounds: int = Field(50, gt=0)  # paper: 50 rounds x 2 local epochs
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    min_train_nodes: int = Field(2, ge=1)
    min_evaluate_nodes: int = Field(2, ge=0)
    min_available_nodes: int = Field(2, ge=1)
    round_timeout: float = Field(3600.0, gt=0.0)  # seconds to wait for replies per round
    # Seconds the ServerApp waits for min-available-nodes nodes to connect before round 1; then it
    # stops, naming the nodes it saw (Flower itself would wait forever).
    node_wait_timeout: float = Field(300.0, gt=0.0)
    seed: int = Field(0, ge=0)
    # method (docs/paper.md §5): a key of common.methods.METHODS
    method: str = "pfedmma"
    # model
    model_name: str = "ViT-B-16"
    pretrained: str = "openai"
    adapter_start: int = Field(5, ge=1)  # 1-based, inclusive: paper adapts blocks 5..12
    adapter_end: int = Field(12, ge=1)
    adapter_rank: int = Field(32, gt=0)
    adapter_alpha: float = Field(0.001, gt=0.0)
    # local training (each client owns its optimiser; paper: SGD 1e-3, m 0.9, wd 5e-4)
    local_epochs: int = Field(2, gt=0)
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(256, gt=0)  # evaluation runs without gradients: larger batches
    learning_rate: float = Field(0.001, gt=0.0)  # pfedmma's SGD
    local_learning_rate: float = Field(0.001, gt=0.0)  # the ablations' SGD: the paper runs them as pfedmma
    fedavg_mma_learning_rate: float = Field(0.001, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0005, ge=0.0)
    crop_scale_min: float = Field(0.08, gt=0.0, le=1.0)  # RandomResizedCrop lower scale
    # Mixed precision on CUDA: bf16 where the GPU has it natively, else fp16 with a GradScaler;
    # fp32 on CPU and with amp = false (common.device.precision).
    amp: StrictBool = True
    # PyTorch's deterministic algorithms (and no TF32, no cuDNN autotuning): bit-identical GPU
    # runs at some speed; CPU runs are bit-identical either way (docs/gpu.md).
    deterministic: StrictBool = False
    # learned prompts (CoOp: promptfl, fedpgp, pfedmoap)
    prompt_tokens: int = Field(16, gt=0)  # context vectors per prompt (CoOp's n_ctx)
    promptfl_learning_rate: float = Field(0.002, gt=0.0)  # CoOp's ViT-B/16 config
    fedpgp_learning_rate: float = Field(0.001, gt=0.0)  # the authors' scripts
    fedpgp_prompts: int = Field(2, gt=0)  # N prompts per class
    fedpgp_rank: int = Field(8, gt=0)  # bottleneck of U V
    fedpgp_mu: float = Field(0.5, ge=0.0)  # weight of the contrastive term
    fedpgp_temperature: float = Field(0.5, gt=0.0)
    pfedmoap_learning_rate: float = Field(0.002, gt=0.0)  # the prompt's SGD
    pfedmoap_gate_learning_rate: float = Field(0.01, gt=0.0)  # the gate's SGD
    pfedmoap_experts: int = Field(10, ge=1)  # K: the local prompt plus up to K - 1 non-local ones
    pfedmoap_selection: Literal["nearest", "random"] = "nearest"  # how the server picks experts
    pfedmoap_lambda: float = Field(0.5, ge=0.0)  # weight of the local logits
    pfedmoap_gate_dim: int = Field(128, gt=0)  # features sub-sampled to this width for the gate
    pfedmoap_gate_heads: int = Field(8, gt=0)
    pfedmoap_gate_scaling: float = Field(10.0, gt=0.0)  # attention score scale
    pfedmoap_gate_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # on the attention weights
    # data and partition (docs/paper.md §3)
    dataset: str = "shapes"  # a name from common.data.registry.DATASET_NAMES
    data_dir: str = ""  # default for nodes that set none
    # Comma-separated domains (shapes: styles); "" = the dataset's default (all its domains;
    # shapes: "striped"), "all" = every domain; a dataset without domains takes only "".
    dataset_domains: str = ""
    partition: Literal["base-to-novel", "dirichlet", "pathological", "domain"] = "base-to-novel"
    shots: int = Field(16, ge=0)  # K shots per class per client; 0 = every image
    dirichlet_beta: float = Field(0.5, gt=0.0)
    classes_per_client: int = Field(2, gt=0)  # pathological split
    test_per_class: int = Field(10, gt=0)  # procedural datasets only
    # Leave out (and count) images of a client's shard that are missing or undecodable,
    # instead of stopping the run with the list of bad files.
    skip_corrupt: StrictBool = False
    # evaluation (docs/paper.md §4)
    eval_every: int = Field(1, ge=0)  # Base/Novel every N rounds and at the end; 0 = end only
    model_selection: Literal["last", "val"] = "last"  # never on test data (docs/paper.md §6.4)
    # Which split Local/Base/Novel are measured on: "val" for choosing hyper-parameters
    # (scripts/tune_lr.py), "test" for reporting; never tune on "test".
    eval_split: Literal["test", "val"] = "test"
    # robustness: bounds on what a client reports, and how replies are combined
    max_examples: int = Field(0, ge=0)  # cap on a reply's num-examples; 0 = the partition's largest shard
    update_norm_bound: float = Field(10.0, ge=0.0)  # ||reply - global|| <= bound * ||global||; 0 = off
    update_norm_action: Literal["reject", "clip"] = "reject"  # what happens to a reply over the bound
    max_parameter_abs: float = Field(1000.0, gt=0.0)  # |value| above this in a global or reply tensor is refused
    aggregation: Literal["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"] = "fedavg"
    trimmed_beta: float = Field(0.2, ge=0.0, lt=0.5)  # fedtrimmedavg: fraction cut at each end
    num_malicious_nodes: int = Field(0, ge=0)  # krum, multikrum, bulyan: f, the clients assumed Byzantine
    multikrum_select: int = Field(2, ge=1)  # multikrum: m, the replies averaged
    # differential privacy of the shared tensors (Flower's DP wrappers; private adapters never leave)
    dp: Literal["off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive"] = "off"
    dp_noise_multiplier: float = Field(1.0, gt=0.0)
    dp_clipping_norm: float = Field(0.1, gt=0.0)  # fixed: the clip; adaptive: the initial clip
    dp_target_delta: float = Field(1e-5, gt=0.0, lt=1.0)  # delta at which spent epsilon is reported (fixed)
    dp_max_epsilon: float = Field(0.0, ge=0.0)  # stop before a round would exceed it; 0 = no limit
    dp_target_quantile: float = Field(0.5, ge=0.0, le=1.0)  # adaptive: fraction of updates left unclipped
    dp_clip_norm_lr: float = Field(0.2, gt=0.0)  # adaptive: the clip's geometric learning rate
    # outputs and private state
    output_dir: str = "~/pfedmma-runs"  # the ServerApp resolves it on its own machine
    experiment_name: str = ""  # names the private-state namespace; "" = this run's id
    state_dir: str = ""  # default for nodes that set none; "" = ~/.cache/pfedmma/state
    resume_from: str = ""  # a run directory to continue after its last completed round

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from common.methods import METHODS

        if name not in METHODS:
            raise ValueError(f"unknown method; valid: {', '.join(METHODS)}")
        return name

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from common.data.registry import DATASET_NAMES, normalize_name

        try:
            return normalize_name(name)
        except ValueError:
            raise ValueError(f"unknown dataset; valid: {', '.join(DATASET_NAMES)}") from None

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(d.strip() for d in self.dataset_domains.split(",") if d.strip())

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.adapter_end < self.adapter_start:
            raise ValueError(
                f"adapter-end={self.adapter_end} is below adapter-start={self.adapter_start}; "
                "need adapter-start <= adapter-end"
            )
        from common.data.registry import resolve_domains

        resolve_domains(self.dataset, self.domains)  # raises naming dataset-domains and the valid values
        if self.dp != "off" and self.aggregation != "fedavg":
            raise ValueError(
                f"dp={self.dp!r} needs aggregation='fedavg', got aggregation={self.aggregation!r}: the "
                "noise is calibrated for a mean of clipped updates, not a median or a Krum selection"
            )
        if self.min_train_nodes > self.min_available_nodes:
            raise ValueError(
                f"min-train-nodes={self.min_train_nodes} exceeds "
                f"min-available-nodes={self.min_available_nodes}"
            )
        return self

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Validate Flower's ``context.run_config``; errors name key, value and rule."""
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            raise ConfigError(_describe(err, run_config)) from None

    def to_flower(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


class NodeConfig(BaseModel):
    """Per-node settings from ``context.node_config`` (``--node-config`` in deployment)."""

    model_config = ConfigDict(alias_generator=_kebab, populate_by_name=True, extra="ignore", frozen=True)

    partition_id: int = Field(ge=0)
    num_partitions: int = Field(gt=0)
    state_dir: str = ""
    data_dir: str = ""
    # Prepared backbone weights, memory-mapped by every later ClientApp process; "" = off.
    cache_dir: str = "~/.cache/pfedmma/backbones"
    # Memory for decoded evaluation images kept between messages of one process (uint8); 0 = off.
    eval_cache_mb: int = Field(2048, ge=0)
    # GPU memory the evaluation caches (image features, hidden states) may hold per process; 0 = none.
    eval_cache_gpu_mb: int = Field(1024, ge=0)
    # Decoded test images on the node's disk (uint8, memory-mapped by every process and round):
    # where, and at most how many MB in all; 0 = off.
    eval_cache_dir: str = "~/.cache/pfedmma/eval-images"
    eval_disk_cache_mb: int = Field(65536, ge=0)
    # DataLoader worker processes for training (decode and augment); -1 = automatic: none on CPU
    # (they would compete with the training threads), min(4, CPU cores) with a GPU.
    loader_workers: int = Field(-1, ge=-1)

    @model_validator(mode="after")
    def _check_partition(self) -> NodeConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(
                f"partition-id={self.partition_id} must be below num-partitions={self.num_partitions}"
            )
        return self

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        """Validate ``context.node_config`` (the simulation sets both partition keys itself)."""
        values = dict(node_config)
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ConfigError(_describe(err, values, what="node config")) from None

    def resolved_state_dir(self, run: RunConfig) -> Path:
        chosen = self.state_dir or run.state_dir or "~/.cache/pfedmma/state"
        return Path(chosen).expanduser()


def _describe(err: ValidationError, given: Mapping[str, Any], what: str = "run config") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(combination)"
        if e["type"] == "extra_forbidden":
            valid = ", ".join(sorted(_kebab(n) for n in RunConfig.model_fields))
            lines.append(f"{what}: unknown key {key!r}; valid keys: {valid}")
        elif e["type"] == "missing":
            lines.append(f"{what}: required key {key!r} is missing")
        elif key in given:
            lines.append(f"{what}: {key}={given[key]!r} is invalid: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{what}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)
