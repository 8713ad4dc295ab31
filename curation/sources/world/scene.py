"""Scene graphs of the world and how to sample them.

A scene is the whole truth about one image: which objects sit in which grid cells, their colour, shape,
size and the few pixels of jitter. Rendering, questions, the oracle and the per-patch labels are all pure
functions of a scene, so a scene stored as JSON next to an image is enough to re-check any answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.sources.world.config import WorldConfig
from curation.sources.world.layout import SIZE_FRACTION, Layout

OBJECT_KINDS: tuple[str, ...] = ("shape", "word")


@dataclass(frozen=True)
class WorldObject:
    """One object in one grid cell: a shape, or a short rendered word.

    Shapes have ``shape`` and ``size`` and no ``word``; words have ``word`` and neither ``shape`` nor
    ``size`` (a word's box always fills its cell's width, see :meth:`Layout.extent`). Both have a colour.
    ``dx``/``dy`` are the pixel jitter, stored so that rendering is a pure function of the scene.
    """

    kind: str
    shape: str | None
    color: str
    size: str | None
    row: int
    col: int
    word: str | None = None
    dx: int = 0
    dy: int = 0

    def __post_init__(self) -> None:
        if self.kind == "shape":
            if self.shape is None or self.word is not None or self.size not in SIZE_FRACTION:
                raise ValueError(
                    f"shape object needs shape and size in {list(SIZE_FRACTION)} and no word; got "
                    f"shape={self.shape!r}, size={self.size!r}, word={self.word!r}"
                )
        elif self.kind == "word":
            if not self.word or self.shape is not None or self.size is not None:
                raise ValueError(
                    f"word object needs a non-empty word and no shape or size; got "
                    f"word={self.word!r}, shape={self.shape!r}, size={self.size!r}"
                )
        else:
            raise ValueError(f"object kind {self.kind!r} is unknown; expected one of {list(OBJECT_KINDS)}")

    @property
    def cell(self) -> tuple[int, int]:
        return self.row, self.col


@dataclass(frozen=True)
class Scene:
    """The scene graph of one image: objects on a ``grid`` × ``grid`` layout of an ``image_size`` image.

    Objects are kept in row-major cell order, so two scenes with the same content compare (and hash,
    and serialise) equal whatever order they were built in. Invariants, checked on construction: one
    object per cell, at most one word, every shape has its own (colour, shape) pair (so "the red circle"
    names exactly one object), and jitter never pushes an object out of its cell.
    """

    objects: tuple[WorldObject, ...]
    grid: int
    image_size: int

    def __post_init__(self) -> None:
        # Frozen dataclass: normalising the order goes through object.__setattr__ once, here.
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))
        layout = self.layout
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"scene has two objects in one cell: cells {cells}")
        pairs = [(o.color, o.shape) for o in self.shapes]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"scene repeats a (color, shape) pair, so references would be ambiguous: {pairs}")
        if sum(o.kind == "word" for o in self.objects) > 1:
            raise ValueError("scene has more than one word; the world draws at most one")
        for o in self.objects:
            if not (0 <= o.row < self.grid and 0 <= o.col < self.grid):
                raise ValueError(f"object at cell ({o.row}, {o.col}) is outside the {self.grid}x{self.grid} grid")
            jx, jy = layout.max_jitter(o.kind, o.size)
            if abs(o.dx) > jx or abs(o.dy) > jy:
                raise ValueError(
                    f"object at cell ({o.row}, {o.col}) has jitter ({o.dx}, {o.dy}) beyond ±({jx}, {jy}); "
                    "it would leave its cell"
                )

    @property
    def layout(self) -> Layout:
        return Layout(self.image_size, self.grid)

    @property
    def shapes(self) -> tuple[WorldObject, ...]:
        """The shape objects (words are not shapes: they are not counted, asked about or grounded)."""
        return tuple(o for o in self.objects if o.kind == "shape")

    @property
    def word_object(self) -> WorldObject | None:
        """The rendered word, or None when the scene has none."""
        return next((o for o in self.objects if o.kind == "word"), None)

    def object_at(self, row: int, col: int) -> WorldObject | None:
        """The object in cell (row, col), or None for an empty cell."""
        return next((o for o in self.objects if o.cell == (row, col)), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_json` inverts it exactly."""
        # Field by field rather than dataclasses.asdict, whose deep copies made this the hot spot of a build.
        objects = [
            {"kind": o.kind, "shape": o.shape, "color": o.color, "size": o.size, "row": o.row, "col": o.col,
             "word": o.word, "dx": o.dx, "dy": o.dy}
            for o in self.objects
        ]
        return {"grid": self.grid, "image_size": self.image_size, "objects": objects}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        """Rebuild a scene from :meth:`to_json` output (re-checking every invariant)."""
        try:
            objects = tuple(WorldObject(**o) for o in data["objects"])
            return cls(objects=objects, grid=int(data["grid"]), image_size=int(data["image_size"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"scene JSON is malformed ({error}); expected keys grid, image_size, objects") from error

    def key(self) -> str:
        """A canonical string identifying the scene exactly (used to keep splits disjoint)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


def sample_scene(
    cfg: WorldConfig,
    rng: np.random.Generator,
    n_objects: int | None = None,
    with_word: bool | None = None,
) -> Scene:
    """Draw a random scene.

    ``n_objects`` shapes (default: uniform in ``cfg.min_objects..cfg.max_objects``) go to distinct
    random cells, each with a distinct random (colour, shape) pair and a random size. A word is added in
    a free cell when ``with_word`` is True, or with probability ``cfg.word_prob`` when it is None.
    """
    layout = Layout(cfg.image_size, cfg.grid)
    n_cells = cfg.grid * cfg.grid
    if n_objects is None:
        n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    n_pairs = len(cfg.colors) * len(cfg.shapes)
    if not 0 <= n_objects <= min(n_cells, n_pairs):
        raise ValueError(
            f"n_objects={n_objects} does not fit: a {cfg.grid}x{cfg.grid} grid has {n_cells} cells and "
            f"colors x shapes gives {n_pairs} distinct pairs; ask for fewer objects"
        )
    if with_word is None:
        with_word = bool(rng.random() < cfg.word_prob) and n_objects < n_cells
    if with_word and n_objects >= n_cells:
        raise ValueError(f"with_word=True needs a free cell, but n_objects={n_objects} fills the {n_cells} cells")

    cells = rng.choice(n_cells, size=n_objects + int(with_word), replace=False)
    # Drawing pair indices without replacement makes every (colour, shape) pair distinct by construction.
    pairs = rng.choice(n_pairs, size=n_objects, replace=False)
    objects: list[WorldObject] = []
    for cell, pair in zip(cells[:n_objects], pairs):
        size = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
        jx, jy = layout.max_jitter("shape", size)
        objects.append(
            WorldObject(
                kind="shape",
                shape=cfg.shapes[int(pair) % len(cfg.shapes)],
                color=cfg.colors[int(pair) // len(cfg.shapes)],
                size=size,
                row=int(cell) // cfg.grid,
                col=int(cell) % cfg.grid,
                dx=int(rng.integers(-jx, jx + 1)),
                dy=int(rng.integers(-jy, jy + 1)),
            )
        )
    if with_word:
        cell = int(cells[-1])
        jx, jy = layout.max_jitter("word", None)
        objects.append(
            WorldObject(
                kind="word",
                shape=None,
                color=cfg.colors[int(rng.integers(len(cfg.colors)))],
                size=None,
                row=cell // cfg.grid,
                col=cell % cfg.grid,
                word=cfg.words[int(rng.integers(len(cfg.words)))],
                dx=int(rng.integers(-jx, jx + 1)),
                dy=int(rng.integers(-jy, jy + 1)),
            )
        )
    return Scene(objects=tuple(objects), grid=cfg.grid, image_size=cfg.image_size)
