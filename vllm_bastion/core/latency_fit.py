"""Fitting the latency model to probed verify times (offline calibration). Pure numpy.

Contents: `CalibrationSample`, `fit_latency_model` -> `FitResult`,
`format_fit_table`, `probe_plan` (a calibration grid of batch shapes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .latency import DevicePrior, LatencyModel, RooflineCoeffs
from .model_shape import ModelShape, _to_numpy


# --------------------------------------------------------------------------
# offline calibration
# --------------------------------------------------------------------------


@dataclass
class CalibrationSample:
    """One timed verify forward: per-request (new_tokens, context) and seconds."""

    requests: list[tuple[int, int]]
    seconds: float


def _coerce_samples(samples: Iterable[Any]) -> list[CalibrationSample]:
    out = []
    for smp in samples:
        if isinstance(smp, CalibrationSample):
            out.append(smp)
            continue
        reqs, t = smp
        arr = np.asarray(_to_numpy(reqs), dtype=np.float64).reshape(-1, 2)
        out.append(CalibrationSample([(float(a), float(b)) for a, b in arr], float(t)))
    return out


@dataclass
class FitResult:
    model: LatencyModel
    measured: np.ndarray  # seconds
    predicted: np.ndarray  # seconds
    branch: np.ndarray  # per sample: True = compute branch active
    total_tokens: np.ndarray
    batch_sizes: np.ndarray
    mean_context: np.ndarray
    compute_identified: bool
    memory_identified: bool
    loss: float

    @property
    def coeffs(self) -> RooflineCoeffs:
        return self.model.coeffs

    @property
    def rel_errors(self) -> np.ndarray:
        return np.abs(self.predicted - self.measured) / self.measured

    @property
    def mape(self) -> float:
        return float(np.mean(self.rel_errors)) if len(self.measured) else 0.0

    @property
    def max_rel_error(self) -> float:
        return float(np.max(self.rel_errors)) if len(self.measured) else 0.0

    def table(self, max_rows: int | None = None) -> str:
        return format_fit_table(self, max_rows=max_rows)

    def summary(self) -> dict[str, Any]:
        return {
            "coeffs": asdict(self.coeffs),
            "mape": self.mape,
            "max_rel_error": self.max_rel_error,
            "num_samples": int(len(self.measured)),
            "num_compute_bound": int(self.branch.sum()),
            "compute_identified": self.compute_identified,
            "memory_identified": self.memory_identified,
        }


def format_fit_table(fit: FitResult, max_rows: int | None = None) -> str:
    """Predicted-vs-measured table (one line per sample, worst errors last if
    truncated to max_rows)."""
    idx = np.arange(len(fit.measured))
    if max_rows is not None and len(idx) > max_rows:
        idx = np.sort(np.argsort(fit.rel_errors)[-max_rows:])
    lines = [
        f"{'#':>4} {'reqs':>5} {'tokens':>7} {'mean_ctx':>9} {'measured_ms':>12} "
        f"{'predicted_ms':>13} {'rel_err':>8} branch"
    ]
    for i in idx:
        lines.append(
            f"{i:>4d} {int(fit.batch_sizes[i]):>5d} {int(fit.total_tokens[i]):>7d} "
            f"{fit.mean_context[i]:>9.0f} {fit.measured[i] * 1e3:>12.4f} "
            f"{fit.predicted[i] * 1e3:>13.4f} {fit.rel_errors[i] * 100:>7.2f}% "
            f"{'compute' if fit.branch[i] else 'memory'}"
        )
    lines.append(
        f"MAPE {fit.mape * 100:.2f}%  max rel err {fit.max_rel_error * 100:.2f}%  "
        f"({int(fit.branch.sum())}/{len(fit.branch)} compute-bound)"
    )
    return "\n".join(lines)


def _nnls2(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||X theta - y||^2 s.t. theta >= 0 for two columns, exactly (KKT faces)."""
    cands = []
    sol, *_ = np.linalg.lstsq(X, y, rcond=None)
    if np.all(sol >= 0) and np.all(np.isfinite(sol)):
        cands.append(sol)
    for j in range(2):
        col = X[:, j]
        den = float(col @ col)
        th = np.zeros(2)
        if den > 0:
            th[j] = max(0.0, float(col @ y) / den)
        cands.append(th)
    cands.append(np.zeros(2))
    best = min(cands, key=lambda th: float(np.sum((X @ th - y) ** 2)))
    return best


def fit_latency_model(
    samples: Iterable[Any],
    shape: ModelShape,
    device_prior: DevicePrior,
    *,
    t_fix: float = 0.0,
    t_fix_per_request: float = 0.0,
    materialized_scores: bool = False,
    sigma_scale: float = 30.0,
    huber_delta: float = 0.05,
    ridge: float = 1e-6,
    max_iter: int = 60,
    min_slope: float | None = None,
    min_branch_points: int = 3,
) -> FitResult:
    """Fit C = max(a_c T_comp + b_c, a_m T_mem + b_m) (all >= 0) to timings.

    samples: iterable of (requests, seconds) (or `CalibrationSample`s), where
        requests lists (new_tokens s_i, context c_i) of every request of the
        timed forward; seconds is the measured verify forward.

    Method (numpy only): the model is max-affine in (T_comp, T_mem), so for a
    fixed assignment of samples to branches it is two independent linear
    least-squares problems. We alternate assignment <-> 2-variable exact NNLS
    per branch (which is Gauss-Newton for this piecewise-linear model),
    reweighting residuals with a Huber loss (IRLS) on *relative* error, from
    several starts (raw roofline split, all-memory, all-compute, splits at
    quantiles of arithmetic intensity) and keep the best. Per-sample sigma =
    1 + sigma_scale * (tokens - min) / (max - min), renormalized to mean 1, so
    small batches weigh more (BASTION weights small trees the same way).
    A tiny ridge pulls each slope to 1 and intercept to 0 for conditioning.
    Slopes are bounded below by `min_slope` (default 0.5 for a datasheet
    prior: no kernel runs at twice the peak; 0 for the placeholder/fallback
    prior), a two-branch fit needs `min_branch_points` samples on each
    branch and must beat the best single-branch fit by BIC;
    without both guards a max of two lines happily fits noise with a flat
    "compute" branch that then under-predicts large batches badly.

    A branch that no sample activates cannot be measured; it is then
    extrapolated with the other branch's efficiency (same slope and
    intercept), lowered until it stays below every measurement, and flagged
    (`compute_identified` / `memory_identified` False).
    """
    samples = _coerce_samples(samples)
    if not samples:
        raise ValueError("no calibration samples")
    base = LatencyModel.from_prior(
        shape,
        device_prior,
        t_fix=t_fix,
        t_fix_per_request=t_fix_per_request,
        materialized_scores=materialized_scores,
    )
    n = len(samples)
    xc = np.empty(n)
    xm = np.empty(n)
    y = np.empty(n)
    tok = np.empty(n)
    bs = np.empty(n)
    mc = np.empty(n)
    for i, smp in enumerate(samples):
        arr = np.asarray(smp.requests, dtype=np.float64).reshape(-1, 2)
        if not (math.isfinite(smp.seconds) and smp.seconds > 0):
            raise ValueError(f"sample {i} has non-positive or non-finite time {smp.seconds}")
        xc[i], xm[i] = base._raw(arr[:, 0], arr[:, 1])
        y[i] = smp.seconds
        tok[i] = arr[:, 0].sum()
        bs[i] = len(arr)
        mc[i] = arr[:, 1].mean() if len(arr) else 0.0

    span = tok.max() - tok.min()
    sigma = 1.0 + sigma_scale * (tok - tok.min()) / span if span > 0 else np.ones(n)
    sigma = sigma / sigma.mean()
    w = 1.0 / (y * sigma)  # relative, small batches weighted up
    t_scale = float(np.median(y))
    prior = np.array([1.0, 0.0])
    if min_slope is None:
        min_slope = 0.0 if device_prior.fallback else 0.5
    a_min = float(min_slope)

    def predict(th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pc = th[0] * xc + th[1]
        pm = th[2] * xm + th[3]
        return np.maximum(pc, pm), pc >= pm

    def loss_of(th: np.ndarray) -> float:
        r = (predict(th)[0] - y) * w
        a = np.abs(r)
        return float(np.sum(np.where(a <= huber_delta, 0.5 * r * r, huber_delta * (a - 0.5 * huber_delta))))

    def fit_branch(x: np.ndarray, t: np.ndarray, ww: np.ndarray, prev: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return prev
        # columns scaled to O(1): theta' = (a, b / t_scale)
        X = np.stack([x * ww, np.full_like(x, t_scale) * ww], 1)
        yy = t * ww
        lam = math.sqrt(ridge * max(len(x), 1))
        X = np.vstack([X, lam * np.eye(2)])
        yy = np.concatenate([yy, lam * prior])
        # a = a_min + a', a' >= 0
        th = _nnls2(X, yy - a_min * X[:, 0])
        return np.array([th[0] + a_min, th[1] * t_scale])

    def alternate(assign: np.ndarray, th: np.ndarray) -> tuple[np.ndarray, float]:
        hub = np.ones(n)
        for _ in range(max_iter):
            ww = w * np.sqrt(hub)
            thc = fit_branch(xc[assign], y[assign], ww[assign], th[:2])
            thm = fit_branch(xm[~assign], y[~assign], ww[~assign], th[2:])
            th = np.concatenate([thc, thm])
            pred, new_assign = predict(th)
            r = np.abs((pred - y) * w)
            hub = np.where(r <= huber_delta, 1.0, huber_delta / np.maximum(r, 1e-300))
            if np.array_equal(new_assign, assign):
                break
            assign = new_assign
        return th, loss_of(th)

    starts: list[tuple[np.ndarray, np.ndarray]] = []
    th0 = np.array([1.0, 0.0, 1.0, 0.0])
    starts.append((xc >= xm, th0))
    starts.append((np.zeros(n, bool), th0))
    starts.append((np.ones(n, bool), th0))
    intensity = xc / np.maximum(xm, 1e-300)
    for q in (0.25, 0.5, 0.75, 0.9):
        thr = np.quantile(intensity, q)
        starts.append((intensity > thr, th0))
    best_th, best_loss = None, math.inf
    for assign, th in starts:
        th_fit, L_fit = alternate(assign.copy(), th.copy())
        n_comp = int(predict(th_fit)[1].sum())
        if min(n_comp, n - n_comp) < min_branch_points:
            continue  # a branch on 1-2 samples just interpolates noise
        if L_fit < best_loss - 1e-15:
            best_th, best_loss = th_fit, L_fit

    def single_branch(compute: bool) -> np.ndarray:
        """Every sample on one branch; the other extrapolated below the data."""
        x = xc if compute else xm
        hub = np.ones(n)
        th2 = np.array([1.0, 0.0])
        for _ in range(max_iter):
            th_prev = th2
            th2 = fit_branch(x, y, w * np.sqrt(hub), th2)
            r = np.abs((th2[0] * x + th2[1] - y) * w)
            hub = np.where(r <= huber_delta, 1.0, huber_delta / np.maximum(r, 1e-300))
            if np.allclose(th2, th_prev, rtol=1e-10, atol=1e-15):
                break
        pred1 = th2[0] * x + th2[1]
        other = _extrapolate_branch(xm if compute else xc, pred1, th2[0], th2[1])
        return np.concatenate([th2, other]) if compute else np.concatenate([other, th2])

    # model selection (BIC on the robust loss): a second branch must pay for
    # its two parameters, otherwise noise is fitted by a spurious branch
    def bic(th: np.ndarray, k: int) -> float:
        return n * math.log(max(2.0 * loss_of(th) / n, 1e-300)) + k * math.log(max(n, 2))

    cands = [] if best_th is None else [(bic(best_th, 4), best_th)]
    for compute in (False, True):
        th1 = single_branch(compute)
        cands.append((bic(th1, 2), th1))
    th = min(cands, key=lambda t: t[0])[1].copy()
    pred, assign = predict(th)

    def identified(mask: np.ndarray, x: np.ndarray) -> bool:
        if mask.sum() < max(2, min_branch_points):
            return False
        xs = x[mask]
        return bool(xs.max() > 1.05 * xs.min())

    comp_ok = identified(assign, xc)
    mem_ok = identified(~assign, xm)
    th_sel = th.copy()
    if not comp_ok and mem_ok:
        th[:2] = _extrapolate_branch(xc, pred, th[2], th[3])
    elif not mem_ok and comp_ok:
        th[2:] = _extrapolate_branch(xm, pred, th[0], th[1])
    pred2, assign2 = predict(th)
    if np.max(np.abs(pred2 - pred) / y) > 1e-9:  # extrapolation must not change the fit
        th = th_sel
        pred2, assign2 = predict(th)
    model = base.with_coeffs(RooflineCoeffs.from_array(th))
    return FitResult(
        model=model,
        measured=y,
        predicted=pred2,
        branch=assign2,
        total_tokens=tok,
        batch_sizes=bs,
        mean_context=mc,
        compute_identified=comp_ok,
        memory_identified=mem_ok,
        loss=loss_of(th),
    )


def _extrapolate_branch(x: np.ndarray, pred: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Unmeasured branch: the other branch's (slope, intercept), slope lowered
    so the branch stays at or below the fitted curve on every sample."""
    b = intercept
    room = (pred - b) / np.maximum(x, 1e-300)
    a = min(max(slope, 1.0), float(np.min(room)) * (1 - 1e-9)) if len(x) else slope
    if a < 0:
        a, b = 0.0, 0.0
    return np.array([a, b])


def probe_plan(
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    nodes_per_request: Sequence[int] = (0, 4, 8, 16, 32, 64, 128, 256),
    contexts: Sequence[int] = (256, 1024, 4096),
    max_tokens: int = 8192,
) -> list[list[tuple[int, int]]]:
    """Batch shapes to time for calibration: every (B, n, c) with B * (1 + n)
    <= max_tokens, each a list of B identical (1 + n, c) requests."""
    plan = []
    for c in contexts:
        for b in batch_sizes:
            for nn in nodes_per_request:
                if b * (1 + nn) <= max_tokens:
                    plan.append([(1 + int(nn), int(c))] * int(b))
    return plan
