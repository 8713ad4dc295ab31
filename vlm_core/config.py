"""The typed configuration of a training job: data, model, training stages, evaluation.

Hydra composes YAML from ``conf/`` into these dataclasses (registered in :mod:`vlm_core.cli`); every
module below the entry points receives them as plain dataclasses. Derived values are resolved in
``__post_init__``, never as class-level defaults, so overriding one field never leaves another stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from curation.sources.world.config import SKILLS, WorldConfig
from vlm_core.model.config import ModelConfig
from vlm_core.parallel.config import ParallelConfig

MODULE_NAMES: tuple[str, ...] = ("vision", "projector", "decoder")
SOURCES: tuple[str, ...] = ("world", "llava", "manifest")


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from."""

    path: Optional[str] = None  # a local Hugging Face tokenizer folder; None = train one on the training text
    vocab_size: int = 1024  # only used when training one; the world's text needs a few hundred tokens

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(
                f"data.tokenizer.vocab_size={self.vocab_size} is too small: byte-level BPE needs 256 byte "
                "tokens plus the special tokens plus merges; use >= 300"
            )


@dataclass
class MixtureConfig:
    """Per-source weights over a curated manifest (``data.source=manifest``), overriding the ones it was written
    with: ``mixture.weights.ocr=0.2`` keeps a seeded 20% of source ``ocr``; 2.5 = two copies and a seeded half."""

    weights: dict[str, float] = field(default_factory=dict)  # source name → repetition factor; unnamed: the manifest's
    seed: Optional[int] = None  # draws the fractional parts; None = the seed the manifest was curated with

    def __post_init__(self) -> None:
        bad = {name: weight for name, weight in self.weights.items() if not 0 <= weight < float("inf")}
        if bad:
            raise ValueError(f"mixture.weights: {bad}; each weight must be a finite number >= 0")


@dataclass
class DataConfig:
    """Training and held-out data: the built-in world (default) or LLaVA-format JSON files."""

    source: str = "world"  # "world": the built-in world; "llava": train_json/eval_json; "manifest": curate.py's output
    cache_dir: str = "~/.cache/vlm-data-metabolism"  # the world, its tokenizer and pretrained towers are cached here
    world: WorldConfig = field(default_factory=WorldConfig)
    train_json: Optional[str] = None  # source=llava: training records (JSON list or JSONL)
    eval_json: Optional[str] = None  # source=llava: held-out records; None = train only, no eval
    image_root: Optional[str] = None  # source=llava: image paths in the records are relative to this folder
    path: Optional[str] = None  # source=manifest: a manifest.parquet written by curate.py
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    row_len: int = 512  # slots per packed row; a sample longer than this is an error, not a truncation
    # pad each packed row to row_len (static shapes) or write the samples alone; None: padded on the CPU,
    # not on a GPU (vlm_core.data.packing.pad_rows_for says why)
    pad_rows: Optional[bool] = None
    on_bad_record: str = "quarantine"  # "quarantine": log and skip bad records; "error": stop at the first
    image_cache: bool = True  # keep decoded images in memory (the world's 25k 48x48 images take ~170 MB)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}; expected one of {list(SOURCES)}")
        if self.source == "llava" and not (self.train_json and self.image_root):
            raise ValueError("data.source=llava needs data.train_json=PATH and data.image_root=DIR")
        if self.source == "manifest" and not self.path:
            raise ValueError("data.source=manifest needs data.path=PATH/manifest.parquet (curate.py writes one)")
        if self.on_bad_record not in ("quarantine", "error"):
            raise ValueError(f"data.on_bad_record={self.on_bad_record!r}; expected 'quarantine' or 'error'")
        if self.row_len < 16:
            raise ValueError(f"data.row_len={self.row_len} is too small to hold one sample; use >= 16")


@dataclass
class TowerStageConfig:
    """Stage 0: pretrain the vision tower with per-patch heads supervised by the world's scene graph.

    A stand-in for the CLIP/SigLIP tower LLaVA starts from: a ViT trained from scratch only through the
    language loss does not learn on a CPU budget (measured before this project started: every skill stayed
    at its question-prior floor after 1000 steps), while per-patch supervision reaches ~99% in a minute.
    """

    enabled: bool = True
    steps: int = 300  # held-out per-patch accuracy reaches 1.00 on the default world well before this
    batch_size: int = 128  # images per step
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    cache: bool = True  # reuse a tower pretrained with the same model, world and stage config from data.cache_dir
    # CPU threads while the tower trains; None = train.threads. A CPU matmul's float rounding depends on how
    # many threads split it, so the tower trained on 1 thread is the same on any core count; with 2 threads
    # this machine trained a different tower, and stage 2 on it missed existence and grounding (see README).
    threads: Optional[int] = 1

    def __post_init__(self) -> None:
        _check_stage("train.tower", self.steps, self.batch_size, self.lr, self.warmup_steps)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"train.tower.threads={self.threads} must be >= 1 (or null for train.threads)")


@dataclass
class AlignStageConfig:
    """Stage 1 (LLaVA's feature alignment): only the listed modules train.

    ``objective``:
    - ``cell_words`` (default, world data only): each image token is aligned with the words that name its
      cell (colour, shape, size, text) under the tied LM head; see :mod:`vlm_core.train.align_words`.
      For a decoder that starts from random weights, as the tiny one does.
    - ``captions``: LLaVA's recipe, next-token loss on caption samples (``skills``). Meant for a
      pretrained LLM: with the random tiny decoder it taught nothing (measured on the default world:
      caption loss 6.17 after 150 steps against ln(565) = 6.34 for guessing, while the projector's
      outputs grew to 15x the norm of the text embeddings).
    """

    enabled: bool = True
    objective: str = "cell_words"  # "cell_words" or "captions"
    steps: int = 200
    batch_size: int = 128  # images per step (cell_words) or samples per step (captions)
    lr: float = 2e-3
    warmup_steps: int = 20
    skills: list[str] = field(default_factory=lambda: ["caption"])  # objective=captions: world skills used; empty = all
    trainable: list[str] = field(default_factory=lambda: ["projector"])

    def __post_init__(self) -> None:
        _check_stage("train.align", self.steps, self.batch_size, self.lr, self.warmup_steps)
        if self.objective not in ("cell_words", "captions"):
            raise ValueError(f"train.align.objective={self.objective!r}; expected 'cell_words' or 'captions'")
        _check_modules("train.align.trainable", self.trainable)
        _check_skills("train.align.skills", self.skills)


@dataclass
class TrainConfig:
    """Stage 2 (instruction tuning) hyper-parameters, shared run settings, and the earlier stages."""

    max_steps: int = 2800  # instruction-tuning optimizer steps (~8 min on 2 CPU cores with bf16)
    batch_size: int = 64  # samples per optimizer step, summed over gradient-accumulation micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size must divide evenly
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.3  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup, then cosine
    weight_decay: float = 0.0  # applied to matrices only, never to norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    trainable: list[str] = field(default_factory=lambda: ["projector", "decoder"])
    loss_per_sample: bool = True  # weigh samples equally (else tokens; see vlm_core.train.lm.lm_loss)
    curriculum_fraction: float = 0.5  # share of max_steps over which the cap on objects per scene rises; 0 = none
    curriculum_start: int = 1  # the cap at the first step (samples without meta.n_objects are always eligible)
    # For the first focus_fraction of max_steps only samples of these skills are drawn; the rest join after.
    # See vlm_core.data.curriculum for why and what was measured. Either empty/0 = no focus phase.
    focus_skills: list[str] = field(default_factory=lambda: ["color", "shape", "grounding", "existence", "ocr"])
    focus_fraction: float = 0.4
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    threads: Optional[int] = None  # torch CPU threads; None = all cores
    precision: str = "auto"  # "auto": bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX); "fp32"; "bf16"
    log_every: int = 10  # optimizer steps between metrics.jsonl/TensorBoard records
    ckpt_every: int = 200  # optimizer steps between checkpoints (each stage also saves at its end)
    keep_checkpoints: int = 2  # step checkpoints kept on disk, oldest deleted first
    sample_every: int = 500  # steps between TensorBoard sample images with the model's answers; 0 = never
    resume: Optional[str] = None  # None; "true"/"latest" = newest checkpoint of this run dir or of the outputs root; or a path
    tower: TowerStageConfig = field(default_factory=TowerStageConfig)
    align: AlignStageConfig = field(default_factory=AlignStageConfig)

    def __post_init__(self) -> None:
        _check_stage("train", self.max_steps, self.batch_size, self.lr, self.warmup_steps)
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of train.grad_accum={self.grad_accum}"
            )
        if not 0.0 <= self.curriculum_fraction <= 1.0:
            raise ValueError(f"train.curriculum_fraction={self.curriculum_fraction} must be in [0, 1]")
        if not 0.0 <= self.focus_fraction <= 1.0:
            raise ValueError(f"train.focus_fraction={self.focus_fraction} must be in [0, 1]")
        _check_skills("train.focus_skills", self.focus_skills)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        if self.log_every < 1 or self.ckpt_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("train.log_every, train.ckpt_every and train.keep_checkpoints must be >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"train.device={self.device!r}; expected auto, cpu, cuda or cuda:N")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision={self.precision!r}; expected auto, fp32 or bf16")
        _check_modules("train.trainable", self.trainable)


EVAL_FORMATS: tuple[str, ...] = ("world", "pope", "mme", "mmbench", "vqa")
# LLaVA-1.5's evaluation prompts (its scripts/v1_5/eval): short-answer benchmarks end every question so.
DEFAULT_PROMPT_SUFFIX: dict[str, str] = {
    "pope": "\nAnswer the question using a single word or phrase.",
    "mme": "\nAnswer the question using a single word or phrase.",
    "vqa": "\nAnswer the question using a single word or phrase.",
    "mmbench": "\nAnswer with the option's letter from the given choices directly.",
}


@dataclass
class EvalConfig:
    """Evaluation after training: greedy generation, scored per skill (or per benchmark subset).

    ``format=world`` scores the data's held-out split (the world's oracle, or exact match for LLaVA
    data). The other formats read a standard benchmark (vlm_core.eval.formats): ``questions`` is the
    file (POPE and VQA: JSONL; MMBench: TSV with base64 images) or, for MME, the benchmark's root
    folder; ``images`` is the folder image paths are relative to (they may not leave it).
    """

    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("prompt_suffix",)

    enabled: bool = True
    max_new_tokens: int = 72  # a 6-object caption is ~50 tokens
    batch_size: int = 128  # prompts decoded together
    limit_per_skill: Optional[int] = None  # evaluate at most this many records per skill (benchmarks: per subset); None = all
    show_examples: int = 2  # examples per skill kept in eval.json
    format: str = "world"  # one of EVAL_FORMATS
    questions: Optional[str] = None  # benchmark file (pope, vqa: .jsonl; mmbench: .tsv) or folder (mme); required unless world
    images: Optional[str] = None  # image folder of pope and vqa (required); mme: None = the questions folder; mmbench: unused
    # Appended to every benchmark question; None = the format's instruction from LLaVA-1.5's evaluation
    # (DEFAULT_PROMPT_SUFFIX above), "" = none (a model trained only on the world knows none).
    prompt_suffix: Optional[str] = None
    circular: bool = True  # mmbench: ask every rotation of the options; a question counts only if all are right

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("eval.max_new_tokens and eval.batch_size must be >= 1")
        if self.format not in EVAL_FORMATS:
            raise ValueError(f"eval.format={self.format!r}; expected one of {list(EVAL_FORMATS)}")
        if self.limit_per_skill is not None and self.limit_per_skill < 1:
            raise ValueError(f"eval.limit_per_skill={self.limit_per_skill} must be >= 1 (or None for all)")
        if self.prompt_suffix is None:
            self.prompt_suffix = DEFAULT_PROMPT_SUFFIX.get(self.format, "")


@dataclass
class JobConfig:
    """Everything ``train.py`` needs. ``run_dir`` is filled in by the entry point (Hydra's output dir)."""

    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # tensor x data parallelism (vlm_core.parallel)
    run_dir: Optional[str] = None


def _check_stage(prefix: str, steps: int, batch_size: int, lr: float, warmup_steps: int) -> None:
    if steps < 0:
        raise ValueError(f"{prefix} steps={steps} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"{prefix}.batch_size={batch_size} must be >= 1")
    if lr <= 0:
        raise ValueError(f"{prefix}.lr={lr} must be > 0")
    if warmup_steps < 0:
        raise ValueError(f"{prefix}.warmup_steps={warmup_steps} must be >= 0")


def _check_modules(name: str, modules: list[str]) -> None:
    unknown = sorted(set(modules) - set(MODULE_NAMES))
    if unknown:
        raise ValueError(f"{name}: unknown module(s) {unknown}; expected a subset of {list(MODULE_NAMES)}")


def _check_skills(name: str, skills: list[str]) -> None:
    unknown = sorted(set(skills) - set(SKILLS))
    if unknown:
        raise ValueError(f"{name}: unknown skill(s) {unknown}; expected a subset of {list(SKILLS)}")
