"""Backbones: a feature extractor `(N, C, H, W) -> (N, features)` with `.features` set.

`cnn` is a small ResNet-style net that trains in seconds on 8x8 digits on a CPU. `resnet` is
the ImageNet-style ResNet with basic blocks (ResNet-18/34 layouts) for real photos. `vit` is a
Vision Transformer sized by config to load a GPU; its attention runs through PyTorch's fused
scaled-dot-product kernels. docs/models.md says when to use which.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig


class ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels_out),
        )
        needs_projection = stride != 1 or channels_in != channels_out
        self.shortcut = (
            nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out))
            if needs_projection
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, width: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        channels = width
        for stage in range(depth):
            out = width * 2**stage
            layers.append(ResidualBlock(channels, out, stride=1 if stage == 0 else 2))
            channels = out
        # Pool to 2x2, not 1x1: for glyph-like images *where* a stroke is matters as much as what it is.
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.features = channels * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResNet(nn.Module):
    """ResNet with basic blocks (He et al. 2016): stage i has `blocks[i]` blocks of width `width * 2**i`.

    Inputs of at least LARGE_INPUT px get the ImageNet stem (7x7 stride 2, 3x3 max-pool: 224 -> 56
    before the first stage); smaller ones a 3x3 stride-1 stem, so 8-32 px images are not pooled
    away before any block sees them. Convolutions, BatchNorm, ReLU and pooling only: every layer
    keeps a channels_last input channels_last.
    """

    LARGE_INPUT = 64

    def __init__(self, image_shape: tuple[int, int, int], width: int, blocks: list[int]):
        super().__init__()
        channels, height, image_width = image_shape
        if min(height, image_width) >= self.LARGE_INPUT:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True))
        stages, channels = [], width
        for i, count in enumerate(blocks):
            out = width * 2**i
            # The first block of a stage changes width and halves the resolution (not in stage 0), the rest keep both.
            stages.append(nn.Sequential(*(ResidualBlock(channels if j == 0 else out, out, 2 if i and not j else 1)
                                          for j in range(count))))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.features = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN gamma of every residual branch (Goyal et al. 2017): each block starts
        # as its shortcut, so the network starts shallow and large-batch training is stable early on.
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.body[-1].weight)

    # No compile_regions: training.compile_in_place compiles the whole model. Regional compilation pays
    # when identical layers share one graph (a ViT's blocks); the stages differ in shape and would share
    # only Dynamo's per-code-object cache, which their train/eval/batch-size variants overflow
    # (recompile_limit 8), leaving the rest to run uncompiled. Measured: docs/models.md.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; attention through scaled_dot_product_attention (flash kernels on GPU).

    Our own module rather than nn.TransformerEncoderLayer: Dynamo will not compile a torch.nn
    layer as a region of its own, and one fused qkv projection is what the kernels want anyway.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.width {dim} must be a multiple of model.heads {heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], dim: int, depth: int, heads: int, patch: int):
        super().__init__()
        channels, height, width = image_shape
        if height % patch or width % patch:
            raise ValueError(f"model.patch_size {patch} must divide the image size {height}x{width}")
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        self.position = nn.Parameter(torch.zeros(1, (height // patch) * (width // patch), dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.features = dim

    def compile_regions(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)  # mean-pool: no class token needed


def build_backbone(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    if cfg.arch == "cnn":
        return ConvNet(image_shape[0], cfg.width, cfg.depth)
    if cfg.arch == "resnet":
        return ResNet(image_shape, cfg.width, cfg.blocks)
    if cfg.width % cfg.heads:
        raise ValueError(f"model.width {cfg.width} must be divisible by model.heads {cfg.heads}")
    return VisionTransformer(image_shape, cfg.width, cfg.depth, cfg.heads, cfg.patch_size)
