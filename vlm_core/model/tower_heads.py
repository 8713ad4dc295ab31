"""Per-patch classifier heads for pretraining the vision tower (stage 0).

Stage 0 stands in for CLIP pretraining: the tower learns, for every patch (grid cell), the
scene-graph attributes of the object in it (colour, shape, size, word, row, col). Cells without
an object carry ``IGNORE_INDEX`` (or a dedicated "empty" class, as the data path chooses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_core.types import IGNORE_INDEX


class TowerHeads(nn.Module):
    """One linear classifier per label space, applied to every patch feature.

    ``label_spaces`` maps a head name to its number of classes (e.g. ``{"color": 10, "shape": 8}``).
    """

    def __init__(self, dim: int, label_spaces: dict[str, int]) -> None:
        super().__init__()
        if not label_spaces:
            raise ValueError("TowerHeads: label_spaces is empty; name at least one head and its class count")
        for name, classes in label_spaces.items():
            if classes < 2:
                raise ValueError(f"TowerHeads: head {name!r} has {classes} classes; a classifier needs at least 2")
        self.heads = nn.ModuleDict({name: nn.Linear(dim, classes) for name, classes in label_spaces.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features [N, P, D_v] -> {name: logits [N, P, classes]}."""
        return {name: head(features) for name, head in self.heads.items()}

    def loss(
        self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean over heads of the per-patch cross-entropy, and each head's accuracy.

        logits: {name: [N, P, classes]}; labels: {name: LongTensor [N, P]}, ``IGNORE_INDEX`` where a
        patch has no label. Returns (scalar loss, {name: accuracy}); accuracies are detached 0-d float
        tensors over the labelled patches (kept on the device so a training step does not sync; NaN
        for a head with no labelled patch in the batch, whose loss term is then 0).
        """
        if set(logits) != set(labels):
            raise ValueError(f"TowerHeads.loss: logits heads {sorted(logits)} differ from label heads {sorted(labels)}")
        losses, accuracy = [], {}
        for name, head_logits in logits.items():
            head_labels = labels[name]
            if head_labels.shape != head_logits.shape[:-1]:
                raise ValueError(
                    f"TowerHeads.loss: labels[{name!r}] has shape {tuple(head_labels.shape)}, "
                    f"expected {tuple(head_logits.shape[:-1])} (one label per patch)"
                )
            flat_logits = head_logits.reshape(-1, head_logits.shape[-1])  # [N*P, classes]
            flat_labels = head_labels.reshape(-1)  # [N*P]
            labelled = flat_labels != IGNORE_INDEX
            # sum / max(count, 1) instead of the mean reduction: a head with no labelled patch gives 0, not NaN.
            per_patch = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            losses.append(per_patch / labelled.sum().clamp(min=1))
            correct = (flat_logits.argmax(-1) == flat_labels) & labelled
            accuracy[name] = (correct.sum() / labelled.sum()).detach().float()
        return torch.stack(losses).mean(), accuracy
