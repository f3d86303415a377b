#!/usr/bin/env python
"""Train a (Qwen3 target, DFlash drafter) pair offline on CPU, with fixed seeds.

    python scripts/train_pair.py --out DIR [--test-pair] [--seed N] [--vllm-check N]

Writes DIR/target (HF Qwen3ForCausalLM + tokenizer, bastion_training.json,
heldout_prompts.json) and DIR/drafter (z-lab DFlashDraftModel format). The
default pair is the one shipped in vllm_bastion/assets/pair; --test-pair builds
the tiny float32 pair the tests use.

--vllm-check N afterwards loads the pair in vLLM (offline LLM, enforce_eager,
greedy, method "dflash" with num_speculative_tokens = block_size - 1) on the
first N held-out prompts, prints the draft acceptance from llm.get_metrics()
and checks the output equals vLLM's output without speculation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _fmt(xs, nd=2):
    return " ".join(f"{x:.{nd}f}" for x in xs)


def vllm_check(out_dir: str, n_prompts: int = 32, max_tokens: int = 256) -> dict:
    """Greedy generation with and without DFlash speculation in vLLM; acceptance + equality."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    target, drafter = os.path.join(out_dir, "target"), os.path.join(out_dir, "drafter")
    with open(os.path.join(drafter, "config.json"), encoding="utf-8") as f:
        k = json.load(f)["block_size"] - 1
    with open(os.path.join(target, "heldout_prompts.json"), encoding="utf-8") as f:
        prompts = [p["token_ids"] for p in json.load(f)[:n_prompts]]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    res = {}
    for name, spec in (("dflash", {"method": "dflash", "model": drafter, "num_speculative_tokens": k}),
                       ("base", None)):
        llm = LLM(model=target, max_model_len=1024, seed=0, disable_log_stats=False,
                  enforce_eager=True, speculative_config=spec)
        t = time.time()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        r = {"gen_seconds": round(time.time() - t, 2), "outputs": [list(o.outputs[0].token_ids) for o in outs]}
        for m in llm.get_metrics():
            if "spec_decode" in m.name:
                r[m.name] = m.values if hasattr(m, "values") else getattr(m, "value", None)
        res[name] = r
        del llm
    d = res["dflash"]
    drafts = d.get("vllm:spec_decode_num_drafts") or 0
    acc = d.get("vllm:spec_decode_num_accepted_tokens") or 0
    per = d.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
    same = sum(a == b for a, b in zip(d["outputs"], res["base"]["outputs"]))
    summary = {
        "prompts": len(prompts), "max_tokens": max_tokens, "num_speculative_tokens": k,
        "drafts": drafts, "draft_tokens": d.get("vllm:spec_decode_num_draft_tokens"), "accepted_tokens": acc,
        "accepted_per_draft": round(acc / max(1, drafts), 4), "tau": round(1 + acc / max(1, drafts), 4),
        "accept_rate_by_pos": [round(x / max(1, drafts), 4) for x in per],
        "greedy_identical": f"{same}/{len(prompts)}",
        "gen_seconds_dflash": d["gen_seconds"], "gen_seconds_base": res["base"]["gen_seconds"],
    }
    print(f"[vllm] dflash k={k}: {drafts} drafts, {acc} accepted -> {summary['accepted_per_draft']:.3f} "
          f"accepted/draft (tau {summary['tau']:.3f})", flush=True)
    print(f"[vllm] accept rate by position: {_fmt(summary['accept_rate_by_pos'], 3)}", flush=True)
    print(f"[vllm] greedy output identical to no-spec: {summary['greedy_identical']}", flush=True)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (gets target/ and drafter/)")
    ap.add_argument("--test-pair", action="store_true", help="the tiny float32 test pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-check", type=int, default=0, metavar="N",
                    help="afterwards measure vLLM dflash acceptance on N held-out prompts")
    ap.add_argument("--vllm-max-tokens", type=int, default=0,
                    help="tokens per prompt for --vllm-check (default: drafter eval length)")
    ap.add_argument("--skip-train", action="store_true", help="only run --vllm-check on an existing pair")
    args = ap.parse_args()

    from vllm_bastion.tools import training as T

    t0 = time.time()
    out = os.path.abspath(args.out)
    if not args.skip_train:
        if args.test_pair:
            r = T.build_test_pair(out, seed=args.seed)
        else:
            r = T.build_default_pair(out, seed=args.seed)
        tm, dm = r["target"], r["drafter"]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        sizes = {k: sum(os.path.getsize(os.path.join(out, k, f)) for f in os.listdir(os.path.join(out, k))
                        if f.endswith(".safetensors")) / 1e6 for k in ("target", "drafter")}
        print("=" * 72)
        print(f"pair: {out} (seed {args.seed}, {'test' if args.test_pair else 'default'})")
        print(f"target : {tm['params'] / 1e6:.2f}M params, {sizes['target']:.1f} MB; held-out loss "
              f"{tm['eval_loss']:.3f} nats/token, ppl {tm['eval_ppl']:.2f} on {tm['eval_tokens']} tokens of "
              f"{tm['heldout_files']} held-out stdlib files")
        print(f"         loss by context length: 1 tok {tm['loss_ctx_1']:.2f} | 2-8 {tm['loss_ctx_2_8']:.2f} | "
              f"9-64 {tm['loss_ctx_9_64']:.2f} | 65+ {tm['loss_ctx_65plus']:.2f}")
        print(f"drafter: {dm['params'] / 1e6:.2f}M params, {sizes['drafter']:.1f} MB, target layers "
              f"{dm['target_layer_ids']}, mask id {dm['mask_token_id']}")
        print(f"         top1 by depth: {_fmt(dm['top1_by_depth'])}")
        print(f"         top8 by depth: {_fmt(dm['top8_by_depth'])}")
        print(f"         top1 wrong, in top8: {_fmt(dm['top1_wrong_in_top8_by_depth'])}")
        print(f"         greedy chain walk: {dm['chain_accepted_mean']:.3f} accepted/step (tau {dm['chain_tau']:.3f}); "
              f"by position {_fmt(dm['chain_accept_rate_by_pos'])}")
        print(f"wall {time.time() - t0:.0f}s (target {tm['wall_seconds']:.0f}s, drafter {dm['wall_seconds']:.0f}s); "
              f"cpu {ru.ru_utime + ru.ru_stime:.0f}s")
    if args.vllm_check:
        with open(os.path.join(out, "drafter", "bastion_training.json"), encoding="utf-8") as f:
            dspec = json.load(f)["spec"]
        mt = args.vllm_max_tokens or (dspec["seq_len"] - dspec["eval_prompt_len"])
        s = vllm_check(out, args.vllm_check, mt)
        print("VLLM_CHECK " + json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
