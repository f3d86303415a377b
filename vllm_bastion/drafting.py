"""Running vLLM's DFlash drafter for the requests that draft, and only them (vLLM glue).

vLLM runs its drafter for every request of every step: the drafter's K/V of
the newly verified tokens (its *context*) is written, then one parallel
forward over [last token, MASK x D] per request gives the draft. BASTION
decides per request and step whether drafting pays (core/gating.py), so
here:

  * requests that draft: their context rows of this step, preceded by any
    *backlog* (target features of tokens verified while they were not
    drafting), go through vLLM's own DFlash proposer as one sub-batch:
    context K/V precompute and query forward, exactly vLLM's code;
  * decoding requests that do not draft: their context rows' target features
    (the concatenated aux hidden states, a copy) and positions are appended to
    their backlog; nothing else runs. The backlog is written into the
    drafter's cache when the request drafts again (or, if it outgrows its
    capacity, by itself), so the drafter then sees exactly the context it
    would have seen without the pause;
  * prompt chunks of requests that do not draft: their context is written at
    once (the K/V projection only, no query forward), so backlogs hold decode
    tokens only.
When no request drafts and no context is due, the drafter does not run.
"""

from __future__ import annotations

from copy import copy

import numpy as np
import torch


class Backlog:
    """Per-request target features whose drafter K/V is not written yet.

    Device buffers [slots, capacity, F] / [slots, capacity]; slot = the
    request's backlog slot (RequestTable column `slot`); fill counts on the host.
    """

    def __init__(self, slots: int, capacity: int, feat_dim: int, dtype, device):
        self.capacity = capacity
        self.feats = torch.zeros(slots, capacity, feat_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(slots, capacity, dtype=torch.long, device=device)
        self.count = np.zeros(slots, dtype=np.int64)

    def append(self, slots: np.ndarray, counts: np.ndarray, feats: torch.Tensor,
               pos: torch.Tensor) -> None:
        """feats [sum(counts), F] / pos in request order, `counts[i]` rows for slots[i]."""
        if not len(slots):
            return
        off = np.repeat(self.count[slots] - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
        sl = np.repeat(slots, counts)
        idx_s = torch.from_numpy(sl).to(self.feats.device)
        idx_o = torch.from_numpy(off).to(self.feats.device)
        self.feats[idx_s, idx_o] = feats.to(self.feats.dtype)
        self.pos[idx_s, idx_o] = pos.to(torch.long)
        self.count[slots] += counts

    def take(self, slots: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(counts [len(slots)], feats [sum, F], pos [sum]) and empty those slots."""
        counts = self.count[slots].copy()
        if not counts.sum():
            F = self.feats.shape[2]
            return counts, self.feats.new_zeros((0, F)), self.pos.new_zeros(0)
        sl = np.repeat(slots, counts)
        off = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        idx_s = torch.from_numpy(sl).to(self.feats.device)
        idx_o = torch.from_numpy(off).to(self.feats.device)
        out = self.feats[idx_s, idx_o], self.pos[idx_s, idx_o]
        self.count[slots] = 0
        return counts, out[0], out[1]

    def clear(self, slots) -> None:
        self.count[np.asarray(list(slots), dtype=np.int64)] = 0


def ragged_concat(a_counts: np.ndarray, a: torch.Tensor, b_counts: np.ndarray,
                  b: torch.Tensor) -> torch.Tensor:
    """Per request i: a's a_counts[i] rows then b's b_counts[i] rows (request
    order), one gather; one side empty (no backlog: the common case) returns
    the other as is."""
    if not a_counts.any():
        return b
    if not b_counts.any():
        return a
    n = a_counts + b_counts
    start = np.cumsum(n) - n
    a_dst = np.repeat(start, a_counts) + (np.arange(a_counts.sum()) - np.repeat(np.cumsum(a_counts) - a_counts, a_counts))
    b_dst = np.repeat(start + a_counts, b_counts) + (np.arange(b_counts.sum()) - np.repeat(np.cumsum(b_counts) - b_counts, b_counts))
    out = a.new_empty((int(n.sum()),) + tuple(a.shape[1:])) if a.numel() or not b.numel() else \
        b.new_empty((int(n.sum()),) + tuple(b.shape[1:]))
    if len(a_dst):
        out[torch.from_numpy(a_dst).to(out.device)] = a.to(out.dtype)
    if len(b_dst):
        out[torch.from_numpy(b_dst).to(out.device)] = b.to(out.dtype)
    return out


def ragged_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat row indices: for each i, starts[i] .. starts[i] + counts[i] - 1."""
    return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())


def sub_batch_metadata(cad, reqs: np.ndarray, ctx_counts: np.ndarray, ctx_end: np.ndarray, device):
    """CommonAttentionMetadata of a sub-batch for the DFlash proposer: request
    i = cad's request reqs[i] with ctx_counts[i] context rows ending at
    position ctx_end[i] - 1 (its block table row is cad's)."""
    sub = copy(cad)
    B = len(reqs)
    qsl = np.zeros(B + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(ctx_counts)
    idx = torch.from_numpy(reqs).to(cad.block_table_tensor.device)
    sub.query_start_loc_cpu = torch.from_numpy(qsl)
    sub.query_start_loc = sub.query_start_loc_cpu.to(device)
    seq = torch.from_numpy(ctx_end.astype(np.int32))
    sub.seq_lens = seq.to(device)
    sub.seq_lens_cpu_upper_bound = seq
    sub.num_reqs = B
    sub.num_actual_tokens = int(qsl[-1])
    sub.max_query_len = int(ctx_counts.max()) if B else 0
    sub.max_seq_len = int(ctx_end.max()) if B else 0
    sub.block_table_tensor = cad.block_table_tensor[idx]
    sub.slot_mapping = cad.slot_mapping[: int(qsl[-1])]  # unused: DFlash derives slots
    sub.positions = None
    sub.is_prefilling = None
    sub.dcp_local_seq_lens = None
    sub.dcp_local_seq_lens_cpu_upper_bound = None
    return sub


def context_slots(block_table: torch.Tensor, reqs: torch.Tensor, pos: torch.Tensor,
                  block_size: int) -> torch.Tensor:
    """KV slot of position pos[i] of batch row reqs[i]."""
    blk = block_table[reqs, pos // block_size].long()
    return blk * block_size + pos % block_size
