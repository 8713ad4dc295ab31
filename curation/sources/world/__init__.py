"""The built-in procedural world: coloured shapes (and short words) on a grid, with their scene graphs.

Three jobs (DESIGN.md, "The built-in world"):

1. **Default dataset**: :func:`build_world` writes LLaVA JSON and PNGs, cached by config.
2. **Exact oracle**: :func:`check_answer` scores any answer against the scene graph.
3. **Teacher**: :meth:`WorldGenerator.request` makes N records of a skill at a difficulty.

Modules, along the data path: ``config`` (what the world holds) → ``layout`` (pixel geometry) →
``scene`` (sampling scene graphs) → ``render`` (pixels) → ``questions`` (questions and answers) →
``generator`` (records, splits, teacher) → ``writer`` (files; the only I/O). ``oracle`` scores answers
and ``labels`` gives per-patch targets for pretraining the vision tower.
"""

from curation.sources.world.config import (
    COLORS,
    SHAPES,
    SIZES,
    SKILLS,
    WORDS,
    WorldConfig,
)
from curation.sources.world.generator import Difficulty, WorldGenerator, WorldRecord
from curation.sources.world.labels import label_spaces, patch_labels
from curation.sources.world.layout import Layout, position_name
from curation.sources.world.oracle import (
    caption_f1,
    caption_hallucinations,
    chance_level,
    check_answer,
    normalize,
    reference_answer,
)
from curation.sources.world.questions import (
    Question,
    caption_text,
    make_question,
    make_questions,
)
from curation.sources.world.render import BACKGROUND, COLOR_RGB, render_scene
from curation.sources.world.scene import Scene, WorldObject, sample_scene
from curation.sources.world.writer import (
    WorldPaths,
    build_world,
    config_hash,
    load_scenes,
    to_llava,
    write_records,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "COLOR_RGB",
    "Difficulty",
    "Layout",
    "Question",
    "SHAPES",
    "SIZES",
    "SKILLS",
    "Scene",
    "WORDS",
    "WorldConfig",
    "WorldGenerator",
    "WorldObject",
    "WorldPaths",
    "WorldRecord",
    "build_world",
    "caption_f1",
    "caption_hallucinations",
    "caption_text",
    "chance_level",
    "check_answer",
    "config_hash",
    "label_spaces",
    "load_scenes",
    "make_question",
    "make_questions",
    "normalize",
    "patch_labels",
    "position_name",
    "reference_answer",
    "render_scene",
    "sample_scene",
    "to_llava",
    "write_records",
]
