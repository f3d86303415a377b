"""BASTION's per-step tree statistics (stats.py), without an engine."""

import numpy as np
import torch

from vllm_bastion.stats import StatsLogger


def test_step_statistics_count_trees_by_depth_and_skip_requests_without_a_tree():
    log = StatsLogger(interval_s=0)
    # request 1 verified no tree this step (0 nodes): left out
    log.observe_step(torch.tensor([4, 0, 2]), torch.tensor([2, 0, 0]), torch.tensor([1, 0, 0]),
                     torch.tensor([3, 0, 1]))
    log.observe_step(np.array([3]), np.array([3]), np.array([3]), np.array([3]))
    log.observe_step(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                     torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    for st in (log.total, log.window):
        assert (st.steps, st.trees, st.nodes, st.accepted, st.chain_accepted) == (2, 3, 9, 5, 4)
        assert st.max_depth_sum == 7
        assert st.accepted_by_depth == [2, 2, 1]  # trees that accepted a node at depth j + 1
        assert st.trees_by_depth == [3, 2, 2]  # trees reaching depth j + 1
