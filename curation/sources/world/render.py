"""Render a scene graph to an RGB image: a pure, deterministic function of the scene.

Shapes are drawn with PIL's polygon/ellipse rasteriser, which does not antialias, so a shape's pixels
are exactly its colour. Words are drawn from PIL's built-in TrueType font (antialiased glyph masks,
deterministic for a given Pillow/FreeType build). Every object stays inside the pixel box
:meth:`Layout.object_box` gives it, so the pixels of an empty cell are exactly the background.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from curation.sources.world.config import WorldConfig
from curation.sources.world.layout import Layout
from curation.sources.world.scene import Scene, WorldObject

BACKGROUND: tuple[int, int, int] = (24, 24, 24)
# Chosen to stay far apart in RGB (min pairwise distance 116, red vs orange; yellow/orange 117, white/pink 124) and far
# from the dark background, so that colour is recoverable from a few pixels after the resize to 48 px.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 20, 40),
    "green": (30, 180, 50),
    "blue": (40, 80, 255),
    "yellow": (250, 235, 40),
    "purple": (140, 40, 200),
    "orange": (255, 125, 0),
    "white": (245, 245, 245),
    "cyan": (0, 220, 230),
    "pink": (255, 130, 200),
}

Box = tuple[int, int, int, int]  # inclusive pixel box (x0, y0, x1, y1)
Color = tuple[int, int, int]


def _regular_polygon(box: Box, n_vertices: int, radii: tuple[float, ...]) -> list[tuple[float, float]]:
    """Vertices of a star/regular polygon inscribed in ``box``, first vertex pointing up.

    Coordinates are pixel centres (``x0..x1``), so the rasterised polygon never paints outside the box.
    ``radii`` alternate (one value: a regular polygon; two: a star with outer and inner radius).
    """
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = (x1 - x0) / 2
    return [
        (
            cx + half * radii[k % len(radii)] * math.cos(-math.pi / 2 + 2 * math.pi * k / n_vertices),
            cy + half * radii[k % len(radii)] * math.sin(-math.pi / 2 + 2 * math.pi * k / n_vertices),
        )
        for k in range(n_vertices)
    ]


def _circle(draw: ImageDraw.ImageDraw, box: Box, rgb: Color) -> None:
    draw.ellipse(box, fill=rgb)


def _square(draw: ImageDraw.ImageDraw, box: Box, rgb: Color) -> None:
    draw.rectangle(box, fill=rgb)


def _triangle(draw: ImageDraw.ImageDraw, box: Box, rgb: Color) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def _diamond(draw: ImageDraw.ImageDraw, box: Box, rgb: Color) -> None:
    draw.polygon(_regular_polygon(box, 4, (1.0,)), fill=rgb)


def _star(draw: ImageDraw.ImageDraw, box: Box, rgb: Color) -> None:
    # Inner radius 0.5 (a fat star) so the five points survive at the 10 px small size.
    draw.polygon(_regular_polygon(box, 10, (1.0, 0.5)), fill=rgb)


def _cross(draw: ImageDraw.ImageDraw, box: Box, rgb: Color) -> None:
    x0, y0, x1, y1 = box
    side = x1 - x0 + 1
    # A plus sign with arms a third of the side wide; same parity as the side so the arms are centred.
    arm = max(1, round(side / 3))
    arm += (side - arm) % 2
    offset = (side - arm) // 2
    draw.rectangle((x0, y0 + offset, x1, y0 + offset + arm - 1), fill=rgb)
    draw.rectangle((x0 + offset, y0, x0 + offset + arm - 1, y1), fill=rgb)


def _hexagon(draw: ImageDraw.ImageDraw, box: Box, rgb: Color) -> None:
    draw.polygon(_regular_polygon(box, 6, (1.0,)), fill=rgb)


SHAPE_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, Box, Color], None]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "star": _star,
    "cross": _cross,
    "hexagon": _hexagon,
}


@lru_cache(maxsize=4096)
def word_mask(word: str, box_width: int, box_height: int) -> Image.Image:
    """The glyph coverage mask (mode "L") of ``word``, fitted into a ``box_width`` × ``box_height`` box.

    The font size is the largest whose glyphs (with a capital H for the cap height) fit the box's height;
    a word still wider than the box is then squeezed horizontally. Squeezing tall letters reads far better
    than shrinking the font: at 64 px the default words would otherwise be ~6 px tall, ~4 px after the
    resize to 48 px. Cached: the vocabulary is small and a mask is never modified (only pasted).
    """
    size = 1
    for candidate in range(2, 4 * box_height + 1):
        left, top, right, bottom = ImageFont.load_default(size=candidate).getbbox(word + "H")
        if bottom - top > box_height:
            break
        size = candidate
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(word)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), word, fill=255, font=font)
    if mask.width > box_width:
        # BOX (area averaging) keeps strokes crisp; LANCZOS rings around the thin verticals.
        mask = mask.resize((box_width, mask.height), Image.Resampling.BOX)
    return mask


def _draw_word(image: Image.Image, obj: WorldObject, layout: Layout) -> None:
    x0, y0, x1, y1 = layout.object_box(obj.kind, obj.size, obj.row, obj.col, obj.dx, obj.dy)
    mask = word_mask(str(obj.word), x1 - x0 + 1, y1 - y0 + 1)
    # Centre the glyphs in the word box; the mask is never larger than the box.
    x = x0 + (x1 - x0 + 1 - mask.width) // 2
    y = y0 + (y1 - y0 + 1 - mask.height) // 2
    image.paste(COLOR_RGB[obj.color], (x, y, x + mask.width, y + mask.height), mask)


def render_scene(scene: Scene, cfg: WorldConfig) -> Image.Image:
    """Draw ``scene`` as an RGB ``image_size`` × ``image_size`` image.

    Each object is centred in its grid cell, shifted by its stored jitter: large shapes span ~80% of the
    cell, small ones ~45%, a word fills the cell's width. Same scene → identical pixels.
    """
    if (scene.image_size, scene.grid) != (cfg.image_size, cfg.grid):
        raise ValueError(
            f"scene is {scene.image_size} px on a {scene.grid}x{scene.grid} grid but the world config says "
            f"{cfg.image_size} px on {cfg.grid}x{cfg.grid}; render it with the config it was sampled from"
        )
    layout = scene.layout
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        if obj.kind == "word":
            _draw_word(image, obj, layout)
            continue
        if obj.shape not in SHAPE_DRAWERS or obj.color not in COLOR_RGB:
            raise ValueError(
                f"object ({obj.color}, {obj.shape}) at cell ({obj.row}, {obj.col}) is not drawable; "
                f"colours {list(COLOR_RGB)}, shapes {list(SHAPE_DRAWERS)}"
            )
        box = layout.object_box(obj.kind, obj.size, obj.row, obj.col, obj.dx, obj.dy)
        SHAPE_DRAWERS[obj.shape](draw, box, COLOR_RGB[obj.color])
    return image
