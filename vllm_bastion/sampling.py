"""The target's token at every verified row, under each request's own sampling.

Greedy rows take vLLM's greedy rule (argmax, first index on ties) on the
logits as they are: no float32 copy. Sampled rows (only those) get exactly
vLLM's processing (temperature, then top-k/top-p with vLLM's functions) and
draw one token from the resulting distribution with the exponential race
vLLM uses.

Randomness. The walk is lossless as long as draws at different depths are
independent. For a request with a seed, the noise of a row is keyed by
(seed, absolute position of the token it predicts, token id) through a
stateless hash (core.noise), so a seeded request's output depends only on
its seed and prompt: not on the tree shapes, the batch it shares, or the
number of steps. Requests without a seed draw from the global generator
(seeded identically on every TP rank, as vLLM's own sampler).
"""

from __future__ import annotations

import torch

from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm.v1.sample.sampler import _SAMPLING_EPS

from vllm_bastion.core.noise import seeded_exponential


def target_tokens(
    logits: torch.Tensor,
    rows_per_req: torch.Tensor,
    sampling_metadata,
    seeds: tuple[torch.Tensor, torch.Tensor] | None,
    row_positions: torch.Tensor,
    return_processed: bool = False,
):
    """One target token per logits row (int64 [R]).

    Args:
        logits: [R, V] target logits of every verified row (request-major).
        rows_per_req: [B] (CPU) rows of each request (1 + its draft nodes).
        sampling_metadata: the input batch's vLLM SamplingMetadata (per request).
        seeds: None, or (seed [B] int64, has_seed [B] bool), both on the CPU.
        row_positions: [R] (CPU) absolute position of the token each row predicts.
        return_processed: also return the logits the tokens were chosen from
            (vLLM's processed logprobs: the logits as given for an all-greedy
            batch, else after temperature and top-k/top-p), as (tokens, logits).

    No host synchronization: which rows are seeded is known on the host.
    """
    tok, processed = _target_tokens(logits, rows_per_req, sampling_metadata, seeds, row_positions)
    return (tok, processed) if return_processed else tok


def _target_tokens(logits, rows_per_req, sampling_metadata, seeds, row_positions):
    sm = sampling_metadata
    greedy = logits.argmax(dim=-1)
    if sm.all_greedy:
        return greedy.long(), logits
    dev = logits.device
    counts = rows_per_req.cpu()
    temp = sm.temperature.to(dev).repeat_interleave(counts.to(dev))
    # a float32 copy (the input may be needed later, e.g. for raw logprobs)
    lg = logits.to(torch.float32, copy=logits.dtype == torch.float32).div_(
        torch.where(temp < _SAMPLING_EPS, 1.0, temp).unsqueeze(1))  # as vLLM's sampler
    k = sm.top_k.to(dev).repeat_interleave(counts.to(dev)) if sm.top_k is not None else None
    p = sm.top_p.to(dev).repeat_interleave(counts.to(dev)) if sm.top_p is not None else None
    lg = apply_top_k_top_p(lg, k, p)
    probs = lg.softmax(dim=-1, dtype=torch.float32)  # a new tensor: lg stays

    q = torch.empty_like(probs).exponential_()
    if seeds is not None:
        seed_vals, has_seed = seeds
        seeded_row = has_seed.cpu().repeat_interleave(counts)
        srows = seeded_row.nonzero().squeeze(1)  # host
        if srows.numel():
            req_of_row = torch.arange(counts.numel()).repeat_interleave(counts)[srows]
            q[srows.to(dev)] = seeded_exponential(
                seed_vals.cpu()[req_of_row].to(dev), row_positions.cpu()[srows].to(dev),
                probs.shape[1])
    sampled = probs.div_(q).argmax(dim=-1)
    if sm.all_random:
        return sampled.long(), lg
    return torch.where(temp < _SAMPLING_EPS, greedy, sampled).long(), lg
