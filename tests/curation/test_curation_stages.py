"""Each stage on small planted data: the planted defect is removed with its reason, the rest is kept."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from planted_data import scene_pixels

from curation.config import (
    BalanceConfig,
    MixtureStageConfig,
    NearConfig,
    QualityConfig,
    SemanticConfig,
)
from curation.embed import hashed_text_embedding, l2_normalize, pixel_embedding
from curation.images import image_facts
from curation.stages.balance import balance, concept_tags
from curation.stages.exact import exact_dedup, normalize_text
from curation.stages.mixture import mixture_weights
from curation.stages.near import minhashes, near_dedup
from curation.stages.quality import alignment_scores, quality_filter, robust_z
from curation.stages.semantic import (
    Clusters,
    Neighbours,
    cluster_items,
    greedy_removals,
    merge_pairs,
    search_pairs,
    search_threshold,
    semantic_dedup,
    shard_plan,
)


def _encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_exact_dedup_matches_decoded_pixels_and_normalized_text() -> None:
    pixels = scene_pixels(1)
    png, recompressed = _encode(pixels), _encode(pixels, compress_level=9)
    assert png != recompressed
    keys = [image_facts(data, 10**6).pixel_sha for data in (png, recompressed, _encode(scene_pixels(2)))]
    texts = ["What is it?\nA box.", "  what IS it?   a box.", "What is it?\nA box."]
    result = exact_dedup(keys, texts, ["a", "b", "c"])
    assert result.removed == {1: "exact duplicate of a (same decoded pixels and normalized text)"}
    assert normalize_text(" A\n\tB ") == "a b"


def _near_inputs(rng: np.random.Generator):
    """Records 0-5 are distinct; 6 is a JPEG re-encoding of 0 with a paraphrased question; 7 has 1's text on
    another picture; 8 has 2's picture with another conversation; 9 is noised 3 with the same text."""
    pictures = [scene_pixels(seed) for seed in range(6)]
    texts = [f"How many boxes are in picture {k}? There are {k + 2} boxes." for k in range(6)]
    noisy = np.clip(pictures[3].astype(np.int16) + rng.integers(-4, 5, size=pictures[3].shape), 0, 255)
    images = pictures + [
        np.asarray(Image.open(io.BytesIO(_encode(pictures[0], "JPEG", quality=85))).convert("RGB")),
        scene_pixels(40), pictures[2], noisy.astype(np.uint8),
    ]
    texts += [
        "Please tell me: how many boxes are in picture 0? There are 2 boxes",
        texts[1],
        "Describe the colours of everything you see in this picture.",
        texts[3],
    ]
    facts = [image_facts(_encode(image), 10**6) for image in images]
    phashes = np.array([f.phash for f in facts], dtype=np.uint64)
    thumbs = np.stack([f.thumb for f in facts])
    return phashes, thumbs, texts


def test_near_dedup_removes_recompressed_and_noised_copies_only(rng: np.random.Generator) -> None:
    phashes, thumbs, texts = _near_inputs(rng)
    cfg = NearConfig()
    uids = [f"r{i}" for i in range(len(texts))]
    result = near_dedup(phashes, thumbs, np.ones(len(texts), bool), minhashes(texts, cfg), uids, cfg)
    assert sorted(result.removed) == [6, 9], result.removed
    assert result.removed[6].startswith("near duplicate of r0 (pHash distance")
    assert result.removed[9].startswith("near duplicate of r3")
    assert result.columns["near_of"].tolist() == [-1] * 6 + [0, -1, -1, 3]


def test_near_dedup_reference_records_are_indexed_but_never_removed(rng: np.random.Generator) -> None:
    phashes, thumbs, texts = _near_inputs(rng)
    cfg = NearConfig()
    uids = [f"r{i}" for i in range(len(texts))]
    # Records 0-6 are "already there": 6 (a copy of 0) stays, and 9 is still caught as a copy of reference 3.
    result = near_dedup(phashes, thumbs, np.ones(len(texts), bool), minhashes(texts, cfg), uids, cfg, reference=7)
    assert sorted(result.removed) == [9], result.removed
    assert result.columns["near_of"].tolist() == [-1] * 9 + [3]
    assert result.summary["reference"] == 7
    with pytest.raises(ValueError, match="reference=11"):
        near_dedup(phashes, thumbs, np.ones(len(texts), bool), minhashes(texts, cfg), uids, cfg, reference=11)


def test_near_dedup_text_only_records_match_on_text_alone() -> None:
    texts = ["Tell me a joke about a cat and a dog.", "Tell me a joke about a cat and a dog!", "Something else."]
    cfg = NearConfig()
    result = near_dedup(np.zeros((3, 3), np.uint64), np.zeros((3, 16, 16, 3), np.uint8), np.zeros(3, bool),
                        minhashes(texts, cfg), ["a", "b", "c"], cfg)
    assert list(result.removed) == [1]


def _planted_embeddings(rng: np.random.Generator, n: int = 600, dim: int = 32):
    """Unit vectors around 6 topics; items 500..599 are copies of items 0..99 at cosine >= 0.995."""
    centres = l2_normalize(rng.standard_normal((6, dim)))
    x = l2_normalize(centres[rng.integers(0, 6, n)] + rng.standard_normal((n, dim)) / np.sqrt(dim))
    x[500:] = l2_normalize(x[:100] + 0.05 * rng.standard_normal((100, dim)) / np.sqrt(dim))
    return x.astype(np.float32)


def test_semantic_dedup_removes_planted_copies_and_counts_every_epsilon(rng: np.random.Generator) -> None:
    x = _planted_embeddings(rng)
    cfg = SemanticConfig(epsilon=0.01, epsilons=[0.001, 0.01, 0.05], clusters=4)
    result = semantic_dedup(x, [str(i) for i in range(len(x))], cfg, gpu=False)
    removed = set(result.removed)
    assert len(set(range(500, 600)) - removed) <= 2  # a pair split by k-means and missed by the boundary search
    assert len(removed - set(range(500, 600))) == 0
    counts = result.summary["removed_per_epsilon"]
    assert counts["0.001"] <= counts["0.01"] <= counts["0.05"]
    assert result.columns["cluster"].shape == (len(x),) and result.summary["device"] == "cpu"
    again = semantic_dedup(x, [str(i) for i in range(len(x))], cfg, gpu=False)
    assert again.removed == result.removed  # seeded: the same decisions every run


def test_greedy_removal_only_counts_kept_items() -> None:
    # 1 ~ 0, 2 ~ 1 but not ~ 0: with "earlier kept", 1 goes (0 is kept) and 2 stays (1 was removed).
    pairs = Neighbours(np.array([1, 2]), np.array([0, 1]), np.array([0.99, 0.99], np.float32))
    assert greedy_removals(pairs, 0.98) == {1: (0, pytest.approx(0.99))}


def test_quality_filter_reasons() -> None:
    width = np.array([64, 8, 200, 64, 64, 64])
    height = np.array([64, 64, 40, 64, 64, 64])
    std = np.array([30.0, 30.0, 30.0, 0.5, 30.0, 30.0])
    z = np.array([0.0, 0.0, 0.0, 0.0, 0.0, -9.0], dtype=np.float32)
    cfg = QualityConfig(min_side=16, max_aspect=4.0, blank_std=2.0, min_chars=1, max_chars=100)
    result = quality_filter(width, height, std, np.ones(6, bool), np.array([5, 5, 5, 5, 0, 5]),
                            np.array([10, 10, 10, 10, 10, 10]), z, cfg)
    kinds = {i: reason.split(":")[0] for i, reason in result.removed.items()}
    assert set(kinds) == {1, 2, 3, 4, 5}
    assert "smaller than quality.min_side" in result.removed[1] and "aspect 5.0" in result.removed[2]
    assert "blank" in result.removed[3] and "fewer than quality.min_chars" in result.removed[4]
    assert "alignment z-score -9.0" in result.removed[5]
    assert result.summary["removed_by_check"]["blank"] == 1


def test_alignment_flags_captions_of_another_picture(rng: np.random.Generator) -> None:
    # Pictures of 1-3 coloured boxes on a 3x3 grid; captions name colour and place. 12 of 600 are swapped.
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 240), "yellow": (240, 230, 40)}
    places = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
    thumbs, captions = [], []
    for _ in range(600):
        image = np.full((16, 16, 3), 20, dtype=np.uint8)
        phrases = []
        for cell in rng.choice(9, size=rng.integers(1, 4), replace=False):
            name = list(colours)[rng.integers(4)]
            r, c = divmod(int(cell), 3)
            image[r * 5 : r * 5 + 5, c * 5 : c * 5 + 5] = colours[name]
            phrases.append(f"a {name} box at {places[cell]}")
        thumbs.append(image)
        captions.append(", ".join(phrases) + ".")
    swapped = np.arange(12)
    originals = list(captions)
    for i in swapped:  # each gets the caption of a picture with none of its boxes (colour and place)
        partner = next(j for j in range(599, 300, -1) if not set(originals[i][:-1].split(", ")) &
                       set(originals[j][:-1].split(", ")))
        captions[i] = originals[partner]
    images, texts = pixel_embedding(np.stack(thumbs)), hashed_text_embedding(captions, 1024)
    scores = alignment_scores(images, texts, np.ones(600, bool), ["caption"] * 600, folds=2, penalty=1.0, seed=0)
    z = robust_z(scores, ["caption"] * 600)
    flagged = set(np.flatnonzero(z < QualityConfig().alignment_min_z).tolist())
    assert len(flagged & set(swapped.tolist())) >= 9, (z[swapped].round(1).tolist(), sorted(flagged))
    assert len(flagged - set(swapped.tolist())) <= 12  # <= 2% of the 588 right ones (the clean budget)


def test_balance_caps_an_over_represented_concept_and_spares_the_rest() -> None:
    texts = [f"The word {w} is written." for w in ["CAT"] * 400 + ["DOG", "SUN", "BOX", "CUP"] * 20]
    tags = [t + [f"skill:{'ocr' if i % 2 else 'caption'}"] for i, t in enumerate(concept_tags(texts, ["CAT", "DOG", "SUN", "BOX", "CUP"]))]
    cfg = BalanceConfig(tags=["concepts", "skill"], cap=1.25, seed=3)
    result = balance(tags, cfg, [str(i) for i in range(len(tags))])
    removed = set(result.removed)
    assert all(i < 400 for i in removed)  # only CAT records go
    kept_cat = 400 - len(removed)
    assert 10 <= kept_cat <= 45, kept_cat  # ~ t = 1.25 x median 20 = 25 expected
    assert "tag concept:CAT has 400 records" in next(iter(result.removed.values()))
    assert balance(tags, cfg, [str(i) for i in range(len(tags))]).removed == result.removed  # seeded


def test_mixture_weights_scale_to_a_budget() -> None:
    sources = ["a"] * 100 + ["b"] * 50
    tokens = np.full(150, 10)
    plain = mixture_weights(sources, tokens, MixtureStageConfig(weights={"b": 0.3}))
    assert plain.removed == {} and plain.columns["weight"][0] == 1.0 and plain.columns["weight"][-1] == pytest.approx(0.3)
    budget = mixture_weights(sources, tokens, MixtureStageConfig(weights={"b": 2.0}, budget_samples=100))
    assert budget.summary["sources"]["a"]["expected_samples"] + budget.summary["sources"]["b"]["expected_samples"] == \
        pytest.approx(100)
    assert budget.columns["weight"][-1] / budget.columns["weight"][0] == pytest.approx(2.0)
    tokens_budget = mixture_weights(sources, tokens, MixtureStageConfig(budget_tokens=3000))
    assert tokens_budget.columns["weight"][0] == pytest.approx(2.0)


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_semantic_search_split_by_cluster_finds_the_same_pairs(rng: np.random.Generator, shards: int) -> None:
    x = _planted_embeddings(rng)
    cfg = SemanticConfig(epsilon=0.01, epsilons=[0.05], clusters=12, boundary_margin=0.1)
    clusters = cluster_items(x, cfg, gpu=False)  # two clusters a topic: many items on a boundary
    assert clusters.guests.sum() > 20  # items searched in two clusters, so shards overlap in items
    whole = search_pairs(x, clusters, range(clusters.k), search_threshold(cfg), gpu=False)
    plan = shard_plan(clusters, shards)
    assert sorted(np.concatenate(plan).tolist()) == list(range(clusters.k))  # every cluster in exactly one shard
    parts = [search_pairs(x, clusters, which, search_threshold(cfg), gpu=False) for which in plan]
    merged = merge_pairs(parts)
    assert len(set(zip(merged.later.tolist(), merged.earlier.tolist()))) == merged.later.size  # each pair once
    for name in ("later", "earlier", "similarity"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
    uids = [str(i) for i in range(len(x))]
    assert semantic_dedup(x, uids, cfg, gpu=False, clusters=clusters, pairs=merged).removed == \
        semantic_dedup(x, uids, cfg, gpu=False).removed


def test_shard_plan_balances_search_cost() -> None:
    sizes = np.array([100, 90, 10, 10, 10, 10, 5, 5])
    assignment = np.repeat(np.arange(len(sizes)), sizes)
    clusters = Clusters(len(sizes), assignment, assignment, np.zeros(len(assignment), bool))
    plan = shard_plan(clusters, 2)
    assert [g.tolist() for g in plan] == [[0], [1, 2, 3, 4, 5, 6, 7]]  # 100² against 90² + 4 x 10² + 2 x 5²
    assert [g.size for g in shard_plan(clusters, 20)].count(0) == 12  # more shards than clusters: some are empty
    with pytest.raises(ValueError, match="shards=0"):
        shard_plan(clusters, 0)


@pytest.mark.parametrize(("shards", "shard", "message"), [(0, None, "shards=0"), (1, 0, "needs semantic.shards > 1"),
                                                          (3, 3, "0 <= shard < shards"), (3, -1, "0 <= shard")])
def test_semantic_shard_settings_are_checked(shards, shard, message) -> None:
    with pytest.raises(ValueError, match=message):
        SemanticConfig(shards=shards, shard=shard)


def test_merged_pairs_do_not_depend_on_the_order_of_the_parts() -> None:
    """A pair met in two clusters can carry similarities that differ in the last bits; the merge keeps the larger."""
    a = Neighbours(np.array([3, 5]), np.array([1, 2]), np.array([0.95, 0.99], np.float32))
    b = Neighbours(np.array([5, 7]), np.array([2, 4]), np.array([np.nextafter(np.float32(0.99), np.float32(1)), 0.9],
                                                                np.float32))  # fmt: skip
    ab, ba = merge_pairs([a, b]), merge_pairs([b, a])
    for name in ("later", "earlier", "similarity"):
        assert np.array_equal(getattr(ab, name), getattr(ba, name)), name
    assert ab.later.tolist() == [3, 5, 7] and ab.similarity[1] == b.similarity[0]
