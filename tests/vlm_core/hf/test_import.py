"""model=hf: imported towers and LLMs compute what transformers' LLaVA computes on the same weights and inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm_core.config import JobConfig
from vlm_core.data.tokenizer import IMAGE_TOKEN, ChatEncoder, load_tokenizer
from vlm_core.hf.folders import HFImportError
from vlm_core.hf.load import hf_job_config, import_model, resolve_model_config
from vlm_core.model.config import HFSourceConfig, ModelConfig
from vlm_core.model.vlm import VLM, pack_prompts
from vlm_core.types import TokenizedSample, Turn

# fp32 on both sides, same weights, same math up to summation order and the RoPE tables (ours computed in
# float64, transformers' in float32). The tower features come out bit-identical; the logits differ by at
# most 2.2e-6 (5 seeds, 92 tokens, |logits| <= 3.5), ~5 fp32 ulps at that magnitude. 2e-5 leaves 8x
# headroom; a mapping error (a swapped norm, a dropped bias, a wrong q/k split) moves logits by > 1e-2.
ATOL = 2e-5
PAIRS = {"clip+llama": ("clip", "llama", -2, "default"), "siglip+qwen2": ("siglip", "qwen2", -1, "full")}


def imported(hf_folders: dict[str, Path], pair: str) -> tuple[VLM, object]:
    vision, llm, feature_layer, _ = PAIRS[pair]
    source = HFSourceConfig(vision_path=str(hf_folders[vision]), llm_path=str(hf_folders[llm]), vision_feature_layer=feature_layer)
    cfg = resolve_model_config(ModelConfig(hf=source, image_attention="causal"))
    tokenizer = load_tokenizer(hf_folders[llm])
    torch.manual_seed(0)
    return import_model(cfg, tokenizer), tokenizer


def reference_llava(hf_folders: dict[str, Path], pair: str, native: VLM):
    """transformers' LlavaForConditionalGeneration on the original folders' modules and the native projector."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision_name, llm_name, feature_layer, select = PAIRS[pair]
    vision = AutoModel.from_pretrained(hf_folders[vision_name])
    llm = AutoModelForCausalLM.from_pretrained(hf_folders[llm_name])
    stored_vocab = llm.config.vocab_size
    config = LlavaConfig(
        vision_config=vision.config, text_config=llm.config, image_token_index=native.image_token_id,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=select,
        image_seq_length=native.num_image_tokens, tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    llava.model.vision_tower.load_state_dict(vision.state_dict())
    llava.model.language_model.load_state_dict(llm.model.state_dict())
    llava.lm_head.load_state_dict(llm.lm_head.state_dict())
    projector = llava.model.multi_modal_projector
    with torch.no_grad():
        for hf_layer, layer in ((projector.linear_1, native.projector.fc1), (projector.linear_2, native.projector.fc2)):
            hf_layer.weight.copy_(layer.weight)
            hf_layer.bias.copy_(layer.bias)
        if native.vocab_size > stored_vocab:  # the <image> row the import added
            llava.resize_token_embeddings(native.vocab_size, mean_resizing=False)
            llava.model.language_model.embed_tokens.weight[stored_vocab:] = native.decoder.embed_tokens.weight[stored_vocab:]
            if native.decoder.lm_head is not None:
                llava.lm_head.weight[stored_vocab:] = native.decoder.lm_head.weight[stored_vocab:]
    return llava, stored_vocab


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_logits_match_transformers_llava(hf_folders, pair: str) -> None:
    native, tokenizer = imported(hf_folders, pair)
    llava, _ = reference_llava(hf_folders, pair, native)
    encoder = ChatEncoder(tokenizer, native.num_image_tokens)
    ids = encoder.encode_prompt([Turn("user", "<image>\nhow many squares are there"), Turn("assistant", "the word is cat"),
                                 Turn("user", "is there a red star")])
    images = torch.randn(1, 3, native.cfg.vision.image_size, native.cfg.vision.image_size, generator=torch.Generator().manual_seed(5))
    prompt = TokenizedSample(ids, torch.zeros_like(ids, dtype=torch.bool), encoder.bidir_groups(ids), images)
    with torch.no_grad():
        ours = native(pack_prompts([prompt]))  # [T, V]
        theirs = llava(input_ids=ids[None], pixel_values=images).logits[0]  # [T, V]
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()
    assert diff.max() < ATOL, (
        f"{pair}: max |logit diff| {diff.max():.3e} (mean {diff.mean():.3e}) vs atol {ATOL}; logits up to "
        f"{theirs.abs().max():.2f}, NaN {int(ours.isnan().sum())}"
    )
    assert theirs.std() > 0.1  # the comparison is not between two near-constant outputs


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_tokenizer_gets_image_token_and_config_follows_the_folders(hf_folders, pair: str) -> None:
    native, tokenizer = imported(hf_folders, pair)
    vision_name, llm_name, _, _ = PAIRS[pair]
    folder_vocab = json.loads((hf_folders[llm_name] / "config.json").read_text())["vocab_size"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = native.cfg
    assert cfg.vision.layers == (2 if vision_name == "clip" else 3)  # LLaVA's feature layer -2 of 3 keeps 2 blocks
    if pair == "clip+llama":  # the tokenizer fills the embedding: <image> is a new row, initialized at the mean
        assert image_id == folder_vocab and native.vocab_size == folder_vocab + 1
        rows = native.decoder.embed_tokens.weight
        torch.testing.assert_close(rows[image_id], rows[:-1].mean(dim=0), rtol=0, atol=1e-6)
        assert (cfg.vision.class_token, cfg.vision.act, cfg.attention_qkv_bias, cfg.attention_out_bias) == (True, "quick_gelu", True, True)
        assert cfg.vision.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's default
    else:  # Qwen pads its embedding past the tokenizer: <image> takes a padding row, nothing grows
        assert image_id < folder_vocab and native.vocab_size == folder_vocab
        assert (cfg.vision.class_token, cfg.vision.act, cfg.attention_qkv_bias, cfg.attention_out_bias) == (False, "gelu_tanh", True, False)
        assert cfg.vision.image_mean == [0.4, 0.5, 0.6] and cfg.rope_theta == 500.0 and cfg.tie_embeddings


def test_job_config_takes_the_tokenizer_from_the_llm_folder(hf_folders) -> None:
    source = HFSourceConfig(vision_path=str(hf_folders["siglip"]), llm_path=str(hf_folders["qwen2"]))
    job = hf_job_config(JobConfig(model=ModelConfig(hf=source, image_attention="causal")))
    assert job.data.tokenizer.path == str(hf_folders["qwen2"])
    assert (job.model.dim, job.model.vision.dim, job.model.vision.image_size) == (64, 32, 32)
    assert job.model.hf == source and job.model.image_attention == "causal"
    # the project's own choices survive the import: the kernels and the projector (trained from scratch)
    options = {"kernel_impl": "reference", "projector_layer_norm": True, "attn_impl": "sdpa", "init_std": 0.05}
    job = hf_job_config(JobConfig(model=ModelConfig(hf=source, **options)))
    assert {name: getattr(job.model, name) for name in options} == options


def test_missing_paths_and_unsupported_folders_are_named(hf_folders, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.hf\.llm_path is required"):
        resolve_model_config(ModelConfig(hf=HFSourceConfig(vision_path=str(hf_folders["clip"]))))
    with pytest.raises(HFImportError, match="CLIPVisionModel or SiglipVisionModel"):  # an LLM given as the tower
        resolve_model_config(ModelConfig(hf=HFSourceConfig(vision_path=str(hf_folders["llama"]), llm_path=str(hf_folders["llama"]))))
    with pytest.raises(HFImportError, match="vision_feature_layer=-4 is out of range"):
        resolve_model_config(ModelConfig(hf=HFSourceConfig(str(hf_folders["clip"]), str(hf_folders["llama"]), -4)))
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    config = json.loads((hf_folders["llama"] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError, match="rope_type='linear'"):
        resolve_model_config(ModelConfig(hf=HFSourceConfig(str(hf_folders["clip"]), str(scaled))))
    # Weights only as pickles: refused, never unpickled.
    (scaled / "config.json").write_text((hf_folders["llama"] / "config.json").read_text())
    (scaled / "pytorch_model.bin").write_bytes(b"not read")
    cfg = resolve_model_config(ModelConfig(hf=HFSourceConfig(str(hf_folders["clip"]), str(scaled))))
    with pytest.raises(HFImportError, match="safe_serialization=True"):
        import_model(cfg, load_tokenizer(hf_folders["llama"]))
