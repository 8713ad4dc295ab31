"""Tensor and data parallelism against one process, measured in one torchrun launch of 2 CPU processes (gloo).

    torchrun --nproc_per_node 2 tests/vlm_core/parallel/tp_worker.py OUT_DIR

tests/vlm_core/parallel/test_tensor_parallel.py runs it once and checks the numbers rank 0 writes to
OUT_DIR/results.json (launching megatron-core twice costs ~10 s of imports on 2 cores; one launch does all):

- TP=2 vs TP=1: 20 optimizer steps through the real training loop (``run_stage``: clipping, AdamW, LR
  schedule), losses and final weights; and the gradients of one step, each against a float64 baseline;
- DP=2 (TP=1) vs DP=1 with the doubled batch: 20 steps, losses and final weights;
- checkpoints: TP=2 -> TP=1 logits and TP=1 -> TP=2 logits after reloading; resuming TP=2 from its step-10
  checkpoint under TP=2 (bit-exact) and under TP=1;
- the per-rank RNG streams.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vlm_core.data.packing import PackedLoader, SampleStream
from vlm_core.model.config import ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM
from vlm_core.parallel.checkpoint import Sharding
from vlm_core.parallel.collectives import gather_objects
from vlm_core.parallel.config import ParallelConfig
from vlm_core.parallel.data import DataParallelStream
from vlm_core.parallel.env import ParallelEnv, init_parallel, shutdown_parallel
from vlm_core.parallel.plan import gather_model_state, parallelize
from vlm_core.parallel.reshard import merge_states
from vlm_core.parallel.seed import rng_tracker, seed_ranks
from vlm_core.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from vlm_core.train.lm import lm_loss, summarize_lm
from vlm_core.train.loop import LoopContext, StageSpec, run_stage
from vlm_core.train.optim import build_optimizer
from vlm_core.types import TokenizedSample

VOCAB = 101  # odd: the vocab-parallel table of rank 1 ends in a padding row
IMAGE_TOKEN = 100
STEPS = 20
BATCH = 8  # samples per step (DP=2: 4 per rank)
SEED = 1234
PARTS = ["vision", "projector", "decoder"]
LOSS = functools.partial(lm_loss, per_sample=True)


def model_config() -> ModelConfig:
    # Hq=4, Hkv=2 (GQA): each TP rank gets 2 query heads and 1 KV head; vision 2 heads, one per rank.
    # The projector's LayerNorm is replicated in front of the column-parallel fc1: its gradient reaches
    # every rank only through fc1's input-gradient all-reduce.
    vision = VisionConfig(image_size=32, patch_size=16, dim=32, layers=2, heads=2)
    return ModelConfig(
        vision=vision, dim=64, layers=2, heads=4, kv_heads=2, attn_impl="reference", projector_layer_norm=True
    )


def build_model(dtype: torch.dtype = torch.float32) -> VLM:
    torch.manual_seed(SEED)
    return VLM(model_config(), vocab_size=VOCAB, image_token_id=IMAGE_TOKEN).to(dtype)


def make_samples(count: int = 64) -> list[TokenizedSample]:
    """Samples of one 32 px image (P=4 tokens) and 6-40 text tokens, the answer half supervised."""
    rng = np.random.default_rng(7)
    samples = []
    for index in range(count):
        prompt, answer = int(rng.integers(3, 20)), int(rng.integers(3, 20))
        ids = np.concatenate([[1], [IMAGE_TOKEN] * 4, rng.integers(2, IMAGE_TOKEN, prompt + answer)])
        mask = np.zeros(len(ids), dtype=bool)
        mask[-answer:] = True
        groups = np.zeros(len(ids), dtype=np.int32)
        groups[1:5] = 1
        image = torch.from_numpy(rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
        samples.append(TokenizedSample(torch.from_numpy(ids).long(), torch.from_numpy(mask),
                                       torch.from_numpy(groups), image, f"s{index}"))
    return samples


class Steps:
    """One packed micro-batch per optimizer step from a resumable stream (PackedSteps without a dataset)."""

    def __init__(self, samples: list[TokenizedSample], dp: tuple[int, int] = (0, 1)) -> None:
        stream = SampleStream(len(samples), BATCH, seed=SEED)
        if dp[1] > 1:
            stream = DataParallelStream(stream, *dp)
        self.loader = PackedLoader(samples, stream, row_len=96, pad_id=0)
        self._iter = iter(self.loader)

    def next_step(self):
        return [next(self._iter)]

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)
        self._iter = iter(self.loader)


class Records:
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def log(self, step, stage, metrics):
        self.losses[step] = metrics["loss"]

    def log_scalars(self, *args): ...

    def close(self): ...


def train(model, source, env, run_dir: Path, sharding=None, start=0, optimizer=None, ckpt_every=0) -> dict:
    optimizer = optimizer or build_optimizer(model, PARTS, 2e-3, 0.0, (0.9, 0.98))
    records = Records()
    context = LoopContext(
        run_dir=run_dir, logger=records, device=torch.device("cpu"), bf16=False, log_every=1,
        ckpt_every=ckpt_every, keep_checkpoints=3, checkpoint_state=dict, show_progress=False,
        parallel=env, sharding=sharding,
    )
    spec = StageSpec("instruct", STEPS, 0, 2e-3, 2, 0.3, grad_clip=1.0)
    run_stage(spec, model, optimizer, source, LOSS, summarize_lm, context, start_step=start)
    return records.losses


def max_diff(a: dict, b: dict) -> dict:
    """Max |a - b| over shared keys, and max |b| (the scale)."""
    return {"max_abs": max(abs(a[k] - b[k]) for k in b), "scale": max(abs(v) for v in b.values())}


def tensor_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    diffs = {name: float((a[name].double() - b[name].double()).abs().max()) for name in b}
    worst = max(diffs, key=diffs.get)
    return {"max_abs": diffs[worst], "worst": worst, "scale": max(float(t.abs().max()) for t in b.values()),
            "nan": sum(int(torch.isnan(t).sum()) for t in a.values())}


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def one_backward(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for param in model.parameters():
        param.requires_grad_(True)
    out = LOSS(model, batch)
    out.loss_sum.backward()
    return grads(model)


def full_logits(model, batch, env: ParallelEnv | None) -> torch.Tensor:
    """[total, V] logits; a TP model's vocabulary slices are gathered (for the test only)."""
    with torch.no_grad():
        logits = model.decoder.logits(model.hidden_states(batch))
    if env is None or not env.tensor_parallel:
        return logits
    parts = gather_objects(logits, env, env.tp_group())
    return torch.cat(parts, dim=-1)[:, :VOCAB]


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    env = init_parallel(ParallelConfig(tensor_parallel=2), torch.device("cpu"))
    results: dict = {"world": env.world_size}
    samples = make_samples()
    union_batch = next(PackedLoader(samples, SampleStream(len(samples), BATCH, seed=SEED), 96, pad_id=0))

    # --- seeding: the default stream is shared, the tensor-parallel stream per TP rank ----------------------
    seed_ranks(SEED, env)
    shared = torch.rand(4)
    state = torch.get_rng_state()
    with rng_tracker().fork():
        per_rank = torch.rand(4)
    after_fork = torch.rand(4)
    torch.set_rng_state(state)
    results["seed"] = {
        "shared_equal": bool(all(torch.equal(t, shared) for t in gather_objects(shared, env))),
        "tp_stream_differs": not torch.equal(*gather_objects(per_rank, env)),
        "fork_leaves_global": torch.equal(after_fork, torch.rand(4)),
    }

    # --- gradients of one step: TP=2 and TP=1 (fp32) against TP=1 in float64 ------------------------------
    ref64 = one_backward(build_model(torch.float64), union_batch)
    ref32 = one_backward(build_model(), union_batch)
    tp_model = build_model()
    layout = parallelize(tp_model, env)
    tp_grads = merge_states(gather_objects(one_backward(tp_model, union_batch), env, env.tp_group()), layout, VOCAB)
    results["grads"] = {"tp2_vs_fp64": tensor_diff(tp_grads, ref64), "tp1_vs_fp64": tensor_diff(ref32, ref64),
                        "tp2_vs_tp1": tensor_diff(tp_grads, ref32)}

    # --- 20 training steps: TP=1 in float64 and float32 (every rank on its own), TP=2 (checkpoints at 10, 20) --
    ref64 = build_model(torch.float64)
    ref64_losses = train(ref64, Steps(samples), None, out_dir)
    ref64_state = {k: v.detach().clone() for k, v in ref64.state_dict().items()}
    ref = build_model()
    ref_losses = train(ref, Steps(samples), None, out_dir)
    ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    tp_model = build_model()
    layout = parallelize(tp_model, env)
    tp_dir = out_dir / "tp2"
    sharding = Sharding(env, layout, vocab_size=VOCAB)
    tp_losses = train(tp_model, Steps(samples), env, tp_dir, sharding=sharding, ckpt_every=10)
    tp_state = gather_model_state(tp_model, layout, env)
    results["train"] = {
        "ref_losses": [ref_losses[s] for s in sorted(ref_losses)],
        "tp2_losses": [tp_losses[s] for s in sorted(tp_losses)],
        "tp2_vs_tp1_loss": max_diff(tp_losses, ref_losses),
        "tp2_vs_fp64_loss": max_diff(tp_losses, ref64_losses),
        "tp1_vs_fp64_loss": max_diff(ref_losses, ref64_losses),
        "tp2_vs_tp1_weights": tensor_diff(tp_state, ref_state),
        "tp2_vs_fp64_weights": tensor_diff(tp_state, ref64_state),
        "tp1_vs_fp64_weights": tensor_diff(ref_state, ref64_state),
    }

    # --- checkpoints: TP=2 -> TP=1 and TP=1 -> TP=2 ---------------------------------------------------------
    checkpoint = latest_checkpoint(tp_dir / "checkpoints")
    files = sorted(p.name for p in checkpoint.iterdir())
    reloaded = build_model()
    torch.manual_seed(99)
    for param in reloaded.parameters():  # start far from the checkpoint, so a missed tensor shows
        torch.nn.init.normal_(param)
    load_checkpoint(checkpoint, reloaded, restore_rng=False)
    merged = VLM(model_config(), VOCAB, IMAGE_TOKEN)
    merged.load_state_dict(tp_state)
    results["reshard_2_to_1"] = {
        "files": files,
        "weights_vs_in_memory_merge": tensor_diff(reloaded.state_dict(), tp_state),
        "logits_vs_in_memory_merge": float((full_logits(reloaded, union_batch, None)
                                            - full_logits(merged, union_batch, None)).abs().max()),
        "logits_vs_tp2_forward": float((full_logits(reloaded, union_batch, None)
                                        - full_logits(tp_model, union_batch, env)).abs().max()),
        # the TP=2 forward's and the single-device forward's errors against the float64 forward
        "tp2_forward_vs_fp64": float((full_logits(tp_model, union_batch, env).double()
                                      - full_logits(merged.double(), union_batch, None)).abs().max()),
        "tp1_forward_vs_fp64": float((full_logits(reloaded, union_batch, None).double()
                                      - full_logits(merged.double(), union_batch, None)).abs().max()),
    }
    plain_dir = out_dir / "tp1"
    save_checkpoint(plain_dir / "checkpoints", "step-000020", ref, None, {"step": 20}, sharding=Sharding(env))
    sharded = build_model()
    load_checkpoint(plain_dir / "checkpoints" / "step-000020", sharded, restore_rng=False)
    sharded_layout = parallelize(sharded, env)
    results["reshard_1_to_2"] = {
        "files": sorted(p.name for p in (plain_dir / "checkpoints" / "step-000020").iterdir()),
        "weights_vs_saved": tensor_diff(gather_model_state(sharded, sharded_layout, env), ref_state),
        "logits_vs_tp1_forward": float((full_logits(sharded, union_batch, env)
                                        - full_logits(ref, union_batch, None)).abs().max()),
    }

    # --- resume the TP=2 run from its step-10 checkpoint: under TP=2 (exact) and under TP=1 --------------
    step10 = tp_dir / "checkpoints" / "step-000010"
    state10 = json.loads((step10 / "state.json").read_text())
    resumed = build_model()
    load_checkpoint(step10, resumed, restore_rng=False)
    layout = parallelize(resumed, env)
    optimizer = build_optimizer(resumed, PARTS, 2e-3, 0.0, (0.9, 0.98))
    load_optimizer_state(step10, optimizer, resumed, Sharding(env, layout, vocab_size=VOCAB))
    source = Steps(samples)
    source.load_state_dict(state10["data"])
    resumed_tp2 = train(resumed, source, env, out_dir / "resume_tp2", start=10, optimizer=optimizer)
    resumed = build_model()
    load_checkpoint(step10, resumed, restore_rng=False)
    optimizer = build_optimizer(resumed, PARTS, 2e-3, 0.0, (0.9, 0.98))
    load_optimizer_state(step10, optimizer, resumed, Sharding(ParallelEnv()))
    source = Steps(samples)
    source.load_state_dict(state10["data"])
    resumed_tp1 = train(resumed, source, None, out_dir / "resume_tp1", start=10, optimizer=optimizer)
    results["resume"] = {
        "tp2_from_tp2": [[resumed_tp2[s], tp_losses[s]] for s in sorted(resumed_tp2)],
        "tp1_from_tp2_vs_tp2": max_diff(resumed_tp1, {s: tp_losses[s] for s in resumed_tp1}),
    }

    # --- DP=2 with TP=1 against DP=1 with the doubled batch (the TP=1 reference above) -----------------------
    from vlm_core.parallel.env import _megatron_parallel_state

    parallel_state = _megatron_parallel_state()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    dp_env = ParallelEnv(rank=env.rank, world_size=2, tp_rank=0, tp_size=1, dp_rank=env.rank, dp_size=2)
    dp_model = build_model()
    dp_losses = train(dp_model, Steps(samples, dp=(dp_env.dp_rank, 2)), dp_env, out_dir)
    dp_state = {k: v.detach().clone() for k, v in dp_model.state_dict().items()}
    replicas = gather_objects(dp_state, dp_env)
    results["dp"] = {
        "dp2_losses": [dp_losses[s] for s in sorted(dp_losses)],
        "dp2_vs_dp1_loss": max_diff(dp_losses, ref_losses),
        "dp2_vs_fp64_loss": max_diff(dp_losses, ref64_losses),
        "dp2_vs_dp1_weights": tensor_diff(dp_state, ref_state),
        "dp2_vs_fp64_weights": tensor_diff(dp_state, ref64_state),
        "replicas_identical": all(torch.equal(replicas[0][k], replicas[1][k]) for k in dp_state),
    }

    if env.is_main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    shutdown_parallel(env)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
