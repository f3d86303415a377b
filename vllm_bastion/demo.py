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
import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM on CPU needs a KV size

METHODS = ("ar", "dflash", "bastion")
LABELS = {"ar": "autoregressive", "dflash": "vLLM DFlash chain", "bastion": "BASTION tree"}


def pair_paths() -> tuple[str, str]:
    from vllm_bastion.tools.training import default_pair_paths

    target, drafter = default_pair_paths()
    for p in (target, drafter):
        if not os.path.isfile(os.path.join(p, "config.json")):
            sys.exit(
                f"The default model pair is missing ({p}). Rebuild it offline with\n"
                f"  python scripts/train_pair.py --out {os.path.dirname(p)}\n"
                "(about 30 minutes on 2 CPU cores)."
            )
    return target, drafter


def load_prompts(target: str, n: int) -> list[str]:
    path = os.path.join(os.path.dirname(target), "heldout_prompts.json")
    if os.path.isfile(path):
        with open(path) as f:
            items = json.load(f)
    else:
        from transformers import AutoTokenizer

        from vllm_bastion.tools.training import heldout_prompts

        items = heldout_prompts(AutoTokenizer.from_pretrained(target), n=n)
    texts = [it["text"] if isinstance(it, dict) else it for it in items]
    return texts[:n]


def speculative_config(method: str, drafter: str, depth: int, extra: dict | None = None):
    if method == "ar":
        return None
    if method == "dflash":
        return {"method": "dflash", "model": drafter, "num_speculative_tokens": depth}
    return {"method": "bastion", "model": drafter, **(extra or {})}


def spec_counters(llm) -> dict[str, float | list]:
    out: dict[str, float | list] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name] = getattr(m, "values", None) or getattr(m, "value", 0)
    return out


def run_method(method: str, target: str, drafter: str, prompts: list[str], *, batch_size: int,
               max_tokens: int, depth: int, enforce_eager: bool, bastion: dict | None = None,
               warmup_prompts: list[str] = ()) -> dict:
    """Generate `prompts` with one method, in batches of `batch_size` requests
    (after an untimed warm-up on `warmup_prompts`)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=target, max_model_len=2048, seed=0, enforce_eager=enforce_eager,
              max_num_seqs=max(batch_size, 4), disable_log_stats=False,
              speculative_config=speculative_config(method, drafter, depth, bastion))
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    try:
        if warmup_prompts:  # warm-up (and BASTION's calibration probe)
            llm.generate(list(warmup_prompts), sp, use_tqdm=False)
        if method == "bastion":
            llm.collective_rpc("bastion_reset_stats")
        before = spec_counters(llm)
        outs = []
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            outs += llm.generate(prompts[i : i + batch_size], sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        after = spec_counters(llm)
        tree = llm.collective_rpc("bastion_stats")[0] if method == "bastion" else {}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
    acc = after.get("vllm:spec_decode_num_accepted_tokens", 0) - before.get(
        "vllm:spec_decode_num_accepted_tokens", 0)
    drafted = after.get("vllm:spec_decode_num_draft_tokens", 0) - before.get(
        "vllm:spec_decode_num_draft_tokens", 0)
    per_pos_a = after.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
    per_pos_b = before.get("vllm:spec_decode_num_accepted_tokens_per_pos") or [0] * len(per_pos_a)
    by_depth = [(a - b) / drafts for a, b in zip(per_pos_a, per_pos_b)] if drafts else []
    return {
        "method": method,
        "batch_size": batch_size,
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "mean_accepted_length": 1 + acc / drafts if drafts else 1.0,
        "mean_drafted_per_step": drafted / drafts if drafts else 0.0,
        "acceptance_by_depth": by_depth,
        "tree": tree,
        "outputs": [list(o.outputs[0].token_ids) for o in outs],
    }


def format_table(results: list[dict]) -> str:
    ar = {r["batch_size"]: r for r in results if r["method"] == "ar"}
    df = {r["batch_size"]: r for r in results if r["method"] == "dflash"}
    lines = [
        f"{'method':<20} {'batch':>5} {'tokens/s':>9} {'accepted len':>12} {'nodes/step':>10} "
        f"{'vs AR':>7} {'vs DFlash':>9}",
    ]
    for r in results:
        b = r["batch_size"]
        vs_ar = r["tokens_per_s"] / ar[b]["tokens_per_s"] if b in ar else float("nan")
        vs_df = r["tokens_per_s"] / df[b]["tokens_per_s"] if b in df else float("nan")
        nodes = r["mean_drafted_per_step"] if r["method"] != "ar" else 0
        lines.append(
            f"{LABELS[r['method']]:<20} {b:>5} {r['tokens_per_s']:>9.1f} "
            f"{r['mean_accepted_length']:>12.2f} {nodes:>10.1f} {vs_ar:>6.2f}x {vs_df:>8.2f}x"
        )
    return "\n".join(lines)


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

    target, drafter = pair_paths()
    with open(os.path.join(drafter, "config.json")) as f:
        depth = int(json.load(f).get("block_size", 16)) - 1
    prompts = load_prompts(target, args.num_prompts + 2)
    warm, prompts = prompts[:2], prompts[2:]
    print(f"target  {target}\ndrafter {drafter} (DFlash, {depth} draft depths)\n"
          f"{len(prompts)} held-out code prompts, {args.max_tokens} new tokens each, greedy, "
          f"batch size {args.batch_size}\n", flush=True)
    results = []
    for method in METHODS:
        print(f"running {LABELS[method]} ...", flush=True)
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
