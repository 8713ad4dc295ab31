"""Stage 2, near dedup: perceptual image hashes (Hamming distance) and MinHash LSH over text shingles.

A record is a near duplicate of an earlier *kept* record when their texts are similar (MinHash estimate
of the Jaccard similarity of character shingles of the text, lower-cased, without punctuation, >=
``text_threshold``) and, if both have an image, their first images look alike: the pHashes of the R, G
and B channels differ in at most ``max_hamming`` of 192 bits AND no pixel of the 16 x 16 box-filtered
thumbnails differs by more than ``max_thumb_diff``. A record with an image never matches one without, and
the same image with another conversation (LLaVA's several conversations per COCO image) is no duplicate.
Candidates come from MinHash LSH (datasketch); each is then verified against the thresholds.

Why two image tests: pHash thresholds its DCT at the median, so it ignores contrast, and on the world's
small objects it ignores colour and shape too (a faint green cross and a bright yellow triangle in the same
cell hash identically). Re-processing a picture moves every thumbnail pixel a little; another object moves
some pixel a lot. Measured on the dirty world (1000 records per skill; 400 planted near duplicates: JPEG
q70-95, noise sigma 2-6, resampled via 40-56 px, brightness +-4-12%, paraphrased questions): planted pairs
have pHash distance <= 20 (99%) and thumbnail difference <= 44 (all); of 5,000 pairs of distinct clean
records with the same text, 0.1% have a thumbnail difference <= 118. With the defaults the stage removed
392/400 planted and 4 of 8,000 clean records (each a clean scene repeated with 1 px of jitter and the same
question: a duplicate in all but the label). Short templated texts ("Count the shapes in the picture." /
"Count the shapes in the image.") have shingle similarity 0.4-0.6, hence the low text threshold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH
from tqdm import tqdm

from curation.config import NearConfig
from curation.records import StageResult
from curation.stages.exact import normalize_text

_PUNCTUATION = re.compile(r"[^\w\s]")

MINHASH_SCHEME = "affine64"  # datasketch >= 2's default hash scheme, named so stored signatures stay comparable


def shingles(text: str, size: int) -> list[bytes]:
    """The distinct character ``size``-grams of the normalized text without punctuation (all of it when shorter)."""
    normalized = normalize_text(_PUNCTUATION.sub(" ", text))
    if len(normalized) <= size:
        return [normalized.encode("utf-8")]
    return list({normalized[i : i + size].encode("utf-8") for i in range(len(normalized) - size + 1)})


def minhashes(texts: Sequence[str], cfg: NearConfig, show_progress: bool = False) -> np.ndarray:
    """``[N, num_perm]`` uint64 MinHash signatures of the texts' shingles."""
    signatures = np.empty((len(texts), cfg.num_perm), dtype=np.uint64)
    template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=MINHASH_SCHEME)  # permutations drawn once
    for i, text in enumerate(tqdm(texts, desc="near: minhash", unit="rec", disable=not show_progress, leave=False)):
        signature = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, permutations=template.permutations,
                            scheme=MINHASH_SCHEME)
        signature.update_batch(shingles(text, cfg.shingle))
        signatures[i] = signature.hashvalues
    return signatures


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between hash ``a`` ([W] uint64 words) and each row of ``b`` ([M, W]): [M] int64."""
    return np.bitwise_count(np.bitwise_xor(a[None, :], b)).sum(axis=1).astype(np.int64)


def lsh_index(signatures: np.ndarray, cfg: NearConfig) -> MinHashLSH:
    """A MinHash LSH index of ``signatures`` ([N, num_perm] uint64), each under its row number."""
    lsh = MinHashLSH(threshold=cfg.text_threshold, num_perm=cfg.num_perm)
    for i, hashvalues in enumerate(signatures):
        lsh.insert(i, MinHash(num_perm=cfg.num_perm, hashvalues=hashvalues, scheme=MINHASH_SCHEME))
    return lsh


def near_dedup(
    phashes: np.ndarray,
    thumbs: np.ndarray,
    has_image: np.ndarray,
    signatures: np.ndarray,
    uids: Sequence[str],
    cfg: NearConfig,
    show_progress: bool = False,
    reference: int = 0,
    index: MinHashLSH | None = None,
) -> StageResult:
    """Remove near duplicates of earlier kept records.

    The first ``reference`` records are what is already there (the loop's pool and earlier rounds): each is
    indexed as it is, never tested and never removed, and every later record is tested against them too.
    ``index``, when given, is :func:`lsh_index` of those ``reference`` rows, built once by a caller that tests
    several batches against them; the kept records are added to it.

    phashes: [N, 3] uint64, the R/G/B pHashes of each record's first image (ignored where ``has_image`` is False);
    thumbs: [N, THUMB, THUMB, 3] uint8 box-filtered thumbnails of the same images;
    has_image: [N] bool; signatures: [N, num_perm] uint64 from :func:`minhashes`.
    Columns: ``near_of`` (index of the kept record it duplicates, -1 if none).
    """
    n = len(uids)
    if not (len(phashes) == len(has_image) == len(signatures) == n):
        raise ValueError(f"near_dedup: {len(phashes)} hashes, {len(has_image)} flags, {len(signatures)} signatures, {n} ids")
    if not 0 <= reference <= n:
        raise ValueError(f"near_dedup: reference={reference} must be in [0, {n}] (the records given)")
    lsh = lsh_index(signatures[:reference], cfg) if index is None else index
    removed: dict[int, str] = {}
    near_of = np.full(n, -1, dtype=np.int64)
    pairs_checked = 0
    for i in tqdm(range(reference, n), desc="near: lsh", unit="rec", disable=not show_progress, leave=False):
        signature = MinHash(num_perm=cfg.num_perm, hashvalues=signatures[i], scheme=MINHASH_SCHEME)
        candidates = np.fromiter(lsh.query(signature), dtype=np.int64)
        if candidates.size:
            candidates.sort()  # earliest first, so the reason names the first matching record
            pairs_checked += candidates.size
            similarity = (signatures[candidates] == signatures[i]).mean(axis=1)
            match = similarity >= cfg.text_threshold
            match &= has_image[candidates] == has_image[i]
            distance = np.zeros(candidates.size, dtype=np.int64)
            if has_image[i]:
                distance = hamming(phashes[i], phashes[candidates])
                match &= distance <= cfg.max_hamming
                if match.any():
                    difference = np.abs(thumbs[candidates[match]].astype(np.int16) - thumbs[i].astype(np.int16))
                    match[match] = difference.reshape(int(match.sum()), -1).max(axis=1) <= cfg.max_thumb_diff
            if match.any():
                k = int(np.flatnonzero(match)[0])
                j = int(candidates[k])
                near_of[i] = j
                image_part = f"pHash distance {distance[k]}/192, " if has_image[i] else ""
                removed[i] = f"near duplicate of {uids[j]} ({image_part}text similarity {similarity[k]:.2f})"
                continue
        lsh.insert(i, signature)
    summary = {"pairs_checked": pairs_checked, "reference": reference, "max_hamming": cfg.max_hamming,
               "text_threshold": cfg.text_threshold}
    return StageResult("near", n, removed, {"near_of": near_of}, summary)
