"""The target's token at every verified row, under each request's own sampling.

Greedy rows take vLLM's own greedy argmax. Sampled rows apply exactly vLLM's
processing (temperature, then top-k/top-p with vLLM's functions) and draw one
token from the resulting distribution with the exponential race vLLM uses.

Randomness. The walk is lossless as long as draws at different depths are
independent. For a request with a seed, the noise of a row is keyed by
(seed, absolute position of the token it predicts), so a seeded request's
output depends only on its seed and prompt: not on the tree shapes, the
batch it shares, or the number of steps. Requests without a seed draw fresh
noise per row.
"""

from __future__ import annotations

import torch

from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm.v1.sample.sampler import _SAMPLING_EPS, Sampler

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_seed(seed: int, position: int) -> int:
    """63-bit generator seed for (request seed, predicted token position)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ position) >> 1


def target_tokens(
    logits: torch.Tensor,
    rows_per_req: torch.Tensor,
    sampling_metadata,
    seeds: list[int | None],
    row_positions: torch.Tensor,
) -> torch.Tensor:
    """One target token per logits row.

    Args:
        logits: [R, V] target logits of every verified row (request-major).
        rows_per_req: [B] rows of each request (1 + its draft nodes).
        sampling_metadata: the input batch's vLLM SamplingMetadata (per request).
        seeds: per request, its seed or None.
        row_positions: [R] absolute position of the token each row predicts.
    """
    logits = logits.to(torch.float32, copy=True)  # processed in place below
    counts = rows_per_req.to(logits.device)
    sm = sampling_metadata
    greedy = None
    if not sm.all_random:
        greedy = Sampler.greedy_sample(logits)
        if sm.all_greedy:
            return greedy.long()

    temp = sm.temperature.to(logits.device).repeat_interleave(counts)
    lg = Sampler.apply_temperature(logits, temp, sm.all_random)
    k = sm.top_k.to(logits.device).repeat_interleave(counts) if sm.top_k is not None else None
    p = sm.top_p.to(logits.device).repeat_interleave(counts) if sm.top_p is not None else None
    lg = apply_top_k_top_p(lg, k, p)
    probs = lg.softmax(dim=-1, dtype=torch.float32)

    q = torch.empty_like(probs)
    q.exponential_()
    starts = torch.cumsum(counts, 0) - counts
    positions = row_positions.tolist()
    for b, seed in enumerate(seeds):
        if seed is None:
            continue
        s = int(starts[b])
        for r in range(s, s + int(counts[b])):
            g = torch.Generator(device=probs.device)
            g.manual_seed(position_seed(seed, positions[r]))
            q[r].exponential_(generator=g)
    sampled = probs.div_(q).argmax(dim=-1)
    if greedy is None:
        return sampled.long()
    return torch.where(temp < _SAMPLING_EPS, greedy.long(), sampled.long())
