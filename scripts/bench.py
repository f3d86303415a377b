"""AR vs vLLM's DFlash chain (default and hand-tuned lengths) vs BASTION, in one invocation.

    python scripts/bench.py --pair scaled-0.6b [--batch-sizes 1 4 16 64]
        [--server-batch-sizes 1 16] [--methods ...] [--prompts heldout]
        [--num-prompts 16] [--requests-per-slot 3] [--max-tokens 128] [--length-spread 0.5]
        [--runtime recommended] [--out results/bench]

Pairs: `shipped` (the trained 6.8M-parameter pair in the package) or
`scaled-<shape>` (the same pair widened function-preservingly to a real
model's cost, built into the cache on first use: scripts/scale_pair.py).
Methods (all by default): `ar`; `dflash` (vLLM's chain at its default
length, the drafter's block size - 1); `dflash-1/2/4/8` (hand-tuned chain
lengths; the best of them per batch size is "the best-tuned chain");
`bastion` (defaults); `bastion-off` (speculation forced off: BASTION's
overhead floor); `bastion-always` (every request drafts every step: the
budget sizes trees, nothing switches drafting off); `bastion-top1` (top-1 trees of the default chain length:
the same drafts as `dflash`); `bastion-top1-N` (top-1 chains of exactly N drafts every step: the
same drafts as `dflash-N`, so the two differ only by BASTION's per-step machinery); `bastion-fixed-N` (top-8 trees of exactly N
nodes: their cost per step against `dflash-N`'s); `bastion-depth-N` (defaults with a
drafter block of at most N + 1 positions instead of the checkpoint's block size);
`bastion-fulldepth` (defaults, but the drafter's whole block every step instead of a
block that follows the budget's trees). vLLM 0.32's own adaptive chain length
(`enable_adaptive_verification`) needs the V2 model runner and FULL CUDA
graphs, so it cannot run on CPU; it is listed as unavailable.

Same prompts for every method, greedy with ignore_eos, so every method
generates the same tokens (checked: the run fails if any differs from AR).
"Batch size b" is b requests in flight: offline, a new request joins the
engine as soon as one finishes (tools.benchmark.generate_concurrent, like
vLLM's max_num_seqs); through the server, b concurrent clients. Each run
has at least `--requests-per-slot` x b requests, whose lengths (max_tokens)
spread evenly over `--max-tokens` x (1 +- `--length-spread`), the same for
every method: a server's requests differ in length, and with equal lengths
plain decoding's requests would all finish and join at the same steps while
a speculating engine's finish one by one. Offline, tokens/s is given twice:
over the whole run (a batch job's makespan: the joint start-up and the
draining tail included) and over the steady-state window (from the first
request's end until the last request joined: every slot busy, requests
finishing and joining, each method paying the prefills of its joiners; a
loaded server's steady state).
For every (mode, batch size, method): tokens/s, mean accepted length, nodes
per drafted request-step, BASTION's share of request-steps that drafted, its
predicted vs measured verify time; per batch size the ratios BASTION / AR,
/ default chain, / best-tuned chain. Writes JSON, CSV and two plots
(throughput vs batch size per method; BASTION's tree size vs batch size).

Runtime: vLLM warns that speculative decoding on CPU loses much performance
without Intel OpenMP and tcmalloc preloaded. `--runtime recommended` (the
default) re-executes this script with LD_PRELOAD set to both (install them:
`pip install intel-openmp` and Debian's libgoogle-perftools4); the results
record which runtime ran.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vllm_bastion.tools.benchmark import (  # noqa: E402
    CHAIN_LENGTHS,
    draft_depth,
    label,
    load_prompts,
    merge_rounds,
    request_lengths,
    recommended_preload,
    resolve_pair,
    run_method_batches,
    runtime_description,
    speculative_config,
)
from vllm_bastion.launch import openai_server  # noqa: E402

ALL_METHODS = ["ar", "dflash", *[f"dflash-{k}" for k in CHAIN_LENGTHS], "bastion", "bastion-off",
               "bastion-top1"]


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


def run_server(method, target, drafter, prompts, *, batch_size, max_tokens, depth, enforce_eager,
               warmup_prompts, log_dir, length_spread=0.0):
    from openai import AsyncOpenAI

    args = ["--max-model-len", "2048", "--seed", "0", "--max-num-seqs", str(max(batch_size, 4))]
    if enforce_eager:
        args.append("--enforce-eager")
    spec = speculative_config(method, drafter, depth)
    if spec:
        args += ["--speculative-config", json.dumps(spec)]
    log_path = os.path.join(log_dir, f"server_{method}_b{batch_size}.log")
    with openai_server(target, args, log_path) as url:
        async def complete(client, p, n):
            r = await client.completions.create(
                model=target, prompt=p, max_tokens=n, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
            ch = r.choices[0]
            ids = getattr(ch, "token_ids", None) or (ch.model_extra or {}).get("token_ids")
            return list(ids or [])

        async def drive(client, ps, lengths=None):
            sem = asyncio.Semaphore(batch_size)
            out = [None] * len(ps)

            async def worker(i):
                async with sem:
                    out[i] = await complete(client, ps[i], lengths[i] if lengths else max_tokens)

            await asyncio.gather(*(worker(i) for i in range(len(ps))))
            return out

        async def session():  # one event loop for the client's whole life
            async with AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0,
                                   timeout=3600) as client:
                await drive(client, list(warmup_prompts))
                before = _metrics(url)
                t0 = time.perf_counter()
                outs = await drive(client, prompts,
                                   request_lengths(len(prompts), max_tokens, length_spread))
                wall = time.perf_counter() - t0
                return before, outs, wall, _metrics(url)

        before, outs, wall, after = asyncio.run(session())

    def delta(name):
        return _sum(after, name) - _sum(before, name)

    drafts = delta("vllm:spec_decode_num_drafts_total")
    acc = delta("vllm:spec_decode_num_accepted_tokens_total")
    drafted = delta("vllm:spec_decode_num_draft_tokens_total")
    eligible = delta("vllm:bastion_draft_eligible_requests_total")
    tokens = sum(len(o) for o in outs)
    tree = {}
    if eligible:
        tree["drafting_fraction"] = delta("vllm:bastion_drafting_requests_total") / eligible
        tree["mean_block_depth"] = _sum(after, "vllm:bastion_mean_drafter_depth") or None
    return {
        "method": method, "batch_size": batch_size, "requests": len(prompts), "tokens": tokens,
        "seconds": wall, "tokens_per_s": tokens / wall,
        "mean_accepted_length": 1 + acc / drafts if drafts else 1.0,
        "mean_drafted_per_step": drafted / drafts if drafts else 0.0,
        "acceptance_by_depth": [], "tree": tree, "outputs": outs,
    }


# ------------------------------------------------------------------ reporting


def summarize(results: list[dict]) -> list[dict]:
    """One row per (mode, batch size): BASTION vs AR, default chain, best-tuned chain."""
    rows = []
    for mode in sorted({r["mode"] for r in results}):
        for b in sorted({r["batch_size"] for r in results if r["mode"] == mode}):
            by = {r["method"]: r for r in results if r["mode"] == mode and r["batch_size"] == b}
            chains = {m: r for m, r in by.items() if m.startswith("dflash-")}
            best = max(chains.values(), key=lambda r: r["tokens_per_s"]) if chains else None
            bas = by.get("bastion")
            row = {"mode": mode, "batch_size": b}
            for m in ("ar", "dflash", "bastion", "bastion-off", "bastion-top1"):
                if m in by:
                    row[f"{m}_tok_s"] = by[m]["tokens_per_s"]
            if best is not None:
                row["best_chain"] = best["method"]
                row["best_chain_tok_s"] = best["tokens_per_s"]
            if bas is not None:
                t = bas.get("tree") or {}
                row["bastion_accepted_length"] = bas["mean_accepted_length"]
                row["bastion_nodes_per_drafted_step"] = bas["mean_drafted_per_step"]
                row["bastion_drafting_fraction"] = t.get("drafting_fraction")
                bud = t.get("budget") or {}
                row["bastion_predicted_verify_ms"] = 1e3 * (bud.get("mean_predicted_verify_s") or 0)
                row["bastion_measured_verify_ms"] = 1e3 * (bud.get("mean_measured_verify_s") or 0)
                for base, key in (("ar", "vs_ar"), ("dflash", "vs_default_chain")):
                    if base in by:
                        row[key] = bas["tokens_per_s"] / by[base]["tokens_per_s"]
                if best is not None:
                    row["vs_best_chain"] = bas["tokens_per_s"] / best["tokens_per_s"]
                    row["vs_max_ar_best_chain"] = bas["tokens_per_s"] / max(
                        best["tokens_per_s"], by["ar"]["tokens_per_s"] if "ar" in by else 0)
            if "bastion-off" in by and "ar" in by:
                row["off_vs_ar"] = by["bastion-off"]["tokens_per_s"] / by["ar"]["tokens_per_s"]
            # the steady-state window (every slot busy, requests finishing and joining): a loaded server
            win = {m: r.get("window_tokens_per_s") for m, r in by.items()}
            wchains = {m: v for m, v in win.items() if m.startswith("dflash-") and v}
            if win.get("bastion") and win.get("ar"):
                row["window_ar_tok_s"], row["window_bastion_tok_s"] = win["ar"], win["bastion"]
                row["window_vs_ar"] = win["bastion"] / win["ar"]
                if wchains:
                    wb = max(wchains, key=wchains.get)
                    row["window_best_chain"], row["window_best_chain_tok_s"] = wb, wchains[wb]
                    row["window_vs_best_chain"] = win["bastion"] / wchains[wb]
                if win.get("bastion-off"):
                    row["window_off_vs_ar"] = win["bastion-off"] / win["ar"]
            if "bastion-top1" in by and "dflash" in by:
                row["top1_vs_default_chain"] = (by["bastion-top1"]["tokens_per_s"]
                                               / by["dflash"]["tokens_per_s"])
            for m, r in by.items():  # a tree (or top-1 chain) of N nodes vs a chain of N drafts
                n = m.rsplit("-", 1)[-1]
                if m.startswith(("bastion-fixed-", "bastion-top1-")) and f"dflash-{n}" in by:
                    c = by[f"dflash-{n}"]
                    if r.get("ms_per_step") and c.get("ms_per_step"):
                        row[f"step_cost_{m}_vs_chain"] = r["ms_per_step"] / c["ms_per_step"]
                        row[f"tok_s_{m}_vs_chain"] = r["tokens_per_s"] / c["tokens_per_s"]
            rows.append(row)
    return rows


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def markdown_tables(results: list[dict], summary: list[dict]) -> str:
    lines = ["| mode | batch | method | tok/s | steady-state window tok/s | accepted len | "
             "nodes/drafted step | drafter depth | drafting | ms/step | vs AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ar = {(r["mode"], r["batch_size"]): r["tokens_per_s"] for r in results if r["method"] == "ar"}
    for r in results:
        t = r.get("tree") or {}
        base = ar.get((r["mode"], r["batch_size"]))
        lines.append(
            f"| {r['mode']} | {r['batch_size']} | {label(r['method'])} | {r['tokens_per_s']:.1f} | "
            f"{_f(r.get('window_tokens_per_s'))} | {r['mean_accepted_length']:.2f} | {r['mean_drafted_per_step']:.1f} | "
            f"{_f(t.get('mean_block_depth'))} | {_f(t.get('drafting_fraction'), '{:.0%}')} | {_f(r.get('ms_per_step'))} | "
            f"{_f(r['tokens_per_s'] / base if base else None, '{:.2f}x')} |")
    lines += ["", "| mode | batch | AR | default chain | best chain | BASTION | BASTION / AR | "
              "/ default chain | / best chain | / max(AR, best chain) | BASTION nodes | drafting | "
              "verify predicted / measured (ms) | off / AR | top-1 / chain |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['mode']} | {s['batch_size']} | {_f(s.get('ar_tok_s'))} | {_f(s.get('dflash_tok_s'))} | "
            f"{_f(s.get('best_chain_tok_s'))} ({s.get('best_chain', '-')}) | {_f(s.get('bastion_tok_s'))} | "
            f"{_f(s.get('vs_ar'), '{:.2f}x')} | {_f(s.get('vs_default_chain'), '{:.2f}x')} | "
            f"{_f(s.get('vs_best_chain'), '{:.2f}x')} | {_f(s.get('vs_max_ar_best_chain'), '{:.2f}x')} | "
            f"{_f(s.get('bastion_nodes_per_drafted_step'))} | "
            f"{_f(s.get('bastion_drafting_fraction'), '{:.0%}')} | "
            f"{_f(s.get('bastion_predicted_verify_ms'))} / {_f(s.get('bastion_measured_verify_ms'))} | "
            f"{_f(s.get('off_vs_ar'), '{:.2f}x')} | {_f(s.get('top1_vs_default_chain'), '{:.2f}x')} |")
    wins = [s for s in summary if s.get("window_vs_ar")]
    if wins:
        lines += ["", "Steady-state window (from the first request's end until the last request "
                  "joined: every slot busy, requests finishing and joining; a loaded server):", "",
                  "| mode | batch | AR | best chain | BASTION | BASTION / AR | / best chain | off / AR |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['mode']} | {s['batch_size']} | {_f(s.get('window_ar_tok_s'))} | "
                  f"{_f(s.get('window_best_chain_tok_s'))} ({s.get('window_best_chain', '-')}) | "
                  f"{_f(s.get('window_bastion_tok_s'))} | {_f(s.get('window_vs_ar'), '{:.2f}x')} | "
                  f"{_f(s.get('window_vs_best_chain'), '{:.2f}x')} | "
                  f"{_f(s.get('window_off_vs_ar'), '{:.2f}x')} |" for s in wins]
    costs = [(s["mode"], s["batch_size"], k, v) for s in summary for k, v in s.items()
             if k.startswith("step_cost_")]
    if costs:
        toks = {(s["mode"], s["batch_size"], k): v for s in summary for k, v in s.items()
                if k.startswith("tok_s_")}
        lines += ["", "| mode | batch | BASTION vs a chain of as many drafts | step time ratio | "
                  "tok/s ratio |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {b} | {k[len('step_cost_'):-len('_vs_chain')]} vs dflash-"
                  f"{k[:-len('_vs_chain')].rsplit('-', 1)[1]} | {v:.3f} | "
                  f"{_f(toks.get((m, b, 'tok_s_' + k[len('step_cost_'):])), '{:.3f}')} |"
                  for m, b, k, v in costs]
    lines += phase_table(results)
    return "\n".join(lines)


PHASES = ("verify_forward", "tree_attention", "node_processing", "target_tokens", "walk",
          "compaction", "logprobs", "draft", "tree_build", "budget", "build_step")


def phase_table(results: list[dict]) -> list[str]:
    """BASTION's own step breakdown (host wall ms per engine step, its phase
    timers): where a BASTION step's time goes, per run."""
    rows = [r for r in results if (r.get("tree") or {}).get("time_per_step")]
    if not rows:
        return []
    out = ["", "| mode | batch | method | " + " | ".join(PHASES)
           + " | step total (ms) | branch waves per step |",
           "|---|---|---|" + "---|" * (len(PHASES) + 2)]
    for r in rows:
        t = r["tree"]["time_per_step"]
        out.append(f"| {r['mode']} | {r['batch_size']} | {label(r['method'])} | "
                   + " | ".join(f"{t.get(p + '_ms', 0.0):.2f}" for p in PHASES)
                   + f" | {t.get('step_total_ms', 0.0):.2f} | {t.get('branch_waves', 0.0):.2f} |")
    return out


def write_outputs(results: list[dict], summary: list[dict], out: str, meta: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "outputs"} for r in results]
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "results": slim, "summary": summary}, f, indent=1)
    fields = ["mode", "method", "batch_size", "requests", "tokens", "seconds", "tokens_per_s",
              "mean_accepted_length", "mean_drafted_per_step", "window_tokens_per_s"]
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in slim:
            w.writerow(r)
    with open(out + ".md", "w") as f:
        f.write(f"{meta['pair']}, {meta['prompts']} prompts, {meta['runtime']}, {meta['date']}\n\n")
        f.write(markdown_tables(results, summary) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, ls in (("offline", "-"), ("server", ":")):
        for method in sorted({r["method"] for r in slim}):
            rows = sorted((r for r in slim if r["mode"] == mode and r["method"] == method),
                          key=lambda r: r["batch_size"])
            if rows:
                axes[0].plot([r["batch_size"] for r in rows], [r["tokens_per_s"] for r in rows],
                             ls, marker="o" if method == "bastion" else ".",
                             lw=2.5 if method == "bastion" else 1, label=f"{label(method)} ({mode})")
        rows = sorted((r for r in slim if r["mode"] == mode and r["method"] == "bastion"),
                      key=lambda r: r["batch_size"])
        if rows:
            frac = [(r.get("tree") or {}).get("drafting_fraction") or 0.0 for r in rows]
            axes[1].plot([r["batch_size"] for r in rows],
                         [r["mean_drafted_per_step"] * f for r, f in zip(rows, frac)], ls + "o",
                         label=f"nodes per request-step ({mode})")
            axes[1].plot([r["batch_size"] for r in rows], [r["mean_drafted_per_step"] for r in rows],
                         ls + "s", label=f"nodes per drafted request-step ({mode})")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("tokens / s")
    axes[0].legend(fontsize=6)
    axes[1].set_ylabel("BASTION tree size")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{meta['pair']}, {meta['prompts']} prompts, {meta['runtime_short']}")
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)


def _maybe_reexec_with_runtime(runtime: str) -> None:
    if runtime != "recommended" or os.environ.get("BASTION_BENCH_CHILD") == "1":
        return
    pre = recommended_preload()
    if pre is None:
        sys.exit("--runtime recommended needs libtcmalloc_minimal.so.4 (Debian libgoogle-perftools4) "
                 "and libiomp5.so (pip install intel-openmp); or pass --runtime default")
    env = dict(os.environ, LD_PRELOAD=pre, BASTION_BENCH_CHILD="1")
    sys.exit(subprocess.call([sys.executable] + sys.argv, env=env))


def _cpu_model() -> str:
    """The CPU's model name and the widest vector ISA torch dispatches to (AVX2 vs
    AVX512 changes the bf16 regime: without AVX512-BF16 a verify forward of n tokens
    costs about n decode steps, so speculation cannot pay)."""
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="scaled-0.6b", help="shipped | scaled-<shape> (default scaled-0.6b)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--server-batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--num-prompts", type=int, default=16,
                    help="timed requests per run (at least the batch size)")
    ap.add_argument("--requests-per-slot", type=int, default=3,
                    help="timed requests per run are at least this many times the batch size")
    ap.add_argument("--length-spread", type=float, default=0.5,
                    help="request i generates max_tokens x (1 +- spread) tokens, spread evenly "
                         "(the same for every method); 0: all max_tokens")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["offline", "server"], choices=["offline", "server"])
    ap.add_argument("--methods", nargs="+", default=ALL_METHODS)
    ap.add_argument("--server-methods", nargs="+", default=["ar", "dflash", "bastion"])
    ap.add_argument("--prompts", default="heldout", choices=["heldout", "humaneval", "tables"])
    ap.add_argument("--runtime", default="recommended", choices=["recommended", "default"])
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the methods this many times, alternating forward and reverse order "
                         "(2 = ABBA: cancels the machine's drift between methods); tokens/s is "
                         "over all rounds")
    ap.add_argument("--out", default=None, help="output prefix (default results/bench_<pair>_<prompts>)")
    args = ap.parse_args(argv)
    _maybe_reexec_with_runtime(args.runtime)

    target, drafter = resolve_pair(args.pair)
    depth = draft_depth(drafter)
    out = args.out or f"results/bench_{args.pair}_{args.prompts}"
    batches = {m: (args.batch_sizes if m == "offline" else args.server_batch_sizes) for m in args.modes}
    need = max(max(args.num_prompts, args.requests_per_slot * b) for bs in batches.values() for b in bs)
    pool = load_prompts(args.prompts, target, need + 2)
    warm, pool = pool[:2], pool[2:]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} ({_cpu_model()})",
        "cpu_count": os.cpu_count(), "pair": f"{args.pair} ({target})", "prompts": args.prompts,
        "max_tokens": args.max_tokens, "enforce_eager": args.enforce_eager,
        "runtime": runtime_description(), "runtime_short": args.runtime,
        "ld_preload": os.environ.get("LD_PRELOAD", ""), "rounds": args.rounds,
        "requests_per_slot": args.requests_per_slot, "length_spread": args.length_spread,
        "command": " ".join([sys.executable] + sys.argv),
        "adaptive_chain": "unavailable: vLLM 0.32's enable_adaptive_verification needs the V2 "
                          "model runner and FULL CUDA graphs (GPU only)",
    }
    print(f"{meta['pair']}\n{meta['runtime']}\n", flush=True)
    log_dir = os.path.join(os.path.dirname(os.path.abspath(out)) or ".", "logs")
    os.makedirs(log_dir, exist_ok=True)
    results = []
    def save():  # survives a later failure
        with open(out + ".partial.json", "w") as f:
            json.dump([{k: v for k, v in x.items() if k != "outputs"} for x in results], f)

    def batch_prompts(bsz):
        n = max(args.num_prompts, args.requests_per_slot * bsz)
        return [pool[i % len(pool)] for i in range(n)]

    for mode in args.modes:
        methods = args.methods if mode == "offline" else args.server_methods
        kw = dict(max_tokens=args.max_tokens, depth=depth, enforce_eager=args.enforce_eager,
                  warmup_prompts=warm, length_spread=args.length_spread)
        for rnd in range(args.rounds):
            for method in (methods if rnd % 2 == 0 else methods[::-1]):
                if mode == "offline":  # one engine per method, every batch size
                    print(f"[{mode}] {label(method)}, batch sizes {batches[mode]} ...", flush=True)
                    runs = run_method_batches(method, target, drafter,
                                              {b: batch_prompts(b) for b in batches[mode]}, **kw)
                else:
                    runs = []
                    for bsz in batches[mode]:
                        print(f"[{mode}] batch {bsz}: {label(method)} ...", flush=True)
                        runs.append(run_server(method, target, drafter, batch_prompts(bsz),
                                               log_dir=log_dir, batch_size=bsz, **kw))
                for r in runs:
                    r["mode"] = mode
                    r["round"] = rnd
                    results.append(r)
                    print(f"    batch {r['batch_size']}: {r['tokens_per_s']:.1f} tok/s, accepted length "
                          f"{r['mean_accepted_length']:.2f}", flush=True)
                save()
    results = merge_rounds(results)
    results.sort(key=lambda r: (args.modes.index(r["mode"]), r["batch_size"]))
    base = {(r["mode"], r["batch_size"]): r["outputs"] for r in results if r["method"] == "ar"}
    lossless = True
    for r in results:
        ref = base.get((r["mode"], r["batch_size"]))
        r["identical_to_ar"] = None if ref is None else r["outputs"] == ref
        lossless &= r["identical_to_ar"] in (None, True)
    summary = summarize(results)
    print("\n" + markdown_tables(results, summary))
    print(f"\nall methods token-identical to AR (lossless): {'yes' if lossless else 'NO'}")
    differ = [f"{r['method']} (batch {r['batch_size']})" for r in results if r["identical_to_ar"] is False]
    if differ:
        # a bf16 verify forward may break a near-tie differently from a
        # one-token decode step; vLLM's own chains show whether it is that
        print("  differ from AR: " + ", ".join(differ) + " (scripts/difftest.py tells near-ties "
              "from real mismatches)")
    write_outputs(results, summary, out, meta)
    print(f"wrote {out}.json, {out}.csv, {out}.md, {out}.png")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
