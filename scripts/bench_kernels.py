#!/usr/bin/env python
"""GPU benchmark of BASTION's verifier kernels (needs a CUDA GPU; H100/H200 intended).

1. Tree attention (`kernels/tree_attention.py`): the Triton kernel vs its
   torch reference vs vLLM's own paged attention (vllm_flash_attn's
   flash_attn_varlen_func, and the Triton unified_attention) computing a
   causal chain of the same token count (1 + n query rows per request over
   prefix + 1 + n keys), i.e. what verifying a chain of that length costs.
   bf16, Hq=32, Hkv=8, D=128, block size 16, tree sizes 16..512, contexts
   512..32k. The kernel is also checked against the reference (max abs
   error) wherever the reference runs, and a few launch configurations are
   swept (the default heuristic's is marked).
2. KV compaction (`kernels/kv_compaction.py`): one launch for all layers vs a
   torch gather/scatter per layer, as achieved bandwidth against the
   device's measured copy bandwidth (a large tensor copy).
3. CUDA-graph check: both kernels are captured in a CUDA graph with
   preallocated buffers, replayed with new per-step data, and compared with
   eager results.

    python scripts/bench_kernels.py --out results/kernels      # writes .json and .csv
    python scripts/bench_kernels.py --quick --out /tmp/k.json

Prints one table per section; --out PATH writes PATH.json and PATH.csv (the
suffix of PATH, if .json or .csv, is replaced).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda"  # every tensor of the benchmark lives here


def _fail(msg: str) -> None:
    print(f"bench_kernels.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _load_kernels():
    """vllm_bastion.kernels.* if installed, else the files next to this script."""
    try:
        ta = importlib.import_module("vllm_bastion.kernels.tree_attention")
        kvc = importlib.import_module("vllm_bastion.kernels.kv_compaction")
        return ta, kvc
    except ImportError:
        mods = []
        for name in ("tree_attention", "kv_compaction"):
            spec = importlib.util.spec_from_file_location(f"_bastion_{name}", ROOT / "kernels" / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            mods.append(mod)
        return tuple(mods)


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn in ms (triton.testing.do_bench: CUDA events, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def bench_slow_ms(fn, reps: int = 3) -> float:
    """For slow host-synchronizing functions (the torch reference)."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, counting read + write bytes."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    del a, b
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------
# tree attention
# ---------------------------------------------------------------------------


def random_tree_allowed(n: int, gen: torch.Generator) -> torch.Tensor:
    """[1+n, 1+n] ancestor-or-self mask of a random best-first tree."""
    par = [-1]
    for i in range(1, n + 1):
        # bushy near the root, chains deeper: parent among the last 8 columns
        lo = max(0, i - 8)
        par.append(int(torch.randint(lo, i, (1,), generator=gen)))
    allowed = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    for i in range(n + 1):
        j = i
        while j >= 0:
            allowed[i, j] = True
            j = par[j]
    return allowed


class TreeCase:
    def __init__(self, ta, R, n, c, hq, hkv, d, dtype, page, seed=0):
        dev = DEV
        gen = torch.Generator().manual_seed(seed)
        self.R, self.n, self.c, self.hq, self.hkv, self.d = R, n, c, hq, hkv, d
        self.T = R * (n + 1)
        bpr = math.ceil((c + n + 1) / page)
        self.num_blocks = R * bpr + 1
        perm = torch.randperm(self.num_blocks, generator=gen)
        self.block_table = perm[: R * bpr].view(R, bpr).to(torch.int32).to(dev)
        torch.manual_seed(seed)
        self.kv = torch.randn(2, self.num_blocks, page, hkv, d, dtype=dtype, device=dev)
        self.k_cache, self.v_cache = self.kv[0], self.kv[1]
        self.q = torch.randn(self.T, hq, d, dtype=dtype, device=dev)
        self.k = torch.randn(self.T, hkv, d, dtype=dtype, device=dev)
        self.v = torch.randn(self.T, hkv, d, dtype=dtype, device=dev)
        allowed = torch.stack([random_tree_allowed(n, gen) for _ in range(R)])
        self.anc_bits = ta.pack_ancestor_bits(allowed).to(dev)
        i32 = dict(dtype=torch.int32, device=dev)
        self.tree_req = torch.arange(R, **i32)
        self.row_start = torch.arange(R, **i32) * (n + 1)
        self.num_nodes = torch.full((R,), n, **i32)
        self.prefix_len = torch.full((R,), c, **i32)
        self.scale = d**-0.5
        # the causal chain of the same token count, for vLLM's kernels
        self.cu_q = torch.arange(R + 1, **i32) * (n + 1)
        self.seqused = torch.full((R,), c + n + 1, **i32)
        self.visible_tree = float(allowed.sum(-1)[:, 1:].float().mean())  # mean visible tree cols / node

    def args(self):
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.block_table, self.tree_req,
                self.row_start, self.num_nodes, self.prefix_len, self.anc_bits, self.scale)

    def flops_tree(self):
        # 2 matmuls x 2 flops x Hq x D per (node, visible key)
        return 4 * self.hq * self.d * self.R * self.n * (self.c + self.visible_tree)

    def flops_chain(self):
        m = self.n + 1
        return 4 * self.hq * self.d * self.R * (m * self.c + m * (m + 1) / 2)

    def prefix_bytes(self):
        return 2 * self.R * self.c * self.hkv * self.d * self.kv.element_size()


def vllm_baselines():
    """{name: fn(case, out)} for the vLLM kernels that import here."""
    out = {}
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

        cap = torch.cuda.get_device_capability()
        ver = 3 if cap[0] == 9 and is_fa_version_supported(3) else 2

        def fa(cs, o):
            flash_attn_varlen_func(
                cs.q, cs.k_cache, cs.v_cache, max_seqlen_q=cs.n + 1, cu_seqlens_q=cs.cu_q,
                max_seqlen_k=cs.c + cs.n + 1, seqused_k=cs.seqused, softmax_scale=cs.scale,
                causal=True, block_table=cs.block_table, out=o, fa_version=ver,
            )

        out[f"vllm_fa{ver}"] = fa
    except Exception as e:  # noqa: BLE001
        print(f"[bench] vllm_flash_attn unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        def ua(cs, o):
            unified_attention(
                q=cs.q, k=cs.k_cache, v=cs.v_cache, out=o, cu_seqlens_q=cs.cu_q, max_seqlen_q=cs.n + 1,
                seqused_k=cs.seqused, max_seqlen_k=cs.c + cs.n + 1, softmax_scale=cs.scale, causal=True,
                window_size=(-1, -1), block_table=cs.block_table, softcap=0, q_descale=None,
                k_descale=None, v_descale=None,
            )

        out["vllm_triton_unified"] = ua
    except Exception as e:  # noqa: BLE001
        print(f"[bench] vllm triton unified_attention unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def tree_configs(quick: bool):
    """Launch configurations swept for the kernel (None = the heuristic)."""
    if quick:
        return [None]
    return [
        None,
        dict(block_m=64, tile_n=64, num_warps=4, num_stages=2),
        dict(block_m=64, tile_n=32, num_warps=4, num_stages=3),
        dict(block_m=128, tile_n=32, num_warps=8, num_stages=2),
        dict(block_m=128, tile_n=64, num_warps=8, num_stages=2),
    ]


def bench_tree(ta, args, rows):
    base = vllm_baselines()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for R in args.batch:
        for c in args.contexts:
            for n in args.trees:
                cs = TreeCase(ta, R, n, c, args.hq, args.hkv, args.head_dim, torch.bfloat16, args.page)
                row = dict(section="tree_attention", R=R, nodes=n, context=c, hq=args.hq, hkv=args.hkv,
                           d=args.head_dim)
                # reference (and correctness) where it fits
                ref_bytes = 4 * args.hq * n * (c + n + 1) * 4  # scores + probs + exp, fp32
                out_ref = None
                if not args.skip_reference and ref_bytes < args.ref_max_gb * 2**30:
                    out_ref = torch.full_like(cs.q, float("nan"))
                    row["reference_ms"] = bench_slow_ms(
                        lambda: ta.tree_attention_reference(*cs.args(), out_ref), reps=2 if R * n * c > 2**22 else 3
                    )
                # kernel: heuristic, heuristic with prefix splits, sweep
                splits = ta.suggest_num_splits(R, n, args.hq, args.hkv, c, num_sms=num_sms)
                best = None
                for cfg in tree_configs(args.quick):
                    for s in sorted({1, splits}):
                        kw = dict(cfg or {}, num_splits=s)
                        if s > 1:
                            kw["workspace"] = ta.tree_attention_workspace(s, R, n, args.hq, args.head_dim, DEV)
                        out = torch.full_like(cs.q, float("nan"))
                        try:
                            ta.tree_attention(*cs.args(), out, **kw)
                            ms = bench_ms(lambda: ta.tree_attention(*cs.args(), out, **kw))
                        except Exception as e:  # noqa: BLE001 (e.g. out of shared memory)
                            print(f"[bench] config {cfg} splits={s} failed: {type(e).__name__}: {e}", file=sys.stderr)
                            continue
                        if cfg is None and s == splits:
                            row["kernel_ms"] = ms
                            row["kernel_splits"] = s
                            if out_ref is not None:
                                rws = torch.ones(cs.T, dtype=torch.bool, device=DEV)
                                rws[cs.row_start.long()] = False
                                row["max_abs_err"] = float((out[rws].float() - out_ref[rws].float()).abs().max())
                                row["untouched_ok"] = bool(torch.isnan(out[~rws]).all())
                        if best is None or ms < best[0]:
                            best = (ms, cfg, s)
                if best is not None:
                    row["kernel_best_ms"] = best[0]
                    row["kernel_best_cfg"] = f"{best[1] or 'default'} splits={best[2]}"
                for name, fn in base.items():
                    o = torch.empty_like(cs.q)
                    try:
                        fn(cs, o)
                        row[f"{name}_ms"] = bench_ms(lambda: fn(cs, o))
                    except Exception as e:  # noqa: BLE001
                        print(f"[bench] {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                if "kernel_ms" in row:
                    row["kernel_tflops"] = cs.flops_tree() / (row["kernel_ms"] * 1e-3) / 1e12
                    row["kernel_prefix_gbs"] = cs.prefix_bytes() / (row["kernel_ms"] * 1e-3) / 1e9
                for name in base:
                    if f"{name}_ms" in row and "kernel_ms" in row:
                        row[f"kernel_over_{name}"] = row["kernel_ms"] / row[f"{name}_ms"]
                rows.append(row)
                _print_row(row)
                del cs
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# KV compaction
# ---------------------------------------------------------------------------


def compaction_pairs(n_req: int, per_req: int, page: int, num_blocks: int, gen: torch.Generator):
    """Realistic moves: per request, a tree at slots p0+1.. of its own blocks
    and an accepted path whose j-th node moves from p0+c_j to p0+j."""
    blocks = torch.randperm(num_blocks, generator=gen).tolist()
    need = math.ceil((per_req * 2 + 2) / page)
    src, dst = [], []
    for _ in range(n_req):
        bl = [blocks.pop() for _ in range(need)]
        slots = [b * page + o for b in bl for o in range(page)]
        cols = sorted(torch.randperm(2 * per_req, generator=gen)[:per_req].add(1).tolist())
        for j, cj in enumerate(cols, 1):
            if cj != j:
                src.append(slots[cj])
                dst.append(slots[j])
    return torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)


def torch_compaction(caches, src, dst):
    """Baseline: gather then scatter per cache tensor (2 kernels each)."""
    for pair in caches:
        for cache in pair:
            flat = cache.view(-1, *cache.shape[2:])
            flat[dst] = flat[src]


def bench_compaction(kvc, args, rows, copy_gbs):
    L, hkv, d, page = args.layers, args.hkv, args.head_dim, args.page
    dtype = torch.bfloat16
    per_req = 8
    num_blocks = (max(args.pairs) // per_req + 1) * math.ceil((2 * per_req + 2) / page) + 64
    caches = []
    for _ in range(L):
        kv = torch.randn(2, num_blocks, page, hkv, d, dtype=dtype, device=DEV)
        caches.append((kv[0], kv[1]))
    gen = torch.Generator().manual_seed(0)
    table = kvc.make_kv_pointer_table(caches)
    row_bytes = hkv * d * torch.finfo(dtype).bits // 8
    for P in args.pairs:
        src, dst = compaction_pairs(max(1, P // per_req), min(P, per_req), page, num_blocks, gen)
        src, dst = src.to(DEV), dst.to(DEV)
        P_eff = src.numel()
        # correctness on a copy of layer 0..1
        small = [(k.clone(), v.clone()) for k, v in caches[:2]]
        ref = [(k.clone(), v.clone()) for k, v in small]
        kvc.compact_kv_reference(ref, src, dst)
        kvc.compact_kv(small, src, dst)
        ok = all(torch.equal(a, b) for pa, pb in zip(small, ref) for a, b in zip(pa, pb))
        del small, ref
        moved = 2 * (2 * L) * P_eff * row_bytes  # read + write
        ms_k = bench_ms(lambda: kvc.compact_kv(caches, src, dst, table=table))
        ms_t = bench_ms(lambda: torch_compaction(caches, src, dst))
        row = dict(section="kv_compaction", layers=L, pairs=P_eff, hkv=hkv, d=d, bytes_moved=moved, correct=ok,
                   kernel_ms=ms_k, torch_ms=ms_t,
                   kernel_gbs=moved / (ms_k * 1e-3) / 1e9, torch_gbs=moved / (ms_t * 1e-3) / 1e9,
                   copy_gbs=copy_gbs)
        row["kernel_pct_of_copy"] = 100 * row["kernel_gbs"] / copy_gbs
        row["torch_pct_of_copy"] = 100 * row["torch_gbs"] / copy_gbs
        row["speedup_vs_torch"] = ms_t / ms_k
        rows.append(row)
        _print_row(row)
    del caches
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------


def check_cuda_graphs(ta, kvc, args, rows):
    """Capture both kernels with preallocated buffers sized by a max, replay
    with different per-step data, compare with eager launches."""
    R_max, n_max, c_max = 4, 64, 1000
    hq, hkv, d, page = args.hq, args.hkv, args.head_dim, args.page
    bpr = math.ceil((c_max + n_max + 1) / page)
    nb = R_max * bpr + 1
    dev = DEV
    gen = torch.Generator().manual_seed(1)
    T = R_max * (n_max + 1) + 7
    kv = torch.randn(2, nb, page, hkv, d, dtype=torch.bfloat16, device=dev)
    q = torch.randn(T, hq, d, dtype=torch.bfloat16, device=dev)
    k = torch.randn(T, hkv, d, dtype=torch.bfloat16, device=dev)
    v = torch.randn(T, hkv, d, dtype=torch.bfloat16, device=dev)
    bt = torch.randperm(nb, generator=gen)[: R_max * bpr].view(R_max, bpr).int().to(dev)
    i32 = dict(dtype=torch.int32, device=dev)
    tree_req, row_start = torch.zeros(R_max, **i32), torch.zeros(R_max, **i32)
    num_nodes, prefix_len = torch.zeros(R_max, **i32), torch.zeros(R_max, **i32)
    anc = torch.zeros(R_max, n_max + 1, (n_max + 32) // 32, **i32)
    splits = 2
    ws = ta.tree_attention_workspace(splits, R_max, n_max, hq, d, dev)
    out = torch.zeros(T, hq, d, dtype=torch.bfloat16, device=dev)
    src = torch.full((64,), -1, dtype=torch.int64, device=dev)
    dst = torch.full((64,), -1, dtype=torch.int64, device=dev)
    caches = [(kv2[0], kv2[1]) for kv2 in [torch.randn(2, nb, page, hkv, d, dtype=torch.bfloat16, device=dev)
                                           for _ in range(4)]]
    table = kvc.make_kv_pointer_table(caches)

    def step():
        ta.tree_attention(q, k, v, kv[0], kv[1], bt, tree_req, row_start, num_nodes, prefix_len, anc,
                          d**-0.5, out, max_nodes=n_max, num_splits=splits, workspace=ws)
        kvc.compact_kv(caches, src, dst, table=table)

    def fill(seed):
        g = torch.Generator().manual_seed(seed)
        R = int(torch.randint(1, R_max + 1, (1,), generator=g))
        ns = [int(torch.randint(0, n_max + 1, (1,), generator=g)) for _ in range(R)]
        cs = [int(torch.randint(0, c_max + 1, (1,), generator=g)) for _ in range(R)]
        starts, pos = [], 3
        for nn in ns:
            starts.append(pos)
            pos += nn + 1 + 1  # one non-tree row between requests
        a = torch.zeros(R_max, n_max + 1, n_max + 1, dtype=torch.bool)
        for r, nn in enumerate(ns):
            a[r, : nn + 1, : nn + 1] = random_tree_allowed(nn, g)
        pad = R_max - R
        tree_req.copy_(torch.tensor(list(range(R)) + [0] * pad, dtype=torch.int32))
        row_start.copy_(torch.tensor(starts + [0] * pad, dtype=torch.int32))
        num_nodes.copy_(torch.tensor(ns + [0] * pad, dtype=torch.int32))
        prefix_len.copy_(torch.tensor(cs + [0] * pad, dtype=torch.int32))
        anc.copy_(ta.pack_ancestor_bits(a))
        s, d_ = compaction_pairs(4, 6, page, nb, g)
        s, d_ = s[:64], d_[:64]
        src.fill_(-1), dst.fill_(-1)
        src[: s.numel()].copy_(s)
        dst[: d_.numel()].copy_(d_)

    fill(0)
    step()  # warm up / compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    snap = [(a.clone(), b.clone()) for a, b in caches]
    with torch.cuda.graph(g):
        step()
    for a, (sa, sb) in zip(caches, snap):  # capture does not run the kernels, but be safe
        a[0].copy_(sa), a[1].copy_(sb)
    ok = True
    for seed in (1, 2, 3):
        fill(seed)
        base = [(a.clone(), b.clone()) for a, b in caches]
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        got_out = out.clone()
        got_caches = [(a.clone(), b.clone()) for a, b in caches]
        # eager on the same inputs
        for a, (sa, sb) in zip(caches, base):
            a[0].copy_(sa), a[1].copy_(sb)
        out.fill_(float("nan"))
        ref = out.clone()
        ta.tree_attention_reference(q, k, v, kv[0], kv[1], bt, tree_req, row_start, num_nodes, prefix_len,
                                    anc, d**-0.5, ref, max_nodes=n_max)
        kvc.compact_kv_reference(caches, src, dst)
        same_nan = torch.equal(torch.isnan(got_out), torch.isnan(ref))
        err = float((torch.nan_to_num(got_out.float()) - torch.nan_to_num(ref.float())).abs().max())
        same_cache = all(torch.equal(x, y) for p1, p2 in zip(got_caches, caches) for x, y in zip(p1, p2))
        ok &= same_nan and err < 3e-2 and same_cache
        row = dict(section="cuda_graph", seed=seed, nan_pattern_ok=same_nan, max_abs_err=err,
                   compaction_ok=same_cache)
        rows.append(row)
        _print_row(row)
    return ok


# ---------------------------------------------------------------------------


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_printed_headers: set = set()


def _print_row(row):
    keys = list(row.keys())
    sec = row.get("section")
    key = (sec, tuple(keys))
    if key not in _printed_headers:
        _printed_headers.add(key)
        print()
        print(" | ".join(keys))
        print("-" * min(200, 12 * len(keys)))
    print(" | ".join(_fmt(row[k]) for k in keys), flush=True)


def _write(rows, out: str, meta):
    p = Path(out)
    stem = p.with_suffix("") if p.suffix in (".json", ".csv") else p
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(f"{stem}.csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join('"' + str(r[k]).replace('"', "'") + '"' if k in r else "" for k in keys) + "\n")
    print(f"\nwrote {stem}.json and {stem}.csv")


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output path (PATH.json and PATH.csv are written)")
    ap.add_argument("--trees", type=_ints, default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--contexts", type=_ints, default=[512, 2048, 8192, 32768])
    ap.add_argument("--batch", type=_ints, default=[1, 8], help="tree requests per step")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16, help="KV cache block size")
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--pairs", type=_ints, default=[8, 64, 256, 1024, 4096])
    ap.add_argument("--sections", default="tree,compaction,graph")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--ref-max-gb", type=float, default=8.0, help="skip the torch reference above this")
    ap.add_argument("--quick", action="store_true", help="small sweep: trees 16,128; contexts 512,8192; batch 1")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        _fail("TRITON_INTERPRET is set: unset it to benchmark the compiled kernels")
    if not torch.cuda.is_available():
        _fail("no CUDA device is available (torch.cuda.is_available() is False); this benchmark needs a GPU")
    try:
        import triton  # noqa: F401
    except ImportError:
        _fail("Triton is not installed")
    if args.quick:
        args.trees, args.contexts, args.batch = [16, 128], [512, 8192], [1]
        args.pairs = [64, 1024]
        args.layers = min(args.layers, 32)

    ta, kvc = _load_kernels()
    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth_gbs()
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=__import__("triton").__version__, copy_gbs=copy_gbs, argv=sys.argv[1:])
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        pass
    print(f"device: {props.name} ({props.multi_processor_count} SMs), measured copy bandwidth {copy_gbs:.0f} GB/s")
    rows: list[dict] = []
    sections = set(args.sections.split(","))
    graph_ok = None
    try:
        if "graph" in sections:
            graph_ok = check_cuda_graphs(ta, kvc, args, rows)
            print(f"\nCUDA graph capture/replay: {'OK' if graph_ok else 'MISMATCH'}")
        if "tree" in sections:
            bench_tree(ta, args, rows)
        if "compaction" in sections:
            bench_compaction(kvc, args, rows, copy_gbs)
    finally:
        meta["cuda_graph_ok"] = graph_ok
        _write(rows, args.out, meta)
    if graph_ok is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
