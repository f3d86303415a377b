"""Exact replay of speculative decoding from a recording. Pure torch.

Under greedy decoding the emitted sequence does not depend on the speculation
policy, only the step boundaries do. A `ReplayRecord` holds, per prompt, the
target's continuation c_0 .. c_{T-1} and, for every root index i, the drafter's
top-k log-probs / tokens per depth as the engine computes them when c_i is the
last verified token (see vllm_bastion.tools.replay_record). A policy's
trajectory is then replayed without any model:

    i = 0, emitted = 1                      (c_0 comes from the prefill)
    while emitted < max_tokens:
        tree = policy.build(topk[i], ...)   (same TreeBatch the runner verifies)
        target token at a node of depth d  = c_{i + d + 1}
        walk = accept_walk(tree, targets)   (the runner's own walk)
        policy.observe(tree, walk)          (online learning, as the runner does)
        i += walk.num_accepted + 1, emitted += walk.num_accepted + 1

Only nodes on the continuation can be accepted, and the walk never looks past
a rejected node, so giving every node the continuation token at its depth
reproduces the target's choices exactly. Counting follows vLLM's spec-decode
metrics: every verify step counts (the last one too, even past max_tokens);
mean accepted length = 1 + accepted drafts / steps.

Requests run `concurrency` at a time (continuous batching: when one finishes
the next prompt takes its row), vectorized across the rows; concurrency 1 is
the engine at batch 1, including the order in which an online learner sees
the steps.

Sampling (`SampledExtension`): the record's continuation is one trajectory
sampled from the target; with BASTION's position-keyed sampling the walk's
draw at a node on the trajectory is the trajectory's token, so the realized
trajectory replays exactly as in greedy. In addition, for every root the
record holds a union tree with the target's probability of each of its edges;
a node u of a policy tree is accepted with probability prod of the edge
probabilities on its path, and E[accepted] = sum_u P(u accepted) is exact for
every node inside the union tree. Nodes outside it count 0 (so the expected
value is a lower bound) and are reported as `union_miss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from vllm_bastion.core.tree import TreeBatch
from vllm_bastion.core.walk import WalkResult, accept_walk

__all__ = [
    "ReplayRecord", "SampledExtension", "ReplayResult", "TreePolicy", "simulate",
    "targets_from_record", "true_rank_paths", "fit_static_shape", "StaticShapePolicy",
    "rank_path_keys", "convex_cost",
]


# ----------------------------------------------------------------------------- records


@dataclass
class SampledExtension:
    """Union trees with the target's edge probabilities, [P, R, U] each.

    Column 0 is the root; parents come before children; padding has depth -1.
    edge_prob[u] = p_target(token of u | root prefix + u's ancestors), under the
    processed distribution (temperature, top-p) of the recording."""

    parents: torch.Tensor
    depths: torch.Tensor
    ranks: torch.Tensor
    tokens: torch.Tensor
    edge_prob: torch.Tensor
    temperature: float = 1.0
    top_p: float = 1.0

    def select(self, idx) -> SampledExtension:
        return SampledExtension(self.parents[idx], self.depths[idx], self.ranks[idx], self.tokens[idx],
                                self.edge_prob[idx], self.temperature, self.top_p)


@dataclass
class ReplayRecord:
    tokens: torch.Tensor  # [P, T] continuation c_0..c_{T-1} (int64), T >= max_tokens + D + 1
    topk_logprobs: torch.Tensor  # [P, R, D, K] drafter log-probs at root index i (sorted desc)
    topk_tokens: torch.Tensor  # [P, R, D, K] the matching tokens
    max_tokens: int  # tokens each request emits (R >= max_tokens - 1 roots are needed)
    prompt_lens: torch.Tensor | None = None  # [P]
    meta: dict = field(default_factory=dict)
    sampled: SampledExtension | None = None

    @property
    def num_prompts(self) -> int:
        return self.tokens.shape[0]

    @property
    def depth(self) -> int:
        return self.topk_logprobs.shape[2]

    @property
    def topk(self) -> int:
        return self.topk_logprobs.shape[3]

    def select(self, idx) -> ReplayRecord:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ReplayRecord(self.tokens[idx], self.topk_logprobs[idx], self.topk_tokens[idx], self.max_tokens,
                            None if self.prompt_lens is None else self.prompt_lens[idx], dict(self.meta),
                            None if self.sampled is None else self.sampled.select(idx))

    def save(self, path: str) -> None:
        d = {k: getattr(self, k) for k in ("tokens", "topk_logprobs", "topk_tokens", "max_tokens",
                                           "prompt_lens", "meta")}
        if self.sampled is not None:
            d["sampled"] = self.sampled.__dict__
        torch.save(d, path)

    @classmethod
    def load(cls, path: str) -> ReplayRecord:
        d = torch.load(path, weights_only=False)
        s = d.pop("sampled", None)
        return cls(**d, sampled=None if s is None else SampledExtension(**s))

    def validate(self) -> None:
        P, R, D, K = self.topk_logprobs.shape
        if self.topk_tokens.shape != (P, R, D, K) or self.tokens.shape[0] != P:
            raise ValueError("record tensors disagree in shape")
        if R < self.max_tokens - 1 or self.tokens.shape[1] < self.max_tokens + D + 1:
            raise ValueError(f"record too short for max_tokens={self.max_tokens}: R={R}, "
                             f"T={self.tokens.shape[1]} (need R >= max_tokens - 1, T >= max_tokens + D + 1)")


# ----------------------------------------------------------------------------- policies


class TreePolicy(Protocol):
    """What the lab (and the runner) calls. `state` is per-request state (a dict
    of [B, ...] tensors, rows = batch rows) or None for stateless policies."""

    def build(self, topk_logprobs: torch.Tensor, topk_tokens: torch.Tensor, max_nodes: int,
              state: dict | None = None) -> TreeBatch: ...

    def observe(self, trees: TreeBatch, result: WalkResult, state: dict | None = None) -> None: ...

    def new_state(self, batch_size: int, device: torch.device | str = "cpu") -> dict | None: ...


def _reset_rows(state: dict | None, fresh: dict | None, rows: torch.Tensor) -> None:
    if state is None or fresh is None:
        return
    for k, v in state.items():
        v[rows] = fresh[k].to(v.device)


# ----------------------------------------------------------------------------- simulation


@dataclass
class ReplayResult:
    prompt: torch.Tensor  # [S] prompt of every verify step
    root: torch.Tensor  # [S] root index
    nodes: torch.Tensor  # [S] draft nodes verified
    accepted: torch.Tensor  # [S] drafts accepted
    max_depth: torch.Tensor  # [S] deepest node
    expected: torch.Tensor | None = None  # [S] E[accepted] (sampled records)
    union_miss: torch.Tensor | None = None  # [S] tree nodes outside the union tree
    cost: torch.Tensor | None = None  # [S] predicted verify cost of the step (budgeted runs)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return int(self.accepted.numel())

    @property
    def mean_accepted_length(self) -> float:
        """1 + accepted drafts per verify step (vLLM's metric)."""
        return 1.0 + float(self.accepted.float().mean()) if self.steps else 1.0

    @property
    def mean_expected_length(self) -> float:
        return 1.0 + float(self.expected.mean()) if self.expected is not None and self.steps else float("nan")

    @property
    def mean_nodes(self) -> float:
        return float(self.nodes.float().mean()) if self.steps else 0.0

    def acceptance_by_depth(self, depth: int) -> list[float]:
        return [float((self.accepted > d).float().mean()) for d in range(depth)]

    def tokens_per_cost(self) -> float:
        """Emitted tokens per unit of predicted step cost (budgeted runs)."""
        return float((self.accepted + 1).sum() / self.cost.sum())


def targets_from_record(tokens: torch.Tensor, roots: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """[B, W] the target's token at every tree column: c_{root + depth + 1}
    (exact wherever the walk looks; -1 in padding)."""
    idx = (roots[:, None] + depths + 1).clamp(0, tokens.shape[1] - 1)
    out = tokens.gather(1, idx)
    return torch.where(depths >= 0, out, torch.full_like(out, -1))


def rank_path_keys(parents: torch.Tensor, ranks: torch.Tensor, depths: torch.Tensor, K: int) -> torch.Tensor:
    """[B, W] an integer key per node identifying its rank path (r_1..r_d):
    key = key(parent) * (K + 1) + r_d + 1; root 0; padding -1."""
    key = torch.zeros_like(parents)
    par = parents.clamp(min=0)
    valid = depths >= 0
    md = int(depths.max()) if depths.numel() else 0
    for d in range(1, md + 1):
        at = depths == d
        key = torch.where(at, key.gather(1, par) * (K + 1) + ranks + 1, key)
    return key.masked_fill(~valid, -1)


def _expected_accepted(trees: TreeBatch, ext: SampledExtension, prompt: torch.Tensor, root: torch.Tensor,
                       K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E[accepted] of each tree (sum over nodes of the product of union edge
    probabilities on its path) and the number of tree nodes outside the union."""
    upar = ext.parents[prompt, root]
    udep = ext.depths[prompt, root]
    urank = ext.ranks[prompt, root]
    uprob = ext.edge_prob[prompt, root].double()
    # path probability of every union node (parents precede children)
    pp = torch.ones_like(uprob)
    md = int(udep.max())
    for d in range(1, md + 1):
        at = udep == d
        pp = torch.where(at, pp.gather(1, upar.clamp(min=0)) * uprob, pp)
    ukey = rank_path_keys(upar, urank, udep, K)
    ukey = ukey.masked_fill(udep < 0, torch.iinfo(torch.long).max)
    skey, order = ukey.sort(1)
    spp = pp.gather(1, order)
    tkey = rank_path_keys(trees.parents, trees.ranks, trees.depths, K)
    valid = trees.valid_mask() & (trees.depths >= 1)
    pos = torch.searchsorted(skey, tkey.clamp(min=0)).clamp(max=skey.shape[1] - 1)
    found = (skey.gather(1, pos) == tkey) & valid
    p = torch.where(found, spp.gather(1, pos), torch.zeros_like(spp[:, :1]).expand_as(pos))
    return p.sum(1).float(), (valid & ~found).sum(1)


Budget = Callable[[TreeBatch], tuple[torch.Tensor, torch.Tensor]]


def simulate(record: ReplayRecord, policy: TreePolicy, max_nodes: int, *, concurrency: int | None = None,
             budget: Budget | None = None, max_tokens: int | None = None) -> ReplayResult:
    """Replay `policy` on every prompt of `record` (see module docstring).

    concurrency: requests in flight at once (None: all prompts at once);
        prompts start in record order.
    budget: optional callable trees -> (num_nodes [B], predicted cost [B]);
        the trees are truncated to num_nodes before verification (the
        runner's auto budget), and the cost is recorded per step.
    """
    import time

    t0 = time.perf_counter()
    record.validate()
    P = record.num_prompts
    C = P if concurrency is None else max(1, min(concurrency, P))
    limit = record.max_tokens if max_tokens is None else max_tokens
    K = record.topk
    toks_all = record.tokens
    slot_prompt = torch.arange(C)
    slot_root = torch.zeros(C, dtype=torch.long)
    slot_emitted = torch.ones(C, dtype=torch.long)
    active = torch.ones(C, dtype=torch.bool)
    next_prompt = C
    state = policy.new_state(C)
    out: dict[str, list] = {k: [] for k in ("prompt", "root", "nodes", "accepted", "max_depth",
                                            "expected", "miss", "cost")}
    while bool(active.any()):
        rows = active.nonzero().squeeze(1)
        p, r = slot_prompt[rows], slot_root[rows]
        st = None if state is None else {k: v[rows] for k, v in state.items()}
        trees = policy.build(record.topk_logprobs[p, r], record.topk_tokens[p, r], max_nodes, st)
        cost = None
        if budget is not None:
            n, cost = budget(trees)
            trees = trees.truncate(n)
        target = targets_from_record(toks_all[p], r, trees.depths)
        result = accept_walk(trees, target)
        policy.observe(trees, result, st)
        if state is not None:
            for k in state:
                state[k][rows] = st[k]
        k = result.num_accepted
        out["prompt"].append(p)
        out["root"].append(r)
        out["nodes"].append(trees.num_nodes.clone())
        out["accepted"].append(k)
        out["max_depth"].append(trees.depths.max(1).values.clamp(min=0))
        if cost is not None:
            out["cost"].append(cost)
        if record.sampled is not None:
            e, miss = _expected_accepted(trees, record.sampled, p, r, K)
            out["expected"].append(e)
            out["miss"].append(miss)
        slot_root[rows] += k + 1
        slot_emitted[rows] += k + 1
        done = rows[slot_emitted[rows] >= limit]
        if done.numel():
            n_new = min(done.numel(), P - next_prompt)
            if n_new > 0:
                fill = done[:n_new]
                slot_prompt[fill] = torch.arange(next_prompt, next_prompt + n_new)
                slot_root[fill] = 0
                slot_emitted[fill] = 1
                next_prompt += n_new
                _reset_rows(state, policy.new_state(n_new), fill)
            active[done[n_new:] if n_new > 0 else done] = False

    def cat(k):
        return torch.cat(out[k]) if out[k] else None

    return ReplayResult(prompt=cat("prompt"), root=cat("root"), nodes=cat("nodes"), accepted=cat("accepted"),
                        max_depth=cat("max_depth"), expected=cat("expected"), union_miss=cat("miss"),
                        cost=cat("cost"), seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- hindsight


def true_rank_paths(record: ReplayRecord) -> torch.Tensor:
    """[P, R, D] the rank of the continuation token in the drafter's top-k at
    every depth, for every root; -1 from the first depth where it is not in
    the top-k (a node deeper than that can never be accepted)."""
    P, R, D, K = record.topk_tokens.shape
    i = torch.arange(R)[:, None] + torch.arange(1, D + 1)[None, :]  # [R, D]
    truth = record.tokens[:, i.clamp(max=record.tokens.shape[1] - 1)]  # [P, R, D]
    hit = record.topk_tokens == truth[..., None]
    rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(truth, -1))
    alive = torch.cumprod((rank >= 0).long(), dim=-1).bool()
    return torch.where(alive, rank, torch.full_like(rank, -1))


def fit_static_shape(paths: torch.Tensor, max_nodes: int, K: int) -> list[tuple[int, ...]]:
    """The static tree (a set of rank paths) with `max_nodes` nodes that
    accepts the most on these true rank paths [S, D]: every rank path u is
    accepted in a fraction f(u) of the rows; f(child) <= f(parent), so the
    top-N by f (ties: shallower, then lexicographic) is ancestor-closed and is
    the optimal static tree of N nodes for these rows."""
    counts: dict[tuple[int, ...], int] = {}
    for row in paths.tolist():
        pref: tuple[int, ...] = ()
        for r in row:
            if r < 0:
                break
            pref = pref + (r,)
            counts[pref] = counts.get(pref, 0) + 1
    items = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))[:max_nodes]
    shape = [k for k, _ in items]
    # pad with chain-extension nodes if the data has fewer distinct paths
    have = set(shape)
    while len(shape) < max_nodes:
        base = max(shape, key=len) if shape else ()
        nxt = base + (0,)
        if nxt in have:
            break
        shape.append(nxt)
        have.add(nxt)
    return shape


class StaticShapePolicy:
    """The same tree of rank paths at every step (tokens taken from the
    drafter's top-k at each depth). Shape given best-first, ancestor-closed."""

    def __init__(self, shape: list[tuple[int, ...]], scores: list[float] | None = None):
        index = {(): 0}
        par, dep, rk = [-1], [0], [0]
        for i, path in enumerate(shape):
            if path[:-1] not in index:
                raise ValueError(f"shape is not ancestor-closed at {path}")
            index[path] = i + 1
            par.append(index[path[:-1]])
            dep.append(len(path))
            rk.append(path[-1])
        self.parents = torch.tensor(par)
        self.depths = torch.tensor(dep)
        self.ranks = torch.tensor(rk)
        n = len(shape)
        sc = scores if scores is not None else [-(i + 1) * 1e-3 for i in range(n)]
        self.scores = torch.tensor([0.0] + list(sc), dtype=torch.float32)

    def new_state(self, batch_size, device="cpu"):
        return None

    def observe(self, trees, result, state=None):
        pass

    def build(self, topk_logprobs, topk_tokens, max_nodes, state=None) -> TreeBatch:
        B, D, K = topk_tokens.shape
        n = min(max_nodes, self.parents.numel() - 1)
        W = n + 1
        dep = self.depths[:W].expand(B, W)
        rk = self.ranks[:W].expand(B, W)
        ok = (dep <= D) & (rk < K)
        b = torch.arange(B)[:, None]
        tok = topk_tokens[b, (dep - 1).clamp(0, D - 1), rk.clamp(0, K - 1)]
        lq = topk_logprobs[b, (dep - 1).clamp(0, D - 1), rk.clamp(0, K - 1)].float()
        tok[:, 0] = -1
        trees = TreeBatch(tok.clone(), self.parents[:W].expand(B, W).clone(), dep.clone(), rk.clone(),
                          self.scores[:W].expand(B, W).clone(), torch.full((B,), n, dtype=torch.long),
                          torch.cat([torch.full((B, 1), float("-inf")), lq[:, 1:]], 1))
        if not bool(ok.all()):
            raise ValueError("static shape deeper or wider than the record")
        return trees


# ----------------------------------------------------------------------------- cost


def convex_cost(n_tokens: torch.Tensor, flat: float = 12.0, t_fix: float = 0.5) -> torch.Tensor:
    """A latency-model-shaped verify cost, in units of one plain decode step:
    flat up to `flat` tokens, then linear (C(n) = max(1, n / flat)), plus a
    fixed per-step cost t_fix (drafter, tree overhead)."""
    n = n_tokens.to(torch.float64)
    return t_fix + torch.clamp(n / flat, min=1.0)


def auto_budget(cost: Callable[[torch.Tensor], torch.Tensor] = convex_cost, min_nodes: int = 0) -> Budget:
    """Batch-1 auto budget of the runner's rule: per request, the node count n
    maximizing (1 + sum of the first n P^ (= exp scores)) / cost(1 + n)."""

    def plan(trees: TreeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.exp(trees.scores.double()).nan_to_num(0.0)
        p[:, 0] = 1.0
        S = p.cumsum(1)  # S[:, n] = 1 + first n nodes
        W = trees.width
        n = torch.arange(W)
        c = cost(1 + n)  # [W]
        theta = S / c[None, :]
        theta = theta.masked_fill(n[None, :] > trees.num_nodes[:, None], float("-inf"))
        theta = theta.masked_fill(n[None, :] < min(min_nodes, W - 1), float("-inf"))
        best = theta.argmax(1)
        return best, c[best]

    return plan
