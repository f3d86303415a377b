"""Tree attention inside vLLM's attention layers.

BASTION verifies every request's tree in the same forward as the rest of the
batch. The target's attention layers keep their backend (CPU_ATTN on CPU,
FlashAttention / Triton on GPU), which computes every row causally and writes
the KV cache as usual; that is exact for prefill rows, plain decode rows and
every tree root. For the draft-node rows the result is then replaced by tree
attention: the node sees the request's cached prefix plus its ancestors in
the tree (ancestor bitmask), at its own depth position (RoPE was already
applied with position root + depth).

The class of each target layer's `impl` is swapped at load time for a
subclass of itself that adds this step (`install_tree_attention`), so the
backend, its metadata builder and every isinstance check stay vLLM's own;
the drafter's layers are untouched. The per-step tree description reaches the
layers on the attention metadata object (`metadata.bastion_tree`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_bastion.core.attention import tree_attention_reference
from vllm_bastion.kv_layout import PagedKVLayout, probe_layout

METADATA_ATTR = "bastion_tree"


@dataclass
class TreeAttentionStep:
    """What the attention layers need to know about this step's trees."""

    # per tree request (only requests with >= 1 draft node)
    req_indices: list[int]  # row of the request in the batch / block table
    row_starts: list[int]  # row of the request's root in the flattened batch
    num_nodes: list[int]  # draft nodes (root excluded)
    prefix_lens: list[int]  # cached tokens before the root (= root position)
    allowed: list[torch.Tensor]  # [n, 1 + n] bool, node i may see tree column j
    block_size: int
    num_blocks: int
    layouts: dict = field(default_factory=dict)

    def layout_for(self, impl, layer, kv_cache) -> PagedKVLayout:
        key = id(kv_cache.untyped_storage()), kv_cache.shape, kv_cache.stride()
        lay = self.layouts.get(key)
        if lay is None:
            lay = probe_layout(impl, layer, kv_cache, self.block_size, self.num_blocks)
            self.layouts[key] = lay
        return lay


def _block_table_of(metadata) -> torch.Tensor:
    bt = getattr(metadata, "block_table", None)
    if bt is None:
        bt = getattr(metadata, "block_table_tensor", None)
    if bt is None:
        raise RuntimeError(
            f"BASTION tree attention cannot find the block table on {type(metadata).__name__}"
        )
    return bt


def tree_attention_fixup(impl, layer, query, key, value, kv_cache, metadata, output, step):
    """Overwrite the draft-node rows of `output` with exact tree attention."""
    layout = step.layout_for(impl, layer, kv_cache)
    block_table = _block_table_of(metadata)
    bs = step.block_size
    out3 = output.view(output.shape[0], impl.num_heads, -1)
    for r, start, n, c, allowed in zip(
        step.req_indices, step.row_starts, step.num_nodes, step.prefix_lens, step.allowed
    ):
        if c > 0:
            pos = torch.arange(c, device=kv_cache.device)
            slots = block_table[r, pos // bs].long() * bs + pos % bs
            kp = layout.gather(kv_cache, slots, 0)
            vp = layout.gather(kv_cache, slots, 1)
        else:
            kp = key.new_empty((0,) + tuple(key.shape[1:]))
            vp = value.new_empty((0,) + tuple(value.shape[1:]))
        rows = slice(start + 1, start + 1 + n)
        tree = slice(start, start + 1 + n)
        out3[rows] = tree_attention_reference(
            query[rows], kp.to(query.dtype), vp.to(query.dtype), key[tree], value[tree],
            allowed, impl.scale,
        ).to(out3.dtype)


_CLASSES: dict[type, type] = {}


def tree_impl_class(cls: type) -> type:
    """A subclass of the backend impl class whose forward adds tree attention.

    Single inheritance with empty __slots__, so an existing impl object can
    switch to it (`obj.__class__ = ...`) keeping every attribute.
    """
    sub = _CLASSES.get(cls)
    if sub is not None:
        return sub

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = cls.forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        step = getattr(attn_metadata, METADATA_ATTR, None) if attn_metadata is not None else None
        if step is not None and step.req_indices:
            tree_attention_fixup(self, layer, query, key, value, kv_cache, attn_metadata, output, step)
        return out

    sub = type(
        f"BastionTree{cls.__name__}",
        (cls,),
        {"__slots__": (), "forward": forward, "__bastion_tree__": True, "__module__": __name__},
    )
    _CLASSES[cls] = sub
    return sub


def install_tree_attention(model: torch.nn.Module) -> list[str]:
    """Swap the impl class of every attention layer of the target model.

    Returns the layer names. Refuses attention features the tree path does
    not reproduce (sliding window, ALiBi, soft-capping, sinks).
    """
    from vllm.model_executor.layers.attention import Attention

    names = []
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        impl = module.impl
        problems = []
        sw = getattr(impl, "sliding_window", None)
        if sw not in (None, -1) and not (isinstance(sw, tuple) and tuple(sw) == (-1, -1)):
            problems.append("sliding-window attention")
        if getattr(impl, "alibi_slopes", None) is not None:
            problems.append("ALiBi")
        if getattr(impl, "logits_soft_cap", None) not in (None, 0, 0.0):
            problems.append("logit soft-capping")
        if getattr(impl, "sinks", None) is not None:
            problems.append("attention sinks")
        if problems:
            raise ValueError(
                f"BASTION tree attention does not support {', '.join(problems)} "
                f"(layer {module.layer_name}); use a target without it."
            )
        if not getattr(type(impl), "__bastion_tree__", False):
            impl.__class__ = tree_impl_class(type(impl))
        names.append(module.layer_name)
    if not names:
        raise ValueError("BASTION found no attention layers in the target model")
    return names
