"""Online calibration of the acceptance surrogate. Pure torch / numpy.

BASTION's surrogate treats the drafter's per-depth marginal q_d(t) as the
probability that node t at depth d is accepted, so P(u) = prod_j q_j. A
block-diffusion drafter's marginals are conditioned on the context only, not
on the drafted path being right; conditional on its parent having been
accepted, a node is accepted far more often than q_d suggests (and at depth 1,
right after a rejection, sometimes less). Multiplying raw marginals therefore
makes deep nodes look hopeless, and best-first grows wide, shallow trees.

`AcceptanceCalibrator` learns, from every verify step, the map

    log q_d(t)  ->  log P(node accepted | its parent was accepted, depth d)

separately for each *path class*: how many of the node's path choices
(itself included) were not the drafter's top-1 at their depth (0, 1, 2+). A
DFlash depth-d marginal mostly continues the top-1 branch, so a deep node on
the all-top-1 path is accepted much more often (given its parent was) than a
node in a sub-branch under a second choice; the class captures that.

Data: every node whose parent was accepted was "tested" by the walk; it was
accepted iff the target chose its token. Per (depth, class), tested/accepted
counts are kept in bins of log q with exponential forgetting (so the map
tracks the workload), smoothed with a prior equal to the raw surrogate (p = q,
so an untrained calibrator is BASTION's original rule), and made
non-decreasing in log q (pool-adjacent-violators), which keeps every depth's
top-k order within a class. The tree builder takes the calibrated values as a
[B, D, classes, K] table (`build_best_first_trees(..., class_values=...)`).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 3  # non-top-1 choices on the path: 0, 1, 2+


class AcceptanceCalibrator:
    def __init__(self, depth: int, *, bins: int = 24, lo: float = -12.0,
                 forgetting: float = 0.995, prior_strength: float = 4.0,
                 refresh_every: int = 32):
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.depth = depth
        self.edges = np.linspace(lo, 0.0, bins + 1)
        self.centers = 0.5 * (self.edges[:-1] + self.edges[1:])
        self.forgetting = forgetting
        self.prior_strength = prior_strength
        self.refresh_every = refresh_every
        self.tested = np.zeros((depth, NUM_CLASSES, bins))
        self.accepted = np.zeros((depth, NUM_CLASSES, bins))
        self.updates = 0
        self._table = np.tile(self.centers, (depth, NUM_CLASSES, 1))  # log p; prior p = q
        self._table_t: torch.Tensor | None = None

    def _bin(self, logq: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.edges, logq, side="right") - 1, 0, len(self.centers) - 1)

    def update(self, depths, logq, accepted, classes=None) -> None:
        """Feed the tested nodes of one step: depth (1-based), raw log q,
        accepted?, and path class (see module docstring; default 0)."""
        d = np.asarray(depths, dtype=np.int64).reshape(-1) - 1
        lq = np.asarray(logq, dtype=np.float64).reshape(-1)
        a = np.asarray(accepted, dtype=np.float64).reshape(-1)
        c = (np.zeros_like(d) if classes is None
             else np.clip(np.asarray(classes, dtype=np.int64).reshape(-1), 0, NUM_CLASSES - 1))
        keep = (d >= 0) & (d < self.depth) & np.isfinite(lq)
        self.tested *= self.forgetting
        self.accepted *= self.forgetting
        if keep.any():
            b = self._bin(lq[keep])
            np.add.at(self.tested, (d[keep], c[keep], b), 1.0)
            np.add.at(self.accepted, (d[keep], c[keep], b), a[keep])
        self.updates += 1
        if self.updates % self.refresh_every == 0:
            self._refresh()

    def _refresh(self) -> None:
        prior = np.exp(self.centers)[None, None, :]
        k = self.prior_strength
        p = (self.accepted + k * prior) / (self.tested + k)
        w = self.tested + k
        out = np.empty_like(p)
        for d in range(self.depth):
            for c in range(NUM_CLASSES):
                out[d, c] = _isotonic(p[d, c], w[d, c])
        self._table = np.log(np.clip(out, 1e-6, 1.0))
        self._table_t = None

    def table(self) -> np.ndarray:
        """[depth, classes, bins] calibrated log P(accepted | parent accepted)."""
        return self._table.copy()

    def class_values(self, logq: torch.Tensor) -> torch.Tensor:
        """[B, D, K] raw per-depth log-probs -> [B, D, classes, K] calibrated
        log-probs for a node of each path class: the table interpolated
        linearly in log q (an untrained calibrator returns log q itself);
        non-decreasing in log q, so every depth's top-k order is kept."""
        if self._table_t is None or self._table_t.device != logq.device:
            self._table_t = torch.tensor(self._table, dtype=torch.float32, device=logq.device)
        B, D, K = logq.shape
        Dc = min(D, self.depth)
        x = logq.float()
        centers = torch.tensor(self.centers, dtype=torch.float32, device=logq.device)
        nb = centers.numel()
        hi = torch.bucketize(x[:, :Dc].contiguous(), centers).clamp(1, nb - 1)  # [B, Dc, K]
        lo = hi - 1
        w = ((x[:, :Dc] - centers[lo]) / (centers[hi] - centers[lo])).clamp(0.0, 1.0)
        out = x[:, :, None, :].expand(B, D, NUM_CLASSES, K).clone()
        xd = x[:, :Dc, :, None]  # [B, Dc, K, 1]
        tab = self._table_t[:Dc].transpose(1, 2)  # [Dc, bins, classes]
        d_idx = torch.arange(Dc, device=logq.device)[None, :, None]
        t_lo, t_hi = tab[d_idx, lo], tab[d_idx, hi]  # [B, Dc, K, classes]
        val = t_lo + w[..., None] * (t_hi - t_lo)
        # outside the centers: slope 1 in log q (order kept; never above 0)
        val = torch.where(xd < centers[0], tab[None, :, None, 0] + (xd - centers[0]), val)
        val = torch.where(xd > centers[-1], (tab[None, :, None, -1] + (xd - centers[-1])).clamp(max=0.0), val)
        val = torch.where(torch.isfinite(xd), val, xd)
        out[:, :Dc] = val.permute(0, 1, 3, 2)
        return out

    def summary(self) -> dict:
        tested = self.tested.sum(axis=2)  # [depth, class]
        acc = self.accepted.sum(axis=2)
        rate = np.where(tested > 0, acc / np.maximum(tested, 1e-9), np.nan)
        return {
            "updates": self.updates,
            "tested_by_depth": [round(float(t), 1) for t in tested.sum(axis=1)],
            "acceptance_by_depth_and_class": [
                [None if np.isnan(r) else round(float(r), 3) for r in row] for row in rate
            ],
        }


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted non-decreasing least-squares fit (pool adjacent violators)."""
    vals, wts, sizes = [], [], []
    for yi, wi in zip(y, w):
        vals.append(float(yi))
        wts.append(float(wi))
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / (wts[-2] + wts[-1])
            wt = wts[-2] + wts[-1]
            sz = sizes[-2] + sizes[-1]
            vals[-2:], wts[-2:], sizes[-2:] = [v], [wt], [sz]
    return np.repeat(vals, sizes)
