"""Weight names and layouts: the project's VLM state dict <-> Hugging Face CLIP/SigLIP, Llama/Qwen2, LLaVA.

Both directions use the tables below, so an import followed by an export maps every tensor back to
the name it came from. Layout differences, each exact:

- The native vision attention has one fused ``qkv`` projection (rows q, then k, then v, as
  ``VisionAttention.forward`` splits them); HF has ``q_proj``, ``k_proj``, ``v_proj``.
- The native position embedding is ``[1, P, D_v]`` (``[1, 1 + P, D_v]`` with a CLS token); HF's is an
  ``nn.Embedding`` of ``[P, D_v]``.
- CLIP's patch embedding has no bias. Importing gives the native conv a zero bias; exporting folds a
  non-zero native bias into the patch rows of the position table, (conv(x) + b) + pos = conv(x) + (pos + b).
- Rotary embeddings need no permutation: the native decoder rotates (d, d + Dh/2) pairs (rotate-half),
  as HF Llama and Qwen2 do.

Names on the HF side are those of the in-memory transformers 5 modules: relative to the vision model
(``embeddings.patch_embedding.weight``), to the causal LM (``model.layers.0.self_attn.q_proj.weight``),
and for LLaVA, the module names of ``LlavaForConditionalGeneration`` (``model.vision_tower.``,
``model.multi_modal_projector.``, ``model.language_model.``, ``lm_head.``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlm_core.model.config import ModelConfig, VisionConfig

# Inside native ``vision.blocks.{i}.`` -> inside HF ``encoder.layers.{i}.`` (the fused qkv is handled apart).
VISION_LAYER_NAMES: dict[str, str] = {
    "attention_norm.weight": "layer_norm1.weight",
    "attention_norm.bias": "layer_norm1.bias",
    "attention.proj.weight": "self_attn.out_proj.weight",
    "attention.proj.bias": "self_attn.out_proj.bias",
    "mlp_norm.weight": "layer_norm2.weight",
    "mlp_norm.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}

# Inside native ``decoder.layers.{i}.`` -> inside HF ``layers.{i}.`` of a LlamaModel / Qwen2Model.
DECODER_LAYER_NAMES: dict[str, str] = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
QKV_BIAS_NAMES: dict[str, str] = {
    "attention.q_proj.bias": "self_attn.q_proj.bias",
    "attention.k_proj.bias": "self_attn.k_proj.bias",
    "attention.v_proj.bias": "self_attn.v_proj.bias",
}
OUT_BIAS_NAMES: dict[str, str] = {"attention.o_proj.bias": "self_attn.o_proj.bias"}

# Native projector -> LLaVA's multi_modal_projector (Linear, GELU, Linear).
PROJECTOR_NAMES: dict[str, str] = {
    "fc1.weight": "linear_1.weight",
    "fc1.bias": "linear_1.bias",
    "fc2.weight": "linear_2.weight",
    "fc2.bias": "linear_2.bias",
}

TensorGetter = Callable[[str], torch.Tensor]


def decoder_layer_names(cfg: ModelConfig) -> dict[str, str]:
    """The per-layer name table for this decoder's bias options."""
    names = dict(DECODER_LAYER_NAMES)
    if cfg.attention_qkv_bias:
        names.update(QKV_BIAS_NAMES)
    if cfg.attention_out_bias:
        names.update(OUT_BIAS_NAMES)
    return names


# --- HF -> native ---------------------------------------------------------------------------------


def vision_from_hf(get: TensorGetter, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Native ``vision.*`` tensors from a CLIP/SigLIP vision model's tensors (``get(hf_name)``).

    Only the first ``cfg.layers`` encoder layers are read (the blocks after LLaVA's feature layer never
    reach the projector); CLIP's post-layernorm and SigLIP's pooling head are not read either.
    """
    out: dict[str, torch.Tensor] = {}
    patch_weight = get("embeddings.patch_embedding.weight")
    out["vision.patch_embed.weight"] = patch_weight
    if cfg.class_token:  # CLIP: no conv bias, a CLS embedding, and pre_layrnorm
        out["vision.patch_embed.bias"] = torch.zeros(patch_weight.shape[0], dtype=patch_weight.dtype)
        out["vision.class_embedding"] = get("embeddings.class_embedding")
    else:
        out["vision.patch_embed.bias"] = get("embeddings.patch_embedding.bias")
    if cfg.pre_norm:
        out["vision.pre_norm.weight"] = get("pre_layrnorm.weight")
        out["vision.pre_norm.bias"] = get("pre_layrnorm.bias")
    out["vision.position_embedding"] = get("embeddings.position_embedding.weight")[None]  # [1, P (+1), D_v]
    for i in range(cfg.layers):
        hf = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"vision.blocks.{i}.attention.qkv.{kind}"] = torch.cat(
                [get(f"{hf}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")]
            )  # [3 D_v, D_v] / [3 D_v]
        for native, hf_name in VISION_LAYER_NAMES.items():
            out[f"vision.blocks.{i}.{native}"] = get(hf + hf_name)
    if cfg.final_norm:
        out["vision.norm.weight"] = get("post_layernorm.weight")
        out["vision.norm.bias"] = get("post_layernorm.bias")
    return out


def decoder_from_hf(get: TensorGetter, cfg: ModelConfig, has: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Native ``decoder.*`` tensors from a LlamaForCausalLM / Qwen2ForCausalLM's tensors, vocabulary as stored.

    ``has(name)`` tells whether the folder stores a tensor: a tied model stores no ``lm_head.weight``.
    """
    out = {
        "decoder.embed_tokens.weight": get("model.embed_tokens.weight"),
        "decoder.norm.weight": get("model.norm.weight"),
    }
    names = decoder_layer_names(cfg)
    for i in range(cfg.layers):
        for native, hf_name in names.items():
            out[f"decoder.layers.{i}.{native}"] = get(f"model.layers.{i}.{hf_name}")
    if not cfg.tie_embeddings:
        out["decoder.lm_head.weight"] = get("lm_head.weight" if has("lm_head.weight") else "model.embed_tokens.weight")
    return out


# --- native -> HF (LLaVA) ---------------------------------------------------------------------------


def llava_from_native(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LlavaForConditionalGeneration tensors (module names) from a native VLM state dict.

    With a tied LM head, ``lm_head.weight`` is left out (transformers ties it to the embedding).
    """
    v = cfg.vision
    out: dict[str, torch.Tensor] = {}
    tower = "model.vision_tower."
    position = state["vision.position_embedding"][0].clone()  # [P (+1), D_v]
    patch_bias = state["vision.patch_embed.bias"]
    out[tower + "embeddings.patch_embedding.weight"] = state["vision.patch_embed.weight"]
    if v.class_token:  # CLIP has no conv bias: fold it into the patch rows of the position table
        position[1:] += patch_bias
        out[tower + "embeddings.class_embedding"] = state["vision.class_embedding"]
    else:
        out[tower + "embeddings.patch_embedding.bias"] = patch_bias
    out[tower + "embeddings.position_embedding.weight"] = position
    if v.pre_norm:
        out[tower + "pre_layrnorm.weight"] = state["vision.pre_norm.weight"]
        out[tower + "pre_layrnorm.bias"] = state["vision.pre_norm.bias"]
    for i in range(v.layers):
        native, hf = f"vision.blocks.{i}.", f"{tower}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, value = state[f"{native}attention.qkv.{kind}"].chunk(3, dim=0)  # rows q, k, v
            out[f"{hf}self_attn.q_proj.{kind}"] = q
            out[f"{hf}self_attn.k_proj.{kind}"] = k
            out[f"{hf}self_attn.v_proj.{kind}"] = value
        for native_name, hf_name in VISION_LAYER_NAMES.items():
            out[hf + hf_name] = state[native + native_name]
    if v.final_norm:
        out[tower + "post_layernorm.weight"] = state["vision.norm.weight"]
        out[tower + "post_layernorm.bias"] = state["vision.norm.bias"]
    else:  # present in the HF module but never on LLaVA's path (hidden_states[-1] is read before it)
        out[tower + "post_layernorm.weight"] = torch.ones(v.dim, dtype=patch_bias.dtype)
        out[tower + "post_layernorm.bias"] = torch.zeros(v.dim, dtype=patch_bias.dtype)
    for native_name, hf_name in PROJECTOR_NAMES.items():
        out[f"model.multi_modal_projector.{hf_name}"] = state[f"projector.{native_name}"]
    lm = "model.language_model."
    out[lm + "embed_tokens.weight"] = state["decoder.embed_tokens.weight"]
    out[lm + "norm.weight"] = state["decoder.norm.weight"]
    for i in range(cfg.layers):
        for native_name, hf_name in decoder_layer_names(cfg).items():
            out[f"{lm}layers.{i}.{hf_name}"] = state[f"decoder.layers.{i}.{native_name}"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["decoder.lm_head.weight"]
    return {name: tensor.contiguous() for name, tensor in out.items()}
