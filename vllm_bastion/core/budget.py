"""Batch-wide, cost-aware tree budget (BASTION's stopping rule for a whole step).

Pure torch; imports nothing from vLLM. Works on any device without a host
sync (no `.item()`), so the engine can keep the decision on the GPU.

Objective. A verify step of B requests with trees T_1..T_B emits, in
expectation, S = sum_i S(T_i) tokens, where S(T) = sum_{u in T} P(u) is the
path-confidence surrogate (root included, P(root) = 1; papers.md 1.2 step 2).
It costs T_fix + C(batch) seconds (core.latency.LatencyModel). We maximize the
batch's expected tokens per second

    Theta = S / (T_fix + C).

Search space. Every request's tree is a best-first prefix of its candidates
(TreeBatch.scores order). Merging all requests' candidates by P(u) (ties keep
request order, then each request's own order) gives one global best-first
list; its prefixes are the candidate batch plans (for a fixed total number of
nodes, the merged prefix maximizes S). Adding the next node (probability p)
to a plan with total S and cost C_n raises Theta iff

    p * (T_fix + C_n) > S * (C_{n+1} - C_n).

`exact=False` (BASTION) stops at the first prefix where this fails;
`exact=True` evaluates Theta on every prefix (cumsums) and takes the argmax.
They agree when C is convex along the merged order (one request, or costs
that depend on total tokens only); with per-request attention costs
(different contexts) C can be locally non-convex along the merged order and
`exact` can find a larger plan.

Branch waves. A backend that computes a tree's branch rows as extra
passes (the chain-exact CPU path: one pass per root-to-leaf path beyond the
spine, batched over requests) pays `wave_cost` seconds per pass: a plan
whose requests' prefixes have at most w branch paths costs
T_fix + C + wave_cost * w. With `parents` given, this term is part of every
prefix's cost (`prefix_paths`), so a node that opens a new branch pays for
its pass, and a tree turns chain-like where passes are dear.

Consequences: trees shrink as the batch grows (S grows like B while the
marginal cost of a node does not shrink), and when verification is expensive
relative to the gain the result is 0 nodes for every request, i.e.
speculation switches itself off for that step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .latency import LatencyModel
__all__ = [
    "BudgetDecision",
    "surrogate",
    "plan_batch_budget",
    "choose_batch_budget",
    "snap_to_bucket",
    "prefix_paths",
]

_F64 = torch.float64


def surrogate(scores: torch.Tensor, num_nodes: torch.Tensor | None = None) -> torch.Tensor:
    """S(T) per request: sum of P(u) over the root and the first num_nodes[b]
    nodes (all real nodes if None). scores: [B, W] log P, TreeBatch layout."""
    p = torch.exp(scores.to(_F64)).nan_to_num(0.0)
    p[:, 0] = 1.0
    if num_nodes is not None:
        cols = torch.arange(scores.shape[1], device=scores.device)
        n = torch.as_tensor(num_nodes, device=scores.device).to(torch.long)
        p = p * (cols[None, :] <= n[:, None])
    return p.sum(dim=1)


def prefix_paths(parents: torch.Tensor) -> torch.Tensor:
    """[B, W] root-to-leaf paths of every best-first prefix: out[b, n] is the
    number of leaves of the tree made of the root and columns 1..n of row b
    (0 for n = 0; padding columns, parent < 0, add none). Parents must come
    before their children (best-first order): a node adds a path unless it
    is the first child of a non-root node, which then stops being a leaf."""
    B, W = parents.shape
    dev = parents.device
    cols = torch.arange(W, device=dev).expand(B, W)
    par = parents.long().clamp(min=0)
    valid = (parents >= 0) & (cols >= 1)
    first_child = torch.full((B, W), W, dtype=torch.long, device=dev).scatter_reduce(
        1, par, torch.where(valid, cols, W), "amin")
    extends = valid & (par > 0) & (first_child.gather(1, par) == cols)
    return torch.cumsum((valid & ~extends).long(), dim=1)


@dataclass
class BudgetDecision:
    """Result of `plan_batch_budget`. Tensors stay on the scores' device."""

    num_nodes: torch.Tensor  # [B] int64 draft nodes per request (root excluded)
    total_nodes: torch.Tensor  # () int64
    expected_tokens: torch.Tensor  # () float64, S of the whole batch (roots included)
    step_time: torch.Tensor  # () float64, predicted verify forward C (s)
    round_time: torch.Tensor  # () float64, T_fix + C (+ branch waves) (s)
    throughput: torch.Tensor  # () float64, expected tokens / s with these trees
    no_spec_step_time: torch.Tensor  # () float64, C with no draft nodes at all (s)
    batch_size: int

    @property
    def no_spec_throughput(self) -> torch.Tensor:
        """Tokens / s of plain decoding (1 token per request, no drafter)."""
        return self.batch_size / self.no_spec_step_time

    @property
    def speedup_estimate(self) -> torch.Tensor:
        """Predicted throughput over plain decoding. Below 1 means the drafter
        itself (T_fix) is not paying off: the engine may stop drafting."""
        return self.throughput / self.no_spec_throughput


def _per_request(x: Any, B: int, device: torch.device, default: int) -> torch.Tensor:
    if x is None:
        return torch.full((B,), default, dtype=torch.long, device=device)
    t = torch.as_tensor(x, device=device).to(torch.long)
    return t.expand(B).clone() if t.dim() == 0 else t.reshape(B).clone()


def plan_batch_budget(
    scores: torch.Tensor,
    contexts: Any,
    latency: LatencyModel,
    t_fix: float | torch.Tensor | None = None,
    min_nodes: int | Sequence[int] | torch.Tensor = 0,
    max_nodes: int | Sequence[int] | torch.Tensor | None = None,
    *,
    exact: bool = False,
    max_total_nodes: int | torch.Tensor | None = None,
    base_tokens: Any = None,
    buckets: Sequence[int] | torch.Tensor | None = None,
    bucket_offset: int = 0,
    buckets_unbounded_above: bool = False,
    parents: torch.Tensor | None = None,
    wave_cost: float = 0.0,
) -> BudgetDecision:
    """Choose every request's node count for one step (see module docstring).

    Args:
        scores: [B, W] log P(u) per request in TreeBatch.scores layout (column
            0 root = 0, then non-increasing scores, -inf padding).
        contexts: [B] tokens already in each request's KV cache before this
            step (num_computed_tokens).
        latency: the (calibrated) cost model.
        t_fix: seconds per step outside the verify forward (drafter + tree
            overhead); None = latency.fixed_time(B).
        min_nodes / max_nodes: per-request caps (int or [B]); capped further by
            the nodes actually available in `scores`.
        exact: argmax over all merged prefixes instead of the first-failure stop.
        max_total_nodes: cap on the sum of nodes (e.g. the scheduler's token
            budget left for this step minus the base tokens).
        base_tokens: [B] tokens each request feeds besides its draft nodes
            (default 1: the tree root). A prefill chunk in the same step can be
            passed as a row with no candidates and base_tokens = chunk length.
        buckets: allowed totals (e.g. CUDA-graph sizes) of
            sum(base_tokens) + sum(nodes) + bucket_offset; the plan is rounded
            down to one (greedy) or the argmax is taken over them (exact).
            The plan without any optional node is always allowed.
        buckets_unbounded_above: totals above max(buckets) are all allowed
            (vLLM runs those eagerly).
        parents, wave_cost: [B, W] the trees' parents (TreeBatch layout, same
            columns as `scores`) and the seconds of one branch wave (module
            docstring); the wave term is left out when either is missing.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, width], got {tuple(scores.shape)}")
    device = scores.device
    B, W = scores.shape
    N = max(W - 1, 0)
    k = latency.costs
    co = latency.coeffs
    peak, bw = latency.peak_flops, latency.bandwidth

    c = torch.as_tensor(contexts, device=device).to(_F64).reshape(B)
    base_l = _per_request(base_tokens, B, device, 1)
    base = base_l.to(_F64)
    if t_fix is None:
        t_fix = latency.fixed_time(B)
    t_fix = torch.as_tensor(t_fix, dtype=_F64, device=device)

    def cost(F: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        return torch.maximum(co.a_c * F / peak + co.b_c, co.a_m * M / bw + co.b_m)

    def fm(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quad = (s * (c + s)).sum()
        F = k.flops_per_token * s.sum() + k.flops_attn * quad
        M = k.bytes_fixed + k.bytes_per_token * s.sum() + k.bytes_per_ctx * c.sum() + k.bytes_attn * quad
        return F, M

    no_spec_C = cost(*fm(base))

    cand_scores = scores[:, 1:].to(_F64)  # [B, N]
    valid = torch.isfinite(cand_scores)
    avail = valid.sum(dim=1)
    max_eff = torch.minimum(_per_request(max_nodes, B, device, N).clamp(min=0), avail)
    min_eff = torch.minimum(_per_request(min_nodes, B, device, 0).clamp(min=0), max_eff)
    col = torch.arange(1, N + 1, device=device)
    forced = valid & (col[None, :] <= min_eff[:, None])
    cand = valid & (col[None, :] > min_eff[:, None]) & (col[None, :] <= max_eff[:, None])
    p = torch.exp(cand_scores).masked_fill(~valid, 0.0)

    s0 = base + min_eff.to(_F64)
    S0 = B + (p * forced).sum()
    F0, M0 = fm(s0)

    # one global best-first list (stable: ties keep request, then column order)
    key = cand_scores.masked_fill(~cand, float("-inf")).reshape(-1)
    order = torch.sort(key, descending=True, stable=True).indices  # [B*N]
    req = torch.div(order, max(N, 1), rounding_mode="floor")
    j = order - req * N + 1  # column of the node (1-based)
    p_sorted = p.reshape(-1)[order] * cand.reshape(-1)[order]
    s_before = base[req] + (j - 1).to(_F64)  # tokens of the request before adding it
    q = c[req] + 2.0 * s_before + 1.0  # (s+1)(c+s+1) - s(c+s)
    dF = k.flops_per_token + k.flops_attn * q
    dM = k.bytes_per_token + k.bytes_attn * q
    zero = torch.zeros(1, dtype=_F64, device=device)
    F = F0 + torch.cat([zero, torch.cumsum(dF, 0)])
    M = M0 + torch.cat([zero, torch.cumsum(dM, 0)])
    C = cost(F, M)  # [K+1], C[k] = cost with the first k merged nodes
    if parents is not None and wave_cost > 0 and N > 0:
        # branch waves of the plan: the most branch paths of one request
        bp = (prefix_paths(parents.to(device)) - 1).clamp(min=0).to(_F64)  # [B, W]
        w0 = bp.gather(1, min_eff[:, None]).max()
        w_node = bp[:, 1:].reshape(-1)[order]
        extra = wave_cost * torch.cummax(torch.cat([w0.reshape(1), w_node]), 0).values
    else:
        extra = torch.zeros_like(C)
    S = S0 + torch.cat([zero, torch.cumsum(p_sorted, 0)])
    T = t_fix + C + extra

    K = order.numel()
    kk = torch.arange(K + 1, device=device)
    limit = cand.sum()
    if max_total_nodes is not None:
        mt = torch.as_tensor(max_total_nodes, device=device).to(torch.long)
        limit = torch.minimum(limit, (mt - min_eff.sum()).clamp(min=0))
    allowed = kk <= limit

    bucket_ok = torch.ones_like(allowed)
    if buckets is not None:
        bk = torch.as_tensor(buckets, device=device).to(torch.long).reshape(-1)
        tot = base_l.sum() + min_eff.sum() + kk + int(bucket_offset)
        bucket_ok = torch.isin(tot, bk) | (kk == 0)
        if buckets_unbounded_above and bk.numel():
            bucket_ok = bucket_ok | (tot > bk.max())

    if exact:
        theta = (S / T).masked_fill(~(allowed & bucket_ok), float("-inf"))
        k_star = torch.argmax(theta)  # first maximum: smallest plan among ties
    else:
        gain = p_sorted * T[:-1] > S[:-1] * (T[1:] - T[:-1])
        fail = ~(gain & allowed[1:])
        if K == 0:
            k_star = torch.zeros((), dtype=torch.long, device=device)
        else:  # first failure, or K if none (no host sync)
            first = torch.argmax(fail.to(torch.uint8))
            k_star = torch.where(fail[first], first, torch.full_like(first, K))
        if buckets is not None:
            k_star = torch.where(bucket_ok & (kk <= k_star), kk, torch.zeros_like(kk)).max()

    chosen = torch.arange(K, device=device) < k_star
    counts = torch.zeros(B, dtype=torch.long, device=device)
    counts.scatter_add_(0, req, chosen.to(torch.long))
    num_nodes = min_eff + counts
    S_star = S[k_star]
    C_star = C[k_star]
    return BudgetDecision(
        num_nodes=num_nodes,
        total_nodes=num_nodes.sum(),
        expected_tokens=S_star,
        step_time=C_star,
        round_time=T[k_star],
        throughput=S_star / T[k_star],
        no_spec_step_time=no_spec_C,
        batch_size=B,
    )


def choose_batch_budget(
    scores: torch.Tensor,
    contexts: Any,
    latency: LatencyModel,
    t_fix: float | torch.Tensor | None = None,
    min_nodes: int | Sequence[int] | torch.Tensor = 0,
    max_nodes: int | Sequence[int] | torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Per-request draft node counts [B] (root excluded); see plan_batch_budget."""
    return plan_batch_budget(
        scores, contexts, latency, t_fix, min_nodes, max_nodes, **kwargs
    ).num_nodes


def snap_to_bucket(
    scores: torch.Tensor,
    num_nodes: Any,
    buckets: Sequence[int] | torch.Tensor,
    *,
    base_tokens: Any = None,
    min_nodes: int | Sequence[int] | torch.Tensor = 0,
    bucket_offset: int = 0,
) -> torch.Tensor:
    """Round a plan down to the largest bucket <= its total token count.

    total = sum(base_tokens) + sum(num_nodes) + bucket_offset. Nodes are
    dropped from the end of the global best-first order (lowest P(u) first,
    ties: later request, later column first), so the result is still a
    merged best-first prefix and every tree a best-first prefix. Nodes under
    min_nodes are never dropped, so the result may stay above the bucket if
    min_nodes forces it. With no bucket <= total, only the forced nodes stay.
    """
    device = scores.device
    B, W = scores.shape
    N = max(W - 1, 0)
    n = _per_request(num_nodes, B, device, 0)
    base_l = _per_request(base_tokens, B, device, 1)
    mn = torch.minimum(_per_request(min_nodes, B, device, 0).clamp(min=0), n)
    bk = torch.sort(torch.as_tensor(buckets, device=device).to(torch.long).reshape(-1)).values
    total = base_l.sum() + n.sum() + int(bucket_offset)
    pos = torch.searchsorted(bk, total.reshape(1), right=True) - 1  # largest bucket <= total
    target = torch.where(pos >= 0, bk[pos.clamp(min=0)], torch.zeros_like(pos)).reshape(())
    keep_optional = (target - base_l.sum() - int(bucket_offset) - mn.sum()).clamp(min=0)

    col = torch.arange(1, N + 1, device=device)
    optional = (col[None, :] > mn[:, None]) & (col[None, :] <= n[:, None])
    key = scores[:, 1:].to(_F64).masked_fill(~optional, float("-inf")).reshape(-1)
    order = torch.sort(key, descending=True, stable=True).indices
    req = torch.div(order, max(N, 1), rounding_mode="floor")
    rank = torch.arange(order.numel(), device=device)
    keep = (rank < keep_optional) & optional.reshape(-1)[order]
    counts = torch.zeros(B, dtype=torch.long, device=device)
    counts.scatter_add_(0, req, keep.to(torch.long))
    return mn + counts
