"""One training job: data → stage 0 (tower) → stage 1 (align) → stage 2 (instruct) → held-out eval.

Every stage is optional and resumable. A checkpoint records which stages are complete and where the
current one stands (step, optimizer, data position, RNG), so ``train.resume`` continues exactly where
a killed run stopped: the remaining steps see the same batches and produce the same losses.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console

from curation.sources.world import WorldPaths
from vlm_core.config import JobConfig
from vlm_core.data.dataset import SFTDataset
from vlm_core.data.image import ImageProcessor
from vlm_core.data.packing import pad_rows_for
from vlm_core.data.prepare import PreparedData, prepare_data
from vlm_core.data.tokenizer import IMAGE_TOKEN, ChatEncoder, load_tokenizer
from vlm_core.eval.evaluate import answer_questions, evaluate, render_table
from vlm_core.eval.formats import run_benchmark
from vlm_core.hf.checkpoint import resolve_checkpoint
from vlm_core.hf.load import hf_job_config, import_model
from vlm_core.model.vlm import VLM, count_parameters
from vlm_core.parallel.checkpoint import Sharding
from vlm_core.parallel.collectives import broadcast_module, broadcast_object
from vlm_core.parallel.env import ParallelEnv, init_parallel, shutdown_parallel
from vlm_core.parallel.plan import gather_model_state, parallelize
from vlm_core.parallel.preemption import PreemptionGuard
from vlm_core.parallel.seed import seed_ranks
from vlm_core.train.align_words import (
    cell_word_loss,
    summarize_cell_words,
    word_token_table,
)
from vlm_core.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from vlm_core.train.lm import PackedSteps, lm_loss, summarize_lm
from vlm_core.train.loop import (
    BatchSource,
    LoopContext,
    LossFn,
    StageSpec,
    Summarize,
    run_stage,
    use_bf16,
)
from vlm_core.train.metrics import MetricsLogger
from vlm_core.train.optim import build_optimizer
from vlm_core.train.tower import (
    TowerSteps,
    build_pretrainer,
    load_cached_tower,
    save_cached_tower,
    summarize_tower,
    tower_accuracy,
    tower_cache_key,
    tower_loss,
)
from vlm_core.types import EvalReport, Sample

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("tower", "align", "instruct")
RESUME_LATEST = ("true", "latest", "auto", "yes", "1")


@dataclass
class JobState:
    """What the job knows about its own progress; written into every checkpoint."""

    completed: list[str] = field(default_factory=list)
    resumed_from: Checkpoint | None = None

    def resume_point(self, stage: str) -> Checkpoint | None:
        """The checkpoint to continue ``stage`` from, if the run was resumed in the middle of it."""
        ckpt = self.resumed_from
        if ckpt is not None and ckpt.state.get("stage") == stage and stage not in self.completed:
            return ckpt
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return torch.device(name)


def find_resume_checkpoint(resume: str | None, run_dir: Path, outputs_root: Path = Path("outputs")) -> Path | None:
    """Interpret ``train.resume``: None; "true"/"latest" (this run dir, else the newest under outputs/); a path."""
    if resume is None or resume.lower() in ("false", "no", "0", "none", ""):
        return None
    if resume.lower() in RESUME_LATEST:
        found = latest_checkpoint(run_dir / "checkpoints")
        if found is None and outputs_root.is_dir():
            pointers = sorted(outputs_root.glob("**/checkpoints/latest.json"), key=lambda p: p.stat().st_mtime)
            found = latest_checkpoint(pointers[-1].parent) if pointers else None
        if found is None:
            raise CheckpointError(
                f"train.resume={resume}: no checkpoint in {run_dir / 'checkpoints'} or under {outputs_root}/; "
                "pass train.resume=PATH to a run directory or a checkpoint folder"
            )
        return found
    try:
        return resolve_checkpoint(resume)
    except CheckpointError as exc:
        raise CheckpointError(f"train.resume={resume}: {exc}") from exc


def requeued_checkpoint(run_dir: Path) -> Path | None:
    """In a Slurm job that was requeued (preempted or timed out), the newest checkpoint of its own run dir."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    return latest_checkpoint(run_dir / "checkpoints")


def run_job(cfg: JobConfig, show_progress: bool = True) -> EvalReport | None:
    """Run every enabled stage, then the held-out evaluation; return the report (None without eval data).

    Launched by torchrun or as a multi-task Slurm job, every process runs this; see :mod:`vlm_core.parallel`.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    env = init_parallel(cfg.parallel, resolve_device(cfg.train.device))  # a world of one joins no process group
    scratch = None
    try:
        if not env.is_main:  # a rank's own files (quarantine list, tokenizer copy) go to a scratch folder
            scratch = Path(tempfile.mkdtemp(prefix=f"vlm-rank{env.rank}-"))
        return _run_job(cfg, env, show_progress and env.is_main, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        shutdown_parallel(env)


def _run_job(cfg: JobConfig, env: ParallelEnv, show_progress: bool, scratch: Path | None) -> EvalReport | None:
    started = time.perf_counter()
    # Every rank uses rank 0's run dir: processes started by torchrun resolve Hydra's ${now:...} on their own.
    run_dir = Path(broadcast_object(str(Path(cfg.run_dir or "outputs/run").resolve()), env))
    run_dir.mkdir(parents=True, exist_ok=True)
    device = env.device
    seed_ranks(cfg.train.seed, env)  # torch's global RNG gets train.seed on every rank (the model's init)
    if cfg.model.hf is not None:  # model=hf: architecture, weights and tokenizer from local Hugging Face folders
        cfg = hf_job_config(cfg)

    if not env.is_main:
        env.barrier()  # rank 0 builds (or finds) the cached world and tokenizer first; the others then read them
    data = prepare_data(
        cfg.data, run_dir if scratch is None else scratch, show_progress=show_progress, mixture=cfg.mixture
    )
    if env.is_main:
        env.barrier()
    tokenizer = load_tokenizer(data.tokenizer_dir)
    encoder = ChatEncoder(tokenizer, cfg.model.vision.num_patches)
    processor = ImageProcessor(cfg.model.vision.image_size, cfg.model.vision.image_mean, cfg.model.vision.image_std)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model = (import_model(cfg.model, tokenizer) if cfg.model.hf is not None
             else VLM(cfg.model, vocab_size=len(tokenizer), image_token_id=image_token_id)).to(device)
    log.info("model %s: %s parameters", cfg.model.name, {k: f"{v:,}" for k, v in count_parameters(model).items()})
    log.info("device %s, %s matmuls (train.precision=%s)", device,
             "bf16" if use_bf16(cfg.train.precision, device) else "fp32", cfg.train.precision)
    log.info("packed rows %s (data.pad_rows=%s)", f"padded to {cfg.data.row_len} slots"
             if pad_rows_for(device, cfg.data.pad_rows) else "without padding: the samples back to back",
             cfg.data.pad_rows)  # fmt: skip
    model.decoder.select_attention(device)  # logs the attention impl (and any fallback) before training
    if env.is_main:
        atomic_write_text(run_dir / "tokenizer_path.txt", str(data.tokenizer_dir) + "\n")

    job = JobState()
    resume_path = find_resume_checkpoint(cfg.train.resume, run_dir) or requeued_checkpoint(run_dir)
    if resume_path is not None:
        job.resumed_from = load_checkpoint(resume_path, model)
        state = job.resumed_from.state
        job.completed = list(state.get("completed_stages", []))
        log.info("resuming from %s (stage %s, step %s)", resume_path, state.get("stage"), state.get("step"))
    resume_step = job.resumed_from.state["step"] if job.resumed_from else None
    logger = MetricsLogger(run_dir, resume_step=resume_step) if env.is_main else _SilentLogger()

    def checkpoint_state() -> dict[str, Any]:
        return {
            "completed_stages": list(job.completed),
            "model_config": asdict(cfg.model),
            "tokenizer_dir": str(data.tokenizer_dir),
            "parallel": {"tensor_parallel": env.tp_size, "data_parallel": env.dp_size},
        }

    context = LoopContext(
        run_dir=run_dir, logger=logger, device=device, bf16=use_bf16(cfg.train.precision, device),
        log_every=cfg.train.log_every,
        ckpt_every=cfg.train.ckpt_every, keep_checkpoints=cfg.train.keep_checkpoints,
        checkpoint_state=checkpoint_state, show_progress=show_progress,
        sharding=Sharding(env), preemption=PreemptionGuard.install(env),
    )
    offsets = _stage_offsets(cfg)
    try:
        cells = _CellData(cfg, data, processor, device, show_progress)
        # Stages 0 and 1 (tower, projector alignment) run on the whole model, the same on every rank.
        _run_tower(cfg, model, data, cells, job, context, offsets["tower"], device)
        # TensorBoard sample answers decode on rank 0 with the single-device model (not a TP shard of it).
        sampler = None
        if env.is_main:
            sampler = _sample_logger(model, data.eval, encoder, processor, logger, cfg.eval.max_new_tokens)
        context.on_sample, context.sample_every = sampler, cfg.train.sample_every
        align = cfg.train.align
        spec = StageSpec("align", align.steps, offsets["align"], align.lr, align.warmup_steps, 1.0, cfg.train.grad_clip)
        if align.enabled and align.objective == "cell_words":
            if "align" not in job.completed:
                source = cells.source("train", align.batch_size, "align")
                loss_fn = functools.partial(cell_word_loss, table=word_token_table(cfg.data.world, tokenizer))
                _run_on_model(spec, align.trainable, source, loss_fn, summarize_cell_words, cfg, model, job, context)
        elif align.enabled:
            samples = _world_samples_for(data.train, align.skills)
            _run_lm_stage(spec, align.trainable, align.batch_size, samples, cfg, model, encoder, processor, job, context, device)
        train = cfg.train
        spec = StageSpec("instruct", train.max_steps, offsets["instruct"], train.lr, train.warmup_steps,
                         train.min_lr_ratio, train.grad_clip)
        single_device_model = model
        if env.distributed:  # stage 2 runs tensor x data parallel
            broadcast_module(model, env)  # rank 0's weights are the reference for every replica and shard
            layout = parallelize(model, env)  # TP > 1: megatron-core's layers, cut from those weights
            context.sharding = Sharding(env, layout, vocab_size=model.vocab_size)  # TP=1: layout {}, not sharded
            context.parallel = env
            if env.tensor_parallel:
                context.on_sample = None  # answers need the whole model; the sample logger runs after training
        _run_lm_stage(spec, train.trainable, train.batch_size, data.train, cfg, model, encoder, processor, job, context,
                      device, curriculum_steps=round(train.curriculum_fraction * train.max_steps),
                      focus_steps=round(train.focus_fraction * train.max_steps) if train.focus_skills else 0)
        if env.tensor_parallel:  # rank 0 evaluates the merged single-device model
            state = gather_model_state(model, context.sharding.layout, env)
            if env.is_main:
                single_device_model = VLM(cfg.model, vocab_size=model.vocab_size, image_token_id=model.image_token_id)
                single_device_model.load_state_dict(state)
                single_device_model.to(device)
                if sampler is not None:
                    sampler = _sample_logger(single_device_model, data.eval, encoder, processor, logger,
                                             cfg.eval.max_new_tokens)
        if sampler is not None:
            sampler(offsets["instruct"] + train.max_steps)
        report = None
        if env.is_main and cfg.eval.enabled and cfg.eval.format != "world":  # a benchmark (vlm_core.eval.formats)
            result = run_benchmark(single_device_model, encoder, processor, cfg.eval, show_progress)
            atomic_write_text(run_dir / f"eval_{cfg.eval.format}.json", json.dumps(result.metrics, indent=1))
            report = result.report
        elif env.is_main and cfg.eval.enabled and data.eval:
            report = evaluate(single_device_model, data.eval, encoder, processor, data.scorer, data.chance, cfg.eval,
                              show_progress)
        env.barrier()  # the other ranks wait for rank 0's evaluation
        if report is not None:
            atomic_write_text(run_dir / "eval.json", json.dumps(report.to_json(), indent=1))
            atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in report.predictions))
            logger.log_scalars(offsets["end"], "eval", {**report.skills, "overall": report.overall})
            Console().print(render_table(report, title=f"held-out accuracy ({run_dir.name})"))
        log.info("job finished in %.1f s; run directory %s", time.perf_counter() - started, run_dir)
        return report
    finally:
        logger.close()
        if context.preemption is not None:
            context.preemption.uninstall()


class _SilentLogger:
    """The metrics logger of ranks other than 0: rank 0 writes metrics.jsonl and TensorBoard."""

    def log(self, step: int, stage: str, metrics: dict[str, float]) -> None: ...

    def log_scalars(self, step: int, prefix: str, values: dict[str, float]) -> None: ...

    def log_samples(self, step: int, images: Any, texts: list[str]) -> None: ...

    def close(self) -> None: ...


def _stage_offsets(cfg: JobConfig) -> dict[str, int]:
    """Each stage's place on the global step axis (fixed by the config, whether a stage runs or is cached)."""
    tower = cfg.train.tower.steps if cfg.train.tower.enabled else 0
    align = cfg.train.align.steps if cfg.train.align.enabled else 0
    return {"tower": 0, "align": tower, "instruct": tower + align, "end": tower + align + cfg.train.max_steps}


class _CellData:
    """The world's images with per-patch labels, decoded once and shared by stage 0 and stage 1."""

    def __init__(self, cfg: JobConfig, data: PreparedData, processor: ImageProcessor, device: torch.device,
                 show_progress: bool) -> None:
        self.cfg, self.data, self.processor, self.device, self.show_progress = cfg, data, processor, device, show_progress
        self._decoded: dict[str, TowerSteps] = {}

    def require_world(self) -> WorldPaths:
        if self.data.world is None:
            raise ValueError(
                "train.tower and train.align.objective=cell_words learn from the built-in world's scene graphs, but "
                "data.source is not world; set train.tower.enabled=false and train.align.objective=captions"
            )
        return self.data.world

    def source(self, split: str, batch_size: int, stage: str) -> TowerSteps:
        """A batch stream of ``split`` for ``stage``; images are decoded once per split."""
        world = self.require_world()
        if split not in self._decoded:
            root = world.image_root.resolve()
            samples = self.data.train if split == "train" else self.data.eval
            self._decoded[split] = TowerSteps(
                {k: self.data.scenes[k] for k in _image_keys(samples, root)}, root, self.cfg.data.world,
                self.cfg.model.vision, self.processor, batch_size, self.cfg.train.seed, self.device, self.show_progress,
            )
        return self._decoded[split].with_stream(batch_size, _stage_seed(self.cfg, stage))


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` torch CPU threads (None: leave the setting alone), then restore it."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        log.info("using %d CPU thread(s) instead of %d for this stage", threads, before)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _run_tower(
    cfg: JobConfig, model: VLM, data: PreparedData, cells: _CellData, job: JobState, context: LoopContext,
    offset: int, device: torch.device,
) -> None:
    stage = cfg.train.tower
    if not stage.enabled or "tower" in job.completed:
        return
    world = cells.require_world()
    folder = Path(cfg.data.cache_dir).expanduser() / "towers" / tower_cache_key(
        cfg.model.vision, world.config_hash, stage, cfg.train.seed
    )
    info = load_cached_tower(folder, model.vision) if stage.cache else None
    if info is not None:
        log.info("stage 0: reusing the pretrained tower in %s (per-patch accuracy %.3f)", folder, info["acc"])
    else:
        pretrainer = build_pretrainer(model.vision, cfg.data.world, cfg.model.vision).to(device)
        source = cells.source("train", stage.batch_size, "tower")
        optimizer = build_optimizer(pretrainer, ["vision", "heads"], stage.lr, stage.weight_decay,
                                    (cfg.train.beta1, cfg.train.beta2))
        spec = StageSpec("tower", stage.steps, offset, stage.lr, stage.warmup_steps, 0.1, cfg.train.grad_clip)
        tower_context = LoopContext(**{**context.__dict__, "ckpt_every": 0, "on_sample": None})
        with cpu_threads(stage.threads if device.type == "cpu" else None):
            info = run_stage(spec, pretrainer, optimizer, source, tower_loss, summarize_tower, tower_context)
        if data.eval:
            info.update(tower_accuracy(pretrainer, cells.source("eval", stage.batch_size, "tower")))
            context.logger.log_scalars(offset + stage.steps, "tower", info)
        log.info("stage 0: tower per-patch accuracy %s", {k: round(v, 3) for k, v in info.items() if "acc" in k})
        if stage.cache and context.sharding.env.is_main:
            save_cached_tower(folder, model.vision, info)
    job.completed.append("tower")
    state = {"stage": "tower", "stage_step": stage.steps, "step": offset + stage.steps, "data": {}}
    state.update(context.checkpoint_state())
    save_checkpoint(context.run_dir / "checkpoints", "tower", model, None, state, sharding=context.sharding)


def _run_lm_stage(
    spec: StageSpec, trainable: list[str], batch_size: int, samples: list[Sample], cfg: JobConfig, model: VLM,
    encoder: ChatEncoder, processor: ImageProcessor, job: JobState, context: LoopContext, device: torch.device,
    curriculum_steps: int = 0, focus_steps: int = 0,
) -> None:
    if spec.name in job.completed:
        return
    if not samples:
        raise ValueError(f"stage {spec.name} has no training samples (check train.align.skills and data.world.skills)")
    dataset = SFTDataset(samples, encoder, processor, cache_images=cfg.data.image_cache)
    env = context.parallel  # set for the stage that runs data parallel: each DP rank packs its share
    source = PackedSteps(
        dataset, batch_size, cfg.train.grad_accum, cfg.data.row_len, _stage_seed(cfg, spec.name), device,
        curriculum_steps=curriculum_steps, curriculum_start=cfg.train.curriculum_start,
        focus_skills=tuple(cfg.train.focus_skills), focus_steps=focus_steps,
        data_parallel=(env.dp_rank, env.dp_size) if env is not None else (0, 1),
        pad_rows=pad_rows_for(device, cfg.data.pad_rows),
    )
    loss_fn = functools.partial(lm_loss, per_sample=cfg.train.loss_per_sample)
    _run_on_model(spec, trainable, source, loss_fn, summarize_lm, cfg, model, job, context)


def _run_on_model(
    spec: StageSpec, trainable: list[str], source: BatchSource, loss_fn: LossFn, summarize: Summarize,
    cfg: JobConfig, model: VLM, job: JobState, context: LoopContext,
) -> None:
    """Train ``trainable`` parts of the VLM for one stage, continuing from the checkpoint if resumed in it."""
    optimizer = build_optimizer(model, trainable, spec.lr, cfg.train.weight_decay, (cfg.train.beta1, cfg.train.beta2))
    start = 0
    resume = job.resume_point(spec.name)
    if resume is not None:
        load_optimizer_state(resume.path, optimizer, model, context.sharding)
        source.load_state_dict(resume.state["data"])
        start = resume.state["stage_step"]
    if start < spec.steps:
        run_stage(spec, model, optimizer, source, loss_fn, summarize, context, start_step=start)
    job.completed.append(spec.name)


def _stage_seed(cfg: JobConfig, stage: str) -> int:
    """Each stage draws its batches from its own seed, derived from ``train.seed``."""
    return cfg.train.seed * len(STAGES) + STAGES.index(stage)


def _image_keys(samples: list[Sample], root: Path) -> list[str]:
    """The distinct images of ``samples`` as paths relative to the world's image root (the scene keys)."""
    return sorted({path.resolve().relative_to(root).as_posix() for s in samples for path in s.image_paths})


def _world_samples_for(samples: list[Sample], skills: list[str]) -> list[Sample]:
    if not skills:
        return samples
    wanted = set(skills)
    return [s for s in samples if s.skill in wanted]


def _sample_logger(
    model: VLM, eval_samples: list[Sample], encoder: ChatEncoder, processor: ImageProcessor, logger: MetricsLogger,
    max_new_tokens: int,
):
    """TensorBoard hook: one held-out example per skill, the image and the model's answer."""
    picked: dict[str, Sample] = {}
    for sample in eval_samples:
        if sample.image_paths and (sample.skill or "all") not in picked:
            picked[sample.skill or "all"] = sample
    if not picked:
        return None
    chosen = list(picked.values())

    def log_samples(step: int) -> None:
        answers = answer_questions(model, chosen, encoder, processor, max_new_tokens, batch_size=len(chosen))
        images = np.stack([processor.load_uint8(s.image_paths[0]).permute(1, 2, 0).numpy() for s in chosen])
        texts = [
            f"**{s.skill}** {s.turns[-2].text.replace('<image>', '').strip()} → `{a}` (reference `{s.turns[-1].text}`)"
            for s, a in zip(chosen, answers)
        ]
        logger.log_samples(step, images, texts)

    return log_samples
