"""python -m vllm_bastion.calibrate --model TARGET [--drafter DRAFTER]

Probes the target on this device through vLLM (the same kernels and execution
mode that serve it), fits BASTION's roofline latency model, prints the fitted
parameters and a predicted-vs-measured table, and saves the profile where
BASTION engines look for it (keyed by device, model, dtype, vLLM version and
execution mode), so the next `vllm serve ... {"method": "bastion"}` starts
without probing. Run it with the same --dtype / --enforce-eager /
--tensor-parallel-size you serve with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vllm_bastion.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="target model (path or hub id)")
    p.add_argument("--drafter", help="DFlash drafter: also measures the drafter forward (T_fix)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: the model's own (max_position_embeddings)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device-profile", help="roofline prior: device name or JSON path")
    p.add_argument("--use-cache", action="store_true",
                   help="print the cached fit instead of probing again")
    p.add_argument("--json", help="also write the result to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM on CPU needs a size
    from vllm import LLM

    from vllm_bastion._patches import WORKER_EXTENSION

    kw = dict(model=args.model, dtype=args.dtype,
              tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
              worker_extension_cls=WORKER_EXTENSION)
    if args.max_model_len is not None:
        kw["max_model_len"] = args.max_model_len
    if args.drafter:
        kw["speculative_config"] = {"method": "bastion", "model": args.drafter, "calibrate": False}
    llm = LLM(**kw)
    results = llm.collective_rpc(
        "bastion_calibrate", args=(not args.use_cache, args.device_profile))
    res = results[0]
    m = res["model"]
    c = m["coeffs"]
    print(f"\nBASTION latency model for {args.model}  ({res['source']})")
    print(f"  device prior : {m['device_name']}  peak {m['peak_flops']:.3g} FLOP/s, "
          f"bandwidth {m['bandwidth']:.3g} B/s")
    print(f"  compute      : a_c = {c['a_c']:.4g}, b_c = {1e3 * c['b_c']:.4g} ms")
    print(f"  memory       : a_m = {c['a_m']:.4g}, b_m = {1e3 * c['b_m']:.4g} ms")
    print(f"  T_fix (drafter forward) = {1e3 * m['t_fix']:.4g} ms")
    if "table" in res:
        s = res["summary"]
        print(f"\npredicted vs measured (fit error: MAPE {100 * s['mape']:.1f}%, "
              f"max {100 * s['max_rel_error']:.1f}%)\n")
        print(res["table"])
    print(f"\nsaved to {res['cache']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
