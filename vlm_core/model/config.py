"""Typed configuration of the VLM: vision tower, projector and decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

# "auto" and the keys of vlm_core.kernels.ATTENTION_IMPLS (a test keeps them in step; listed here so
# the config does not import torch). The decoder resolves the name per device with
# vlm_core.kernels.resolve_attn_impl: "auto" is triton on CUDA when it can run, else sdpa, and
# reference on the CPU; an impl that cannot run falls back with a logged warning.
ATTN_IMPLS: tuple[str, ...] = ("auto", "reference", "sdpa", "flex", "triton", "varlen", "flash_attn")
# "auto" and vlm_core.kernels.KERNEL_IMPLS: the fused RMSNorm, SwiGLU, RoPE, projector merge and
# linear + cross-entropy, resolved per device by vlm_core.kernels.resolve_kernel_impls ("auto" = triton on
# CUDA when it can run, reference elsewhere; a fallback is logged).
KERNEL_IMPLS: tuple[str, ...] = ("auto", "reference", "triton")
# MLP activations of the vision tower: exact (erf) GELU, CLIP's x * sigmoid(1.702 x), SigLIP's tanh GELU.
VISION_ACTS: tuple[str, ...] = ("gelu", "quick_gelu", "gelu_tanh")
IMAGE_ATTENTION: tuple[str, ...] = ("bidirectional", "causal")


@dataclass
class VisionConfig:
    """A ViT: patch embedding, learned positions, pre-norm blocks. P = (image_size / patch_size)^2 tokens.

    The defaults are the project's own tower. The options after ``norm_eps`` express pretrained towers
    exactly (vlm_core.hf): CLIP is ``class_token``, ``pre_norm``, ``act=quick_gelu``, ``final_norm=false``;
    SigLIP is ``act=gelu_tanh``, ``final_norm=false`` (LLaVA reads a hidden state before the last norm).
    """

    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("mlp_hidden",)

    image_size: int = 48  # model input side in pixels; the data path resizes images to this
    channels: int = 3  # C of the input images (RGB)
    patch_size: int = 16  # 48 / 16 = a 3x3 patch grid, one patch per cell of the world's 3x3 layout
    dim: int = 128  # D_v
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    mlp_hidden: Optional[int] = None  # MLP hidden width; None = int(dim * mlp_ratio)
    norm_eps: float = 1e-6
    act: str = "gelu"  # MLP activation, one of VISION_ACTS: gelu (exact erf), quick_gelu (CLIP), gelu_tanh (SigLIP)
    class_token: bool = False  # prepend a learned CLS token (CLIP); its output is dropped, so P tokens stay P
    pre_norm: bool = False  # LayerNorm on the embeddings before the first block (CLIP's pre_layrnorm)
    final_norm: bool = True  # LayerNorm on the output features; false = the last block's raw output
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel normalization the
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # tower expects: (x / 255 - mean) / std

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "patch_size", "dim", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.vision.{name}={getattr(self, name)} must be a positive integer")
        if not self.mlp_ratio > 0 or not self.norm_eps > 0:
            raise ValueError(
                f"model.vision.mlp_ratio={self.mlp_ratio} and norm_eps={self.norm_eps} must both be positive"
            )
        if self.mlp_hidden is None:
            self.mlp_hidden = int(self.dim * self.mlp_ratio)
        if self.mlp_hidden < 1:
            raise ValueError(f"model.vision.mlp_hidden={self.mlp_hidden} must be positive (or None for the default)")
        if self.act not in VISION_ACTS:
            raise ValueError(f"model.vision.act={self.act!r}; expected one of {list(VISION_ACTS)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(value > 0 for value in self.image_std):
            raise ValueError(
                f"model.vision.image_mean={list(self.image_mean)} and image_std={list(self.image_std)} need one value "
                "per RGB channel, and every std must be positive"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.vision.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"model.vision.dim={self.dim} is not divisible by heads={self.heads}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """P: image tokens per image."""
        return self.grid * self.grid


@dataclass
class HFSourceConfig:
    """Local Hugging Face folders a VLM is imported from (``model=hf``); read by :mod:`vlm_core.hf.load`.

    Only local paths: nothing is downloaded. The architecture fields of the enclosing ModelConfig are
    replaced by the folders' values when the job starts (``vlm_core.hf.load.resolve_model_config``).
    """

    vision_path: Optional[str] = None  # required: a CLIPVisionModel or SiglipVisionModel (or CLIPModel) folder
    llm_path: Optional[str] = None  # required: a LlamaForCausalLM or Qwen2ForCausalLM folder, tokenizer included
    vision_feature_layer: int = -2  # LLaVA's: the tower output fed to the projector; -1 = last block, -2 = LLaVA-1.5

    def __post_init__(self) -> None:
        if self.vision_feature_layer == 0:
            raise ValueError(
                "model.hf.vision_feature_layer=0 selects the patch embeddings before any block; use a block index "
                "(1 .. layers) or a negative index from the end (-1 = last block)"
            )


@dataclass
class ModelConfig:
    """A LLaVA-style VLM: ViT → (LayerNorm →) MLP projector (GELU) → decoder (RMSNorm, RoPE, SwiGLU, GQA)."""

    # Resolved from other fields in __post_init__; the Hydra schema keeps them None so overrides of
    # ``dim`` still move them (vlm_core.cli resets them after building the schema's defaults).
    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("projector_hidden", "mlp_hidden")

    name: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector_hidden: Optional[int] = None  # D_h of the projector MLP; None = decoder dim
    projector_layer_norm: bool = False  # a LayerNorm over the vision features before the MLP (InternVL's mlp1)
    dim: int = 128  # D
    layers: int = 4
    heads: int = 8  # Hq; 8 heads of 16 vs 4 of 32, one 3000-step run each: held-out colour 0.87 vs 0.45
    kv_heads: int = 4  # Hkv; heads % kv_heads == 0 (grouped-query attention)
    mlp_hidden: Optional[int] = None  # SwiGLU hidden width; None = 8/3 * dim rounded up to a multiple of 32
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # share the token embedding with the LM head
    attn_impl: str = "auto"  # one of ATTN_IMPLS; "auto" = triton on CUDA, reference on the CPU
    kernel_impl: str = "auto"  # one of KERNEL_IMPLS, for the fused training kernels; "auto" = triton on CUDA, reference on the CPU
    init_std: float = 0.02
    attention_qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2; Llama's attention_bias)
    attention_out_bias: bool = False  # bias on the attention output projection (Llama's attention_bias)
    # "bidirectional": the P tokens of one image attend to each other (DESIGN's packed-batch contract);
    # "causal": every token attends only to earlier ones, as in LLaVA, so an exported model answers the same.
    image_attention: str = "bidirectional"
    hf: Optional[HFSourceConfig] = None  # model=hf: import the tower and LLM from local Hugging Face folders

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.projector_hidden is None:
            self.projector_hidden = self.dim
        if self.mlp_hidden is None:
            self.mlp_hidden = 32 * -(-(8 * self.dim // 3) // 32)
        if self.projector_hidden < 1 or self.mlp_hidden < 1:
            raise ValueError(
                f"model.projector_hidden={self.projector_hidden} and model.mlp_hidden={self.mlp_hidden} must be "
                "positive (or None for the default)"
            )
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"model.heads={self.heads} is not divisible by model.kv_heads={self.kv_heads} "
                "(grouped-query attention shares each KV head among heads/kv_heads query heads)"
            )
        if (self.dim // self.heads) % 2:
            raise ValueError(f"head dim {self.dim // self.heads} must be even for rotary embeddings")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"model.attn_impl={self.attn_impl!r}; expected one of {list(ATTN_IMPLS)}")
        if self.kernel_impl not in KERNEL_IMPLS:
            raise ValueError(f"model.kernel_impl={self.kernel_impl!r}; expected one of {list(KERNEL_IMPLS)}")
        if self.image_attention not in IMAGE_ATTENTION:
            raise ValueError(f"model.image_attention={self.image_attention!r}; expected one of {list(IMAGE_ATTENTION)}")

    @property
    def head_dim(self) -> int:
        """Dh of the decoder."""
        return self.dim // self.heads
