"""pFedMMA's model: a frozen CLIP with MMA adapters attached, roles applied."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from common.adapters import attach_mma, seeded_adapters
from common.config import RunConfig
from common.model import ClipBundle, build_clip
from common.roles import Role, apply_roles, role_state

ADAPTERS_ATTR = "mma"  # attach_mma registers the adapters as ``model.mma``


def build_mma_clip(cfg: RunConfig, device: str | torch.device = "cpu", cache_dir: Path | None = None) -> ClipBundle:
    bundle = build_clip(cfg.model_name, cfg.pretrained, device, cache_dir=cache_dir, init_seed=cfg.seed)
    attach_mma(bundle.model, cfg.adapter_start, cfg.adapter_end, cfg.adapter_rank, cfg.adapter_alpha, cfg.seed)
    apply_roles(bundle.model)
    return bundle


def _tower_widths(model_name: str) -> tuple[int, int]:
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"model-name={model_name!r} is unknown; valid names: {open_clip.list_models()}")
    return int(config["text_cfg"]["width"]), int(config["vision_cfg"]["width"])


def initial_adapter_state(cfg: RunConfig) -> dict[Role, dict[str, torch.Tensor]]:
    """The common initial adapter tensors per role, without building the backbone.

    Names match :func:`build_mma_clip`'s parameters, so the server can seed the global
    shared state without holding (or downloading) the CLIP weights.
    """
    d_text, d_image = _tower_widths(cfg.model_name)
    blocks = list(range(cfg.adapter_start, cfg.adapter_end + 1))
    adapters = seeded_adapters(blocks, d_text, d_image, cfg.adapter_rank, cfg.seed)
    holder = torch.nn.Module()
    setattr(holder, ADAPTERS_ATTR, adapters)
    return {role: role_state(holder, role) for role in (Role.SHARED, Role.PRIVATE)}
