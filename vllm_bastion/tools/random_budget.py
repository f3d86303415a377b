"""Random tree sizes inside vLLM workers (test utility, via `LLM.collective_rpc`).

`install_random_budget` replaces the auto budget's two timing-driven
decisions with seeded random ones: which requests draft in a step
(`plan_drafting`) and how many nodes each drafting request's tree keeps
(`plan`). Everything else stays real. A test then checks that the tokens a
request gets do not depend on those decisions (what the timings decide in
production). Requires `budget: "auto"` (and a ready latency model, e.g.
`calibrate: false`) and VLLM_ALLOW_INSECURE_SERIALIZATION=1.
"""

from __future__ import annotations

import numpy as np
import torch


def install_random_budget(worker, seed: int, p_draft: float = 0.7, max_nodes: int | None = None) -> bool:
    """Seeded random drafting decisions and tree sizes in [0, max_nodes]
    (default: the engine's max_nodes)."""
    runner = worker.model_runner
    budget = runner._bastion_budget
    if budget is None:
        raise RuntimeError("install_random_budget needs an engine with budget 'auto'")
    rng = np.random.default_rng(seed)
    max_nodes = runner.bastion_config.max_nodes if max_nodes is None else int(max_nodes)

    def plan_drafting(gain, nodes, contexts, eligible, force):
        return np.asarray(eligible, dtype=bool) & (rng.random(len(eligible)) < p_draft)

    def plan(scores, contexts, decoding, room, parents=None):
        n = rng.integers(0, max_nodes + 1, size=len(contexts))
        n = np.where(np.asarray(decoding, dtype=bool), n, 0)
        if n.sum() > max(0, room):  # the token budget, as the real plan respects it
            n = np.floor(n * max(0, room) / n.sum()).astype(np.int64)
        return torch.from_numpy(n.astype(np.int64))

    budget.plan_drafting = plan_drafting
    budget.plan = plan
    return True


def remove_random_budget(worker) -> bool:
    budget = worker.model_runner._bastion_budget
    if budget is not None:
        budget.__dict__.pop("plan_drafting", None)
        budget.__dict__.pop("plan", None)
    return True
