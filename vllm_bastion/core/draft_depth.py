"""How deep the drafter drafts this step (its query block). Pure torch / numpy.

A DFlash drafter predicts depths 1..D in one parallel forward over
[last token, MASK x D]. Its cost grows with D, and the block is non-causal,
so its shallow predictions depend on D too (measured on the shipped drafter:
a 5-position block accepts more at depths 2-4 than the 16-position one). The
budget uses only the nodes it plans; depths below a request's deepest planned
node are computed and thrown away.

So under the 'auto' budget the block follows the budget: each request
remembers how deep its last tree was planned, plus a margin so a tree that
wanted to grow deeper can (the block never binds a tree that stays within
the margin; one that reaches the block's end raises the next block by the
margin). A step drafts with one block for all its drafting requests: the
deepest any of them may use, capped by the drafter's depth. New requests and
re-probes start at the full depth, so what the gate measures is not limited
by an old, shallow tree.
"""

from __future__ import annotations

import numpy as np
import torch

MARGIN = 2  # depths drafted beyond a request's last planned tree


def step_block_depth(allowed: np.ndarray, max_depth: int) -> int:
    """The drafter depth of a step whose drafting requests may use `allowed`
    depths each: the largest of them, within [1, max_depth]."""
    if not len(allowed):
        return max_depth
    return int(min(max(int(np.max(allowed)), 1), max_depth))


def next_allowed_depth(planned_depth: torch.Tensor, max_depth: int, margin: int = MARGIN) -> np.ndarray:
    """[B] depths each request may draft next time: its planned tree's depth
    (0 for no tree) plus `margin`, capped by the drafter's depth."""
    d = planned_depth.to(torch.long).clamp(min=0) + margin
    return d.clamp(max=max_depth).numpy()


def planned_depths(depths: torch.Tensor) -> torch.Tensor:
    """[B] the deepest live node of each tree (`TreeBatch.depths`, -1 pads; 0: root only)."""
    return depths.max(dim=1).values.clamp(min=0)
