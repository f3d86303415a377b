"""Tree policies: how a step's draft tree is grown from the drafter's top-k,
and what is learned from the walk. Pure torch.

A policy is one object with

    build(topk_logprobs [B, D, K], topk_tokens [B, D, K], max_nodes, state) -> TreeBatch
    observe(trees, walk_result, state) -> None
    new_state(batch_size, device) -> dict of [B, ...] tensors, or None

`TreeBatch.scores` are log P^(u), best-first, ancestor-closed (any prefix is a
tree), so the runtime budget (core.budget) can truncate them by the same
surrogate S(T) = sum P^(u).

Baselines kept for comparison (the replay lab evaluates them and the new
policy through this same interface):
  * `ChainPolicy`: the top-1 chain of the first `depth` depths (vLLM's DFlash);
  * `BestFirstPolicy`: BASTION's published rule (raw path confidence), or, with
    an `AcceptanceCalibrator`, the calibrated rule exactly as the runner calls it.
"""

from __future__ import annotations

import torch

from vllm_bastion.core.acceptance import NUM_CLASSES, AcceptanceCalibrator
from vllm_bastion.core.tree import TreeBatch, build_best_first_trees, path_classes
from vllm_bastion.core.walk import WalkResult


class ChainPolicy:
    """The top-1 chain, depth-capped: min(max_nodes, depth) nodes."""

    def __init__(self, depth: int | None = None):
        self.depth = depth

    def new_state(self, batch_size: int, device="cpu"):
        return None

    def build(self, topk_logprobs, topk_tokens, max_nodes, state=None) -> TreeBatch:
        D = topk_logprobs.shape[1] if self.depth is None else min(self.depth, topk_logprobs.shape[1])
        return build_best_first_trees(topk_logprobs[:, :D, :1], topk_tokens[:, :D, :1], min(max_nodes, D))

    def observe(self, trees: TreeBatch, result: WalkResult, state=None) -> None:
        pass


class BestFirstPolicy:
    """BASTION's best-first rule as the runner runs it: raw path confidence,
    or (calibrator given) the online-calibrated class values, updated from
    every walk's tested nodes. topk is capped at max_nodes, as the proposer does."""

    def __init__(self, calibrator: AcceptanceCalibrator | None = None, topk: int | None = None):
        self.calibrator = calibrator
        self.topk = topk

    def new_state(self, batch_size: int, device="cpu"):
        return None

    def build(self, topk_logprobs, topk_tokens, max_nodes, state=None) -> TreeBatch:
        K = topk_logprobs.shape[2]
        k = min(K, max_nodes, self.topk or K)
        logp, toks = topk_logprobs[:, :, :k], topk_tokens[:, :, :k]
        cal = self.calibrator
        return build_best_first_trees(logp, toks, max_nodes=max_nodes,
                                      class_values=cal.class_values(logp) if cal is not None else None)

    def observe(self, trees: TreeBatch, result: WalkResult, state=None) -> None:
        cal = self.calibrator
        if cal is not None and trees.node_logq is not None:
            t = result.tested_mask
            cal.update(trees.depths[t], trees.node_logq[t], result.accepted_mask[t],
                       path_classes(trees, NUM_CLASSES - 1)[t])
