"""pFedMMA (Ghiasvand et al., arXiv 2507.05394): MMA adapters in blocks ``adapter-start..end`` of
both towers; each client keeps its per-tower down/up projections, and only the r x r cross-tower
projection of each block is averaged by the server. Classification uses the hand-written prompt
``"a photo of a {class}."`` through the adapted text tower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip import CLIP
from torch import nn

from common.methods.base import Method, StepInputs
from common.methods.classifiers import Classifier, HandcraftedPromptClassifier
from common.model.adapters import CrossTowerProjection, MMAAdapters, TowerProjection, check_block_range, wrap_blocks
from common.model.clip import ModelDims
from common.model.roles import Role, Roles


class PFedMMA(Method):
    name = "pfedmma"
    summary = "MMA adapters in both towers; the cross-tower projections are averaged, down/up stay private"
    roles = Roles({TowerProjection: Role.PRIVATE, CrossTowerProjection: Role.SHARED})
    attribute = "mma"
    model_keys = ("adapter-start", "adapter-end", "adapter-rank", "adapter-alpha")
    setting_keys = ("learning-rate",)

    def check(self, dims: ModelDims) -> None:
        check_block_range(self.cfg.adapter_start, self.cfg.adapter_end, dims.text_depth, dims.image_depth)

    def build_modules(self, dims: ModelDims) -> nn.Module:
        blocks = range(self.cfg.adapter_start, self.cfg.adapter_end + 1)
        return MMAAdapters(blocks, d_text=dims.text_width, d_image=dims.image_width, rank=self.cfg.adapter_rank)

    def wire(self, model: CLIP, modules: nn.Module) -> None:
        assert isinstance(modules, MMAAdapters)
        wrap_blocks(model, modules, self.cfg.adapter_alpha)

    def classifier(
        self, model: CLIP, tokenizer: Callable, class_names: Sequence[str], device: torch.device | str, inputs: StepInputs
    ) -> Classifier:
        return HandcraftedPromptClassifier(model, tokenizer, class_names, device)
