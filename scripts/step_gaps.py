"""Where a decoding step's wall-clock time goes, seen from the worker.

Wraps the worker's execute_model / sample_tokens / take_draft_token_ids
(through collective_rpc) and reports, per engine step: time inside each and
the idle gap between the end of one step's work and the start of the next
(the engine core's scheduling, output processing and IPC). A large gap means
time is lost outside everything the runner times.

    python scripts/step_gaps.py --method bastion --batch-size 4
    python scripts/step_gaps.py --method dflash-4 --batch-size 1

Run it on a quiet machine with vLLM's recommended runtime (LD_PRELOAD of
tcmalloc and Intel OpenMP, as scripts/bench.py sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # callables over collective_rpc
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

_KEYS = ("exec", "sample", "take", "gap")


def _install(worker):
    inner = getattr(worker, "worker", worker)
    acc = dict.fromkeys(_KEYS, 0.0) | {"steps": 0, "last_end": None}
    inner._step_gaps = acc

    def wrap(name, key):
        f = getattr(inner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            if key == "exec":
                if acc["last_end"] is not None:
                    acc["gap"] += t0 - acc["last_end"]
                acc["steps"] += 1
            try:
                return f(*a, **k)
            finally:
                acc["last_end"] = t1 = time.perf_counter()
                acc[key] += t1 - t0

        setattr(inner, name, timed)

    wrap("execute_model", "exec")
    wrap("sample_tokens", "sample")
    if hasattr(inner, "take_draft_token_ids"):
        wrap("take_draft_token_ids", "take")


def _reset(worker):
    acc = getattr(worker, "worker", worker)._step_gaps
    acc.update(dict.fromkeys(_KEYS, 0.0), steps=0, last_end=None)


def _read(worker):
    acc = dict(getattr(worker, "worker", worker)._step_gaps)
    acc.pop("last_end")
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="scaled-0.6b")
    ap.add_argument("--method", default="bastion", help="ar | dflash[-K] | bastion[-off|-fixed-N]")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=2, help="timed batches")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams

    from vllm_bastion.tools.benchmark import draft_depth, load_prompts, resolve_pair, speculative_config

    target, drafter = resolve_pair(args.pair)
    bsz = args.batch_size
    llm = LLM(model=target, max_model_len=2048, seed=0, enforce_eager=args.enforce_eager,
              max_num_seqs=max(bsz, 4),
              speculative_config=speculative_config(args.method, drafter, draft_depth(drafter)))
    prompts = load_prompts("heldout", target, 2 + args.batches * bsz)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], sp, use_tqdm=False)  # warm-up
    llm.collective_rpc(_install)
    llm.collective_rpc(_reset)
    bastion = args.method.startswith("bastion")
    if bastion:
        llm.collective_rpc("bastion_reset_stats")
    t0 = time.perf_counter()
    tokens = 0
    for i in range(2, len(prompts), bsz):
        outs = llm.generate(prompts[i:i + bsz], sp, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    wall = time.perf_counter() - t0
    acc = llm.collective_rpc(_read)[0]
    n = max(acc["steps"], 1)
    row = {"method": args.method, "batch": bsz, "tok_per_s": round(tokens / wall, 1), "steps": acc["steps"],
           "wall_ms_per_step": round(1e3 * wall / n, 2)}
    row |= {f"{k}_ms_per_step": round(1e3 * acc[k] / n, 2) for k in _KEYS}
    print(json.dumps(row))
    if bastion:
        st = llm.collective_rpc("bastion_stats")[0]
        print(json.dumps({"drafting_fraction": st.get("drafting_fraction"),
                          "mean_nodes": st.get("mean_nodes"), "mean_accepted": st.get("mean_accepted"),
                          "time_per_step": st.get("time_per_step")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
