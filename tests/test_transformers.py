"""Vision transformers right by default (issue 24): timm, torchvision and Hugging Face ViTs.

Real models with random weights at 64 px (nothing downloaded): their token layouts, the
automatic layer choice (measured here for every family of the table in docs/methods.md),
Hugging Face outputs, agreement with pytorch-grad-cam, and real fits with `CamMonitor()`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from cam_monitor import CamMonitor, compute_cams
from cam_monitor.default_layer import first_spatial_layer
from cam_monitor.history import read_history
from cam_monitor.layers import TokenLayout, as_spatial, token_layout
from cam_monitor.targets import pick_logits
from tests.helpers import Lightning, fit, shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def images(n: int = 2, size: tuple[int, int] = (SIZE, SIZE)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(0))


# -- the models: every family of the docs table, tiny and random ----------------------------------


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()


TINY_VIT = {"img_size": SIZE, "depth": 2, "embed_dim": 32, "num_heads": 2}


def timm_vit() -> nn.Module:
    return timm_model("vit_tiny_patch16_224", **TINY_VIT)


def timm_vit_without_class_token() -> nn.Module:
    return timm_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **TINY_VIT)


def torchvision_vit() -> nn.Module:
    """torchvision's ViT as it comes: its head is zero-initialised (no gradient at first)."""
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(SIZE, 16, 2, 2, 32, 64, num_classes=5).eval()


#: A Hugging Face encoder of 2 layers of 32 channels at 64 px, patch 16 (built, not downloaded).
TINY_HF = {"image_size": SIZE, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_labels": 5}  # fmt: skip


def hf_vit() -> nn.Module:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(intermediate_size=64, **TINY_HF)).eval()


def hf_deit() -> nn.Module:
    """DeiT with its distillation token (class + distillation head, averaged)."""
    torch.manual_seed(0)
    config = DeiTConfig(intermediate_size=64, **TINY_HF)
    return DeiTForImageClassificationWithTeacher(config).eval()


def hf_dinov2_registers() -> nn.Module:
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **TINY_HF)
    return Dinov2WithRegistersForImageClassification(config).eval()


def hf_clip() -> nn.Module:
    """CLIP's vision tower: its attention takes the tokens by keyword (`hidden_states=`)."""
    torch.manual_seed(0)
    tower = {key: TINY_HF[key] for key in ("image_size", "patch_size", "hidden_size",
             "num_hidden_layers", "num_attention_heads")}  # fmt: skip
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(vision_config={**tower, "intermediate_size": 64}, text_config=text,
                        num_labels=5)  # fmt: skip
    return CLIPForImageClassification(config).eval()


def hf_swin() -> nn.Module:
    """Hugging Face's Swin, whose last stage has 64 channels: a square number, so its pooler's
    `[B, 64, 1]` output would read as 64 tokens of one value on an 8 x 8 grid."""
    torch.manual_seed(0)
    config = SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1],
                        num_heads=[1, 1, 1], window_size=2, num_labels=5)  # fmt: skip
    return SwinForImageClassification(config).eval()


def timm_hiera() -> nn.Module:
    """timm's Hiera (its head zero-initialised, as timm makes it)."""
    return timm_model("hiera_tiny_224", img_size=(SIZE, SIZE))


class Family(NamedTuple):
    """A model family of the docs table: how to build one, its model's name there, the layer
    the automatic choice takes and the grid of its maps for a 64 px input."""

    build: Callable[[], nn.Module]
    model: str
    layer: str
    grid: tuple[int, int]


#: The measured automatic choices; docs/methods.md shows this table (`test_the_docs_table_...`).
FAMILIES = {
    "ViT": Family(timm_vit, "timm `vit_tiny_patch16_224`", "blocks.1.norm1", (4, 4)),
    "DeiT (distilled)": Family(
        lambda: timm_model("deit_tiny_distilled_patch16_224", **TINY_VIT),
        "timm `deit_tiny_distilled_patch16_224`", "blocks.1.norm1", (4, 4),
    ),
    "DINOv2 with registers": Family(
        lambda: timm_model("vit_small_patch14_reg4_dinov2", **TINY_VIT),
        "timm `vit_small_patch14_reg4_dinov2`", "blocks.1.norm1", (4, 4),
    ),
    "EVA": Family(
        lambda: timm_model("eva02_tiny_patch14_224", **TINY_VIT),
        "timm `eva02_tiny_patch14_224`", "blocks.1.norm1", (4, 4),
    ),
    "ViT (torchvision)": Family(
        torchvision_vit, "torchvision `VisionTransformer` (zero head)",
        "encoder.layers.encoder_layer_1.ln_1", (4, 4),
    ),
    "ViT (Hugging Face)": Family(
        hf_vit, "transformers `ViTForImageClassification`", "vit.layers.1.layernorm_before", (4, 4)
    ),
    "DeiT (distilled, Hugging Face)": Family(
        hf_deit, "transformers `DeiTForImageClassificationWithTeacher`",
        "deit.layers.1.layernorm_before", (4, 4),
    ),
    "DINOv2 with registers (Hugging Face)": Family(
        hf_dinov2_registers, "transformers `Dinov2WithRegistersForImageClassification`",
        "dinov2_with_registers.encoder.layer.1.norm1", (4, 4),
    ),
    "CLIP (Hugging Face)": Family(
        hf_clip, "transformers `CLIPForImageClassification`",
        "vision_model.encoder.layers.1.layer_norm1", (4, 4),
    ),
    "Swin": Family(
        lambda: timm_model(
            "swin_tiny_patch4_window7_224", img_size=SIZE, window_size=2, embed_dim=16,
            depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
        ),
        "timm `swin_tiny_patch4_window7_224`", "norm", (2, 2),
    ),
    "Swin (Hugging Face)": Family(
        hf_swin, "transformers `SwinForImageClassification`", "swin.layernorm", (4, 4)
    ),
    "CaiT": Family(
        lambda: timm_model(
            "cait_xxs24_224", img_size=SIZE, depth=2, embed_dim=32, num_heads=2,
            depth_token_only=2,
        ),
        "timm `cait_xxs24_224`", "blocks_token_only.1.norm1", (4, 4),
    ),
    "Hiera": Family(timm_hiera, "timm `hiera_tiny_224` (zero head)", "blocks.11.norm1", (2, 2)),
    "MaxViT": Family(
        lambda: timm_model("maxvit_rmlp_pico_rw_256", img_size=SIZE, depths=(1, 1, 1, 1)),
        "timm `maxvit_rmlp_pico_rw_256`", "norm", (2, 2),
    ),
    "ConvNeXt": Family(
        lambda: timm_model("convnext_atto", depths=(1, 1, 1, 1)),
        "timm `convnext_atto`", "stages", (2, 2),
    ),
    "EfficientNet": Family(
        lambda: timm_model("efficientnet_b0"), "timm `efficientnet_b0`", "bn2", (2, 2)
    ),
    "ResNet": Family(lambda: timm_model("resnet18"), "timm `resnet18`", "layer4", (2, 2)),
    "RegNet": Family(lambda: timm_model("regnetx_002"), "timm `regnetx_002`", "s4", (2, 2)),
    "MobileNet": Family(
        lambda: timm_model("mobilenetv3_small_050"), "timm `mobilenetv3_small_050`", "blocks",
        (2, 2),
    ),
}  # fmt: skip
#: Families whose fit costs well under a second: the fast lane fits these in both namespaces.
QUICK_FITS = ("ViT", "ViT (torchvision)", "ViT (Hugging Face)")


# -- 1. token layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "layer", "prefix"),
    [
        (timm_vit, "blocks.1.norm1", 1),
        (lambda: timm_model("deit_tiny_distilled_patch16_224", **TINY_VIT), "blocks.1.norm1", 2),
        (lambda: timm_model("vit_small_patch14_reg4_dinov2", **TINY_VIT), "blocks.1.norm1", 5),
        (timm_vit_without_class_token, "blocks.1.norm1", 0),
        (torchvision_vit, "encoder.layers.encoder_layer_1.ln_1", 1),
        (hf_vit, "vit.layers.1.layernorm_before", 1),
        (hf_deit, "deit.layers.1.layernorm_before", 2),
        (hf_dinov2_registers, "dinov2_with_registers.encoder.layer.1.norm1", 5),
        (hf_clip, "vision_model.encoder.layers.1.layer_norm1", 1),
    ],
    ids=[
        "vit",
        "deit-distilled",
        "dinov2-reg4",
        "vit-no-class-token",
        "torchvision",
        "hf",
        "hf-deit",
        "hf-dinov2-reg4",
        "hf-clip",
    ],
)
def test_the_prefix_tokens_come_from_the_model_and_drop_out_of_the_grid(
    build: Callable[[], nn.Module], layer: str, prefix: int
) -> None:
    model = build()
    assert token_layout(model, layer).prefix == prefix
    wrapped = nn.Module()
    wrapped.net = model  # a LightningModule holding the model: its ancestors still say
    assert token_layout(wrapped, f"net.{layer}").prefix == prefix
    recorded: list[torch.Tensor] = []
    hook = model.get_submodule(layer).register_forward_hook(lambda m, a, out: recorded.append(out))
    with torch.no_grad():
        model(images())
    hook.remove()
    tokens = recorded[0]
    assert tokens.shape[1] == prefix + 16
    maps = compute_cams(model, images(), layer, "gradcam")
    assert maps[layer, "gradcam"].shape == (2, 4, 4)
    grid = as_spatial(layer, tokens, input_size=(SIZE, SIZE), layout=token_layout(model, layer))
    # Patch token (row 2, col 3) is token prefix + 2 * 4 + 3, whatever the prefix.
    assert torch.equal(grid[1, :, 2, 3], tokens[1, prefix + 2 * 4 + 3])


@pytest.mark.parametrize(
    ("build", "layer"),
    [(timm_vit, "patch_embed"), (hf_vit, "vit.embeddings.patch_embeddings")],
    ids=["timm", "hf"],
)
def test_the_patch_embedding_before_the_prefix_tokens_join_is_a_grid_too(
    build: Callable[[], nn.Module], layer: str
) -> None:
    model = build()
    assert token_layout(model, layer).prefix == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: a map may be zero
        result = compute_cams(model, images(), layer, "gradcam")
    assert result[layer, "gradcam"].shape == (2, 4, 4)


def test_a_declared_prefix_reads_grids_of_any_aspect_and_refuses_what_is_no_grid() -> None:
    tokens = torch.randn(2, 2 + 4 * 6, 8)  # class + distillation token, a 64x96 input
    grid = as_spatial("blocks.1", tokens, input_size=(64, 96), layout=TokenLayout(prefix=2))
    assert grid.shape == (2, 8, 4, 6)
    assert torch.equal(grid[0, :, 3, 5], tokens[0, 2 + 3 * 6 + 5])
    without_size = as_spatial("blocks.1", tokens[:, :18], layout=TokenLayout(prefix=2))
    assert without_size.shape == (2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"'blocks\.1'.*\(2, 19, 8\).*2 prefix tokens.*reshape="):
        as_spatial("blocks.1", tokens[:, :19], input_size=(64, 64), layout=TokenLayout(prefix=2))


class UndeclaredViT(nn.Module):
    """A hand-written ViT with a class and a distillation token under names no library uses."""

    def __init__(self, patch_size: int | None) -> None:
        super().__init__()
        if patch_size is not None:
            self.patch_size = patch_size
        self.embed = nn.Conv2d(3, 16, 16, stride=16)
        self.first = nn.Parameter(torch.randn(1, 1, 16))
        self.second = nn.Parameter(torch.randn(1, 1, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)
        batch = patches.shape[0]
        extra = [self.first.expand(batch, -1, -1), self.second.expand(batch, -1, -1)]
        tokens = self.norm(torch.cat([*extra, patches], dim=1))
        return self.head(tokens.mean(dim=1))


def test_an_undeclared_prefix_is_inferred_only_from_the_patch_size_else_refused() -> None:
    torch.manual_seed(0)
    x = images(2, (64, 96))
    declared = UndeclaredViT(patch_size=16)
    assert token_layout(declared, "norm") == TokenLayout(None, (16, 16))
    result = compute_cams(declared, x, "norm", "gradcam")
    assert result["norm", "gradcam"].shape == (2, 4, 6)  # 26 tokens: 2 before 4 x 6 patches
    with pytest.raises(ValueError, match=r"'norm' outputs shape \(2, 26, 16\).*reshape="):
        compute_cams(UndeclaredViT(patch_size=None), x, "norm", "gradcam")


def test_hiera_tokens_in_mask_unit_order_are_put_back_on_the_grid() -> None:
    model = timm_hiera()
    nn.init.normal_(model.head.fc.weight, std=0.02, generator=torch.Generator().manual_seed(1))
    x, targets = images(), torch.tensor([1, 3])
    recorded: list[torch.Tensor] = []

    def record(_: nn.Module, __: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        recorded.append(output)

    # The three stages whose tokens are not yet in row-major order, and their grids.
    for block, side in ((0, 16), (2, 8), (5, 4)):
        name = f"blocks.{block}"
        got = compute_cams(model, x, name, "layercam", target=targets)[name, "layercam"]
        recorded.clear()
        handle = model.blocks[block].register_forward_hook(record)
        model(x).gather(1, targets[:, None]).sum().backward()
        handle.remove()
        model.zero_grad()
        # timm's own `reroll` (what its forward_intermediates uses): [B, h, w, C]
        activations = model.reroll(recorded[0].detach(), block)
        gradients = model.reroll(recorded[0].grad, block)
        expected = (gradients.clamp(min=0) * activations).sum(-1).clamp(min=0)
        assert got.shape == expected.shape == (2, side, side)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7 * float(expected.max()))
        assert expected.max() > 0
    # The patch embedding runs before the unrolling: its tokens are row-major, left as they are.
    tokens = model.patch_embed(x)
    layout = token_layout(model, "patch_embed")
    grid = as_spatial("patch_embed", tokens, None, (SIZE, SIZE), model.patch_embed, layout, 2)
    assert torch.allclose(grid, model.patch_embed.proj(x), atol=1e-6)


def test_a_poolers_one_value_per_token_is_refused_as_no_grid() -> None:
    model = hf_swin()
    with pytest.raises(ValueError, match=r"'swin.pooler' outputs \(2, 64, 1\): one value per"):
        compute_cams(model, images(), "swin.pooler")
    # One value per patch from a layer that pools nothing (a per-patch score) is a grid.
    scores = as_spatial(
        "score", torch.arange(32.0).reshape(2, 16, 1), None, (16, 16), nn.Linear(8, 1)
    )
    assert torch.equal(scores, torch.arange(32.0).reshape(2, 1, 4, 4))


class SequenceFirstViT(nn.Module):
    """A ViT on torch's `nn.TransformerEncoder`, with its tokens sequence-first `[N, B, C]`
    (torch's default) or batch-first."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, 32, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 32))
        block = nn.TransformerEncoderLayer(
            32, 2, 64, dropout=0.0, batch_first=batch_first, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], 1)
        if self.batch_first:
            return self.head(self.encoder(tokens)[:, 0])
        return self.head(self.encoder(tokens.transpose(0, 1))[0])


@pytest.mark.parametrize("batch", [1, 2, 4, 16])
def test_sequence_first_tokens_are_refused_and_the_reshape_it_names_is_exact(batch: int) -> None:
    layer = "encoder.layers.1.norm1"
    x = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    sequence_first = SequenceFirstViT(batch_first=False).eval()
    with pytest.raises(ValueError, match=rf"outputs \(17, {batch}, 32\) for a batch of {batch}"):
        compute_cams(sequence_first, x, layer)
    reshape = lambda t: t[1:].permute(1, 2, 0).unflatten(2, (4, 4))  # noqa: E731
    got = compute_cams(sequence_first, x, layer, "layercam", reshape=reshape)[layer, "layercam"]
    batch_first = SequenceFirstViT(batch_first=True).eval()
    expected = compute_cams(batch_first, x, layer, "layercam")[layer, "layercam"]
    assert got.shape == (batch, 4, 4)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))
    assert expected.max() > 0


# -- 2. never an image from a tensor that is not one ----------------------------------------------


def test_an_attention_tensor_named_as_the_layer_is_refused_with_its_shape() -> None:
    model = timm_model("vit_tiny_patch16_224", img_size=SIZE, depth=2)  # 3 heads of 64
    with pytest.raises(
        ValueError, match=r"'blocks\.1\.attn\.k_norm' outputs \(2, 3, 17, 64\) for a 64x64 "
        r"input.*\[B, heads, tokens, dim\].*reshape="
    ):  # fmt: skip
        compute_cams(model, images(), "blocks.1.attn.k_norm", "gradcam")
    heads = torch.randn(2, 3, 17, 64)
    assert as_spatial("attn", heads).shape == heads.shape, "no input size: nothing to check"

    def cells_of(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, 1:].mean(1).transpose(1, 2).reshape(2, 64, 4, 4)

    cells = as_spatial("attn", heads, reshape=cells_of, input_size=(SIZE, SIZE))
    assert cells.shape == (2, 64, 4, 4)


def test_a_map_with_a_stride_per_side_is_refused_unless_reshape_says_it_is_one() -> None:
    crnn = torch.randn(2, 8, 1, 32)  # a text recogniser's features: height pooled away
    with pytest.raises(ValueError, match=r"'cnn' outputs \(2, 8, 1, 32\).*reshape=lambda t: t"):
        as_spatial("cnn", crnn, input_size=(32, 128))
    assert as_spatial("cnn", crnn, reshape=lambda t: t, input_size=(32, 128)) is crnn


def test_the_automatic_choice_skips_attention_shaped_outputs() -> None:
    class Heads(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            batch, count, channels = tokens.shape
            return tokens.reshape(batch, count, 2, channels // 2).transpose(1, 2)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.heads = Heads()
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.conv(x).flatten(2).transpose(1, 2)  # [B, 256, 8]
            split = self.heads(tokens)  # [B, 2, 256, 4]: no image
            return self.head(split.mean(2).flatten(1))

    torch.manual_seed(0)
    model = Model()
    assert first_spatial_layer(model, images(), None) == "conv"
    with pytest.raises(ValueError, match=r"'heads' outputs \(2, 2, 256, 4\) for a 64x64"):
        compute_cams(model, images(), "heads")


# -- 3. the automatic choice, structural for transformers ----------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_gets_the_layer_of_the_docs_table(family: str) -> None:
    build, _, layer, grid = FAMILIES[family]
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: some maps may be all zero
        assert first_spatial_layer(model, images(), None) == layer
        result = compute_cams(model, images(), layer, ["gradcam", "hirescam"])
    assert result[layer, "gradcam"].shape == (2, *grid)
    # A zero head gives zero maps (the fit below trains it); any other random model some heat.
    heat = any(bool(result[layer, method].any()) for method in ("gradcam", "hirescam"))
    assert heat == ("zero head" not in FAMILIES[family].model)


@pytest.mark.parametrize(
    ("build", "head", "layer"),
    [
        (timm_vit, "head", "blocks.1.norm1"),
        (torchvision_vit, "heads.head", "encoder.layers.encoder_layer_1.ln_1"),
        (hf_vit, "classifier", "vit.layers.1.layernorm_before"),
    ],
    ids=["timm", "torchvision", "hf"],
)
def test_a_zero_head_does_not_change_the_choice(
    build: Callable[[], nn.Module], head: str, layer: str
) -> None:
    model = build()
    linear = model.get_submodule(head)
    assert isinstance(linear, nn.Linear)
    nn.init.zeros_(linear.weight)
    with pytest.warns(UserWarning, match=f"maps at layer '{re.escape(layer)}' are exactly zero"):
        result = compute_cams(model, images(), first_spatial_layer(model, images(), None))
    assert result.layers == (layer,)
    assert not result[layer, "gradcam"].any(), "no gradient yet: a zero map, said in a warning"


def test_an_attention_pooling_head_makes_the_final_norm_the_choice() -> None:
    # SigLIP-style: a latent query attends over the final norm's tokens (timm's `attn_pool`).
    model = timm_model("vit_tiny_patch16_224", class_token=False, global_pool="map", **TINY_VIT)
    assert first_spatial_layer(model, images(), None) == "norm"


def test_attention_internals_shaped_like_an_image_do_not_hide_the_block() -> None:
    # Patch 8 at 64 px without a class token: 64 tokens, and heads of 64 channels, so the keys
    # [B, 2, 64, 64] read as a 64 x 64 image; they run inside the last attention.
    model = timm_model(
        "vit_tiny_patch16_224", patch_size=8, class_token=False, global_pool="avg",
        img_size=SIZE, depth=2, embed_dim=128, num_heads=2,
    )  # fmt: skip
    assert first_spatial_layer(model, images(), None) == "blocks.1.norm1"


class HybridClassifier(nn.Module):
    """A transformer block on patch tokens, then (with `convolutions`) convolutions on its grid:
    the block is then a backbone; without them the head reads the tokens' mean."""

    def __init__(self, convolutions: bool) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 16, stride=16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True)
        self.conv = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.convolutions = convolutions
        self.head = nn.Linear(8 if convolutions else 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.block(self.embed(x).flatten(2).transpose(1, 2))  # [B, 16, 16]
        if not self.convolutions:
            return self.head(tokens.mean(dim=1))
        grid = tokens.transpose(1, 2).reshape(x.shape[0], 16, 4, 4)
        return self.head(self.conv(grid).mean(dim=(2, 3)))


def test_convolutions_after_the_last_attention_are_chosen_as_in_a_cnn() -> None:
    torch.manual_seed(0)
    assert first_spatial_layer(HybridClassifier(convolutions=True), images(), None) == "conv"
    tokens_only = HybridClassifier(convolutions=False)
    assert first_spatial_layer(tokens_only, images(), None) == "block.norm1"  # torch's MHA


@pytest.mark.parametrize("failing", [False, True], ids=["success", "exception"])
def test_the_choice_leaves_a_transformer_the_hooks_it_had(failing: bool) -> None:
    model = hf_clip()
    attention = model.get_submodule("vision_model.encoder.layers.1.self_attn")
    attention.register_forward_pre_hook(lambda *a, **k: None, with_kwargs=True)

    def hooks() -> list[tuple[str, int, int, int]]:
        return [
            (
                n,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._forward_pre_hooks_with_kwargs),
            )
            for n, m in model.named_modules()
        ]

    def forward(module: nn.Module, x: torch.Tensor) -> Any:
        if failing:
            raise RuntimeError("forward broke")
        return module(x)

    before = hooks()
    if failing:
        with pytest.raises(RuntimeError, match="forward broke"):
            first_spatial_layer(model, images(), forward)
    else:
        first_spatial_layer(model, images(), forward)
    assert hooks() == before


# -- 4. Hugging Face outputs ----------------------------------------------------------------------


def test_hugging_face_logits_are_read_without_output_transform() -> None:
    model = hf_vit()
    x = images()
    with torch.no_grad():
        logits = model(x).logits
    layer = "vit.layers.1.layernorm_before"
    result = compute_cams(model, x, layer)
    assert torch.allclose(result.logits, logits, atol=1e-6)
    assert torch.equal(result.targets, logits.argmax(dim=1))
    chosen = compute_cams(model, x, layer, output_transform="logits")
    assert torch.equal(chosen[layer, "gradcam"], result[layer, "gradcam"])


def test_structured_outputs_without_logits_keep_asking_for_output_transform() -> None:
    torch.manual_seed(0)
    backbone = hf_vit().vit  # a ViTModel: last_hidden_state and pooler_output, no logits
    assert isinstance(backbone, ViTModel)
    with pytest.raises(ValueError, match=r"returned a BaseModelOutput.*output_transform="):
        compute_cams(backbone, images(), "layers.1.layernorm_before")
    plain = {"logits": torch.zeros(2, 5), "domain": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"returned a dict \('logits'.*output_transform='logits'"):
        pick_logits(plain, None)


# -- 5. agreement with pytorch-grad-cam -----------------------------------------------------------


def vit_reshape_transform(tensor: torch.Tensor, height: int = 4, width: int = 4) -> torch.Tensor:
    """pytorch-grad-cam's documented `reshape_transform` for ViTs (its vit_example.py)."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


class LogitsOf(nn.Module):
    """pytorch-grad-cam's Hugging Face recipe: a wrapper returning `.logits`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits  # type: ignore[no-any-return]


def grad_cam_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[Any, Any]:
    """pytorch-grad-cam's raw Grad-CAM at `layer` (before its scaling) and its final output."""
    with GradCAM(model, [layer], reshape_transform=vit_reshape_transform) as cam:
        final = cam(input_tensor=x, targets=None)
        captured = cam.activations_and_grads
        acts, grads = captured.activations[0].numpy(), captured.gradients[0].numpy()
        raw = np.maximum(cam.get_cam_image(x, layer, None, acts, grads), 0)
    return raw, final


@pytest.mark.parametrize(
    ("build", "layer"),
    [(timm_vit, "blocks.1.norm1"), (hf_vit, "vit.layers.1.layernorm_before")],
    ids=["timm", "hf"],
)
def test_grad_cam_equals_pytorch_grad_cam_on_vits(
    build: Callable[[], nn.Module], layer: str
) -> None:
    model, x = build(), torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    ours = compute_cams(model, x, first_spatial_layer(model, x, None))
    assert ours.layers == (layer,)
    raw = ours[layer, "gradcam"].numpy()
    peer = LogitsOf(model) if isinstance(model, ViTForImageClassification) else model
    theirs, final = grad_cam_maps(peer, model.get_submodule(layer), x)
    assert raw.shape == theirs.shape == (3, 4, 4)
    assert raw.max() > 1e-3, "a map with heat, not a trivially equal zero"
    assert np.abs(raw - theirs).max() <= 1e-6 * np.abs(theirs).max()  # relative to the heat
    # Their output: each map min-max scaled and resized to the input; ours through the same.
    ours_scaled = scale_cam_image(scale_cam_image(raw, (SIZE, SIZE))[:, None].mean(axis=1))
    assert np.abs(ours_scaled - final).max() <= 1e-6


# -- the docs table -------------------------------------------------------------------------------


def test_the_docs_table_shows_the_measured_choices() -> None:
    text = (ROOT / "docs" / "methods.md").read_text()
    rows = re.findall(r"^\| (.+?) \| (.+?) \| `(.+?)` \| (\d+) x (\d+) \|$", text, re.MULTILINE)
    table = {family: (model, layer, (int(h), int(w))) for family, model, layer, h, w in rows}
    expected = {name: (f.model, f.layer, f.grid) for name, f in FAMILIES.items()}
    assert table == expected


# -- real fits with CamMonitor() ------------------------------------------------------------------


class NetSteps:
    """A family's model trained with SGD on 64 px shapes; `build` makes the network."""

    build: Callable[[], nn.Module]

    def __init__(self) -> None:
        super().__init__()
        self.net = type(self).build()
        self.net.train()

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)  # a Hugging Face model's ModelOutput as it is

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        output = self(x)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        return nn.functional.cross_entropy(logits, y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return self.loss(batch)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@cache
def steps_of(family: str) -> type:
    build = FAMILIES[family].build
    return type(f"{family.split()[0]}Steps", (NetSteps,), {"build": staticmethod(build)})


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=() if f in QUICK_FITS else pytest.mark.slow) for f in FAMILIES],
)
def test_a_fit_without_a_layer_monitors_the_expert_layer(
    family: str, lightning: Lightning, tmp_path: Path
) -> None:
    layer, grid = f"net.{FAMILIES[family].layer}", FAMILIES[family].grid
    monitor = CamMonitor(num_probe=4, save_dir=tmp_path / "history")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            monitor, tmp_path, lightning, model=lightning.module(steps_of(family)),
            train=shapes_dataset(16, size=SIZE), val=shapes_dataset(8, size=SIZE, seed=1),
            max_epochs=2,
        )  # fmt: skip
    assert monitor.layers == [layer]
    assert any(f"no layer given, using {layer!r}" in str(w.message) for w in caught)
    history = read_history(tmp_path / "history")
    assert len(history) >= 2
    last = history[-1].maps["val", layer, "gradcam"]
    assert last.shape == (4, *grid)
    assert (last.reshape(4, -1).max(axis=1) > 0).all(), "every probe image has heat by now"
