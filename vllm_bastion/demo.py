"""The main job: BASTION on the project's own small model pair, next to plain
autoregressive decoding and vLLM's DFlash chain, on held-out code prompts.

    python -m vllm_bastion.demo [--batch-size 1] [--num-prompts 8] [--max-tokens 128]

Runs one vLLM engine per method, one after another, in this process (offline
`vllm.LLM`), all greedy, and prints tokens/s, mean accepted length, BASTION's
mean tree size and the speedups; it also checks that the three methods
produce token-identical outputs (speculation is lossless). No download: the
pair ships in vllm_bastion/assets/pair (see scripts/train_pair.py).
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
    args = ap.parse_args(argv)

    target, drafter = shipped_pair_paths()
    depth = draft_depth(drafter)
    prompts = load_prompts("heldout", target, args.num_prompts + 2)
    warm, prompts = prompts[:2], prompts[2:]
    print(f"target  {target}\ndrafter {drafter} (DFlash, {depth} draft depths)\n"
          f"{len(prompts)} held-out code prompts, {args.max_tokens} new tokens each, greedy, "
          f"batch size {args.batch_size}\n", flush=True)
    results = []
    for method in METHODS:
        print(f"running {label(method)} ...", flush=True)
        results.append(run_method(method, target, drafter, prompts,
                                  batch_size=args.batch_size, max_tokens=args.max_tokens,
                                  depth=depth, enforce_eager=args.enforce_eager,
                                  warmup_prompts=warm))
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
