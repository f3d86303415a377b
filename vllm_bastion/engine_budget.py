"""BASTION's 'auto' budget inside the engine (vLLM glue around core.budget).

Holds the calibrated latency model and its online refit, the measured
per-step times outside the verify forward (T_fix), and plans every step's
node counts with core.budget's batch-wide best-first rule.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vllm_bastion.core.budget import plan_batch_budget
from vllm_bastion.core.latency import LatencyModel
from vllm_bastion.core.latency_refit import OnlineRefit
from vllm_bastion.core.gating import LinearCost, plan_drafting
from vllm_bastion.core.robust_ema import RobustEma


def ema(prev: float | None, x: float, a: float = 0.1) -> float:
    """Exponential moving average (the first sample starts it)."""
    return x if prev is None else (1 - a) * prev + a * x


_TIMINGS = {
    "t_fix": "seconds per speculating step outside the verify forward",
    "gap_ema": "host time between steps (scheduler, IPC, output processing)",
    "t_base": "seconds per step outside the verify forward and the drafter",
    # ... split by kind of step: steps with speculation work (a walk of
    # verified trees, drafting, back-filled drafter context) also pay for
    # BASTION's work outside the drafter and the verify forward, and for the
    # scheduler's handling of drafts; plain steps pay none of it
    "t_base_plain": "t_base of steps without speculation work",
    "t_base_spec": "t_base of steps with speculation work",
    # the chain-exact CPU path computes branch rows in extra backend passes
    # (tree_attention.chain_exact_rows), one per branch path; outside C
    "wave_s": "seconds of one branch wave (tree attention per wave)",
    "waves_step_s": "seconds of branch waves per step that verified trees",
}


def _timing(name: str) -> property:
    def get(self) -> float | None:
        return self._t[name].value

    def set(self, value: float | None) -> None:
        self._t[name].value = value

    return property(get, set, doc=_TIMINGS[name])


class EngineBudget:
    """The latency model, the step timings and the per-step plan."""

    t_fix, gap_ema, t_base, t_base_plain, t_base_spec, wave_s, waves_step_s = map(_timing, _TIMINGS)

    def __init__(self, config):
        self.config = config
        self.refit: OnlineRefit | None = None
        self.source = ""
        self.fit_error: float | None = None  # calibration MAPE
        self.err_ema: float | None = None  # online |predicted - measured| / measured
        # measured seconds, robust to one-off slow steps (a compilation on a
        # new shape, another process): one outlier cannot switch drafting off
        self._t = {k: RobustEma() for k in _TIMINGS}
        self.last_end: float | None = None
        self.planned_steps = 0
        self.planned_nodes = 0
        self.pred_ema: float | None = None  # predicted verify seconds (last steps)
        self.meas_ema: float | None = None  # measured verify seconds (last steps)
        self.pred_total = self.meas_total = 0.0  # summed over steps (since a reset)
        self.verify_steps = 0
        self.draft_cost: LinearCost | None = None  # drafter + tree work vs drafting requests
        self._draft_s = 0.0  # drafting seconds of the current step
        self._outside: tuple[float, bool] | None = None  # last step's (outside seconds, spec)

    # ------------------------------------------------------------ model

    def set_model(self, model: LatencyModel, source: str, fit_error: float | None) -> None:
        if self.t_fix is None:
            self.t_fix = model.t_fix  # until steps are measured: the drafter forward
        if self.draft_cost is None:  # prior: the probed drafter forward at batch 1
            self.draft_cost = LinearCost(model.t_fix, 0.1 * model.t_fix)
        self.refit = OnlineRefit(model)
        self.source = source
        self.fit_error = fit_error

    @property
    def ready(self) -> bool:
        return self.refit is not None

    # ------------------------------------------------------------ timings

    def observe_verify(self, scheduled: np.ndarray, computed: np.ndarray, seconds: float,
                       start: float) -> None:
        if self.refit is None or not len(scheduled):
            return
        pred = self.refit.model.step_time(scheduled, computed)
        self.err_ema = ema(self.err_ema, abs(pred - seconds) / max(seconds, 1e-9))
        self.pred_ema = ema(self.pred_ema, pred)
        self.meas_ema = ema(self.meas_ema, seconds)
        self.pred_total += pred
        self.meas_total += seconds
        self.verify_steps += 1
        if self.config.online_refit:
            self.refit.update(scheduled, computed, seconds)
        if self.last_end is not None:
            gap = start - self.last_end  # scheduler, IPC, output processing
            if gap < 0.25:  # idle engines are not overhead
                self._t["gap_ema"].update(gap)
                if self._outside is not None:  # the previous step, gap included
                    outside, spec = self._outside
                    self._t["t_base_spec" if spec else "t_base_plain"].update(outside + gap)
        self._outside = None

    def _priced(self, measured: float | None) -> float:
        """A measured branch-wave time as the plan prices it (0 without online
        refit: then the calibrated or given model is the whole verify cost)."""
        return (measured or 0.0) if self.config.online_refit else 0.0

    @property
    def wave_cost(self) -> float:
        """Seconds per branch wave the plan prices."""
        return self._priced(self.wave_s)

    def observe_waves(self, waves: int, seconds: float) -> None:
        """Branch waves of a step that verified trees and their seconds."""
        self._t["waves_step_s"].update(seconds)
        if waves > 0:
            self._t["wave_s"].update(seconds / waves)

    def observe_draft(self, num_drafting: int, seconds: float) -> None:
        """Drafter forward + tree build + budget of one step's drafting requests."""
        self._draft_s = seconds
        if self.draft_cost is not None:
            self.draft_cost.update(num_drafting, seconds)

    def observe_outside(self, seconds: float, end: float, spec: bool = False) -> None:
        """Time of sampling + drafting + tree work of one step (`spec`: the
        step verified trees or drafted)."""
        gap = self.gap_ema or 0.0
        if self._draft_s > 0:  # a speculating step: its fixed time (BASTION's T_fix)
            self._t["t_fix"].update(seconds + gap)
            if self.refit is not None and self.config.online_refit:
                self.refit.update_fixed(self.t_fix)
        outside = max(seconds - self._draft_s, 0.0)
        self._t["t_base"].update(outside + gap)
        self._outside = (outside, spec or self._draft_s > 0)
        self._draft_s = 0.0
        self.last_end = end

    def spec_overhead(self) -> float:
        """Seconds a step with speculation pays outside the drafter and the
        verify forward beyond what a plain step pays (measured; 0 until both
        kinds of step were seen)."""
        if self.t_base_spec is None or self.t_base_plain is None:
            return 0.0
        return max(self.t_base_spec - self.t_base_plain, 0.0)

    def plan_drafting(self, gain, nodes, contexts, eligible, force) -> np.ndarray:
        """[B] bool: which requests draft this step (core.gating)."""
        d = plan_drafting(
            torch.from_numpy(np.asarray(gain, dtype=np.float64)),
            torch.from_numpy(np.asarray(nodes, dtype=np.float64)),
            torch.from_numpy(np.asarray(contexts, dtype=np.float64)),
            torch.from_numpy(np.asarray(eligible)), self.refit.model,
            t_base=self.t_base_plain if self.t_base_plain is not None else (self.t_base or 0.0),
            draft_fixed=self.draft_cost.fixed + self.spec_overhead() + self._priced(self.waves_step_s),
            draft_per_req=self.draft_cost.per_item, force=torch.from_numpy(np.asarray(force)))
        return d.drafts.numpy()

    # ------------------------------------------------------------ plan

    def plan(self, scores: torch.Tensor, contexts: np.ndarray, decoding: np.ndarray,
             room: int, parents: torch.Tensor | None = None) -> torch.Tensor:
        """Per-request node counts [B] for the next step (one budget for the
        batch); `parents` (the trees', best-first order) prices branch waves."""
        cfg = self.config
        caps = torch.from_numpy(np.where(decoding, cfg.max_nodes, 0)).long()
        model = self.refit.model
        m = len(contexts)
        if self.t_base is not None and self.draft_cost is not None:
            # a step where these m requests draft
            base = self.t_base_spec if self.t_base_spec is not None else self.t_base
            t_fix = base + self.draft_cost(m)
        else:
            t_fix = self.t_fix if self.t_fix is not None else model.fixed_time(m)
        decision = plan_batch_budget(
            scores, torch.from_numpy(np.maximum(contexts, 0)), model, t_fix=t_fix,
            min_nodes=torch.where(caps > 0, cfg.min_nodes, 0), max_nodes=caps, exact=True,
            max_total_nodes=max(0, room), parents=parents, wave_cost=self.wave_cost,
        )
        n = decision.num_nodes.cpu()
        self.planned_steps += 1
        self.planned_nodes += int(n.sum())
        return n

    def summary(self) -> dict:
        out = {"source": self.source, "calibration_mape": self.fit_error,
               "refit_rel_error": self.err_ema, "t_fix_s": self.t_fix,
               "mean_planned_nodes": self.planned_nodes / max(self.planned_steps, 1),
               "predicted_verify_s": self.pred_ema, "measured_verify_s": self.meas_ema,
               "mean_predicted_verify_s": self.pred_total / max(self.verify_steps, 1),
               "mean_measured_verify_s": self.meas_total / max(self.verify_steps, 1),
               "t_base_s": self.t_base, "t_base_plain_s": self.t_base_plain,
               "t_base_spec_s": self.t_base_spec, "wave_s": self.wave_s,
               "draft_fixed_s": self.draft_cost.fixed if self.draft_cost else None,
               "draft_per_request_s": self.draft_cost.per_item if self.draft_cost else None}
        if self.refit is not None:
            m = self.refit.model
            out.update(a_c=m.coeffs.a_c, b_c=m.coeffs.b_c, a_m=m.coeffs.a_m, b_m=m.coeffs.b_m,
                       peak_flops=m.peak_flops, bandwidth=m.bandwidth, device=m.device_name)
        return out

    def reset_counters(self) -> None:
        self.planned_steps = self.planned_nodes = 0
        self.pred_total = self.meas_total = 0.0
        self.verify_steps = 0


def now() -> float:
    return time.perf_counter()
