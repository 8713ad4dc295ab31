"""Benchmark of one training step: the project's packed step against Hugging Face's LLaVA, and MFU on a GPU.

Setup (one function, shared by every provider and mode): the built-in world's training samples (the default
``data`` config: generated into ``data.cache_dir`` on first use, then cached), tokenized with the project's
chat template, drawn in a seeded order; ``--steps`` batches of ``--batch-size`` samples, the same batches
for every provider. One model is built (``--model``, with ``model.image_attention=causal`` so that the two
providers compute the same function) and HF gets its weights.

Providers:
    ours  the project's stage-2 step (vlm_core.train): samples packed into rows of ``--row-len`` slots
          (first-fit-decreasing, cu_seqlens, no attention across samples), the LM head only on the rows that
          carry a label, the fused kernels where the device has them (``model.kernel_impl=auto``: Triton on
          CUDA, the reference on the CPU), AdamW
    hf    transformers' ``LlavaForConditionalGeneration`` of the same dimensions and weights
          (vlm_core.hf.export.llava_config / vlm_core.hf.mapping), each batch padded the usual way (right
          padding to the longest sample of the batch, ``attention_mask``, labels -100 on prompts and
          padding), SDPA attention, full logits, AdamW

Both train what stage 2 trains (projector and decoder; the tower is frozen) under the same precision
(``--precision auto``: bf16 autocast on CUDA and on CPUs with native bf16, as ``train.precision=auto``).
Before timing, one fp32 batch checks that the two compute the same loss ("loss |ours - hf|").

Modes: ``forward`` (no autograd graph) and ``full`` (forward, backward and the optimizer step). Times are
medians over the timed steps (after ``--warmup`` steps), with CUDA synchronised. ``tokens/s`` counts real
tokens (padding excluded); "x vs hf" is ours' tokens/s over hf's from the same run.

Ours packs each batch as ``train.py`` does on the device (``--pad-rows auto``): rows padded to ``--row-len`` on
the CPU, the samples back to back without padding on a GPU (``data.pad_rows``); "slots/step" counts what it
computed on. hf pads every sample to the batch's longest.

``--batch-size`` takes several values (``--batch-size 64 128 256``): each is timed in turn, on the first
``batch * steps`` samples of the same seeded order, and gets its own rows. A fixed cost per step (the host's
Python and kernel launches) weighs less as the batch grows, so the MFU against the batch tells a host-bound
step from a kernel-bound one. A provider that runs out of GPU memory at a batch size gets a row that says so
(``note``) and is not run at larger ones; the others go on.

Model FLOPs of a ``full`` step (``forward`` = the same terms with factor 2 for every trained part), the
stage-2 recipe (2 FLOPs per multiply-add; backward = 2x forward):

    vision (frozen: forward only)   2 * N_vision * P_in + 4 * layers_v * D_v * P_in^2          per image
    projector                       6 * N_projector                                           per image token
    decoder matmuls                 6 * N_decoder                                             per real token
    decoder attention               3 * 4 * layers * Hq * Dh * allowed_pairs                  per sample
    LM head                         6 * D * V                                                 per supervised token

N_* are the parameters of the matrix multiplies (embedding lookups excluded), P_in the tower's tokens per
image (P, +1 with a CLS token), ``allowed_pairs`` = L (L + 1) / 2 per sample of length L (causal). The
LM head is counted on the supervised tokens only, the FLOPs the loss needs (HF spends 6 * D * V on every
token; counting only what is needed makes the MFU a lower bound). MFU = model FLOPs / step time / peak,
with the peak bf16 dense tensor throughput of the GPU (``--peak-tflops``; H100 SXM and H200: 989).

CPU:  python benchmarks/bench_train.py                      (tiny model; ours vs hf, tokens/s and the ratio)
GPU:  python benchmarks/bench_train.py --model small        (MFU at TP=1 on one device; hf as well)
      add --providers ours to skip the HF baseline.
Results go to benchmarks/results/train_<model>_<device>.{md,csv,png}; the header records the device, date,
commit, library versions and the exact command, and benchmarks/report.py judges the targets below the table.

``--profile N`` then runs N more ``full`` steps of ours under torch.profiler and writes
train_<model>_<device>_profile.md: where a step's time goes (the ops with the most self time on the device,
or on the CPU without one) and, on a GPU, how much of the step's wall time the GPU was busy at all. A GPU
idle for much of the step means the host (Python, launches, syncs) sets the pace, not the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_packed_attention import (  # one reader for all benchmarks
    device_name,
    git_commit,
)
from benchmarks.report import write_tables
from curation.sources.world.config import WorldConfig
from vlm_core.config import DataConfig
from vlm_core.data.dataset import SFTDataset
from vlm_core.data.image import ImageProcessor
from vlm_core.data.packing import pack, pad_rows_for
from vlm_core.data.prepare import prepare_data
from vlm_core.data.tokenizer import IMAGE_TOKEN, ChatEncoder, load_tokenizer
from vlm_core.hf.export import siglip_hidden_states_can_end_normed
from vlm_core.model.config import ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM
from vlm_core.train.lm import lm_loss
from vlm_core.train.loop import autocast, use_bf16
from vlm_core.train.optim import build_optimizer, implementation
from vlm_core.types import IGNORE_INDEX, TokenizedSample

PROVIDERS = ("ours", "hf")
MODES = ("forward", "full")
TRAINABLE = ["projector", "decoder"]  # stage 2
# bf16 dense tensor-core peak (TFLOP/s) by device name; --peak-tflops overrides.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def model_config(name: str) -> ModelConfig:
    """``conf/model/<name>.yaml`` (tiny, small) with causal image attention, as LLaVA computes it.

    Read with PyYAML, not OmegaConf: the files are plain YAML, and the GPU image this benchmark is meant for has
    PyYAML (transformers needs it) but not omegaconf (tests/scripts/test_gpu_session.py runs it without).
    """
    import yaml

    path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"--model {name!r}: no {path}")
    values = yaml.safe_load(path.read_text())
    vision = VisionConfig(**values.pop("vision", {}))
    return ModelConfig(vision=vision, **{**values, "image_attention": "causal"})


@dataclass
class Setup:
    cfg: ModelConfig
    tokenizer: object
    batches: list[list[TokenizedSample]]  # the same batches for every provider
    samples: list[TokenizedSample]  # the seeded draw the batches are cut from (batches_of: another batch size)
    device: torch.device
    bf16: bool
    adjusted: list[str]  # what was changed in the model config so that transformers can compute the same function
    pad_rows: bool = True  # ours: packed rows padded to row_len (train.py's data.pad_rows, resolved for the device)


def setup(model: str, batch_size: int, steps: int, device: torch.device, precision: str, data_cfg: DataConfig,
          seed: int = 0) -> Setup:
    """World samples -> tokenized batches (same for every provider); the model config."""
    cfg = model_config(model)
    adjusted = []
    if cfg.projector_hidden is None or cfg.projector_hidden != cfg.dim:
        cfg = replace(cfg, projector_hidden=cfg.dim)  # LLaVA's projector is D_v -> D -> D
    if cfg.vision.final_norm and not siglip_hidden_states_can_end_normed():
        # e.g. transformers 5.17, the GPU image's: its LLaVA would read the tower's features before the final norm
        cfg = replace(cfg, vision=replace(cfg.vision, final_norm=False))
        version = importlib.metadata.version("transformers")
        adjusted.append(f"vision.final_norm=false (transformers {version} cannot export the final norm; one LayerNorm "
                        "over the image features, on both sides)")
    with tempfile.TemporaryDirectory() as run_dir:
        data = prepare_data(data_cfg, Path(run_dir), show_progress=False)
        tokenizer = load_tokenizer(data.tokenizer_dir)
    encoder = ChatEncoder(tokenizer, cfg.vision.num_patches)
    processor = ImageProcessor(cfg.vision.image_size, cfg.vision.image_mean, cfg.vision.image_std)
    dataset = SFTDataset(data.train, encoder, processor, cache_images=False)
    if batch_size * steps > len(dataset):
        raise ValueError(f"--batch-size {batch_size} x --steps {steps} needs {batch_size * steps} samples; the world's "
                         f"training split has {len(dataset)}")
    order = np.random.default_rng(seed).permutation(len(dataset))[: batch_size * steps]
    samples = [dataset[int(index)] for index in order]
    return Setup(cfg, tokenizer, [], samples, device, use_bf16(precision, device), adjusted)


def batches_of(s: Setup, batch_size: int) -> Setup:
    """``s`` with its batches cut to ``batch_size`` samples each, as many as the draw holds whole batches of."""
    count = len(s.samples) // batch_size
    return replace(s, batches=[s.samples[i * batch_size : (i + 1) * batch_size] for i in range(count)])


# ------------------------------------------------------------------------------------------ providers


def build_models(s: Setup) -> tuple[VLM, torch.nn.Module]:
    """The native VLM and HF's LlavaForConditionalGeneration with the same weights, on the device."""
    from transformers import LlavaForConditionalGeneration

    from vlm_core.hf.export import llava_config
    from vlm_core.hf.mapping import llava_from_native

    torch.manual_seed(0)
    image_token_id = s.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ours = VLM(s.cfg, vocab_size=len(s.tokenizer), image_token_id=image_token_id)
    hf = LlavaForConditionalGeneration(llava_config(s.cfg, len(s.tokenizer), s.tokenizer))
    missing, unexpected = hf.load_state_dict(llava_from_native(ours.state_dict(), s.cfg), strict=False)
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise RuntimeError(f"HF weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    hf.config.use_cache = False
    return ours.to(s.device), hf.to(s.device)


def hf_inputs(samples: list[TokenizedSample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch [B, T_max] with attention_mask and labels (-100 on prompts and padding)."""
    longest = max(sample.input_ids.numel() for sample in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample.input_ids.numel()
        input_ids[row, :n] = sample.input_ids
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.where(sample.loss_mask, sample.input_ids, IGNORE_INDEX)
    pixel_values = torch.cat([sample.images for sample in samples])  # [N_img, C, H, W]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def freeze_hf_tower(hf: torch.nn.Module) -> list[torch.nn.Parameter]:
    hf.model.vision_tower.requires_grad_(False)
    return [p for p in hf.parameters() if p.requires_grad]


def step_fns(s: Setup, ours: VLM, hf: torch.nn.Module, mode: str, row_len: int) -> dict:
    """provider -> (prepare(batch) -> inputs, step(inputs) -> None); preparing is not timed."""
    pad_id = s.tokenizer.pad_token_id
    loss_fn = functools.partial(lm_loss, per_sample=False)  # HF's objective: the mean over supervised tokens
    ours_opt = build_optimizer(ours, TRAINABLE, 1e-4, 0.0, (0.9, 0.98))
    hf_params = freeze_hf_tower(hf)  # the same AdamW implementation as ours (fused on CUDA, torch's default elsewhere)
    hf_opt = torch.optim.AdamW(hf_params, lr=1e-4, betas=(0.9, 0.98), **implementation(hf_params))

    def ours_step(batch) -> None:
        if mode == "forward":
            with torch.no_grad(), autocast(s.device, s.bf16):
                loss_fn(ours, batch)
            return
        ours_opt.zero_grad(set_to_none=True)
        with autocast(s.device, s.bf16):
            out = loss_fn(ours, batch)
        (out.loss_sum / out.units).backward()
        ours_opt.step()

    def hf_step(batch) -> None:
        if mode == "forward":
            with torch.no_grad(), autocast(s.device, s.bf16):
                hf(**batch)
            return
        hf_opt.zero_grad(set_to_none=True)
        with autocast(s.device, s.bf16):
            loss = hf(**batch).loss
        loss.backward()
        hf_opt.step()

    return {
        "ours": (lambda samples: pack(samples, row_len, pad_id=pad_id, pad_rows=s.pad_rows).to(s.device), ours_step),
        "hf": (lambda samples: hf_inputs(samples, pad_id, s.device), hf_step),
    }


def loss_agreement(s: Setup, ours: VLM, hf: torch.nn.Module, row_len: int) -> float:
    """|ours - hf| of the fp32 mean loss of the first batch (the two must compute the same function)."""
    samples = s.batches[0]
    with torch.no_grad():
        batch = pack(samples, row_len, pad_id=s.tokenizer.pad_token_id, pad_rows=s.pad_rows)
        out = lm_loss(ours, batch.to(s.device))
        ours_loss = float(out.loss_sum) / out.units
        hf_loss = float(hf(**hf_inputs(samples, s.tokenizer.pad_token_id, s.device)).loss)
    return abs(ours_loss - hf_loss)


# ------------------------------------------------------------------------------------------ FLOPs


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters of the module's matrix multiplies (Linear weights, conv kernels; no embeddings, norms)."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            total += sub.weight.numel()
    return total


def model_flops(cfg: ModelConfig, model: VLM, samples: list[TokenizedSample], mode: str) -> float:
    """The module docstring's formula for one step over ``samples``."""
    train = 6 if mode == "full" else 2  # trained parts: forward + backward (2x); frozen tower: forward only
    v = cfg.vision
    tokens_in = v.num_patches + int(v.class_token)  # P_in
    images = sum(sample.images.shape[0] for sample in samples)
    image_tokens = images * v.num_patches
    real = sum(sample.input_ids.numel() for sample in samples)
    supervised = sum(int(sample.loss_mask[1:].sum()) for sample in samples)
    pairs = sum(n * (n + 1) // 2 for n in (sample.input_ids.numel() for sample in samples))
    decoder_matmuls = matmul_params(model.decoder.layers)
    flops = images * (2 * matmul_params(model.vision) * tokens_in + 4 * v.layers * v.dim * tokens_in**2)
    flops += train * matmul_params(model.projector) * image_tokens
    flops += train * decoder_matmuls * real
    flops += (train // 2) * 4 * cfg.layers * cfg.heads * cfg.head_dim * pairs
    flops += train * cfg.dim * model.vocab_size * supervised
    return float(flops)


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return tflops * 1e12
    return None


# ------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(s: Setup, step, inputs) -> bool:
    """One step; False where the GPU ran out of memory (its graph freed, the allocator's cache emptied)."""
    try:
        step(inputs)
        return True
    except torch.OutOfMemoryError:
        pass  # leaving the handler drops the traceback and, with it, the failed step's tensors
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return False


def time_providers(s: Setup, fns: dict, providers: list[str], warmup: int) -> dict[str, tuple[list[float], float | None]]:
    """provider -> (per-step seconds over the batches, CUDA peak MiB); ``warmup`` untimed steps first.

    The providers alternate step by step (ours on batch i, hf on batch i, ours on batch i + 1, ...), so a
    change in the machine's load during the run (a shared CPU) weighs on both and the ratio stays fair.
    A provider that runs out of GPU memory is dropped: it gets no times (an empty list).
    """
    prepared = {p: [fns[p][0](batch) for batch in s.batches] for p in providers}
    running = list(providers)
    for provider in providers:
        for index in range(warmup):
            if provider in running and not _run(s, fns[provider][1], prepared[provider][index % len(s.batches)]):
                running.remove(provider)
    sync(s.device)
    times: dict[str, list[float]] = {p: [] for p in providers}
    peaks: dict[str, float | None] = dict.fromkeys(providers)
    for index in range(len(s.batches)):
        for provider in list(running):
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            start = time.perf_counter()
            if not _run(s, fns[provider][1], prepared[provider][index]):
                running.remove(provider)
                times[provider] = []
                continue
            sync(s.device)
            times[provider].append(time.perf_counter() - start)
            if s.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(s.device) / 2**20
                peaks[provider] = max(peaks[provider] or 0.0, peak)
    for provider in providers:
        prepared[provider].clear()  # the device copies of the batches, before the next batch size
    return {p: (times[p], peaks[p]) for p in providers}


def versions() -> str:
    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    for distribution in ("transformers", "triton", "megatron-core"):
        try:
            parts.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{distribution} not installed")
    return ", ".join(parts)


COLUMNS = ["model", "batch", "mode", "provider", "precision", "real tokens/step", "slots/step", "ms/step (median)",
           "tokens/s", "x vs hf", "TFLOP/s", "MFU", "peak MiB", "note"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long CPU check (CI): a 16-records-per-skill world, batch 8, 2 steps")
    parser.add_argument("--model", choices=("tiny", "small"), default=None, help="default: small on CUDA, tiny on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="samples per step (train.batch_size; default 64, --smoke 8); several: each in turn")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (distinct batches)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (Triton compiles, caches)")
    parser.add_argument("--row-len", type=int, default=None, help="packed row length (default 512 tiny, 2048 small)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--pad-rows", choices=("auto", "true", "false"), default="auto",
                        help="ours: pad packed rows to --row-len (auto: as train.py, padded on the CPU only)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--attn-impl", default="auto", help="ours: model.attn_impl (auto = the training default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (TFLOP/s)")
    parser.add_argument("--cache-dir", default=DataConfig().cache_dir, help="where the built-in world is cached")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N full steps of ours (torch.profiler) into <stem>_profile.md")
    parser.add_argument("--profile-top", type=int, default=30, help="ops listed in the profile")
    args = parser.parse_args(argv)
    if args.profile < 0 or args.profile_top < 1:
        parser.error("--profile must be >= 0 and --profile-top >= 1")
    args.batch_size = args.batch_size or ([8] if args.smoke else [64])
    if min(args.batch_size) < 1 or len(set(args.batch_size)) < len(args.batch_size):
        parser.error(f"--batch-size: distinct values >= 1, got {args.batch_size}")
    return args


def time_rows(s: Setup, ours: VLM, hf: torch.nn.Module, model_name: str, mode: str, row_len: int,
              args: argparse.Namespace, peak: float | None, out_of_memory: dict[str, str]) -> list[dict[str, str]]:
    """The table's rows for one batch size and mode: every provider timed on ``s.batches``.

    ``out_of_memory`` maps the providers that ran out of GPU memory earlier (at a smaller batch, or in the
    forward mode of this one) to where: they get a row that says so, untimed. One that runs out here is added."""
    fns = step_fns(s, ours, hf, mode, row_len)
    batch_size = len(s.batches[0])
    runnable = [p for p in args.providers if p not in out_of_memory]
    timed = time_providers(s, fns, runnable, args.warmup)
    medians = {p: statistics.median(times) for p, (times, _) in timed.items() if times}
    for provider, model in (("ours", ours), ("hf", hf)):
        if provider in runnable and provider not in medians:
            model.zero_grad(set_to_none=True)  # what its failed step left, before the others go on
    real = statistics.mean(sum(x.input_ids.numel() for x in b) for b in s.batches)
    precision = "bf16 autocast" if s.bf16 else "fp32"
    rows = []
    for provider in args.providers:
        row = {"model": model_name, "batch": str(batch_size), "mode": mode, "provider": provider,
               "precision": precision, "real tokens/step": f"{real:.0f}"}
        if provider == "ours":
            slots = statistics.mean(pack(b, row_len, pad_rows=s.pad_rows).total for b in s.batches)
        else:
            slots = statistics.mean(len(b) * max(x.input_ids.numel() for x in b) for b in s.batches)
        row["slots/step"] = f"{slots:.0f}"
        if provider not in medians:
            if provider in out_of_memory:
                row["note"] = f"not run: out of GPU memory at {out_of_memory[provider]}"
            else:
                row["note"] = "out of GPU memory"
                out_of_memory[provider] = f"batch {batch_size}, {mode}"
            rows.append(row)
            print(row, flush=True)
            continue
        median = medians[provider]
        flops = statistics.mean(model_flops(s.cfg, ours, b, mode) for b in s.batches)
        tokens_per_s = real / median
        ratio = f"{tokens_per_s / (real / medians['hf']):.2f}" if provider == "ours" and "hf" in medians else ""
        peak_mib = timed[provider][1]
        row.update({
            "ms/step (median)": f"{median * 1e3:.1f}", "tokens/s": f"{tokens_per_s:,.0f}", "x vs hf": ratio,
            "TFLOP/s": f"{flops / median / 1e12:.3g}", "MFU": f"{flops / median / peak:.1%}" if peak else "",
            "peak MiB": f"{peak_mib:.0f}" if peak_mib is not None else "",
        })
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    data_cfg = DataConfig(cache_dir=args.cache_dir)
    if args.smoke:
        data_cfg = DataConfig(cache_dir=args.cache_dir, world=WorldConfig(train_per_skill=16, eval_per_skill=2))
        args.steps, args.warmup = 2, 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_name = args.model or ("small" if device.type == "cuda" else "tiny")
    row_len = args.row_len or (2048 if model_name == "small" else 512)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = setup(model_name, max(args.batch_size), args.steps, device, args.precision, data_cfg)
    s.pad_rows = pad_rows_for(device, {"auto": None, "true": True, "false": False}[args.pad_rows])
    s.cfg = replace(s.cfg, attn_impl=args.attn_impl)
    ours, hf = build_models(s)
    agreement = loss_agreement(batches_of(s, args.batch_size[0]), ours, hf, row_len)
    peak = peak_flops(device, args.peak_tflops)
    rows = []
    out_of_memory: dict[str, str] = {}  # provider -> where it ran out of GPU memory (not run after that)
    for batch_size in args.batch_size:
        sized = batches_of(s, batch_size)
        for mode in args.modes:
            rows += time_rows(sized, ours, hf, model_name, mode, row_len, args, peak, out_of_memory)
    header = [
        f"device: {device_name(device)}",
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"commit: {git_commit(ROOT)} (working tree may differ)",
        f"versions: {versions()}",
        f"command: python benchmarks/bench_train.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        (f"model: {model_name} ({sum(p.numel() for p in ours.parameters()):,} parameters, vocab {ours.vocab_size}), "
         f"row_len {row_len} ({'padded rows' if s.pad_rows else 'rows not padded'}), {args.steps} timed steps "
         f"after {args.warmup} warm-up steps at each batch size"),
        f"loss |ours - hf| on the first batch in fp32: {agreement:.2e} (same weights, same function)",
        *(f"model config adjusted for transformers: {change}" for change in s.adjusted),
        f"MFU peak: {peak / 1e12:.0f} TFLOP/s" if peak else "MFU: not on CPU (no meaningful peak)",
    ]
    stem = f"train_{model_name}_{device.type}"
    path, _ = write_tables("Training-step benchmark", rows, header, args.out_dir, stem, COLUMNS)
    print(path.read_text())
    if args.profile:
        sized = batches_of(s, args.batch_size[0])
        profile = profile_steps(sized, step_fns(sized, ours, hf, "full", row_len)["ours"], args.profile,
                                args.profile_top)
        profile_path = args.out_dir / f"{stem}_profile.md"
        profile_path.write_text(profile_report(profile, header, stem))
        print(profile_path.read_text())
    return path


# ------------------------------------------------------------------------------------------ profile


@dataclass
class Profile:
    steps: int
    wall_ms: float  # the profiled steps, synchronised, profiler overhead included
    device_busy_ms: float | None  # union of the GPU kernels' intervals; None without a GPU
    device_kernels: int | None  # GPU kernels (and copies) run in the profiled steps; None without a GPU
    ops: list[dict]  # the top ops: name, calls, self ms (device, or CPU without one), share of the device or CPU


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, end) intervals given in microseconds."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def profile_steps(s: Setup, fn: tuple, steps: int, top: int) -> Profile:
    """``steps`` full steps of one provider (``fn`` = (prepare, step)) under torch.profiler, on batches in turn."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prepare, step = fn
    batches = [prepare(s.batches[i % len(s.batches)]) for i in range(steps)]
    step(batches[0])  # whatever the timing left uncompiled or uncached, outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    sync(s.device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        sync(s.device)
        wall_ms = (time.perf_counter() - start) * 1e3
    on_device = s.device.type == "cuda"
    busy = launched = None
    if on_device:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = _union_ms([(e.time_range.start, e.time_range.end) for e in kernels])
        launched = len(kernels)
    averages = prof.key_averages()

    def self_us(entry) -> float:
        return entry.self_device_time_total if on_device else entry.self_cpu_time_total

    total_us = sum(self_us(e) for e in averages) or 1.0
    ranked = sorted((e for e in averages if self_us(e) > 0), key=self_us, reverse=True)[:top]
    ops = [{"op": e.key, "calls": e.count, "self ms / step": self_us(e) / 1e3 / steps,
            "share": self_us(e) / total_us} for e in ranked]
    return Profile(steps, wall_ms, busy, launched, ops)


def profile_report(p: Profile, header: list[str], stem: str) -> str:
    where = "GPU" if p.device_busy_ms is not None else "CPU"
    lines = [f"# Where a training step's time goes ({stem}_profile)", ""]
    lines += [f"- {line}" for line in header]
    lines += [f"- profiled: {p.steps} full steps of ours under torch.profiler, after the timed run and one more "
              f"untimed step; {p.wall_ms / p.steps:.1f} ms per step wall time, profiler overhead included"]
    if p.device_busy_ms is not None:
        busy = p.device_busy_ms / p.wall_ms
        lines.append(f"- GPU busy: {p.device_busy_ms / p.steps:.1f} ms per step, {busy:.0%} of the wall time "
                     f"(the union of the kernels' intervals); idle {1 - busy:.0%}: host-side time the kernels wait on")
    if p.device_kernels:
        per_step = p.device_kernels / p.steps
        busy_us = p.device_busy_ms * 1e3 / p.device_kernels
        lines.append(f"- GPU kernels: {per_step:,.0f} per step (copies and fills included), {busy_us:.1f} us of busy "
                     "time each on average; at a few us of host time per launch, a step of short kernels is paced by "
                     "its launches")
    lines += ["", f"Ops with the most self time on the {where}, per step:", "",
              f"| op | calls / step | self ms / step | share of {where} time |", "|---|---:|---:|---:|"]
    for op in p.ops:
        name = op["op"].replace("|", "\\|")
        lines.append(f"| {name} | {op['calls'] / p.steps:g} | {op['self ms / step']:.3f} | {op['share']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
