"""Packing invariants, the attention rule of DESIGN.md on packed batches, and resumable sample order."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm_core.data.dataset import SFTDataset
from vlm_core.data.image import ImageProcessor
from vlm_core.data.packing import PackedLoader, SampleStream, pack, pad_rows_for
from vlm_core.data.tokenizer import ChatEncoder
from vlm_core.types import IGNORE_INDEX, PackedBatch, Sample, TokenizedSample, Turn

PAD_ID = 0
IMAGE_ID = 3
TAG = 100_000  # the first token of sample i is TAG + i, so every packed segment names its sample


def random_sample(rng: np.random.Generator, index: int, row_len: int) -> TokenizedSample:
    """A sample of random length with 0-3 images of 1-4 tokens each, at random places (possibly adjacent)."""
    length = int(rng.integers(1, row_len + 1))
    sizes = [int(size) for size in rng.integers(1, 5, size=int(rng.integers(0, 4)))]
    while sum(sizes) > length - 1:  # position 0 holds the tag, so images fit in length - 1 slots
        sizes.pop()
    text_after_tag = length - 1 - sum(sizes)
    cuts = np.sort(rng.integers(0, text_after_tag + 1, size=len(sizes)))
    gaps = np.diff(np.concatenate([[0], cuts, [text_after_tag]]))  # text tokens before image 1, ..., after the last
    ids, groups = [TAG + index], [0]
    for k, size in enumerate(sizes):
        ids += [int(t) for t in rng.integers(10, 1000, size=int(gaps[k]))] + [IMAGE_ID] * size
        groups += [0] * int(gaps[k]) + [k + 1] * size
    ids += [int(t) for t in rng.integers(10, 1000, size=int(gaps[-1]))]
    groups += [0] * int(gaps[-1])
    input_ids = torch.tensor(ids, dtype=torch.int64)
    bidir_group = torch.tensor(groups, dtype=torch.int32)
    loss_mask = torch.from_numpy(rng.random(length) < 0.5) & (bidir_group == 0)
    # Image j of sample i is filled with 10 * i + j, so the packed image order can be traced.
    images = torch.stack([torch.full((3, 2, 2), float(10 * index + k + 1)) for k in range(len(sizes))]) if sizes else torch.empty(0, 3, 2, 2)
    return TokenizedSample(input_ids=input_ids, loss_mask=loss_mask, bidir_group=bidir_group, images=images, sample_id=f"s{index}")


def dense_attention_mask(cu_seqlens: torch.Tensor, bidir_group: torch.Tensor) -> torch.Tensor:
    """``[total, total]`` bool, DESIGN.md's rule: i attends j iff same segment and (j <= i or same image)."""
    lengths = torch.diff(cu_seqlens.to(torch.int64))
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # [total]
    position = torch.arange(len(segment))
    same_segment = segment[:, None] == segment[None, :]
    causal = position[None, :] <= position[:, None]
    same_image = (bidir_group[:, None] == bidir_group[None, :]) & (bidir_group[:, None] != 0)
    return same_segment & (causal | same_image)


def expected_labels(sample: TokenizedSample) -> list[int]:
    ids, mask = sample.input_ids.tolist(), sample.loss_mask.tolist()
    return [ids[t + 1] if t + 1 < len(ids) and mask[t + 1] else IGNORE_INDEX for t in range(len(ids))]


def check_packed(batch: PackedBatch, samples: list[TokenizedSample], row_len: int) -> list[int]:
    """Check every invariant of a packed batch; return the owning sample of each slot (-1 for padding)."""
    total = batch.rows * row_len
    assert batch.total == total and batch.row_len == row_len
    for name in ("input_ids", "position_ids", "bidir_group", "labels"):
        assert getattr(batch, name).shape == (total,), name
    assert (batch.input_ids.dtype, batch.position_ids.dtype, batch.labels.dtype) == (torch.int64,) * 3
    assert batch.cu_seqlens.dtype == torch.int32 and batch.bidir_group.dtype == torch.int32
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == total
    assert all(b > a for a, b in zip(cu, cu[1:])), "empty segment"
    assert set(range(0, total + 1, row_len)) <= set(cu), "a segment crosses a row boundary (row overflow)"
    assert batch.max_seqlen == max(b - a for a, b in zip(cu, cu[1:]))
    assert math.ceil(sum(len(s.input_ids) for s in samples) / row_len) <= batch.rows

    owner = [-1] * total
    seen: list[int] = []
    for start, end in zip(cu, cu[1:]):
        assert batch.position_ids[start:end].tolist() == list(range(end - start)), "positions must restart per segment"
        first = int(batch.input_ids[start])
        if first < TAG:  # padding: in the tail of its row, nothing to learn, no image
            assert start // row_len == (end - 1) // row_len, "a padding segment crosses a row boundary"
            assert end - start <= max(len(s.input_ids) for s in samples), "padding must not raise max_seqlen"
            row_end = (start // row_len + 1) * row_len
            assert (batch.input_ids[start:row_end] == PAD_ID).all(), "padding is followed only by padding in its row"
            assert (batch.input_ids[start:end] == PAD_ID).all() and (batch.labels[start:end] == IGNORE_INDEX).all()
            assert (batch.bidir_group[start:end] == 0).all()
            continue
        index = first - TAG
        sample = samples[index]
        seen.append(index)
        owner[start:end] = [index] * (end - start)
        assert torch.equal(batch.input_ids[start:end], sample.input_ids)
        assert batch.labels[start:end].tolist() == expected_labels(sample)
        assert torch.equal(batch.bidir_group[start:end] != 0, sample.bidir_group != 0)
    assert sorted(seen) == list(range(len(samples))), "every sample exactly once"
    assert batch.num_samples == len(samples)
    assert batch.num_real_tokens == sum(len(s.input_ids) for s in samples)
    assert batch.efficiency == pytest.approx(batch.num_real_tokens / total)

    # Images: ids 1..N_img in order of first appearance, each one contiguous span inside one sample, and
    # images[g - 1] is the image of that span.
    groups = batch.bidir_group.tolist()
    order = [g for t, g in enumerate(groups) if g and (t == 0 or groups[t - 1] != g)]
    assert order == list(range(1, len(order) + 1)), "image ids unique per image and numbered in stream order"
    assert batch.images.shape == (len(order), 3, 2, 2) == (sum(s.images.shape[0] for s in samples), 3, 2, 2)
    for g in order:
        slots = [t for t, value in enumerate(groups) if value == g]
        assert slots == list(range(slots[0], slots[-1] + 1)) and len({owner[t] for t in slots}) == 1
        index = owner[slots[0]]
        segment_start = max(c for c in cu if c <= slots[0])
        local = int(samples[index].bidir_group[slots[0] - segment_start])  # the image's number inside its sample
        assert torch.equal(batch.images[g - 1], samples[index].images[local - 1]), f"image {g} is not the one its tokens belong to"
    return owner


@pytest.mark.parametrize("seed", range(25))
def test_pack_invariants_on_random_samples(seed: int) -> None:
    rng = np.random.default_rng(seed)
    row_len = int(rng.choice([1, 7, 37, 64]))
    samples = [random_sample(rng, index, row_len) for index in range(int(rng.integers(1, 20)))]
    batch = pack(samples, row_len, pad_id=PAD_ID)
    check_packed(batch, samples, row_len)


@pytest.mark.parametrize("seed", range(10))
def test_pack_without_padding_is_the_padded_stream_less_its_padding(seed: int) -> None:
    rng = np.random.default_rng(50 + seed)
    row_len = int(rng.choice([7, 37, 64]))
    samples = [random_sample(rng, index, row_len) for index in range(int(rng.integers(1, 20)))]
    padded = pack(samples, row_len, pad_id=PAD_ID)
    owner = torch.tensor(check_packed(padded, samples, row_len))
    flat = pack(samples, row_len, pad_id=PAD_ID, pad_rows=False)
    real = owner >= 0
    assert flat.total == flat.num_real_tokens == int(real.sum()) and flat.efficiency == 1.0
    for name in ("input_ids", "position_ids", "bidir_group", "labels"):
        assert torch.equal(getattr(flat, name), getattr(padded, name)[real]), name
    assert torch.equal(flat.images, padded.images) and flat.rows == padded.rows
    lengths = torch.diff(padded.cu_seqlens)
    starts = padded.cu_seqlens[:-1].to(torch.int64)
    sample_lengths = lengths[owner[starts] >= 0]  # the padded stream's segments that are samples, in order
    assert torch.diff(flat.cu_seqlens).tolist() == sample_lengths.tolist()
    assert flat.max_seqlen == max(len(sample.input_ids) for sample in samples)
    # the attention pattern among real tokens is the padded one's
    assert torch.equal(dense_attention_mask(flat.cu_seqlens, flat.bidir_group),
                       dense_attention_mask(padded.cu_seqlens, padded.bidir_group)[real][:, real])


def test_rows_are_padded_on_the_cpu_and_not_on_a_gpu_unless_set() -> None:
    assert pad_rows_for("cpu", None) and not pad_rows_for(torch.device("cuda", 0), None)
    assert not pad_rows_for("cpu", False) and pad_rows_for("cuda", True)


@pytest.mark.parametrize("seed", range(10))
def test_attention_mask_never_links_samples_and_opens_whole_images(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    row_len = 37
    samples = [random_sample(rng, index, row_len) for index in range(12)]
    batch = pack(samples, row_len, pad_id=PAD_ID)
    owner = torch.tensor(check_packed(batch, samples, row_len))  # from the tags, not from cu_seqlens
    allowed = dense_attention_mask(batch.cu_seqlens, batch.bidir_group)  # [total, total]
    real = owner >= 0
    pairs = real[:, None] & real[None, :]
    same_sample = owner[:, None] == owner[None, :]
    assert not (allowed & pairs & ~same_sample).any(), "attention links two samples"
    position = torch.arange(batch.total)
    causal = position[None, :] <= position[:, None]
    assert (allowed | ~(pairs & same_sample & causal)).all(), "causal attention inside a sample is cut"
    groups = batch.bidir_group
    for g in range(1, int(groups.max()) + 1):
        span = torch.nonzero(groups == g).flatten()
        assert allowed[span[:, None], span[None, :]].all(), f"image {g} is not fully bidirectional"
    future = allowed & ~causal  # the only look-ahead allowed is inside one image
    assert torch.equal(future, future & (groups[:, None] == groups[None, :]) & (groups[:, None] != 0))


def test_pack_small_case_exactly() -> None:
    def sample(ids: list[int], mask: list[int], groups: list[int], name: str, images: int = 0) -> TokenizedSample:
        return TokenizedSample(
            input_ids=torch.tensor(ids),
            loss_mask=torch.tensor(mask, dtype=torch.bool),
            bidir_group=torch.tensor(groups, dtype=torch.int32),
            images=torch.full((images, 3, 2, 2), 7.0),
            sample_id=name,
        )

    a = sample([100, 11, 12, 13], [0, 0, 1, 1], [0, 0, 0, 0], "a")
    b = sample([101, 3, 3, 21], [0, 0, 0, 1], [0, 1, 1, 0], "b", images=1)
    c = sample([102, 31], [0, 1], [0, 0], "c")
    batch = pack([a, b, c], row_len=6, pad_id=9)
    # FFD: a (4) opens row 0, b (4) opens row 1, c (2) fills row 0; row 1 ends with 2 padding slots.
    assert batch.input_ids.tolist() == [100, 11, 12, 13, 102, 31, 101, 3, 3, 21, 9, 9]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 4, 6, 10, 12]
    assert batch.bidir_group.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    i = IGNORE_INDEX
    assert batch.labels.tolist() == [i, 12, 13, i, 31, i, i, i, 21, i, i, i]
    assert (batch.rows, batch.max_seqlen, batch.num_samples, batch.num_real_tokens) == (2, 4, 3, 10)
    assert batch.images.shape == (1, 3, 2, 2) and batch.efficiency == pytest.approx(10 / 12)


def test_pack_renumbers_images_across_samples() -> None:
    def one_image(tag: int, value: float) -> TokenizedSample:
        return TokenizedSample(
            input_ids=torch.tensor([tag, IMAGE_ID, IMAGE_ID, 5]),
            loss_mask=torch.tensor([False, False, False, True]),
            bidir_group=torch.tensor([0, 1, 1, 0], dtype=torch.int32),
            images=torch.full((1, 3, 2, 2), value),
        )

    batch = pack([one_image(TAG, 1.0), one_image(TAG + 1, 2.0)], row_len=8)
    assert batch.bidir_group.tolist() == [0, 1, 1, 0, 0, 2, 2, 0]
    assert batch.images[:, 0, 0, 0].tolist() == [1.0, 2.0]


def test_sample_longer_than_row_is_named() -> None:
    long = TokenizedSample(
        input_ids=torch.arange(9), loss_mask=torch.ones(9, dtype=torch.bool), bidir_group=torch.zeros(9, dtype=torch.int32),
        images=torch.empty(0, 3, 2, 2), sample_id="long-one",
    )
    with pytest.raises(ValueError, match=r"sample 'long-one' has 9 tokens, more than the row length 8; raise data.row_len"):
        pack([long], row_len=8)


def test_inconsistent_bidir_groups_are_refused() -> None:
    broken = TokenizedSample(
        input_ids=torch.tensor([1, 3, 3]), loss_mask=torch.zeros(3, dtype=torch.bool), bidir_group=torch.tensor([0, 2, 2], dtype=torch.int32),
        images=torch.zeros(1, 3, 2, 2), sample_id="gap",
    )
    with pytest.raises(ValueError, match="sample 'gap': bidir_group has image spans"):
        pack([broken], row_len=4)


def test_stream_epochs_are_seeded_permutations_and_batches_span_them() -> None:
    stream = SampleStream(num_samples=7, batch_size=3, seed=5)
    flat = [index for _ in range(7) for index in next(stream)]  # 21 indices = 3 epochs exactly
    for epoch in range(3):
        chunk = flat[7 * epoch : 7 * (epoch + 1)]
        assert chunk == np.random.default_rng([5, epoch]).permutation(7).tolist()
    assert stream.state_dict() == {"epoch": 3, "offset": 0}
    other = SampleStream(num_samples=7, batch_size=3, seed=6)
    assert [index for _ in range(7) for index in next(other)] != flat


@pytest.mark.parametrize("consumed", [0, 1, 2, 5, 7, 11])
def test_stream_resume_continues_with_the_same_batches(consumed: int) -> None:
    reference = SampleStream(num_samples=7, batch_size=3, seed=11)
    expected = [next(reference) for _ in range(consumed + 6)]
    interrupted = SampleStream(num_samples=7, batch_size=3, seed=11)
    for _ in range(consumed):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
    resumed = SampleStream(num_samples=7, batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(6)] == expected[consumed:]


@pytest.mark.parametrize(
    "state", [{"epoch": 1}, {"epoch": 0, "offset": 7}, {"epoch": -1, "offset": 0}, {"epoch": 0, "offset": 1.5}]
)
def test_stream_rejects_bad_state(state: dict) -> None:
    with pytest.raises(ValueError, match="SampleStream state"):
        SampleStream(num_samples=7, batch_size=3, seed=0).load_state_dict(state)


@pytest.fixture
def tiny_dataset(tmp_path: Path, write_png, tokenizer) -> SFTDataset:
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    samples = []
    for index in range(6):
        name = list(colors)[index % 3]
        path = write_png(tmp_path / f"{name}.png", size=8, color=colors[name])
        turns = (Turn("user", "<image>\nWhat colour is it?"), Turn("assistant", f"It is {name}." + " Yes." * index))
        samples.append(Sample(id=f"t{index}", source="test", image_paths=(path,), turns=turns))
    return SFTDataset(samples, ChatEncoder(tokenizer, num_image_tokens=4), ImageProcessor(image_size=8))


def test_packed_loader_resume_reproduces_batches(tiny_dataset: SFTDataset) -> None:
    def loader() -> PackedLoader:
        return PackedLoader(tiny_dataset, SampleStream(len(tiny_dataset), batch_size=4, seed=3), row_len=64)

    reference = loader()
    expected = [next(reference) for _ in range(5)]
    interrupted = loader()
    for _ in range(2):
        next(interrupted)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    for want, got in zip(expected[2:], (next(resumed) for _ in range(3))):
        for name in ("input_ids", "labels", "cu_seqlens", "bidir_group", "position_ids", "images"):
            assert torch.equal(getattr(want, name), getattr(got, name)), name
    first = expected[0]
    assert first.num_samples == 4 and first.images.shape == (4, 3, 8, 8)
    pad = tiny_dataset.encoder.pad_token_id
    assert (first.input_ids == pad).sum() == first.total - first.num_real_tokens  # <pad> only in padding slots


def test_packed_loader_checks_stream_size(tiny_dataset: SFTDataset) -> None:
    with pytest.raises(ValueError, match="stream draws from 5 samples but the dataset has 6"):
        PackedLoader(tiny_dataset, SampleStream(5, batch_size=2, seed=0), row_len=64)
