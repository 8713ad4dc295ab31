"""Export a trained checkpoint as a Hugging Face ``LlavaForConditionalGeneration`` folder.

    python -m vlm_core.hf.export CHECKPOINT OUT_DIR [--tokenizer DIR] [--dtype bfloat16]

CHECKPOINT is a checkpoint folder, a ``checkpoints/`` folder or a run directory (its latest checkpoint).
OUT_DIR receives config.json, model.safetensors, generation_config.json, the tokenizer with its chat
template, and a processor (``AutoProcessor``) whose image processor reproduces
``vlm_core.data.image.ImageProcessor``. transformers loads it with no project code, and greedy
``generate`` gives the project's greedy answers (tests/vlm_core/hf/test_export.py).

How the native model maps (each part exact, see vlm_core.hf.mapping):
- vision tower: without a CLS token, ``SiglipVisionModel`` (same pre-norm blocks, biased conv patch
  embedding, P learned positions); the native final LayerNorm is SigLIP's post_layernorm, made visible
  to LLaVA's ``hidden_states[-1]`` by ``tie_last_hidden_states``. With CLS token and pre-norm (an
  imported CLIP), ``CLIPVisionModel`` with LLaVA's "default" select (CLS output dropped);
- projector: LLaVA's multi_modal_projector (linear_1, GELU, linear_2);
- decoder: ``LlamaForCausalLM`` (``Qwen2`` when only q/k/v carry biases).

Limits, each refused with the reason:
- ``model.image_attention`` must be "causal": LLaVA attends causally over image tokens, the project's
  default lets the tokens of an image attend to each other. A model trained that way would answer
  differently after export; train (or fine-tune) with ``model.image_attention=causal`` to export it.
- ``model.projector_hidden`` must equal ``model.dim`` (LLaVA's projector is D_v -> D -> D).
- The processor resizes with PIL's BOX filter, which is what ImageProcessor does whenever an image is
  at least ``image_size`` on both sides (the world's 64 px images, most photos). A smaller image is
  upscaled with BICUBIC natively and with BOX by the exported processor.
- Tensor-parallel checkpoints are merged into the single-device layout by
  vlm_core.hf.checkpoint.read_model_tensors before export.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlm_core.data.tokenizer import IMAGE_TOKEN
from vlm_core.hf.checkpoint import load_trained
from vlm_core.hf.mapping import llava_from_native
from vlm_core.model.config import ModelConfig
from vlm_core.model.vlm import VLM

log = logging.getLogger(__name__)

ACT_TO_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# RoPE without scaling has no length limit; this is the context length that serving frameworks assume.
MAX_POSITION_EMBEDDINGS = 8192
# Renders a message's content as the string the project's templates expect: a string as it is, and
# transformers' typed parts ([{"type": "image"}, {"type": "text", "text": ...}]) in order, each image as
# "<image>\n" (the LLaVA-1.5 layout, and the world's "image first" questions).
CONTENT_MACRO = (
    "{%- macro vlm_content_text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
_CONTENT_ACCESS = re.compile(r"""message\[(['"])content\1\]|message\.content\b""")


class ExportError(ValueError):
    """A model that has no exact LLaVA equivalent; the message says which setting and why."""


@functools.cache
def siglip_hidden_states_can_end_normed() -> bool:
    """Does this transformers honour ``tie_last_hidden_states`` in a SigLIP vision config?

    LLaVA feeds its projector ``hidden_states[vision_feature_layer]``. A native tower with a final LayerNorm
    exports as SigLIP whose ``hidden_states[-1]`` must be the post-norm output; recent transformers take that from
    ``config.tie_last_hidden_states``, earlier ones (5.17, for one) ignore the field and give the pre-norm state,
    so the export would silently compute something else. Answered by running a one-layer SigLIP tower on 4 pixels.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                                image_size=4, patch_size=2, vision_use_head=False, tie_last_hidden_states=True)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leaves the caller's CPU random stream as it was
        out = SiglipVisionModel(config).eval()(torch.randn(1, 3, 4, 4), output_hidden_states=True)
    return torch.equal(out.hidden_states[-1], out.last_hidden_state)


def export_problems(cfg: ModelConfig) -> list[str]:
    """Why ``cfg`` cannot be exported exactly (empty when it can)."""
    problems = []
    if cfg.image_attention != "causal":
        problems.append(
            f"model.image_attention={cfg.image_attention!r}: LLaVA attends causally over image tokens, so this model "
            "would answer differently after export; train or fine-tune it with model.image_attention=causal"
        )
    if cfg.projector_hidden != cfg.dim:
        problems.append(
            f"model.projector_hidden={cfg.projector_hidden} differs from model.dim={cfg.dim}; LLaVA's projector is "
            "Linear(D_v, D), GELU, Linear(D, D)"
        )
    if cfg.projector_layer_norm:
        problems.append(
            "model.projector_layer_norm=true: LLaVA's multi_modal_projector has no LayerNorm (Linear, GELU, Linear)"
        )
    v = cfg.vision
    if v.class_token and not (v.pre_norm and not v.final_norm):
        problems.append(
            "model.vision.class_token=true exports as CLIPVisionModel, which needs pre_norm=true and final_norm=false "
            f"(got pre_norm={v.pre_norm}, final_norm={v.final_norm})"
        )
    if not v.class_token and v.pre_norm:
        problems.append("model.vision.pre_norm=true without class_token: SigLIP has no pre-norm and CLIP a CLS token")
    if not v.class_token and v.final_norm and not siglip_hidden_states_can_end_normed():
        import transformers

        problems.append(
            f"model.vision.final_norm=true: transformers {transformers.__version__} gives LLaVA SigLIP's hidden state "
            "before its final LayerNorm whatever the config says (later releases read tie_last_hidden_states); "
            "upgrade transformers (constraints.txt pins one that works) or export a tower with final_norm=false"
        )
    if cfg.attention_out_bias and not cfg.attention_qkv_bias:
        problems.append("model.attention_out_bias without attention_qkv_bias matches neither Llama nor Qwen2")
    return problems


def llava_config(cfg: ModelConfig, vocab_size: int, tokenizer: Any) -> Any:
    """The ``LlavaConfig`` of a native model (raises ExportError when there is none)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    problems = export_problems(cfg)
    if problems:
        raise ExportError("cannot export exactly as LLaVA:\n  - " + "\n  - ".join(problems))
    v = cfg.vision
    vision_fields = {
        "hidden_size": v.dim, "intermediate_size": v.mlp_hidden, "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads, "num_channels": v.channels, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": ACT_TO_HF[v.act], "layer_norm_eps": v.norm_eps,
    }
    if v.class_token:
        vision_config = CLIPVisionConfig(**vision_fields)
        select = "default"  # drops the CLS output, as the native tower does
    else:
        # tie_last_hidden_states: LLaVA's hidden_states[-1] becomes the post_layernorm output, the native final norm.
        vision_config = SiglipVisionConfig(**vision_fields, vision_use_head=False, tie_last_hidden_states=v.final_norm)
        select = "full"
    text_fields = {
        "vocab_size": vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu", "max_position_embeddings": MAX_POSITION_EMBEDDINGS, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if cfg.attention_qkv_bias and not cfg.attention_out_bias:
        text_config = Qwen2Config(**text_fields, use_sliding_window=False)  # Qwen2: biased q/k/v, unbiased o
    else:
        text_config = LlamaConfig(**text_fields, attention_bias=cfg.attention_qkv_bias, mlp_bias=False)
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=v.num_patches, projector_hidden_act="gelu", multimodal_projector_bias=True,
        vision_feature_layer=-1, vision_feature_select_strategy=select, tie_word_embeddings=cfg.tie_embeddings,
    )


def processor_chat_template(template: str) -> str:
    """``template`` made to accept typed content parts as well as strings (for ``processor.apply_chat_template``).

    A template that already reads parts (mentions ``type``) is returned unchanged; otherwise every
    ``message['content']`` goes through :data:`CONTENT_MACRO`. For string content the result is
    character for character the original rendering.
    """
    if re.search(r"""\[(['"])type\1\]|\.type\b""", template):
        return template
    return CONTENT_MACRO + _CONTENT_ACCESS.sub("vlm_content_text(message['content'])", template)


def build_processor(cfg: ModelConfig, tokenizer: Any) -> Any:
    """A LlavaProcessor: ImageProcessor's preprocessing, and <image> expanded to P tokens as ChatEncoder does."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor
    from transformers.image_utils import PILImageResampling

    v = cfg.vision
    size = {"height": v.image_size, "width": v.image_size}
    image_processor = LlavaImageProcessorPil(
        do_convert_rgb=True, do_resize=True, size=size, resample=PILImageResampling.BOX,  # ImageProcessor: squash, BOX
        do_center_crop=False, crop_size=size, do_pad=False, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(v.image_mean), image_std=list(v.image_std),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=v.patch_size,
        vision_feature_select_strategy="default" if v.class_token else "full",
        num_additional_image_tokens=int(v.class_token), chat_template=processor_chat_template(tokenizer.chat_template),
        image_token=IMAGE_TOKEN,
    )


def export_model(model: VLM, tokenizer: Any, out_dir: Path | str, dtype: torch.dtype = torch.float32,
                 overwrite: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` as a LLaVA folder at ``out_dir`` (atomically: staged, then renamed)."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    cfg = model.cfg
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite or choose another folder")
    config = llava_config(cfg, model.vocab_size, tokenizer)
    config.dtype = dtype
    tensors = {name: t.detach().to("cpu", dtype) for name, t in llava_from_native(model.state_dict(), cfg).items()}
    with torch.device("meta"):  # no second copy of the weights: load_state_dict(assign=True) puts ours in place
        hf_model = LlavaForConditionalGeneration(config)
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False, assign=True)
    expected_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) != expected_missing or unexpected:
        raise ExportError(
            f"LLaVA module does not fit the mapped tensors: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    generation = GenerationConfig(
        do_sample=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[model.image_token_id],  # greedy_generate masks the image token's logit the same way
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf_model.save_pretrained(str(staging))
        generation.save_pretrained(str(staging))
        build_processor(cfg, tokenizer).save_pretrained(str(staging))  # also writes the tokenizer and chat template
        os.chmod(staging, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported a %s LLaVA (%s tower, %s decoder) to %s", str(dtype).removeprefix("torch."),
             config.vision_config.model_type, config.text_config.model_type, out_dir)
    return out_dir


def export_checkpoint(checkpoint: Path | str, out_dir: Path | str, tokenizer_dir: Path | str | None = None,
                      dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Load a project checkpoint (vlm_core.hf.checkpoint.load_trained) and export it with :func:`export_model`."""
    trained = load_trained(checkpoint, tokenizer_dir)
    return export_model(trained.model, trained.tokenizer, out_dir, dtype=dtype, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_core.hf.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint folder, checkpoints/ folder, or run directory")
    parser.add_argument("out_dir", help="folder to write the LLaVA model into")
    parser.add_argument("--tokenizer", help="tokenizer folder, when the one the run recorded is not on this machine")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype of the export")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, DTYPES[args.dtype], args.overwrite)
    except (ValueError, FileExistsError) as exc:  # ExportError, CheckpointError, DataError: user-facing
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
