"""Tree builder, acceptance walk, compaction math and tree attention reference.

Pure torch: no vLLM, no engine.
"""

import heapq
import math

import pytest
import torch

from vllm_bastion.core.attention import tree_attention_reference
from vllm_bastion.core.compaction import compaction_pairs, permute_rows_
from vllm_bastion.core.tree import (
    TreeBatch,
    ancestor_mask,
    build_best_first_trees,
    chain_tree,
    topk_per_depth,
)
from vllm_bastion.core.walk import accept_chain_walk, accept_walk, greedy_walk_reference


def heap_best_first(logp: torch.Tensor, max_nodes: int) -> list[tuple[tuple[int, ...], float]]:
    """DDTree/BASTION lazy best-first heap (child + next sibling), one request.

    Returns [(rank path, log P)] in pop order, root excluded.
    """
    D, K = logp.shape
    out = []
    heap = [(-float(logp[0, 0]), (0,))]
    while heap and len(out) < max_nodes:
        neg, path = heapq.heappop(heap)
        out.append((path, -neg))
        d = len(path)
        if d < D:
            heapq.heappush(heap, (neg - float(logp[d, 0]), path + (0,)))
        r = path[-1]
        if r + 1 < K:
            prev = float(logp[d - 1, r])
            heapq.heappush(heap, (neg + prev - float(logp[d - 1, r + 1]), path[:-1] + (r + 1,)))
    return out


def rank_paths(trees: TreeBatch, b: int) -> list[tuple[tuple[int, ...], float]]:
    n = int(trees.num_nodes[b])
    paths = {0: ()}
    out = []
    for i in range(1, n + 1):
        p = int(trees.parents[b, i])
        paths[i] = paths[p] + (int(trees.ranks[b, i]),)
        out.append((paths[i], float(trees.scores[b, i])))
    return out


def random_topk(B, D, K, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, D, V, generator=g) * 3
    return topk_per_depth(logits, K)


@pytest.mark.parametrize("B,D,K,M", [(1, 4, 3, 10), (3, 6, 4, 25), (2, 15, 8, 64), (4, 3, 2, 50)])
def test_builder_matches_heap_best_first(B, D, K, M):
    logp, tok = random_topk(B, D, K, seed=B * 100 + M)
    trees = build_best_first_trees(logp, tok, max_nodes=M)
    for b in range(B):
        ref = heap_best_first(logp[b], M)
        got = rank_paths(trees, b)
        assert len(got) == len(ref) == min(M, sum(K**d for d in range(1, D + 1)))
        assert sorted(p for p, _ in got) == sorted(p for p, _ in ref)
        # best-first order: non-increasing scores
        scores = [s for _, s in got]
        assert all(scores[i] >= scores[i + 1] - 1e-6 for i in range(len(scores) - 1))
        # scores are the sums of per-depth log-probs along the rank path
        for path, s in got:
            assert math.isclose(s, sum(float(logp[b, d, r]) for d, r in enumerate(path)), abs_tol=1e-5)


def test_tree_invariants_and_prefix_closure():
    logp, tok = random_topk(5, 8, 5, seed=7)
    trees = build_best_first_trees(logp, tok, max_nodes=40)
    for b in range(5):
        n = int(trees.num_nodes[b])
        for i in range(1, n + 1):
            p = int(trees.parents[b, i])
            assert 0 <= p < i  # every prefix is ancestor-closed
            assert int(trees.depths[b, i]) == int(trees.depths[b, p]) + 1
            d = int(trees.depths[b, i])
            assert int(trees.tokens[b, i]) == int(tok[b, d - 1, int(trees.ranks[b, i])])
        # siblings carry distinct tokens
        kids = {}
        for i in range(1, n + 1):
            kids.setdefault(int(trees.parents[b, i]), []).append(int(trees.tokens[b, i]))
        assert all(len(v) == len(set(v)) for v in kids.values())
    # a truncated tree is still a tree
    t2 = trees.truncate(torch.tensor([3, 0, 40, 17, 1]))
    assert t2.num_nodes.tolist() == [3, 0, 40, 17, 1]
    assert (t2.parents[0, 4:] == -1).all() and (t2.tokens[1, 1:] == -1).all()


def test_it_is_a_real_tree_not_a_chain():
    # flat drafter distributions: best-first must branch at the root
    logp = torch.log(torch.tensor([[[0.4, 0.35, 0.25]] * 4]))
    tok = torch.tensor([[[10, 11, 12]] * 4])
    trees = build_best_first_trees(logp, tok, max_nodes=8)
    root_children = (trees.parents[0, 1:9] == 0).sum().item()
    assert root_children >= 2
    assert trees.depths[0].max().item() >= 2


def test_per_request_budget_and_depth_limit():
    logp, tok = random_topk(3, 6, 4, seed=3)
    trees = build_best_first_trees(
        logp, tok, max_nodes=30, num_nodes=torch.tensor([5, 0, 30]), max_depth=torch.tensor([6, 6, 2])
    )
    assert trees.num_nodes.tolist() == [5, 0, 20]  # depth 2, k=4: 4 + 16 nodes exist
    assert trees.depths[2].max().item() <= 2
    assert (trees.tokens[1, 1:] == -1).all()
    ref = heap_best_first(logp[0], 5)
    assert sorted(p for p, _ in rank_paths(trees, 0)) == sorted(p for p, _ in ref)


def test_certain_drafter_ties_keep_parents_first():
    # log q = 0 everywhere on rank 0: parent and child tie; parent must come first
    logp = torch.zeros(1, 5, 2)
    logp[..., 1] = -50.0
    tok = torch.arange(10).view(1, 5, 2)
    trees = build_best_first_trees(logp, tok, max_nodes=5)
    assert trees.depths[0, 1:6].tolist() == [1, 2, 3, 4, 5]
    assert trees.parents[0, 1:6].tolist() == [0, 1, 2, 3, 4]


def test_ancestor_mask():
    # root -> 1 -> 3, root -> 2 -> 4 -> 5
    parents = torch.tensor([[-1, 0, 0, 1, 2, 4]])
    depths = torch.tensor([[0, 1, 1, 2, 2, 3]])
    t = TreeBatch(
        tokens=torch.arange(6).view(1, 6), parents=parents, depths=depths,
        ranks=torch.zeros(1, 6, dtype=torch.long), scores=torch.zeros(1, 6),
        num_nodes=torch.tensor([5]),
    )
    m = ancestor_mask(t)[0]
    expect = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 2, 4}, 5: {0, 2, 4, 5}}
    for i, s in expect.items():
        assert set(torch.nonzero(m[i]).flatten().tolist()) == s


def _random_tree_batch(B, n_max, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, 6, V, generator=g)
    logp, tok = topk_per_depth(logits, 3)
    n = torch.randint(0, n_max + 1, (B,), generator=g)
    return build_best_first_trees(logp, tok, max_nodes=n_max, num_nodes=n), g


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_walk_equals_reference(seed):
    V = 8  # small vocab: the target often agrees with some node
    trees, g = _random_tree_batch(16, 20, V, seed)
    target = torch.randint(0, V, trees.tokens.shape, generator=g)
    res = accept_walk(trees, target)
    for b in range(trees.batch_size):
        n = int(trees.num_nodes[b])
        ref = greedy_walk_reference(
            trees.tokens[b, : n + 1].tolist(), trees.parents[b, : n + 1].tolist(),
            target[b, : n + 1].tolist(),
        )
        k = int(res.num_accepted[b])
        assert res.output_tokens[b, : k + 1].tolist() == ref
        assert (res.output_tokens[b, k + 1 :] == -1).all()
        assert k == len(ref) - 1
        # path nodes are at depths 1..k and chain to the root
        path = res.path_nodes[b, :k].tolist()
        assert [int(trees.depths[b, c]) for c in path] == list(range(1, k + 1))
        assert res.chain_accepted[b] <= res.num_accepted[b]


def test_walk_accepts_through_second_choice():
    """The target's token is the drafter's 2nd choice at depth 2: the tree accepts
    through the sibling branch where a chain of top-1 drafts would stop."""
    # depth 1: tokens (5 p=.9, 6 p=.1); depth 2: (7 p=.6, 8 p=.4); depth 3: (9, 3)
    logp = torch.log(torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]]]))
    tok = torch.tensor([[[5, 6], [7, 8], [9, 3]]])
    trees = build_best_first_trees(logp, tok, max_nodes=6)
    chain = chain_tree([[5, 7, 9]])
    # the target continues 5, 8, 9, then 42
    def target_for(t):
        out = torch.full(t.tokens.shape, 0)
        for i in range(t.width):
            seq = []
            j = i
            while j > 0:
                seq.append(int(t.tokens[0, j]))
                j = int(t.parents[0, j])
            seq = seq[::-1]
            want = [5, 8, 9, 42]
            out[0, i] = want[len(seq)] if seq == want[: len(seq)] else 0
        return out

    tree_res = accept_walk(trees, target_for(trees))
    chain_res = accept_walk(chain, target_for(chain))
    assert chain_res.num_accepted.item() == 1  # 5 accepted, 7 rejected
    assert tree_res.num_accepted.item() == 3  # 5, 8 (2nd choice), 9
    assert tree_res.output_tokens[0, :4].tolist() == [5, 8, 9, 42]
    assert tree_res.chain_accepted.item() == 1  # the tree knows what a chain would do


def test_compaction_pairs_and_permutation():
    # two requests: rows 0..5 (root + 5 nodes), row 6 prefill, rows 7..10 (root + 3)
    row_starts = torch.tensor([0, 6, 7])
    path = torch.tensor([[2, 4, 5], [-1, -1, -1], [1, 3, -1]])
    acc = torch.tensor([3, 0, 2])
    src, dst = compaction_pairs(row_starts, path, acc)
    pairs = sorted(zip(src.tolist(), dst.tolist()))
    # request 0: 2->1, 4->2, 5->3 ; request 2: 1->1 stays, 3->2 => rows 10->9
    assert pairs == [(2, 1), (4, 2), (5, 3), (10, 9)]
    x = torch.arange(11).float().view(11, 1).repeat(1, 3)
    permute_rows_(x, src, dst)
    assert x[:4, 0].tolist() == [0, 2, 4, 5]
    assert x[7:10, 0].tolist() == [7, 8, 10]


def test_tree_attention_reference_matches_dense():
    torch.manual_seed(0)
    c, n, Hq, Hkv, d = 7, 6, 4, 2, 16
    parents = [-1, 0, 0, 1, 2, 3]
    q = torch.randn(n - 1, Hq, d)
    kp, vp = torch.randn(c, Hkv, d), torch.randn(c, Hkv, d)
    kt, vt = torch.randn(n, Hkv, d), torch.randn(n, Hkv, d)
    allowed = torch.zeros(n - 1, n, dtype=torch.bool)
    for i in range(1, n):
        j = i
        while j >= 0:
            allowed[i - 1, j] = True
            j = parents[j]
    out = tree_attention_reference(q, kp, vp, kt, vt, allowed, 0.25)
    for i in range(n - 1):
        for h in range(Hq):
            kv_h = h // (Hq // Hkv)
            keys = torch.cat([kp[:, kv_h], kt[allowed[i], kv_h]])
            vals = torch.cat([vp[:, kv_h], vt[allowed[i], kv_h]])
            p = torch.softmax(keys @ q[i, h] * 0.25, 0)
            torch.testing.assert_close(out[i, h], p @ vals, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_classes", [False, True])
def test_top1_chains_equal_general_builder(with_classes):
    """K = 1 takes the loop-free chain path; it must build what the general
    best-first builder builds from the same drafts (a second rank at -inf
    forces the general path: its candidates are never alive)."""
    B, D, M = 5, 7, 5
    logp, tok = random_topk(B, D, 1, seed=11)
    logp[3, 2, 0] = -math.inf  # a drafter that gives up at depth 3
    kw = dict(max_depth=torch.tensor([7, 2, 7, 7, 0]), num_nodes=torch.tensor([5, 5, 3, 5, 5]))
    cv = None
    if with_classes:
        cv = torch.rand(B, D, 3, 1).log() * 0.5
    fast = build_best_first_trees(logp, tok, max_nodes=M, class_values=cv, **kw)
    logp2 = torch.cat([logp, torch.full_like(logp, -math.inf)], -1)
    tok2 = torch.cat([tok, tok + 1], -1)
    cv2 = None if cv is None else torch.cat([cv, torch.full_like(cv, -math.inf)], -1)
    ref = build_best_first_trees(logp2, tok2, max_nodes=M, class_values=cv2, **kw)
    # row 3: the drafter's -inf ends the chain unless class values score it
    assert fast.num_nodes.tolist() == ref.num_nodes.tolist() == [5, 2, 3, 5 if with_classes else 2, 0]
    W = fast.width
    assert W == 6 and ref.width >= W and (ref.tokens[:, W:] == -1).all()
    for k in ("tokens", "parents", "depths", "ranks", "classes"):
        assert torch.equal(getattr(fast, k), getattr(ref, k)[:, :W]), k
    for k in ("scores", "node_logq"):
        torch.testing.assert_close(getattr(fast, k), getattr(ref, k)[:, :W], rtol=0, atol=1e-6)
    assert fast.draft_logprobs is logp and fast.draft_tokens is tok


@pytest.mark.parametrize("extra_width", [0, 3])
def test_chain_walk_equals_tree_walk(extra_width):
    """Chains (every step without branch rows) take accept_chain_walk; it must
    give accept_walk's result field for field, padding and ranks > 0 on the
    chain (a spine through a second choice) included."""
    from vllm_bastion.core.step import pad_trees

    g = torch.Generator().manual_seed(3)
    lens = [0, 1, 4, 6, 6, 2, 0, 5]
    chains = chain_tree([torch.randint(0, 5, (n,), generator=g).tolist() for n in lens],
                        root_tokens=[7] * len(lens))
    chains.ranks[:, 1:] = torch.where(chains.depths[:, 1:] > 0,
                                      (torch.rand(len(lens), chains.width - 1, generator=g) < 0.2).long(), -1)
    chains = pad_trees(chains, chains.width + extra_width)
    for trial in range(20):
        # the target agrees with the drafts mostly, so paths get long
        target = torch.where(torch.rand(chains.tokens.shape, generator=g) < 0.8,
                             torch.nn.functional.pad(chains.tokens[:, 1:], (0, 1), value=0).clamp(min=0),
                             torch.randint(0, 5, chains.tokens.shape, generator=g))
        want, got = accept_walk(chains, target), accept_chain_walk(chains, target)
        for k in want.__dataclass_fields__:
            assert torch.equal(getattr(got, k), getattr(want, k)), (trial, k)
