"""The replay lab: record once, then evaluate tree policies offline.

    python scripts/replay_lab.py continuations --set demo      # vLLM greedy outputs (no speculation)
    python scripts/replay_lab.py record --set demo             # drafter top-k at every position
    python scripts/replay_lab.py engine --set demo             # real vLLM runs (chain, BASTION fixed 15)
    python scripts/replay_lab.py fidelity --set demo           # lab vs engine table
    python scripts/replay_lab.py curves                        # accepted length vs node budget
    python scripts/replay_lab.py sampled --set stdlib          # T = 1 / top-p records + curves

Records are cached under --cache (default ~/.cache/vllm_bastion/replay);
tables, JSON and plots go to results/replay_*.
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


def engine_configs() -> dict[str, tuple[str, dict | None]]:
    return {
        "chain": ("dflash", None),
        "bastion_fixed15_cal": ("bastion", {"budget": "fixed", "max_nodes": 15, "topk": 8,
                                            "acceptance_calibration": True}),
        "bastion_fixed15_raw": ("bastion", {"budget": "fixed", "max_nodes": 15, "topk": 8,
                                            "acceptance_calibration": False}),
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
        if extra is not None:
            extra = dict(extra, model=drafter, stats_log_interval_s=0)
        r = engine_run(method, target, drafter, prompts, max_tokens=args.max_tokens, depth=DEPTH, bastion=extra,
                       position_fix=args.position_fix and method == "bastion")
        r["seconds"] = time.time() - t0
        res[name] = r
        print(f"{name}: mean accepted length {r['mean_accepted_length']:.4f} "
              f"({r['drafts']} steps, {time.time() - t0:.0f}s)", flush=True)
        dump_json(res, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd")
    ap.add_argument("--set", default="demo")
    ap.add_argument("--n", type=int, default=None, help="prompts of the set (default: all)")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--features", default="bf16", choices=["bf16", "fp32", "autocast"])
    ap.add_argument("--drafter-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--context-k-norm", default="first_layer", choices=["first_layer", "per_layer"],
                    help="first_layer: as vLLM 0.32's DFlash computes it; per_layer: the drafter as trained")
    ap.add_argument("--cache", default="~/.cache/vllm_bastion/replay")
    ap.add_argument("--only", nargs="*")
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
