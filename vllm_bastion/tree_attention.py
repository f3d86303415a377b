"""Tree attention inside vLLM's attention layers.

BASTION verifies every request's tree in the same forward as the rest of the
batch (kernels: vllm_bastion.kernels.tree_attention, Triton on CUDA, its torch
reference elsewhere; paged K/V views from vllm_bastion.kv_layout). The target's attention layers keep their backend (CPU_ATTN on CPU,
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

import time
from dataclasses import dataclass

import torch

from vllm_bastion.core.attention import masked_attention
from vllm_bastion.kernels import HAS_TRITON, tree_attention_triton, unpack_ancestor_bits
from vllm_bastion.kv_layout import probe_layout

METADATA_ATTR = "bastion_tree"
FIXUP_SECONDS = [0.0]  # host time spent in tree attention (read by the runner's stats)


@dataclass
class TreeAttentionStep:
    """This step's trees, as the tree-attention kernels take them (device tensors)."""

    tree_req: torch.Tensor  # [R] int32 batch row (block-table row) of each tree request
    row_start: torch.Tensor  # [R] int32 flattened-batch row of its root
    num_nodes: torch.Tensor  # [R] int32 draft nodes (root excluded)
    prefix_len: torch.Tensor  # [R] int32 cached tokens before the root (= root position)
    anc_bits: torch.Tensor  # [R, W, ceil(W/32)] int32 packed ancestor-or-self masks
    max_nodes: int
    block_size: int
    num_blocks: int
    _plan: object = None  # the torch path's gather indices, built once per step

    @property
    def num_requests(self) -> int:
        return int(self.tree_req.shape[0])

    def torch_plan(self, block_table: torch.Tensor) -> "_TorchPlan":
        if self._plan is None:
            self._plan = _TorchPlan(self, block_table)
        return self._plan


class _TorchPlan:
    """Padded gather indices and masks for all tree requests of a step, so the
    torch path is one batched masked attention per layer (same function as
    the Triton kernel and its reference)."""

    def __init__(self, step: TreeAttentionStep, block_table: torch.Tensor):
        dev = step.anc_bits.device
        R, n = step.num_requests, step.max_nodes
        nodes = step.num_nodes.long().to(dev)
        starts = step.row_start.long().to(dev)
        plen = step.prefix_len.long().to(dev)
        c = int(plen.max()) if R else 0
        i = torch.arange(n, device=dev)
        self.node_ok = i[None, :] < nodes[:, None]  # [R, n]
        self.q_rows = (starts[:, None] + 1 + i[None, :]).masked_fill(~self.node_ok, 0)
        j = torch.arange(n + 1, device=dev)
        self.tree_rows = (starts[:, None] + j[None, :]).masked_fill(j[None, :] > nodes[:, None], 0)
        pos = torch.arange(c, device=dev)
        pre_ok = pos[None, :] < plen[:, None]  # [R, c]
        bt = block_table.to(dev)[step.tree_req.long().to(dev)]  # [R, blocks]
        bs = step.block_size
        self.blk = torch.where(pre_ok, bt.gather(1, (pos // bs).expand(R, c)).long(), 0) if c else pos.view(R, 0)
        self.off = (pos % bs).expand(R, c)
        vis = unpack_ancestor_bits(step.anc_bits[:, 1 : n + 1], n + 1)  # [R, n, n+1]
        tree_ok = vis & (j[None, None, :] <= nodes[:, None, None])
        mask = torch.cat([pre_ok[:, None, :].expand(R, n, c), tree_ok], dim=2)
        # padding query rows (past a request's num_nodes) see its root: never
        # empty, never written back
        mask[:, :, c] |= ~self.node_ok
        self.mask = mask
        self.out_rows = self.q_rows[self.node_ok]

    def run(self, query, key, value, k_cache, v_cache, out3, scale) -> None:
        kp, vp = k_cache[self.blk, self.off], v_cache[self.blk, self.off]  # [R, c, Hkv, D]
        k = torch.cat([kp.to(key.dtype), key[self.tree_rows]], dim=1)
        v = torch.cat([vp.to(value.dtype), value[self.tree_rows]], dim=1)
        o = masked_attention(query[self.q_rows], k, v, self.mask, scale)
        out3[self.out_rows] = o[self.node_ok].to(out3.dtype)


def _block_table_of(metadata) -> torch.Tensor:
    bt = getattr(metadata, "block_table", None)
    if bt is None:
        bt = getattr(metadata, "block_table_tensor", None)
    if bt is None:
        raise RuntimeError(
            f"BASTION tree attention cannot find the block table on {type(metadata).__name__}"
        )
    return bt


def paged_kv_views(impl, layer, kv_cache, step: TreeAttentionStep):
    """[num_blocks, block_size, Hkv, D] K and V views of this layer's cache."""
    layout = probe_layout(impl, layer, kv_cache, step.block_size, step.num_blocks)
    return layout.views(kv_cache)


def tree_attention_fixup(impl, layer, query, key, value, kv_cache, metadata, output, step):
    """Overwrite the draft-node rows of `output` with exact tree attention:
    the Triton kernel on CUDA; elsewhere the same function in torch, batched
    over the step's trees (see `_TorchPlan`)."""
    k_cache, v_cache = paged_kv_views(impl, layer, kv_cache, step)
    out3 = output.view(output.shape[0], impl.num_heads, -1)
    block_table = _block_table_of(metadata)
    if kv_cache.is_cuda and HAS_TRITON:
        tree_attention_triton(
            query, key, value, k_cache, v_cache, block_table,
            step.tree_req, step.row_start, step.num_nodes, step.prefix_len, step.anc_bits,
            impl.scale, out3, max_nodes=step.max_nodes,
        )
    else:
        step.torch_plan(block_table).run(query, key, value, k_cache, v_cache, out3, impl.scale)


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
        if step is not None and step.num_requests:
            t0 = time.perf_counter()
            tree_attention_fixup(self, layer, query, key, value, kv_cache, attn_metadata, output, step)
            FIXUP_SECONDS[0] += time.perf_counter() - t0
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
