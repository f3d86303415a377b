"""Whether each request drafts this step: BASTION's rule, applied before drafting. Pure torch.

The budget (core/budget.py) sizes trees once the drafter has run, by
maximizing the batch's expected tokens per second. When drafting itself
cannot pay (the drafter's cost, or the verify cost of any tree, exceeds what
the trees would gain) the right tree is no tree and the right drafter run is
no run. This module makes that decision *before* the drafter runs, with the
same criterion and what BASTION has learned so far:

  per request  gain[r]   expected draft tokens accepted per step if it drafts
                         (moving average of its own accepted nodes),
               nodes[r]  expected tree size if it drafts (moving average);
  per engine   the calibrated latency model C(batch) of the verify forward,
               the drafter's cost  t_d(m) = draft_fixed + draft_per_req * m
               for m drafting requests, and the rest of a step (t_base).

A step where the requests in S draft is expected to emit
    E(S) = B + sum_{r in S} gain[r]      tokens in
    T(S) = t_base + [S nonempty] t_d(|S|) + C(tokens(S))  seconds,
with tokens(S) = each request's base tokens + nodes[r] for r in S. Requests
are ranked by gain per unit of marginal cost, and S is the best prefix of
that ranking by E/T (every prefix evaluated at once with cumulative sums,
no loop). Requests forced to probe (`force`: they have not drafted for a
while, so their gain estimate is stale) always draft; the empty set is
allowed, and then the drafter does not run at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .latency import LatencyModel
from .robust_ema import OutlierClip
_F64 = torch.float64


@dataclass
class DraftDecision:
    drafts: torch.Tensor  # [B] bool, requests that draft this step
    expected_tokens: float  # E(S)
    round_time: float  # T(S), seconds
    no_draft_round_time: float  # T(empty), seconds

    @property
    def speedup_estimate(self) -> float:
        b = self.drafts.numel()
        return (self.expected_tokens / self.round_time) / (b / self.no_draft_round_time) if b else 1.0


def _verify_cost(latency: LatencyModel, s_sum, quad, c_sum):
    k, co = latency.costs, latency.coeffs
    F = k.flops_per_token * s_sum + k.flops_attn * quad
    M = k.bytes_fixed + k.bytes_per_token * s_sum + k.bytes_per_ctx * c_sum + k.bytes_attn * quad
    return torch.maximum(co.a_c * F / latency.peak_flops + co.b_c, co.a_m * M / latency.bandwidth + co.b_m)


def plan_drafting(
    gain: torch.Tensor,
    nodes: torch.Tensor,
    contexts: torch.Tensor,
    eligible: torch.Tensor,
    latency: LatencyModel,
    *,
    t_base: float,
    draft_fixed: float,
    draft_per_req: float,
    force: torch.Tensor | None = None,
    base_tokens: torch.Tensor | None = None,
) -> DraftDecision:
    """Choose which requests draft this step (module docstring).

    Args:
        gain, nodes: [B] per-request expected accepted draft tokens and tree
            size if the request drafts.
        contexts: [B] tokens in each request's KV cache.
        eligible: [B] bool, requests that may draft (decoding, room left).
        latency: the calibrated verify-cost model.
        t_base: seconds per step besides the verify forward and the drafter.
        draft_fixed, draft_per_req: the drafter's cost model (seconds).
        force: [B] bool, eligible requests that must draft (probes).
        base_tokens: [B] tokens each request feeds without a tree (default 1).
    """
    B = gain.numel()
    dev = gain.device
    g = gain.to(_F64).clamp(min=0)
    n = nodes.to(_F64).clamp(min=0)
    c = contexts.to(_F64)
    ok = eligible.to(torch.bool)
    forced = ok & (force.to(torch.bool) if force is not None else torch.zeros(B, dtype=torch.bool, device=dev))
    base = base_tokens.to(_F64) if base_tokens is not None else torch.ones(B, dtype=_F64, device=dev)

    def quad_of(s):
        return (s * (c + s)).sum()

    # step with only the forced requests drafting
    s0 = base + torch.where(forced, n, torch.zeros_like(n))
    S0, Q0, C_sum = s0.sum(), quad_of(s0), c.sum()
    E0 = float(B) + (g * forced).sum()
    m0 = int(forced.sum())
    # optional requests ranked by gain per unit of their own marginal verify cost
    opt = ok & ~forced
    dq = n * (c + 2 * base + n)  # (s + n)(c + s + n) - s(c + s)
    marg = _verify_cost(latency, S0 + n, Q0 + dq, C_sum) - _verify_cost(latency, S0, Q0, C_sum)
    key = torch.where(opt, g / (marg + draft_per_req).clamp(min=1e-12), torch.full_like(g, -1.0))
    order = torch.sort(key, descending=True, stable=True).indices
    take = opt[order]
    zero = torch.zeros(1, dtype=_F64, device=dev)
    cum_g = torch.cat([zero, torch.cumsum((g * opt)[order], 0)])
    cum_n = torch.cat([zero, torch.cumsum((n * opt)[order], 0)])
    cum_q = torch.cat([zero, torch.cumsum((dq * opt)[order], 0)])
    m = m0 + torch.cat([zero, torch.cumsum(take.to(_F64), 0)])
    T = (t_base + torch.where(m > 0, draft_fixed + draft_per_req * m, zero)
         + _verify_cost(latency, S0 + cum_n, Q0 + cum_q, C_sum))
    E = E0 + cum_g
    theta = (E / T).masked_fill(~torch.cat([torch.ones(1, dtype=torch.bool, device=dev), take]),
                                float("-inf"))
    k = int(torch.argmax(theta))  # first maximum: the fewest drafters among ties
    drafts = forced.clone()
    drafts[order[:k]] |= take[:k]
    t_empty = t_base + float(_verify_cost(latency, base.sum(), quad_of(base), C_sum))
    return DraftDecision(drafts, float(E[k]), float(T[k]), t_empty)


def probes_due(eligible: np.ndarray, idle: np.ndarray, probe_batch: np.ndarray,
               interval: int | np.ndarray) -> np.ndarray:
    """[B] bool: requests that must draft this step to re-measure their gain.

    A request is due after `interval` (per request, or one for all) steps
    without drafting, or when the batch has halved since it last drafted.
    Probes are batched: when one is due, every eligible request idle for at
    least 3/4 of its interval probes with it, so the drafter's fixed cost is
    paid about once per interval and not at almost every step of a large
    batch (each request probing alone, at its own step)."""
    B = len(eligible)
    due = eligible & ((idle >= interval) | (2 * B <= probe_batch))
    if not due.any():
        return due
    return due | (eligible & (4 * idle >= 3 * interval))


def back_off_probes(backoff: np.ndarray, probed: np.ndarray, eligible: np.ndarray,
                    drafts: np.ndarray, forced: np.ndarray, cap: int) -> None:
    """Per-request probe back-off, in place (probe interval = base * 2**backoff).

    A probe costs a drafter run and a verify of the probe's tree. When the
    rule, having seen the probe's acceptance, still leaves the request off
    (`probed` last step, eligible, not drafting now), the probe did not pay:
    its next one waits twice as long, up to 2**cap times the base interval.
    A request the rule lets draft on its own (not forced) starts over. Where
    speculation cannot pay at all (a compute-bound verify) probes then cost
    a fraction of a percent instead of a few percent; where it pays again,
    the gain estimate's relaxation toward the engine's mean switches a
    request back on between probes."""
    declined = probed & eligible & ~drafts
    backoff[declined] = np.minimum(backoff[declined] + 1, cap)
    backoff[drafts & ~forced] = 0


class LinearCost:
    """seconds ~ fixed + per_item * m, fitted online (recursive least squares
    with forgetting, started from a prior worth `prior_weight` samples).

    A sample further than `clip` (relative) from the prediction moves the fit
    as if it were at that distance (Huber), unless `confirm` such samples in a
    row lie on the same side: a one-off slow step (a compilation on a new
    shape) cannot make drafting look expensive, a real change of cost can."""

    def __init__(self, fixed: float, per_item: float, forgetting: float = 0.98,
                 prior_weight: float = 4.0, clip: float = 0.5, confirm: int = 3):
        self.theta = torch.tensor([fixed, per_item], dtype=_F64)
        # as if `prior_weight` samples at m = 0 and at m = 8 had agreed with the prior
        self._P1 = torch.diag(torch.tensor([1.0, 1.0 / 64.0], dtype=_F64))  # one sample's worth
        self.P = self._P1 / prior_weight
        self.lam = forgetting
        self._clip = OutlierClip(clip, confirm)
        self.samples = 0

    @property
    def fixed(self) -> float:
        return max(float(self.theta[0]), 0.0)

    @property
    def per_item(self) -> float:
        return max(float(self.theta[1]), 0.0)

    def __call__(self, m: float) -> float:
        return self.fixed + self.per_item * m if m > 0 else 0.0

    def update(self, m: float, seconds: float) -> None:
        if not np.isfinite(seconds) or seconds < 0:
            return
        pred = self(m) if m > 0 else self.fixed
        if pred > 0:
            seconds, level_change = self._clip(pred, seconds)
            if level_change:  # taken as measured, and the old fit
                self.P = self._P1.clone()  # weighs no more than one sample
        else:
            self._clip.reset()
        x = torch.tensor([1.0, float(m)], dtype=_F64)
        Px = self.P @ x
        k = Px / (self.lam + x @ Px)
        self.theta = self.theta + k * (seconds - x @ self.theta)
        self.P = (self.P - torch.outer(k, Px)) / self.lam
        self.samples += 1


class DraftingEstimates:
    """What each request is expected to gain from drafting, learned online.

    After a step in which a request drafted, its expected gain (accepted
    draft tokens per drafted step) moves toward what it accepted
    (exponential average, weight `w`), and so does an engine-wide average.
    While a request does not draft nothing is observed, so its estimate
    relaxes toward the engine-wide average with time constant `tau` steps:
    a request switched off by a few bad steps switches itself back on if
    requests like it gain on average, while one whose text keeps defeating
    the drafter stays off (and is re-probed anyway every reprobe interval).
    New requests start at the engine-wide average. That average is a long-run
    one (weight `w_engine` per step with drafting requests: a time constant of
    about 100 steps): at batch 1 it is fed by one request at a time, and with
    a faster one, a stretch of text that defeats the drafter at the end of one
    request made the next request start below the drafting threshold and wait
    a whole re-probe interval (measured: 32 steps off on a fresh prompt).
    Until it has seen 1/w_engine steps it is the plain mean of what it saw
    (the prior counting as one step), so a fresh engine does not start from
    the prior guess for a hundred steps.
    Arrays are per request (numpy, modified in place); nothing loops over
    requests.
    """

    def __init__(self, prior_gain: float = 1.0, w: float = 0.2, w_engine: float = 0.01,
                 tau: float = 8.0):
        self.engine_gain = prior_gain
        self._engine_steps = 0  # steps with drafting requests seen (the prior counts as one)
        self.w, self.w_engine, self.relax = w, w_engine, 1.0 - float(np.exp(-1.0 / tau))

    def update(self, gain, nodes_est, idle, drafted, nodes, accepted, decoding) -> None:
        """gain/nodes_est/idle: per-request state (updated in place);
        drafted: requests that drafted for this step; nodes/accepted: their
        verified tree sizes and accepted nodes; decoding: decoding requests."""
        w = self.w
        acc = accepted.astype(np.float64)
        gain[drafted] += w * (acc[drafted] - gain[drafted])
        if drafted.any():
            # a running mean until the long-run window is full, then an
            # exponential one: the prior guess is forgotten after a few steps
            self._engine_steps += 1
            a = max(self.w_engine, 1.0 / (1 + self._engine_steps))
            self.engine_gain += a * (float(acc[drafted].mean()) - self.engine_gain)
        had = drafted & (nodes > 0)
        nodes_est[had] += w * (nodes[had] - nodes_est[had])
        off = ~drafted & decoding
        gain[off] += self.relax * (self.engine_gain - gain[off])
        idle[drafted] = 0
        idle[off] += 1
