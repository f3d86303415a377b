"""Index math that makes an accepted tree path contiguous. Pure torch.

The verify batch holds, for each request, 1 + n rows: the root at row
`start` and the n tree nodes at rows start+1..start+n in best-first order.
The KV of row start+i was written to the slot of sequential position
p0 + i (each node needs its own slot), but the node's RoPE position is
p0 + depth. After the walk accepts the path (c_1, ..., c_k) (tree columns,
depth(c_j) = j), the engine continues as if a chain of k tokens had been
verified: it keeps the KV of positions p0+1..p0+k. So the accepted node c_j
must move from row start + c_j to row start + j, for the KV cache and for
every per-row activation the drafter reads (hidden states, positions, ids).

Because c_j >= j (a node at depth j sits after its j-1 ancestors in
best-first order), sources never precede destinations; a gather of all
sources followed by a scatter is always correct, even when a destination
is another pair's source.
"""

from __future__ import annotations

import torch


def compaction_pairs(
    row_starts: torch.Tensor, path_nodes: torch.Tensor, num_accepted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (src_rows, dst_rows) of the rows that must move.

    Args:
        row_starts: [B] row of each request's root in the verify batch.
        path_nodes: [B, Dmax] tree column of the j-th accepted node (-1 after).
        num_accepted: [B] accepted nodes per request.

    Returns two 1-D int64 tensors of equal length; pairs that would not move
    (c_j == j) are dropped.
    """
    B = row_starts.shape[0]
    if path_nodes.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=row_starts.device)
        return empty, empty
    Dm = path_nodes.shape[1]
    j = torch.arange(1, Dm + 1, device=path_nodes.device)[None, :].expand(B, Dm)
    live = (j <= num_accepted[:, None]) & (path_nodes != j)
    starts = row_starts[:, None].expand(B, Dm)
    src = (starts + path_nodes)[live]
    dst = (starts + j)[live]
    return src.long(), dst.long()


def permute_rows_(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """x[dst] = x[src] in place along dim 0 (gather first, then scatter)."""
    if src.numel():
        x[dst] = x[src]
