"""Per-step tree statistics, kept in the worker and logged periodically.

vLLM's own spec-decode metrics already see BASTION's steps: drafts = tree
nodes, accepted = path length, and the per-position acceptance counters are
acceptance by tree depth. These add what vLLM cannot know: tree shape, the
chain-of-top-1 baseline, and (with the cost model) budget decisions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

logger = logging.getLogger("vllm.bastion")  # under vLLM's log handler


def _host_ints(x) -> np.ndarray:
    """A flat int64 host array of a CPU tensor, array or sequence."""
    if isinstance(x, torch.Tensor):
        x = x.numpy(force=True)
    return np.asarray(x, dtype=np.int64).reshape(-1)


@dataclass
class BastionStats:
    steps: int = 0  # verify steps with at least one tree
    trees: int = 0  # request-steps that verified a tree
    nodes: int = 0  # draft nodes verified (root excluded)
    accepted: int = 0  # draft nodes accepted
    chain_accepted: int = 0  # what the chain of top-1 drafts would have accepted
    max_depth_sum: int = 0  # deepest node per tree, summed
    accepted_by_depth: list[int] = field(default_factory=list)
    trees_by_depth: list[int] = field(default_factory=list)  # trees reaching depth d
    gated_steps: int = 0  # steps where BASTION decided who drafts
    draft_eligible: int = 0  # request-steps that could draft
    drafting: int = 0  # request-steps that drafted
    steps_without_drafter: int = 0  # steps where nobody drafted (drafter not run)
    drafter_runs: int = 0  # steps where the drafter ran
    block_depth_sum: int = 0  # drafter depths (query block - 1) of those steps, summed

    def observe(self, nodes, accepted, chain, depths) -> None:
        """One verify step: per tree (requests with nodes only) its node count,
        accepted nodes, what a top-1 chain would have accepted and its depth
        (int tensors, arrays or sequences). Vectorized: no loop over trees;
        numpy, since these are a handful of host integers per step."""
        nodes, accepted, chain, depths = (_host_ints(x) for x in (nodes, accepted, chain, depths))
        if not nodes.size:
            return
        self.steps += 1
        self.trees += int(nodes.size)
        self.nodes += int(nodes.sum())
        self.accepted += int(accepted.sum())
        self.chain_accepted += int(chain.sum())
        self.max_depth_sum += int(depths.sum())
        need = int(depths.max())
        # trees accepting at depth j (j < accepted) / reaching depth j (j < depth)
        for arr, x in ((self.accepted_by_depth, accepted), (self.trees_by_depth, depths)):
            arr.extend([0] * (need - len(arr)))
            ge = np.bincount(x, minlength=need + 1)[::-1].cumsum()[::-1][1 : need + 1]
            for j, v in enumerate(ge.tolist()):
                arr[j] += v

    def summary(self) -> dict:
        t = max(self.trees, 1)
        out = asdict(self)
        out.update(
            mean_nodes=self.nodes / t,
            mean_accepted=self.accepted / t,
            mean_chain_accepted=self.chain_accepted / t,
            mean_tokens_per_step=1 + self.accepted / t,
            mean_max_depth=self.max_depth_sum / t,
            drafting_fraction=self.drafting / max(self.draft_eligible, 1),
            mean_block_depth=self.block_depth_sum / max(self.drafter_runs, 1),
        )
        return out


class PhaseTimer:
    """Host wall time per step phase (on CPU that is the phase's cost; on GPU,
    where kernels run asynchronously, it is the host-side overhead)."""

    PHASES = ("build_step", "verify_forward", "tree_attention", "node_processing",
              "target_tokens", "walk", "compaction", "logprobs", "draft", "tree_build", "budget",
              "sample_total", "step_total")

    def __init__(self):
        self.total = {p: 0.0 for p in self.PHASES}
        self.steps = 0
        self.branch_waves = 0  # chain-exact tree attention passes (CPU)
        self.tree_metadata_steps = 0  # verify steps that built tree-attention metadata
        self.vllm_metadata_steps = 0  # verify steps with trees that ran on vLLM's own metadata

    def add(self, phase: str, seconds: float) -> None:
        self.total[phase] = self.total.get(phase, 0.0) + seconds

    def summary(self) -> dict:
        n = max(self.steps, 1)
        return ({f"{k}_ms": round(1e3 * v / n, 3) for k, v in self.total.items()}
                | {"steps": self.steps, "branch_waves": round(self.branch_waves / n, 3),
                   "tree_metadata_steps": self.tree_metadata_steps,
                   "vllm_metadata_steps": self.vllm_metadata_steps})


class StatsLogger:
    def __init__(self, interval_s: float, stats_file: str | None = None):
        self.interval_s = interval_s
        self.total = BastionStats()
        self.window = BastionStats()
        self._last = time.monotonic()
        self.budget = None  # the runner's 'auto' budget state, if any
        self.acceptance = None  # the runner's acceptance calibrator, if any
        self.timer = PhaseTimer()
        self.writer = None
        if stats_file:
            from vllm_bastion.metrics import SnapshotWriter

            self.writer = SnapshotWriter(stats_file)

    def snapshot(self) -> dict:
        out = self.total.summary()
        if self.budget is not None:
            out["budget"] = self.budget.summary()
        if self.acceptance is not None:
            out["acceptance_calibration"] = self.acceptance.summary()
        out["time_per_step"] = self.timer.summary()
        return out

    def observe_drafting(self, eligible: int, drafting: int) -> None:
        """Requests that could draft this step, and those that did."""
        for st in (self.total, self.window):
            st.draft_eligible += eligible
            st.drafting += drafting
            st.gated_steps += 1
            st.steps_without_drafter += int(drafting == 0)
        if self.writer is not None:
            self.writer.maybe_write(self.snapshot)

    def observe_block(self, depth: int) -> None:
        """The drafter ran this step with a query block of depth + 1 positions."""
        for st in (self.total, self.window):
            st.drafter_runs += 1
            st.block_depth_sum += depth

    def observe_step(self, nodes, accepted, chain, depths) -> None:
        """A verify step's per-request tensors [B]; requests without a tree
        (num_nodes 0) are left out."""
        nodes, accepted, chain, depths = (_host_ints(x) for x in (nodes, accepted, chain, depths))
        has = nodes > 0
        if has.any():
            self.observe(nodes[has], accepted[has], chain[has], depths[has])

    def observe(self, nodes, accepted, chain, depths) -> None:
        self.total.observe(nodes, accepted, chain, depths)
        self.window.observe(nodes, accepted, chain, depths)
        if self.writer is not None:
            self.writer.maybe_write(self.snapshot)
        if self.interval_s <= 0:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s and self.window.trees:
            s = self.window.summary()
            logger.info(
                "BASTION: %d tree steps, mean tree %.1f nodes (depth %.1f), mean "
                "accepted %.2f (top-1 chain would accept %.2f), accepted by depth %s",
                s["steps"], s["mean_nodes"], s["mean_max_depth"], s["mean_accepted"],
                s["mean_chain_accepted"],
                [round(a / max(self.window.trees, 1), 3) for a in self.window.accepted_by_depth],
            )
            if self.budget is not None and self.budget.refit is not None:
                b = self.budget.summary()
                logger.info(
                    "BASTION budget: %.1f nodes/request planned, T_fix %.2f ms, latency "
                    "model a_c=%.3g b_c=%.3g ms a_m=%.3g b_m=%.3g ms, refit error %.1f%%",
                    b["mean_planned_nodes"], 1e3 * (b["t_fix_s"] or 0), b["a_c"], 1e3 * b["b_c"],
                    b["a_m"], 1e3 * b["b_m"], 100 * (b["refit_rel_error"] or 0),
                )
            self.window = BastionStats()
            self._last = now


class BastionWorkerExtension:
    """Added to vLLM's workers (worker_extension_cls) when BASTION is on, so
    `LLM.collective_rpc("bastion_stats")` returns each worker's tree stats."""

    def bastion_stats(self) -> dict:
        stats = getattr(getattr(self, "model_runner", None), "bastion_stats", None)
        return stats.snapshot() if stats is not None else {}

    def bastion_calibrate(self, force: bool = False, device_profile: str | None = None) -> dict:
        """Probe and fit the latency model on this worker (the calibrate CLI)."""
        from vllm_bastion import calibration

        model, fit, source, _ = calibration.calibrate(
            self.model_runner, device_profile=device_profile, use_cache=not force)
        out = {"source": source, "model": model.to_dict(), "cache": str(calibration.cache_file())}
        if fit is not None:
            out.update(table=fit.table(), summary=fit.summary())
        return out

    def bastion_reset_stats(self) -> bool:
        stats = getattr(getattr(self, "model_runner", None), "bastion_stats", None)
        if stats is None:
            return False
        stats.total = BastionStats()
        stats.timer = PhaseTimer()
        if stats.budget is not None:
            stats.budget.reset_counters()
        return True
