"""Helpers shared by the HF tests: random weights everywhere, and a ChatML tokenizer without <image>.

Every weight is drawn afresh, norms and biases included (norm weights 1 + 0.2 N(0, 1), everything else
0.1 N(0, 1)): with transformers' init (norm weights 1, biases 0) a mapping that swapped two norms or
dropped a bias would still pass.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32
PATCH = 16
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [
    "what color is the circle", "how many squares are there in the picture", "is there a red star",
    "yes", "no", "the word is cat", "blue green red yellow purple", "a small red circle left of a big square",
] * 4


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:  # biases included
                param.copy_(0.1 * noise)
    return model.eval()


def save_chatml_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer with a ChatML template and no <image> token; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML,
    )
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)
