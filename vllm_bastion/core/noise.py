"""Counter-based random noise for seeded sampling, vectorized. Pure torch.

A seeded request's draw for the token at absolute position p must depend on
(seed, p) only, not on how many rows, trees or requests share the step, so
that its output is a function of its seed and prompt. Instead of one
torch.Generator per row (a Python loop and one launch per row), every
(row, vocabulary entry) gets a uniform number from a stateless integer hash
of (seed, position, token id), computed for all rows at once on any device.

The hash works on 32-bit lanes held in int64 tensors (every product stays
below 2**63, so no signed overflow happens on any backend): two rounds of
the `lowbias32` mixer (Chris Wellons' hash-prospector) over the seed's two
halves, the position and the token id. Uniforms are (h + 0.5) / 2**32 in
float64, exponentials -log(u); the exponential race argmax(p / E) then
draws a token with probability p exactly as vLLM's sampler does with its
own noise.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return ((lo * c) + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R] 32-bit key per (seed, position); seeds are any int64 values."""
    s = seeds.to(torch.int64)
    lo = s & _M32
    hi = (s >> 32) & _M32
    k = _mix(lo ^ _mix(hi ^ _GOLDEN))
    return _mix(k ^ (positions.to(torch.int64) & _M32))


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] float64 uniforms in (0, 1), one per (row, token id)."""
    key = row_keys(seeds, positions)[:, None]
    tok = torch.arange(vocab_size, dtype=torch.int64, device=key.device)[None, :]
    h = _mix(_mix(key ^ _mul32(tok, _GOLDEN)) ^ key)
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def seeded_exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[R, V] Exp(1) noise keyed by (seed, position, token id)."""
    return (-torch.log(seeded_uniform(seeds, positions, vocab_size))).to(dtype)
