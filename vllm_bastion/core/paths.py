"""Path-dependent per-node data of a verify step's trees. Pure torch.

A tree node's row predicts the token that follows the request's committed
tokens plus the tokens on the node's own root path. Everything that depends
on the emitted history (penalties, bad words, min_tokens, the emitted-token
logprobs) must see, per row, that history, not the request's alone and not a
chain's. This module computes those per-row quantities for all trees of a
batch at once: no Python loop over requests or nodes, loops over tree depth
at most.

Rows are the step's sampled rows (core.step): request-major, and within a
request the tree columns 0..num_nodes in layout order (column 0 is the root,
whose token is the last committed one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import TreeBatch


@dataclass
class RowLayout:
    """Which request, tree column and depth every sampled row belongs to."""

    req: torch.Tensor  # [R] int64 batch index
    col: torch.Tensor  # [R] int64 tree column (0 = root)
    depth: torch.Tensor  # [R] int64 path length (tokens after the committed history)

    @property
    def num_rows(self) -> int:
        return int(self.req.numel())


def row_layout(trees: TreeBatch) -> RowLayout:
    B, W = trees.tokens.shape
    dev = trees.tokens.device
    cols = torch.arange(W, device=dev)[None, :].expand(B, W)
    live = cols <= trees.num_nodes[:, None]
    req = torch.arange(B, device=dev)[:, None].expand(B, W)
    return RowLayout(req[live], cols[live], trees.depths[live].clamp(min=0))


def path_tokens(trees: TreeBatch) -> torch.Tensor:
    """[B, W, D] the tokens on every column's root path, root excluded, in
    depth order: [b, i, k] is the token of i's ancestor-or-self at depth k+1;
    -1 beyond the column's depth (D = deepest node, at least 1)."""
    B, W = trees.tokens.shape
    dev = trees.tokens.device
    depths = trees.depths.clamp(min=0)
    D = max(int(depths.max()) if depths.numel() else 0, 1)
    out = torch.full((B, W, D + 1), -1, dtype=torch.long, device=dev)  # slot D: discard
    cur = torch.arange(W, device=dev)[None, :].expand(B, W).clone()
    parents = trees.parents.clamp(min=0)
    for _ in range(D):
        d = depths.gather(1, cur)
        live = d > 0
        if not bool(live.any()):
            break
        slot = torch.where(live, d - 1, torch.full_like(d, D))
        out.scatter_(2, slot[..., None], trees.tokens.gather(1, cur)[..., None])
        cur = torch.where(live, parents.gather(1, cur), cur)
    return out[..., :D]


def row_path_tokens(trees: TreeBatch, layout: RowLayout) -> torch.Tensor:
    """[R, D] path tokens of every sampled row (see `path_tokens`)."""
    return path_tokens(trees)[layout.req, layout.col]


def history_tails(committed_tail: torch.Tensor, layout: RowLayout,
                  row_paths: torch.Tensor) -> torch.Tensor:
    """[R, K] the last K tokens of every row's history (committed tokens, then
    its path tokens), right-aligned, -1 where the history is shorter.

    Args:
        committed_tail: [B, K] each request's last K committed (output) tokens,
            right-aligned, -1 padded on the left.
        row_paths: [R, D] from `row_path_tokens`.
    """
    K = committed_tail.shape[1]
    if K == 0:
        return committed_tail.new_empty((layout.num_rows, 0))
    both = torch.cat([committed_tail[layout.req], row_paths], dim=1)  # [R, K + D]
    idx = layout.depth[:, None] + torch.arange(K, device=both.device)[None, :]
    return both.gather(1, idx)


def ragged_pairs(row_group: torch.Tensor, group_start: torch.Tensor,
                 group_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All (row, item) pairs where item is one of the items of the row's group.

    Items are stored grouped: group g owns items group_start[g] ..
    group_start[g] + group_count[g] - 1. Returns (pair_row, pair_item), both [P].
    """
    n = group_count[row_group]
    pair_row = torch.repeat_interleave(torch.arange(row_group.numel(), device=row_group.device), n)
    first = torch.cumsum(n, 0) - n  # first pair of each row
    offset = torch.arange(pair_row.numel(), device=row_group.device) - first[pair_row]
    return pair_row, group_start[row_group][pair_row] + offset


def bad_word_bans(tails: torch.Tensor, row_group: torch.Tensor, prefixes: torch.Tensor,
                  last_tokens: torch.Tensor, group_start: torch.Tensor,
                  group_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, tokens) to ban: a bad word's last token is banned at a row whose
    history ends with the word's other tokens (vLLM's rule, per row).

    Args:
        tails: [R, K] from `history_tails`.
        row_group: [R] the group (request) of each row.
        prefixes: [Nw, K] every bad word but its last token, right-aligned,
            -2 on the left (matches anything), grouped by request.
        last_tokens: [Nw] every bad word's last token.
        group_start / group_count: [G] where each request's words are.
    """
    rows, words = ragged_pairs(row_group, group_start, group_count)
    if rows.numel() == 0:
        return rows, rows
    pre = prefixes[words]
    ok = ((tails[rows] == pre) | (pre == -2)).all(dim=1)
    return rows[ok], last_tokens[words[ok]]


def below_min_tokens(num_committed: torch.Tensor, min_tokens: torch.Tensor,
                     layout: RowLayout) -> torch.Tensor:
    """[R] bool: rows whose token would be the request's output token number
    num_committed + depth + 1 <= min_tokens (stop tokens must stay masked)."""
    return num_committed[layout.req] + layout.depth < min_tokens[layout.req]


def output_columns(path_nodes: torch.Tensor, num_accepted: torch.Tensor,
                   width: int) -> torch.Tensor:
    """[B, width] the tree column whose row predicted each emitted token (the
    walk's output layout): the root for the first, the j-th accepted node for
    token j + 1, so the bonus comes from the deepest accepted node; 0 past
    the bonus."""
    B = num_accepted.shape[0]
    cols = torch.zeros((B, width), dtype=torch.long, device=path_nodes.device)
    n = min(path_nodes.shape[1], width - 1)
    cols[:, 1 : 1 + n] = path_nodes[:, :n].clamp(min=0)
    j = torch.arange(width, device=cols.device)[None, :]
    return torch.where(j <= num_accepted[:, None], cols, torch.zeros_like(cols))


def keep_columns(trees: TreeBatch, keep: torch.Tensor) -> TreeBatch:
    """The trees restricted to the kept columns (an ancestor-closed set, root
    always kept), compacted in their order; parents are re-indexed. Any prefix
    of the result is still a tree (parents precede children)."""
    B, W = trees.tokens.shape
    keep = (keep & trees.valid_mask()).clone()
    keep[:, 0] = True
    new_idx = torch.cumsum(keep.long(), dim=1) - 1  # old column -> new column
    n_new = keep.sum(dim=1)
    cols = torch.arange(W, device=keep.device).expand(B, W)
    order = torch.where(keep, cols, cols + W).argsort(dim=1, stable=True)  # new -> old

    def g(x):
        return None if x is None else x.gather(1, order)

    old_par = trees.parents.gather(1, order)
    parents = torch.where(old_par >= 0, new_idx.gather(1, old_par.clamp(min=0)), old_par)
    out = TreeBatch(tokens=g(trees.tokens), parents=parents, depths=g(trees.depths),
                    ranks=g(trees.ranks), scores=g(trees.scores), num_nodes=n_new - 1,
                    node_logq=g(trees.node_logq), classes=g(trees.classes))
    out._pad_invalid()
    return out
