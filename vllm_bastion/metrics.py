"""BASTION's Prometheus metrics, next to vLLM's spec-decode metrics on /metrics.

Tree statistics live in the worker (rank 0); vLLM has no typed channel from
workers to the API server's metric registry. So the worker writes a snapshot
of its statistics, atomically and at most once per second, to a per-engine
file chosen by the front end at start-up, and one collector registered in the
front-end process reads every such file when /metrics is scraped.

Exported (label model_name; counters get vLLM's `_total` suffix):
  vllm:bastion_tree_steps, vllm:bastion_trees, vllm:bastion_tree_nodes,
  vllm:bastion_accepted_tokens, vllm:bastion_chain_accepted_tokens,
  vllm:bastion_accepted_tokens_per_depth{depth},
  vllm:bastion_draft_eligible_requests, vllm:bastion_drafting_requests,
  vllm:bastion_steps_without_drafter                           (counters)
  vllm:bastion_mean_tree_size, vllm:bastion_mean_accepted_length,
  vllm:bastion_planned_nodes_per_step, vllm:bastion_latency_model{coefficient},
  vllm:bastion_latency_refit_rel_error, vllm:bastion_latency_calibration_mape,
  vllm:bastion_drafting_fraction, vllm:bastion_mean_drafter_depth (gauges)
(With several API server processes vLLM switches /metrics to prometheus'
multiprocess mode, which these metrics do not join; the log line and
`collective_rpc("bastion_stats")` still carry them.)
"""

from __future__ import annotations

import atexit
import json
import os
import tempfile
import threading
import time
import uuid

STATS_FILE_ATTR = "bastion_stats_file"
_LOCK = threading.Lock()
_FILES: dict[str, str] = {}  # stats file -> model_name
_REGISTERED = False


def new_stats_file() -> str:
    return os.path.join(tempfile.gettempdir(), f"vllm_bastion_stats_{os.getpid()}_{uuid.uuid4().hex[:8]}.json")


def write_snapshot(path: str, snapshot: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(snapshot, f)
    os.replace(tmp, path)


def read_snapshot(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class SnapshotWriter:
    """Rate-limited writer used by the worker's StatsLogger."""

    def __init__(self, path: str, min_interval_s: float = 1.0):
        self.path = path
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def maybe_write(self, snapshot_fn, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.min_interval_s:
            self._last = now
            try:
                write_snapshot(self.path, snapshot_fn())
            except OSError:
                pass


class _Collector:
    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with _LOCK:
            files = dict(_FILES)
        fams = {
            "steps": CounterMetricFamily("vllm:bastion_tree_steps", "Verify steps with at least one BASTION tree", labels=["model_name"]),
            "trees": CounterMetricFamily("vllm:bastion_trees", "Draft trees verified (request-steps)", labels=["model_name"]),
            "nodes": CounterMetricFamily("vllm:bastion_tree_nodes", "Draft tree nodes verified (roots excluded)", labels=["model_name"]),
            "accepted": CounterMetricFamily("vllm:bastion_accepted_tokens", "Draft tokens accepted by the tree walk", labels=["model_name"]),
            "chain_accepted": CounterMetricFamily("vllm:bastion_chain_accepted_tokens", "Draft tokens a top-1 chain would have accepted", labels=["model_name"]),
            "by_depth": CounterMetricFamily("vllm:bastion_accepted_tokens_per_depth", "Accepted draft tokens by tree depth", labels=["model_name", "depth"]),
            "mean_nodes": GaugeMetricFamily("vllm:bastion_mean_tree_size", "Mean draft tree size (nodes per request-step)", labels=["model_name"]),
            "mean_len": GaugeMetricFamily("vllm:bastion_mean_accepted_length", "Mean tokens emitted per request-step (accepted + bonus)", labels=["model_name"]),
            "planned": GaugeMetricFamily("vllm:bastion_planned_nodes_per_step", "Mean nodes per step chosen by the auto budget", labels=["model_name"]),
            "coef": GaugeMetricFamily("vllm:bastion_latency_model", "Calibrated latency model: max(a_c*T_comp+b_c, a_m*T_mem+b_m) [s], T_fix [s]", labels=["model_name", "coefficient"]),
            "refit": GaugeMetricFamily("vllm:bastion_latency_refit_rel_error", "Online latency model |predicted-measured|/measured (EMA)", labels=["model_name"]),
            "mape": GaugeMetricFamily("vllm:bastion_latency_calibration_mape", "Start-up calibration fit error (MAPE)", labels=["model_name"]),
            "eligible": CounterMetricFamily("vllm:bastion_draft_eligible_requests", "Request-steps that could draft (decoding)", labels=["model_name"]),
            "drafting": CounterMetricFamily("vllm:bastion_drafting_requests", "Request-steps that drafted (speculation on)", labels=["model_name"]),
            "idle": CounterMetricFamily("vllm:bastion_steps_without_drafter", "Steps where no request drafted (drafter not run)", labels=["model_name"]),
            "frac": GaugeMetricFamily("vllm:bastion_drafting_fraction", "Fraction of decoding request-steps with speculation on", labels=["model_name"]),
            "depth": GaugeMetricFamily("vllm:bastion_mean_drafter_depth", "Mean drafter depth (query block - 1) of the steps where the drafter ran", labels=["model_name"]),
        }
        for path, model in files.items():
            s = read_snapshot(path)
            if not s:
                continue
            fams["steps"].add_metric([model], s.get("steps", 0))
            fams["trees"].add_metric([model], s.get("trees", 0))
            fams["nodes"].add_metric([model], s.get("nodes", 0))
            fams["accepted"].add_metric([model], s.get("accepted", 0))
            fams["chain_accepted"].add_metric([model], s.get("chain_accepted", 0))
            for d, a in enumerate(s.get("accepted_by_depth", []), start=1):
                fams["by_depth"].add_metric([model, str(d)], a)
            fams["mean_nodes"].add_metric([model], s.get("mean_nodes", 0.0))
            fams["mean_len"].add_metric([model], s.get("mean_tokens_per_step", 1.0))
            fams["eligible"].add_metric([model], s.get("draft_eligible", 0))
            fams["drafting"].add_metric([model], s.get("drafting", 0))
            fams["idle"].add_metric([model], s.get("steps_without_drafter", 0))
            fams["frac"].add_metric([model], s.get("drafting_fraction", 0.0))
            fams["depth"].add_metric([model], s.get("mean_block_depth", 0.0))
            b = s.get("budget")
            if b:
                fams["planned"].add_metric([model], b.get("mean_planned_nodes", 0.0))
                for k in ("a_c", "b_c", "a_m", "b_m"):
                    if b.get(k) is not None:
                        fams["coef"].add_metric([model, k], b[k])
                if b.get("t_fix_s") is not None:
                    fams["coef"].add_metric([model, "t_fix"], b["t_fix_s"])
                if b.get("refit_rel_error") is not None:
                    fams["refit"].add_metric([model], b["refit_rel_error"])
                if b.get("calibration_mape") is not None:
                    fams["mape"].add_metric([model], b["calibration_mape"])
        yield from fams.values()


def register_stats_file(path: str, model_name: str) -> None:
    """Expose a worker's stats file on this process's /metrics (front end)."""
    global _REGISTERED
    with _LOCK:
        _FILES[path] = model_name
        register = not _REGISTERED
        _REGISTERED = True
    if register:  # outside the lock: register() calls collect(), which takes it
        from prometheus_client import REGISTRY

        REGISTRY.register(_Collector())
    atexit.register(_cleanup, path)


def _cleanup(path: str) -> None:
    with _LOCK:
        _FILES.pop(path, None)
    try:
        os.unlink(path)
    except OSError:
        pass
