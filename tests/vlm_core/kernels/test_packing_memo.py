"""LastPacking: per-batch work reused only for the very same, unchanged packing tensors."""

from __future__ import annotations

import pytest
import torch

from vlm_core.kernels.packing_memo import LastPacking


def counting():
    calls = []

    def build():
        calls.append(1)
        return object()

    return calls, build


def test_the_same_tensors_reuse_the_value():
    memo, (calls, build) = LastPacking(), counting()
    cu, groups = torch.tensor([0, 3, 5], dtype=torch.int32), torch.zeros(5, dtype=torch.int32)
    first = memo.get(cu, groups, (5,), build)
    assert memo.get(cu, groups, (5,), build) is first and len(calls) == 1
    assert memo.get(cu, None, (5,), build) is not first  # text only is another packing


@pytest.mark.parametrize("change", ["in place", "equal copy", "other extra", "cu in place"])
def test_anything_else_builds_anew(change):
    memo, (calls, build) = LastPacking(), counting()
    cu, groups = torch.tensor([0, 3, 5], dtype=torch.int32), torch.zeros(5, dtype=torch.int32)
    first = memo.get(cu, groups, (5, 3), build)
    extra = (5, 3)
    if change == "in place":
        groups[1] = 2  # the version counter moves
    elif change == "equal copy":
        groups = groups.clone()  # equal values, another tensor: identity, not values, is the key
    elif change == "other extra":
        extra = (5, 4)
    else:
        cu[1] = 2
    assert memo.get(cu, groups, extra, build) is not first and len(calls) == 2


def test_a_tensor_at_a_recycled_address_does_not_match():
    memo, (calls, build) = LastPacking(), counting()
    memo.get(torch.tensor([0, 4], dtype=torch.int32), None, (4,), build)  # freed right away
    memo.get(torch.tensor([0, 4], dtype=torch.int32), None, (4,), build)  # may reuse the storage
    assert len(calls) == 2


def test_a_build_that_raises_stores_nothing():
    memo = LastPacking()
    cu = torch.tensor([0, 4], dtype=torch.int32)
    good = memo.get(cu, None, (4,), object)

    def bad():
        raise ValueError("bad packing")

    for _ in range(2):  # raises every time: a failure is never remembered as a success
        with pytest.raises(ValueError, match="bad packing"):
            memo.get(cu, None, (5,), bad)
    assert memo.get(cu, None, (4,), object) is good  # the last good value survives the failures


def test_inference_tensors_build_every_time():
    """They keep no version counter, so an in-place change under inference_mode could not be seen."""
    memo, (calls, build) = LastPacking(), counting()
    with torch.inference_mode():
        cu = torch.tensor([0, 4], dtype=torch.int32)
        memo.get(cu, None, (4,), build)
        memo.get(cu, None, (4,), build)
    assert len(calls) == 2
