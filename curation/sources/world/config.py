"""Typed configuration of the built-in procedural world."""

from __future__ import annotations

from dataclasses import dataclass, field

SKILLS: tuple[str, ...] = ("caption", "color", "shape", "count", "spatial", "ocr", "existence", "grounding")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan", "pink")
SIZES: tuple[str, ...] = ("small", "large")
IMAGE_POSITIONS: tuple[str, ...] = ("first", "last")  # where <image> goes in the first human turn
# Three-letter words: at 64 px a 3x3 grid cell is ~21 px wide, which fits three glyphs of a ~9 px font.
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "KEY", "MAP", "PEN", "BUS",
    "FOX", "OWL", "BEE", "ANT", "EGG", "ICE", "JAR", "LOG", "NET", "RUG",
)


@dataclass
class WorldConfig:
    """The procedural world: what scenes look like, which questions are asked, and how many.

    Scenes put 1..max_objects shapes (and, with probability ``word_prob``, one rendered word) on
    the cells of a ``grid`` × ``grid`` layout of an ``image_size`` image.
    """

    image_size: int = 64  # pixels per side of the written PNGs
    grid: int = 3  # cells per side; objects sit at cell centres
    min_objects: int = 1  # shapes per scene, lower bound (words are not counted as shapes)
    max_objects: int = 6  # shapes per scene, upper bound; must be <= grid * grid (minus one if a word is drawn)
    word_prob: float = 0.3  # probability that a scene also shows one rendered word (OCR)
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    colors: list[str] = field(default_factory=lambda: list(COLORS))
    sizes: list[str] = field(default_factory=lambda: list(SIZES))
    words: list[str] = field(default_factory=lambda: list(WORDS))
    skills: list[str] = field(default_factory=lambda: list(SKILLS))  # skills to write; others are skipped
    # The default recipe trains the tiny model on a 2-core CPU in under 10 minutes; see README "The default
    # recipe" for what each choice bought, measured. Records are single-turn and put the image after the
    # question, and count and OCR (learned from any mix) get half the records.
    train_per_skill: int = 6000  # training records per skill, before train_scale
    # Per-skill multipliers of train_per_skill (rounded), so a smaller train_per_skill keeps the proportions.
    train_scale: dict[str, float] = field(default_factory=lambda: {"count": 0.5, "ocr": 0.5})
    train_counts: dict[str, int] = field(default_factory=dict)  # absolute per-skill counts; win over the two above
    eval_per_skill: int = 150  # held-out records per skill
    turns_per_record: int = 1  # question/answer turns per training record (same image, same skill)
    # Where <image> sits in the first human turn: "last" (after the question, the default) or "first".
    # With "last" each image token can see what is asked and mark itself as a match, so the answer only has
    # to find marked tokens; with "first" the answer position must pull the question and match it against
    # every image token itself. Measured on this CPU, one run each, 1 turn per record (later turns would have
    # the image first again): 5 skills (existence, grounding, color, shape, spatial), 6000 records each, 2000
    # steps, "last" color/shape/existence/grounding 0.99/0.99/0.99/0.98, "first" 0.41/0.46/0.49/0.41.
    image_position: str = "last"
    # Web-caption noise (the setting VILA²'s self-augmentation targets): this fraction of the training caption
    # records carries the caption of another training scene instead of its own. The scene graph stays true,
    # so verifiers and the loop still know what the image shows; held-out records are never noisy.
    caption_noise: float = 0.0
    seed: int = 0  # training split seed
    eval_seed: int = 1_000_003  # held-out split seed; must differ from ``seed``

    def train_count(self, skill: str) -> int:
        """Training records of ``skill``: ``train_counts[skill]``, else ``train_per_skill`` x ``train_scale[skill]``."""
        if skill in self.train_counts:
            return self.train_counts[skill]
        return round(self.train_per_skill * self.train_scale.get(skill, 1.0))

    def __post_init__(self) -> None:
        if self.image_position not in IMAGE_POSITIONS:
            raise ValueError(f"data.world.image_position={self.image_position!r}; expected one of {list(IMAGE_POSITIONS)}")
        unknown = sorted(set(self.skills) - set(SKILLS))
        if unknown:
            raise ValueError(f"data.world.skills: unknown skill(s) {unknown}; expected a subset of {list(SKILLS)}")
        self.train_counts = {str(k): int(v) for k, v in dict(self.train_counts).items()}  # Hydra hands a DictConfig
        unknown = sorted(set(self.train_counts) - set(SKILLS))
        if unknown:
            raise ValueError(f"data.world.train_counts: unknown skill(s) {unknown}; expected a subset of {list(SKILLS)}")
        if any(n < 0 for n in self.train_counts.values()):
            raise ValueError(f"data.world.train_counts={self.train_counts}: counts must be >= 0")
        self.train_scale = {str(k): float(v) for k, v in dict(self.train_scale).items()}
        unknown = sorted(set(self.train_scale) - set(SKILLS))
        if unknown:
            raise ValueError(f"data.world.train_scale: unknown skill(s) {unknown}; expected a subset of {list(SKILLS)}")
        if any(not 0 <= f < float("inf") for f in self.train_scale.values()):
            raise ValueError(f"data.world.train_scale={self.train_scale}: multipliers must be finite and >= 0")
        if not 0.0 <= self.caption_noise < 1.0:
            raise ValueError(f"data.world.caption_noise={self.caption_noise} must be in [0, 1): a share of the caption records")
        if not self.skills:
            raise ValueError("data.world.skills is empty; name at least one of " + ", ".join(SKILLS))
        for name in ("shapes", "colors", "sizes", "words"):
            known = {"shapes": SHAPES, "colors": COLORS, "sizes": SIZES, "words": WORDS}[name]
            values = getattr(self, name)
            if name != "words" and set(values) - set(known):
                raise ValueError(f"data.world.{name}: {sorted(set(values) - set(known))} are not drawable; use {list(known)}")
            if len(set(values)) < 2:
                raise ValueError(f"data.world.{name} needs at least 2 distinct values, got {values}")
        if any(len(w) > 3 or not w.isalpha() for w in self.words):
            raise ValueError(f"data.world.words: words must be 1-3 letters A-Z to fit one cell, got {self.words}")
        if self.image_size < 16 * self.grid // 2:
            raise ValueError(f"data.world.image_size={self.image_size} is too small for a {self.grid}x{self.grid} grid")
        if self.grid < 2:
            raise ValueError(f"data.world.grid={self.grid}; need at least 2 cells per side for spatial questions")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"data.world: need 1 <= min_objects <= max_objects, got {self.min_objects}..{self.max_objects}")
        if self.max_objects > self.grid * self.grid - 1:
            raise ValueError(
                f"data.world.max_objects={self.max_objects} does not fit a {self.grid}x{self.grid} grid "
                f"(at most {self.grid * self.grid - 1}: one cell is kept free for a word)"
            )
        n_pairs = len(set(self.colors)) * len(set(self.shapes))
        if self.max_objects >= n_pairs:
            # Every shape of a scene has its own (colour, shape) pair, so "the red circle" is unambiguous,
            # and existence questions need at least one pair that is absent from the scene.
            raise ValueError(
                f"data.world.max_objects={self.max_objects} needs more than {self.max_objects} (colour, shape) "
                f"pairs, but colors x shapes gives {n_pairs}; add colours or shapes, or lower max_objects"
            )
        if not 0.0 <= self.word_prob <= 1.0:
            raise ValueError(f"data.world.word_prob={self.word_prob} must be in [0, 1]")
        if self.train_per_skill < 0 or self.eval_per_skill < 0 or self.turns_per_record < 1:
            raise ValueError("data.world: train_per_skill and eval_per_skill must be >= 0 and turns_per_record >= 1")
        if self.seed == self.eval_seed:
            raise ValueError(f"data.world.eval_seed must differ from data.world.seed (both {self.seed}): the held-out split would repeat training scenes")
