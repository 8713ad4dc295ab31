"""The closed loop, round by round: train → evaluate → analyse → sample → generate → curate → train ...

Round 0 trains ``cfg.job`` on the world. Round k >= 1:

1. plans the increment from round k-1's analysis (:mod:`vlm_core.loop.sampler`);
2. generates it (:mod:`vlm_core.loop.generators`; the specialists first fine-tune round k-1's model on their
   skills) and curates it against the pool and earlier increments into ``round-k/manifest.parquet``
   (:mod:`vlm_core.loop.mixture`);
3. trains on that mixture, continuing from round k-1's weights (``rounds_train``), and evaluates;
4. analyses the evaluation (:mod:`vlm_core.loop.analysis`) and writes ``round-k/round.json`` and ``DONE``.

Layout of ``output_dir``::

    pool.parquet                 the base pool (the world's training split) as manifest rows
    round-0/train/               round 0's run directory (eval.json, predictions.jsonl, checkpoints/, tb/)
    round-k/images/, increment-<generator>.parquet, scenes.jsonl, manifest.parquet, train/
    round-k/specialist-<skill>/  a specialist's training mixture (manifest.parquet) and run (train/)
    round-k/round.json, DONE     the round's record; DONE is written last
    rounds.json, report.md, plots/, tb/

Resume: a rerun with the same ``output_dir`` skips every round with ``DONE`` and restarts the first one
without it; a round killed during training continues from its own newest checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from datasketch import MinHashLSH

from curation.sources.world import Scene, WorldPaths, build_world, load_scenes
from curation.stages.near import lsh_index
from vlm_core.config import JobConfig
from vlm_core.loop.analysis import analyse
from vlm_core.loop.config import MetabolizeConfig, RoundBalanceConfig, SelfAugmentConfig, SpecialistConfig
from vlm_core.loop.curate_stages import (
    NearFeatures,
    balance_filter,
    cached_near_features,
    near_features,
    near_filter,
)
from vlm_core.loop.generators import (
    Generated,
    HttpTeacher,
    SelfAugment,
    SpecialistAugment,
    WorldTeacher,
    merge_generated,
    teacher_seed,
)
from vlm_core.loop.mixture import (
    POOL_SOURCE,
    Curated,
    composition,
    curate_increment,
    sample_key,
    sample_table,
    write_mixture,
    write_table,
)
from vlm_core.loop.sampler import plan_increment
from vlm_core.train.checkpoint import atomic_write_text, latest_checkpoint
from vlm_core.types import EvalReport, Sample, Turn

log = logging.getLogger(__name__)

DONE = "DONE"
ROUND_FEATURES = "near-features.npz"  # the near-dedup features of the round's kept new-image samples
REFILL_SEED_STRIDE = 100_000  # refill pass p draws teacher seeds p strides away from the round's first pass
RunJob = Callable[[JobConfig], "EvalReport | None"]


def config_digest(cfg: MetabolizeConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def world_samples(world: WorldPaths, split: str = "train", source: str = POOL_SOURCE) -> list[Sample]:
    """The built world's records of ``split`` as Samples (trusted: the world wrote them), absolute image paths."""
    path = world.train_json if split == "train" else world.eval_json
    samples = []
    for row in json.loads(path.read_text()):
        turns = tuple(Turn("user" if m["from"] == "human" else "assistant", m["value"]) for m in row["conversations"])
        samples.append(Sample(id=row["id"], source=source, image_paths=((world.image_root / row["image"]).resolve(),),
                              turns=turns, skill=row.get("skill"), meta=row.get("meta") or {}))
    return samples


class Loop:
    """State shared by the rounds of one loop run: the world, its scenes, the pool, what is already in it."""

    def __init__(self, cfg: MetabolizeConfig, run_job: RunJob | None = None) -> None:
        if cfg.output_dir is None:
            raise ValueError("output_dir is not set; metabolize.py sets it to Hydra's run directory")
        self.cfg = cfg
        self.out = Path(cfg.output_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        if run_job is None:
            from vlm_core.train.job import run_job as default_run_job

            run_job = default_run_job
        self.run_job = run_job
        self.digest = config_digest(cfg)
        data = cfg.job.data
        self.world = build_world(data.world, Path(data.cache_dir).expanduser())
        root = self.world.image_root.resolve()
        self.scenes: dict[str, Scene] = {str(root / key): scene for key, scene in load_scenes(self.world).items()}
        self.eval_root = root / "eval"
        self.pool = world_samples(self.world)
        self._round_scenes: dict[int, dict[str, Scene]] = {}  # round → its increments' scenes, read on demand

    def scene_of(self, sample: Sample) -> Scene | None:
        return self.scenes.get(str(sample.image_paths[0])) if sample.image_paths else None

    def eval_scene(self, sample_id: str) -> Scene | None:
        return self.scenes.get(str(self.eval_root / f"{sample_id}.png"))

    def key_of(self, sample: Sample) -> str:
        return sample_key(sample, self.scene_of(sample))

    # --- the rounds -----------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        from vlm_core.loop.report import write_outputs, write_tensorboard

        history: list[dict[str, Any]] = []
        for k in range(self.cfg.rounds + 1):
            folder = self.out / f"round-{k}"
            if self.cfg.resume and (folder / DONE).is_file():
                history.append(json.loads((folder / "round.json").read_text()))
                log.info("round %d: done in an earlier run, skipped", k)
                continue
            if folder.exists() and not self.cfg.resume:
                shutil.rmtree(folder)
            started = time.perf_counter()
            record = self.round_zero(folder) if k == 0 else self.round(k, folder, history)
            record["wall_s"] = round(time.perf_counter() - started, 1)
            atomic_write_text(folder / "round.json", json.dumps(record, indent=1))
            atomic_write_text(folder / DONE, "\n")
            history.append(record)
            write_outputs(self.out, history)
            if self.cfg.tensorboard:
                write_tensorboard(self.out / "tb", [record])
            log.info("round %d finished in %.0f s: overall %.3f, %s", k, record["wall_s"], record["overall"],
                     {s: round(a, 3) for s, a in record["skills"].items()})
        write_outputs(self.out, history)
        return history

    def _job(self, folder: Path) -> JobConfig:
        job = copy.deepcopy(self.cfg.job)
        job.train.seed = self.cfg.seed
        job.run_dir = str(folder / "train")
        return job

    def round_zero(self, folder: Path) -> dict[str, Any]:
        job = self._job(folder)
        if latest_checkpoint(folder / "train" / "checkpoints") is not None:
            job.train.resume = str(folder / "train")  # killed during round 0: continue its own run
        pool_path = self.out / "pool.parquet"
        if not pool_path.is_file():
            write_table(sample_table(self.pool, POOL_SOURCE, {"round": 0, "generator": "world"}, self.digest), pool_path)
        report = self.run_job(job)
        mixture = composition(pq.read_table(pool_path))
        return self.record(0, folder, report, plan={}, generated={}, curation={}, mixture=mixture)

    def round(self, k: int, folder: Path, history: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        previous = history[k - 1]
        scores = previous["scores"]
        plan = plan_increment(scores, cfg.strategy, cfg.sampler)
        generated, curated = self.generate_and_curate(k, folder, plan, scores, previous)
        lineage = self.lineage(k)
        for source, samples in curated.kept.items():
            table = sample_table(samples, source, lineage[source], self.digest)
            write_table(table, folder / f"increment-{source.split('_', 1)[1]}.parquet")
        replaced = set(curated.replaced) | self.replaced_before(k)
        atomic_write_text(folder / "replaced.json", json.dumps(sorted(curated.replaced)))
        manifest = folder / "manifest.parquet"
        metadata = self.mixture_metadata(lineage, replaced, round=k, strategy=cfg.strategy)
        mixture = write_mixture(self.mixture_parts(k), replaced, manifest, metadata)
        job = self.round_job(k, folder, manifest)
        report = self.run_job(job)
        curation = {"kept": {s: len(v) for s, v in curated.kept.items()}, "removed": dict(curated.removed),
                    "replaced": len(curated.replaced), "refill_passes": curated.refill_passes}
        gen = {name: {"requested": b.requested, "produced": b.produced(), "rejected": b.rejected,
                      **({"oracle_agreement": b.oracle_agreement} if b.oracle_agreement else {})}
               for name, b in generated.items()}
        return self.record(k, folder, report, plan=plan, generated=gen, curation=curation, mixture=mixture)

    def lineage(self, last_round: int) -> dict[str, dict[str, Any]]:
        """Source name → lineage (round, generator) of the pool and of every increment of rounds 1..last_round."""
        lineage: dict[str, dict[str, Any]] = {POOL_SOURCE: {"round": 0, "generator": "world"}}
        for j in range(1, last_round + 1):
            for name in self.cfg.generators:
                lineage[f"r{j}_{name}"] = {"round": j, "generator": name, "strategy": self.cfg.strategy}
        return lineage

    def mixture_parts(self, last_round: int) -> list[tuple[Path, float]]:
        """(table, repetition factor) of the pool and of every kept increment of rounds 1..last_round."""
        rt = self.cfg.rounds_train
        parts = [(self.out / "pool.parquet", rt.pool_weight)]
        for j in range(1, last_round + 1):
            for name in self.cfg.generators:
                part = self.out / f"round-{j}" / f"increment-{name}.parquet"
                if part.is_file():
                    parts.append((part, rt.increment_weight))
        return parts

    def replaced_before(self, k: int) -> set[str]:
        """Ids of the pool samples that recaptions of rounds 1..k-1 replaced."""
        return set().union(*(self._replaced(j) for j in range(1, k)))

    def mixture_metadata(self, lineage: dict[str, dict[str, Any]], replaced: set[str], **extra: Any) -> dict[str, Any]:
        """A mixture manifest's metadata: its world, its sources' lineage (with their scene files) and ``extra``."""
        return {
            "config_hash": self.digest, "mixture_seed": self.cfg.seed, "world": asdict(self.cfg.job.data.world),
            "sources": {name: {**info, **self._scenes_lineage(info["round"])} for name, info in lineage.items()},
            "lineage": lineage, "replaced": sorted(replaced), **extra,
        }

    def round_job(self, k: int, folder: Path, manifest: Path) -> JobConfig:
        """Round k's training job: the round's mixture, continuing from round k-1's weights by default."""
        rt = self.cfg.rounds_train
        job = self._manifest_job(folder, manifest, k)
        if not rt.continue_from_previous:
            return job
        job.train.min_lr_ratio = rt.min_lr_ratio
        return _continued(job, self.out / f"round-{k - 1}" / "train", rt.max_steps, rt.lr, rt.warmup_steps)

    def _manifest_job(self, folder: Path, manifest: Path, k: int) -> JobConfig:
        """The loop's job in ``folder/train`` on ``manifest``; it continues its own run if one was killed there."""
        job = self._job(folder)
        job.data.source, job.data.path = "manifest", str(manifest)
        job.mixture.weights, job.mixture.seed = {}, self.cfg.seed + k
        if latest_checkpoint(folder / "train" / "checkpoints") is not None:
            job.train.resume = str(folder / "train")  # killed during this training: continue it
        return job

    def specialist(self, k: int, folder: Path, plan: dict[str, int], previous_run: Path) -> Generated:
        """Round k's specialist-augment increment: each specialist skill the plan asks for is trained, then labels."""
        scfg = self.cfg.specialist

        def answer_for(skill: str) -> Callable[[list[Sample]], list[str]]:
            return _model_answerer(self.train_specialist(k, folder / f"specialist-{skill}", skill, previous_run), scfg)

        augment = SpecialistAugment(scfg, self.cfg.job.data.world, answer_for)
        return augment.generate(self.pool, self.scene_of, augment.requests(plan), teacher_seed(self.cfg.seed, k),
                                f"r{k}_specialist", k)

    def train_specialist(self, k: int, folder: Path, skill: str, previous_run: Path) -> Path:
        """Fine-tune round k-1's model on ``skill``'s samples of the pool and of rounds 1..k-1; its run directory.

        The mixture takes every such sample once (whatever the rounds' repetition factors); no evaluation runs.
        """
        scfg = self.cfg.specialist
        manifest = folder / "manifest.parquet"
        replaced = self.replaced_before(k)
        metadata = self.mixture_metadata(self.lineage(k - 1), replaced, round=k, specialist=skill)
        mixture = write_mixture([(part, 1.0) for part, _ in self.mixture_parts(k - 1)], replaced, manifest, metadata,
                                skills={skill})
        log.info("round %d: training the %s specialist on %d samples for %d steps", k, skill,
                 mixture["total_samples"], scfg.steps)
        job = self._manifest_job(folder, manifest, k)
        job.eval.enabled = False
        self.run_job(_continued(job, previous_run, scfg.steps, scfg.lr, scfg.warmup_steps))
        return folder / "train"

    def generate_and_curate(self, k: int, folder: Path, plan: dict[str, int], scores: dict[str, float],
                            previous: dict[str, Any]) -> tuple[dict[str, Generated], Curated]:
        """Generate round k's increment and curate it against the pool and earlier rounds.

        Exact dedup, then near dedup (:mod:`vlm_core.loop.curate_stages`); what they remove from the teachers'
        share is generated again (``curation.refill`` passes, fresh seeds), so every strategy adds its planned
        budget; balance runs last, on the whole increment.
        """
        cfg, ccfg = self.cfg, self.cfg.curation
        # The specialists take their share of the plan first; the teacher and the HTTP teacher share the rest.
        # Self-augment has its own budget (it adds no new images).
        external = [g for g in cfg.generators if g in ("teacher", "http")]
        generated: dict[str, Generated] = {}
        remaining = dict(plan)
        if "specialist" in cfg.generators and cfg.strategy != "none":
            generated["specialist"] = self.specialist(k, folder, plan, Path(previous["run_dir"]))
            labelled = generated["specialist"].produced()
            remaining = {skill: max(n - labelled.get(skill, 0), 0) for skill, n in plan.items()}
            if not external and any(remaining.values()):
                log.warning("round %d: no teacher among the generators to fill the %d planned samples the specialists "
                            "did not label (%s)", k, sum(remaining.values()), {s: n for s, n in remaining.items() if n})
        shares = dict(zip(external, _divide_plan(remaining, len(external))))
        generated.update(self.generate_external(k, folder, shares, scores, attempt=0))
        if "self_augment" in cfg.generators and cfg.strategy != "none":
            answer = _model_answerer(Path(previous["run_dir"]), cfg.self_augment)
            # Round k's window of the pool's caption images is chosen by caption_window (the next ones each round).
            generated["self_augment"] = SelfAugment(cfg.self_augment, answer).generate(
                self.pool, self.scene_of, f"r{k}_self_augment", k)
        seen = self.seen(k)
        reference = self.near_reference(k) if ccfg.near.enabled else None
        before = len(reference) if reference is not None else 0
        # Indexed once per round; every pass tests against it and adds what it keeps.
        index = lsh_index(reference.signatures, ccfg.near) if reference is not None else None
        curated = Curated()
        batches = dict(generated)
        drawn: dict[str, Scene] = {}  # the scene graphs of this round's new images, by path

        def key_of(sample: Sample) -> str:  # new images are keyed by their scene graph, as earlier rounds' are
            scene = self.scene_of(sample) or (drawn.get(str(sample.image_paths[0])) if sample.image_paths else None)
            return sample_key(sample, scene)

        for attempt in range(ccfg.refill + 1):
            if attempt:
                deficits = {name: _deficit(shares[name], curated.kept.get(f"r{k}_{name}", [])) for name in external}
                if not any(deficits.values()):
                    break
                batches = self.generate_external(k, folder, deficits, scores, attempt)
                for name, batch in batches.items():
                    generated[name] = merge_generated(generated[name], batch)
                curated.refill_passes = attempt
            drawn.update((path, scene) for batch in batches.values() for path, scene in batch.scenes.items())
            passed = curate_increment([(f"r{k}_{name}", batch) for name, batch in batches.items()], seen, key_of)
            if reference is not None:
                reference = self._near(passed, reference, index, external, k)
            curated.merge(passed)
        if ccfg.balance.enabled:
            _balance(curated, ccfg.balance, [ccfg.balance.seed, cfg.seed, k])
        if reference is not None:
            kept = {s.id for name in external for s in curated.kept.get(f"r{k}_{name}", [])}
            rows = np.array([i for i in range(before, len(reference)) if reference.ids[i] in kept], dtype=np.int64)
            reference.take(rows).save(folder / ROUND_FEATURES)
        self.write_scenes(folder, generated)
        return generated, curated

    def _near(self, curated: Curated, reference: NearFeatures, index: MinHashLSH, external: list[str],
              k: int) -> NearFeatures:
        """Near-dedup ``curated``'s new-image samples (in place); returns the reference grown by this pass.

        The removed samples stay in the returned arrays, so that row numbers match the keys of ``index``, which
        holds only the kept ones (a removed row is never a candidate again).
        """
        sources = [f"r{k}_{name}" for name in external if f"r{k}_{name}" in curated.kept]
        samples = [s for source in sources for s in curated.kept[source]]
        features = near_features(samples, self.cfg.curation.near, desc=f"round {k}: near features")
        keep, removed = near_filter(features, reference, self.cfg.curation.near, index)
        curated.removed.update(removed)
        _keep_only(curated, sources, keep)
        return NearFeatures.concat([reference, features])

    def near_reference(self, k: int) -> NearFeatures:
        """Near-dedup features of the pool (cached beside the world) and of every earlier round's kept new images."""
        near = self.cfg.curation.near
        parts = [cached_near_features(self.pool, near, self.world.dir, "pool")]
        for j in range(1, k):
            path = self.out / f"round-{j}" / ROUND_FEATURES
            if not path.is_file():  # a round written before near dedup existed: hash its increments now
                samples = [s for name, s in self.increment_samples(j) if name in ("teacher", "http")]
                near_features(samples, near, desc=f"round {j}: near features").save(path)
            parts.append(NearFeatures.load(path))
        return NearFeatures.concat(parts)

    def generate_external(self, k: int, folder: Path, plans: dict[str, dict[str, int]], scores: dict[str, float],
                          attempt: int) -> dict[str, Generated]:
        """The teachers' samples for ``plans`` (generator → skill → count); refill passes get fresh seeds and ids."""
        cfg = self.cfg
        avoid = frozenset(scene.key() for path, scene in self.scenes.items() if path.startswith(str(self.eval_root)))
        seed, suffix = teacher_seed(cfg.seed, k) + REFILL_SEED_STRIDE * attempt, f"f{attempt}" if attempt else ""
        out: dict[str, Generated] = {}
        for name, part in plans.items():
            if name == "teacher":
                teacher = WorldTeacher(cfg.job.data.world, cfg.teacher, folder / "images", avoid)
                out[name] = teacher.generate(part, seed, f"r{k}{suffix}", f"r{k}_teacher", scores)
            else:
                http_world = WorldTeacher(cfg.job.data.world, cfg.teacher, folder / "images-http", avoid)
                out[name] = HttpTeacher(cfg.http, http_world).generate(part, seed + 500, f"r{k}h{suffix}", f"r{k}_http",
                                                                       scores)
        return out

    def write_scenes(self, folder: Path, generated: dict[str, Generated]) -> None:
        scene_rows = [
            {"image": str(Path(path).relative_to(folder)), "scene": scene.to_json()}
            for batch in generated.values() for path, scene in batch.scenes.items() if Path(path).is_relative_to(folder)
        ]
        atomic_write_text(folder / "scenes.jsonl", "".join(json.dumps(row) + "\n" for row in scene_rows))

    def increment_samples(self, j: int) -> list[tuple[str, Sample]]:
        """(generator, sample) of every increment round j kept."""
        from vlm_core.data.manifest import read_manifest

        out = []
        for name in self.cfg.generators:
            part = self.out / f"round-{j}" / f"increment-{name}.parquet"
            if part.is_file():
                out += [(name, s) for rows in read_manifest(part, check_images=False).samples.values() for s in rows]
        return out

    def seen(self, k: int) -> set[str]:
        """Keys of the pool and of every increment before round k (what the new data is deduplicated against)."""
        seen = {self.key_of(sample) for sample in self.pool}
        for j in range(1, k):
            seen.update(sample_key(s, self._increment_scene(j, s)) for _, s in self.increment_samples(j))
        return seen

    def _increment_scene(self, j: int, sample: Sample) -> Scene | None:
        scene = self.scene_of(sample)
        if scene is not None:
            return scene
        cache = self._round_scenes
        if j not in cache:
            folder = self.out / f"round-{j}"
            rows = (folder / "scenes.jsonl").read_text().splitlines() if (folder / "scenes.jsonl").is_file() else []
            cache[j] = {str(folder / r["image"]): Scene.from_json(r["scene"]) for r in map(json.loads, rows)}
        return cache[j].get(str(sample.image_paths[0])) if sample.image_paths else None

    def _replaced(self, j: int) -> set[str]:
        path = self.out / f"round-{j}" / "replaced.json"
        return set(json.loads(path.read_text())) if path.is_file() else set()

    def _scenes_lineage(self, round_index: int) -> dict[str, str]:
        folder = self.out / f"round-{round_index}"
        if round_index == 0 or not (folder / "scenes.jsonl").is_file():
            return {}
        return {"scenes": str(folder / "scenes.jsonl"), "image_root": str(folder)}

    def record(self, k: int, folder: Path, report: EvalReport | None, plan: dict[str, int], generated: dict,
               curation: dict, mixture: dict | None) -> dict[str, Any]:
        """The round's entry of rounds.json."""
        run_dir = folder / "train"
        if report is None:
            raise RuntimeError(f"round {k}: training in {run_dir} produced no evaluation; the loop needs eval enabled")
        analysis = analyse(report.predictions, report.chance, self.eval_scene)
        return {
            "round": k, "strategy": self.cfg.strategy, "seed": self.cfg.seed, "run_dir": str(run_dir),
            "skills": report.skills, "overall": report.overall, "chance": report.chance,
            "scores": analysis.scores(self.cfg.sampler.score_vs_chance),
            "caption_hallucination_rate": analysis.caption_hallucination_rate,
            "analysis": analysis.to_json(), "plan": plan, "generated": generated, "curation": curation,
            "mixture": mixture,
        }


def warm_start(previous_run: Path, run_dir: Path) -> Path:
    """A checkpoint in ``run_dir`` holding the previous round's weights, with stages 0 and 1 marked complete.

    ``train.resume`` pointed at it loads the weights and skips the tower and alignment stages, and stage 2
    (instruction tuning) starts at its step 0 with a fresh optimizer and schedule on the new mixture.
    """
    source = latest_checkpoint(previous_run / "checkpoints")
    if source is None:
        raise FileNotFoundError(f"{previous_run}/checkpoints holds no checkpoint to continue from")
    state = json.loads((source / "state.json").read_text())
    target = run_dir / "warm-start"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(source / "model.safetensors", target / "model.safetensors")
    warm = {key: state[key] for key in ("model_config", "tokenizer_dir", "parallel") if key in state}
    warm.update({"stage": "align", "stage_step": 0, "step": 0, "data": {}, "completed_stages": ["tower", "align"],
                 "warm_start_from": str(source)})
    atomic_write_text(target / "state.json", json.dumps(warm, indent=1))
    return target


def _continued(job: JobConfig, previous_run: Path, steps: int, lr: float, warmup_steps: int) -> JobConfig:
    """``job`` as instruction tuning for ``steps`` steps from ``previous_run``'s weights (unless it resumes its own)."""
    job.train.max_steps, job.train.lr, job.train.warmup_steps = steps, lr, warmup_steps
    job.train.curriculum_fraction = 0.0
    job.train.focus_fraction = 0.0  # the continued model has learned the focus skills in round 0
    if job.train.resume is None:
        job.train.resume = str(warm_start(previous_run, Path(job.run_dir)))
    return job


def _deficit(share: dict[str, int], kept: list[Sample]) -> dict[str, int]:
    """What curation left short of a generator's share, per skill."""
    have = Counter(sample.skill or "" for sample in kept)
    return {skill: n - have[skill] for skill, n in share.items() if n > have[skill]}


def _keep_only(curated: Curated, sources: list[str], keep: np.ndarray) -> None:
    """Filter ``curated.kept[source]`` for ``sources`` in place by ``keep``, a mask over their samples in that order."""
    offset = 0
    for source in sources:
        n = len(curated.kept[source])
        curated.kept[source] = [s for s, ok in zip(curated.kept[source], keep[offset:offset + n]) if ok]
        offset += n


def _balance(curated: Curated, cfg: RoundBalanceConfig, seed: list[int]) -> None:
    """Balance the whole increment (every source) in place."""
    sources = list(curated.kept)
    keep, removed = balance_filter([s for source in sources for s in curated.kept[source]], cfg, seed)
    curated.removed.update(removed)
    _keep_only(curated, sources, keep)


def _divide_plan(plan: dict[str, int], parts: int) -> list[dict[str, int]]:
    """Split each category's count across ``parts`` generators (earlier ones get the remainder)."""
    if parts == 0:
        return []
    return [{skill: n // parts + (1 if i < n % parts else 0) for skill, n in plan.items()} for i in range(parts)]


def _model_answerer(run_dir: Path, cfg: SelfAugmentConfig | SpecialistConfig) -> Callable[[list[Sample]], list[str]]:
    """Greedy answers of the model in ``run_dir`` (loaded once, on the CPU)."""
    from vlm_core.eval.evaluate import answer_questions
    from vlm_core.hf.checkpoint import load_trained

    trained = load_trained(run_dir)

    def answer(samples: list[Sample]) -> list[str]:
        return answer_questions(trained.model, samples, trained.encoder, trained.processor, cfg.max_new_tokens,
                                cfg.batch_size)

    return answer


def run_loop(cfg: MetabolizeConfig, run_job: RunJob | None = None) -> list[dict[str, Any]]:
    """Run (or resume) every round of ``cfg``; returns the rounds' records (also in ``rounds.json``)."""
    return Loop(cfg, run_job).run()
