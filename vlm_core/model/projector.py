"""The projector: maps vision features into the decoder's embedding space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """(LayerNorm ->) Linear(D_v -> D_h) -> GELU -> Linear(D_h -> D): LLaVA-1.5's ``mlp2x_gelu``, or with
    ``layer_norm`` InternVL's ``mlp1`` (a LayerNorm over the vision features first).

    ``forward(features)``: [..., D_v] -> [..., D]; applied per patch, so P tokens per image stay P.
    """

    def __init__(self, vision_dim: int, hidden_dim: int, dim: int, layer_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim, eps=norm_eps) if layer_norm else None
        self.fc1 = nn.Linear(vision_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            features = self.norm(features)
        return self.fc2(F.gelu(self.fc1(features)))
