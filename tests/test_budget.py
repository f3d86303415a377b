"""Batch-wide cost-aware tree budget: optimality, monotonicity, caps, buckets."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from vllm_bastion.core.budget import (choose_batch_budget, plan_batch_budget, prefix_paths,
                                      snap_to_bucket, surrogate)
from vllm_bastion.profiles import load_device_prior
from vllm_bastion.core.latency import LatencyModel, RooflineCoeffs
from vllm_bastion.core.model_shape import ModelShape
from vllm_bastion.core.tree import build_best_first_trees, topk_per_depth

from hf_configs import LLAMA31_8B, QWEN3_8B

SMALL = {  # a ~0.1B dense model
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "torch_dtype": "float16",
}
@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: intra-op threads only add contention on a shared box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DEVICES = ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S", "NVIDIA GeForce RTX 4090"]


def qwen_h100(coeffs=RooflineCoeffs(1.5, 1e-3, 1.2, 5e-4), **kw) -> LatencyModel:
    return LatencyModel.from_prior(
        ModelShape.from_hf_config(QWEN3_8B), load_device_prior(DEVICES[0]), coeffs, **kw
    )


def random_trees(B: int, max_nodes: int, gen: torch.Generator, depth: int = 15, k: int = 8):
    scale = torch.rand(B, 1, 1, generator=gen) * 8 + 0.5  # confident .. flat drafters
    logits = torch.randn(B, depth, 256, generator=gen) * scale
    v, t = topk_per_depth(logits, k)
    return build_best_first_trees(v, t, max_nodes)


def random_latency(rng: np.random.Generator) -> tuple[LatencyModel, float]:
    cfg = [QWEN3_8B, LLAMA31_8B, SMALL][rng.integers(3)]
    prior = load_device_prior(DEVICES[rng.integers(len(DEVICES))])
    co = RooflineCoeffs(
        a_c=rng.uniform(0.8, 3.0), b_c=rng.uniform(0, 3e-3), a_m=rng.uniform(0.8, 3.0), b_m=rng.uniform(0, 3e-3)
    )
    lm = LatencyModel.from_prior(
        ModelShape.from_hf_config(cfg), prior, co, materialized_scores=bool(rng.integers(2))
    )
    return lm, float(rng.uniform(0, 1e-2))


def theta(lm, scores, contexts, counts, t_fix, base=None):
    """Expected tokens / s of a plan, from first principles."""
    B = scores.shape[0]
    base = [1] * B if base is None else base
    S = sum(surrogate(scores[b : b + 1], torch.tensor([counts[b]])).item() for b in range(B))
    C = lm.step_time([base[b] + counts[b] for b in range(B)], list(contexts))
    return S / (t_fix + C)


def merged_order(scores, min_eff, max_eff):
    B, W = scores.shape
    cands = []
    for b in range(B):
        for j in range(1, W):
            sc = float(scores[b, j])
            if math.isfinite(sc) and min_eff[b] < j <= max_eff[b]:
                cands.append((-sc, b, j))
    return [(b, j) for _, b, j in sorted(cands)]


def caps(scores, min_nodes, max_nodes):
    avail = torch.isfinite(scores[:, 1:]).sum(1).tolist()
    mx = [min(max_nodes, a) for a in avail]
    mn = [min(min_nodes, m) for m in mx]
    return mn, mx


def brute_force(lm, scores, contexts, t_fix, min_nodes=0, max_nodes=10**9):
    """argmax over every prefix of the merged best-first list (Python loop)."""
    mn, mx = caps(scores, min_nodes, max_nodes)
    counts = list(mn)
    best, best_counts = theta(lm, scores, contexts, counts, t_fix), list(counts)
    for b, _ in merged_order(scores, mn, mx):
        counts[b] += 1
        th = theta(lm, scores, contexts, counts, t_fix)
        if th > best:
            best, best_counts = th, list(counts)
    return best, best_counts


def greedy_reference(lm, scores, contexts, t_fix, min_nodes=0, max_nodes=10**9):
    """BASTION's stopping rule, node by node."""
    mn, mx = caps(scores, min_nodes, max_nodes)
    counts = list(mn)
    B = scores.shape[0]
    S = B + sum(float(torch.exp(scores[b, 1 : 1 + mn[b]]).sum()) for b in range(B))
    C = lm.step_time([1 + n for n in counts], list(contexts))
    for b, j in merged_order(scores, mn, mx):
        p = math.exp(float(scores[b, j]))
        nxt = list(counts)
        nxt[b] += 1
        C2 = lm.step_time([1 + n for n in nxt], list(contexts))
        if not p * (t_fix + C) > S * (C2 - C):
            break
        counts, S, C = nxt, S + p, C2
    return counts


# ------------------------------------------------------------------ surrogate


def test_surrogate_matches_tree():
    gen = torch.Generator().manual_seed(0)
    trees = random_trees(5, 40, gen)
    assert torch.allclose(surrogate(trees.scores), trees.path_probability_sum().double(), rtol=1e-6)
    s = surrogate(trees.scores, torch.zeros(5, dtype=torch.long))
    assert torch.equal(s, torch.ones(5, dtype=torch.float64))  # root only: P(root) = 1


# ------------------------------------------------------------------ optimality


def test_single_request_exact_and_greedy_are_optimal():
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    interior = 0
    for trial in range(40):
        lm, t_fix = random_latency(rng)
        W = [17, 65, 257, 513][trial % 4]
        trees = random_trees(1, W - 1, gen)
        c = [int(rng.integers(0, 16384))]
        mn = int(rng.integers(0, 4))
        best, best_counts = brute_force(lm, trees.scores, c, t_fix, min_nodes=mn)
        for exact in (True, False):
            n = choose_batch_budget(trees.scores, c, lm, t_fix, min_nodes=mn, exact=exact)
            got = theta(lm, trees.scores, c, n.tolist(), t_fix)
            # C is convex in the tree size and S concave, so the first failure
            # of the stopping rule is the global optimum too
            assert got == pytest.approx(best, rel=1e-9), (trial, exact, n.tolist(), best_counts)
        interior += 0 < best_counts[0] < int(trees.num_nodes[0])
    assert interior >= 10  # the cases are not all trivial


@pytest.mark.parametrize("B", [2, 3, 6])
def test_batch_exact_is_argmax_over_merged_prefixes(B):
    rng = np.random.default_rng(B)
    gen = torch.Generator().manual_seed(B)
    interior = 0
    for trial in range(12):
        lm, t_fix = random_latency(rng)
        trees = random_trees(B, 24, gen)
        ctx = rng.integers(0, 16384, size=B).tolist()
        mn = int(rng.integers(0, 3))
        mx = int(rng.integers(4, 30))
        best, best_counts = brute_force(lm, trees.scores, ctx, t_fix, mn, mx)
        d = plan_batch_budget(trees.scores, ctx, lm, t_fix, mn, mx, exact=True)
        got = theta(lm, trees.scores, ctx, d.num_nodes.tolist(), t_fix)
        assert got == pytest.approx(best, rel=1e-9), (trial, d.num_nodes.tolist(), best_counts)
        assert float(d.throughput) == pytest.approx(got, rel=1e-9)
        # greedy = BASTION's rule applied node by node on the merged list
        g = choose_batch_budget(trees.scores, ctx, lm, t_fix, mn, mx)
        assert g.tolist() == greedy_reference(lm, trees.scores, ctx, t_fix, mn, mx)
        assert theta(lm, trees.scores, ctx, g.tolist(), t_fix) <= got * (1 + 1e-12)
        interior += 0 < sum(best_counts) < sum(min(mx, int(n)) for n in trees.num_nodes)
    assert interior >= 3


def test_batch_matches_exhaustive_search_when_cost_depends_on_total_only():
    """Without attention terms (c = 0 is not enough; use a tiny-attention shape)
    the merged prefix is the best plan among ALL per-request prefix combos."""
    rng = np.random.default_rng(7)
    gen = torch.Generator().manual_seed(7)
    shape = ModelShape(
        num_layers=4, hidden_size=4096, num_heads=1, num_kv_heads=1, head_dim=1,
        intermediate_size=8192, vocab_size=32000,
    )
    for trial in range(6):
        co = RooflineCoeffs(rng.uniform(1, 3), rng.uniform(0, 1e-4), rng.uniform(1, 3), rng.uniform(0, 1e-4))
        lm = LatencyModel(shape, 2e13, 5e11, co)
        trees = random_trees(3, 8, gen)
        t_fix = float(rng.uniform(0, 3e-4))
        ctx = [0, 0, 0]
        best = -1.0
        for a in range(9):
            for b in range(9):
                for c in range(9):
                    best = max(best, theta(lm, trees.scores, ctx, [a, b, c], t_fix))
        d = plan_batch_budget(trees.scores, ctx, lm, t_fix, exact=True)
        assert float(d.throughput) == pytest.approx(best, rel=1e-6)


# ------------------------------------------------------------------ batch behaviour


def test_trees_shrink_as_batch_grows():
    gen = torch.Generator().manual_seed(1)
    lm = qwen_h100(t_fix=2e-3)
    one = random_trees(1, 384, gen, k=16)
    pool = random_trees(128, 96, gen, k=8)
    ctx = torch.randint(64, 8192, (128,), generator=gen)
    for exact in (False, True):
        prev_same = None
        prev_pool = None
        for B in (1, 2, 4, 8, 16, 32, 64, 128):
            same = choose_batch_budget(one.scores.expand(B, -1), torch.full((B,), 1024), lm, exact=exact)
            assert int(same.max()) - int(same.min()) <= 1  # identical requests: shared out evenly
            if prev_same is not None:
                assert same.max() <= prev_same.min() + 1 and same.float().mean() <= prev_same.float().mean()
            prev_same = same
            n = choose_batch_budget(pool.scores[:B], ctx[:B], lm, exact=exact)
            if prev_pool is not None:  # every request's tree shrinks (or stays)
                assert torch.all(n[: len(prev_pool)] <= prev_pool)
            prev_pool = n
        assert int(prev_same.max()) < 16  # B = 128: small trees


def test_expensive_verification_switches_speculation_off():
    gen = torch.Generator().manual_seed(2)
    trees = random_trees(8, 64, gen)
    ctx = [512] * 8
    # already compute-bound at one token per request: every node costs its full share
    lm = qwen_h100(RooflineCoeffs(a_c=400.0, b_c=0.0, a_m=1.0, b_m=0.0))
    for exact in (False, True):
        d = plan_batch_budget(trees.scores, ctx, lm, t_fix=0.0, exact=exact)
        assert d.num_nodes.tolist() == [0] * 8
        assert int(d.total_nodes) == 0 and float(d.expected_tokens) == 8.0
    # with a drafter cost and an unsure drafter (every P(u) <= 0.9) the plan is
    # still root-only, and drafting at all is predicted to be slower than not
    unsure = trees.scores.clamp(max=math.log(0.9))
    unsure[:, 0] = 0.0
    d = plan_batch_budget(unsure, ctx, lm, t_fix=1e-3)
    assert int(d.total_nodes) == 0 and float(d.speedup_estimate) < 1.0
    assert float(d.no_spec_throughput) == pytest.approx(8 / lm.step_time([1] * 8, ctx))
    # min_nodes is honoured even then
    n = choose_batch_budget(trees.scores, ctx, lm, 0.0, min_nodes=2)
    assert n.tolist() == [2] * 8


def test_cheap_verification_fills_to_caps():
    # a confident drafter (every P(u) >= e^-0.64) and a drafter far dearer than a node
    scores = torch.cat([torch.zeros(4, 1), -0.01 * torch.rand(4, 64).cumsum(1)], 1)
    lm = qwen_h100(RooflineCoeffs(1.0, 0.0, 1.0, 0.0), t_fix=0.05)
    n = choose_batch_budget(scores, [100] * 4, lm, max_nodes=[64, 10, 0, 64])
    assert n.tolist() == [64, 10, 0, 64]
    assert int(plan_batch_budget(scores, [100] * 4, lm, max_total_nodes=50).total_nodes) == 50
    n = choose_batch_budget(scores, [100] * 4, lm, max_total_nodes=50)
    # the 50 kept nodes are the 50 most probable of the batch
    kept = torch.cat([scores[b, 1 : 1 + int(n[b])] for b in range(4)])
    dropped = torch.cat([scores[b, 1 + int(n[b]) :] for b in range(4)])
    assert kept.numel() == 50 and kept.min() >= dropped.max()


def test_caps_and_padding():
    gen = torch.Generator().manual_seed(4)
    trees = random_trees(3, 20, gen)
    scores = trees.scores.clone()
    scores[1, 6:] = float("-inf")  # request 1 has only 5 nodes
    lm = qwen_h100(RooflineCoeffs(1.0, 0.0, 1.0, 0.0), t_fix=0.05)
    n = choose_batch_budget(scores, [0, 0, 0], lm, min_nodes=8, max_nodes=torch.tensor([12, 12, 3]))
    assert n.tolist() == [12, 5, 3]
    lm_exp = qwen_h100(RooflineCoeffs(a_c=400.0, b_c=0.0, a_m=1.0, b_m=0.0))
    n = choose_batch_budget(scores, [0, 0, 0], lm_exp, 0.0, min_nodes=8, max_nodes=torch.tensor([12, 12, 3]))
    assert n.tolist() == [8, 5, 3]
    # root-only input and empty trees
    d = plan_batch_budget(torch.zeros(2, 1), [5, 5], lm)
    assert d.num_nodes.tolist() == [0, 0] and d.num_nodes.dtype == torch.long
    # the plan is a valid truncation of the trees
    n = choose_batch_budget(trees.scores, [50, 500, 5000], qwen_h100(), 2e-3)
    t2 = trees.truncate(n)
    assert t2.num_nodes.tolist() == n.tolist()
    assert torch.equal(t2.scores[:, : t2.width], trees.scores[:, : t2.width].masked_fill(~t2.valid_mask(), float("-inf")))


def test_base_tokens_and_mixed_prefill_rows():
    gen = torch.Generator().manual_seed(5)
    trees = random_trees(3, 32, gen)
    lm = qwen_h100(t_fix=2e-3)
    ctx = [1000, 1000, 1000]
    n_plain = choose_batch_budget(trees.scores, ctx, lm)
    scores = torch.cat([trees.scores, torch.full((1, trees.width), float("-inf"))])
    scores[3, 0] = 0.0
    d = plan_batch_budget(scores, ctx + [0], lm, base_tokens=[1, 1, 1, 2048])  # + a 2k-token prefill chunk
    assert int(d.num_nodes[3]) == 0
    assert torch.all(d.num_nodes[:3] <= n_plain)  # the prefill makes nodes dearer
    assert float(d.step_time) == pytest.approx(lm.step_time((1 + d.num_nodes[:3]).tolist() + [2048], ctx + [0]))


# ------------------------------------------------------------------ buckets


def test_buckets():
    gen = torch.Generator().manual_seed(6)
    trees = random_trees(4, 128, gen)
    lm = qwen_h100(RooflineCoeffs(1.0, 0.0, 1.0, 0.0), t_fix=5e-3)
    ctx = [256] * 4
    buckets = [8, 16, 32, 64, 96, 128, 192, 256]
    free = plan_batch_budget(trees.scores, ctx, lm)
    for exact in (False, True):
        d = plan_batch_budget(trees.scores, ctx, lm, exact=exact, buckets=buckets)
        tot = 4 + int(d.total_nodes)
        assert tot in buckets and tot <= 4 + int(free.total_nodes)
        if exact:  # best plan among bucket-sized prefixes
            best = max(
                theta(lm, trees.scores, ctx, c, 5e-3)
                for c in _bucket_prefixes(trees.scores, buckets)
            )
            assert float(d.throughput) == pytest.approx(best, rel=1e-9)
    snapped = snap_to_bucket(trees.scores, free.num_nodes, buckets)
    assert int(snapped.sum()) + 4 == max(b for b in buckets if b <= 4 + int(free.total_nodes))
    assert torch.all(snapped <= free.num_nodes)
    greedy_b = plan_batch_budget(trees.scores, ctx, lm, buckets=buckets).num_nodes
    assert torch.equal(snapped, greedy_b)  # rounding down = dropping the least probable nodes
    kept = torch.cat([trees.scores[b, 1 : 1 + int(snapped[b])] for b in range(4)])
    dropped = torch.cat([trees.scores[b, 1 + int(snapped[b]) : 1 + int(free.num_nodes[b])] for b in range(4)])
    assert dropped.numel() == 0 or kept.min() >= dropped.max()
    # above the largest bucket anything goes when asked for
    big = plan_batch_budget(trees.scores, ctx, lm, buckets=[8], buckets_unbounded_above=True)
    assert torch.equal(big.num_nodes, free.num_nodes)
    # min_nodes are never dropped
    s2 = snap_to_bucket(trees.scores, free.num_nodes, [4], min_nodes=3)
    assert s2.tolist() == [min(3, int(n)) for n in free.num_nodes]


def _bucket_prefixes(scores, buckets):
    B = scores.shape[0]
    mn, mx = caps(scores, 0, 10**9)
    counts = [0] * B
    out = [list(counts)]
    for b, _ in merged_order(scores, mn, mx):
        counts[b] += 1
        if B + sum(counts) in buckets:
            out.append(list(counts))
    return out


# ------------------------------------------------------------------ speed


@pytest.mark.parametrize("W", [65, 257])
def test_vectorized_and_fast(W):
    gen = torch.Generator().manual_seed(8)
    lm = qwen_h100(t_fix=2e-3)
    trees = random_trees(64, W - 1, gen, k=16)
    ctx = torch.randint(64, 8192, (64,), generator=gen)
    for exact in (False, True):
        plan_batch_budget(trees.scores, ctx, lm, exact=exact)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            plan_batch_budget(trees.scores, ctx, lm, exact=exact)
        dt = (time.perf_counter() - t0) / 5
        assert dt < 0.1, dt  # measured 0.4-3 ms (one thread, shared 2-core box)


def test_prefix_paths_counts_leaves_of_every_best_first_prefix():
    # root 0; 1 <- 0, 2 <- 1, 3 <- 0, 4 <- 1, 5 <- 2; padding after
    parents = torch.tensor([[-1, 0, 1, 0, 1, 2, -1, -1]])
    # prefixes: {} 0, {1} 1, {1,2} 1, +3 2, +4 3, +5 (extends leaf 2) 3, padding
    assert prefix_paths(parents).tolist() == [[0, 1, 1, 2, 3, 3, 3, 3]]
    chain = torch.tensor([[-1, 0, 1, 2, 3]])
    assert prefix_paths(chain).tolist() == [[0, 1, 1, 1, 1]]


def test_branch_waves_make_trees_chain_like_when_dear():
    """Each root-to-leaf path beyond the first costs `wave_cost`: a dear wave
    drops the branches a free one keeps, and keeps the chain nodes."""
    # a chain 1-2-3 with side branches 4 (under root) and 5 (under 1); the
    # side branches come earlier in best-first order than the chain's tail
    parents = torch.tensor([[-1, 0, 1, 0, 1, 2]])
    logp = torch.log(torch.tensor([[1.0, 0.9, 0.8, 0.5, 0.45, 0.4]]))
    lat = qwen_h100()
    free = plan_batch_budget(logp, [64], lat, t_fix=0.01, exact=True)
    assert int(free.num_nodes[0]) == 5
    dear = plan_batch_budget(logp, [64], lat, t_fix=0.01, exact=True, parents=parents,
                             wave_cost=1.0)
    assert int(dear.num_nodes[0]) == 2  # the chain 1-2, no branch
    same = plan_batch_budget(logp, [64], lat, t_fix=0.01, exact=True, parents=parents,
                             wave_cost=0.0)
    assert int(same.num_nodes[0]) == 5
