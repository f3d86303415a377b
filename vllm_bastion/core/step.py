"""One verify step over a batch of draft trees: layout, plan, walk, compaction. Pure torch.

This is the engine-agnostic half of a BASTION step; the vLLM runner only
moves data in and out of it (see vllm_bastion/runner.py). Nothing here loops
over requests or nodes in Python; loops run over tree depth at most.

Layout. A request's verify rows are [root, node_1, ..., node_n]. The nodes
are sent to the scheduler *spine first*: the spine (the path from the root
through each node's best child, i.e. its first child in best-first order)
in depth order, then every other node in best-first order. Then

  * every node's parent precedes it, and any prefix of the order is a tree
    (a spine prefix is a path; every other node's ancestors are spine nodes
    or better-scored other nodes), so the scheduler may truncate anywhere;
  * the root and the spine rows are an ordinary causal chain: their KV slots,
    RoPE positions and causal attention are exactly a chain's, so the
    attention backend computes them unchanged and only the *branch* rows
    (everything after the spine) need tree attention and position rewrites;
  * a path accepted along the spine is already contiguous: no KV move.
A top-1 tree (topk 1) is a chain: no branch rows, no tree attention, no
compaction, the same computation as vLLM's chain.

Plan (`plan_step`). From the step's trees (layout order, truncated to what
the scheduler scheduled) and each request's first verify row and root
position: which rows the backend computes (all rows but branch rows), the
branch rows' RoPE positions, and the ancestor masks tree attention needs.

Finish (`finish_step`). From the target's token at every verify row: the
acceptance walk (core.walk), the accepted tokens, and the (src, dst) rows
that make every accepted path contiguous (core.compaction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compaction import compaction_pairs
from .tree import TreeBatch, ancestor_mask
from .walk import WalkResult, accept_walk


# ----------------------------------------------------------------- layout


def spine_mask(trees: TreeBatch) -> torch.Tensor:
    """[B, W] bool: the root and the spine (each spine node is the first
    child, in column order, of the previous one). For best-first order the
    first child is the best child, and truncating a tree never changes which
    of its nodes are on the spine.

    No loop over depth: a node is on the spine iff it and all its ancestors
    are their parent's first child (pointer jumping over the ancestors)."""
    B, W = trees.tokens.shape
    dev = trees.tokens.device
    valid = trees.valid_mask()
    cols = torch.arange(W, device=dev).expand(B, W)
    parents = trees.parents.clamp(min=0)
    child = valid & (cols > 0)
    first = torch.full((B, W), W, dtype=torch.long, device=dev)  # first child of each column
    first.scatter_reduce_(1, parents, torch.where(child, cols, torch.full_like(cols, W)),
                          reduce="amin", include_self=True)
    on = (child & (first.gather(1, parents) == cols)) | (cols == 0)
    anc = parents
    for _ in range(max(1, W - 1).bit_length()):
        on = on & on.gather(1, anc)
        anc = anc.gather(1, anc)
    return on


def spine_first(trees: TreeBatch) -> tuple[TreeBatch, torch.Tensor]:
    """Reorder every tree spine first (module docstring); returns the
    reordered trees and the spine length [B] (spine nodes, root excluded).

    The input must have parents before children (best-first order does)."""
    B, W = trees.tokens.shape
    dev = trees.tokens.device
    on = spine_mask(trees)
    valid = trees.valid_mask()
    cols = torch.arange(W, device=dev).expand(B, W)
    # key: spine nodes first by depth (== column order along the spine), then
    # the others by column; padding last
    key = torch.where(on, cols, cols + W)
    key = torch.where(valid, key, cols + 2 * W)
    perm = key.argsort(dim=1, stable=True)  # new column -> old column
    inv = perm.argsort(dim=1)  # old column -> new column

    def g(x, fill=None):
        return None if x is None else x.gather(1, perm)

    parents_old = trees.parents.gather(1, perm)
    parents = torch.where(parents_old >= 0, inv.gather(1, parents_old.clamp(min=0)), parents_old)
    out = TreeBatch(
        tokens=g(trees.tokens), parents=parents, depths=g(trees.depths), ranks=g(trees.ranks),
        scores=g(trees.scores), num_nodes=trees.num_nodes.clone(), node_logq=g(trees.node_logq),
        classes=g(trees.classes),
    )
    spine_len = (on & valid).sum(dim=1) - 1
    return out, spine_len


def spine_length(trees: TreeBatch) -> torch.Tensor:
    """[B] length of the leading chain of a spine-first tree: the largest L
    with parents[i] == i - 1 and depths[i] == i for columns 1..L (valid)."""
    B, W = trees.tokens.shape
    dev = trees.tokens.device
    cols = torch.arange(W, device=dev)
    chain = (trees.parents == cols - 1) & (trees.depths == cols) & trees.valid_mask()
    chain[:, 0] = True
    return chain.long().cumprod(dim=1).sum(dim=1) - 1


def pad_trees(trees: TreeBatch, width: int) -> TreeBatch:
    """The same trees with `width` columns (padding appended)."""
    extra = width - trees.width
    if extra <= 0:
        return trees
    fills = {"tokens": -1, "parents": -1, "depths": -1, "ranks": -1,
             "scores": float("-inf"), "node_logq": float("-inf"), "classes": -1}

    def pad(k):
        x = getattr(trees, k)
        return None if x is None else torch.nn.functional.pad(x, (0, extra), value=fills[k])

    return TreeBatch(**{k: pad(k) for k in fills}, num_nodes=trees.num_nodes)


def replace_rows(trees: TreeBatch, rows: torch.Tensor, other: TreeBatch) -> TreeBatch:
    """`trees` with the rows where `rows` [B] is True taken from `other`."""
    W = max(trees.width, other.width)
    a, b = pad_trees(trees, W), pad_trees(other, W)
    sel = rows.to(torch.bool)

    def pick(k):
        x, y = getattr(a, k), getattr(b, k)
        if k == "classes" and (x is None or y is None):
            return None  # per node: recomputed from the mixed rows (tree.path_classes)
        if x is None or y is None:
            return x if y is None else y
        return torch.where(sel.view(-1, *([1] * (x.dim() - 1))), y, x)

    return TreeBatch(**{k: pick(k) for k in TreeBatch.__dataclass_fields__})


# ----------------------------------------------------------------- plan


@dataclass
class StepPlan:
    """Where every tree row of one verify step lives and who computes it.

    Row indices are into the flattened verify batch (all requests' scheduled
    tokens, request-major). A request without a tree has num_nodes 0: its
    rows (a prefill chunk, or one decode token) are the backend's.
    """

    trees: TreeBatch  # [B, W] layout order, truncated to the scheduled nodes
    row_start: torch.Tensor  # [B] int64 first verify row of each request
    num_rows: torch.Tensor  # [B] int64 scheduled rows of each request
    root_pos: torch.Tensor  # [B] int64 position of the root (the sampled row 0)
    spine_len: torch.Tensor  # [B] int64 leading chain nodes (computed causally)
    # branch rows: tree nodes after the spine (need tree attention + positions)
    branch_rows: torch.Tensor  # [Nb] int64
    branch_pos: torch.Tensor  # [Nb] int64 RoPE position (root_pos + depth)
    # backend rows: everything else, in order
    backend_rows: torch.Tensor  # [Nk] int64
    backend_query_lens: torch.Tensor  # [B] int64 rows the backend computes per request
    # tree attention over the requests with branch rows
    tree_reqs: torch.Tensor  # [R] int64 batch index of each request with branch rows
    anc_bits: torch.Tensor | None  # [R, W, ceil(W/32)] int32 packed ancestor-or-self masks

    @property
    def num_branch_rows(self) -> int:
        return int(self.branch_rows.numel())

    @property
    def sampled_rows(self) -> torch.Tensor:
        """[B] number of target tokens each request samples (1 + nodes)."""
        return 1 + self.trees.num_nodes


def plan_step(trees: TreeBatch, row_start, num_rows, root_pos,
              pack_bits=None) -> StepPlan:
    """Plan one verify step (module docstring).

    Args:
        trees: [B, W] trees in layout order (spine first), truncated to the
            nodes the scheduler scheduled (num_nodes 0 for requests without).
        row_start / num_rows / root_pos: [B] first verify row, scheduled rows
            and root position of every request (for a request with a tree,
            num_rows == 1 + num_nodes and its root is its first row).
        pack_bits: function bool [R, W, W] -> packed int32 masks (the
            kernels' `pack_ancestor_bits`); None keeps no masks.
    """
    dev = trees.tokens.device
    row_start = torch.as_tensor(row_start, dtype=torch.long, device=dev)
    num_rows = torch.as_tensor(num_rows, dtype=torch.long, device=dev)
    root_pos = torch.as_tensor(root_pos, dtype=torch.long, device=dev)
    B, W = trees.tokens.shape
    n = trees.num_nodes.to(dev)
    spine = torch.minimum(spine_length(trees), n)
    if not bool((n > spine).any()):  # chains only: every row is the backend's
        none = torch.zeros(0, dtype=torch.long, device=dev)
        total = int(num_rows.sum())
        return StepPlan(trees, row_start, num_rows, root_pos, spine, none, none,
                        torch.arange(total, device=dev), num_rows.clone(), none, None)
    cols = torch.arange(W, device=dev)[None, :]
    branch = (cols > spine[:, None]) & (cols <= n[:, None])  # [B, W]
    b_idx, b_col = branch.nonzero(as_tuple=True)
    branch_rows = row_start[b_idx] + b_col
    branch_pos = root_pos[b_idx] + trees.depths[b_idx, b_col]

    backend_q = num_rows - (n - spine)
    total = int(num_rows.sum())
    keep = torch.ones(total, dtype=torch.bool, device=dev)
    keep[branch_rows] = False
    backend_rows = keep.nonzero().squeeze(1)

    tree_reqs = (n > spine).nonzero().squeeze(1)
    anc = None
    if tree_reqs.numel() and pack_bits is not None:
        sel = trees.select(tree_reqs)
        anc = pack_bits(ancestor_mask(sel))
    return StepPlan(trees, row_start, num_rows, root_pos, spine, branch_rows, branch_pos,
                    backend_rows, backend_q, tree_reqs, anc)


# ----------------------------------------------------------------- chain waves


@dataclass
class ChainWaves:
    """Branch rows computed as chain rows, one root-to-leaf chain per request
    and wave (the CPU tree-attention path, vllm_bastion/tree_attention.py).

    A branch node's attention must see the request's cache up to the root
    and then its ancestors at positions root + 1 .. root + depth. In wave w,
    every request with a w-th branch leaf (column order) writes the K/V of
    that leaf's path into its own verify slots at those positions (column k
    gets the path's node at depth k), so the attention backend sees an
    ordinary causal chain and computes the wave's query nodes, the branch
    nodes on the path not computed by an earlier wave (a suffix of the
    path), exactly as it computes a chain's rows. Every branch node lies on
    some branch leaf's path, so every branch row is computed once. After the
    last wave each written column gets its own row's K/V back.

    All index tensors are flat; `*_wave` says which wave an entry belongs to.
    Columns are tree columns (row = row_start + column).
    """

    num_waves: int
    kv_wave: torch.Tensor  # [E] int64
    kv_req: torch.Tensor  # [E] int64 batch index
    kv_dst_col: torch.Tensor  # [E] int64 column whose slot is written (= depth)
    kv_src_col: torch.Tensor  # [E] int64 column whose K/V is written there
    q_wave: torch.Tensor  # [Q] int64
    q_req: torch.Tensor  # [Q] int64
    q_col: torch.Tensor  # [Q] int64 query node column
    q_depth: torch.Tensor  # [Q] int64 its depth (position = root position + depth)
    restore_req: torch.Tensor  # [S] int64 columns to restore after the last wave
    restore_col: torch.Tensor  # [S] int64


def branch_waves(trees: TreeBatch, spine_len: torch.Tensor) -> ChainWaves:
    """Cover the branch nodes of spine-first trees by root-to-leaf chains
    (see `ChainWaves`). Vectorized; the number of waves is the largest
    number of branch leaves of one request."""
    B, W = trees.tokens.shape
    dev = trees.tokens.device
    n = trees.num_nodes.to(dev)
    spine = torch.minimum(spine_len.to(dev), n)
    valid = trees.valid_mask()
    cols = torch.arange(W, device=dev)[None, :].expand(B, W)
    branch = (cols > spine[:, None]) & (cols <= n[:, None])
    has_child = torch.zeros((B, W), dtype=torch.bool, device=dev)
    child = valid & (trees.parents >= 0)
    has_child.scatter_(1, trees.parents.clamp(min=0), child)  # root's dummy writes are harmless
    has_child &= valid
    leaf = branch & ~has_child
    rank = leaf.long().cumsum(dim=1) - 1  # wave of each branch leaf
    big = W + 1
    anc = ancestor_mask(trees)  # [B, i, j]: j is i or an ancestor of i
    # a branch node is computed in the wave of the first branch leaf below it
    first = torch.where(anc & leaf[:, :, None], rank[:, :, None], big).min(dim=1).values
    q_req, q_col = (branch & (first < big)).nonzero(as_tuple=True)
    q_wave = first[q_req, q_col]
    q_depth = trees.depths[q_req, q_col]
    # K/V writes: every (leaf, ancestor below the root) pair
    path = anc & leaf[:, :, None] & (cols[:, None, :] > 0)  # [B, leaf, ancestor]
    kv_req, kv_leaf, kv_src = path.nonzero(as_tuple=True)
    kv_wave = rank[kv_req, kv_leaf]
    kv_dst = trees.depths[kv_req, kv_src]
    num_waves = int(leaf.sum(dim=1).max()) if B else 0
    # restore: columns 1 .. deepest branch leaf of each request
    deepest = torch.where(leaf, trees.depths, 0).max(dim=1).values if W else n
    rmask = (cols >= 1) & (cols <= deepest[:, None])
    restore_req, restore_col = rmask.nonzero(as_tuple=True)
    return ChainWaves(num_waves, kv_wave, kv_req, kv_dst, kv_src,
                      q_wave, q_req, q_col, q_depth, restore_req, restore_col)


# ----------------------------------------------------------------- finish


@dataclass
class StepResult:
    walk: WalkResult
    src_rows: torch.Tensor  # [M] rows to move (gather first, then scatter)
    dst_rows: torch.Tensor  # [M]


def gather_target_tokens(plan: StepPlan, row_tokens: torch.Tensor) -> torch.Tensor:
    """[sum(1 + nodes)] target tokens in sampled-row order (request-major,
    root first, then the nodes in layout order) -> [B, W], -1 in padding."""
    B, W = plan.trees.tokens.shape
    dev = row_tokens.device
    cnt = plan.sampled_rows.to(dev)
    cols = torch.arange(W, device=dev)[None, :]
    live = cols < cnt[:, None]
    out = torch.full((B, W), -1, dtype=torch.long, device=dev)
    out[live] = row_tokens.long()
    return out


def sampled_row_depths(plan: StepPlan) -> torch.Tensor:
    """[sum(1 + nodes)] tree depth of every sampled row (request-major)."""
    W = plan.trees.width
    cols = torch.arange(W, device=plan.trees.depths.device)[None, :]
    live = cols < plan.sampled_rows[:, None]
    return plan.trees.depths[live]


def sampled_row_requests(plan: StepPlan) -> torch.Tensor:
    """[sum(1 + nodes)] batch index of every sampled row."""
    B = plan.trees.batch_size
    return torch.arange(B, device=plan.trees.tokens.device).repeat_interleave(plan.sampled_rows)


def finish_step(plan: StepPlan, row_tokens: torch.Tensor) -> StepResult:
    """Walk every tree with the target's token at each sampled row and plan
    the compaction of the accepted paths."""
    target = gather_target_tokens(plan, row_tokens.to(plan.trees.tokens.device))
    walk = accept_walk(plan.trees, target, chains=plan.num_branch_rows == 0)
    src, dst = compaction_pairs(plan.row_start, walk.path_nodes, walk.num_accepted)
    return StepResult(walk, src, dst)
