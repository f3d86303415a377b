"""The drafter's block follows the budget's trees (core/draft_depth.py)."""

import numpy as np
import torch

from vllm_bastion.core.draft_depth import MARGIN, next_allowed_depth, planned_depths, step_block_depth
from vllm_bastion.core.tree import build_best_first_trees


def test_step_block_is_the_deepest_allowed_within_the_drafter():
    assert step_block_depth(np.array([3, 7, 2]), 15) == 7
    assert step_block_depth(np.array([40]), 15) == 15
    assert step_block_depth(np.array([0]), 15) == 1
    assert step_block_depth(np.array([], dtype=np.int64), 15) == 15


def test_a_tree_reaching_the_block_end_raises_the_next_block():
    # planned depths 0 (no tree), 2, 5 (the block's end), 15
    allowed = next_allowed_depth(torch.tensor([0, 2, 5, 15]), 15)
    assert allowed.tolist() == [MARGIN, 2 + MARGIN, 5 + MARGIN, 15]
    assert step_block_depth(allowed[2:3], 15) > 5


def test_planned_depths_of_truncated_best_first_trees():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 6, 4), dim=-1).sort(dim=-1, descending=True).values
    toks = torch.arange(4).expand(3, 6, 4).contiguous()
    trees = build_best_first_trees(logp, toks, max_nodes=12)
    cut = trees.truncate(torch.tensor([0, 1, 12]))
    d = planned_depths(cut.depths)
    assert d[0] == 0 and d[1] == 1
    live = cut.depths[2, 1 : 1 + int(cut.num_nodes[2])]
    assert d[2] == int(live.max()) and 1 <= d[2] <= 6
