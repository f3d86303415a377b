"""The replay lab: record once, then evaluate tree policies offline.

    python scripts/replay_lab.py continuations --set demo      # vLLM greedy outputs (no speculation)
    python scripts/replay_lab.py record --set demo             # drafter top-k at every position
    python scripts/replay_lab.py engine --set demo             # real vLLM runs (chain, BASTION fixed, new policy)
    python scripts/replay_lab.py fidelity --set demo           # lab vs engine table
    python scripts/replay_lab.py diagnose --set demo           # where lab and engine differ
    python scripts/replay_lab.py curves                        # accepted length vs node budget
    python scripts/replay_lab.py sampled_record --set stdlib --n 16 [--top-p 0.9]   # T = 1 / top-p record
    python scripts/replay_lab.py sampled [--sets stdlib]       # expected accepted length curves (T = 1 records)
    python scripts/replay_lab.py engine --set stdlib --n 16 --engine-temperature 1   # sampled engine runs
    python scripts/replay_lab.py sampled_fidelity --set stdlib --engine-temperature 1  # vs the T = 1 record
    python scripts/replay_lab.py timing                        # policy build / observe ms

Records and engine results are cached under --cache (default
~/.cache/vllm_bastion/replay); tables and JSON go to docs/replay/ (--out),
the greedy curves' plot to docs/replay_curves.png. docs/replay.md collects
the tables and the commands that made them.

Sets: demo (the main job's 8 held-out prompts), stdlib (held-out prompts
2..33), dev (34..63, for tuning), humaneval (164 problems), tables (held-out
code-page tables, where the chain runs deep). The drafter is recorded as
vLLM 0.32 computes it (--context-k-norm first_layer, see
tools/replay_record.py). Engine results are stored as <set>_engine_v2.json:
runs of the runner that feeds the drafter only the accepted rows (older
<set>_engine*.json files came from a runner whose rejected tree rows
overwrote the drafter's context K/V, and are not read).
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
DOCS = os.path.join(ROOT, "docs")
ENGINE_FILE = "{set}_engine_v2.json"
DEPTH = 15
MAX_TOKENS = 128


def cache_dir(args) -> str:
    d = os.path.expanduser(args.cache)
    os.makedirs(d, exist_ok=True)
    return d


def out_dir(args) -> str:
    os.makedirs(args.out, exist_ok=True)
    return args.out


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


def engine_path(args) -> str:
    name = ENGINE_FILE.format(set=args.set)
    if args.engine_temperature > 0:
        name = name.replace(".json", f"_T{args.engine_temperature:g}_p{args.top_p:g}.json")
    return os.path.join(cache_dir(args), name)


def cmd_engine(args) -> None:
    """Real vLLM runs of `engine_configs()` on the --set prompts, batch 1
    (greedy, or sampled with --engine-temperature / --top-p)."""
    from vllm_bastion.tools.replay_record import engine_run, prompt_set

    target, drafter = pair()
    prompts, _ = prompt_set(args.set, target, args.n)
    path = engine_path(args)
    res = load_json(path) if os.path.isfile(path) else {}
    for name, (method, extra) in engine_configs().items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        policy = None
        if extra is not None:
            extra = dict(extra, model=drafter, stats_log_interval_s=0)
            policy = extra.pop("_policy", None)
        r = engine_run(method, target, drafter, prompts, max_tokens=args.max_tokens, depth=DEPTH, bastion=extra,
                       policy=policy, temperature=args.engine_temperature, top_p=args.top_p, seed=args.seed)
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
    dump_json(out, os.path.join(out_dir(args), f"{tag}.json"))
    with open(os.path.join(out_dir(args), f"{tag}.md"), "w") as f:
        f.write(curves_markdown(out))
    plot_curves(out, os.path.join(DOCS, f"replay_{tag}.png"))
    print(f"wrote {out_dir(args)}/{tag}.{{json,md}}, docs/replay_{tag}.png")


def cmd_sampled(args) -> None:
    """Curves on the sampled records in the cache (expected accepted length)."""
    import torch

    torch.set_num_threads(1)
    out = {"nodes": list(NODES), "sets": {}, "sampled": sampled_curves(args)}
    dump_json(out, os.path.join(out_dir(args), "sampled.json"))
    with open(os.path.join(out_dir(args), "sampled.md"), "w") as f:
        f.write(curves_markdown(out))
    print(f"wrote {out_dir(args)}/sampled.{{json,md}}")


def sampled_curves(args) -> dict:
    import torch

    from vllm_bastion.core.replay import ReplayRecord

    res = {}
    for path in sorted(os.listdir(cache_dir(args))):
        if "_sampled_" not in path or not path.endswith(".pt"):
            continue
        if args.sets and path.split("_sampled_")[0] not in args.sets:
            continue
        if args.top_p_only is not None and f"_p{args.top_p_only:g}.pt" not in path:
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
    dump_json(out, os.path.join(out_dir(args), "timing.json"))
    with open(os.path.join(out_dir(args), "timing.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def cmd_fidelity(args) -> None:
    """Lab vs engine on the `--set` prompts (engine runs from `engine`)."""
    from vllm_bastion.core.acceptance import AcceptanceCalibrator
    from vllm_bastion.core.policy import BestFirstPolicy, CalibratedPolicy, ChainPolicy
    from vllm_bastion.core.replay import ReplayRecord, simulate

    engine = load_json(os.path.join(cache_dir(args), ENGINE_FILE.format(set=args.set)))
    lab_pols = {"chain": lambda: (ChainPolicy(DEPTH), 15),
                "bastion_fixed15_raw": lambda: (BestFirstPolicy(), 15),
                "bastion_fixed15_cal": lambda: (BestFirstPolicy(AcceptanceCalibrator(DEPTH)), 15),
                "bastion_fixed64_raw": lambda: (BestFirstPolicy(), 64)}
    for n in (15, 32, 64):
        lab_pols[f"new_fixed{n}"] = lambda n=n: (CalibratedPolicy(DEPTH), n)
    out = {"set": args.set, "records": {}}
    lines = ["| config | record | engine accepted length (steps) | lab accepted length (steps) | error |",
             "|---|---|---|---|---|"]
    for feats, ddt, kn in [("fp32", "fp32", "first_layer"), ("bf16", "bf16", "first_layer")]:
        p = record_path(args, args.set, feats, ddt, kn)
        if not os.path.isfile(p):
            continue
        rec = ReplayRecord.load(p)
        for name, make in lab_pols.items():
            if name not in engine:
                continue
            acc, steps = engine[name]["mean_accepted_length"], engine[name]["drafts"]
            pol, N = make()
            r = simulate(rec, pol, N, concurrency=1)
            err = 100 * (r.mean_accepted_length / acc - 1)
            out["records"].setdefault(f"{feats}/{ddt}", []).append(
                {"config": name, "engine": acc, "engine_steps": steps,
                 "lab": r.mean_accepted_length, "lab_steps": r.steps, "error_pct": err})
            lines.append(f"| {name} | {feats}/{ddt} | {acc:.4f} ({steps}) | "
                         f"{r.mean_accepted_length:.4f} ({r.steps}) | {err:+.2f}% |")
    print("\n".join(lines))
    dump_json(out, os.path.join(out_dir(args), "fidelity.json"))
    with open(os.path.join(out_dir(args), "fidelity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def cmd_sampled_fidelity(args) -> None:
    """Sampled engine runs (`engine --engine-temperature T --top-p P`) vs the
    lab's expected accepted length on the sampled record of the same set and
    T/top-p (different trajectories: only means compare), with, per config,
    the target's probability (transformers, float32) of the depth-1 top-1
    draft at every captured step along the engine's own outputs."""
    import torch

    from vllm_bastion.core.replay import ReplayRecord
    from vllm_bastion.tools.training import _load_target

    torch.set_num_threads(1)
    eng = load_json(engine_path(args))
    T = args.engine_temperature
    rec = ReplayRecord.load(sampled_path(args, temperature=T, top_p=args.top_p))
    target, _ = pair()
    m = _load_target(target).float().eval()
    lab_name = {"chain": "chain", "bastion_fixed15_raw": "published", "bastion_fixed15_cal": "calibrated",
                "new_fixed15": "new"}
    lines = [f"| config | engine accepted length (steps) | lab E[accepted length], N = 15 | "
             f"engine depth-1 acceptance | target p of the depth-1 top-1 draft on the engine's outputs |",
             "|---|---|---|---|---|"]
    out = {}
    for name, r in eng.items():
        probs, idx = {}, {}
        ps = []
        for st in r["steps"]:
            key = tuple(st["prompt"])
            j = idx.setdefault(key, len(idx))  # requests run one at a time, in prompt order
            if j not in probs:
                with torch.no_grad():
                    lg = m(input_ids=torch.tensor([list(key) + r["outputs"][j]])).logits[0].float()
                probs[j] = processed(lg, T, args.top_p)
            if st["root"] >= len(r["outputs"][j]) - 1:
                continue
            d1 = st["drafts"][0] if "drafts" in st else st["tokens"][0][0] if "tokens" in st else None
            if d1 is not None:
                ps.append(float(probs[j][len(key) + st["root"], d1]))
        lab = run_policy(rec, lab_name[name], 15).mean_expected_length if name in lab_name else float("nan")
        p1 = sum(ps) / max(1, len(ps))
        out[name] = {"engine": r["mean_accepted_length"], "engine_steps": r["drafts"], "lab_expected": lab,
                     "engine_depth1_acceptance": r["acceptance_by_depth"][0], "target_p_depth1_top1": p1}
        lines.append(f"| {name} | {r['mean_accepted_length']:.4f} ({r['drafts']}) | {lab:.3f} | "
                     f"{r['acceptance_by_depth'][0]:.4f} | {p1:.3f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    tag = f"sampled_fidelity_{args.set}_T{T:g}_p{args.top_p:g}"
    dump_json(out, os.path.join(out_dir(args), f"{tag}.json"))
    with open(os.path.join(out_dir(args), f"{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def processed(logits, temperature, top_p):
    from vllm_bastion.tools.replay_record import processed_probs

    return processed_probs(logits, temperature, top_p)


def _engine_steps(eng: dict, name: str, keys: list) -> list:
    """The captured BASTION steps of one engine config that were walked (every
    propose of a request but its last), as (prompt index, root, logp, tokens,
    accepted drafts)."""
    steps = [s for s in eng[name]["steps"] if "logp" in s]
    out = []
    for i, s in enumerate(steps[:-1]):
        nxt = steps[i + 1]
        if tuple(nxt["prompt"]) == tuple(s["prompt"]):
            out.append((keys.index(tuple(s["prompt"])), s["root"], s["logp"], s["tokens"], nxt["root"] - s["root"] - 1))
    return out


def cmd_diagnose(args) -> None:
    """Where lab and engine differ (greedy fidelity runs, --set): per
    BASTION config, (1) the lab's policy fed the engine's *own* captured
    drafter top-k along the engine's trajectory (steps whose accepted count
    differs from the engine's: 0 = the policy and walk are replayed exactly);
    (2) at the same steps and policy state, the tree from the record's top-k
    instead (per-step effect of the drafter numerics); (3) how often the
    top-1 differs and the record's top-1/top-2 gap there; (4) the lab's
    spread under N(0, --noise) log-prob noise (8 seeds)."""
    import statistics

    import torch

    from vllm_bastion.core.acceptance import AcceptanceCalibrator
    from vllm_bastion.core.policy import BestFirstPolicy, CalibratedPolicy
    from vllm_bastion.core.replay import ReplayRecord, simulate, targets_from_record
    from vllm_bastion.core.walk import accept_walk

    torch.set_num_threads(1)
    eng = load_json(os.path.join(cache_dir(args), ENGINE_FILE.format(set=args.set)))
    keys = [tuple(p) for p in load_json(os.path.join(cache_dir(args), f"{args.set}_continuations.json"))["prompts"]]
    rec = ReplayRecord.load(record_path(args, args.set))
    pols = {"bastion_fixed15_raw": (lambda: BestFirstPolicy(), 15),
            "bastion_fixed15_cal": (lambda: BestFirstPolicy(AcceptanceCalibrator(DEPTH)), 15),
            "bastion_fixed64_raw": (lambda: BestFirstPolicy(), 64)}
    pols |= {f"new_fixed{n}": (lambda: CalibratedPolicy(DEPTH), n) for n in (15, 32, 64)}
    out = {"record": os.path.basename(record_path(args, args.set)), "configs": {}}
    lines = ["| config | steps | engine accepted length | lab on engine top-k: differing steps (accepted length) | "
             "record top-k at engine steps: per-step effect | top-1 differs (first at depth >= 4) | "
             "record top-1/top-2 gap there (median) | lab under noise: mean (sd, range) |",
             "|---|---|---|---|---|---|---|---|"]
    R = rec.topk_tokens.shape[1]
    for name, (make, N) in pols.items():
        if name not in eng:
            continue
        pol = make()
        state, prev = None, None
        eng_acc, lab_acc, rec_acc, gaps, first = [], [], [], [], []
        for p, root, lp, tk, acc in _engine_steps(eng, name, keys):
            if p != prev:
                state, prev = pol.new_state(1), p
            lp, tk = torch.tensor(lp)[None], torch.tensor(tk)[None]
            if root < R:
                st2 = None if state is None else {k: v.clone() for k, v in state.items()}
                t2 = pol.build(rec.topk_logprobs[p, root][None], rec.topk_tokens[p, root][None], N, st2)
                r2 = accept_walk(t2, targets_from_record(rec.tokens[p:p + 1], torch.tensor([root]), t2.depths))
                rec_acc.append(int(r2.num_accepted[0]))
                diff = (tk[0, :, 0] != rec.topk_tokens[p, root, :, 0]).nonzero()
                if len(diff):
                    dep = int(diff[0])
                    first.append(dep + 1)
                    gaps.append(float(rec.topk_logprobs[p, root, dep, 0] - rec.topk_logprobs[p, root, dep, 1]))
            trees = pol.build(lp, tk, N, state)
            res = accept_walk(trees, targets_from_record(rec.tokens[p:p + 1], torch.tensor([root]), trees.depths))
            pol.observe(trees, res, state)
            if root < R:
                eng_acc.append(acc)
                lab_acc.append(int(res.num_accepted[0]))
        n = len(eng_acc)
        ea, la, ra = (sum(x) / n for x in (eng_acc, lab_acc, rec_acc))
        base_lp, base_tk = rec.topk_logprobs, rec.topk_tokens
        noisy = []
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            lp_n, order = (base_lp + args.noise * torch.randn(base_lp.shape, generator=g)).sort(-1, descending=True)
            rec.topk_logprobs, rec.topk_tokens = lp_n, base_tk.gather(-1, order)
            noisy.append(simulate(rec, make(), N, concurrency=1).mean_accepted_length)
        rec.topk_logprobs, rec.topk_tokens = base_lp, base_tk
        m, sd = statistics.mean(noisy), statistics.stdev(noisy)
        row = {"steps": n, "engine_accepted": ea, "lab_on_engine_topk_accepted": la,
               "lab_on_engine_topk_differing_steps": sum(a != b for a, b in zip(eng_acc, lab_acc)),
               "record_topk_accepted": ra, "record_topk_effect_pct": 100 * ((1 + ra) / (1 + la) - 1),
               "top1_differs": len(first), "first_diff_depth_ge4": sum(d >= 4 for d in first),
               "gap_median": statistics.median(gaps) if gaps else None,
               "noise": args.noise, "noisy_lab": noisy}
        out["configs"][name] = row
        lines.append(f"| {name} | {n} | {1 + ea:.4f} | {row['lab_on_engine_topk_differing_steps']} "
                     f"({1 + la:.4f}) | {row['record_topk_effect_pct']:+.2f}% | {len(first)} "
                     f"({row['first_diff_depth_ge4']}) | {row['gap_median'] or 0:.3f} | "
                     f"{m:.4f} ({100 * sd / m:.2f}%, {min(noisy):.4f}..{max(noisy):.4f}) |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    dump_json(out, os.path.join(out_dir(args), "diagnose.json"))
    with open(os.path.join(out_dir(args), "diagnose.md"), "w") as f:
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
    ap.add_argument("--sets", nargs="*", help="curves: prompt sets (default stdlib humaneval tables); "
                    "sampled: the sets whose sampled records to use (default all in the cache)")
    ap.add_argument("--sampled", action="store_true", help="curves: also the sampled records in the cache")
    ap.add_argument("--tag", default=None, help="curves: output name <out>/<tag>.* and docs/replay_<tag>.png")
    ap.add_argument("--noise", type=float, default=0.02, help="diagnose: log-prob noise sd (nats)")
    ap.add_argument("--engine-temperature", type=float, default=0.0,
                    help="engine: sampling temperature (0: greedy, as the fidelity table)")
    ap.add_argument("--top-p-only", type=float, default=None, help="sampled: only the records of this top-p")
    ap.add_argument("--out", default=os.path.join(DOCS, "replay"), help="tables and JSON (default docs/replay)")
    args = ap.parse_args(argv)
    fn = globals().get(f"cmd_{args.cmd}")
    if fn is None:
        ap.error(f"unknown command {args.cmd}")
    fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
