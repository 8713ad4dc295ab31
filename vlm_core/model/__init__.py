"""The model, written for one device: vision tower, projector, decoder, and the VLM that joins them.

Parallelism is applied from outside (``vlm_core.parallel``); nothing here imports it.
"""

from vlm_core.model.config import ATTN_IMPLS, ModelConfig, VisionConfig
from vlm_core.model.decoder import Decoder, RMSNorm, RotaryEmbedding, apply_rotary
from vlm_core.model.kv_cache import KVCache, decode_attention
from vlm_core.model.projector import Projector
from vlm_core.model.tower_heads import TowerHeads
from vlm_core.model.vision import VisionTower
from vlm_core.model.vlm import VLM, count_parameters, pack_prompts

__all__ = [
    "ATTN_IMPLS",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "Projector",
    "RMSNorm",
    "RotaryEmbedding",
    "TowerHeads",
    "VLM",
    "VisionConfig",
    "VisionTower",
    "apply_rotary",
    "count_parameters",
    "decode_attention",
    "pack_prompts",
]
