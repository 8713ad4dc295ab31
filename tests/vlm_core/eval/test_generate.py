"""greedy_generate with the KV cache against a slow reference that re-runs the full forward each step."""

from __future__ import annotations

import pytest
import torch

from vlm_core.eval.generate import greedy_generate
from vlm_core.model.config import ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM, pack_prompts
from vlm_core.types import TokenizedSample

VOCAB = 50
IMAGE_TOKEN = 3
P = 4  # image 32, patch 16


def make_model() -> VLM:
    # init_std 0.3: with the default 0.02 a 2-layer random model emits nearly the same argmax at every
    # step, and the equivalence check would not exercise the cache. At 0.3 the tokens vary (checked below).
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=16, dim=32, layers=2, heads=2),
        dim=32,
        layers=2,
        heads=4,
        kv_heads=2,
        init_std=0.3,
    )
    return VLM(cfg, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)


def make_prompt(generator: torch.Generator, spans: list[tuple[str, int]]) -> TokenizedSample:
    ids, groups = [], []
    num_images = 0
    for kind, n in spans:
        if kind == "t":
            ids += torch.randint(IMAGE_TOKEN + 1, VOCAB, (n,), generator=generator).tolist()
            groups += [0] * n
        else:
            num_images += 1
            ids += [IMAGE_TOKEN] * P
            groups += [num_images] * P
    return TokenizedSample(
        input_ids=torch.tensor(ids),
        loss_mask=torch.zeros(len(ids), dtype=torch.bool),
        bidir_group=torch.tensor(groups, dtype=torch.int32),
        images=torch.randn(num_images, 3, 32, 32, generator=generator),
    )


def make_prompts() -> list[TokenizedSample]:
    generator = torch.Generator().manual_seed(1)
    layouts = [
        [("t", 2), ("i", 1), ("t", 5)],
        [("t", 1)],
        [("i", 1), ("i", 1), ("t", 3)],
        [("t", 17)],
        [("i", 1), ("t", 1)],
    ]
    return [make_prompt(generator, spans) for spans in layouts]


def slow_greedy(model: VLM, prompt: TokenizedSample, max_new_tokens: int, eos_id: int) -> list[int]:
    """Re-run the full packed forward on the growing sequence at every step (no cache)."""
    ids, groups = prompt.input_ids.clone(), prompt.bidir_group.clone()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            sample = TokenizedSample(ids, torch.zeros_like(ids, dtype=torch.bool), groups, prompt.images)
            logits = model(pack_prompts([sample]))[-1]
            logits[IMAGE_TOKEN] = float("-inf")
            token = int(logits.argmax())
            if token == eos_id:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([token])])
            groups = torch.cat([groups, torch.zeros(1, dtype=torch.int32)])
    return out


NEVER = VOCAB + 1  # an eos id the model cannot emit


@pytest.mark.parametrize("batch_size", [64, 2], ids=["one_batch", "batches_of_2"])
def test_cached_generation_equals_full_forward_generation(batch_size):
    model = make_model().eval()
    prompts = make_prompts()
    got = greedy_generate(model, prompts, max_new_tokens=8, eos_id=NEVER, batch_size=batch_size)
    want = [slow_greedy(model, prompt, 8, NEVER) for prompt in prompts]
    assert got == want
    assert all(len(tokens) == 8 for tokens in got)
    assert len({token for tokens in got for token in tokens}) >= 5, f"outputs barely vary: {got}"


def test_sequences_stop_at_eos_independently():
    model = make_model().eval()
    prompts = make_prompts()
    free = greedy_generate(model, prompts, max_new_tokens=8, eos_id=NEVER)
    eos = free[0][3]  # a token prompt 0 emits at step 3; other prompts stop wherever they emit it
    got = greedy_generate(model, prompts, max_new_tokens=8, eos_id=eos)
    want = [slow_greedy(model, prompt, 8, eos) for prompt in prompts]
    assert got == want
    assert got[0] == free[0][: free[0].index(eos)]
    assert len({len(tokens) for tokens in got}) >= 2, f"all sequences stopped together: {got}"
    assert all(eos not in tokens for tokens in got)


def test_zero_new_tokens_and_empty_prompt_list():
    model = make_model()
    assert greedy_generate(model, make_prompts(), max_new_tokens=0, eos_id=0) == [[]] * 5
    assert greedy_generate(model, [], max_new_tokens=4, eos_id=0) == []


def test_training_flag_is_restored():
    model = make_model().train()
    greedy_generate(model, make_prompts()[:2], max_new_tokens=2, eos_id=NEVER)
    assert model.training


@pytest.mark.parametrize("kwargs, message", [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(batch_size=0), "batch_size")])
def test_invalid_arguments(kwargs, message):
    arguments = dict(max_new_tokens=2, eos_id=0, batch_size=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        greedy_generate(make_model(), make_prompts(), **arguments)
