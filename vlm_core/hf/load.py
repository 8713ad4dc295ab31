"""Import (``model=hf``): a pretrained vision tower and LLM from local Hugging Face folders, as a native VLM.

    vision folder (CLIPVisionModel / SiglipVisionModel) ─┐
                                                          ├─► ModelConfig ─► VLM (packing, kernels, TP apply)
    LLM folder (LlamaForCausalLM / Qwen2ForCausalLM) ─────┘
      └─ tokenizer + chat template, <image> added, embedding grown to len(tokenizer)

The projector starts from random weights (LLaVA's stage 1 trains it).

The result computes what ``LlavaForConditionalGeneration`` computes on the same tower and LLM (with
``vision_feature_layer`` and the feature-select strategy of LLaVA: CLIP's CLS output dropped, every
SigLIP patch kept), provided ``model.image_attention=causal`` as ``conf/model/hf.yaml`` sets it.
Tests compare logits against transformers (tests/vlm_core/hf/test_import.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from vlm_core.config import JobConfig
from vlm_core.data.tokenizer import IMAGE_TOKEN
from vlm_core.hf.folders import (
    HFImportError,
    SafetensorsFolder,
    load_hf_config,
    read_json,
)
from vlm_core.hf.mapping import decoder_from_hf, vision_from_hf
from vlm_core.model.config import HFSourceConfig, ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM

log = logging.getLogger(__name__)

VISION_KINDS = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
LLM_KINDS = ("llama", "qwen2")
ACT_FROM_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}
# Normalization of each tower kind when its folder has no preprocessor_config.json (transformers' defaults).
DEFAULT_NORMALIZATION = {
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}


def hf_job_config(job: JobConfig) -> JobConfig:
    """The job with ``model`` resolved from ``model.hf``'s folders and the tokenizer taken from the LLM folder."""
    model = resolve_model_config(job.model)
    if job.train.tower.enabled:
        log.warning(
            "model=hf with train.tower.enabled=true: stage 0 retrains the pretrained tower on the world's per-patch "
            "labels; pass train.tower.enabled=false to train on top of the tower as imported"
        )
    tokenizer = job.data.tokenizer
    llm_path = str(Path(model.hf.llm_path).expanduser())
    if tokenizer.path is None:
        tokenizer = dataclasses.replace(tokenizer, path=llm_path)
    elif Path(tokenizer.path).expanduser().resolve() != Path(llm_path).resolve():
        log.warning(
            "model=hf with data.tokenizer.path=%s: using it instead of the LLM folder's tokenizer (%s); its ids must "
            "be the LLM's", tokenizer.path, llm_path,
        )
    return dataclasses.replace(job, model=model, data=dataclasses.replace(job.data, tokenizer=tokenizer))


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """The native architecture of ``cfg.hf``'s folders (reads their config files, not their weights).

    Kept from ``cfg``: name, attn_impl, kernel_impl, init_std (the projector's init), projector_layer_norm (the
    projector is the project's own, trained from scratch), image_attention and hf.
    """
    hf = _check_source(cfg.hf)
    vision_path, llm_path = Path(hf.vision_path).expanduser(), Path(hf.llm_path).expanduser()
    vision_kind, vision = _vision_config(vision_path)
    llm = _llm_config(llm_path)
    layers = _feature_layers(hf.vision_feature_layer, vision.num_hidden_layers, vision_path)
    image_size, patch_size = _square(vision.image_size, "image_size", vision_path), _square(
        vision.patch_size, "patch_size", vision_path
    )
    if vision.hidden_act not in ACT_FROM_HF:
        raise HFImportError(
            f"{vision_path}: hidden_act={vision.hidden_act!r} has no exact native equivalent; "
            f"supported: {sorted(ACT_FROM_HF)}"
        )
    mean, std = _normalization(vision_path, vision_kind)
    vision_cfg = VisionConfig(
        image_size=image_size,
        channels=vision.num_channels,
        patch_size=patch_size,
        dim=vision.hidden_size,
        layers=layers,
        heads=vision.num_attention_heads,
        mlp_ratio=vision.intermediate_size / vision.hidden_size,
        mlp_hidden=vision.intermediate_size,
        norm_eps=vision.layer_norm_eps,
        act=ACT_FROM_HF[vision.hidden_act],
        class_token=vision_kind == "clip",
        pre_norm=vision_kind == "clip",
        final_norm=False,  # LLaVA reads hidden_states[layer], before CLIP's/SigLIP's post-layernorm
        image_mean=mean,
        image_std=std,
    )
    qkv_bias, out_bias = (True, False) if llm.model_type == "qwen2" else (llm.attention_bias, llm.attention_bias)
    return ModelConfig(
        name=cfg.name,
        vision=vision_cfg,
        projector_hidden=llm.hidden_size,  # LLaVA's linear_1 maps D_v to the LLM width
        dim=llm.hidden_size,
        layers=llm.num_hidden_layers,
        heads=llm.num_attention_heads,
        kv_heads=llm.num_key_value_heads or llm.num_attention_heads,
        mlp_hidden=llm.intermediate_size,
        rope_theta=float(_rope_theta(llm, llm_path)),
        norm_eps=llm.rms_norm_eps,
        tie_embeddings=bool(llm.tie_word_embeddings),
        attn_impl=cfg.attn_impl,
        kernel_impl=cfg.kernel_impl,
        init_std=cfg.init_std,
        projector_layer_norm=cfg.projector_layer_norm,
        attention_qkv_bias=qkv_bias,
        attention_out_bias=out_bias,
        image_attention=cfg.image_attention,
        hf=hf,
    )


def import_model(cfg: ModelConfig, tokenizer) -> VLM:
    """A VLM for the resolved ``cfg`` with the tower and LLM weights of ``cfg.hf``'s folders.

    ``tokenizer`` comes from ``vlm_core.data.tokenizer.load_tokenizer`` (which adds ``<image>``). The
    vocabulary is max(the LLM's embedding rows, len(tokenizer)); rows the LLM lacks (``<image>``) start
    at the mean of its rows, as transformers' ``resize_token_embeddings`` centres them. The image token's
    row is never read as an input (image features replace it) and its logit is masked in generation.
    """
    hf = _check_source(cfg.hf)
    vision_path, llm_path = Path(hf.vision_path).expanduser(), Path(hf.llm_path).expanduser()
    vision = SafetensorsFolder(vision_path, prefix="vision_model.")
    llm = SafetensorsFolder(llm_path)
    state = vision_from_hf(vision.get, cfg.vision)
    state.update(decoder_from_hf(llm.get, cfg, llm.has))
    stored_vocab = state["decoder.embed_tokens.weight"].shape[0]
    if len(tokenizer) > stored_vocab + 1:
        raise HFImportError(
            f"tokenizer has {len(tokenizer)} tokens but {llm_path} embeds {stored_vocab}; only {IMAGE_TOKEN} may be "
            "added, so this tokenizer does not belong to that LLM (check data.tokenizer.path)"
        )
    vocab_size = max(stored_vocab, len(tokenizer))
    for name in ("decoder.embed_tokens.weight", "decoder.lm_head.weight"):
        if name in state and state[name].shape[0] < vocab_size:
            rows = state[name]
            extra = rows.float().mean(dim=0, keepdim=True).to(rows.dtype).expand(vocab_size - rows.shape[0], -1)
            state[name] = torch.cat([rows, extra])  # [V, D]
    model = VLM(cfg, vocab_size=vocab_size, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_projector = sorted(name for name in missing if not name.startswith("projector."))
    if not_projector or unexpected:
        raise HFImportError(
            f"importing {vision_path} + {llm_path}: native tensors without a source {not_projector[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    log.info(
        "imported %s (%s vision layers up to LLaVA's feature layer %d) and %s (vocabulary %d -> %d); the projector "
        "is freshly initialized", vision_path, cfg.vision.layers, hf.vision_feature_layer, llm_path, stored_vocab,
        vocab_size,
    )
    return model


def _check_source(hf: HFSourceConfig | None) -> HFSourceConfig:
    if hf is None:
        raise ValueError("model.hf is not set; use model=hf with model.hf.vision_path=DIR model.hf.llm_path=DIR")
    for field in ("vision_path", "llm_path"):
        value = getattr(hf, field)
        if value is None:
            raise ValueError(f"model.hf.{field} is required for model=hf: pass model.hf.{field}=DIR (a local folder)")
        if not Path(value).expanduser().is_dir():
            raise ValueError(f"model.hf.{field}={value} is not a folder; nothing is downloaded, give a local path")
    return hf


def _vision_config(folder: Path):
    config = load_hf_config(folder)
    kind = VISION_KINDS.get(config.model_type)
    if kind is None:
        raise HFImportError(
            f"{folder} holds a {config.model_type!r} model; model.hf.vision_path takes CLIPVisionModel or "
            "SiglipVisionModel folders (or full CLIPModel / SiglipModel folders)"
        )
    if config.model_type in ("clip", "siglip"):
        config = config.vision_config
    return kind, config


def _llm_config(folder: Path):
    config = load_hf_config(folder)
    if config.model_type not in LLM_KINDS:
        raise HFImportError(
            f"{folder} holds a {config.model_type!r} model; model.hf.llm_path takes LlamaForCausalLM or "
            "Qwen2ForCausalLM folders"
        )
    problems = []
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (the native MLP is SwiGLU with SiLU)")
    head_dim = getattr(config, "head_dim", None)
    if head_dim not in (None, config.hidden_size // config.num_attention_heads):
        problems.append(f"head_dim={head_dim} differs from hidden_size / num_attention_heads")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=true (the native SwiGLU has no biases)")
    if getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=true (native attention is full)")
    if problems:
        raise HFImportError(f"{folder}: no exact native equivalent for " + "; ".join(problems))
    return config


def _rope_theta(config, folder: Path) -> float:
    """RoPE base of a transformers 5 ``rope_parameters`` dict (older configs are converted by AutoConfig)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise HFImportError(
            f"{folder}: rope_type={rope_type!r} (scaled RoPE) is not implemented by the native decoder; only plain "
            "RoPE (rope_type 'default') imports exactly"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise HFImportError(f"{folder}: config.json names no rope_theta")
    return theta


def _feature_layers(feature_layer: int, num_layers: int, folder: Path) -> int:
    """Blocks the native tower keeps: LLaVA's hidden_states[feature_layer] is the output of that many blocks."""
    kept = feature_layer if feature_layer > 0 else num_layers + 1 + feature_layer
    if not 1 <= kept <= num_layers:
        raise HFImportError(
            f"model.hf.vision_feature_layer={feature_layer} is out of range for {folder} ({num_layers} layers); "
            f"use 1 .. {num_layers} or -1 .. -{num_layers}"
        )
    return kept


def _square(value, name: str, folder: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise HFImportError(f"{folder}: {name}={list(value)} is not square; the native tower takes square inputs")
        value = value[0]
    return int(value)


def _normalization(folder: Path, kind: str) -> tuple[list[float], list[float]]:
    """The tower's pixel mean and std: its preprocessor_config.json, else the defaults of its kind."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        data = read_json(folder / name) or {}
        data = data.get("image_processor", data)
        if "image_mean" in data and "image_std" in data:
            return [float(x) for x in data["image_mean"]], [float(x) for x in data["image_std"]]
    mean, std = DEFAULT_NORMALIZATION[kind]
    return list(mean), list(std)
