"""Export: transformers loads the folder with no project code, and its greedy generate answers as ours does."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import TEXTS, randomize
from PIL import Image

from vlm_core.data.image import ImageProcessor
from vlm_core.data.tokenizer import ChatEncoder, load_tokenizer, train_tokenizer
from vlm_core.eval.generate import greedy_generate
from vlm_core.hf.checkpoint import read_model_tensors
from vlm_core.hf import export
from vlm_core.hf.export import ExportError, export_checkpoint, main
from vlm_core.hf.load import import_model, resolve_model_config
from vlm_core.model.config import HFSourceConfig, ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM, pack_prompts
from vlm_core.train.checkpoint import CheckpointError, save_checkpoint
from vlm_core.types import TokenizedSample, Turn

# Same bound and reasoning as test_import.ATOL: fp32 both sides; measured max |diff| <= 2.5e-6 on logits up to 3.4.
ATOL = 2e-5
MAX_NEW_TOKENS = 12
# (question, image height, width): a downscale (BOX, as ImageProcessor), the exact size, a non-square downscale.
PROMPTS = [("what color is the circle", 64, 64), ("how many squares are there", 32, 32), ("is there a red star", 70, 50)]


def native_checkpoint(root: Path, image_attention: str = "causal", **model_options) -> Path:
    """A random tiny native model (tied head, final LayerNorm: the SigLIP export path) saved by save_checkpoint."""
    tokenizer_dir = train_tokenizer(TEXTS, root / "tokenizer", vocab_size=300)
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = ModelConfig(vision=VisionConfig(image_size=32, patch_size=16, dim=32, layers=2, heads=2), dim=64, layers=2,
                      heads=4, kv_heads=2, image_attention=image_attention, **model_options)
    model = randomize(VLM(cfg, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>")), seed=7)
    return save(root, model, cfg, tokenizer_dir)


def imported_checkpoint(root: Path, hf_folders: dict[str, Path], vision: str, llm: str, feature_layer: int) -> Path:
    cfg = resolve_model_config(ModelConfig(
        hf=HFSourceConfig(str(hf_folders[vision]), str(hf_folders[llm]), feature_layer), image_attention="causal"))
    model = import_model(cfg, load_tokenizer(hf_folders[llm]))
    randomize(model.projector, seed=8)  # a trained projector, not the 0.02 init
    return save(root, model, cfg, hf_folders[llm])


def save(root: Path, model: VLM, cfg: ModelConfig, tokenizer_dir: Path) -> Path:
    state = {"stage": "instruct", "step": 0, "model_config": asdict(cfg), "tokenizer_dir": str(tokenizer_dir)}
    return save_checkpoint(root / "checkpoints", "final", model, None, state)


def images_for_prompts() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _, h, w in PROMPTS]


@pytest.mark.parametrize("case", ["native", "clip+llama", "siglip+qwen2"])
def test_exported_llava_generates_our_greedy_answers(case: str, hf_folders, tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if case == "native":
        checkpoint = native_checkpoint(tmp_path)
        out = tmp_path / "llava"
        assert main([str(checkpoint.parent.parent), str(out)]) == 0  # the CLI, given the run directory
    else:
        vision, llm = case.split("+")
        checkpoint = imported_checkpoint(tmp_path, hf_folders, vision, llm, -2 if vision == "clip" else -1)
        out = export_checkpoint(checkpoint, tmp_path / "llava")
    from vlm_core.hf.checkpoint import load_trained

    trained = load_trained(checkpoint)
    model, tokenizer, cfg = trained.model, trained.tokenizer, trained.config
    encoder = ChatEncoder(tokenizer, cfg.vision.num_patches)
    processor = ImageProcessor(cfg.vision.image_size, cfg.vision.image_mean, cfg.vision.image_std)

    llava, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # every tensor present, none left over
    hf_processor = AutoProcessor.from_pretrained(out)
    llava.eval()
    generated, all_tokens = [], set()
    for (question, _, _), image in zip(PROMPTS, images_for_prompts()):
        content = "<image>\n" + question
        ids = encoder.encode_prompt([Turn("user", content)])
        pixels = processor.from_pil(image)[None]
        prompt = TokenizedSample(ids, torch.zeros_like(ids, dtype=torch.bool), encoder.bidir_groups(ids), pixels)
        text = hf_processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=False,
        )
        assert text == tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        inputs = hf_processor(images=image, text=text, return_tensors="pt", add_special_tokens=False)
        assert inputs["input_ids"][0].tolist() == ids.tolist()  # <image> expanded to P tokens, same ids
        assert torch.equal(inputs["pixel_values"], pixels)  # same preprocessing, bit for bit
        with torch.no_grad():
            ours = model(pack_prompts([prompt]))
            theirs = llava(**inputs).logits[0]
        diff = (ours - theirs).abs().max()
        assert diff < ATOL, f"{case}: max |logit diff| {diff:.3e} vs atol {ATOL} (logits up to {theirs.abs().max():.2f})"
        answer = greedy_generate(model, [prompt], MAX_NEW_TOKENS, tokenizer.eos_token_id)[0]
        hf_answer = llava.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, ids.numel():].tolist()
        if tokenizer.eos_token_id in hf_answer:
            hf_answer = hf_answer[: hf_answer.index(tokenizer.eos_token_id)]
        assert hf_answer == answer, f"{case} {question!r}: transformers {hf_answer} vs ours {answer}"
        generated.append(answer)
        all_tokens.update(answer)
    # Random weights give arbitrary tokens; check they are not a degenerate constant, so the equality means something.
    assert sum(map(len, generated)) >= MAX_NEW_TOKENS and len(all_tokens) >= 3, generated


def test_bidirectional_image_attention_is_refused(tmp_path: Path, capsys) -> None:
    checkpoint = native_checkpoint(tmp_path, image_attention="bidirectional")
    with pytest.raises(ExportError, match=r"model\.image_attention='bidirectional'.*model\.image_attention=causal"):
        export_checkpoint(checkpoint, tmp_path / "llava")
    assert main([str(checkpoint), str(tmp_path / "llava")]) == 2
    assert "image_attention" in capsys.readouterr().err and not (tmp_path / "llava").exists()


def test_a_projector_layer_norm_is_refused(tmp_path: Path) -> None:
    checkpoint = native_checkpoint(tmp_path, projector_layer_norm=True)
    with pytest.raises(ExportError, match=r"model\.projector_layer_norm=true: LLaVA's multi_modal_projector has no"):
        export_checkpoint(checkpoint, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()


def test_this_transformers_gives_llava_the_final_normed_siglip_features() -> None:
    # constraints.txt pins a transformers that reads SiglipVisionConfig.tie_last_hidden_states (5.17 does not)
    export.siglip_hidden_states_can_end_normed.cache_clear()
    before = torch.random.get_rng_state()
    assert export.siglip_hidden_states_can_end_normed()
    assert torch.equal(torch.random.get_rng_state(), before)  # the probe draws from a forked random stream


def test_a_transformers_without_the_final_norm_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(export, "siglip_hidden_states_can_end_normed", lambda: False)  # as under transformers 5.17
    checkpoint = native_checkpoint(tmp_path)
    with pytest.raises(ExportError, match=r"model\.vision\.final_norm=true: transformers .* before its final LayerNorm"):
        export_checkpoint(checkpoint, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()
    without = ModelConfig(vision=VisionConfig(image_size=32, patch_size=16, dim=32, layers=2, heads=2, final_norm=False),
                          dim=64, layers=2, heads=4, kv_heads=2, image_attention="causal")
    assert export.export_problems(without) == []  # the tower's raw output exports with any transformers


def test_sharded_checkpoint_is_merged_and_an_incomplete_one_refused(tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    from vlm_core.parallel.reshard import ShardSpec, shard_tensor

    checkpoint = tmp_path / "step-000010"
    checkpoint.mkdir()
    embed, norm = torch.randn(5, 4), torch.randn(4)
    spec = ShardSpec(0, vocab=True)  # 5 rows: padded to 6 for TP=2, split 3 + 3
    full = {"decoder.embed_tokens.weight": embed, "decoder.norm.weight": norm}
    layout = {"decoder.embed_tokens.weight": spec}
    for rank in range(2):
        shard = {"decoder.embed_tokens.weight": shard_tensor(embed, spec, rank, 2), "decoder.norm.weight": norm}
        save_file(shard, str(checkpoint / f"model-tp{rank:02d}-of-02.safetensors"))
    record = {"size": 2, "vocab_size": 5, "layout": {k: v.to_json() for k, v in layout.items()}}
    (checkpoint / "state.json").write_text(json.dumps({"tensor_parallel": record}))
    merged = read_model_tensors(checkpoint)
    assert all(torch.equal(merged[name], full[name]) for name in full)
    (checkpoint / "model-tp01-of-02.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks"):
        read_model_tensors(checkpoint)
