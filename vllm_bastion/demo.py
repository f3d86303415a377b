"""The main job: BASTION on the project's own small model pair, next to plain
autoregressive decoding and vLLM's DFlash chain, on held-out code prompts.

    python -m vllm_bastion.demo [--batch-size 1] [--num-prompts 8] [--max-tokens 128]
        [--scaled-pair 0.6b | none]

Runs one vLLM engine per method, one after another, inside this process
(offline `vllm.LLM` with vLLM's in-process engine core: no engine or worker
processes to spawn, ~35 s less per engine on 2 cores), all greedy, and
prints tokens/s, mean accepted length, BASTION's mean tree size and the
speedups; it also checks that the three methods
produce token-identical outputs (speculation is lossless). No download: the
pair ships in vllm_bastion/assets/pair (see scripts/train_pair.py).

The shipped target is so small that on a CPU every speculation method loses
to plain decoding (a verify forward of 16 tokens costs several one-token
steps). So the demo then runs the same comparison at batch 1 on the
cost-scaled pair (the shipped pair widened function-preservingly to a
0.36B-parameter cost, the regime real serving is in: built into the cache on
first use, scripts/scale_pair.py), with a few short prompts and eager engines
to fit in a few minutes; `python scripts/bench.py` is the full benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys

from vllm_bastion.tools.benchmark import (  # sets VLLM_CPU_KVCACHE_SPACE first
    draft_depth,
    format_table,
    label,
    load_prompts,
    run_method,
    shipped_pair_paths,
)

METHODS = ("ar", "dflash", "bastion")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_bastion.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--enforce-eager", action="store_true",
                    help="skip torch.compile (faster start, slower steps)")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--scaled-pair", default="0.6b",
                    help="shape of the cost-scaled pair compared at batch 1 afterwards ('none': skip)")
    ap.add_argument("--scaled-prompts", type=int, default=2)
    ap.add_argument("--scaled-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    target, drafter = shipped_pair_paths()
    same = compare(target, drafter, "shipped pair", args.num_prompts, args.max_tokens,
                   args.batch_size, args.enforce_eager, args.json)
    if args.scaled_pair != "none":
        from vllm_bastion.tools.scale_pair import ensure_scaled_pair

        print(f"\n==== cost-scaled pair scaled-{args.scaled_pair} (batch 1) ====", flush=True)
        target, drafter = ensure_scaled_pair(args.scaled_pair)
        same &= compare(target, drafter, f"scaled-{args.scaled_pair}", args.scaled_prompts,
                        args.scaled_tokens, 1, True,
                        args.json and args.json.replace(".json", "") + "_scaled.json", warmup=1)
    return 0 if same else 1


def compare(target, drafter, name, num_prompts, max_tokens, batch_size, enforce_eager,
            json_out, warmup: int = 2) -> bool:
    depth = draft_depth(drafter)
    prompts = load_prompts("heldout", target, num_prompts + warmup)
    warm, prompts = prompts[:warmup], prompts[warmup:]
    print(f"{name}\ntarget  {target}\ndrafter {drafter} (DFlash, {depth} draft depths)\n"
          f"{len(prompts)} held-out code prompts, {max_tokens} new tokens each, greedy, "
          f"batch size {batch_size}{', eager' if enforce_eager else ''}\n", flush=True)
    results = []
    for method in METHODS:
        print(f"running {label(method)} ...", flush=True)
        results.append(run_method(method, target, drafter, prompts,
                                  batch_size=batch_size, max_tokens=max_tokens,
                                  depth=depth, enforce_eager=enforce_eager,
                                  warmup_prompts=warm, in_process=True))
    same = all(r["outputs"] == results[0]["outputs"] for r in results)
    print("\n" + format_table(results))
    b = next(r for r in results if r["method"] == "bastion")
    if b["tree"]:
        t = b["tree"]
        print(f"\nBASTION trees: {t['mean_nodes']:.1f} nodes on average (deepest {t['mean_max_depth']:.1f}), "
              f"{t['mean_accepted']:.2f} drafts accepted per step "
              f"(a top-1 chain would have accepted {t['mean_chain_accepted']:.2f})")
        if "budget" in t:
            print(f"latency model: {t['budget']['source']}")
    print(f"\noutputs token-identical across methods (lossless): {'yes' if same else 'NO'}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=1)
    return same


if __name__ == "__main__":
    sys.exit(main())
