"""lm_loss: token-weighted and sample-weighted cross-entropy over the supervised rows only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm_core.train.lm import lm_loss
from vlm_core.types import IGNORE_INDEX, PackedBatch


class FixedHidden(nn.Module):
    """Stands in for the VLM: fixed hidden states and a linear LM head."""

    def __init__(self, hidden: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.decoder = nn.Module()
        self.decoder.head = nn.Linear(hidden.shape[1], vocab, bias=False)
        self.decoder.logits = self.decoder.head

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        return self.hidden


def make_batch(labels: list[int], seqlens: list[int]) -> PackedBatch:
    total = len(labels)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return PackedBatch(
        input_ids=torch.zeros(total, dtype=torch.int64), position_ids=torch.zeros(total, dtype=torch.int64),
        cu_seqlens=cu, max_seqlen=max(seqlens), bidir_group=torch.zeros(total, dtype=torch.int32),
        labels=torch.tensor(labels), images=torch.zeros(0, 3, 4, 4), rows=1, row_len=total,
        num_samples=len(seqlens), num_real_tokens=total,
    )


def test_token_and_sample_weighting() -> None:
    torch.manual_seed(0)
    x = IGNORE_INDEX
    # sample 0: 1 supervised token; sample 1: 3; a padding segment with none
    labels = [x, 3, x, x, 1, 2, 0, x, x]
    batch = make_batch(labels, [3, 4, 2])
    model = FixedHidden(torch.randn(9, 8), vocab=5)
    per_token = F.cross_entropy(model.decoder.logits(model.hidden), torch.tensor(labels), reduction="none",
                                ignore_index=IGNORE_INDEX)
    by_tokens = lm_loss(model, batch)
    assert by_tokens.units == 4
    torch.testing.assert_close(by_tokens.loss_sum, per_token.sum())
    by_samples = lm_loss(model, batch, per_sample=True)
    assert by_samples.units == 2  # the padding segment has no supervised token and does not count
    expected = per_token[1] + per_token[4:7].sum() / 3
    torch.testing.assert_close(by_samples.loss_sum, expected)
    assert by_samples.loss_sum.item() != pytest.approx(by_tokens.loss_sum.item())
