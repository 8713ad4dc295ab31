"""The language decoder: RMSNorm, rotary positions, grouped-query attention over packed batches, SwiGLU."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlm_core.kernels import packed_attention, prepare_packed_attention, resolve_attn_impl, resolve_kernel_impls
from vlm_core.kernels.rmsnorm import MAX_DIM as RMSNORM_MAX_DIM
from vlm_core.kernels.rmsnorm import rmsnorm_triton
from vlm_core.kernels.rope import MAX_HEAD_DIM as ROPE_MAX_HEAD_DIM
from vlm_core.kernels.rope import rope_triton_
from vlm_core.kernels.swiglu import swiglu_triton
from vlm_core.model.config import ModelConfig
from vlm_core.model.kv_cache import KVCache, decode_attention


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in fp32 and returned in x's dtype."""

    kernel_impl = "reference"  # "triton": the fused kernel (vlm_core/kernels/rmsnorm.py); set by Decoder.select_kernels

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_impl == "triton":
            return rmsnorm_triton(x, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings (RoPE, rotate-half layout as in Llama).

    Tables are fp32, computed in float64, and kept as plain attributes rather than buffers: a buffer
    would be cast to bf16 by ``model.to(torch.bfloat16)``, and bf16 angles lose the position
    information past a few hundred tokens. They are not part of the state dict, grow on demand
    (doubling) and are rebuilt when the device changes.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._cos: Optional[torch.Tensor] = None  # [S_table, Dh]
        self._sin: Optional[torch.Tensor] = None

    def _tables(self, num_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < num_positions or self._cos.device != device:
            size = max(num_positions, 2 * self._cos.shape[0] if self._cos is not None else 256)
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim  # [Dh/2]
            inverse_frequency = self.theta**-exponents  # [Dh/2]
            angles = torch.arange(size, dtype=torch.float64)[:, None] * inverse_frequency[None, :]  # [S, Dh/2]
            angles = torch.cat([angles, angles], dim=-1)  # [S, Dh]
            self._cos = angles.cos().float().to(device)
            self._sin = angles.sin().float().to(device)
        return self._cos, self._sin

    def forward(self, position_ids: torch.Tensor, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [N] int64, every value < num_positions -> (cos, sin), each [N, Dh] fp32.

        ``num_positions`` is a host-side bound (max_seqlen for a packed batch) so that growing the
        table never reads the device; a position >= num_positions past the table is an index error.
        """
        cos, sin = self._tables(num_positions, position_ids.device)
        return cos[position_ids], sin[position_ids]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [N, H, Dh] by per-token angles cos, sin: [N, Dh]; math in fp32, result in x's dtype.

    Dimension pairs are (d, d + Dh/2). The dot product of two rotated vectors depends only on the
    difference of their positions.
    """
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)  # each [N, H, Dh/2]
    rotated = torch.cat([-second, first], dim=-1)  # [N, H, Dh]
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention: Hq query heads share Hkv key/value heads.

    No biases by default; ``cfg.attention_qkv_bias`` (Qwen2) and ``cfg.attention_out_bias`` add them.
    """

    kernel_impl = "reference"  # RoPE: "triton" rotates q, k in place (kernels/rope.py); set by Decoder.select_kernels

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index  # which KV-cache layer this module reads and writes
        self.heads = cfg.heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.attn_impl = cfg.attn_impl  # the Decoder replaces it by the impl resolved for its device
        qkv_bias = cfg.attention_qkv_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        # residual output projection
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=cfg.attention_out_bias)

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> post-RoPE q [N, Hq, Dh], k [N, Hkv, Dh], and v [N, Hkv, Dh]."""
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.heads, self.head_dim)  # [N, Hq, Dh]
        k = self.k_proj(x).view(N, self.kv_heads, self.head_dim)  # [N, Hkv, Dh]
        v = self.v_proj(x).view(N, self.kv_heads, self.head_dim)  # [N, Hkv, Dh]
        if self.kernel_impl == "triton":  # rotates the projections' outputs in place (vlm_core/kernels/rope.py)
            q, k = rope_triton_(q, k, cos, sin)
            return q, k, v
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        bidir_group: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """x [total, D] of a packed batch -> [total, D]. With ``cache``, also store this layer's k, v."""
        total = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            cache.write_packed(self.layer_index, k, v)
        out = packed_attention(q, k, v, cu_seqlens, max_seqlen, bidir_group, impl=self.attn_impl)  # [total, Hq, Dh]
        return self.o_proj(out.reshape(total, self.heads * self.head_dim))  # [total, D]

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x [B, D], one new token per cached sequence -> [B, D]; appends its k, v to the cache."""
        B = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)  # [B, Hq, Dh], [B, Hkv, Dh], [B, Hkv, Dh]
        cache.append(self.layer_index, k, v)
        out = decode_attention(
            q, cache.keys[self.layer_index], cache.values[self.layer_index], cache.lengths + 1
        )  # [B, Hq, Dh]
        return self.o_proj(out.reshape(B, self.heads * self.head_dim))  # [B, D]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), hidden width cfg.mlp_hidden; no biases."""

    kernel_impl = "reference"  # "triton": the fused gate (vlm_core/kernels/swiglu.py); set by Decoder.select_kernels

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)  # residual output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_impl == "triton":
            return self.down_proj(swiglu_triton(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_index)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        bidir_group: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen, bidir_group, cache)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = x + self.attention.decode(self.attention_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


def _indexed(device: torch.device | str) -> torch.device:
    """``device`` with the current CUDA index filled in: "cuda" and the "cuda:0" of tensors are one device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Decoder(nn.Module):
    """Token embedding, ``cfg.layers`` blocks, final RMSNorm, and the LM head.

    With ``cfg.tie_embeddings`` the LM head is the embedding matrix itself (``lm_head`` is None), so
    the state dict holds the matrix once. With ``cfg.image_attention == "causal"`` the image spans of a
    packed batch are ignored and attention is causal within each segment.
    """

    _kernel_device: Optional[torch.device] = None  # the device the fused kernels were resolved for
    kernel_impls: dict[str, str] = dict.fromkeys(("rmsnorm", "swiglu", "rope", "projector", "linear_cross_entropy"),
                                                 "reference")  # by op; replaced (never mutated) by select_kernels

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed_tokens = nn.Embedding(vocab_size, cfg.dim)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, index) for index in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, vocab_size, bias=False)
        self._attn_device: Optional[torch.device] = None  # the device the layers' attn_impl was resolved for

    def select_attention(self, device: torch.device) -> str:
        """Resolve ``cfg.attn_impl`` for ``device`` and hand it to every layer; once per device.

        Called by ``forward``; call it early to see the choice (and any fallback warning) in the logs
        before the first batch. Batches of a VLM carry bidirectional image spans and training needs
        gradients, so causal-only impls and FlexAttention on the CPU fall back (see resolve_attn_impl);
        with ``cfg.image_attention == "causal"`` the spans are ignored and causal-only impls can serve.
        """
        device = _indexed(device)
        if self._attn_device != device:
            needs_bidir = self.cfg.image_attention == "bidirectional"
            impl = resolve_attn_impl(self.cfg.attn_impl, device, needs_bidir=needs_bidir, needs_backward=True)
            for block in self.layers:
                block.attention.attn_impl = impl
            self._attn_device = device
        return self.layers[0].attention.attn_impl

    def select_kernels(self, device: torch.device, op_problems: Optional[dict[str, str]] = None) -> dict[str, str]:
        """Resolve ``cfg.kernel_impl`` for ``device`` into one impl per fused op and hand them to the layers.

        Once per device, like ``select_attention`` (later calls return the cached choice). ``op_problems``
        adds reasons an op of the enclosing model cannot be fused (the VLM passes its projector's); the
        decoder adds its own shape limits. Each fallback is logged (vlm_core.kernels.fused).
        """
        device = _indexed(device)
        if self._kernel_device != device:
            head = self.embed_tokens if self.lm_head is None else self.lm_head
            problems = {
                "rmsnorm": f"dim={self.cfg.dim} > {RMSNORM_MAX_DIM}" if self.cfg.dim > RMSNORM_MAX_DIM else "",
                "rope": f"head_dim={self.cfg.head_dim} > {ROPE_MAX_HEAD_DIM}" if self.cfg.head_dim > ROPE_MAX_HEAD_DIM else "",
                "linear_cross_entropy": "" if type(head) in (nn.Embedding, nn.Linear) else (
                    f"the LM head is {type(head).__name__}, not a plain nn.Embedding/nn.Linear"),
                **(op_problems or {}),
            }  # fmt: skip
            self.kernel_impls = resolve_kernel_impls(self.cfg.kernel_impl, device, problems)
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.kernel_impl = self.kernel_impls["rmsnorm"]
                elif isinstance(module, Attention):
                    module.kernel_impl = self.kernel_impls["rope"]
                elif isinstance(module, SwiGLU):
                    module.kernel_impl = self.kernel_impls["swiglu"]
            self._kernel_device = device
        return self.kernel_impls

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight [V, D] (the embedding matrix when tied), as ``logits`` uses it."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def prepare(
        self, cu_seqlens: torch.Tensor, max_seqlen: int, bidir_group: Optional[torch.Tensor], total: int
    ) -> None:
        """Take the packing's host reads (packed_attention's checks, the Triton kernel's windows) now, before
        the caller queues GPU work; ``forward`` on the same tensors then runs without a device sync."""
        impl = self.select_attention(cu_seqlens.device)
        prepare_packed_attention(cu_seqlens, max_seqlen, self._attention_groups(bidir_group), total, impl)

    def _attention_groups(self, bidir_group: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The image spans attention sees: none with ``cfg.image_attention == "causal"`` (LLaVA's mask)."""
        return None if self.cfg.image_attention == "causal" else bidir_group

    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        bidir_group: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Packed input embeddings [total, D] -> final-normed hidden states [total, D].

        position_ids [total] int64 restart at 0 per segment (so every value < max_seqlen);
        cu_seqlens, max_seqlen, bidir_group as in ``packed_attention``. With ``cache`` (built for
        these segments), every layer stores its post-RoPE keys and values.
        """
        self.select_attention(embeds.device)
        self.select_kernels(embeds.device)
        bidir_group = self._attention_groups(bidir_group)
        cos, sin = self.rotary(position_ids, max_seqlen)  # [total, Dh] each, shared by all layers
        x = embeds
        for block in self.layers:
            x = block(x, cos, sin, cu_seqlens, max_seqlen, bidir_group, cache)
        return self.norm(x)

    def decode(self, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per cached sequence: embeds [B, D] -> final-normed hidden [B, D].

        The token's position is its sequence's current length; the cache grows by one entry.
        """
        cache.ensure_capacity(cache.max_length + 1)
        cos, sin = self.rotary(cache.lengths, cache.max_length + 1)  # [B, Dh] each
        x = embeds
        for block in self.layers:
            x = block.decode(x, cos, sin, cache)
        cache.advance()
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

