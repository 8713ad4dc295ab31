"""The supervised fine-tuning dataset: validated ``Sample``s in, ``TokenizedSample``s out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlm_core.data.errors import DataError
from vlm_core.data.image import ImageProcessor
from vlm_core.data.tokenizer import ChatEncoder, EncodedChat
from vlm_core.types import Sample, TokenizedSample

# 50k images at 64 px are 50_000 * 3 * 64 * 64 bytes = 614 MB as uint8 (2.5 GB as float32): the whole
# built-in world fits, while a real corpus of large images stops caching instead of exhausting memory.
DEFAULT_MAX_CACHED_IMAGES = 50_000


class SFTDataset:
    """Map-style dataset of conversations about images, tokenized on access.

    ``dataset[i]`` encodes sample i with the chat encoder and decodes its images. Both are cached in memory:

    - images as resized uint8 (``[3, S, S]``, a quarter of float32) keyed by path, up to
      ``max_cached_images``; later images are decoded on every access.
    - with ``cache_tokens``, each sample's encoding (ids, mask, groups: 13 bytes per token, ~1 KB for a
      world sample). Encoding renders the chat template once per turn and costs ~0.5 ms for a 6-turn
      sample on one core, which would otherwise be paid again every epoch.

    The caches live in the process that reads, so with DataLoader workers each worker holds its own.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        encoder: ChatEncoder,
        processor: ImageProcessor,
        cache_images: bool = True,
        max_cached_images: int = DEFAULT_MAX_CACHED_IMAGES,
        cache_tokens: bool = True,
    ) -> None:
        self.samples = samples
        self.encoder = encoder
        self.processor = processor
        self.cache_images = cache_images
        self.max_cached_images = max_cached_images
        self.cache_tokens = cache_tokens
        self._image_cache: dict[Path, torch.Tensor] = {}  # path -> [3, S, S] uint8
        self._token_cache: dict[int, EncodedChat] = {}  # sample index -> encoding
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> TokenizedSample:
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"sample index {index} out of range for a dataset of {len(self.samples)}")
        index %= len(self.samples)  # one cache key per sample, whichever sign the index had
        sample = self.samples[index]
        input_ids, loss_mask, bidir_group = self._encoded(index)
        # Copies, so that a consumer editing a sample in place cannot corrupt the cache (~1 us each).
        return TokenizedSample(
            input_ids=input_ids.clone(),  # [T]
            loss_mask=loss_mask.clone(),  # [T]
            bidir_group=bidir_group.clone(),  # [T]
            images=self._images(sample),  # [N_img, 3, S, S]
            sample_id=sample.id,
        )

    @property
    def lengths(self) -> np.ndarray:
        """``[len(self)]`` int64 token count of every sample (image tokens included), computed once.

        Only the text is tokenized (no image is decoded), with the same segments as ``__getitem__``, so
        ``lengths[i] == len(self[i].input_ids)`` exactly; a packing plan built on it never overflows a row.
        With ``cache_tokens`` the encodings are kept, so the first epoch does not encode again.
        """
        if self._lengths is None:
            if self.cache_tokens:  # encode fully: the cost is the same, and later accesses reuse it
                counts = (len(self._encoded(index).input_ids) for index in range(len(self.samples)))
            else:
                counts = (self._count(sample) for sample in self.samples)
            lengths = np.fromiter(counts, dtype=np.int64, count=len(self.samples))
            lengths.setflags(write=False)
            self._lengths = lengths
        return self._lengths

    def _encoded(self, index: int) -> EncodedChat:
        cached = self._token_cache.get(index)
        if cached is not None:
            return cached
        sample = self.samples[index]
        try:
            encoded = self.encoder.encode(sample.turns)
        except ValueError as exc:
            raise DataError(f"{sample.source}: record {sample.id}: cannot encode the conversation: {exc}") from exc
        num_groups = int(encoded.bidir_group.max()) if encoded.bidir_group.numel() else 0
        if num_groups != len(sample.image_paths):
            raise DataError(
                f"{sample.source}: record {sample.id}: {num_groups} <image> placeholder(s) in the conversation but "
                f"{len(sample.image_paths)} image path(s); load records with load_llava, which checks this"
            )
        if self.cache_tokens:
            self._token_cache[index] = encoded
        return encoded

    def _count(self, sample: Sample) -> int:
        try:
            return self.encoder.num_tokens(sample.turns)
        except ValueError as exc:
            raise DataError(f"{sample.source}: record {sample.id}: cannot encode the conversation: {exc}") from exc

    def _images(self, sample: Sample) -> torch.Tensor:
        size = self.processor.image_size
        if not sample.image_paths:
            return torch.empty(0, 3, size, size, dtype=torch.float32)  # [0, 3, S, S]
        pixels = torch.stack([self._pixels(sample, path) for path in sample.image_paths])  # [N_img, 3, S, S] uint8
        return self.processor.normalize(pixels)  # [N_img, 3, S, S] float32

    def _pixels(self, sample: Sample, path: Path) -> torch.Tensor:
        cached = self._image_cache.get(path)
        if cached is not None:
            return cached
        try:
            pixels = self.processor.load_uint8(path)  # [3, S, S] uint8
        except DataError as exc:
            raise DataError(f"{sample.source}: record {sample.id}: {exc}") from exc
        if self.cache_images and len(self._image_cache) < self.max_cached_images:
            self._image_cache[path] = pixels
        return pixels
