"""Stage 4, quality filters: image size and aspect, blank images, text length, image-text alignment.

Alignment without a pretrained CLIP: within each group (the skill, when records have one), a ridge
regression from the text embedding to the image embedding is fitted on the data itself, cross-fitted over
folds so that no record's own pair fits the projection that scores it. Both sides are centred on the
fitting fold's means first: every image shares a background and every caption its phrasing, and without
centring that shared part dominates the cosine (measured on the dirty world with the pretrained tower:
uncentred, wrong captions scored 0.65 against 0.73 for the right ones; centred, 0.01 against 0.60).
A record's score is the cosine between the image embedding its text predicts and its actual one; scores
become robust z-scores per group, (score - median) / (1.4826 MAD), and records far below their group (a
caption of another picture) are removed. The fit assumes most pairs are right, as any data-fitted scorer
does. Text predicts image, not the other way: a caption names every object and where it is, while an
image does not say which question was asked about it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from curation.config import QualityConfig
from curation.records import StageResult

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution is 0.6745 sigma


def ridge_fit(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """W minimising ||x W - y||^2 + penalty ||W||^2: [D_x, D_y] float64 (primal form)."""
    x = x.astype(np.float64)
    gram = x.T @ x + penalty * np.eye(x.shape[1])
    return np.linalg.solve(gram, x.T @ y.astype(np.float64))


def ridge_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_new: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge predictions for ``x_new``; the dual (kernel) form when there are fewer samples than features."""
    x_fit = x_fit.astype(np.float64)
    if x_fit.shape[0] < x_fit.shape[1]:
        coefficients = np.linalg.solve(x_fit @ x_fit.T + penalty * np.eye(x_fit.shape[0]), y_fit.astype(np.float64))
        return (x_new.astype(np.float64) @ x_fit.T) @ coefficients
    return x_new.astype(np.float64) @ ridge_fit(x_fit, y_fit, penalty)


def alignment_scores(
    image: np.ndarray, text: np.ndarray, has_image: np.ndarray, groups: Sequence[str], folds: int, penalty: float,
    seed: int,
) -> np.ndarray:
    """Cross-fitted cosine between the (centred) image embedding predicted from the text and the actual one.

    image: [N, D_img]; text: [N, D_txt]; returns [N] float32, NaN for records without an image or in a
    group too small to cross-fit (fewer than 2 records per fold).
    """
    scores = np.full(len(text), np.nan, dtype=np.float32)
    groups = np.asarray(groups, dtype=object)
    rng = np.random.default_rng(seed)
    for group in sorted(set(groups.tolist())):
        rows = np.flatnonzero(has_image & (groups == group))
        if rows.size < 2 * folds:
            continue
        fold_of = rng.permutation(rows.size) % folds
        for fold in range(folds):
            fit, held = rows[fold_of != fold], rows[fold_of == fold]
            image_mean, text_mean = image[fit].mean(axis=0), text[fit].mean(axis=0)
            predicted = ridge_predict(text[fit] - text_mean, image[fit] - image_mean, text[held] - text_mean, penalty)
            actual = image[held] - image_mean  # [n_held, D_img]
            norms = np.linalg.norm(predicted, axis=1) * np.linalg.norm(actual, axis=1)
            scores[held] = (predicted * actual).sum(axis=1) / np.maximum(norms, 1e-12)
    return scores


def robust_z(scores: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """(score - median) / (1.4826 MAD) within each group; NaN scores stay NaN; constant groups give 0."""
    z = np.full(len(scores), np.nan, dtype=np.float32)
    groups = np.asarray(groups, dtype=object)
    for group in set(groups.tolist()):
        rows = np.flatnonzero((groups == group) & ~np.isnan(scores))
        if rows.size == 0:
            continue
        median = np.median(scores[rows])
        mad = MAD_TO_SIGMA * np.median(np.abs(scores[rows] - median))
        z[rows] = 0.0 if mad == 0 else (scores[rows] - median) / mad
    return z


def quality_filter(
    width: np.ndarray,
    height: np.ndarray,
    pixel_std: np.ndarray,
    has_image: np.ndarray,
    assistant_chars: np.ndarray,
    total_chars: np.ndarray,
    alignment_z: np.ndarray | None,
    cfg: QualityConfig,
) -> StageResult:
    """Remove records failing a check; the first failing check (in the order of the arguments) is the reason.

    All arrays are [N] and describe each record's first image (ignored where ``has_image`` is False).
    ``alignment_z`` is None to skip the alignment check. Columns: ``alignment_z``.
    """
    n = len(width)
    removed: dict[int, str] = {}
    reasons = {"size": 0, "aspect": 0, "blank": 0, "text_short": 0, "text_long": 0, "alignment": 0}
    for i in range(n):
        reason = None
        if has_image[i]:
            short, long = min(width[i], height[i]), max(width[i], height[i])
            if short < cfg.min_side:
                reason, kind = f"image {width[i]}x{height[i]}: smaller than quality.min_side={cfg.min_side}", "size"
            elif long / short > cfg.max_aspect:
                reason, kind = (f"image {width[i]}x{height[i]}: aspect {long / short:.1f} above quality.max_aspect="
                                f"{cfg.max_aspect}"), "aspect"
            elif pixel_std[i] < cfg.blank_std:
                reason, kind = (f"image is blank: pixel std {pixel_std[i]:.2f} below quality.blank_std="
                                f"{cfg.blank_std}"), "blank"
        if reason is None and assistant_chars[i] < cfg.min_chars:
            reason, kind = f"answers have {assistant_chars[i]} characters, fewer than quality.min_chars={cfg.min_chars}", "text_short"
        elif reason is None and total_chars[i] > cfg.max_chars:
            reason, kind = f"text has {total_chars[i]} characters, more than quality.max_chars={cfg.max_chars}", "text_long"
        elif reason is None and alignment_z is not None and alignment_z[i] < cfg.alignment_min_z:
            reason, kind = (f"image and text do not match: alignment z-score {alignment_z[i]:.1f} below "
                            f"quality.alignment_min_z={cfg.alignment_min_z}"), "alignment"
        if reason is not None:
            removed[i] = reason
            reasons[kind] += 1
    columns = {"alignment_z": alignment_z if alignment_z is not None else np.full(n, np.nan, dtype=np.float32)}
    return StageResult("quality", n, removed, columns, {"removed_by_check": reasons})
