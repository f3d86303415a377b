"""Differential test: BASTION against vLLM without speculation, at scale.

    python scripts/difftest.py                       # the full matrix (hours on 2 cores)
    python scripts/difftest.py --pairs tiny --trees topk8-fixed64 topk8-auto \\
        --batch-sizes 1 16 --prefix on --chunked on --num-prompts 200 --eager

Generated prompts (code, prose, unicode, near max_model_len; as token ids) x
batch sizes x prefix caching on/off x chunked prefill on/off x tree settings
(topk 1 and 8; fixed 1, 15, 64 nodes; auto) x greedy and seeded sampling, on
the shipped pair (bf16) and a tiny fp32 pair, offline and through the OpenAI
server with concurrent clients. Every request is classified against the
reference (vLLM without speculation for greedy; BASTION never drafting, i.e.
vLLM's own forward, for seeded) as none / near-tie / other, and a table of
mismatches by cause is printed; the exit status is 1 if any is "other".
Rows "vs b<N>" put the near-tie counts in scale: each reference at every
batch size against itself at the first (vLLM's own batch variance in bf16).
See vllm_bastion/tools/difftest.py for the details.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vllm_bastion.tools.difftest import TREES, Matrix, bastion_other, format_table, run_matrix  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["shipped", "tiny"], choices=["shipped", "tiny"])
    ap.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--prefix", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="prefix caching")
    ap.add_argument("--chunked", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="chunked prefill (on: max_num_batched_tokens 256)")
    ap.add_argument("--modes", nargs="+", default=["greedy", "seeded"], choices=["greedy", "seeded"])
    ap.add_argument("--interfaces", nargs="+", default=["offline", "server"],
                    choices=["offline", "server"])
    ap.add_argument("--server-trees", nargs="+", default=None, choices=list(TREES),
                    help="tree settings also run through the server (default: all)")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (faster start-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every row (counts, margins) to this file")
    args = ap.parse_args(argv)
    m = Matrix(pairs=tuple(args.pairs), trees=tuple(args.trees), batch_sizes=tuple(args.batch_sizes),
               prefix_caching=tuple(x == "on" for x in args.prefix),
               chunked_prefill=tuple(x == "on" for x in args.chunked), modes=tuple(args.modes),
               interfaces=tuple(args.interfaces),
               server_trees=tuple(args.server_trees) if args.server_trees else None,
               num_prompts=args.num_prompts, max_tokens=args.max_tokens,
               max_model_len=args.max_model_len, eager=args.eager, seed=args.seed)
    print(f"[difftest] matrix: {m}", flush=True)
    t0 = time.time()
    rows = []

    def save(row):
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"matrix": vars(args), "rows": [r.as_dict() for r in rows],
                           "seconds": time.time() - t0}, f, indent=1)

    run_matrix(m, log=lambda s: print(s, flush=True), on_row=save)
    print(f"\nmismatches by cause ({len(rows)} runs, {time.time() - t0:.0f} s):\n")
    print(format_table(rows))
    other = bastion_other(rows)
    print(f"\n'other' mismatches of BASTION: {other} (rows 'vs b<N>': vLLM's own forward at other "
          "batch sizes, for scale)")
    return 1 if other else 0


if __name__ == "__main__":
    sys.exit(main())
