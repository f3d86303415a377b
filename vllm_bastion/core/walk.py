"""The acceptance walk over a verified draft tree. Pure torch.

For every tree column i the target gives one token x_i: its argmax (greedy)
or one sample from its own processed distribution at that node (sampling).
The walk starts at the root; if x_root equals the token of one of the root's
children it descends into that child and repeats; the first x that matches no
child is emitted as the bonus token.

Every emitted token is the target's own choice at a node whose context is
exactly the already-emitted prefix, and children of a node carry distinct
tokens (they are distinct top-k entries of one depth), so at most one child
can match. Hence the output is distributed exactly as autoregressive decoding
with the target (lossless), for greedy and for sampling alike, provided the
x_i at different depths are drawn independently.

Vectorized over the batch, without a loop over tree depth (pointer jumping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_bastion.core.tree import TreeBatch

PLACEHOLDER = -1


@dataclass
class WalkResult:
    output_tokens: torch.Tensor  # [B, 1 + max_depth] accepted path tokens, bonus, then -1
    num_accepted: torch.Tensor  # [B] accepted draft nodes (bonus excluded)
    path_nodes: torch.Tensor  # [B, max_depth] tree column of the j-th accepted node, -1 after
    last_node: torch.Tensor  # [B] column of the deepest accepted node (0 = root)
    chain_accepted: torch.Tensor  # [B] what a chain of the top-1 drafts would have accepted
    accepted_mask: torch.Tensor  # [B, W] accepted columns (root included)
    tested_mask: torch.Tensor  # [B, W] draft nodes whose parent was accepted (each was
    #                              tested against the target's choice at its parent)


def _target_of(trees: TreeBatch, target_tokens: torch.Tensor) -> torch.Tensor:
    """The target's tokens as int64 on the trees' device, checked to be [B, W]."""
    target = target_tokens.to(device=trees.tokens.device, dtype=torch.long)
    if target.shape != trees.tokens.shape:
        raise ValueError(
            f"target_tokens must be [batch, 1 + max_nodes] = {tuple(trees.tokens.shape)}, got "
            f"{tuple(target.shape)}"
        )
    return target


def accept_walk(trees: TreeBatch, target_tokens: torch.Tensor,
                max_depth: int | None = None, chains: bool = False) -> WalkResult:
    """Walk every tree with the target's per-node tokens.

    Args:
        trees: the verified trees ([B, W] tensors, see `TreeBatch`); every
            node's parent precedes it.
        target_tokens: [B, W] int, the target's token at every tree column
            (column 0 = root). Values in padding columns are ignored.
        max_depth: the trees' deepest node, if the caller knows it (saves a
            device-to-host read); default: read from trees.depths.
        chains: the caller knows every tree is a chain (column i at depth i,
            parent i - 1): the same walk as `accept_chain_walk`, in fewer
            operations.

    Vectorized without a loop over depth: a node is accepted iff it and all
    its ancestors matched, computed by pointer jumping (log2(depth) rounds);
    the accepted nodes are one root path (siblings carry distinct tokens), so
    each depth's accepted node is scattered into the path directly.
    """
    if chains:
        return accept_chain_walk(trees, target_tokens)
    B, W = trees.tokens.shape
    device = trees.tokens.device
    target = _target_of(trees, target_tokens)
    valid = trees.valid_mask()
    parents = trees.parents.clamp(min=0)  # the root (and padding) point at the root
    depths = trees.depths
    if max_depth is None:
        max_depth = int(depths.max().item()) if W > 1 else 0

    # a node matches iff its token is what the target chose at its parent
    match = valid & (trees.tokens == target.gather(1, parents))
    match[:, 0] = True
    on_chain = valid & (trees.ranks == 0)
    on_chain[:, 0] = True
    accepted, chain_ok = match, match & on_chain
    anc = parents
    for _ in range(max(1, max_depth).bit_length()):
        accepted = accepted & accepted.gather(1, anc)
        chain_ok = chain_ok & chain_ok.gather(1, anc)
        anc = anc.gather(1, anc)

    acc_depth = torch.where(accepted, depths, torch.full_like(depths, -1))
    num_accepted = acc_depth.max(dim=1).values.clamp(min=0)
    last_node = acc_depth.argmax(dim=1)
    chain_depth = torch.where(chain_ok, depths, torch.full_like(depths, -1))
    chain_accepted = chain_depth.max(dim=1).values.clamp(min=0)

    # the accepted path: the accepted node of every depth 1..num_accepted
    Dm = max(max_depth, 1)
    cols = torch.arange(W, device=device).expand(B, W)
    on_path = accepted & (depths >= 1)
    slot = torch.where(on_path, depths - 1, torch.full_like(depths, Dm))  # Dm: dropped
    path = torch.full((B, Dm + 1), -1, dtype=torch.long, device=device)
    path.scatter_(1, slot, torch.where(on_path, cols, torch.full_like(cols, -1)))
    path = path[:, :Dm]

    out = torch.full((B, max_depth + 1), PLACEHOLDER, dtype=torch.long, device=device)
    j = torch.arange(max_depth + 1, device=device)[None, :]
    path_pad = torch.cat([path, torch.zeros((B, 1), dtype=torch.long, device=device)], 1)
    path_tokens = trees.tokens.gather(1, path_pad[:, : max_depth + 1].clamp(min=0))
    out = torch.where(j < num_accepted[:, None], path_tokens, out)
    bonus = target.gather(1, last_node[:, None])
    out.scatter_(1, num_accepted[:, None], bonus)
    tested = valid & (depths >= 1) & accepted.gather(1, parents)
    return WalkResult(
        output_tokens=out,
        num_accepted=num_accepted,
        path_nodes=path[:, :max_depth] if max_depth else path[:, :0],
        last_node=last_node,
        chain_accepted=chain_accepted,
        accepted_mask=accepted,
        tested_mask=tested,
    )


def accept_chain_walk(trees: TreeBatch, target_tokens: torch.Tensor) -> WalkResult:
    """accept_walk for trees that are chains (column i = depth i, parent i - 1:
    top-1 drafts, or spine-first trees without branch rows): a node is
    accepted iff every node up to it matched, one cumulative product. The
    same result as accept_walk, in fewer operations."""
    B, W = trees.tokens.shape
    device = trees.tokens.device
    target = _target_of(trees, target_tokens)
    n = trees.num_nodes.to(device)
    max_depth = int(n.max()) if B else 0
    cols = torch.arange(W, device=device)
    valid = cols[None, :] <= n[:, None]
    match = valid[:, 1:] & (trees.tokens[:, 1:] == target[:, :-1])
    accepted = torch.cat([valid[:, :1], match.long().cumprod(dim=1).bool()], dim=1)
    num_accepted = accepted[:, 1:].sum(dim=1)
    j = cols[None, : max_depth + 1]
    drafts = torch.nn.functional.pad(trees.tokens[:, 1:], (0, 1), value=PLACEHOLDER)
    out = torch.where(j < num_accepted[:, None], drafts[:, : max_depth + 1], PLACEHOLDER)
    out.scatter_(1, num_accepted[:, None], target.gather(1, num_accepted[:, None]))
    path = torch.where(j[:, 1:] <= num_accepted[:, None], j[:, 1:], -1)
    tested = valid & (cols[None, :] >= 1) & accepted.roll(1, dims=1)
    top1 = (match & (trees.ranks[:, 1:] == 0)).long().cumprod(dim=1).sum(dim=1)
    return WalkResult(
        output_tokens=out,
        num_accepted=num_accepted,
        path_nodes=path,
        last_node=num_accepted.clone(),
        chain_accepted=top1,
        accepted_mask=accepted,
        tested_mask=tested,
    )


def greedy_walk_reference(
    tokens: list[int], parents: list[int], target: list[int]
) -> list[int]:
    """Straightforward per-node reference of the walk for one tree (tests)."""
    children: dict[int, dict[int, int]] = {}
    for i in range(1, len(tokens)):
        children.setdefault(parents[i], {})[tokens[i]] = i
    out = []
    node = 0
    while True:
        x = target[node]
        nxt = children.get(node, {}).get(x)
        out.append(x)
        if nxt is None:
            return out
        node = nxt
