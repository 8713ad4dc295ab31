"""The typed configuration of ``metabolize.py``: the base training job, the rounds, the sampler, the generators.

Hydra composes ``conf/metabolize.yaml`` into :class:`MetabolizeConfig` (registered in :mod:`vlm_core.cli`);
every module of :mod:`vlm_core.loop` receives these dataclasses. YAML holds values only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from curation.config import NearConfig
from curation.sources.world.config import SKILLS
from vlm_core.config import JobConfig

STRATEGIES: tuple[str, ...] = ("adaptive", "uniform", "none")
GENERATORS: tuple[str, ...] = ("teacher", "self_augment", "http", "specialist")


@dataclass
class SamplerConfig:
    """Adaptive bad-case sampling (MLLM-DataEngine): each category's share of the round's budget.

    The strategy (``MetabolizeConfig.strategy``) picks the rule. ``adaptive``: weight_c = (1 - score_c) ** (1 / temperature), normalised; every category first gets
    ``floor`` × budget / categories so nothing starves. ``uniform``: the same budget spread evenly.
    ``none``: no new data (the control arm). Counts are integers that sum exactly to ``budget``.
    """

    budget: int = 3000  # new samples per round (all generators together)
    temperature: float = 1.0  # < 1 sharpens towards the worst category, > 1 flattens towards uniform
    floor: float = 0.25  # share of an even split every category keeps at least (0 = none, 1 = uniform)
    score_vs_chance: bool = True  # measure error above chance: (acc - chance) / (1 - chance), so coin-flip = all error
    categories: list[str] = field(default_factory=list)  # skills to sample; empty = every evaluated skill

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError(f"sampler.budget={self.budget} must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"sampler.temperature={self.temperature} must be > 0")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"sampler.floor={self.floor} must be in [0, 1] (a share of the even split)")
        unknown = sorted(set(self.categories) - set(SKILLS))
        if unknown:
            raise ValueError(f"sampler.categories: unknown skill(s) {unknown}; expected a subset of {list(SKILLS)}")


@dataclass
class TeacherConfig:
    """The built-in world as the teacher (ALLaVA's GPT-4V): targeted records of the requested skills."""

    turns: int = 1  # question/answer turns per record
    harder_for_weak: bool = True  # skills below ``weak_below`` ask for scenes in the upper half of the object range
    weak_below: float = 0.6  # score (vs chance) under which a skill counts as weak


@dataclass
class SelfAugmentConfig:
    """VILA²'s self-augment: the current model recaptions pool images; a verifier keeps the faithful captions."""

    images: int = 200  # pool caption images recaptioned per round, each round the next ones (wrapping around)
    min_f1: float = 0.8  # object F1 against the scene graph a caption needs to join the pool as a new sample
    max_hallucinations: int = 0  # objects/attributes not in the scene graph a kept caption may name
    # A faithful recaption (within max_hallucinations) that scores higher than the pool's caption of the image
    # replaces it even below min_f1: the pool's caption was worse. False: replacements need min_f1 too.
    replace_if_better: bool = True
    batch_size: int = 64
    max_new_tokens: int = 72

    def __post_init__(self) -> None:
        if self.images < 0:
            raise ValueError(f"self_augment.images={self.images} must be >= 0 (0 = recaption nothing)")
        if not 0.0 <= self.min_f1 <= 1.0:
            raise ValueError(f"self_augment.min_f1={self.min_f1} must be in [0, 1] (an object F1)")
        if self.max_hallucinations < 0:
            raise ValueError(f"self_augment.max_hallucinations={self.max_hallucinations} must be >= 0")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"self_augment.batch_size={self.batch_size} and max_new_tokens={self.max_new_tokens} "
                             "must be >= 1")


@dataclass
class SpecialistConfig:
    """VILA²'s specialist-augment: for each of ``skills`` the sampler asks for, the current model is fine-tuned
    on that skill's data alone (pool and earlier increments), and this specialist answers new questions of its
    skill about pool images that have none; its answers become new samples on the pool's images.

    The specialist fills ``share`` of the plan's count of each of its skills; the teachers fill the rest and
    whatever the specialist could not (too few images, answers the verifier dropped), so the round still adds
    its whole budget. The world's oracle scores every label either way (``oracle_agreement`` in rounds.json).
    """

    skills: list[str] = field(default_factory=lambda: ["spatial", "grounding", "ocr"])  # VILA²'s three specialists
    share: float = 0.5  # of the plan's count of each specialist skill; the teachers get the rest
    steps: int = 150  # fine-tuning steps of each specialist, from the previous round's weights
    lr: float = 5e-4
    warmup_steps: int = 10
    batch_size: int = 64  # prompts decoded together (the fine-tuning uses job.train.batch_size)
    # Keep only labels the world's oracle accepts. False keeps the specialist's labels as they are, as VILA²
    # does on real data, where there is no oracle: the increment then carries the specialist's errors.
    verify: bool = True
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skills) - set(SKILLS))
        if unknown:
            raise ValueError(f"specialist.skills: unknown skill(s) {unknown}; expected a subset of {list(SKILLS)}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"specialist.share={self.share} must be in [0, 1] (a share of the plan)")
        if self.steps < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"specialist: need steps >= 1, lr > 0 and warmup_steps >= 0; got steps={self.steps}, "
                             f"lr={self.lr}, warmup_steps={self.warmup_steps}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"specialist.batch_size={self.batch_size} and max_new_tokens={self.max_new_tokens} "
                             "must be >= 1")


@dataclass
class HttpTeacherConfig:
    """A teacher that speaks the OpenAI chat-completions API; the world asks the question, the teacher answers."""

    url: str = "http://127.0.0.1:8000/v1/chat/completions"
    model: str = "teacher"
    timeout_s: float = 60.0
    max_tokens: int = 72
    verify: bool = True  # drop answers the world's oracle scores below ``min_score`` (a teacher can be wrong)
    min_score: float = 1.0
    api_key: str | None = None  # sent as a bearer token when set


@dataclass
class RoundTrainConfig:
    """How rounds 1..N train: continuing from the previous round's weights for a few hundred steps."""

    continue_from_previous: bool = True  # False = every round trains from scratch (stage 0 still cached)
    max_steps: int = 300  # instruction-tuning steps per round
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.3
    pool_weight: float = 0.15  # replay: repetition factor of the base pool in each round's mixture
    increment_weight: float = 1.0  # repetition factor of every increment (this round's and earlier ones)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("rounds_train: need max_steps >= 1, lr > 0 and warmup_steps >= 0")
        if self.pool_weight < 0 or self.increment_weight < 0:
            raise ValueError("rounds_train.pool_weight and increment_weight must be >= 0")


@dataclass
class RoundBalanceConfig:
    """MetaCLIP balancing of each round's increment (``curation.stages.balance``), within each skill and
    concept family (colours, shapes, words): a concept above ``cap`` x its family's median count keeps each
    of its records with probability t / count. The skills' shares are the sampler's plan and are left alone."""

    enabled: bool = True
    cap: float = 2.0  # curate.py uses 1.25 on raw data; the teacher draws concepts evenly, so only real skew is capped
    min_t: float = 20.0  # t is at least this: a few dozen samples of a skill are never thinned for counting noise
    seed: int = 0  # mixed with the loop's seed and the round

    def __post_init__(self) -> None:
        if self.cap < 1.0:
            raise ValueError(f"curation.balance.cap={self.cap} must be >= 1 (t is at least the median count)")
        if self.min_t < 0:
            raise ValueError(f"curation.balance.min_t={self.min_t} must be >= 0")


@dataclass
class RoundCurationConfig:
    """How a round's increment is curated with the pool before it joins the mixture.

    Exact duplicates (scene graph, question and answer) of the pool, of earlier rounds and of each other are
    always dropped. ``near``: curate.py's near-duplicate stage with the pool and earlier rounds as its
    reference. ``balance``: see :class:`RoundBalanceConfig`. ``refill``: extra teacher passes that replace
    what curation removed, so every strategy adds its full budget.
    """

    near: NearConfig = field(default_factory=NearConfig)
    balance: RoundBalanceConfig = field(default_factory=RoundBalanceConfig)
    refill: int = 2  # teacher passes after the first that top the increment up to the plan (0 = none)

    def __post_init__(self) -> None:
        if self.refill < 0:
            raise ValueError(f"curation.refill={self.refill} must be >= 0")


@dataclass
class MetabolizeConfig:
    """Everything ``metabolize.py`` needs. ``job`` is round 0's training job; rounds 1..N derive from it."""

    job: JobConfig = field(default_factory=JobConfig)
    strategy: str = "adaptive"  # one of STRATEGIES: how the sampler splits each round's budget
    rounds: int = 3  # loop iterations after round 0 (evaluate → sample → generate → curate → retrain)
    seed: int = 0  # the loop's seed: replaces job.train.seed, and seeds the teacher and the mixtures
    generators: list[str] = field(default_factory=lambda: ["teacher", "self_augment"])  # of GENERATORS
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    self_augment: SelfAugmentConfig = field(default_factory=SelfAugmentConfig)
    http: HttpTeacherConfig = field(default_factory=HttpTeacherConfig)
    specialist: SpecialistConfig = field(default_factory=SpecialistConfig)
    rounds_train: RoundTrainConfig = field(default_factory=RoundTrainConfig)
    curation: RoundCurationConfig = field(default_factory=RoundCurationConfig)
    output_dir: str | None = None  # None = Hydra's run directory
    resume: bool = True  # a rerun in the same output_dir continues at the first unfinished round
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; expected one of {list(STRATEGIES)}")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.rounds < 0:
            raise ValueError(f"rounds={self.rounds} must be >= 0")
        unknown = sorted(set(self.generators) - set(GENERATORS))
        if unknown:
            raise ValueError(f"generators: unknown {unknown}; expected a subset of {list(GENERATORS)}")
        if self.job.data.source != "world":
            raise ValueError(
                f"job.data.source={self.job.data.source!r}: the loop needs the built-in world (data=world), whose "
                "oracle scores the bad cases and whose teacher generates the increments"
            )
