"""Random best-first trees for the pure-torch core tests."""

import torch

from vllm_bastion.core.tree import build_best_first_trees, topk_per_depth


def random_trees(B=6, D=6, K=4, max_nodes=20, seed=0, vocab=64, sharp=3.0):
    """Best-first trees of B requests from random drafter top-K per depth
    (logits scaled by `sharp`: larger is more confident), each truncated to
    a random node count in 0..max_nodes."""
    g = torch.Generator().manual_seed(seed)
    logp, tok = topk_per_depth(torch.randn(B, D, vocab, generator=g) * sharp, K)
    n = torch.randint(0, max_nodes + 1, (B,), generator=g)
    return build_best_first_trees(logp, tok, max_nodes=max_nodes, num_nodes=n)
