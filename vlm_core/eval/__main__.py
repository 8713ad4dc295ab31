"""Score a trained checkpoint on a standard benchmark file.

    python -m vlm_core.eval --checkpoint RUN_DIR --format pope --questions coco_pope_adversarial.json --images val2014/
    python -m vlm_core.eval --checkpoint RUN_DIR --format mme --questions MME_Benchmark_release_version/
    python -m vlm_core.eval --checkpoint RUN_DIR --format mmbench --questions MMBench_DEV_EN.tsv
    python -m vlm_core.eval --checkpoint RUN_DIR --format vqa --questions questions.jsonl --images images/ --out scores.json

CHECKPOINT is a checkpoint folder, a ``checkpoints/`` folder or a run directory (its latest checkpoint).
Every setting left out takes the default of ``vlm_core.config.EvalConfig`` (the same as ``train.py
eval=<format>``). Prints a table per subset and the format's metrics; ``--out`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from rich.console import Console

from vlm_core.config import EVAL_FORMATS, EvalConfig
from vlm_core.eval.evaluate import render_table
from vlm_core.eval.formats import run_benchmark
from vlm_core.hf.checkpoint import load_trained


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlm_core.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, checkpoints/ folder, or run directory")
    parser.add_argument("--format", required=True, choices=[f for f in EVAL_FORMATS if f != "world"])
    parser.add_argument("--questions", required=True, help="benchmark file (pope, vqa: JSONL; mmbench: TSV) or folder (mme)")
    parser.add_argument("--images", help="image folder (pope, vqa; mme: defaults to --questions; mmbench: unused)")
    parser.add_argument("--out", help="write the metrics, the per-subset report and every prediction to this JSON file")
    parser.add_argument("--tokenizer", help="tokenizer folder, when the one the run recorded is not on this machine")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    # Defaults of these come from EvalConfig; None here means "not given".
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--limit", type=int, dest="limit_per_skill", help="at most this many questions per subset")
    parser.add_argument("--prompt-suffix", help="text appended to every question ('' for none)")
    parser.add_argument("--no-circular", dest="circular", action="store_false", default=None,
                        help="mmbench: ask only the original option order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        name: getattr(args, name)
        for name in ("max_new_tokens", "batch_size", "limit_per_skill", "prompt_suffix", "circular")
        if getattr(args, name) is not None
    }
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        cfg = EvalConfig(format=args.format, questions=args.questions, images=args.images, **overrides)
        trained = load_trained(args.checkpoint, args.tokenizer, device=device)
        result = run_benchmark(trained.model, trained.encoder, trained.processor, cfg, show_progress=True)
    except ValueError as exc:  # FormatError, CheckpointError, bad settings: user-facing, with file/line/field
        print(f"error: {exc}", file=sys.stderr)
        return 2
    console = Console()
    console.print(render_table(result.report, title=f"{args.format} ({trained.checkpoint})"))
    console.print_json(json.dumps({k: v for k, v in result.metrics.items() if k != "format"}))
    if args.out:
        payload = {"checkpoint": str(trained.checkpoint), "metrics": result.metrics, "report": result.report.to_json(),
                   "predictions": result.report.predictions}
        Path(args.out).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
