"""Triton kernels vs their torch references (tree attention, KV compaction).

On a machine without a GPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1, numpy-backed). No conftest is needed: this module sets
the variable itself while it imports Triton and the kernels and while its
own tests run, and restores it otherwise so it never leaks into other test
modules (e.g. vLLM engines started by the e2e tests). Triton must be first
imported with the variable set; if another test module imported it earlier
(by importing vLLM), the kernel tests are run instead by
test_kernels_in_fresh_process in a subprocess. With a GPU the same tests run
the compiled kernels on CUDA. The torch references are also
checked against a naive per-node implementation, and the package must
import and run its references without Triton.

Shapes are kept small: the interpreter is slow (the whole file runs in
about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import random
import subprocess
import sys
import zlib

import pytest
import torch  # (does not import Triton)

PAGE = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ENV = "TRITON_INTERPRET"


@contextlib.contextmanager
def _interpret_env():
    """TRITON_INTERPRET=1 inside the block (CPU only), restored afterwards so
    it does not leak into other test modules or the subprocesses they start."""
    if DEVICE == "cuda" or os.environ.get(_ENV) == "1":
        yield
        return
    old = os.environ.get(_ENV)
    os.environ[_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = old


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def _load_kernel_modules():
    """The kernel modules, with interpreted kernels when there is no GPU.

    Triton reads TRITON_INTERPRET when a kernel is *defined*, and defines
    triton.language's own helpers when it is first imported. So without a
    GPU: if Triton is not imported yet, import it and the kernels with the
    variable set; if it was imported with it but the kernel modules were
    not, load private copies of them; if it was imported without it (another
    test module imported vLLM first, say), nothing can be interpreted in this
    process and the kernel tests run in a subprocess instead
    (test_kernels_in_fresh_process). The package re-exports a function named
    tree_attention, so submodules are imported by their full names.
    Returns (tree_attention module, kv_compaction module, reason or None)."""
    with _interpret_env() if "triton" not in sys.modules else contextlib.nullcontext():
        ta_ = importlib.import_module("vllm_bastion.kernels.tree_attention")
        kvc_ = importlib.import_module("vllm_bastion.kernels.kv_compaction")
    if not ta_.HAS_TRITON:
        return ta_, kvc_, "Triton is not installed"
    if DEVICE == "cuda" or (_interpreted(ta_._tree_attn_fwd) and _interpreted(kvc_._compact_kv_kernel)):
        return ta_, kvc_, None
    import triton.language as tl

    if not _interpreted(tl.zeros):
        return ta_, kvc_, (
            "no GPU, and Triton was imported in this process before TRITON_INTERPRET=1 was set, "
            "so kernels cannot be interpreted here; test_kernels_in_fresh_process runs them in a "
            "subprocess"
        )
    mods = []
    with _interpret_env():
        for m in (ta_, kvc_):
            spec = importlib.util.spec_from_file_location("_interp_" + m.__name__.replace(".", "_"), m.__file__)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            mods.append(mod)
    ta_, kvc_ = mods
    if not (_interpreted(ta_._tree_attn_fwd) and _interpreted(kvc_._compact_kv_kernel)):
        return ta_, kvc_, "could not load the kernels under TRITON_INTERPRET=1"
    return ta_, kvc_, None


ta, kvc, _SKIP = _load_kernel_modules()
needs_kernels = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@pytest.fixture(autouse=True)
def _interpreter_while_testing():
    # Triton also consults the variable while interpreting (constexpr
    # functions), so keep it set during this module's tests only.
    with _interpret_env() if _SKIP is None else contextlib.nullcontext():
        yield


@pytest.mark.skipif(
    _SKIP is None or not ta.HAS_TRITON or os.environ.get("BASTION_KERNEL_TESTS_CHILD") == "1",
    reason="the kernel tests run in this process",
)
def test_kernels_in_fresh_process():
    """Triton was imported here without the interpreter: run this file's
    kernel tests in a fresh interpreter process that sets it first."""
    env = dict(os.environ, TRITON_INTERPRET="1", BASTION_KERNEL_TESTS_CHILD="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
         "not test_kernels_in_fresh_process", __file__],
        capture_output=True, text=True, env=env, timeout=600, cwd=os.path.dirname(__file__),
    )
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    last = tail.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "failed" not in last, tail


# ---------------------------------------------------------------------------
# batch construction
# ---------------------------------------------------------------------------


def random_parents(n: int, rng: random.Random) -> list[int]:
    """A random valid best-first parent array of 1 + n columns (root = -1)."""
    par = [-1]
    for i in range(1, n + 1):
        # mix of chains and bushy levels
        par.append(i - 1 if rng.random() < 0.3 else rng.randrange(0, i))
    return par


class Batch:
    pass


def make_batch(
    segments,
    *,
    hkv: int,
    g: int,
    d: int,
    dtype,
    seed: int,
    cache_dtype=None,
    hnd_cache: bool = False,
    max_nodes: int | None = None,
):
    """segments: ("prefill", rows, ctx) | ("decode", ctx) | ("tree", n, prefix_len).

    Returns a Batch with every tensor `tree_attention` takes, q/k/v as views
    of one fused qkv buffer (non-contiguous), the cache as kv_cache[0]/[1]
    (optionally a permuted [blocks, Hkv, page, D] storage) and a shuffled
    block table."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * g
    cache_dtype = cache_dtype or dtype
    rows, reqs = 0, []
    for seg in segments:
        if seg[0] == "prefill":
            reqs.append(dict(kind="prefill", start=rows, rows=seg[1], ctx=seg[2]))
            rows += seg[1]
        elif seg[0] == "decode":
            reqs.append(dict(kind="decode", start=rows, rows=1, ctx=seg[1]))
            rows += 1
        else:
            n, c = seg[1], seg[2]
            reqs.append(dict(kind="tree", start=rows, rows=1 + n, ctx=c, n=n, par=random_parents(n, rng)))
            rows += 1 + n
    T = rows
    # block table: requests in a shuffled order, blocks drawn from a shuffled pool
    order = list(range(len(reqs)))
    rng.shuffle(order)
    need = [math.ceil((rq["ctx"] + rq["rows"]) / PAGE) + 1 for rq in reqs]
    max_blocks = max(need)
    num_blocks = sum(need) + 3
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    block_table = torch.zeros(len(reqs), max_blocks + 2, dtype=torch.int32)
    for bt_row, ri in enumerate(order):
        reqs[ri]["bt_row"] = bt_row
        for b in range(need[ri]):
            block_table[bt_row, b] = pool.pop()
    # cache
    if hnd_cache:
        phys = torch.randn(2, num_blocks, hkv, PAGE, d, generator=gen)
        kv = phys.permute(0, 1, 3, 2, 4)  # logical [2, nb, page, Hkv, D]
    else:
        kv = torch.randn(2, num_blocks, PAGE, hkv, d, generator=gen)
    if cache_dtype in ta.FP8_DTYPES:
        kv = (kv * 0.5).to(cache_dtype)  # cache value = x * 0.5, dequant with scale
    else:
        kv = kv.to(cache_dtype)
    qkv = torch.randn(T, (hq + 2 * hkv) * d + 8, generator=gen).to(dtype)
    trees = [rq for rq in reqs if rq["kind"] == "tree"]
    rng.shuffle(trees)  # tree order need not follow batch order
    W = (max(rq["n"] for rq in trees) if trees else 0) + 1 if max_nodes is None else max_nodes + 1
    allowed = torch.zeros(len(trees), W, W, dtype=torch.bool)
    for i, rq in enumerate(trees):
        n = rq["n"]
        allowed[i, : n + 1, : n + 1] = ta.ancestor_mask(torch.tensor(rq["par"]))
    dev = torch.device(DEVICE)
    qkv, kv = qkv.to(dev), kv.to(dev)  # .to keeps the strides
    b = Batch()
    b.T, b.hq, b.hkv, b.d, b.reqs, b.trees = T, hq, hkv, d, reqs, trees
    b.q = qkv[:, : hq * d].view(T, hq, d)
    b.k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
    b.v = qkv[:, (hq + hkv) * d : (hq + 2 * hkv) * d].view(T, hkv, d)
    b.kv = kv
    b.k_cache, b.v_cache = kv[0], kv[1]
    b.block_table = block_table.to(dev)
    b.tree_req = torch.tensor([rq["bt_row"] for rq in trees], dtype=torch.int32, device=dev)
    b.row_start = torch.tensor([rq["start"] for rq in trees], dtype=torch.int32, device=dev)
    b.num_nodes = torch.tensor([rq["n"] for rq in trees], dtype=torch.int32, device=dev)
    b.prefix_len = torch.tensor([rq["ctx"] for rq in trees], dtype=torch.int32, device=dev)
    b.allowed = allowed
    b.anc_bits = ta.pack_ancestor_bits(allowed).to(dev)
    b.scale = d**-0.5
    return b


def node_rows(b) -> torch.Tensor:
    m = torch.zeros(b.T, dtype=torch.bool)
    for rq in b.trees:
        m[rq["start"] + 1 : rq["start"] + 1 + rq["n"]] = True
    return m


KERNEL_ONLY = ("num_splits", "workspace", "block_m", "tile_n", "num_warps", "num_stages")


def call(fn, b, out, **kw):
    if fn is ta.tree_attention_reference:
        kw = {k_: v_ for k_, v_ in kw.items() if k_ not in KERNEL_ONLY}
    return fn(
        b.q, b.k, b.v, b.k_cache, b.v_cache, b.block_table, b.tree_req, b.row_start,
        b.num_nodes, b.prefix_len, b.anc_bits, b.scale, out, **kw,
    )


def poisoned_out(b, dtype):
    # a [T, Hq*D] buffer viewed as [T, Hq, D], like the backend's output
    return torch.full((b.T, b.hq * b.d), float("nan"), dtype=dtype, device=b.q.device).view(b.T, b.hq, b.d)


# ---------------------------------------------------------------------------
# ancestor bits
# ---------------------------------------------------------------------------


def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(0)
    for W in (1, 5, 31, 32, 33, 64, 70):
        a = torch.rand(3, W, W, generator=g) < 0.4
        bits = ta.pack_ancestor_bits(a)
        assert bits.dtype == torch.int32 and bits.shape == (3, W, math.ceil(W / 32))
        assert torch.equal(ta.unpack_ancestor_bits(bits, W), a)
        # bit j of word j // 32
        i, j = W - 1, W - 1
        one = torch.zeros(1, W, W, dtype=torch.bool)
        one[0, i, j] = True
        word = ta.pack_ancestor_bits(one)[0, i, j // 32].item() & 0xFFFFFFFF
        assert word == 1 << (j % 32)
    assert ta.pack_ancestor_bits(torch.ones(2, 2, dtype=torch.bool)).shape == (2, 1)


def test_ancestor_mask():
    par = torch.tensor([-1, 0, 0, 1, 2, 3])
    m = ta.ancestor_mask(par)
    assert m[5].nonzero().flatten().tolist() == [0, 1, 3, 5]
    assert m[4].nonzero().flatten().tolist() == [0, 2, 4]
    assert not m[1, 2] and not m[2, 1]


# ---------------------------------------------------------------------------
# reference vs a naive per-node implementation
# ---------------------------------------------------------------------------


def naive_tree_attention(b, out):
    """Per node, per head: gather the prefix token by token and walk the
    parent chain; float64 softmax."""
    g = b.hq // b.hkv
    for rq in b.trees:
        rs, c, par = rq["start"], rq["ctx"], rq["par"]
        bt = b.block_table[rq["bt_row"]]
        for i in range(1, rq["n"] + 1):
            keys, vals = [], []
            for p in range(c):
                blk, off = int(bt[p // PAGE]), p % PAGE
                keys.append(b.k_cache[blk, off].double())
                vals.append(b.v_cache[blk, off].double())
            j = i
            chain = []
            while j >= 0:
                chain.append(j)
                j = par[j]
            for j in sorted(chain):
                keys.append(b.k[rs + j].double())
                vals.append(b.v[rs + j].double())
            K = torch.stack(keys)  # [m, Hkv, D]
            V = torch.stack(vals)
            for h in range(b.hq):
                qh = b.q[rs + i, h].double()
                s = (K[:, h // g] @ qh) * b.scale
                p = torch.softmax(s, 0)
                out[rs + i, h] = (p[:, None] * V[:, h // g]).sum(0).to(out.dtype)
    return out


@pytest.mark.parametrize("g,d", [(1, 32), (2, 64), (4, 32)])
def test_reference_matches_naive(g, d):
    segs = [("prefill", 5, 20), ("tree", 7, 0), ("decode", 40), ("tree", 0, 9),
            ("tree", 12, 37), ("prefill", 3, 0), ("tree", 1, 16)]
    b = make_batch(segs, hkv=2, g=g, d=d, dtype=torch.float32, seed=10 + g)
    out_ref = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32))
    out_naive = naive_tree_attention(b, poisoned_out(b, torch.float32))
    rows = node_rows(b).to(out_ref.device)
    torch.testing.assert_close(out_ref[rows], out_naive[rows], atol=1e-5, rtol=1e-5)
    assert torch.isnan(out_ref[~rows]).all()
    assert torch.isfinite(out_ref[rows]).all()


def test_reference_ignores_bits_above_diagonal_and_empty_rows():
    b = make_batch([("tree", 4, 0), ("tree", 3, 5)], hkv=1, g=2, d=32, dtype=torch.float32, seed=3)
    ref = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32))
    noisy = b.allowed | torch.ones_like(b.allowed).triu(1)  # future columns: ignored
    b.anc_bits = ta.pack_ancestor_bits(noisy).to(b.q.device)
    ref2 = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32))
    torch.testing.assert_close(ref, ref2, equal_nan=True)
    # a row that sees nothing -> zeros
    b.anc_bits = ta.pack_ancestor_bits(torch.zeros_like(b.allowed)).to(b.q.device)
    ref3 = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32))
    r0 = [rq for rq in b.trees if rq["ctx"] == 0][0]
    assert (ref3[r0["start"] + 1 : r0["start"] + 5] == 0).all()
    if _SKIP is None:  # the kernel agrees on both
        for bits in (noisy, torch.zeros_like(b.allowed)):
            b.anc_bits = ta.pack_ancestor_bits(bits).to(b.q.device)
            r = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32))
            o = call(ta.tree_attention, b, poisoned_out(b, torch.float32))
            torch.testing.assert_close(o, r, atol=2e-4, rtol=2e-4, equal_nan=True)


# ---------------------------------------------------------------------------
# tree attention kernel vs reference
# ---------------------------------------------------------------------------

MIXED = [("prefill", 6, 0), ("tree", 9, 37), ("decode", 21), ("tree", 0, 16),
         ("tree", 21, 0), ("prefill", 4, 30), ("tree", 3, 50), ("decode", 3)]
SMALL = [("decode", 5), ("tree", 5, 18), ("prefill", 3, 0), ("tree", 11, 0), ("tree", 0, 4)]

LARGE = [("tree", 70, 130), ("prefill", 9, 40), ("tree", 33, 67), ("decode", 100), ("tree", 0, 0)]

CASES = [
    # id, segments, hkv, g, d, dtype, make_batch kwargs, kernel kwargs
    ("fp32-g1-d32", MIXED, 2, 1, 32, torch.float32, {}, {}),
    ("fp32-g1-d32-small-tiles", MIXED, 2, 1, 32, torch.float32, {}, dict(block_m=16, tile_n=16)),
    ("fp32-g2-d64-hnd-split3", MIXED, 1, 2, 64, torch.float32, dict(hnd_cache=True), dict(num_splits=3)),
    ("fp32-g4-d32-wide", [("tree", 40, 33), ("decode", 7), ("tree", 2, 3)], 1, 4, 32, torch.float32,
     dict(max_nodes=48), dict(block_m=16, tile_n=16)),
    ("fp32-g3-d32", SMALL, 1, 3, 32, torch.float32, {}, {}),
    ("bf16-g4-d64", MIXED, 1, 4, 64, torch.bfloat16, {}, {}),
    ("bf16-g2-d32-split2", SMALL, 2, 2, 32, torch.bfloat16, {}, dict(num_splits=2)),
    ("bf16-g2-d64-large-split4", LARGE, 2, 2, 64, torch.bfloat16, {}, dict(num_splits=4)),
    ("bf16-g1-d128", SMALL, 1, 1, 128, torch.bfloat16, {}, {}),
    ("fp16-g2-d64", SMALL, 1, 2, 64, torch.float16, {}, {}),
    ("fp32-fp8cache-g2-d32", SMALL, 1, 2, 32, torch.float32, dict(cache_dtype="fp8"), dict(fp8=True)),
    ("bf16-fp8cache-g4-d64", MIXED, 1, 4, 64, torch.bfloat16, dict(cache_dtype="fp8", hnd_cache=True),
     dict(fp8=True, num_splits=2)),
]


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tree_attention_kernel(case):
    _, segs, hkv, g, d, dtype, mk, kw = case
    mk = dict(mk)
    kw = dict(kw)
    if mk.get("cache_dtype") == "fp8":
        mk["cache_dtype"] = torch.float8_e4m3fn
    b = make_batch(segs, hkv=hkv, g=g, d=d, dtype=dtype, seed=zlib.crc32(case[0].encode()) % 1000, **mk)
    if kw.pop("fp8", False):
        kw["k_scale"] = torch.tensor([2.0], device=b.q.device)
        kw["v_scale"] = torch.tensor([1.5], device=b.q.device)
    ref = call(ta.tree_attention_reference, b, poisoned_out(b, dtype), **kw)
    out = call(ta.tree_attention, b, poisoned_out(b, dtype), **kw)
    rows = node_rows(b).to(out.device)
    # untouched rows keep the poison, written rows are finite
    assert torch.isnan(out[~rows]).all()
    assert torch.isfinite(out[rows]).all()
    torch.testing.assert_close(out[rows].float(), ref[rows].float(), **TOL[dtype])


TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@needs_kernels
@pytest.mark.parametrize("seed", range(6))
def test_tree_attention_kernel_random(seed):
    rng = random.Random(1000 + seed)
    segs = []
    for _ in range(rng.randrange(2, 8)):
        kind = rng.choice(["tree", "tree", "prefill", "decode"])
        if kind == "tree":
            segs.append(("tree", rng.choice([0, rng.randrange(1, 8), rng.randrange(8, 40)]),
                         rng.choice([0, rng.randrange(1, 17), rng.randrange(17, 90)])))
        elif kind == "prefill":
            segs.append(("prefill", rng.randrange(1, 9), rng.randrange(0, 40)))
        else:
            segs.append(("decode", rng.randrange(1, 60)))
    if not any(s_[0] == "tree" for s_ in segs):
        segs.append(("tree", 5, 7))
    hkv, g = rng.choice([1, 2]), rng.choice([1, 2, 4])
    d = rng.choice([32, 64])
    dtype = rng.choice([torch.float32, torch.bfloat16])
    kw = dict(num_splits=rng.choice([1, 2, 3]), tile_n=rng.choice([16, 32, 64]))
    if rng.random() < 0.5:
        kw["block_m"] = rng.choice([bm for bm in (16, 32, 64) if bm >= g])
    b = make_batch(segs, hkv=hkv, g=g, d=d, dtype=dtype, seed=seed, hnd_cache=rng.random() < 0.3)
    ref = call(ta.tree_attention_reference, b, poisoned_out(b, dtype))
    out = call(ta.tree_attention, b, poisoned_out(b, dtype), **kw)
    rows = node_rows(b).to(out.device)
    assert torch.isnan(out[~rows]).all()
    assert torch.isfinite(out[rows]).all()
    torch.testing.assert_close(out[rows].float(), ref[rows].float(), **TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("splits", [1, 3])
def test_tree_attention_kernel_first_col(splits):
    """Only columns >= first_col are computed (the spine before them is the
    attention backend's); earlier node rows keep the poison."""
    rng = random.Random(7 + splits)
    b = make_batch(MIXED, hkv=2, g=2, d=32, dtype=torch.float32, seed=5 + splits)
    first = torch.tensor([rng.randrange(1, rq["n"] + 2) for rq in b.trees], dtype=torch.int64,
                         device=b.q.device)
    kw = dict(first_col=first)
    ref = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32), **kw)
    out = call(ta.tree_attention, b, poisoned_out(b, torch.float32), num_splits=splits, **kw)
    rows = torch.zeros(b.T, dtype=torch.bool)
    for rq, f in zip(b.trees, first.tolist()):
        rows[rq["start"] + f : rq["start"] + 1 + rq["n"]] = True
    assert rows.sum() < node_rows(b).sum()
    assert torch.isnan(out[~rows.to(out.device)]).all() and torch.isnan(ref[~rows.to(ref.device)]).all()
    torch.testing.assert_close(out[rows], ref[rows], **TOL[torch.float32])
    full = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32))
    torch.testing.assert_close(ref[rows], full[rows], atol=1e-6, rtol=1e-6)


@needs_kernels
def test_tree_attention_kernel_fp8_float_scales_and_max_nodes():
    b = make_batch([("tree", 9, 20), ("decode", 4), ("tree", 4, 0)], hkv=1, g=2, d=32,
                   dtype=torch.float32, cache_dtype=torch.float8_e4m3fn, seed=5)
    for kw in (dict(k_scale=0.5, v_scale=3.0), dict(k_scale=0.5, v_scale=3.0, max_nodes=6)):
        ref = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32), **kw)
        out = call(ta.tree_attention, b, poisoned_out(b, torch.float32), **kw)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4, equal_nan=True)
    # with max_nodes=6 the 7th.. nodes of the first tree stay poisoned
    rq = max(b.trees, key=lambda r: r["n"])
    assert torch.isnan(out[rq["start"] + 7 : rq["start"] + 10]).all()


@needs_kernels
def test_tree_attention_kernel_workspace_and_bits_above_diagonal():
    b = make_batch(SMALL, hkv=1, g=2, d=32, dtype=torch.float32, seed=9)
    noisy = b.allowed | torch.ones_like(b.allowed).triu(1)
    b.anc_bits = ta.pack_ancestor_bits(noisy).to(b.q.device)
    R, W = b.anc_bits.shape[:2]
    ws = ta.tree_attention_workspace(2, R, W - 1, b.hq, b.d, b.q.device)
    ref = call(ta.tree_attention_reference, b, poisoned_out(b, torch.float32))
    out = call(ta.tree_attention, b, poisoned_out(b, torch.float32), num_splits=2, workspace=ws)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4, equal_nan=True)


def test_tree_attention_argument_checks():
    b = make_batch(SMALL, hkv=1, g=2, d=32, dtype=torch.float32, seed=2)
    out = poisoned_out(b, torch.float32)
    if ta.HAS_TRITON and _SKIP is None:
        with pytest.raises(ValueError, match="too small"):
            call(ta.tree_attention, b, out, max_nodes=b.anc_bits.shape[1])
        with pytest.raises(ValueError, match="uint8"):
            ta.tree_attention(b.q, b.k, b.v, b.k_cache.view(torch.uint8)[..., : b.d],
                              b.v_cache.view(torch.uint8)[..., : b.d], b.block_table, b.tree_req,
                              b.row_start, b.num_nodes, b.prefix_len, b.anc_bits, b.scale, out)
        with pytest.raises(ValueError, match="workspace"):
            call(ta.tree_attention, b, out, num_splits=2,
                 workspace=ta.tree_attention_workspace(3, 1, 1, b.hq, b.d, b.q.device))
        assert torch.isnan(out).all()
    # the split heuristic: small grids with long prefixes split, big grids do not
    assert ta.suggest_num_splits(1, 16, 32, 8, 32768) > 1
    assert ta.suggest_num_splits(1, 16, 32, 8, 512) == 1
    assert ta.suggest_num_splits(64, 64, 32, 8, 32768) == 1


# ---------------------------------------------------------------------------
# KV compaction
# ---------------------------------------------------------------------------


def compaction_slots(rng: random.Random, n_req: int, page: int, num_blocks: int, pad: int = 0):
    """Realistic pairs: per request, a root slot p0 and a tree laid out at
    p0+1..p0+n; an accepted path c_1 < c_2 < ... moves slot p0+c_j -> p0+j.
    A destination is often another pair's source. Pads with -1 pairs."""
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    src, dst = [], []
    for _ in range(n_req):
        b0, b1 = blocks.pop(), blocks.pop()
        slots = [b0 * page + o for o in range(page)] + [b1 * page + o for o in range(page)]
        p0 = rng.randrange(0, 4)
        n = rng.randrange(1, 2 * page - p0 - 1)
        depth = rng.randrange(0, min(n, 8) + 1)
        path = sorted(rng.sample(range(1, n + 1), depth))
        for j, c in enumerate(path, 1):
            if c != j:
                src.append(slots[p0 + c])
                dst.append(slots[p0 + j])
    src += [-1] * pad
    dst += [-1] * pad
    return torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)


def make_caches(L, num_blocks, hkv, d, dtype, seed, hnd=False):
    g = torch.Generator().manual_seed(seed)
    caches = []
    for _ in range(L):
        if hnd:
            kv = torch.randn(2, num_blocks, hkv, PAGE, d, generator=g).permute(0, 1, 3, 2, 4)
        else:
            kv = torch.randn(2, num_blocks, PAGE, hkv, d, generator=g)
        kv = kv.to(dtype).to(DEVICE)
        caches.append((kv[0], kv[1]))
    return caches


def _clone(caches):
    out = []
    for kc, vc in caches:
        kv = torch.stack([kc, vc]).clone()  # same logical content (strides may differ)
        out.append((kv[0], kv[1]))
    return out


def _assert_caches_equal(a, b):
    for (ka, va), (kb, vb) in zip(a, b):
        assert torch.equal(ka.view(torch.uint8) if ka.element_size() == 1 else ka, kb.view(torch.uint8) if kb.element_size() == 1 else kb)
        assert torch.equal(va.view(torch.uint8) if va.element_size() == 1 else va, vb.view(torch.uint8) if vb.element_size() == 1 else vb)


def test_compact_reference_semantics():
    caches = make_caches(2, 4, 1, 8, torch.float32, 0)
    before = _clone(caches)
    # a swap and a chain: 3 -> 1, 1 -> 3 (swap), 5 -> 4, 6 -> 5 (dst = another source)
    src = torch.tensor([3, 1, 5, 6, -1])
    dst = torch.tensor([1, 3, 4, 5, -1])
    kvc.compact_kv_reference(caches, src, dst)
    for (kc, vc), (k0, v0) in zip(caches, before):
        for c, c0 in ((kc, k0), (vc, v0)):
            f, f0 = c.reshape(-1, *c.shape[2:]), c0.reshape(-1, *c0.shape[2:])
            for s_, d_ in ((3, 1), (1, 3), (5, 4), (6, 5)):
                assert torch.equal(f[d_], f0[s_])
            assert torch.equal(f[6], f0[6]) and torch.equal(f[0], f0[0])


@needs_kernels
@pytest.mark.parametrize(
    "dtype,hnd,block_p,pad",
    [(torch.bfloat16, False, None, 0), (torch.float32, True, None, 5),
     (torch.float16, False, 16, 3), ("fp8", False, None, 0)],
    ids=["bf16", "fp32-hnd-pad", "fp16-chunked", "fp8"],
)
def test_compact_kv_kernel(dtype, hnd, block_p, pad):
    if dtype == "fp8":
        dtype = torch.float8_e4m3fn
    rng = random.Random(7)
    caches = make_caches(3, 24, 2, 32, dtype, seed=1, hnd=hnd)
    src, dst = compaction_slots(rng, 8, PAGE, 24, pad=pad)
    src, dst = src.to(DEVICE), dst.to(DEVICE)
    assert src.numel() > (block_p or 0)
    ref = _clone(caches)
    kvc.compact_kv_reference(ref, src, dst)
    kvc.compact_kv(caches, src, dst, block_p=block_p)
    _assert_caches_equal(caches, ref)


@needs_kernels
def test_compact_kv_kernel_general_overlap_and_mixed_layers():
    # a swap and a 3-cycle (fully general: one pair-chunk gathers before scattering)
    caches = make_caches(2, 4, 1, 32, torch.bfloat16, seed=2)
    caches += make_caches(1, 4, 1, 32, torch.float32, seed=3, hnd=True)  # second launch group
    src = torch.tensor([3, 1, 7, 8, 9, -1], device=DEVICE)
    dst = torch.tensor([1, 3, 8, 9, 7, -1], device=DEVICE)
    ref = _clone(caches)
    kvc.compact_kv_reference(ref, src, dst)
    kvc.compact_kv(caches, src, dst)
    _assert_caches_equal(caches, ref)
    # empty pairs are a no-op
    kvc.compact_kv(caches, src[:0], dst[:0])
    _assert_caches_equal(caches, ref)
    # int32 slots, and a pointer table built up front
    src2, dst2 = torch.tensor([2, 5, -1], device=DEVICE), torch.tensor([0, 4, 3], device=DEVICE)
    kvc.compact_kv_reference(ref, src2, dst2)
    kvc.compact_kv(caches, src2.int(), dst2.int(), table=kvc.make_kv_pointer_table(caches))
    _assert_caches_equal(caches, ref)


# ---------------------------------------------------------------------------
# the package without Triton
# ---------------------------------------------------------------------------


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "import vllm_bastion.kernels as K\n"
        "import importlib\n"
        "ta = importlib.import_module('vllm_bastion.kernels.tree_attention')\n"
        "kvc = importlib.import_module('vllm_bastion.kernels.kv_compaction')\n"
        "assert not ta.HAS_TRITON and not kvc.HAS_TRITON\n"
        "kc = torch.arange(2*4*1*2, dtype=torch.float32).view(2, 4, 1, 2); vc = kc.clone()\n"
        "K.compact_kv_reference([(kc, vc)], torch.tensor([5]), torch.tensor([1]))\n"
        "assert torch.equal(kc[0, 1], kc[1, 1])\n"
        "try:\n"
        "    K.compact_kv([(kc, vc)], torch.tensor([5]), torch.tensor([1]))\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
