"""CPU-fp32 against another device or precision: the same method, weights and images on both.

Used by tests/test_gpu.py (``pytest -m gpu``) and scripts/gpu_check.py. The reference is always
the CPU in fp32; the other side is ``device`` (CUDA on a GPU machine, the CPU itself in the
CPU-only quick check) with TF32 off, in fp32 or under the ClientApp's autocast. The model is
the shipped tiny CLIP with its trained weights, so that logits are confident and an argmax
comparison under bf16 means something.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from common.config import RunConfig
from common.device import Precision, configure_determinism, precision
from common.methods import Method, StepInputs, method_for
from common.model.clip import build_clip
from common.model.roles import Role
from tests.conftest import pyproject_run_config

BATCH = 32
FP32_TOLERANCE = 1e-4  # largest difference, relative to the largest value, fp32 without TF32
ARGMAX_AGREEMENT = 0.9  # under bf16/fp16 autocast: share of images whose predicted class is the CPU's


@dataclass(frozen=True)
class Parity:
    method: str
    device: str
    dtype: str
    logit_diff: float  # max |logits - CPU logits| / max |CPU logits|
    grad_diff: float | None  # the same for the trainable tensors' gradients (None: nothing trains)
    argmax_agreement: float

    def ok(self) -> bool:
        if self.dtype == "fp32":
            return self.logit_diff <= FP32_TOLERANCE and (self.grad_diff is None or self.grad_diff <= FP32_TOLERANCE)
        return self.argmax_agreement >= ARGMAX_AGREEMENT

    def row(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok()}


def experts(method: Method) -> dict[str, dict[str, torch.Tensor]]:
    """pFedMoAP's non-local prompts: perturbed copies of the initial one, seeded."""
    if not method.extra_records:
        return {}
    (prompt,) = method.initial_state()[Role.SHARED].values()
    gen = torch.Generator().manual_seed(7)
    return {"experts": {f"client-{i}": prompt + 0.05 * torch.randn(prompt.shape, generator=gen) for i in range(2)}}


def _batch(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Real test images of the procedural dataset (the tiny CLIP's own domain) and their classes."""
    from client.runtime import shard

    bundle = build_clip(cfg.model_name, cfg.pretrained, "cpu", init_seed=cfg.seed)
    data = shard(cfg, 0, 2, "", bundle).data
    evals = data.evals["base"]
    pairs = [evals.dataset[i] for i in range(min(BATCH, len(evals.dataset)))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]), list(evals.class_names)


def _forward_backward(cfg: RunConfig, device: torch.device, chosen: Precision, images: torch.Tensor,
                      labels: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    method = method_for(cfg)
    bundle = build_clip(cfg.model_name, cfg.pretrained, device, init_seed=cfg.seed)
    model = bundle.model
    method.attach(model)
    initial = method.initial_state()
    for role in (Role.SHARED, Role.PRIVATE):
        method.roles.load(model, role, {k: v.to(device) for k, v in initial[role].items()})
    extras = {name: {k: v.to(device) for k, v in record.items()} for name, record in experts(method).items()}
    classifier = method.classifier(model, bundle.tokenizer, names, device, StepInputs(extras, torch.Generator().manual_seed(0)))
    classifier.set_training(False)  # no dropout: its draws differ between devices by design
    with chosen.autocast(device):
        loss, logits = classifier.loss(images.to(device), labels.to(device))
    grads: dict[str, torch.Tensor] = {}
    if loss.requires_grad:
        loss.float().backward()
        grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float().cpu(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check(method_name: str, device: torch.device, amp: bool) -> Parity:
    """One method's logits and gradients on ``device`` (fp32 or the ClientApp's autocast) against the CPU in fp32."""
    cfg = RunConfig.from_flower({**pyproject_run_config(), "method": method_name})
    configure_determinism(True)  # fp32 without TF32 on both sides
    try:
        images, labels, names = _batch(cfg)
        reference, ref_grads = _forward_backward(cfg, torch.device("cpu"), precision(torch.device("cpu"), False), images, labels, names)
        chosen = precision(device, amp)
        logits, grads = _forward_backward(cfg, device, chosen, images, labels, names)
    finally:
        configure_determinism(False)
    grad_diff = max((_relative(grads[n], ref_grads[n]) for n in ref_grads), default=None)
    agreement = float((logits.argmax(1) == reference.argmax(1)).float().mean())
    return Parity(method_name, str(device), chosen.name, _relative(logits, reference), grad_diff, agreement)
