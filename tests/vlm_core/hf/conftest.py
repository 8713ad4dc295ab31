"""Tiny random Hugging Face models saved with save_pretrained (nothing comes from a model hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_helpers import IMAGE_SIZE, PATCH, randomize, save_chatml_tokenizer


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders: clip, siglip (vision); llama (untied, q/k/v/o biases), qwen2 (tied, vocabulary padded past the tokenizer)."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("hf")
    vision = {"hidden_size": 32, "intermediate_size": 72, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": PATCH}
    randomize(CLIPVisionModel(CLIPVisionConfig(**vision)), 1).save_pretrained(root / "clip")
    randomize(SiglipVisionModel(SiglipVisionConfig(**vision)), 2).save_pretrained(root / "siglip")
    # SigLIP normalizes with 0.5 by default; a preprocessor_config.json with other values must win.
    (root / "siglip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}))
    for name, cls, config_cls, extra, seed in (
        ("llama", LlamaForCausalLM, LlamaConfig, {"attention_bias": True, "tie_word_embeddings": False}, 3),
        ("qwen2", Qwen2ForCausalLM, Qwen2Config,
         {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, 4),
    ):
        folder = root / name
        vocab = save_chatml_tokenizer(folder)
        padded = vocab + 20 if name == "qwen2" else vocab  # Qwen pads its embedding past the tokenizer
        config = config_cls(vocab_size=padded, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
        randomize(cls(config), seed).save_pretrained(folder)
    return {name: root / name for name in ("clip", "siglip", "llama", "qwen2")}
