"""Tree policies: how a step's draft tree is grown from the drafter's top-k,
and what is learned from the walk. Pure torch.

A policy is one object with

    build(topk_logprobs [B, D, K], topk_tokens [B, D, K], max_nodes, state) -> TreeBatch
    observe(trees, walk_result, state) -> None
    new_state(batch_size, device) -> dict of [B, ...] tensors, or None

`TreeBatch.scores` are log P^(u), best-first, ancestor-closed (any prefix is a
tree), so the runtime budget (core.budget) can truncate them by the same
surrogate S(T) = sum P^(u). The replay lab (core.replay) evaluates exactly
these objects.

Policies:
  * `CalibratedPolicy`: BASTION's policy (see its docstring);
  * `BestFirstPolicy`: BASTION's published rule (raw path confidence), or, with
    an `AcceptanceCalibrator`, the previous calibrated rule exactly as the
    runner calls it (kept for comparison);
  * `ChainPolicy`: the top-1 chain of the first `depth` depths (vLLM's DFlash).

Runner wiring (per engine: one policy object; per step, same batch rows):

    # init
    policy = CalibratedPolicy(cfg.draft_depth, topk=min(cfg.topk, cfg.max_nodes), device=device)
    state = None
    # _sample, after accept_walk(step.trees, target): learn, and carry each
    # row's accepted count to the trees proposed in this same step
    state = policy.new_state(num_reqs, device)
    policy.observe(step.trees, result, state)
    # propose_draft_token_ids (rows = the same input-batch rows as in _sample)
    if state is None or state["prev_accepted"].shape[0] != num_reqs:
        state = policy.new_state(num_reqs, device)
    trees = policy.build(logp, toks, cfg.max_nodes, state)

`step.trees` must be the proposed TreeBatch after `select`/`truncate` (both
carry the fields the policy needs: draft_logprobs, draft_tokens, group);
rows without a tree (num_nodes == 0) are ignored by `observe` and get
prev_accepted = -1. Nothing else is per request: the learned table is shared
by the engine.
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


GROUP_EDGES = (1, 3, 7)  # the previous step accepted: none or 0 | 1-2 | 3-6 | 7+


class CalibratedPolicy:
    """BASTION's tree policy: best-first by a calibrated acceptance probability.

    Value of a node u with rank path (r_1..r_d):

        P^(u) = prod_{j<=d} p^(g, j, c_j, log q_j(r_j))

    p^ is the probability that a node is accepted *given that its parent was*
    (fitted only on that population), looked up by
      g   the request's group: how many drafts its previous step accepted
          (none/0 | 1-2 | 3-6 | 7+; a new request is group 0),
      j   the depth,
      c_j the path class: non-top-1 choices on the path up to j (0, 1, 2+),
      q   the drafter's marginal of the node's token at depth j (log q binned,
          linear interpolation between bin centers).
    Every p^ <= 1, so P^(child) <= P^(parent): best-first order is
    ancestor-closed and any prefix is a tree. TreeBatch.scores = log P^, so the
    runtime budget (core.budget) maximizes S(T) = sum P^ per unit cost: one
    rule sizes and shapes the tree.

    Learning (`observe`, once per verify step, vectorized, no host sync): the
    accepted path plus the bonus token are the target's own tokens at depths
    1..k+1, so at each of those depths *every* top-k rank under the true
    parent is an observation (accepted iff it is the target's token), also
    the ranks the tree did not hold (free observations: no exploration needed
    at the frontier). Counts per (g, j, c, bin) decay by `forgetting` per step.
    The table (refreshed every step): a logit shift of the raw surrogate per
    (g, j, c) cell (logit p = logit q + delta), fitted by Newton steps with a
    Gaussian prior centered on the (g, c) shift pooled over depths (itself
    centered on 0), so cells and bins without data extrapolate from their
    neighbours instead of falling back to raw q; each bin mixes its own counts
    with that curve (prior_strength pseudo-observations); "iso" smoothing
    makes it non-decreasing in log q. An untrained policy is BASTION's
    published rule (P^ = product of the raw marginals).

    Per-request state: {"prev_accepted": LongTensor [B]} (-1 = no tree
    verified yet); `observe(..., state)` writes the step's accepted counts
    into it, `build(..., state)` reads the group from it.
    """

    def __init__(self, depth: int, *, topk: int | None = None, bins: int = 24, lo: float = -12.0,
                 prior_strength: float = 4.0, forgetting: float = 0.999,
                 group_edges: tuple[int, ...] = GROUP_EDGES, frontier: bool = True,
                 smooth: str = "iso", classes: int = NUM_CLASSES, device="cpu"):
        self.depth = depth
        self.topk = topk
        self.C = classes
        self.G = len(group_edges) + 1
        self.group_edges = torch.tensor(group_edges, dtype=torch.long, device=device)
        self.edges = torch.linspace(lo, 0.0, bins + 1, device=device)
        self.centers = 0.5 * (self.edges[:-1] + self.edges[1:])
        self.nb = bins
        self.prior_strength = prior_strength
        self.forgetting = forgetting
        self.frontier = frontier
        self.smooth = smooth
        shape = (self.G, depth, classes, bins)
        self.tested = torch.zeros(shape, dtype=torch.float64, device=device)
        self.accepted = torch.zeros(shape, dtype=torch.float64, device=device)
        self.table = self.centers.expand(shape).clone().float()  # log p; prior p = q

    # ------------------------------------------------------------ state

    def new_state(self, batch_size: int, device="cpu") -> dict:
        return {"prev_accepted": torch.full((batch_size,), -1, dtype=torch.long, device=device)}

    def groups(self, state: dict | None, B: int, device) -> torch.Tensor:
        if state is None or self.G == 1:
            return torch.zeros(B, dtype=torch.long, device=device)
        return torch.bucketize(state["prev_accepted"].to(device), self.group_edges.to(device), right=True)

    # ------------------------------------------------------------ values

    def class_values(self, logq: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """[B, D, K] drafter log-probs -> [B, D, C, K] calibrated log p^ per class."""
        B, D, K = logq.shape
        Dc = min(D, self.depth)
        x = logq.float()
        c = self.centers.to(x.device)
        out = x[:, :, None, :].expand(B, D, self.C, K).clone()
        xs = x[:, :Dc]
        hi = torch.bucketize(xs.contiguous(), c).clamp(1, self.nb - 1)
        lo = hi - 1
        w = ((xs - c[lo]) / (c[hi] - c[lo])).clamp(0.0, 1.0)
        tab = self.table.to(x.device)[group][:, :Dc]  # [B, Dc, C, NB]
        lo_i = lo[:, :, None, :].expand(B, Dc, self.C, K)
        hi_i = hi[:, :, None, :].expand(B, Dc, self.C, K)
        t_lo, t_hi = tab.gather(3, lo_i), tab.gather(3, hi_i)
        w4 = w[:, :, None, :]
        val = t_lo + w4 * (t_hi - t_lo)
        xs4 = xs[:, :, None, :]
        val = torch.where(xs4 < c[0], tab[..., :1] + (xs4 - c[0]), val)
        val = torch.where(xs4 > c[-1], (tab[..., -1:] + (xs4 - c[-1])).clamp(max=0.0), val)
        out[:, :Dc] = torch.where(torch.isfinite(xs4), val.clamp(max=0.0), xs4.expand_as(val))
        return out

    def build(self, topk_logprobs, topk_tokens, max_nodes, state=None) -> TreeBatch:
        B, D, K = topk_logprobs.shape
        k = min(K, max_nodes, self.topk or K)
        logp, toks = topk_logprobs[:, :, :k], topk_tokens[:, :, :k]
        g = self.groups(state, B, logp.device)
        trees = build_best_first_trees(logp, toks, max_nodes=max_nodes, class_values=self.class_values(logp, g))
        trees.group = g
        return trees

    # ------------------------------------------------------------ learning

    def _bins(self, logq: torch.Tensor) -> torch.Tensor:
        e = self.edges.to(logq.device)
        return (torch.bucketize(logq.contiguous(), e, right=True) - 1).clamp(0, self.nb - 1)

    def _add(self, g, d, c, logq, acc, w) -> None:
        """Add observations: same-shape tensors of group, depth (0-based),
        class, raw log q, accepted?, and weight (0 drops one; no boolean
        indexing, so no host sync on GPU)."""
        keep = (w > 0) & (d >= 0) & (d < self.depth) & torch.isfinite(logq)
        b = self._bins(torch.where(torch.isfinite(logq), logq, torch.zeros_like(logq)))
        flat = ((g.clamp(0, self.G - 1) * self.depth + d.clamp(0, self.depth - 1)) * self.C
                + c.clamp(0, self.C - 1)) * self.nb + b
        wt = torch.where(keep, w.to(self.tested.dtype), torch.zeros_like(w, dtype=self.tested.dtype))
        self.tested.view(-1).scatter_add_(0, flat.reshape(-1), wt.reshape(-1))
        self.accepted.view(-1).scatter_add_(0, flat.reshape(-1), (wt * acc.to(wt.dtype)).reshape(-1))

    def truth_observations(self, trees: TreeBatch, truth: torch.Tensor, known: torch.Tensor) -> None:
        """Learn from the target's tokens truth [B, >=D] at depths 1..D of each
        row's root, known up to depth known[b]: at every known depth whose
        ancestors on the truth path are all in the top-k, every top-k rank is
        one observation (accepted iff it is the truth's token), whether or not
        the tree held that node."""
        toks, logq = trees.draft_tokens, trees.draft_logprobs
        B, D, K = toks.shape
        D = min(D, truth.shape[1])
        toks, logq, truth = toks[:, :D], logq[:, :D].float(), truth[:, :D].to(toks.device)
        hit = toks == truth[:, :, None]  # [B, D, K]
        found = hit.any(-1)
        rank = hit.long().argmax(-1)
        d_idx = torch.arange(D, device=toks.device)
        known_d = d_idx[None, :] < known.to(toks.device)[:, None]
        # the parent is on the truth path: every shallower truth token is in the top-k
        prefix_ok = torch.cumprod(torch.cat([torch.ones_like(found[:, :1]), found[:, :-1]], 1).long(), 1).bool()
        off = (found & (rank > 0)).long()
        cls_prev = torch.cumsum(torch.cat([torch.zeros_like(off[:, :1]), off[:, :-1]], 1), 1)
        r = torch.arange(K, device=toks.device)
        cls = cls_prev[:, :, None] + (r > 0).long()
        w = (known_d & prefix_ok)[:, :, None].expand(B, D, K)
        g = trees.group if trees.group is not None else torch.zeros(B, dtype=torch.long, device=toks.device)
        self._add(g[:, None, None].expand(B, D, K), d_idx[None, :, None].expand(B, D, K), cls, logq, hit, w)

    def observe(self, trees: TreeBatch, result: WalkResult, state: dict | None = None) -> None:
        """Learn from one verify step and update the per-request state.

        With the drafter top-k carried by the trees (build puts it there), the
        observations are the frontier ones: the accepted path plus the bonus
        token are the target's tokens at depths 1..accepted+1, so every top-k
        rank at those depths is observed; else only the tested tree nodes."""
        self.tested *= self.forgetting
        self.accepted *= self.forgetting
        has = trees.num_nodes > 0
        if self.frontier and trees.draft_tokens is not None:
            out = result.output_tokens
            D = trees.draft_tokens.shape[1]
            if out.shape[1] < D:
                out = torch.nn.functional.pad(out, (0, D - out.shape[1]), value=-1)
            known = torch.where(has, result.num_accepted + 1, torch.zeros_like(result.num_accepted))
            self.truth_observations(trees, out, known)
        elif trees.classes is not None and trees.node_logq is not None:
            t = result.tested_mask
            g = trees.group if trees.group is not None else torch.zeros_like(trees.num_nodes)
            self._add(g[:, None].expand_as(t), trees.depths - 1, trees.classes, trees.node_logq.float(),
                      result.accepted_mask, t)
        self._refresh()
        if state is not None:
            state["prev_accepted"].copy_(torch.where(has, result.num_accepted, torch.full_like(result.num_accepted, -1)))

    def _refresh(self) -> None:
        """Table of log p^ per (group, depth, class, log-q bin).

        Two levels of shrinkage, so cells and bins without data extrapolate:
        every (group, depth, class) cell has a logit shift delta of the raw
        surrogate (logit p = logit q + delta), fitted to the cell's counts by
        Newton steps with a Gaussian prior centered on the (group, class)
        shift pooled over depths (itself centered on 0, i.e. p = q); each bin
        then mixes its own counts with the shifted curve (prior_strength
        pseudo-observations), and the result is made non-decreasing in log q.
        """
        t, a = self.tested.float(), self.accepted.float()
        q = torch.exp(self.centers.to(t.device)).clamp(1e-6, 1 - 1e-6)
        lq = torch.log(q) - torch.log1p(-q)  # logit q per bin

        def shift(tt, aa, mu, lam):
            d = mu.clone()
            for _ in range(4):
                sg = torch.sigmoid(lq + d[..., None])
                grad = (tt * sg - aa).sum(-1) + lam * (d - mu)
                hess = (tt * sg * (1 - sg)).sum(-1) + lam
                d = (d - grad / hess).clamp(-12.0, 12.0)
            return d

        pooled = shift(t.sum(1), a.sum(1), torch.zeros(t.shape[0], t.shape[2], device=t.device), 1.0)
        cell = shift(t, a, pooled[:, None, :].expand(t.shape[:3]), 4.0)
        prior = torch.sigmoid(lq + cell[..., None])
        k = self.prior_strength
        p = (a + k * prior) / (t + k)
        if self.smooth == "iso":  # monotone in log q: mean of the running max and the reverse running min
            up = torch.cummax(p, dim=-1).values
            down = torch.flip(torch.cummin(torch.flip(p, [-1]), dim=-1).values, [-1])
            p = 0.5 * (up + down)
        self.table = torch.log(p.clamp(1e-6, 1.0))

    def summary(self) -> dict:
        """Observations and acceptance rates by depth and class (all groups),
        in the AcceptanceCalibrator's stats format."""
        t = self.tested.sum(dim=(0, 3))  # [depth, class]
        a = self.accepted.sum(dim=(0, 3))
        rate = torch.where(t > 0, a / t.clamp(min=1e-9), torch.full_like(t, float("nan")))
        return {
            "tested_by_depth": [round(float(x), 1) for x in t.sum(1)],
            "acceptance_by_depth_and_class": [
                [None if x != x else round(float(x), 3) for x in row] for row in rate.tolist()],
            "tested_by_group": [round(float(x), 1) for x in self.tested.sum(dim=(1, 2, 3))],
        }
