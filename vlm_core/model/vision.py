"""The vision tower: a ViT that turns each image into P patch features of width D_v."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_core.model.config import VisionConfig


class VisionAttention(nn.Module):
    """Multi-head self-attention over the patches of one image, bidirectional (no mask)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)  # residual output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N_img, P, D_v] -> [N_img, P, D_v]."""
        N, P, D_v = x.shape
        Dh = D_v // self.heads
        qkv = self.qkv(x).view(N, P, 3, self.heads, Dh)  # [N_img, P, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N_img, H, P, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [N_img, H, P, Dh]
        out = out.transpose(1, 2).reshape(N, P, D_v)  # [N_img, P, D_v]
        return self.proj(out)


class VisionMLP(nn.Module):
    """Linear -> GELU -> Linear, hidden width mlp_ratio * D_v."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.dim)  # residual output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = VisionAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class VisionTower(nn.Module):
    """ViT: Conv2d patch embedding (stride = patch), learned positions, pre-norm blocks, final LayerNorm.

    ``forward(images)``: images [N_img, C, H, W] float with H == W == cfg.image_size and C ==
    cfg.channels; returns [N_img, P, D_v] with P = (image_size / patch_size)^2 patches in row-major
    order (patch (r, c) of the grid is index r * grid + c). N_img may be 0.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.dim))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"VisionTower: images have shape {tuple(images.shape)}, expected [N_img, {', '.join(map(str, expected))}] "
                f"(model.vision.image_size={cfg.image_size}); resize images to the model's input size"
            )
        if not images.is_floating_point():
            raise ValueError(f"VisionTower: images must be float (preprocessed), got {images.dtype}")
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # [N_img, D_v, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [N_img, P, D_v], row-major patches
        x = x + self.position_embedding  # [N_img, P, D_v]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # [N_img, P, D_v]
