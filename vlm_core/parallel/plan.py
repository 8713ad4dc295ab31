"""The tensor-parallel plan of the VLM: which layer splits how, applied from outside the model code.

``parallelize(model, env)`` replaces, in place, each layer the plan names with the megatron-core layer of
:mod:`vlm_core.parallel.layers`, cut from the layer's current weights, and gives every attention module
its share of the heads. The model code stays single-device code: it calls ``self.q_proj(x)`` and views the
result as ``(N, self.heads, self.head_dim)``, and under TP=n both are simply n times smaller.

Megatron's pairing, per block: a column-parallel layer splits the output features, the nonlinearity or the
attention runs on the local slice (whole heads), and a row-parallel layer sums the slices back.

    vision.blocks.*.attention.qkv     column, stride 3 (fused q|k|v rows: each rank takes its heads of each)
    vision.blocks.*.attention.proj    row
    vision.blocks.*.mlp.fc1 / fc2     column / row
    projector.fc1 / fc2               column / row
    decoder.embed_tokens              vocab-parallel embedding (the tied LM head reads its rows)
    decoder.layers.*.attention.q_proj, k_proj, v_proj   column (Hq / tp query heads, Hkv / tp KV heads)
    decoder.layers.*.attention.o_proj                   row
    decoder.layers.*.mlp.gate_proj, up_proj / down_proj column / row
    decoder.lm_head (untied only)     column over the padded vocabulary, no input-gradient reduce
                                      (vlm_core.parallel.loss reduces it, as for the tied head)

Everything else (norms, the patch embedding, position tables, row-parallel biases) is replicated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from vlm_core.parallel.env import ParallelEnv
from vlm_core.parallel.reshard import Layout, ShardSpec

log = logging.getLogger(__name__)

COLUMN, ROW, VOCAB, VOCAB_HEAD = "column", "row", "vocab", "vocab_head"


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is split: ``style`` is column, row, vocab (embedding) or vocab_head (untied LM head)."""

    style: str
    stride: int = 1


def tensor_parallel_plan(model: nn.Module) -> dict[str, LayerPlan]:
    """Module name -> how it splits, for a :class:`vlm_core.model.vlm.VLM`."""
    plan: dict[str, LayerPlan] = {}
    for index in range(len(model.vision.blocks)):
        block = f"vision.blocks.{index}"
        plan[f"{block}.attention.qkv"] = LayerPlan(COLUMN, stride=3)
        plan[f"{block}.attention.proj"] = LayerPlan(ROW)
        plan[f"{block}.mlp.fc1"] = LayerPlan(COLUMN)
        plan[f"{block}.mlp.fc2"] = LayerPlan(ROW)
    plan["projector.fc1"] = LayerPlan(COLUMN)
    plan["projector.fc2"] = LayerPlan(ROW)
    plan["decoder.embed_tokens"] = LayerPlan(VOCAB)
    for index in range(len(model.decoder.layers)):
        block = f"decoder.layers.{index}"
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"{block}.attention.{name}"] = LayerPlan(COLUMN)
        plan[f"{block}.attention.o_proj"] = LayerPlan(ROW)
        plan[f"{block}.mlp.gate_proj"] = LayerPlan(COLUMN)
        plan[f"{block}.mlp.up_proj"] = LayerPlan(COLUMN)
        plan[f"{block}.mlp.down_proj"] = LayerPlan(ROW)
    if model.decoder.lm_head is not None:
        plan["decoder.lm_head"] = LayerPlan(VOCAB_HEAD)
    return plan


def shard_layout(model: nn.Module) -> Layout:
    """Parameter name -> ShardSpec for every split parameter of the plan (the checkpoint resharding table)."""
    layout: Layout = {}
    for name, layer in tensor_parallel_plan(model).items():
        if layer.style == COLUMN:
            layout[f"{name}.weight"] = ShardSpec(dim=0, stride=layer.stride)
            layout[f"{name}.bias"] = ShardSpec(dim=0, stride=layer.stride)
        elif layer.style == ROW:
            layout[f"{name}.weight"] = ShardSpec(dim=1)
        else:  # vocab-parallel embedding or LM head
            layout[f"{name}.weight"] = ShardSpec(dim=0, vocab=True)
    params = dict(model.named_parameters())
    return {name: spec for name, spec in layout.items() if name in params}


def check_divisible(model: nn.Module, tp_size: int) -> None:
    """Raise ValueError naming the config field when ``tp_size`` does not split the model evenly."""
    cfg = model.cfg
    checks = {
        "model.heads": cfg.heads,
        "model.kv_heads": cfg.kv_heads,
        "model.mlp_hidden": cfg.mlp_hidden,
        "model.projector_hidden": cfg.projector_hidden,
        "model.vision.heads": cfg.vision.heads,
        "model.vision.mlp_hidden": cfg.vision.mlp_hidden,
    }
    bad = {name: value for name, value in checks.items() if value % tp_size}
    if bad:
        detail = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise ValueError(
            f"parallel.tensor_parallel={tp_size} does not divide {detail}: each rank takes whole heads and an equal "
            "slice of every hidden width (KV heads are not replicated, so tensor_parallel <= model.kv_heads)"
        )


def parallelize(model: nn.Module, env: ParallelEnv) -> Layout:
    """Apply the plan to ``model`` in place for this rank; return its :func:`shard_layout`.

    Every rank must call it with the same weights (the job broadcasts them from rank 0 first). A world
    with ``env.tp_size == 1`` leaves the model untouched.
    """
    if not env.tensor_parallel:
        return {}
    # imports megatron-core (seconds), only when tensor parallelism is on
    from vlm_core.parallel import layers

    tp_rank, tp_size = env.tp_rank, env.tp_size
    check_divisible(model, tp_size)
    layout = shard_layout(model)
    for name, layer in tensor_parallel_plan(model).items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        source = getattr(parent, attribute)
        if layer.style == COLUMN:
            replacement = layers.ColumnParallelLinear.from_linear(source, tp_rank, tp_size, stride=layer.stride)
        elif layer.style == ROW:
            replacement = layers.RowParallelLinear.from_linear(source, tp_rank, tp_size)
        elif layer.style == VOCAB:
            replacement = layers.VocabParallelEmbedding.from_embedding(source, tp_rank, tp_size)
        else:
            replacement = layers.ColumnParallelLinear.from_linear(
                source, tp_rank, tp_size, reduce_input_grad=False, vocab=True
            )
        setattr(parent, attribute, replacement)  # same key in _modules: parameter order is unchanged
    for block in model.vision.blocks:
        block.attention.heads //= tp_size
    for block in model.decoder.layers:
        block.attention.heads //= tp_size
        block.attention.kv_heads //= tp_size
    # The decoder resolves its fused kernels once per device and caches the choice; the fused projector and
    # LM-head kernels need plain nn.Linear/nn.Embedding layers, so make it resolve again for the new layers.
    model.decoder._kernel_device = None
    log.info("tensor parallel: %d parameters split over %d ranks (this is TP rank %d)", len(layout), tp_size, tp_rank)
    return layout


def gather_model_state(model: nn.Module, layout: Layout, env: ParallelEnv) -> dict:
    """The single-device state dict of a parallelized model, on every rank (all ranks of the TP group call).

    For evaluation, export or a merged checkpoint: the shards travel once through ``all_gather_object``
    (CPU tensors), then :func:`vlm_core.parallel.reshard.merge_states` glues them.
    """
    from vlm_core.parallel.collectives import gather_objects
    from vlm_core.parallel.reshard import merge_states

    local = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if not env.tensor_parallel:
        return local
    shards = gather_objects(local, env, group=env.tp_group())
    return merge_states(shards, layout, model.decoder.embed_tokens.vocab_size)
