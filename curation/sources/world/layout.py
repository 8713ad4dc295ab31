"""Pixel geometry of the world's grid: which pixels form a cell, how big objects are, where they go.

Scene sampling (jitter limits), rendering (pixel boxes), questions (position names) and per-patch labels
all read the geometry from here, so "the object in cell (r, c)" means the same pixels everywhere.

Cells are defined on pixel centres: pixel ``p`` belongs to cell ``floor((p + 0.5) * grid / image_size)``.
At the default 64 px and grid 3 the cells are 21, 22 and 21 pixels wide (64 / 3 = 21.33), and cell ``i``
covers exactly the continuous interval ``[i * 64/3, (i+1) * 64/3)`` that the model's 64 → 48 resize maps
onto its 16 px patch ``i``. Objects keep ``MARGIN`` pixels clear of their cell's border, so after that
resize each object lies inside one patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

# Object side as a fraction of the cell side (64 px, grid 3: large 17 px, small 10 px).
SIZE_FRACTION: dict[str, float] = {"small": 0.45, "large": 0.8}
# A word's box is the cell's width (less the margins) by this fraction of the cell's height: three
# letters need the width, and ~11 px of letter height keeps them readable after the resize to 48 px.
WORD_HEIGHT_FRACTION = 0.5
# Pixels kept free between an object and its cell border. The 64 → 48 bilinear/antialiased resize reads
# ~0.7 source pixels beyond each destination pixel; one clear pixel keeps an object out of the next patch.
MARGIN = 1
# Jitter is at most a tenth of the cell side (±2 px at the default), further limited by the margin.
JITTER_FRACTION = 0.1

POSITION_NAMES_3X3: tuple[tuple[str, ...], ...] = (
    ("top left", "top center", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom center", "bottom right"),
)


def position_name(row: int, col: int, grid: int) -> str:
    """The words a question or caption uses for cell (row, col): "top left" on 3×3, "row 2, column 4" otherwise."""
    if not (0 <= row < grid and 0 <= col < grid):
        raise ValueError(f"cell ({row}, {col}) is outside a {grid}x{grid} grid")
    if grid == 3:
        return POSITION_NAMES_3X3[row][col]
    return f"row {row + 1}, column {col + 1}"


@lru_cache(maxsize=None)
def _cell_spans(image_size: int, grid: int) -> tuple[tuple[int, int], ...]:
    """First and last pixel (inclusive) of every cell along one axis; cached, as every object needs them."""

    def first_pixel(index: int) -> int:
        # Smallest p with (2p + 1) * grid >= 2 * image_size * index, i.e. ceil((2 S i - g) / (2 g)).
        return -((grid - 2 * image_size * index) // (2 * grid))

    return tuple((first_pixel(i), first_pixel(i + 1) - 1) for i in range(grid))


@lru_cache(maxsize=None)
def _extent(image_size: int, grid: int, kind: str, size: str | None) -> tuple[int, int]:
    cell_size = image_size / grid
    room = min(last - first + 1 for first, last in _cell_spans(image_size, grid)) - 2 * MARGIN
    if kind == "word":
        return room, max(1, min(room, round(WORD_HEIGHT_FRACTION * cell_size)))
    if size not in SIZE_FRACTION:
        raise ValueError(f"object size {size!r} is not drawable; expected one of {list(SIZE_FRACTION)}")
    side = max(1, min(room, round(SIZE_FRACTION[size] * cell_size)))
    return side, side


@lru_cache(maxsize=None)
def _max_jitter(image_size: int, grid: int, kind: str, size: str | None) -> tuple[int, int]:
    cap = int(JITTER_FRACTION * image_size / grid)
    min_cell = min(last - first + 1 for first, last in _cell_spans(image_size, grid))
    width, height = _extent(image_size, grid, kind, size)
    # Centring leaves at least (cell - extent) // 2 pixels on each side, in every cell (see object_box).
    return (
        max(0, min(cap, (min_cell - width) // 2 - MARGIN)),
        max(0, min(cap, (min_cell - height) // 2 - MARGIN)),
    )


@dataclass(frozen=True)
class Layout:
    """The pixel geometry of a ``grid`` × ``grid`` layout on an ``image_size`` × ``image_size`` image."""

    image_size: int
    grid: int

    def __post_init__(self) -> None:
        if self.grid < 1 or self.image_size < self.grid:
            raise ValueError(f"layout: image_size={self.image_size}, grid={self.grid}; need image_size >= grid >= 1")

    @property
    def cell_size(self) -> float:
        """Cell side in (fractional) pixels."""
        return self.image_size / self.grid

    def cell_of_pixel(self, pixel: int) -> int:
        """The cell index (along one axis) whose interval holds the centre of ``pixel``."""
        # Integer form of floor((pixel + 0.5) * grid / image_size), exact for every size.
        return ((2 * pixel + 1) * self.grid) // (2 * self.image_size)

    def cell_span(self, index: int) -> tuple[int, int]:
        """First and last pixel (inclusive) of cell ``index`` along one axis."""
        if not 0 <= index < self.grid:
            raise ValueError(f"cell index {index} is outside a grid of {self.grid}")
        return _cell_spans(self.image_size, self.grid)[index]

    @property
    def min_cell_pixels(self) -> int:
        """Pixels in the narrowest cell; jitter limits use it so that they hold in every cell."""
        return min(last - first + 1 for first, last in _cell_spans(self.image_size, self.grid))

    def extent(self, kind: str, size: str | None) -> tuple[int, int]:
        """Width and height in pixels of a shape of ``size``, or of a word's box (``kind == "word"``)."""
        return _extent(self.image_size, self.grid, kind, size)

    def max_jitter(self, kind: str, size: str | None) -> tuple[int, int]:
        """Largest |dx| and |dy| that keep an object ``MARGIN`` pixels inside every cell."""
        return _max_jitter(self.image_size, self.grid, kind, size)

    def object_box(
        self, kind: str, size: str | None, row: int, col: int, dx: int, dy: int
    ) -> tuple[int, int, int, int]:
        """Inclusive pixel box ``(x0, y0, x1, y1)`` of an object centred in cell (row, col), shifted by the jitter."""
        width, height = self.extent(kind, size)
        x_first, x_last = self.cell_span(col)
        y_first, y_last = self.cell_span(row)
        x0 = x_first + (x_last - x_first + 1 - width) // 2 + dx
        y0 = y_first + (y_last - y_first + 1 - height) // 2 + dy
        return x0, y0, x0 + width - 1, y0 + height - 1
