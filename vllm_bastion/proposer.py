"""BASTION's drafter: vLLM's own DFlash proposer, keeping top-k per depth.

Reuses vLLM's DFlash model code, checkpoint loading, context-KV precompute and
parallel query block unchanged. Two differences:
  * the query block is 1 + D wide (D = draft depth), independent of the tree
    budget that vLLM's `num_speculative_tokens` carries for the scheduler;
  * instead of sampling one draft token per depth, it keeps the top-k tokens
    and log-probs of every depth for the tree builder.
"""

from __future__ import annotations

import torch
from typing_extensions import override

from vllm.v1.spec_decode.dflash import DFlashProposer

from vllm_bastion.core.tree import topk_per_depth


class BastionProposer(DFlashProposer):
    def __init__(self, vllm_config, device, runner, *, draft_depth: int, topk: int):
        super().__init__(vllm_config, device, runner)
        if draft_depth > self.num_speculative_tokens:
            raise ValueError(
                f"draft depth {draft_depth} exceeds the drafter buffers sized for "
                f"{self.num_speculative_tokens} tokens"
            )
        self.draft_depth = draft_depth
        self.topk = topk
        self._last_topk: tuple[torch.Tensor, torch.Tensor] | None = None

    @override
    def propose(self, num_speculative_tokens, *args, **kwargs):
        # vLLM passes the scheduler's token count (the tree budget); the DFlash
        # query block is the draft depth.
        self._last_topk = None
        return super().propose(self.draft_depth, *args, **kwargs)

    @override
    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        logits = self.model.compute_logits(hidden_states)  # [B * D, V]
        vals, idx = topk_per_depth(logits, self.topk)
        D = self.draft_depth
        self._last_topk = (vals.view(-1, D, vals.shape[-1]), idx.view(-1, D, idx.shape[-1]))
        return idx[:, 0], None

    @override
    def dummy_run(self, *args, **kwargs):
        if getattr(self, "_bastion_skip_dummy", False):
            return None  # the calibration probe times the target alone
        return super().dummy_run(*args, **kwargs)

    def take_topk(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(log-probs [B, D, K], tokens [B, D, K]) of the last propose()."""
        out, self._last_topk = self._last_topk, None
        return out
