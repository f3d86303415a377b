"""The replay lab: record once, then evaluate tree policies offline.

    python scripts/replay_lab.py continuations --set demo      # vLLM greedy outputs (no speculation)
    python scripts/replay_lab.py record --set demo             # drafter top-k at every position
    python scripts/replay_lab.py engine --set demo [--position-fix]   # real vLLM runs (chain, BASTION fixed)
    python scripts/replay_lab.py fidelity --set demo           # lab vs engine table
    python scripts/replay_lab.py curves                        # accepted length vs node budget
    python scripts/replay_lab.py sampled_record --set stdlib --n 16 [--top-p 0.9]   # T = 1 / top-p record
    python scripts/replay_lab.py sampled                       # expected accepted length curves
    python scripts/replay_lab.py timing                        # policy build / observe ms

Records are cached under --cache (default ~/.cache/vllm_bastion/replay);
tables, JSON and plots go to results/replay_*.

Sets: demo (the main job's 8 held-out prompts), stdlib (held-out prompts
2..33), dev (34..63, for tuning), humaneval (164 problems), tables (held-out
code-page tables, where the chain runs deep). The drafter is recorded as
vLLM 0.32 computes it (--context-k-norm first_layer, see
tools/replay_record.py); `engine --position-fix` patches, in the worker only,
the runner bug that gives the drafter wrong context after a tree verify.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
DEPTH = 15
MAX_TOKENS = 128


def cache_dir(args) -> str:
    d = os.path.expanduser(args.cache)
    os.makedirs(d, exist_ok=True)
    return d


def pair():
    from vllm_bastion.tools.training import default_pair_paths

    return default_pair_paths()


def load_json(path):
    with open(path) as f:
        return json.load(f)


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------- recording


def cmd_continuations(args) -> None:
    from vllm_bastion.tools.replay_record import prompt_set, vllm_greedy

    target, _ = pair()
    prompts, labels = prompt_set(args.set, target, args.n)
    t0 = time.time()
    cont = vllm_greedy(target, prompts, args.max_tokens + DEPTH + 1)
    path = os.path.join(cache_dir(args), f"{args.set}_continuations.json")
    dump_json({"prompts": prompts, "labels": labels, "continuations": cont}, path)
    print(f"{len(prompts)} continuations in {time.time() - t0:.0f}s -> {path}")


def record_path(args, name=None, features=None, ddt=None, knorm=None) -> str:
    f = features or args.features
    d = ddt or args.drafter_dtype
    k = knorm or args.context_k_norm
    return os.path.join(cache_dir(args), f"{name or args.set}_greedy_{f}_{d}_{k}.pt")


def cmd_record(args) -> None:
    from vllm_bastion.tools.replay_record import record_greedy

    target, drafter = pair()
    c = load_json(os.path.join(cache_dir(args), f"{args.set}_continuations.json"))
    t0 = time.time()
    rec = record_greedy(target, drafter, c["prompts"], c["continuations"], max_tokens=args.max_tokens,
                        features=args.features, drafter_dtype=args.drafter_dtype,
                        context_k_norm=args.context_k_norm, labels=c["labels"])
    rec.meta["set"] = args.set
    rec.save(record_path(args))
    print(f"recorded {rec.num_prompts} prompts in {time.time() - t0:.0f}s -> {record_path(args)}")


def sampled_path(args, name=None, temperature=None, top_p=None) -> str:
    t = args.temperature if temperature is None else temperature
    p = args.top_p if top_p is None else top_p
    return os.path.join(cache_dir(args), f"{name or args.set}_sampled_T{t:g}_p{p:g}.pt")


def cmd_sampled_record(args) -> None:
    """Record a sampled trajectory per prompt with union-tree edge probabilities."""
    from vllm_bastion.tools.replay_record import prompt_set, record_sampled

    target, drafter = pair()
    prompts, labels = prompt_set(args.set, target, args.n)
    t0 = time.time()
    rec = record_sampled(target, drafter, prompts, max_tokens=args.max_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, features=args.features,
                         drafter_dtype=args.drafter_dtype, context_k_norm=args.context_k_norm, labels=labels)
    rec.meta["set"] = args.set
    rec.save(sampled_path(args))
    print(f"sampled record of {rec.num_prompts} prompts in {time.time() - t0:.0f}s -> {sampled_path(args)}")


def engine_configs() -> dict[str, tuple[str, dict | None]]:
    return {
        "chain": ("dflash", None),
        "bastion_fixed15_cal": ("bastion", {"budget": "fixed", "max_nodes": 15, "topk": 8,
                                            "acceptance_calibration": True}),
        "bastion_fixed15_raw": ("bastion", {"budget": "fixed", "max_nodes": 15, "topk": 8,
                                            "acceptance_calibration": False}),
        "bastion_fixed64_raw": ("bastion", {"budget": "fixed", "max_nodes": 64, "topk": 8,
                                            "acceptance_calibration": False}),
    } | {
        f"new_fixed{n}": ("bastion", {"budget": "fixed", "max_nodes": n, "topk": 8, "acceptance_calibration": False,
                                      "_policy": {}}) for n in (15, 32, 64)
    }


def cmd_engine(args) -> None:
    from vllm_bastion.tools.replay_record import engine_run, prompt_set

    target, drafter = pair()
    prompts, _ = prompt_set(args.set, target, args.n)
    path = os.path.join(cache_dir(args), f"{args.set}_engine{'_fix' if args.position_fix else ''}.json")
    res = load_json(path) if os.path.isfile(path) else {}
    for name, (method, extra) in engine_configs().items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        policy = None
        if extra is not None:
            extra = dict(extra, model=drafter, stats_log_interval_s=0)
            policy = extra.pop("_policy", None)
            if policy is not None and not args.position_fix:
                continue  # the new policy is measured on the fixed engine only
        r = engine_run(method, target, drafter, prompts, max_tokens=args.max_tokens, depth=DEPTH, bastion=extra,
                       position_fix=args.position_fix and method == "bastion", policy=policy)
        r["seconds"] = time.time() - t0
        res[name] = r
        print(f"{name}: mean accepted length {r['mean_accepted_length']:.4f} "
              f"({r['drafts']} steps, {time.time() - t0:.0f}s)", flush=True)
        dump_json(res, path)


# ----------------------------------------------------------------------------- evaluation

NODES = (15, 24, 32, 48, 64, 128)
SETS = ("stdlib", "humaneval", "tables")
LABELS = {
    "chain": "chain (top-1, depth 15)",
    "published": "BASTION published (raw path confidence)",
    "calibrated": "BASTION current (online calibrator)",
    "new": "new policy (CalibratedPolicy)",
    "hindsight": "hindsight static shape",
}


def policies():
    """name -> (factory, stateless?)"""
    from vllm_bastion.core.acceptance import AcceptanceCalibrator
    from vllm_bastion.core.policy import BestFirstPolicy, CalibratedPolicy, ChainPolicy

    return {
        "chain": (lambda: ChainPolicy(DEPTH), True),
        "published": (lambda: BestFirstPolicy(), True),
        "calibrated": (lambda: BestFirstPolicy(AcceptanceCalibrator(DEPTH)), False),
        "new": (lambda: CalibratedPolicy(DEPTH), False),
    }


def run_policy(rec, name, N, *, budget=None):
    """Online learners run at concurrency 1 (the engine at batch 1, requests in
    order, one learner across them); stateless policies vectorized over all
    prompts (identical trajectories)."""
    from vllm_bastion.core.replay import simulate

    make, stateless = policies()[name]
    n = min(N, DEPTH) if name == "chain" else N
    return simulate(rec, make(), n, concurrency=None if stateless and budget is None else 1, budget=budget)


def hindsight(rec, N, rounds: int = 4):
    """Best static shape fitted on the same data: fit on every root, then
    refit on the roots the previous shape visited; the best trajectory wins."""
    from vllm_bastion.core.replay import StaticShapePolicy, fit_static_shape, simulate, true_rank_paths

    paths = true_rank_paths(rec)
    shape = fit_static_shape(paths.reshape(-1, paths.shape[-1]), N, rec.topk)
    best = None
    for _ in range(rounds):
        r = simulate(rec, StaticShapePolicy(shape), N)
        if best is None or r.mean_accepted_length > best[0].mean_accepted_length:
            best = (r, shape)
        shape = fit_static_shape(paths[r.prompt, r.root], N, rec.topk)
    return best


def cost_curves():
    from vllm_bastion.core.replay import convex_cost

    return {"flat16": lambda n: convex_cost(n, 16.0, 0.3), "flat8": lambda n: convex_cost(n, 8.0, 0.3)}


def cmd_curves(args) -> None:
    import torch

    from vllm_bastion.core.replay import ReplayRecord, auto_budget

    torch.set_num_threads(1)
    sets = args.sets or list(SETS)
    out = {"nodes": list(NODES), "sets": {}, "records": {}}
    for name in sets:
        rec = ReplayRecord.load(record_path(args, name))
        t0 = time.time()
        res = {"accepted_length": {}, "tokens_per_cost": {}, "steps_per_s": {}}
        for pol in list(policies()) + ["hindsight"]:
            row = []
            for N in NODES:
                if pol == "hindsight":
                    r, shape = hindsight(rec, N)
                else:
                    r = run_policy(rec, pol, N)
                row.append(round(r.mean_accepted_length, 4))
                res["steps_per_s"].setdefault(pol, []).append(round(r.steps / max(r.seconds, 1e-9), 1))
            res["accepted_length"][pol] = row
            print(f"{name:10s} {pol:11s}", " ".join(f"{x:.3f}" for x in row), flush=True)
        chain = res["accepted_length"]["chain"][0]
        res["ratio_to_chain"] = {p: [round(x / chain, 4) for x in v] for p, v in res["accepted_length"].items()}
        for cname, cost in cost_curves().items():
            c16 = float(cost(torch.tensor(float(DEPTH + 1))))
            ch = run_policy(rec, "chain", DEPTH)
            base = float((ch.accepted + 1).sum()) / (c16 * ch.steps)
            row = {"chain": {"tokens_per_cost": round(base, 4), "accepted_length": round(ch.mean_accepted_length, 4),
                             "mean_nodes": DEPTH}}
            for pol in ("published", "calibrated", "new"):
                r = run_policy(rec, pol, 128, budget=auto_budget(cost))
                row[pol] = {"tokens_per_cost": round(r.tokens_per_cost(), 4),
                            "ratio_to_chain": round(r.tokens_per_cost() / base, 4),
                            "accepted_length": round(r.mean_accepted_length, 4),
                            "mean_nodes": round(r.mean_nodes, 2)}
            res["tokens_per_cost"][cname] = row
            print(f"{name:10s} auto budget ({cname}):",
                  " ".join(f"{p} {v.get('ratio_to_chain', 1.0):.3f}x" for p, v in row.items()), flush=True)
        res["prompts"] = rec.num_prompts
        res["seconds"] = round(time.time() - t0, 1)
        out["sets"][name] = res
    if args.sampled:
        out["sampled"] = sampled_curves(args)
    tag = args.tag or "curves"
    dump_json(out, os.path.join(RESULTS, f"replay_{tag}.json"))
    with open(os.path.join(RESULTS, f"replay_{tag}.md"), "w") as f:
        f.write(curves_markdown(out))
    plot_curves(out, os.path.join(RESULTS, f"replay_{tag}.png"))
    print(f"wrote results/replay_{tag}.{{json,md,png}}")


def cmd_sampled(args) -> None:
    """Curves on the sampled records in the cache (expected accepted length)."""
    import torch

    torch.set_num_threads(1)
    out = {"nodes": list(NODES), "sets": {}, "sampled": sampled_curves(args)}
    dump_json(out, os.path.join(RESULTS, "replay_sampled.json"))
    with open(os.path.join(RESULTS, "replay_sampled.md"), "w") as f:
        f.write(curves_markdown(out))
    print("wrote results/replay_sampled.{json,md}")


def sampled_curves(args) -> dict:
    import torch

    from vllm_bastion.core.replay import ReplayRecord

    res = {}
    for path in sorted(os.listdir(cache_dir(args))):
        if "_sampled_" not in path:
            continue
        rec = ReplayRecord.load(os.path.join(cache_dir(args), path))
        key = path[: -len(".pt")]
        row = {"temperature": rec.meta.get("temperature"), "top_p": rec.meta.get("top_p"),
               "prompts": rec.num_prompts, "expected": {}, "realized": {}, "union_miss": {}}
        for pol in policies():
            e, z, m = [], [], []
            for N in NODES:
                r = run_policy(rec, pol, N)
                e.append(round(r.mean_expected_length, 4))
                z.append(round(r.mean_accepted_length, 4))
                m.append(round(float(r.union_miss.float().mean()), 3))
            row["expected"][pol], row["realized"][pol], row["union_miss"][pol] = e, z, m
            print(f"{key:28s} {pol:11s} E[len]", " ".join(f"{x:.3f}" for x in e),
                  "| realized", " ".join(f"{x:.3f}" for x in z), "| miss", m, flush=True)
        res[key] = row
    return res


def curves_markdown(out) -> str:
    lines = []
    for name, res in out["sets"].items():
        lines.append(f"### {name} ({res['prompts']} prompts, 128 greedy tokens, batch 1)\n")
        lines.append("| policy | " + " | ".join(f"N={n}" for n in out["nodes"]) + " |")
        lines.append("|---|" + "---|" * len(out["nodes"]))
        for pol, row in res["accepted_length"].items():
            ratio = res["ratio_to_chain"][pol]
            lines.append(f"| {LABELS[pol]} | " + " | ".join(f"{a:.2f} ({r:.2f}x)" for a, r in zip(row, ratio)) + " |")
        lines.append("")
        lines.append("Auto budget (batch 1, convex cost C(n) = 0.3 + max(1, n / flat), n = 1 + nodes): "
                     "emitted tokens per unit of predicted cost, relative to the 15-node chain")
        lines.append("")
        lines.append("| cost | " + " | ".join(LABELS[p] for p in ("published", "calibrated", "new")) + " |")
        lines.append("|---|---|---|---|")
        for cname, row in res["tokens_per_cost"].items():
            lines.append(f"| {cname} | " + " | ".join(
                f"{row[p]['ratio_to_chain']:.3f}x ({row[p]['mean_nodes']:.1f} nodes, len {row[p]['accepted_length']:.2f})"
                for p in ("published", "calibrated", "new")) + " |")
        lines.append("")
    for key, row in (out.get("sampled") or {}).items():
        lines.append(f"### sampled: {key} (T={row['temperature']}, top-p={row['top_p']}, {row['prompts']} prompts)\n")
        lines.append("Expected accepted length E[1 + accepted] of the lossless walk (exact inside the union tree; "
                     "mean union misses per step in brackets)\n")
        lines.append("| policy | " + " | ".join(f"N={n}" for n in out["nodes"]) + " |")
        lines.append("|---|" + "---|" * len(out["nodes"]))
        for pol, e in row["expected"].items():
            lines.append(f"| {LABELS[pol]} | " + " | ".join(
                f"{x:.3f} [{m:g}]" for x, m in zip(e, row["union_miss"][pol])) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_curves(out, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(out["sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        res = out["sets"][name]
        for pol, row in res["accepted_length"].items():
            ax.plot(out["nodes"], row, marker="o", label=LABELS[pol],
                    linestyle="--" if pol in ("chain", "hindsight") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(out["nodes"], [str(n) for n in out["nodes"]])
        ax.set_xlabel("node budget N")
        ax.set_ylabel("mean accepted length (tokens / step)")
        ax.set_title(f"{name} ({res['prompts']} prompts, greedy)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_timing(args) -> None:
    """Per-step cost of the policies' build (and observe) at batch 1/16/64,
    N = 64, top-8, depth 15, side by side in one run (this CPU, 1 thread)."""
    import torch

    from vllm_bastion.core.replay import ReplayRecord, targets_from_record
    from vllm_bastion.core.walk import accept_walk

    torch.set_num_threads(1)
    rec = ReplayRecord.load(record_path(args, "stdlib"))
    P, R = rec.num_prompts, rec.topk_tokens.shape[1]
    g = torch.Generator().manual_seed(0)
    out = {}
    lines = ["| batch | policy | build ms | observe ms |", "|---|---|---|---|"]
    for B in (1, 16, 64):
        p = torch.randint(0, P, (B,), generator=g)
        r = torch.randint(0, R - 20, (B,), generator=g)
        lp, tk = rec.topk_logprobs[p, r], rec.topk_tokens[p, r]
        for name in ("published", "calibrated", "new"):
            pol = policies()[name][0]()
            st = pol.new_state(B)
            if st is not None:
                st["prev_accepted"] = torch.randint(-1, 10, (B,), generator=g)
            for _ in range(3):  # warm-up
                trees = pol.build(lp, tk, 64, st)
            reps = 30
            t0 = time.perf_counter()
            for _ in range(reps):
                trees = pol.build(lp, tk, 64, st)
            tb = (time.perf_counter() - t0) / reps * 1e3
            res = accept_walk(trees, targets_from_record(rec.tokens[p], r, trees.depths))
            t0 = time.perf_counter()
            for _ in range(reps):
                pol.observe(trees, res, st)
            to = (time.perf_counter() - t0) / reps * 1e3
            out[f"{name}_B{B}"] = {"build_ms": round(tb, 3), "observe_ms": round(to, 3)}
            lines.append(f"| {B} | {LABELS[name]} | {tb:.2f} | {to:.2f} |")
    print("\n".join(lines))
    dump_json(out, os.path.join(RESULTS, "replay_timing.json"))
    with open(os.path.join(RESULTS, "replay_timing.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def cmd_fidelity(args) -> None:
    """Lab vs engine on the demo prompts (engine runs from `engine`, with and
    without --position-fix)."""
    from vllm_bastion.core.acceptance import AcceptanceCalibrator
    from vllm_bastion.core.policy import BestFirstPolicy, CalibratedPolicy, ChainPolicy
    from vllm_bastion.core.replay import ReplayRecord, simulate

    rows = []
    for fix in (False, True):
        path = os.path.join(cache_dir(args), f"{args.set}_engine{'_fix' if fix else ''}.json")
        if os.path.isfile(path):
            for name, r in load_json(path).items():
                rows.append((name, fix and r.get("position_fix", fix), r["mean_accepted_length"], r["drafts"]))
    lab_pols = {"chain": lambda: (ChainPolicy(DEPTH), 15),
                "bastion_fixed15_raw": lambda: (BestFirstPolicy(), 15),
                "bastion_fixed15_cal": lambda: (BestFirstPolicy(AcceptanceCalibrator(DEPTH)), 15),
                "bastion_fixed64_raw": lambda: (BestFirstPolicy(), 64)}
    for n in (15, 32, 64):
        lab_pols[f"new_fixed{n}"] = lambda n=n: (CalibratedPolicy(DEPTH), n)
    out = {"records": {}}
    lines = ["| config | runner fix | engine accepted length (steps) | lab accepted length (steps) | error |",
             "|---|---|---|---|---|"]
    for feats, ddt, kn in [("fp32", "fp32", "first_layer"), ("bf16", "bf16", "first_layer")]:
        p = record_path(args, args.set, feats, ddt, kn)
        if not os.path.isfile(p):
            continue
        rec = ReplayRecord.load(p)
        for name, fix, acc, steps in rows:
            if name not in lab_pols:
                continue
            pol, N = lab_pols[name]()
            r = simulate(rec, pol, N, concurrency=1)
            err = 100 * (r.mean_accepted_length / acc - 1)
            out["records"].setdefault(f"{feats}/{ddt}", []).append(
                {"config": name, "position_fix": bool(fix), "engine": acc, "engine_steps": steps,
                 "lab": r.mean_accepted_length, "lab_steps": r.steps, "error_pct": err})
            fx = "yes" if fix else ("no" if name.startswith(("bastion", "new")) else "n/a")
            lines.append(f"| {name} (record {feats}/{ddt}) | {fx} | {acc:.4f} ({steps}) | "
                         f"{r.mean_accepted_length:.4f} ({r.steps}) | {err:+.2f}% |")
    print("\n".join(lines))
    dump_json(out, os.path.join(RESULTS, "replay_fidelity.json"))
    with open(os.path.join(RESULTS, "replay_fidelity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd")
    ap.add_argument("--set", default="demo")
    ap.add_argument("--n", type=int, default=None, help="prompts of the set (default: all)")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--features", default="fp32", choices=["bf16", "fp32", "autocast"])
    ap.add_argument("--drafter-dtype", default="fp32", choices=["bf16", "fp32"])
    ap.add_argument("--context-k-norm", default="first_layer", choices=["first_layer", "per_layer"],
                    help="first_layer: as vLLM 0.32's DFlash computes it; per_layer: the drafter as trained")
    ap.add_argument("--cache", default="~/.cache/vllm_bastion/replay")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", nargs="*", help="curves: prompt sets (default stdlib humaneval tables)")
    ap.add_argument("--sampled", action="store_true", help="curves: also the sampled records in the cache")
    ap.add_argument("--tag", default=None, help="curves: output name results/replay_<tag>.*")
    ap.add_argument("--position-fix", action="store_true",
                    help="engine: patch the runner's drafter-context bug in the worker (measurement)")
    args = ap.parse_args(argv)
    fn = globals().get(f"cmd_{args.cmd}")
    if fn is None:
        ap.error(f"unknown command {args.cmd}")
    fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
