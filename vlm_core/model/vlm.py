"""The LLaVA-style VLM: vision tower -> projector -> decoder over packed batches, plus cached decoding."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm_core.kernels.fused_projector import (
    fusable_projector_problem,
    projector_module_scatter,
)
from vlm_core.model.config import ModelConfig
from vlm_core.model.decoder import Decoder, RMSNorm
from vlm_core.model.kv_cache import KVCache
from vlm_core.model.projector import Projector
from vlm_core.model.vision import VisionTower
from vlm_core.types import IGNORE_INDEX, PackedBatch, TokenizedSample


class VLM(nn.Module):
    """Images become P decoder tokens each, written over the ``image_token_id`` placeholders.

    Parts (training freezes and unfreezes them by these attribute names):
        vision:    VisionTower, images [N_img, C, H, W] -> [N_img, P, D_v]
        projector: Projector, [.., D_v] -> [.., D] ((LayerNorm,) fc1, GELU, fc2)
        decoder:   Decoder, packed embeddings [total, D] -> hidden [total, D] -> logits [total, V]
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, image_token_id: int) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"VLM: vocab_size={vocab_size}; need at least 2 tokens")
        if not 0 <= image_token_id < vocab_size:
            raise ValueError(f"VLM: image_token_id={image_token_id} is outside the vocabulary [0, {vocab_size})")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.vision.dim, cfg.projector_hidden, cfg.dim, layer_norm=cfg.projector_layer_norm)
        self.decoder = Decoder(cfg, vocab_size)
        self._init_weights()

    @property
    def num_image_tokens(self) -> int:
        """P: decoder tokens per image."""
        return self.cfg.vision.num_patches

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.normal_(self.vision.position_embedding, mean=0.0, std=std)
        if self.vision.class_embedding is not None:
            nn.init.normal_(self.vision.class_embedding, mean=0.0, std=std)
        # GPT-2 (Radford et al. 2019, sec. 2.3): every block adds two branches (attention, MLP) to the
        # residual stream, so at init its variance grows with the 2 * layers branch outputs summed into
        # it. Drawing each branch's output projection with std / sqrt(2 * layers) keeps the stream's
        # variance at that of a single branch, whatever the depth.
        for block in self.vision.blocks:
            for projection in (block.attention.proj, block.mlp.fc2):
                nn.init.normal_(projection.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.vision.layers))
        for block in self.decoder.layers:
            for projection in (block.attention.o_proj, block.mlp.down_proj):
                nn.init.normal_(projection.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.layers))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [N_img, C, H, W] -> projected image tokens [N_img, P, D]."""
        return self.projector(self.vision(images))

    def select_kernels(self, device: torch.device) -> dict[str, str]:
        """The fused kernel of each op on ``device`` (Decoder.select_kernels, once per device), the projector's
        included: its problem must reach the first resolution, which is cached."""
        return self.decoder.select_kernels(device, {"projector": fusable_projector_problem(self.projector)})

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Token embeddings [total, D], image placeholder rows replaced by image tokens.

        input_ids [total] int64 must hold exactly N_img * P ``image_token_id`` entries; they are
        filled in order with the P tokens of image 0, then image 1, and so on. One host sync finds
        their rows (and so checks the count), before any GPU work of the forward is queued: a sync
        after the vision tower would hold the host until the tower finished.
        """
        is_image = input_ids == self.image_token_id  # [total]
        rows = is_image.nonzero().squeeze(1)  # [N_img * P], increasing: masked_scatter's order
        found = rows.numel()
        embeds = self.decoder.embed_tokens(input_ids)  # [total, D]
        num_images = images.shape[0]
        expected = num_images * self.num_image_tokens
        if found != expected:
            raise ValueError(
                f"VLM: input_ids hold {found} image tokens (id {self.image_token_id}), but {num_images} images "
                f"x {self.num_image_tokens} tokens per image = {expected}; each <image> must expand to exactly "
                f"P={self.num_image_tokens} tokens and every image in the batch must appear in input_ids"
            )
        kernels = self.select_kernels(embeds.device)  # before the text-only return: it logs the choice
        if num_images == 0:
            return embeds
        if kernels["projector"] == "triton":  # one fused op: projector GEMMs with the scatter in the store
            features = self.vision(images).flatten(0, 1)  # [N_img * P, D_v]
            return projector_module_scatter(self.projector, features, embeds, rows)
        image_tokens = self.encode_images(images).to(embeds.dtype)  # [N_img, P, D]
        image_tokens = image_tokens.reshape(expected, self.cfg.dim)  # [N_img * P, D]
        return embeds.masked_scatter(is_image[:, None], image_tokens)  # [total, D], filled in row order

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """Final-normed decoder states [total, D] of a packed batch (for a chunked loss).

        Every host read of the forward happens before its first GPU work is queued (the packing's checks and
        attention windows here, the image rows in ``embed_inputs``), so the host can run ahead of the device.
        """
        self.decoder.prepare(batch.cu_seqlens, batch.max_seqlen, batch.bidir_group, batch.input_ids.numel())
        embeds = self.embed_inputs(batch.input_ids, batch.images)
        return self.decoder(embeds, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, batch.bidir_group)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Logits [total, V] of a packed batch (see PackedBatch for the attention contract)."""
        return self.decoder.logits(self.hidden_states(batch))

    @torch.no_grad()
    def prefill(self, prompts: list[TokenizedSample], max_new_tokens: int = 0) -> tuple[torch.Tensor, KVCache]:
        """Run B prompts once, packed back to back, and cache every layer's keys and values.

        Returns the logits of each prompt's last token [B, V] and a KVCache with room for
        ``max_new_tokens`` more tokens per prompt (it grows past that on demand).
        """
        if not prompts:
            raise ValueError("VLM.prefill: no prompts")
        weight = self.decoder.embed_tokens.weight
        batch = pack_prompts(prompts).to(weight.device)
        lengths = [prompt.input_ids.numel() for prompt in prompts]
        cache = KVCache(
            layers=self.cfg.layers,
            lengths=lengths,
            kv_heads=self.cfg.kv_heads,
            head_dim=self.cfg.head_dim,
            capacity=max(lengths) + max_new_tokens,
            dtype=weight.dtype,
            device=weight.device,
        )
        embeds = self.embed_inputs(batch.input_ids, batch.images)
        hidden = self.decoder(embeds, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, batch.bidir_group, cache)
        last = hidden[batch.cu_seqlens[1:].long() - 1]  # [B, D]
        return self.decoder.logits(last), cache

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append one text token per cached sequence: token_ids [B] int64 -> next-token logits [B, V].

        Each token sits at position = its sequence's current length and attends causally to the
        whole cached sequence. It must not be ``image_token_id`` (an image token needs its image).
        """
        if token_ids.shape != (cache.batch_size,):
            raise ValueError(
                f"VLM.decode_step: token_ids has shape {tuple(token_ids.shape)}, expected ({cache.batch_size},), "
                "one token per cached sequence"
            )
        hidden = self.decoder.decode(self.decoder.embed_tokens(token_ids), cache)  # [B, D]
        return self.decoder.logits(hidden)


def pack_prompts(prompts: list[TokenizedSample]) -> PackedBatch:
    """Pack prompts back to back in one row, no padding, for inference.

    Positions restart per prompt; each prompt's images get batch-unique bidir ids (its k-th image
    becomes k + the number of images before it). Labels are all IGNORE_INDEX.
    """
    input_ids, positions, groups, images = [], [], [], []
    cu_seqlens = [0]
    images_before = 0
    for index, prompt in enumerate(prompts):
        length = prompt.input_ids.numel()
        if length == 0:
            raise ValueError(f"pack_prompts: prompt {index} ({prompt.sample_id!r}) has no tokens")
        if prompt.bidir_group.shape != prompt.input_ids.shape:
            raise ValueError(
                f"pack_prompts: prompt {index} ({prompt.sample_id!r}) has {length} tokens but bidir_group "
                f"of shape {tuple(prompt.bidir_group.shape)}"
            )
        group = prompt.bidir_group.to(torch.int32)
        groups.append(torch.where(group > 0, group + images_before, group))
        input_ids.append(prompt.input_ids.long())
        positions.append(torch.arange(length))
        if prompt.images.numel():
            images.append(prompt.images)
            images_before += prompt.images.shape[0]
        cu_seqlens.append(cu_seqlens[-1] + length)
    total = cu_seqlens[-1]
    image_batch = torch.cat(images) if images else torch.zeros(0, 1, 1, 1)
    return PackedBatch(
        input_ids=torch.cat(input_ids),
        position_ids=torch.cat(positions),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        max_seqlen=max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])),
        bidir_group=torch.cat(groups),
        labels=torch.full((total,), IGNORE_INDEX, dtype=torch.int64),
        images=image_batch,
        rows=1,
        row_len=total,
        num_samples=len(prompts),
        num_real_tokens=total,
    )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level part (``vision``, ``projector``, ``decoder`` for a VLM) and ``total``.

    Shared tensors (a tied LM head) are counted once.
    """
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
