"""Time the pure-torch tree builder and the batch budget per step, next to the
step time they plan for.

    python scripts/bench_builder.py [--batch-sizes 1 8 64] [--depth 15] [--topk 8]
                                    [--max-nodes 64] [--device cpu|cuda]

For each batch size: random drafter top-k log-probs of the default pair's
shape (softmax of Gumbel logits, sorted), the acceptance calibrator's class
values, the vectorized best-first builder at max_nodes, the exact batch-wide
budget (argmax of S / (T_fix + C(n)) over merged best-first prefixes) and the
truncation to the plan. "step" is the latency model's time for the planned
step (verify forward of the planned trees + T_fix), from the calibrated
profile of the default pair cached by the engine or
`python -m vllm_bastion.calibrate` (else the uncalibrated device prior).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vllm_bastion.core.acceptance import AcceptanceCalibrator  # noqa: E402
from vllm_bastion.core.budget import plan_batch_budget  # noqa: E402
from vllm_bastion.core.cost_model import (  # noqa: E402
    LatencyModel,
    ModelShape,
    load_device_prior,
    profile_from_dict,
)
from vllm_bastion.core.tree import build_best_first_trees  # noqa: E402


def latency_model(device: str) -> tuple[LatencyModel, str]:
    from vllm_bastion.tools.training import default_pair_paths

    target, _ = default_pair_paths()
    with open(os.path.join(target, "config.json")) as f:
        hf = json.load(f)
    shape = ModelShape.from_hf_config(hf, dtype=hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = os.path.join(root, "vllm_bastion", "profiles.json")
    if os.path.isfile(path):
        with open(path) as f:
            profiles = json.load(f).get("profiles", [])
        mine = [p for p in profiles if p["key"].get("model") == shape.fingerprint() and p["key"].get("tp", 1) == 1
                and ("CPU" in str(p["key"].get("device"))) == (device == "cpu")]
        if mine:
            return profile_from_dict(mine[-1]), f"calibrated profile ({mine[-1]['key'].get('device')})"
    prior = load_device_prior("cpu" if device == "cpu" else torch.cuda.get_device_name())
    return LatencyModel.from_prior(shape, prior, t_fix=2e-3), f"uncalibrated prior {prior.name}"


def random_topk(B: int, D: int, K: int, vocab: int, gen: torch.Generator):
    logits = torch.randn(B, D, vocab, generator=gen) * 3.0
    logp = torch.log_softmax(logits, dim=-1)
    return torch.topk(logp, K, dim=-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--depth", type=int, default=15)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--max-nodes", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    lm, source = latency_model(args.device)
    gen = torch.Generator().manual_seed(0)
    cal = AcceptanceCalibrator(args.depth)
    print(f"latency model: {source}")
    print(f"{'batch':>5} {'build ms':>9} {'budget ms':>10} {'total ms':>9} {'nodes/req':>10} "
          f"{'step ms':>8} {'builder share':>14}")
    for B in args.batch_sizes:
        logp, toks = random_topk(B, args.depth, args.topk, 4096, gen)
        logp, toks = logp.to(dev), toks.to(dev)
        contexts = torch.full((B,), args.context)
        tb, tp = [], []
        for r in range(args.repeats + 5):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trees = build_best_first_trees(logp, toks, max_nodes=args.max_nodes,
                                           class_values=cal.class_values(logp))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            plan = plan_batch_budget(trees.scores.cpu(), contexts, lm, t_fix=lm.fixed_time(B),
                                     max_nodes=args.max_nodes, exact=True)
            trees.truncate(plan.num_nodes.to(trees.scores.device))
            t2 = time.perf_counter()
            if r >= 5:
                tb.append(t1 - t0)
                tp.append(t2 - t1)
        build = 1e3 * sorted(tb)[len(tb) // 2]
        budget = 1e3 * sorted(tp)[len(tp) // 2]
        n = plan.num_nodes.cpu()
        step = 1e3 * (lm.fixed_time(B) + lm.step_time((n + 1).tolist(), contexts.tolist()))
        print(f"{B:>5} {build:>9.3f} {budget:>10.3f} {build + budget:>9.3f} {n.float().mean():>10.1f} "
              f"{step:>8.2f} {100 * (build + budget) / step:>13.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
