"""Refitting the latency model online from measured step times. Pure numpy.

Contents: `OnlineRefit` (RLS with forgetting + Huber clipping).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np

from .latency import LatencyModel, RooflineCoeffs
from .robust_ema import RobustEma
from .model_shape import _as_arrays


# --------------------------------------------------------------------------
# online refit
# --------------------------------------------------------------------------


class OnlineRefit:
    """Recursive least squares with forgetting on the active branch's (a, b).

    Each measured verify forward (per-request (s_i, c_i), seconds) updates the
    coefficients of the branch the current model says is active:

        y / y_hat = a * (x / y_hat) + v * (t_ref / y_hat),   b = v * t_ref

    i.e. RLS on relative error (x = T_comp or T_mem of the step). Robustness:
      * the relative residual is clipped at `huber_k` robust scales (Huber);
        the scale is an EMA of clipped |residual| with floor `min_scale`;
      * `confirm` consecutive same-sign clipped residuals are taken as a
        regime change (device slowed down, other tenant, clocks): that sample
        is used unclipped and the branch covariance is reset, so a step change
        is tracked within a few steps;
      * a confirmed regime change also rescales the idle branch by the same
        factor (`propagate`), since slowdowns are usually device-wide; a
        branch is otherwise only learned while it is the active one;
      * covariance trace is capped (no wind-up when the regressor does not
        vary); coefficients are projected to >= 0; non-finite updates are
        rejected and leave the state unchanged.
    """

    def __init__(
        self,
        model: LatencyModel,
        *,
        forgetting: float = 0.95,
        huber_k: float = 3.0,
        min_scale: float = 0.02,
        scale_alpha: float = 0.1,
        confirm: int = 3,
        init_var: float = 0.05,
        max_var: float = 4.0,
        propagate: bool = True,
    ) -> None:
        if not (0 < forgetting <= 1):
            raise ValueError("forgetting must be in (0, 1]")
        self._model = model.copy()
        self._snapshot: LatencyModel | None = None  # the model's current copy, handed out
        self.lam = float(forgetting)
        self.huber_k = float(huber_k)
        self.min_scale = float(min_scale)
        self.scale_alpha = float(scale_alpha)
        self.confirm = int(confirm)
        self.init_var = float(init_var)
        self.max_var = float(max_var)
        self.propagate = bool(propagate)
        ref = model.step_time([1], [0])
        self.t_ref = ref if math.isfinite(ref) and ref > 0 else 1e-3
        k = model.coeffs
        self._theta = {
            "compute": np.array([k.a_c, k.b_c / self.t_ref]),
            "memory": np.array([k.a_m, k.b_m / self.t_ref]),
        }
        self._P = {b: self._init_P(self._theta[b]) for b in self._theta}
        # robust residual scale and outlier run, per branch
        self._scale = {b: self.min_scale for b in self._theta}
        self._run = {b: 0 for b in self._theta}
        self._sign = {b: 0 for b in self._theta}
        self.num_updates = 0
        self.num_clipped = 0
        self.num_rejected = 0
        self.num_resets = 0
        self.fixed = RobustEma(model.t_fix if model.t_fix > 0 else None)

    def _init_P(self, th: np.ndarray) -> np.ndarray:
        # relative prior uncertainty on each coefficient (absolute floor 0.1)
        return np.diag(self.init_var * np.maximum(np.abs(th), 0.1) ** 2 + 1e-12)

    @property
    def model(self) -> LatencyModel:
        """The current model (a copy, made once per change of the model; safe
        to hand to the budget search, which reads it only)."""
        if self._snapshot is None:
            self._snapshot = self._model.copy()
        return self._snapshot

    @property
    def coeffs(self) -> RooflineCoeffs:
        return RooflineCoeffs(**asdict(self._model.coeffs))

    def _write_back(self) -> None:
        tc, tm = self._theta["compute"], self._theta["memory"]
        self._model.coeffs = RooflineCoeffs(
            a_c=max(0.0, float(tc[0])),
            b_c=max(0.0, float(tc[1]) * self.t_ref),
            a_m=max(0.0, float(tm[0])),
            b_m=max(0.0, float(tm[1]) * self.t_ref),
        )
        self._snapshot = None

    def update(self, new_tokens: Any, contexts: Any, measured_seconds: float) -> bool:
        """Feed one measured verify forward. Returns False if it was rejected."""
        y = float(measured_seconds)
        try:
            s, c = _as_arrays(new_tokens, contexts)
        except ValueError:
            self.num_rejected += 1
            return False
        if not (math.isfinite(y) and y > 0) or len(s) == 0:
            self.num_rejected += 1
            return False
        tc, tm = self._model._raw(s, c)
        k = self._model.coeffs
        pc, pm = k.a_c * tc + k.b_c, k.a_m * tm + k.b_m
        branch = "compute" if pc >= pm else "memory"
        x = tc if branch == "compute" else tm
        y_hat = max(pc, pm)
        if not (math.isfinite(y_hat) and y_hat > 0 and math.isfinite(x)):
            y_hat = y
        phi = np.array([x / y_hat, self.t_ref / y_hat])
        th = self._theta[branch]
        P = self._P[branch]
        target = y / y_hat
        e = target - float(phi @ th)  # relative residual

        # Huber clipping with a robust running scale; confirmed runs = regime change
        thr = self.huber_k * self._scale[branch]
        reset = False
        if abs(e) > thr:
            sign = 1 if e > 0 else -1
            run = self._run[branch] + 1 if sign == self._sign[branch] else 1
            self._sign[branch] = sign
            if run >= self.confirm:
                reset = True
                run = 0
            else:
                self.num_clipped += 1
                e = sign * thr
            self._run[branch] = run
        else:
            self._run[branch] = 0
        self._scale[branch] = max(
            self.min_scale,
            (1 - self.scale_alpha) * self._scale[branch] + self.scale_alpha * min(abs(e), thr),
        )
        if reset:
            self.num_resets += 1
            P = self._init_P(th) * 25.0  # ~ +-100% relative uncertainty

        Pphi = P @ phi
        denom = self.lam + float(phi @ Pphi)
        gain = Pphi / denom
        th_new = th + gain * e
        P_new = (P - np.outer(gain, Pphi)) / self.lam
        P_new = 0.5 * (P_new + P_new.T)
        tr = float(np.trace(P_new))
        cap = self.max_var * float(np.sum(np.maximum(np.abs(th_new), 0.1) ** 2))
        if tr > cap:
            P_new *= cap / tr
        th_new = np.maximum(th_new, 0.0)
        if not (np.all(np.isfinite(th_new)) and np.all(np.isfinite(P_new))):
            self.num_rejected += 1
            self._P[branch] = self._init_P(th)
            return False
        if th_new[0] == 0.0 and th_new[1] == 0.0:
            th_new = th.copy()  # never collapse a branch to zero
        self._theta[branch] = th_new
        self._P[branch] = P_new
        if reset and self.propagate:
            # A confirmed level change is most often device-wide (clocks,
            # co-tenants): move the idle branch by the same factor now; its own
            # samples correct it later if the change was branch-specific.
            ratio = float(phi @ th_new) / max(float(phi @ th), 1e-12)
            if math.isfinite(ratio) and ratio > 0:
                ratio = min(max(ratio, 0.25), 4.0)
                other = "memory" if branch == "compute" else "compute"
                self._theta[other] = self._theta[other] * ratio
                self._P[other] = self._init_P(self._theta[other]) * 25.0
        self._write_back()
        self.num_updates += 1
        return True

    def update_fixed(self, measured_seconds: float) -> float:
        """Track T_fix (drafter forward + tree overhead per step)."""
        v = self.fixed.update(measured_seconds)
        if v is not None and v != self._model.t_fix:
            self._model.t_fix = v
            self._snapshot = None
        return self._model.t_fix
