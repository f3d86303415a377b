"""Best-first draft trees from per-depth top-k drafter distributions.

Pure torch; imports nothing from vLLM.

A block-diffusion drafter (DFlash) gives, for one request, a marginal
distribution q_d over the vocabulary for every future depth d = 1..D. Keeping
the top-K tokens per depth, every node of the candidate tree is a sequence of
ranks (r_1, ..., r_d); its path confidence is

    P(u) = prod_j q_j(t_{j, r_j}),   log P(u) = sum_j v_{j, r_j}   (P(root) = 1)

BASTION grows the tree best-first by P(u). Because every log-probability is
<= 0, a node never scores above its parent, so the N best nodes always form an
ancestor-closed tree, and any prefix of the best-first order is one too. That
is the property the whole integration relies on: the engine may truncate a
flattened tree anywhere (token budget, max_model_len) and still hold a valid
tree.

Layout of a padded tree batch (`TreeBatch`), per request b and column i:
  column 0 is the root (the last verified token, depth 0, parent -1);
  columns 1..num_nodes[b] are draft nodes in best-first order;
  parents[b, i] < i for every node; padding columns have parent -1, depth -1,
  token -1 and score -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
CLASS_CAP = 2  # path classes 0, 1, 2+ (core.acceptance.NUM_CLASSES - 1)


@dataclass
class TreeBatch:
    """A padded batch of draft trees. All tensors are [B, 1 + max_nodes]."""

    tokens: torch.Tensor  # int64; column 0 = root token (or -1 if unknown)
    parents: torch.Tensor  # int64; -1 for root and padding
    depths: torch.Tensor  # int64; 0 for root, -1 for padding
    ranks: torch.Tensor  # int64; rank of the token among the depth's top-k
    scores: torch.Tensor  # float32; log P(u); 0 for root, -inf for padding
    num_nodes: torch.Tensor  # int64 [B]; draft nodes, root excluded
    node_logq: torch.Tensor | None = None  # float32; the node's own per-depth log-prob
    # optional, for policies that learn from walks (core.policy); all per row:
    classes: torch.Tensor | None = None  # int64 [B, W]; non-top-1 choices on the path (capped), -1 padding
    draft_logprobs: torch.Tensor | None = None  # [B, D, K] the drafter top-k the tree was grown from
    draft_tokens: torch.Tensor | None = None  # [B, D, K]
    group: torch.Tensor | None = None  # int64 [B]; the policy's per-request group (regime) at build

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        """1 + max_nodes (columns, root included)."""
        return self.tokens.shape[1]

    def valid_mask(self) -> torch.Tensor:
        """[B, W] bool: True for the root and real nodes."""
        cols = torch.arange(self.width, device=self.tokens.device)
        return cols[None, :] <= self.num_nodes[:, None]

    def truncate(self, num_nodes: torch.Tensor) -> TreeBatch:
        """Keep the first num_nodes[b] nodes of every tree (always valid).

        Best-first order is ancestor-closed, so any prefix is a tree. Returns
        the trees themselves when nothing is cut, else new tensors.
        """
        num_nodes = torch.minimum(num_nodes.to(self.num_nodes), self.num_nodes)
        width = int(num_nodes.max().item()) + 1 if num_nodes.numel() else 1
        if width == self.width and torch.equal(num_nodes, self.num_nodes):
            return self  # nothing to cut (e.g. the scheduler kept every node)

        def cut(x):
            return None if x is None else x[:, :width].clone()

        t = TreeBatch(
            tokens=self.tokens[:, :width].clone(),
            parents=self.parents[:, :width].clone(),
            depths=self.depths[:, :width].clone(),
            ranks=self.ranks[:, :width].clone(),
            scores=self.scores[:, :width].clone(),
            num_nodes=num_nodes.clone(),
            node_logq=cut(self.node_logq),
            classes=cut(self.classes),
            draft_logprobs=self.draft_logprobs,
            draft_tokens=self.draft_tokens,
            group=self.group,
        )
        t._pad_invalid()
        return t

    def _pad_invalid(self) -> None:
        invalid = ~self.valid_mask()
        self.tokens.masked_fill_(invalid, -1)
        self.parents.masked_fill_(invalid, -1)
        self.depths.masked_fill_(invalid, -1)
        self.ranks.masked_fill_(invalid, -1)
        self.scores.masked_fill_(invalid, NEG_INF)
        if self.node_logq is not None:
            self.node_logq.masked_fill_(invalid, NEG_INF)
        if self.classes is not None:
            self.classes.masked_fill_(invalid, -1)

    def select(self, rows: torch.Tensor | list[int]) -> TreeBatch:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        return TreeBatch(**{
            k: (None if getattr(self, k) is None else getattr(self, k)[rows])
            for k in self.__dataclass_fields__
        })

    def to(self, device: torch.device | str) -> TreeBatch:
        return TreeBatch(**{
            k: (None if getattr(self, k) is None else getattr(self, k).to(device))
            for k in self.__dataclass_fields__
        })

    def node_lists(self) -> list[list[int]]:
        """Draft tokens of every request in best-first order (root excluded)."""
        toks = self.tokens.tolist()
        return [row[1 : 1 + n] for row, n in zip(toks, self.num_nodes.tolist())]

    def path_probability_sum(self) -> torch.Tensor:
        """Surrogate S(T) = sum_u P(u) per request, root included (>= 1)."""
        return torch.exp(self.scores).nan_to_num(0.0).sum(dim=1)


def chain_tree(tokens: list[list[int]], root_tokens: list[int] | None = None) -> TreeBatch:
    """A batch of chains (each node the child of the previous one).

    Used when the engine verifies drafts that BASTION did not build as a tree;
    a chain is a tree, so the same walk verifies it exactly.
    """
    B = len(tokens)
    n = [len(t) for t in tokens]
    W = 1 + max(n, default=0)
    tok = torch.full((B, W), -1, dtype=torch.long)
    par = torch.full((B, W), -1, dtype=torch.long)
    dep = torch.full((B, W), -1, dtype=torch.long)
    rank = torch.full((B, W), -1, dtype=torch.long)
    score = torch.full((B, W), NEG_INF, dtype=torch.float32)
    dep[:, 0] = 0
    rank[:, 0] = 0
    score[:, 0] = 0.0
    if root_tokens is not None:
        tok[:, 0] = torch.tensor(root_tokens, dtype=torch.long)
    for b, row in enumerate(tokens):
        k = len(row)
        if k:
            tok[b, 1 : 1 + k] = torch.tensor(row, dtype=torch.long)
            par[b, 1 : 1 + k] = torch.arange(0, k)
            dep[b, 1 : 1 + k] = torch.arange(1, k + 1)
            rank[b, 1 : 1 + k] = 0
            score[b, 1 : 1 + k] = 0.0
    return TreeBatch(tok, par, dep, rank, score, torch.tensor(n, dtype=torch.long),
                     torch.full((B, W), NEG_INF), classes=torch.where(dep >= 0, 0, -1))


def topk_per_depth(
    draft_logits: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, D, V] drafter logits -> (log-probs [B, D, k] sorted desc, tokens [B, D, k])."""
    logp = torch.log_softmax(draft_logits.float(), dim=-1)
    k = min(k, logp.shape[-1])
    vals, idx = logp.topk(k, dim=-1, sorted=True)
    return vals, idx


def build_best_first_trees(
    topk_logprobs: torch.Tensor,
    topk_tokens: torch.Tensor,
    max_nodes: int,
    num_nodes: torch.Tensor | None = None,
    max_depth: torch.Tensor | int | None = None,
    class_values: torch.Tensor | None = None,
) -> TreeBatch:
    """Grow every request's tree best-first by path confidence.

    Args:
        topk_logprobs: [B, D, K] per-depth log-probs, sorted descending.
        topk_tokens: [B, D, K] the matching token ids.
        max_nodes: the largest tree to build (root excluded).
        num_nodes: optional [B] per-request node budget (<= max_nodes). The
            cost-aware budget picks these from the best-first scores, see
            `vllm_bastion.core.budget`.
        max_depth: optional int or [B] depth limit (e.g. room left before
            max_model_len); nodes deeper than this are never created.
        class_values: optional [B, D, C, K] score of a node by its depth, rank
            and *path class* c = number of non-top-1 choices on its path
            (itself included), capped at C-1 (see core.acceptance). Replaces
            topk_logprobs in the path scores; every value must be <= 0 so a
            node never outscores its parent. topk_logprobs still define the
            ranks (and node_logq).

    Returns the trees in best-first order (see module docstring). Vectorized:
    one top-k per depth over the whole batch, no Python loop per node.

    Correctness of the per-depth pruning: the final best-first set T* holds at
    most max_nodes nodes of any depth d, and every one of them is among the
    max_nodes best children of the nodes kept at depth d-1 (otherwise more than
    max_nodes better nodes, all with kept ancestors, would precede it). So
    keeping the max_nodes best candidates per depth loses nothing.
    """
    if topk_logprobs.dim() != 3 or topk_logprobs.shape != topk_tokens.shape:
        raise ValueError(
            "topk_logprobs and topk_tokens must both be [batch, depth, k], got "
            f"{tuple(topk_logprobs.shape)} and {tuple(topk_tokens.shape)}"
        )
    if max_nodes < 0:
        raise ValueError(f"max_nodes must be >= 0, got {max_nodes}")
    B, D, K = topk_logprobs.shape
    device = topk_logprobs.device
    logp = topk_logprobs.float()
    toks = topk_tokens.long()
    M = max_nodes

    if max_depth is None:
        depth_limit = torch.full((B,), D, dtype=torch.long, device=device)
    else:
        depth_limit = torch.as_tensor(max_depth, dtype=torch.long, device=device)
        depth_limit = depth_limit.expand(B).clamp(0, D)

    if K == 1 and M > 0 and D > 0:
        trees = _top1_chains(logp, toks, M, depth_limit, num_nodes, class_values)
        trees.draft_logprobs, trees.draft_tokens = topk_logprobs, topk_tokens
        return trees

    level_scores: list[torch.Tensor] = []  # [B, W_d]
    level_parent_slot: list[torch.Tensor] = []  # index into previous level, -1 root
    level_ranks: list[torch.Tensor] = []
    level_flat: list[torch.Tensor] = []  # d * K + rank: the node's entry of the [B, D * K] top-k

    C = class_values.shape[2] if class_values is not None else CLASS_CAP + 1
    rank_off = (torch.arange(K, device=device) > 0).long()  # a non-top-1 choice
    level_classes: list[torch.Tensor] = []
    if class_values is not None:
        cv = class_values.float()
        b_idx = torch.arange(B, device=device)[:, None, None]
        k_idx = torch.arange(K, device=device)[None, None, :]
    if M > 0 and D > 0 and K > 0:
        prev = torch.zeros(B, 1, device=device)  # the root
        prev_cls = torch.zeros(B, 1, dtype=torch.long, device=device)
        pool = None  # the M best scores seen so far (for early termination)
        for d in range(D):
            W = prev.shape[1]
            if class_values is None:
                cand = prev[:, :, None] + logp[:, d, None, :]  # [B, W, K]
            else:
                cls = (prev_cls[:, :, None] + rank_off).clamp(max=C - 1)  # [B, W, K]
                vals = cv[:, d][b_idx, cls, k_idx]  # [B, W, K] by (class, rank)
                cand = prev[:, :, None] + vals
            cand = cand.reshape(B, W * K)
            keep = min(M, W * K)
            sc, idx = cand.topk(keep, dim=1, sorted=True)
            alive = (d < depth_limit)[:, None] & torch.isfinite(sc)
            sc = sc.masked_fill(~alive, NEG_INF)
            slot = idx // K
            rk = idx % K
            prev_cls = (prev_cls.gather(1, slot) + (rk > 0).long()).clamp(max=C - 1)
            level_classes.append(prev_cls)
            level_scores.append(sc)
            level_parent_slot.append(slot if d > 0 else torch.full_like(slot, -1))
            level_ranks.append(rk)
            level_flat.append(rk + d * K)
            prev = sc
            if not bool(torch.isfinite(sc).any()):
                break
            # no deeper node can beat the M-th best so far: every descendant of
            # this level scores <= this level's best (ties lose to shallower nodes)
            pool = sc if pool is None else torch.cat([pool, sc], 1).topk(min(M, pool.shape[1] + sc.shape[1]), 1).values
            if pool.shape[1] >= M and bool((sc[:, 0] <= pool[:, M - 1]).all()):
                break

    if not level_scores:
        return empty_trees(B, device)

    # Global best-first order over all levels. Candidates are laid out level by
    # level, so a stable descending sort puts a parent before a child with the
    # same score (possible when a drafter is certain: log q = 0).
    sizes = [s.shape[1] for s in level_scores]
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + s)
    all_scores = torch.cat(level_scores, dim=1)  # [B, L]
    L = all_scores.shape[1]
    all_ranks = torch.cat(level_ranks, dim=1)
    all_depths = torch.cat(
        [torch.full((B, s), d + 1, dtype=torch.long, device=device) for d, s in enumerate(sizes)],
        dim=1,
    )
    # parent as a flat candidate index (-1 = root)
    all_parent = torch.cat(
        [
            torch.where(ps >= 0, ps + (offsets[d - 1] if d > 0 else 0), ps)
            for d, ps in enumerate(level_parent_slot)
        ],
        dim=1,
    )
    order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices
    n_valid = torch.isfinite(all_scores).sum(dim=1)
    n = torch.clamp(n_valid, max=M)
    if num_nodes is not None:
        n = torch.minimum(n, torch.as_tensor(num_nodes, dtype=torch.long, device=device))
    width = min(M, L)
    order = order[:, :width]

    # position of every flat candidate in the sorted order (+1: root is column 0)
    pos = torch.full((B, L), -1, dtype=torch.long, device=device)
    pos.scatter_(1, order, torch.arange(1, width + 1, device=device).expand(B, width))

    sel_parent_flat = all_parent.gather(1, order)
    sel_flat = torch.cat(level_flat, dim=1).gather(1, order)
    sel_parent = torch.where(
        sel_parent_flat >= 0,
        pos.gather(1, sel_parent_flat.clamp(min=0)),
        torch.zeros_like(sel_parent_flat),
    )
    tokens = torch.cat(
        [torch.full((B, 1), -1, dtype=torch.long, device=device), toks.reshape(B, D * K).gather(1, sel_flat)], 1
    )
    parents = torch.cat(
        [torch.full((B, 1), -1, dtype=torch.long, device=device), sel_parent], 1
    )
    depths = torch.cat(
        [torch.zeros((B, 1), dtype=torch.long, device=device), all_depths.gather(1, order)], 1
    )
    ranks = torch.cat(
        [torch.zeros((B, 1), dtype=torch.long, device=device), all_ranks.gather(1, order)], 1
    )
    scores = torch.cat(
        [torch.zeros((B, 1), device=device), all_scores.gather(1, order)], 1
    )
    node_logq = torch.cat(
        [torch.full((B, 1), NEG_INF, device=device), logp.reshape(B, D * K).gather(1, sel_flat)], 1
    )
    classes = torch.cat(
        [torch.zeros((B, 1), dtype=torch.long, device=device), torch.cat(level_classes, dim=1).gather(1, order)], 1
    )
    trees = TreeBatch(tokens, parents, depths, ranks, scores, n.to(torch.long), node_logq, classes,
                      draft_logprobs=topk_logprobs, draft_tokens=topk_tokens)
    trees._pad_invalid()
    return trees


def _top1_chains(logp: torch.Tensor, toks: torch.Tensor, M: int, depth_limit: torch.Tensor,
                 num_nodes: torch.Tensor | None, class_values: torch.Tensor | None) -> TreeBatch:
    """build_best_first_trees for top-1 drafts (K = 1): every tree is the chain of
    the per-depth top-1 tokens, as long as its path score stays finite, within
    the depth limit, max_nodes and num_nodes. The same trees as the general
    builder (whose best-first order of a chain is depth order) without its
    per-depth loop; width 1 + the longest chain."""
    B, D, _ = logp.shape
    device = logp.device
    L = min(D, M)
    lq = logp[:, :L, 0]
    vals = lq if class_values is None else class_values[:, :L, 0, 0].float()  # path class 0
    scores = torch.cumsum(vals, dim=1)
    depth = torch.arange(1, L + 1, device=device)
    alive = torch.isfinite(scores) & (depth[None, :] <= depth_limit[:, None])
    n = alive.long().cumprod(dim=1).sum(dim=1)
    if num_nodes is not None:
        n = torch.minimum(n, torch.as_tensor(num_nodes, dtype=torch.long, device=device))
    W = 1 + int(n.max()) if B else 1

    def with_root(root, x):
        return torch.cat([torch.full((B, 1), root, dtype=x.dtype, device=device), x[:, : W - 1]], 1)

    cols = torch.arange(W - 1, device=device).expand(B, W - 1)
    trees = TreeBatch(
        tokens=with_root(-1, toks[:, :L, 0]),
        parents=with_root(-1, cols),
        depths=with_root(0, cols + 1),
        ranks=with_root(0, torch.zeros_like(cols)),
        scores=with_root(0.0, scores),
        num_nodes=n,
        node_logq=with_root(NEG_INF, lq),
        classes=with_root(0, torch.zeros_like(cols)))
    trees._pad_invalid()
    return trees


def empty_trees(B: int, device: torch.device | str = "cpu") -> TreeBatch:
    """B trees of the root alone."""
    z = torch.zeros((B, 1), dtype=torch.long, device=device)
    return TreeBatch(
        tokens=z - 1,
        parents=z - 1,
        depths=z.clone(),
        ranks=z.clone(),
        scores=torch.zeros((B, 1), device=device),
        num_nodes=torch.zeros(B, dtype=torch.long, device=device),
        node_logq=torch.full((B, 1), NEG_INF, device=device),
        classes=z.clone(),
    )


def path_classes(trees: TreeBatch, cap: int) -> torch.Tensor:
    """[B, W] number of non-top-1 choices on each node's path (itself
    included), capped at `cap`; 0 for the root, -1 for padding."""
    B, W = trees.tokens.shape
    valid = trees.valid_mask()
    cls = torch.zeros((B, W), dtype=torch.long, device=trees.tokens.device)
    off = (trees.ranks > 0).long()
    parents = trees.parents.clamp(min=0)
    max_depth = int(trees.depths.max().item()) if W > 1 else 0
    for d in range(1, max_depth + 1):
        at_d = (trees.depths == d) & valid
        cls = torch.where(at_d, (cls.gather(1, parents) + off).clamp(max=cap), cls)
    return cls.masked_fill(~valid, -1)


def ancestor_mask(trees: TreeBatch) -> torch.Tensor:
    """[B, W, W] bool: mask[b, i, j] is True iff column j is i itself or one of
    its ancestors (the root is everyone's ancestor). Padding rows see only
    themselves. Vectorized over the batch; one step per tree depth.
    """
    B, W = trees.tokens.shape
    device = trees.tokens.device
    eye = torch.eye(W, dtype=torch.bool, device=device).expand(B, W, W).clone()
    valid = trees.valid_mask()
    max_depth = int(trees.depths.max().item()) if trees.depths.numel() else 0
    mask = eye
    parents = trees.parents.clamp(min=0)
    for d in range(1, max_depth + 1):
        at_d = (trees.depths == d) & valid  # [B, W]
        if not bool(at_d.any()):
            continue
        parent_rows = mask.gather(1, parents[:, :, None].expand(B, W, W))
        mask = torch.where(at_d[:, :, None], parent_rows | eye, mask)
    return mask
