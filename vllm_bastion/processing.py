"""vLLM's logits processing and logprobs, per tree node.

vLLM's sampler processes a request's logits row with the request's emitted
history: presence / frequency / repetition penalties count the output tokens,
a bad word's last token is banned after its prefix, `min_tokens` keeps stop
tokens masked while too few tokens were emitted. On a verify tree the history
of a node's row is the request's committed output plus the tokens on the
node's own root path (core/paths.py), so each row is processed with exactly
the history autoregressive decoding would have had at that point. The order
and arithmetic are vLLM's own (`Sampler.apply_logits_processors`): allowed
token ids, bad words, min_tokens, penalties. Structured-output grammar masks
were already applied to the logits by vLLM (`apply_grammar_bitmask`, rows
computed per node on the scheduler side, vllm_bastion/structured_trees.py).

Everything is vectorized over the batch's trees; per request there is at most
a loop over the requests that use a feature (building small tables), as in
vLLM itself. Only the rows of requests that use a feature are touched.

Logprobs (`tree_logprobs`): the emitted tokens' logprobs come from the rows
that predicted them (the root, then each accepted node), in vLLM's
`logprobs_mode`: raw modes from the logits before processing (after the
grammar mask, as vLLM), processed modes from the logits the token was drawn
from.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm.v1.outputs import LogprobsTensors
from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
from vllm.v1.sample.sampler import Sampler

from vllm_bastion.core.paths import (
    RowLayout,
    bad_word_bans,
    below_min_tokens,
    history_tails,
    output_columns,
    row_path_tokens,
)
from vllm_bastion.core.tree import TreeBatch

NEG_INF = float("-inf")


def _min_tokens_processor(sm) -> MinTokensLogitsProcessor | None:
    for p in sm.logitsprocs.non_argmax_invariant:
        if isinstance(p, MinTokensLogitsProcessor):
            return p
    return None


def _penalized_requests(input_batch, num_reqs: int) -> np.ndarray:
    b = input_batch
    return np.nonzero((b.repetition_penalties_cpu[:num_reqs] != 1.0)
                      | (b.frequency_penalties_cpu[:num_reqs] != 0.0)
                      | (b.presence_penalties_cpu[:num_reqs] != 0.0))[0]


def needs_node_processing(input_batch, sm) -> bool:
    """Whether any request of the batch uses a path-dependent feature."""
    mt = _min_tokens_processor(sm)
    return (not sm.no_penalties or bool(input_batch.bad_words_token_ids)
            or sm.allowed_token_ids_mask is not None or bool(mt is not None and mt.min_toks))


def committed_counts(input_batch, reqs: np.ndarray) -> np.ndarray:
    """Output tokens each request has emitted so far."""
    b = input_batch
    return (b.num_tokens_no_spec[reqs] - b.num_prompt_tokens[reqs]).astype(np.int64)


def committed_tail(input_batch, num_reqs: int, k: int) -> torch.Tensor:
    """[B, k] the last k output tokens of every request, right-aligned, -1 padded."""
    b = input_batch
    end = b.num_tokens_no_spec[:num_reqs].astype(np.int64)
    start = b.num_prompt_tokens[:num_reqs].astype(np.int64)
    idx = end[:, None] - k + np.arange(k)[None, :]
    ok = idx >= start[:, None]
    vals = b.token_ids_cpu[np.arange(num_reqs)[:, None], np.clip(idx, 0, None)]
    return torch.from_numpy(np.where(ok, vals, -1).astype(np.int64))


class BadWordTable:
    """Every request's bad words as tensors, rebuilt only when they change."""

    def __init__(self):
        self._key = None
        self.tables = None

    def get(self, bad_words: dict[int, list[list[int]]], num_reqs: int):
        key = (num_reqs, tuple((i, tuple(map(tuple, w))) for i, w in sorted(bad_words.items())))
        if key != self._key:
            self._key = key
            words = [(i, w) for i, ws in sorted(bad_words.items()) if i < num_reqs for w in ws]
            K = max([len(w) - 1 for _, w in words], default=0)
            prefixes = torch.full((len(words), K), -2, dtype=torch.long)
            for j, (_, w) in enumerate(words):
                if len(w) > 1:
                    prefixes[j, K - len(w) + 1:] = torch.tensor(w[:-1])
            last = torch.tensor([w[-1] for _, w in words], dtype=torch.long)
            count = torch.zeros(num_reqs, dtype=torch.long)
            for i, _ in words:
                count[i] += 1
            start = torch.cumsum(count, 0) - count
            self.tables = (K, prefixes, last, start, count)
        return self.tables


class NodeProcessor:
    """Applies vLLM's path-dependent logits processing to every tree row."""

    def __init__(self):
        self.bad_words = BadWordTable()

    def process(self, logits: torch.Tensor, trees: TreeBatch, layout: RowLayout,
                input_batch, sm, keep_raw: bool) -> torch.Tensor:
        """The processed float32 logits of every sampled row ([R, V]; rows as
        `layout`). Returns `logits` itself when no request uses a feature;
        a copy when `keep_raw` (raw logits needed later for logprobs)."""
        B = input_batch.num_reqs
        mt = _min_tokens_processor(sm)
        min_toks = dict(mt.min_toks) if mt is not None else {}
        bad = {i: w for i, w in input_batch.bad_words_token_ids.items() if i < B}
        allowed = sm.allowed_token_ids_mask
        pen = _penalized_requests(input_batch, B) if not sm.no_penalties else np.zeros(0, np.int64)
        if not (min_toks or bad or allowed is not None or len(pen)):
            return logits
        dev = logits.device
        x = logits.to(torch.float32)
        if keep_raw and x.data_ptr() == logits.data_ptr():
            x = x.clone()
        V = x.shape[1]
        req_d = layout.req.to(dev)
        paths = row_path_tokens(trees, layout) if (bad or len(pen)) else None

        # 1. allowed token ids (vLLM: True = not allowed)
        if allowed is not None:  # (all False for requests without allowed ids)
            x.masked_fill_(allowed[req_d], NEG_INF)

        # 2. bad words: the last token of a word whose prefix ends the row's history
        if bad:
            K, prefixes, last, start, count = self.bad_words.get(bad, B)
            tails = history_tails(committed_tail(input_batch, B, K), layout, paths)
            rows, toks = bad_word_bans(tails, layout.req, prefixes, last, start, count)
            if rows.numel():
                x[rows.to(dev), toks.to(dev)] = NEG_INF

        # 3. min_tokens: stop tokens masked while committed + depth < min_tokens
        if min_toks:
            self._min_tokens(x, layout, input_batch, B, min_toks)

        # 4. penalties over the prompt and the row's history
        if len(pen):
            self._penalties(x, layout, paths, input_batch, sm, pen, B, V)
        return x

    @staticmethod
    def _min_tokens(x, layout, input_batch, B, min_toks) -> None:
        dev = x.device
        entries = [(i, m, list(stop), so) for i, (m, _, stop, so) in min_toks.items()
                   if i < B and stop]
        if not entries:
            return
        S = max(len(s) for _, _, s, _ in entries)
        min_t = torch.zeros(B, dtype=torch.long)
        stops = torch.full((B, S), -1, dtype=torch.long)
        uses_so = torch.zeros(B, dtype=torch.bool)
        for i, m, s, so in entries:
            min_t[i] = m
            stops[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            uses_so[i] = so
        n = torch.from_numpy(committed_counts(input_batch, np.arange(B)))
        rows = below_min_tokens(n, min_t, layout).nonzero().squeeze(1)
        if not rows.numel():
            return
        st = stops[layout.req[rows]]  # [Rm, S]
        r_idx = rows[:, None].expand_as(st)[st >= 0].to(dev)
        t_idx = st[st >= 0].to(dev)
        restore = uses_so[layout.req[rows]][:, None].expand_as(st)[st >= 0].to(dev)
        saved = x[r_idx, t_idx]
        x[r_idx, t_idx] = NEG_INF
        if bool(restore.any()):
            # vLLM: a structured-output row left with nothing allowed gets its
            # (finite) stop logits back
            dead = torch.isneginf(x[r_idx]).all(dim=-1)
            back = restore & dead & torch.isfinite(saved)
            x[r_idx[back], t_idx[back]] = saved[back]

    @staticmethod
    def _penalties(x, layout, paths, input_batch, sm, pen, B, V) -> None:
        """vLLM's repetition / frequency / presence penalties, at the only
        entries they change: the tokens of the prompt, the committed output
        and the row's own path (elsewhere they are exact no-ops), with
        vLLM's own arithmetic (`apply_repetition_penalties`, then frequency,
        then presence)."""
        from vllm._custom_ops import apply_repetition_penalties

        dev = x.device
        local = torch.full((B,), -1, dtype=torch.long)
        local[torch.from_numpy(pen)] = torch.arange(len(pen))
        lr = local[layout.req]
        rows = (lr >= 0).nonzero().squeeze(1)
        if not rows.numel():
            return
        uniq, out_count = seen_tokens(input_batch, pen, V)  # [Bp, U] sorted, V padded
        lr = lr[rows]
        req = torch.from_numpy(pen)[lr]
        S, C = uniq[lr], out_count[lr]  # [Rp, U]
        path = paths[rows]  # [Rp, D]
        U, D = S.shape[1], path.shape[1]
        on = path >= 0
        # each path token: where it is among the seen tokens, its occurrences on the path
        pos = torch.searchsorted(S, path.clamp(min=0)).clamp(max=U - 1)
        found = on & (S.gather(1, pos) == path)
        same = (path[:, :, None] == path[:, None, :]) & on[:, None, :]
        earlier = same & torch.ones(D, D, dtype=torch.bool).tril(-1)  # an earlier equal token
        first = on & ~earlier.any(dim=-1)
        p_count = torch.where(found, C.gather(1, pos), 0.0) + same.sum(dim=-1)
        # seen tokens on the path are written by their path entry (full count)
        shadow = torch.zeros((len(rows), U), dtype=torch.int32)
        shadow.scatter_add_(1, pos, found.int())
        valid = torch.cat([(S < V) & (shadow == 0), first], dim=1)  # [Rp, U + D]
        cols = torch.cat([S, path.clamp(min=0)], dim=1)
        counts = torch.cat([C, p_count], dim=1)
        r_idx = rows[:, None].expand_as(cols)
        r_idx, cols, counts = (t[valid].to(dev) for t in (r_idx, cols, counts))
        req = req[:, None].expand_as(valid)[valid].to(dev)
        vals = x[r_idx, cols][:, None]  # [E, 1]: one entry per "sequence"
        seen = torch.ones_like(vals, dtype=torch.bool)
        apply_repetition_penalties(vals, seen, seen, sm.repetition_penalties[req])
        vals -= sm.frequency_penalties[req].unsqueeze(dim=1) * counts[:, None]
        vals -= sm.presence_penalties[req].unsqueeze(dim=1) * (counts[:, None] > 0)
        x[r_idx, cols] = vals[:, 0]


def seen_tokens(input_batch, reqs: np.ndarray, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every request's distinct prompt and output tokens, sorted ([n, U],
    `vocab` padded), and how often each occurs in the output ([n, U] float32)."""
    b = input_batch
    end = b.num_tokens_no_spec[reqs].astype(np.int64)
    start = b.num_prompt_tokens[reqs].astype(np.int64)
    T = int(end.max()) if len(end) else 0
    cols = np.arange(T)[None, :]
    toks = np.where(cols < end[:, None], b.token_ids_cpu[reqs[:, None], np.minimum(cols, b.token_ids_cpu.shape[1] - 1)], vocab)
    toks = torch.from_numpy(toks.astype(np.int64))
    is_out = torch.from_numpy((cols >= start[:, None]) & (cols < end[:, None]))
    s, order = toks.sort(dim=1, stable=True)
    o = is_out.gather(1, order).float()
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    run = torch.cumsum(new.long(), dim=1) - 1
    U = int(run.max()) + 1 if run.numel() else 1
    uniq = torch.full((len(reqs), U), vocab, dtype=torch.long).scatter_(1, run, s)
    count = torch.zeros((len(reqs), U)).scatter_add_(1, run, o)
    return uniq, count


def wants_logprobs(sm) -> bool:
    return sm.max_num_logprobs is not None or bool(sm.logprob_token_ids)


def tree_logprobs(raw: torch.Tensor, processed: torch.Tensor | None, mode: str,
                  row_start: torch.Tensor, output_tokens: torch.Tensor,
                  path_nodes: torch.Tensor, num_accepted: torch.Tensor,
                  sm) -> LogprobsTensors | None:
    """vLLM's LogprobsTensors for every emitted token ([B * (1 + max_depth)]
    rows, the layout of the walk's output; placeholder rows are dropped by
    vLLM's `parse_output`).

    Args:
        raw: [R, V] the step's logits before processing (grammar-masked).
        processed: [R, V] the logits the tokens were chosen from (processed
            modes only).
        row_start: [B] first sampled row of each request in `raw`.
        output_tokens / path_nodes / num_accepted: the walk's.
    """
    dev = raw.device
    cols = output_columns(path_nodes, num_accepted, output_tokens.shape[1])  # [B, T]
    rows = (row_start[:, None] + cols).reshape(-1).to(dev)
    toks = output_tokens.reshape(-1).clone()
    toks[toks < 0] = 0
    toks = toks.to(dev, torch.int64)
    src = processed if mode.startswith("processed") and processed is not None else raw
    lp = src[rows].to(torch.float32)
    if mode.endswith("logprobs"):
        lp = Sampler.compute_logprobs(lp)
    out = None
    if sm.max_num_logprobs is not None:
        out = Sampler.gather_logprobs(lp, sm.max_num_logprobs, toks)
    if sm.logprob_token_ids:
        T = cols.shape[1]
        per_row = {b * T + j: ids for b, ids in sm.logprob_token_ids.items()
                   if b < cols.shape[0] for j in range(T)}
        sampler = Sampler.__new__(Sampler)
        sampler.pin_memory = False
        specific = Sampler.gather_specific_token_logprobs(sampler, lp, per_row, toks)
        if specific is not None:
            out = specific  # vLLM prefers logprob_token_ids when both are set
    return out
