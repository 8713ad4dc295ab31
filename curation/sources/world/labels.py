"""Per-patch class labels from the scene graph, for pretraining the vision tower.

The tower stands in for a pretrained CLIP: it is trained with one classification head per attribute on
every patch, supervised by the scene graph. A patch takes the labels of the grid cell it falls in, so
with ``patch_grid == grid`` (3×3 patches of a 48 px image at 16 px) each patch is exactly one cell.
Class 0 always means "nothing here" except for ``row``/``col``, which are defined for every patch.
"""

from __future__ import annotations

import numpy as np

from curation.sources.world.config import WorldConfig
from curation.sources.world.scene import Scene

HEADS: tuple[str, ...] = ("color", "shape", "size", "word", "row", "col")


def label_spaces(cfg: WorldConfig) -> dict[str, int]:
    """Number of classes of each head.

    ``color``: 0 empty, then ``cfg.colors``; ``shape``: 0 empty, then ``cfg.shapes``, last "word";
    ``size``: 0 empty or word, then ``cfg.sizes``; ``word``: 0 none, then ``cfg.words``;
    ``row``/``col``: the patch's cell coordinates.
    """
    return {
        "color": len(cfg.colors) + 1,
        "shape": len(cfg.shapes) + 2,
        "size": len(cfg.sizes) + 1,
        "word": len(cfg.words) + 1,
        "row": cfg.grid,
        "col": cfg.grid,
    }


def _index(values: list[str], value: str | None, what: str) -> int:
    """1-based class of ``value`` in the config's vocabulary (0 is reserved for "none")."""
    if value not in values:
        raise ValueError(
            f"scene {what} {value!r} is not in the world config's {what}s {values}; label it with its own config"
        )
    return values.index(value) + 1


def patch_labels(scene: Scene, cfg: WorldConfig, patch_grid: int) -> dict[str, np.ndarray]:
    """Labels of every patch of a ``patch_grid`` × ``patch_grid`` tiling, each ``[patch_grid**2]`` int64, row-major.

    ``patch_grid`` must be a multiple of ``cfg.grid`` so that no patch straddles two cells.
    """
    if patch_grid < 1 or patch_grid % cfg.grid:
        raise ValueError(
            f"patch_grid={patch_grid} is not a positive multiple of the world grid {cfg.grid}: a patch would "
            f"straddle two cells; use a vision patch grid of {cfg.grid}, {2 * cfg.grid}, ..."
        )
    if scene.grid != cfg.grid:
        raise ValueError(f"scene grid {scene.grid} differs from the world config's grid {cfg.grid}")
    per_cell = {head: np.zeros((cfg.grid, cfg.grid), dtype=np.int64) for head in HEADS}
    per_cell["row"][:] = np.arange(cfg.grid)[:, None]
    per_cell["col"][:] = np.arange(cfg.grid)[None, :]
    word_class = len(cfg.shapes) + 1
    for obj in scene.objects:
        cell = obj.row, obj.col
        per_cell["color"][cell] = _index(cfg.colors, obj.color, "color")
        if obj.kind == "word":
            per_cell["shape"][cell] = word_class
            per_cell["word"][cell] = _index(cfg.words, obj.word, "word")
        else:
            per_cell["shape"][cell] = _index(cfg.shapes, obj.shape, "shape")
            per_cell["size"][cell] = _index(cfg.sizes, obj.size, "size")
    # Each cell becomes a (scale × scale) block of patches; flatten row-major over patches.
    scale = patch_grid // cfg.grid
    return {head: np.kron(grid, np.ones((scale, scale), dtype=np.int64)).reshape(-1) for head, grid in per_cell.items()}
