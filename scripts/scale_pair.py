#!/usr/bin/env python
"""Build a cost-scaled copy of the project's trained pair (function-preserving widening).

    python scripts/scale_pair.py --shape 0.6b [--out DIR] [--check] [--vllm-check N] [--profile]

Without --out the pair is built on first use into the cache
(``$XDG_CACHE_HOME/vllm_bastion/pairs/scaled-<shape>``, default ``~/.cache/...``) and
its paths are printed; from Python use
``vllm_bastion.tools.scale_pair.ensure_scaled_pair("0.6b") -> (target_dir, drafter_dir)``.
With --out DIR it is written to DIR/{target,drafter} (DIR must not exist).

--check        fp32 logits of the widened vs the source target (transformers) on held-out
               prompts continued greedily, and the widened vs the source drafter's block
               logits (tools.training.DFlashDrafter): max |logit diff|, top-1 agreement.
--vllm-check N vLLM offline (CPU, enforce_eager, --vllm-dtype), N held-out prompts, greedy:
               outputs without speculation and vLLM's dflash acceptance for the source and
               the widened pair, side by side. In float32 they are identical; in bf16 (the
               default) kernels of another shape round differently, so greedy texts part
               after a while, as much as the source's own bf16 and float32 texts do (the
               check also runs the source in float32 as that reference).
--profile      torch (transformers, bf16, sdpa, --threads): one target forward of n = 1..64
               new tokens on top of --context tokens of KV cache, greedy decode ms/token,
               and one drafter step (the drafter / target forward-cost ratio).
--profile-vllm the same target forward and decode timings through vLLM (enforce_eager; the
               context is a prefix-cache hit, so a request runs one n-token forward). Run it
               with vLLM's recommended CPU runtime (LD_PRELOAD of tcmalloc + Intel OpenMP)
               for benchmark-comparable numbers; the output records LD_PRELOAD.

Shapes: see vllm_bastion.tools.scale_pair.SHAPES (0.6b, 1.7b).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from vllm_bastion.tools import scale_pair as S  # noqa: E402


def _prompts(target_dir: str) -> list[list[int]]:
    with open(os.path.join(target_dir, "heldout_prompts.json"), encoding="utf-8") as f:
        return [p["token_ids"] for p in json.load(f)]


# ------------------------------------------------------------------------------ --check

@torch.no_grad()
def check(src_t: str, src_d: str, wide_t: str, wide_d: str, n_prompts: int, gen: int) -> dict:
    from transformers import AutoModelForCausalLM

    prompts = torch.tensor(_prompts(src_t)[-n_prompts:])           # the last prompts: held out
    small = AutoModelForCausalLM.from_pretrained(src_t, dtype=torch.float32).eval()
    seqs = small.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=gen,
                          do_sample=False, pad_token_id=3)          # longer context, the target's own text
    del small
    g = torch.Generator().manual_seed(0)
    S_len = seqs.shape[1]
    anchors = torch.stack([torch.randperm(S_len - 24, generator=g)[:8].sort().values + 8 for _ in range(len(seqs))])
    t0 = time.time()
    t = S.compare_targets(src_t, wide_t, seqs)
    d = S.compare_drafters(src_t, src_d, wide_t, wide_d, seqs, anchors)
    r = {"sequences": len(seqs), "seq_len": S_len, "target": t, "drafter": d,
         "seconds": round(time.time() - t0, 1)}
    print(f"[check] target  (fp32, {t['positions']} positions): max |logit diff| {t['max_abs_diff']:.3g} "
          f"(max |logit| {t['max_abs_logit']:.3g}), top-1 agreement {100 * t['top1_agree']:.2f}%")
    print(f"[check] drafter (fp32, {d['positions']} block positions): max |logit diff| {d['max_abs_diff']:.3g} "
          f"(max |logit| {d['max_abs_logit']:.3g}), top-1 agreement {100 * d['top1_agree']:.2f}%")
    return r


# ------------------------------------------------------------------------------ --vllm-check

def _vllm_run(target: str, drafter: str | None, prompts: list[list[int]], max_tokens: int, dtype: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = None
    if drafter:
        with open(os.path.join(drafter, "config.json"), encoding="utf-8") as f:
            spec = {"method": "dflash", "model": drafter, "num_speculative_tokens": json.load(f)["block_size"] - 1}
    llm = LLM(model=target, max_model_len=1024, seed=0, enforce_eager=True, disable_log_stats=False,
              speculative_config=spec, dtype=dtype)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    r = {"seconds": round(time.time() - t0, 2), "outputs": [list(o.outputs[0].token_ids) for o in outs]}
    for m in llm.get_metrics():
        if "spec_decode" in m.name:
            r[m.name.split(":")[-1]] = m.values if hasattr(m, "values") else getattr(m, "value", None)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return r


def vllm_check(src_t: str, src_d: str, wide_t: str, wide_d: str, n: int, max_tokens: int, dtype: str) -> dict:
    prompts = _prompts(src_t)[:n]
    res = {}
    runs = [("source", src_t, None, dtype), ("source_dflash", src_t, src_d, dtype),
            ("scaled", wide_t, None, dtype), ("scaled_dflash", wide_t, wide_d, dtype)]
    if dtype != "float32":      # reference: how far the source's own outputs move with bf16 rounding
        runs.append(("source_fp32", src_t, None, "float32"))
    for name, t, d, dt in runs:
        res[name] = _vllm_run(t, d, prompts, max_tokens, dt)
        print(f"[vllm] {name}: {res[name]['seconds']}s", flush=True)

    def same(a, b):
        return sum(x == y for x, y in zip(res[a]["outputs"], res[b]["outputs"]))

    def prefix(a, b):                   # mean length of the common prefix of two runs' outputs
        n_eq = []
        for x, y in zip(res[a]["outputs"], res[b]["outputs"]):
            k = 0
            while k < min(len(x), len(y)) and x[k] == y[k]:
                k += 1
            n_eq.append(k)
        return round(sum(n_eq) / len(n_eq), 1)

    summary = {"prompts": n, "max_tokens": max_tokens, "dtype": dtype, "ld_preload": os.environ.get("LD_PRELOAD", ""),
               "greedy_scaled_eq_source": same("scaled", "source"),
               "greedy_scaled_source_common_prefix": prefix("scaled", "source"),
               "greedy_source_dflash_eq_source": same("source_dflash", "source"),
               "greedy_scaled_dflash_eq_scaled": same("scaled_dflash", "scaled"),
               "seconds": {k: v["seconds"] for k, v in res.items()},
               "outputs": {k: v["outputs"] for k, v in res.items()}}
    if "source_fp32" in res:
        summary["greedy_source_eq_source_fp32"] = same("source", "source_fp32")
        summary["greedy_source_source_fp32_common_prefix"] = prefix("source", "source_fp32")
    for k in ("source_dflash", "scaled_dflash"):
        r = res[k]
        drafts, acc = r.get("spec_decode_num_drafts") or 0, r.get("spec_decode_num_accepted_tokens") or 0
        per = r.get("spec_decode_num_accepted_tokens_per_pos") or []
        summary[k] = {"drafts": drafts, "accepted": acc, "accepted_per_draft": round(acc / max(drafts, 1), 4),
                      "per_pos": [round(x / max(drafts, 1), 3) for x in per]}
    print(f"[vllm] dtype {dtype}: greedy (no spec) scaled == source: {summary['greedy_scaled_eq_source']}/{n} "
          f"(mean common prefix {summary['greedy_scaled_source_common_prefix']}/{max_tokens} tokens); "
          f"dflash == no-spec: source {summary['greedy_source_dflash_eq_source']}/{n}, "
          f"scaled {summary['greedy_scaled_dflash_eq_scaled']}/{n}")
    if "source_fp32" in res:
        print(f"[vllm] rounding reference: source {dtype} == source float32: "
              f"{summary['greedy_source_eq_source_fp32']}/{n} (mean common prefix "
              f"{summary['greedy_source_source_fp32_common_prefix']}/{max_tokens} tokens)")
    for k in ("source_dflash", "scaled_dflash"):
        s = summary[k]
        print(f"[vllm] {k}: {s['drafts']} drafts, {s['accepted']} accepted, {s['accepted_per_draft']:.3f} "
              f"accepted/draft; by position {' '.join(f'{x:.3f}' for x in s['per_pos'])}")
    return summary


# ------------------------------------------------------------------------------ --profile

def _median_ms(fn, reps: int) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of fn() (after one warm-up). With one torch
    thread the CPU time is the work itself, robust to other jobs sharing the cores."""
    fn()
    ws, cs = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ws.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return round(1e3 * statistics.median(ws), 2), round(1e3 * statistics.median(cs), 2)


@torch.no_grad()
def profile(target_dir: str, drafter_dir: str, context: int, ns: list[int], reps: int, decode: int) -> dict:
    from transformers import AutoModelForCausalLM

    from vllm_bastion.tools import training as T

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.tensor([sum(_prompts(target_dir), [])[:context]])
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    g = torch.Generator().manual_seed(0)
    res: dict = {"runtime": "torch (transformers, bf16, sdpa)", "threads": torch.get_num_threads(),
                 "context": context, "forward_ms": {}, "forward_cpu_ms": {}}
    for n in ns:
        x = torch.randint(5, model.config.vocab_size, (1, n), generator=g)

        def fwd():
            model(input_ids=x, past_key_values=cache, use_cache=True)
            cache.crop(-n)
        res["forward_ms"][n], res["forward_cpu_ms"][n] = _median_ms(fwd, reps)
        print(f"[profile] target forward, {n:3d} new tokens on {context} cached: {res['forward_ms'][n]:.1f} ms "
              f"(cpu {res['forward_cpu_ms'][n]:.1f} ms)", flush=True)

    tok = out.logits[:, -1:].argmax(-1)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(decode):
        tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    res["decode_ms_per_token"] = round(1e3 * (time.perf_counter() - t0) / decode, 2)
    res["decode_cpu_ms_per_token"] = round(1e3 * (time.process_time() - c0) / decode, 2)
    print(f"[profile] greedy decode: {res['decode_ms_per_token']:.1f} ms/token "
          f"(cpu {res['decode_cpu_ms_per_token']:.1f}) "
          f"({decode} tokens after {context})")
    cache.crop(-decode)

    # one DFlash drafter step, as vLLM runs it: fc + hidden_norm on the few new context rows (their
    # K/V go to the drafter's cache; here they are the only context), the [anchor, MASK x B-1]
    # block through the drafter layers, the target's lm_head on the B-1 draft positions
    drafter, cfg = T.load_drafter(drafter_dir, torch.bfloat16)
    drafter.eval()
    B, nf = cfg["block_size"], len(cfg["dflash_config"]["target_layer_ids"])
    new = 4
    feats = torch.randn(1, new, nf * cfg["hidden_size"], dtype=torch.bfloat16)
    blk = torch.full((1, B), cfg["dflash_config"]["mask_token_id"])
    pos = torch.arange(context, context + B)[None]
    ctx_pos = torch.arange(context - new, context)[None]
    mask = torch.ones(1, B, new + B, dtype=torch.bool)

    def step():
        h = drafter(model.model.embed_tokens(blk), pos, drafter.fuse(feats), ctx_pos, mask)
        model.lm_head(h[:, 1:])
    res["drafter_step_ms"], res["drafter_step_cpu_ms"] = _median_ms(step, reps)
    res["drafter_over_decode_cpu"] = round(res["drafter_step_cpu_ms"] / res["decode_cpu_ms_per_token"], 3)
    print(f"[profile] drafter step ({cfg['num_hidden_layers']} layers, block {B}, {new} new context rows): "
          f"{res['drafter_step_ms']:.1f} ms (cpu {res['drafter_step_cpu_ms']:.1f}) = "
          f"{res['drafter_over_decode_cpu']:.2f} x a target decode step (cpu time)")
    return res


def profile_vllm(target_dir: str, context: int, ns: list[int], reps: int, decode: int) -> dict:
    """vLLM's own cost of one target forward of n new tokens on ``context`` tokens of KV cache: the
    context is a prefix-cache hit (``context`` is a multiple of vLLM's CPU block size, 128), so a
    request [context + n fresh tokens] with max_tokens=1 runs exactly one n-token forward (plus the
    engine's per-step overhead, which a real step pays too). Decode ms/token: the time of
    max_tokens=1+decode minus max_tokens=1, over decode."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=target_dir, max_model_len=2048, seed=0, enforce_eager=True, enable_prefix_caching=True)
    ctx = sum(_prompts(target_dir), [])[:context]
    g = torch.Generator().manual_seed(0)
    V = llm.llm_engine.model_config.get_vocab_size()

    def run(new_tokens: int, max_tokens: int) -> float:
        ids = ctx + torch.randint(5, V, (new_tokens,), generator=g).tolist()
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                     ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0

    run(1, 2)                                                       # fills the prefix cache, warms up
    res: dict = {"runtime": "vllm (enforce_eager, prefix-cached context)",
                 "ld_preload": os.environ.get("LD_PRELOAD", ""), "context": context, "forward_ms": {}}
    for n in ns:
        res["forward_ms"][n] = round(1e3 * statistics.median(run(n, 1) for _ in range(reps)), 2)
        print(f"[profile-vllm] target forward, {n:3d} new tokens on {context} cached: "
              f"{res['forward_ms'][n]:.1f} ms", flush=True)
    t1 = statistics.median(run(1, 1) for _ in range(3))
    tn = statistics.median(run(1, 1 + decode) for _ in range(3))
    res["decode_ms_per_token"] = round(1e3 * (tn - t1) / decode, 2)
    print(f"[profile-vllm] greedy decode (batch 1): {res['decode_ms_per_token']:.1f} ms/token "
          f"(LD_PRELOAD={res['ld_preload']!r})", flush=True)
    llm.llm_engine.engine_core.shutdown()
    return res


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.6b", choices=sorted(S.SHAPES))
    ap.add_argument("--out", help="write DIR/{target,drafter} instead of the cache (DIR must not exist)")
    ap.add_argument("--src", help="source pair folder with target/ and drafter/ (default: the shipped pair)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the dead weights")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--check-prompts", type=int, default=8)
    ap.add_argument("--check-gen", type=int, default=192, help="greedy tokens appended to each check prompt")
    ap.add_argument("--vllm-check", type=int, default=0, metavar="N")
    ap.add_argument("--vllm-max-tokens", type=int, default=128)
    ap.add_argument("--vllm-dtype", default="auto", help="auto: the checkpoints' bf16; float32: function check")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--profile-vllm", action="store_true", help="the same forward / decode timings through vLLM")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for --check/--profile (0: torch's default)")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.src:
        src_t, src_d = os.path.join(args.src, "target"), os.path.join(args.src, "drafter")
    else:
        from vllm_bastion.tools.training import default_pair_paths
        src_t, src_d = default_pair_paths()
    t0 = time.time()
    if args.out:
        wide_t, wide_d = S.build_scaled_pair(args.shape, args.out, src_target=src_t, src_drafter=src_d,
                                             seed=args.seed)
    else:
        wide_t, wide_d = S.ensure_scaled_pair(args.shape, src_target=src_t, src_drafter=src_d, seed=args.seed)
    with open(os.path.join(wide_t, S.SCALED_META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    size = {k: sum(os.path.getsize(os.path.join(d, fn)) for fn in os.listdir(d)) for k, d in
            (("target", wide_t), ("drafter", wide_d))}
    print(f"scaled-{args.shape}: target {wide_t} ({meta['params']['target'] / 1e6:.1f}M params, "
          f"{size['target'] / 1e6:.0f} MB)")
    print(f"scaled-{args.shape}: drafter {wide_d} ({meta['params']['drafter'] / 1e6:.1f}M params, "
          f"{size['drafter'] / 1e6:.0f} MB, target_layer_ids {meta['plan']['target_layer_ids']})")
    print(f"(built in {meta['build_seconds']}s; ready after {time.time() - t0:.1f}s)")
    results: dict = {"shape": args.shape, "target": wide_t, "drafter": wide_d, "meta": meta, "disk_bytes": size}
    if args.check:
        results["check"] = check(src_t, src_d, wide_t, wide_d, args.check_prompts, args.check_gen)
    if args.profile:
        results["profile"] = profile(wide_t, wide_d, args.context, [1, 4, 8, 16, 32, 64], args.reps,
                                     args.decode_tokens)
    if args.vllm_check:
        results["vllm_check"] = vllm_check(src_t, src_d, wide_t, wide_d, args.vllm_check, args.vllm_max_tokens,
                                           args.vllm_dtype)
    if args.profile_vllm:
        results["profile_vllm"] = profile_vllm(wide_t, args.context, [1, 4, 8, 16, 32, 64], args.reps,
                                               args.decode_tokens)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
