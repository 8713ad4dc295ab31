"""Read a trained checkpoint of this project back into a VLM, its config and its tokenizer.

The one reader that export (``vlm_core.hf.export``) and standalone evaluation (``python -m vlm_core.eval``)
share. Tensors come only through :func:`read_model_tensors`: a checkpoint written under tensor
parallelism will be merged into the single-device layout there, so everything downstream sees the
same state dict whether or not the run was sharded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vlm_core.data.image import ImageProcessor
from vlm_core.data.tokenizer import IMAGE_TOKEN, ChatEncoder, load_tokenizer
from vlm_core.model.config import HFSourceConfig, ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM
from vlm_core.train.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
)


@dataclass
class TrainedModel:
    """A checkpoint loaded for inference: the model (eval mode), its config and tokenizer, and where they came from.

    ``encoder`` and ``processor`` turn conversations and images into the model's inputs, as in training.
    """

    model: VLM
    config: ModelConfig
    tokenizer: Any  # PreTrainedTokenizerFast with <image>
    checkpoint: Path
    state: dict[str, Any]
    encoder: ChatEncoder
    processor: ImageProcessor


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints/`` folder, or a run directory."""
    path = Path(path).expanduser()
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE_FILE).is_file():
            return candidate
        found = latest_checkpoint(candidate) if candidate.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a folder with {STATE_FILE} and {MODEL_FILE}, a checkpoints/ folder "
        "with latest.json, or a run directory holding one"
    )


def read_model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors in the single-device VLM layout (names of ``VLM.state_dict()``).

    A checkpoint written under tensor parallelism (``model-tpXX-of-YY.safetensors``) is merged into that
    layout (vlm_core.parallel.checkpoint), so export and eval need no change.
    """
    from vlm_core.parallel.checkpoint import ShardError, is_sharded
    from vlm_core.parallel.checkpoint import read_model_tensors as read_merged

    if is_sharded(checkpoint):
        try:
            return read_merged(checkpoint)
        except ShardError as exc:
            raise CheckpointError(str(exc)) from exc
    if not (checkpoint / MODEL_FILE).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no {MODEL_FILE}")
    return load_file(str(checkpoint / MODEL_FILE))


def model_config_from_state(state: dict[str, Any], checkpoint: Path) -> ModelConfig:
    """The ModelConfig a run recorded in its checkpoints (``state["model_config"]``, written by the job)."""
    recorded = state.get("model_config")
    if not isinstance(recorded, dict):
        raise CheckpointError(
            f"checkpoint {checkpoint}/{STATE_FILE} records no model_config; it was not written by vlm_core.train.job"
        )
    fields = dict(recorded)
    try:
        vision = VisionConfig(**fields.pop("vision", {}))
        hf = fields.pop("hf", None)
        return ModelConfig(vision=vision, hf=HFSourceConfig(**hf) if hf else None, **fields)
    except TypeError as exc:  # a field this version does not know
        raise CheckpointError(
            f"checkpoint {checkpoint}: its model_config does not fit this version's ModelConfig: {exc}"
        ) from exc


def load_trained(
    checkpoint: Path | str, tokenizer_dir: Path | str | None = None, device: torch.device | str = "cpu"
) -> TrainedModel:
    """Load the checkpoint's weights into a VLM built from its recorded config.

    ``tokenizer_dir`` defaults to the folder the run recorded (``state["tokenizer_dir"]``); pass it when
    the checkpoint moved to another machine. The vocabulary size is the checkpoint's embedding rows.
    """
    path = resolve_checkpoint(checkpoint)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    config = model_config_from_state(state, path)
    folder = tokenizer_dir if tokenizer_dir is not None else state.get("tokenizer_dir")
    if folder is None or not Path(folder).expanduser().is_dir():
        raise CheckpointError(
            f"checkpoint {path}: tokenizer folder {folder!r} (recorded by the run) does not exist here; pass the "
            "tokenizer folder explicitly (--tokenizer DIR)"
        )
    tokenizer = load_tokenizer(Path(folder).expanduser())
    tensors = read_model_tensors(path)
    embed = tensors.get("decoder.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(
            f"checkpoint {path}/{MODEL_FILE} has no decoder.embed_tokens.weight; is it a VLM checkpoint?"
        )
    if len(tokenizer) > embed.shape[0]:
        raise CheckpointError(
            f"tokenizer {folder} has {len(tokenizer)} tokens but checkpoint {path} embeds {embed.shape[0]}; "
            "it is not the tokenizer the model was trained with"
        )
    model = VLM(config, vocab_size=embed.shape[0], image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}/{MODEL_FILE} does not fit its recorded model_config: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    model.to(device).eval()
    vision = config.vision
    return TrainedModel(
        model=model, config=config, tokenizer=tokenizer, checkpoint=path, state=state,
        encoder=ChatEncoder(tokenizer, vision.num_patches),
        processor=ImageProcessor(vision.image_size, vision.image_mean, vision.image_std),
    )
