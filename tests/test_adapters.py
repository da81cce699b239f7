"""The MMA adapter: gradient scaling, identity when zeroed, parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

from common.methods.pfedmma import PFedMMA
from common.model.adapters import AdaptedBlock, MMAAdapters, adapter_parameter_count, attach_mma
from common.model.clip import build_clip
from common.model.roles import Role

ROLES = PFedMMA.roles  # down/up private, cross-tower shared

ALPHA = 0.001


def _block_and_adapters(width: int = 16, rank: int = 4) -> tuple[ResidualAttentionBlock, MMAAdapters]:
    torch.manual_seed(0)
    block = ResidualAttentionBlock(width, n_head=2, batch_first=True)
    adapters = MMAAdapters([1], d_text=width, d_image=width, rank=rank)
    # Make the branch non-trivial in both directions (ReLU must not zero everything).
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block, adapters


def test_gradient_scaling_matches_reference_formulation() -> None:
    block, adapters = _block_and_adapters()
    x = torch.randn(3, 5, 16)

    # Reference: plain Block(x) + alpha * A(ln_1(x)), no gradient rescaling.
    plain_adapters = copy.deepcopy(adapters)
    x_plain = x.clone().requires_grad_(True)
    out_plain = block(x_plain) + ALPHA * plain_adapters.branch("image", 1, block.ln_1(x_plain))
    out_plain.square().sum().backward()

    wrapped = AdaptedBlock(block, adapters, "image", 1, ALPHA)
    x_wrapped = x.clone().requires_grad_(True)
    out_wrapped = wrapped(x_wrapped)
    out_wrapped.square().sum().backward()

    torch.testing.assert_close(out_wrapped, out_plain)  # identical forward
    torch.testing.assert_close(x_wrapped.grad, x_plain.grad, rtol=1e-5, atol=1e-7)  # exact stream gradient
    used = 0
    for (name, p_wrapped), (_, p_plain) in zip(adapters.named_parameters(), plain_adapters.named_parameters()):
        if p_plain.grad is None:  # the other tower's modules are not used here
            assert p_wrapped.grad is None, name
            continue
        used += 1
        assert p_plain.grad.abs().sum() > 0, name
        torch.testing.assert_close(p_wrapped.grad, p_plain.grad / ALPHA, rtol=1e-4, atol=1e-9)
    assert used == 6  # down, shared, up: weight and bias each


def test_zeroed_up_projection_gives_frozen_clip_features() -> None:
    frozen = build_clip("pfedmma-tiny", "").model
    adapted = copy.deepcopy(frozen)
    attach_mma(adapted, 1, 4, rank=8, alpha=1.0, seed=1)  # alpha 1 so a non-zero branch would show
    images, text = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (3, 16))

    assert not torch.allclose(adapted.encode_image(images), frozen.encode_image(images))
    with torch.no_grad():
        for tower in ("text", "image"):
            for up in adapted.mma.up[tower].values():
                up.linear.weight.zero_()
                up.linear.bias.zero_()
        # Under no_grad both models take the same attention kernels, so equality is exact.
        torch.testing.assert_close(adapted.encode_image(images), frozen.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(adapted.encode_text(text), frozen.encode_text(text), rtol=0, atol=0)


def _counts(model: torch.nn.Module) -> dict[Role, int]:
    return ROLES.counts(model)


def test_vit_b16_parameter_counts() -> None:
    model = build_clip("ViT-B-16", "").model
    attach_mma(model, 5, 12, rank=32, alpha=ALPHA)
    ROLES.apply(model)
    counts = _counts(model)
    assert counts[Role.SHARED] == 8_448
    assert counts[Role.PRIVATE] + counts[Role.SHARED] == 674_560
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 674_560
    assert counts == _counts(model)  # roles are stable


@pytest.mark.parametrize(("start", "end", "rank"), [(1, 4, 8), (2, 3, 16), (4, 4, 32)])
def test_small_config_matches_formula(start: int, end: int, rank: int) -> None:
    model = build_clip("pfedmma-tiny", "").model
    attach_mma(model, start, end, rank=rank, alpha=ALPHA)
    ROLES.apply(model)
    expected = adapter_parameter_count(d_text=128, d_image=128, rank=rank, num_blocks=end - start + 1)
    counts = _counts(model)
    assert counts[Role.SHARED] == expected["shared"]
    assert counts[Role.PRIVATE] == expected["text_private"] + expected["image_private"]


def test_roles_are_structural_not_by_name() -> None:
    model = build_clip("pfedmma-tiny", "").model
    attach_mma(model, 2, 3, rank=4, alpha=ALPHA)
    # A frozen module whose name contains "shared" must stay frozen.
    model.register_module("shared_lookalike", torch.nn.Linear(2, 2))
    roles = ROLES.of(model)
    assert roles["shared_lookalike.weight"] is Role.FROZEN
    assert {roles[n] for n in roles if n.startswith("mma.shared.")} == {Role.SHARED}
    assert {roles[n] for n in roles if n.startswith(("mma.down.", "mma.up."))} == {Role.PRIVATE}
    # The shared projection is ONE tensor used by both towers.
    assert sum(1 for n in roles if roles[n] is Role.SHARED) == 2 * 2  # 2 blocks x (weight, bias)


def test_shared_projection_gets_gradients_from_both_towers() -> None:
    model = build_clip("pfedmma-tiny", "").model
    attach_mma(model, 4, 4, rank=8, alpha=ALPHA, seed=3)
    ROLES.apply(model)
    shared_w = model.mma.shared["4"].linear.weight
    model.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    image_only = shared_w.grad.clone()
    model.zero_grad()
    model.encode_text(torch.randint(1, 1000, (2, 16))).sum().backward()
    assert image_only.abs().sum() > 0 and shared_w.grad.abs().sum() > 0


def test_bad_block_range_names_values() -> None:
    model = build_clip("pfedmma-tiny", "").model
    with pytest.raises(ValueError, match=r"adapter-start=3, adapter-end=9.*<= 4"):
        attach_mma(model, 3, 9, rank=4, alpha=ALPHA)


def test_init_is_kaiming_fan_out_with_zero_bias_and_seeded() -> None:
    a = MMAAdapters([1, 2], d_text=64, d_image=96, rank=32)
    biases = [m.linear.bias for m in a.modules() if hasattr(m, "linear")]
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    # kaiming fan_out, relu: std = sqrt(2 / fan_out); the down projection's fan_out is the rank.
    w = torch.cat([a.down["image"][str(k)].linear.weight.flatten() for k in (1, 2)])
    assert abs(w.std().item() - (2 / 32) ** 0.5) < 0.02
    from common.model.adapters import seeded_adapters

    s1, s2 = seeded_adapters([1], 64, 96, 32, seed=7), seeded_adapters([1], 64, 96, 32, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(s1.parameters(), s2.parameters()))


@pytest.mark.parametrize(("name", "d_text", "d_image", "depth"), [("ViT-B-32", 512, 768, 12), ("ViT-L-14", 768, 1024, 24)])
def test_standard_vit_configs_match_formula(name: str, d_text: int, d_image: int, depth: int) -> None:
    model = build_clip(name, "").model
    start = 5  # the paper's blocks 5..12 of the (shallower) text tower
    attach_mma(model, start, 12, rank=32, alpha=ALPHA)
    ROLES.apply(model)
    expected = adapter_parameter_count(d_text=d_text, d_image=d_image, rank=32, num_blocks=8)
    counts = _counts(model)
    adapted = [i for i, b in enumerate(model.visual.transformer.resblocks) if isinstance(b, AdaptedBlock)]
    assert adapted == list(range(depth - 8, depth))  # the top 8 image blocks
    assert counts[Role.SHARED] == expected["shared"]
    assert counts[Role.PRIVATE] == expected["text_private"] + expected["image_private"]
    if name == "ViT-B-32":  # one forward through both adapted towers
        with torch.no_grad():
            assert model.encode_image(torch.randn(1, 3, 224, 224)).shape == (1, 512)
            assert model.encode_text(torch.randint(1, 1000, (2, 77))).shape == (2, 512)


def test_text_features_follow_the_current_adapters() -> None:
    # The reference cached text features once; here each call reflects the adapters' state.
    from common.methods.classifiers import HandcraftedPromptClassifier
    from common.model.clip import build_clip as build

    bundle = build("pfedmma-tiny", "")
    attach_mma(bundle.model, 1, 4, rank=8, alpha=1.0, seed=0)
    classifier = HandcraftedPromptClassifier(bundle.model, bundle.tokenizer, ["red circle", "blue_square"], "cpu")
    assert classifier.tokens.shape[0] == 2
    with torch.no_grad():
        before = classifier.class_features()
        for up in bundle.model.mma.up["text"].values():
            up.linear.bias.add_(0.5)
        after = classifier.class_features()
    assert not torch.allclose(before, after)
