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
        self.head_dim = cfg.dim // cfg.heads  # Dh
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)  # residual output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N_img, P, D_v] -> [N_img, P, D_v]."""
        N, P, _ = x.shape
        qkv = self.qkv(x).view(N, P, 3, self.heads, self.head_dim)  # [N_img, P, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N_img, H, P, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [N_img, H, P, Dh]
        out = out.transpose(1, 2).reshape(N, P, self.heads * self.head_dim)  # [N_img, P, D_v]
        return self.proj(out)


def vision_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The MLP activation ``name`` (one of VISION_ACTS), written as transformers' ACT2FN computes it."""
    if name == "gelu":
        return F.gelu(x)  # exact (erf); ACT2FN["gelu"]
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")  # ACT2FN["gelu_pytorch_tanh"], SigLIP's
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)  # ACT2FN["quick_gelu"], CLIP's
    raise ValueError(f"unknown vision activation {name!r}")


class VisionMLP(nn.Module):
    """Linear -> activation (cfg.act) -> Linear, hidden width cfg.mlp_hidden."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = cfg.act
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)  # residual output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(vision_activation(self.fc1(x), self.act))


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

    Options for pretrained towers (all off by default): ``cfg.class_token`` prepends a learned CLS
    token that the blocks attend to and whose output is dropped (LLaVA's "default" feature select);
    ``cfg.pre_norm`` normalizes the embeddings before the first block; ``cfg.final_norm=False`` returns
    the last block's output as it is.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.dim)) if cfg.class_token else None
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + int(cfg.class_token), cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else None

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
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)  # [N_img, 1, D_v]
            x = torch.cat([cls, x], dim=1)  # [N_img, 1 + P, D_v]
        x = x + self.position_embedding  # [N_img, P, D_v] (1 + P with the CLS token)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        if self.class_embedding is not None:
            x = x[:, 1:]  # [N_img, P, D_v]: the CLS output is not an image token
        return x if self.norm is None else self.norm(x)  # [N_img, P, D_v]
