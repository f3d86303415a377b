"""Tree attention inside vLLM's attention layers.

BASTION verifies every request's tree in the same forward as the rest of the
batch. Trees are laid out spine first (core/step.py), so a tree request's
root and spine rows form an ordinary causal chain: the target's attention
backend (CPU_ATTN on CPU, FlashAttention / Triton on GPU) computes them, and
every prefill chunk and plain decode row, exactly as it would without
BASTION. The *branch* rows (tree nodes after the spine) are left out of the
backend's work: for a step with branch rows the backend runs on the other
rows only, with metadata built by its own builder for that subset (their
K/V are still written by the layer's separate KV-cache update). Tree
attention then computes the branch rows once: each node sees the request's
cached prefix plus its ancestors in the tree (ancestor bitmask), at its own
depth position (RoPE was applied with position root + depth). Kernels:
vllm_bastion.kernels.tree_attention (Triton on CUDA) and, elsewhere, the same
function in torch, batched over the step's trees; paged K/V views come from
vllm_bastion.kv_layout.

The class of each target layer's `impl` is swapped at load time for a
subclass of itself that adds this step (`install_tree_attention`), so the
backend, its metadata builder and every isinstance check stay vLLM's own;
the drafter's layers are untouched. The per-step description reaches the
layers on the attention metadata object (`metadata.bastion_tree`).
"""

from __future__ import annotations

import time
from copy import copy
from dataclasses import dataclass

import torch

from vllm_bastion.core.attention import masked_attention
from vllm_bastion.kernels import HAS_TRITON, tree_attention_triton, unpack_ancestor_bits
from vllm_bastion.kv_layout import probe_layout

METADATA_ATTR = "bastion_tree"
FIXUP_SECONDS = [0.0]  # host time spent in tree attention (read by the runner's stats)


@dataclass
class TreeAttentionStep:
    """This step's branch rows and the backend's metadata for all other rows."""

    backend_rows: torch.Tensor  # [Nk] int64 rows the backend computes
    backend_metadata: object  # the backend's metadata for those rows
    # tree requests (requests with branch rows), device tensors
    tree_req: torch.Tensor  # [R] int32 batch row (block-table row)
    row_start: torch.Tensor  # [R] int32 verify row of the root
    first_col: torch.Tensor  # [R] int64 first branch column (1 + spine length)
    num_nodes: torch.Tensor  # [R] int32 draft nodes (root excluded)
    prefix_len: torch.Tensor  # [R] int32 cached tokens before the root (= root position)
    anc_bits: torch.Tensor  # [R, W, ceil(W/32)] int32 packed ancestor-or-self masks
    max_nodes: int
    block_size: int
    num_blocks: int
    _plan: object = None  # the torch path's gather indices, built once per step
    # the chain-exact path (CPU): branch rows computed wave by wave as chain
    # rows by the backend itself (see `_ChainWave`); None on the Triton path
    waves: list | None = None
    restore_rows: torch.Tensor | None = None  # [S] rows whose K/V go back after the waves
    restore_slots: torch.Tensor | None = None  # [S] their slots
    # backend_rows as a range [start, stop) when they are consecutive (one
    # request, or no branch rows): the backend then works on views, with no
    # gather of the queries and no scatter of its output per layer
    backend_span: tuple[int, int] | None = None

    @property
    def num_requests(self) -> int:
        return int(self.tree_req.shape[0])

    @classmethod
    def build(cls, plan, cad, attn_group, device, *, block_size: int, num_blocks: int,
              max_nodes: int, chain_exact: bool = False) -> TreeAttentionStep:
        """From a core StepPlan with branch rows and the step's common
        attention metadata (all rows). `chain_exact` (the CPU path): every
        verify row is computed by the backend as the row of a chain
        (`build_chain_exact`)."""
        if chain_exact:
            return cls.build_chain_exact(plan, cad, attn_group, device, block_size=block_size,
                                         num_blocks=num_blocks, max_nodes=max_nodes)
        rows = plan.backend_rows.to(device)
        qlens = plan.backend_query_lens
        drop = (plan.num_rows - qlens).to(torch.int32)  # branch rows per request
        sub = copy(cad)
        qsl = torch.zeros(len(qlens) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(qlens, 0)
        n_req = cad.num_reqs
        if n_req > len(qlens):  # padded requests keep zero-length queries
            qsl = torch.cat([qsl, qsl[-1:].expand(n_req - len(qlens))])
            drop = torch.cat([drop, drop.new_zeros(n_req - len(qlens))])
        sub.query_start_loc_cpu = qsl
        sub.query_start_loc = qsl.to(device, non_blocking=True)
        sub.seq_lens = cad.seq_lens - drop.to(cad.seq_lens.device, cad.seq_lens.dtype)
        if getattr(cad, "seq_lens_cpu_upper_bound", None) is not None:
            sub.seq_lens_cpu_upper_bound = cad.seq_lens_cpu_upper_bound - drop.to(
                cad.seq_lens_cpu_upper_bound.dtype)
        sub.num_actual_tokens = int(rows.numel())
        sub.max_query_len = int(qlens.max())
        sub.slot_mapping = cad.slot_mapping[rows]
        if getattr(cad, "positions", None) is not None:
            sub.positions = cad.positions[rows]
        md = attn_group.build_metadata(sub)
        return cls(backend_rows=rows, backend_metadata=md, backend_span=row_span(plan.backend_rows),
                   **_tree_fields(plan, device, max_nodes, block_size, num_blocks))

    @classmethod
    def build_chain_exact(cls, plan, cad, attn_group, device, *, block_size: int,
                          num_blocks: int, max_nodes: int) -> TreeAttentionStep:
        """Every verify row of a tree request computed exactly as the backend
        computes a decode row (a chain's row), whatever the tree.

        Root and spine rows are a chain already; they go to the backend as
        blocks of at most `chain_rows_per_query` rows (its own requests over
        the request's cache), for which the backend's numerics are those of
        a single decode row, so a row does not depend on how long the spine
        or the tree is, or on what else the step holds. Branch rows are
        computed in waves (core.step.branch_waves): the K/V of one
        root-to-leaf path per request is written into the request's own
        verify slots, the path's new nodes are computed as a chain's rows,
        and after the last wave every slot gets its own row's K/V back. Rows
        of requests without a tree keep their query blocks (prefill chunks,
        decode rows), as vLLM schedules them."""
        from vllm_bastion.core.step import branch_waves

        trees = plan.trees
        n = trees.num_nodes
        spine = torch.minimum(plan.spine_len, n)
        B = n.numel()
        row_start, root_pos = plan.row_start, plan.root_pos
        Q = chain_rows_per_query(attn_group)
        seq_lens = cad.seq_lens.cpu().long()[:B]
        # backend rows: chain blocks of <= Q rows for tree requests (root and
        # spine), the scheduled query block otherwise
        tree = n > 0
        reps = torch.where(tree, spine + 1, torch.ones_like(n))
        r_req = torch.arange(B).repeat_interleave(reps)
        k = torch.arange(int(reps.sum())) - (torch.cumsum(reps, 0) - reps).repeat_interleave(reps)
        r_tree = tree[r_req]
        r_pos = root_pos[r_req] + k
        new_block = (k % Q == 0) | ~r_tree
        v_req, v_q, v_last = _blocks(r_req, r_pos, new_block)
        v_tree = tree[v_req]
        v_q = torch.where(v_tree, v_q, plan.backend_query_lens[v_req])
        v_seq = torch.where(v_tree, v_last + 1, seq_lens[v_req])
        rows = plan.backend_rows
        md = _virtual_batch_metadata(cad, attn_group, device, v_req, v_q, v_seq, rows)

        waves = []
        restore_rows = restore_slots = None
        if plan.num_branch_rows:
            w = branch_waves(trees, spine)
            slots = cad.slot_mapping
            # queries grouped by (wave, request), in depth order: a chain suffix
            order = torch.argsort(w.q_wave * (B * (trees.width + 1)) + w.q_req * (trees.width + 1)
                                  + w.q_depth)
            q_wave, q_req = w.q_wave[order], w.q_req[order]
            q_col, q_depth = w.q_col[order], w.q_depth[order]
            for i in range(w.num_waves):
                km = w.kv_wave == i
                src = row_start[w.kv_req[km]] + w.kv_src_col[km]
                dst = row_start[w.kv_req[km]] + w.kv_dst_col[km]
                qm = q_wave == i
                req_i, pos_i = q_req[qm], root_pos[q_req[qm]] + q_depth[qm]
                first_of_req = torch.ones_like(req_i, dtype=torch.bool)
                first_of_req[1:] = req_i[1:] != req_i[:-1]
                idx_in_req = torch.arange(req_i.numel()) - _segment_starts(first_of_req)
                wv_req, wv_q, wv_last = _blocks(req_i, pos_i, (idx_in_req % Q == 0))
                q_rows = row_start[req_i] + q_col[qm]
                wmd = _virtual_batch_metadata(cad, attn_group, device, wv_req, wv_q,
                                              wv_last + 1, q_rows)
                waves.append(_ChainWave(src.to(device), slots[dst.to(slots.device)],
                                        q_rows.to(device), wmd, row_span(q_rows)))
            r_rows = row_start[w.restore_req] + w.restore_col
            restore_rows = r_rows.to(device)
            restore_slots = cad.slot_mapping[r_rows.to(cad.slot_mapping.device)]
        return cls(backend_rows=rows.to(device), backend_metadata=md, backend_span=row_span(rows),
                   waves=waves, restore_rows=restore_rows, restore_slots=restore_slots,
                   **_tree_fields(plan, device, max_nodes, block_size, num_blocks))

    def torch_plan(self, block_table: torch.Tensor) -> "_TorchPlan":
        if self._plan is None:
            self._plan = _TorchPlan(self, block_table)
        return self._plan


class _TorchPlan:
    """Padded gather indices and masks for the branch rows of all tree
    requests of a step, so the torch path is one batched masked attention
    per layer (the same function as the Triton kernel and its reference)."""

    def __init__(self, step: TreeAttentionStep, block_table: torch.Tensor):
        dev = step.anc_bits.device
        R = step.num_requests
        nodes = step.num_nodes.long().to(dev)
        first = step.first_col.long().to(dev)
        starts = step.row_start.long().to(dev)
        plen = step.prefix_len.long().to(dev)
        m = nodes + 1 - first  # branch rows per request
        M = int(m.max())
        Wt = int(nodes.max()) + 1  # tree columns
        c = int(plen.max()) if R else 0
        i = torch.arange(M, device=dev)
        self.q_ok = i[None, :] < m[:, None]  # [R, M]
        q_col = (first[:, None] + i[None, :]).masked_fill(~self.q_ok, 0)
        self.q_rows = starts[:, None] + q_col
        j = torch.arange(Wt, device=dev)
        tree_ok = j[None, :] <= nodes[:, None]
        self.tree_rows = (starts[:, None] + j[None, :]).masked_fill(~tree_ok, 0)
        pos = torch.arange(c, device=dev)
        pre_ok = pos[None, :] < plen[:, None]  # [R, c]
        bt = block_table.to(dev)[step.tree_req.long().to(dev)]  # [R, blocks]
        bs = step.block_size
        self.blk = torch.where(pre_ok, bt.gather(1, (pos // bs).expand(R, c)).long(), 0) if c else pos.view(R, 0)
        self.off = (pos % bs).expand(R, c)
        bits = step.anc_bits.gather(1, q_col[:, :, None].expand(R, M, step.anc_bits.shape[2]))
        vis = unpack_ancestor_bits(bits, Wt) & tree_ok[:, None, :]  # [R, M, Wt]
        mask = torch.cat([pre_ok[:, None, :].expand(R, M, c), vis], dim=2)
        # padding query rows see their root: never empty, never written back
        mask[:, :, c] |= ~self.q_ok
        self.mask = mask
        self.out_rows = self.q_rows[self.q_ok]

    def run(self, query, key, value, k_cache, v_cache, out3, scale) -> None:
        kp, vp = k_cache[self.blk, self.off], v_cache[self.blk, self.off]  # [R, c, Hkv, D]
        k = torch.cat([kp.to(key.dtype), key[self.tree_rows]], dim=1)
        v = torch.cat([vp.to(value.dtype), value[self.tree_rows]], dim=1)
        o = masked_attention(query[self.q_rows], k, v, self.mask, scale)
        out3[self.out_rows] = o[self.q_ok].to(out3.dtype)


def _tree_fields(plan, device, max_nodes: int, block_size: int, num_blocks: int) -> dict:
    """The TreeAttentionStep fields of the step's requests with branch rows."""
    reqs = plan.tree_reqs

    def dev(x, dtype=torch.int32):
        return x.to(dtype).to(device)

    return dict(
        tree_req=dev(reqs),
        row_start=dev(plan.row_start[reqs]),
        first_col=dev(1 + plan.spine_len[reqs], torch.int64),
        num_nodes=dev(plan.trees.num_nodes[reqs]),
        prefix_len=dev(plan.root_pos[reqs]),
        anc_bits=plan.anc_bits.to(device) if plan.anc_bits is not None else None,
        max_nodes=max_nodes,
        block_size=block_size,
        num_blocks=num_blocks,
    )


# vLLM's CPU attention computes a query tile of up to MaxQHeadNumPerIteration
# query heads (16 on the vec / vec16 ISAs, 32 on AMX) with one fixed KV
# tiling, the same as a single decode row's; longer query blocks get a
# KV tiling that depends on the block's length.
_ONE_ROUND_Q_HEADS = {"vec": 16, "vec16": 16, "amx": 32}


def chain_rows_per_query(attn_group) -> int:
    """Rows per one-row-exact query block: a chain block of this many rows
    computes every row exactly as the backend computes a decode row (1 on
    ISAs whose tiling is not known here)."""
    b = attn_group.metadata_builders[0] if getattr(attn_group, "metadata_builders", None) else None
    heads, kv_heads = getattr(b, "num_heads", None), getattr(b, "num_kv_heads", None)
    q_heads = _ONE_ROUND_Q_HEADS.get(str(getattr(b, "isa", "")), 0)
    if not heads or not kv_heads or not q_heads:
        return 1
    per_kv = heads // kv_heads
    if q_heads % per_kv:  # the kernel then tiles query heads one by one
        per_kv = 1
    return max(1, q_heads // per_kv)


def row_span(rows: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) if the host tensor `rows` is start, start + 1, ...,
    stop - 1 (and not empty), else None."""
    n = int(rows.numel())
    if n == 0:
        return None
    a = int(rows[0])
    if int(rows[-1]) - a + 1 != n or (n > 1 and not bool((rows[1:] - rows[:-1] == 1).all())):
        return None
    return a, a + n


def _segment_starts(first: torch.Tensor) -> torch.Tensor:
    """For a flat array split into segments (first[i]: a segment starts at
    i), the start index of each element's segment."""
    idx = torch.arange(first.numel())
    return torch.cummax(torch.where(first, idx, 0), 0).values


def _blocks(req: torch.Tensor, pos: torch.Tensor, new_block: torch.Tensor):
    """Group consecutive rows into virtual requests (a new one where
    new_block is True): (request, rows, last position) per virtual request."""
    vid = torch.cumsum(new_block.long(), 0) - 1
    V = int(vid[-1]) + 1 if vid.numel() else 0
    q = torch.zeros(V, dtype=torch.long).index_add_(0, vid, torch.ones_like(vid))
    last = torch.full((V,), -1, dtype=torch.long).scatter_reduce_(0, vid, pos.long(), "amax")
    first = torch.nonzero(new_block).squeeze(1)
    return req[first], q, last


@dataclass
class _ChainWave:
    """One wave of the chain-exact path: K/V writes that lay one path per
    request out as a chain, and the query rows computed over it."""

    kv_src_rows: torch.Tensor  # [E] rows whose K/V are written ...
    kv_dst_slots: torch.Tensor  # [E] ... into these slots
    q_rows: torch.Tensor  # [Q] branch rows computed in this wave
    metadata: object  # the backend's metadata: one one-row request per query row
    q_span: tuple[int, int] | None = None  # q_rows as a range, when consecutive


def _virtual_batch_metadata(cad, attn_group, device, req, q_len, seq_len, rows):
    """The backend's metadata for a batch of virtual requests over the
    step's requests' caches: virtual request i reads request req[i]'s block
    table, has q_len[i] query rows (`rows`, in order) and seq_len[i] tokens
    of context (its rows are the last ones)."""
    sub = copy(cad)
    V = int(req.numel())
    qsl = torch.zeros(V + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_len, 0)
    sub.query_start_loc_cpu = qsl
    sub.query_start_loc = qsl.to(device, non_blocking=True)
    seq = seq_len.to(torch.int32)
    sub.seq_lens = seq.to(cad.seq_lens.device, cad.seq_lens.dtype)
    if getattr(cad, "seq_lens_cpu_upper_bound", None) is not None:
        sub.seq_lens_cpu_upper_bound = seq.to(cad.seq_lens_cpu_upper_bound.dtype)
    sub.num_reqs = V
    sub.num_actual_tokens = int(rows.numel())
    sub.max_query_len = int(q_len.max()) if V else 0
    sub.max_seq_len = int(seq.max()) if V else 0
    bt = cad.block_table_tensor
    sub.block_table_tensor = bt[req.to(bt.device)]
    rows_d = rows.to(cad.slot_mapping.device)
    sub.slot_mapping = cad.slot_mapping[rows_d]
    if getattr(cad, "positions", None) is not None:
        sub.positions = cad.positions[rows.to(cad.positions.device)]
    if getattr(cad, "is_prefilling", None) is not None:
        sub.is_prefilling = cad.is_prefilling[req.to(cad.is_prefilling.device)]
    if getattr(cad, "req_idx", None) is not None:
        sub.req_idx = cad.req_idx[req.numpy()]
    return attn_group.build_metadata(sub)


def backend_on_rows(cls, impl, layer, query, key, value, kv_cache, metadata, output, rows, span,
                    args, kwargs, *, gather_kv: bool) -> None:
    """The backend's forward on `rows` of the step, written into `output`:
    on views when the rows are the range `span` (the backend writes them in
    place), else gathered and scattered back. gather_kv False: the backend
    gets the whole key/value (CPU_ATTN reads K/V from the cache only)."""
    sel = slice(*span) if span is not None else rows
    out = output[sel] if span is not None else output.new_empty((rows.numel(),) + tuple(output.shape[1:]))
    if gather_kv:
        key = key[sel] if key is not None else key
        value = value[sel] if value is not None else value
    cls.forward(impl, layer, query[sel], key, value, kv_cache, metadata, out, *args, **kwargs)
    if span is None:
        output[rows] = out


def chain_exact_rows(cls, impl, layer, query, key, value, kv_cache, output, step,
                     args, kwargs) -> None:
    """The branch rows of `output`, wave by wave, by the backend itself
    (TreeAttentionStep.build_chain_exact), then the verify slots' own K/V
    back. The backend reads K/V from the cache only."""
    for w in step.waves:
        impl.do_kv_cache_update(layer, key[w.kv_src_rows], value[w.kv_src_rows], kv_cache,
                                w.kv_dst_slots)
        backend_on_rows(cls, impl, layer, query, key, value, kv_cache, w.metadata, output,
                        w.q_rows, w.q_span, args, kwargs, gather_kv=True)
    if step.restore_rows is not None:
        r = step.restore_rows
        impl.do_kv_cache_update(layer, key[r], value[r], kv_cache, step.restore_slots)


def _block_table_of(metadata) -> torch.Tensor:
    bt = getattr(metadata, "block_table", None)
    if bt is None:
        bt = getattr(metadata, "block_table_tensor", None)
    if bt is None:
        raise RuntimeError(
            f"BASTION tree attention cannot find the block table on {type(metadata).__name__}"
        )
    return bt


def paged_kv_views(impl, layer, kv_cache, block_size: int, num_blocks: int):
    """[num_blocks, block_size, Hkv, D] K and V views of this layer's cache."""
    return probe_layout(impl, layer, kv_cache, block_size, num_blocks).views(kv_cache)


def kv_cache_views(forward_context: dict, layer_names: list[str], block_size: int,
                   num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V views of every named layer's cache (built once per KV cache)."""
    out = []
    for name in layer_names:
        layer = forward_context[name]
        out.append(paged_kv_views(layer.impl, layer, layer.kv_cache, block_size, num_blocks))
    return out


def tree_attention_rows(impl, layer, query, key, value, kv_cache, metadata, output, step):
    """Write the branch rows of `output` with exact tree attention: the Triton
    kernel on CUDA; elsewhere the same function in torch, batched over the
    step's trees (see `_TorchPlan`)."""
    k_cache, v_cache = paged_kv_views(impl, layer, kv_cache, step.block_size, step.num_blocks)
    out3 = output.view(output.shape[0], impl.num_heads, -1)
    block_table = _block_table_of(metadata)
    if kv_cache.is_cuda and HAS_TRITON:
        tree_attention_triton(
            query, key, value, k_cache, v_cache, block_table,
            step.tree_req, step.row_start, step.num_nodes, step.prefix_len, step.anc_bits,
            impl.scale, out3, max_nodes=step.max_nodes, first_col=step.first_col,
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
    passes_kv = "CPU" not in cls.__name__  # CPU_ATTN reads K/V from the cache only

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        step = getattr(attn_metadata, METADATA_ATTR, None) if attn_metadata is not None else None
        if step is None:
            return cls.forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                               *args, **kwargs)
        backend_on_rows(cls, self, layer, query, key, value, kv_cache, step.backend_metadata, output,
                        step.backend_rows, step.backend_span, args, kwargs, gather_kv=passes_kv)
        t0 = time.perf_counter()
        if step.waves is not None:
            chain_exact_rows(cls, self, layer, query, key, value, kv_cache, output, step,
                             args, kwargs)
        elif step.num_requests:  # requests with branch rows
            tree_attention_rows(self, layer, query, key, value, kv_cache, attn_metadata, output,
                                step)
        FIXUP_SECONDS[0] += time.perf_counter() - t0
        return output

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
