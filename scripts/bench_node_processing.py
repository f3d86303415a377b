"""Time BASTION's per-node processing (penalties, bad words, min_tokens,
allowed tokens) and emitted-token logprobs per verify step, on the default
pair, next to the whole step.

    python scripts/bench_node_processing.py [--batch-sizes 1 16] [--max-tokens 64]
                                            [--max-nodes 32] [--out results/node_processing]

One engine (BASTION with a fixed budget and drafting always on, so every
step verifies full trees); for each batch size two runs on the held-out
prompts: "plain" (no feature) and "features" (every request with repetition
/ frequency / presence penalties, two bad words, min_tokens, an allowed-token
list and logprobs=5). Reported per verify step (ms) from BASTION's phase
timer (`LLM.collective_rpc("bastion_stats")["time_per_step"]`, host wall
time: on CPU the phase's cost): node_processing, logprobs, and the step
total, with the mean tree size. Record the runtime used (LD_PRELOAD).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-nodes", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    from vllm_bastion.tools.training import default_pair_paths

    target, drafter = default_pair_paths()
    with open(os.path.join(target, "heldout_prompts.json")) as f:
        prompts = [{"prompt_token_ids": p["token_ids"]} for p in json.load(f)]
    llm = LLM(model=target, max_model_len=2048, seed=0, max_num_seqs=max(args.batch_sizes),
              speculative_config={"method": "bastion", "model": drafter, "budget": "fixed",
                                  "max_nodes": args.max_nodes, "drafting": "always"})
    feats = dict(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2,
                 bad_words=["lambda", " None"], min_tokens=args.max_tokens // 2,
                 allowed_token_ids=list(range(5, 4000)), logprobs=5)
    rows = []
    for B in args.batch_sizes:
        for name, kw in (("plain", {}), ("features", feats)):
            sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, **kw)
            batch = [prompts[i % len(prompts)] for i in range(B)]
            llm.generate(batch, sp, use_tqdm=False)  # warm-up
            llm.collective_rpc("bastion_reset_stats")
            t0 = time.perf_counter()
            llm.generate(batch, sp, use_tqdm=False)
            wall = time.perf_counter() - t0
            st = llm.collective_rpc("bastion_stats")[0]
            tp = st["time_per_step"]
            steps = max(st["steps"], 1)  # verify steps with trees
            scale = tp["steps"] / steps  # timer ms are per executed step
            row = {"batch": B, "run": name, "verify_steps": st["steps"],
                   "mean_tree_nodes": round(st["mean_nodes"], 1),
                   "node_processing_ms": round(tp["node_processing_ms"] * scale, 3),
                   "logprobs_ms": round(tp["logprobs_ms"] * scale, 3),
                   "step_total_ms": round(tp["step_total_ms"] * scale, 2),
                   "wall_s": round(wall, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    runtime = "tcmalloc+iomp5 (LD_PRELOAD)" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default"
    lines = [f"default pair, max_nodes {args.max_nodes} fixed, {args.max_tokens} tokens, runtime: {runtime}",
             "", "| batch | run | tree nodes | node processing ms/step | logprobs ms/step | step ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['run']} | {r['mean_tree_nodes']} | {r['node_processing_ms']} | "
              f"{r['logprobs_ms']} | {r['step_total_ms']} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"runtime": runtime, "args": vars(args), "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
