"""The engine-agnostic verify step (core/step.py) and seeded noise (core/noise.py).

Pure torch: no vLLM, no engine. The step is driven here exactly as the runner
drives it: trees -> spine-first layout -> scheduler truncation -> plan ->
target tokens -> walk + compaction.
"""

import math

import pytest
import torch

from random_trees import random_trees
from vllm_bastion.core.compaction import permute_rows_
from vllm_bastion.core.noise import seeded_exponential, seeded_uniform
from vllm_bastion.core.step import (
    pad_trees,
    finish_step,
    plan_step,
    replace_rows,
    sampled_row_depths,
    spine_first,
    spine_length,
)
from vllm_bastion.core.tree import ancestor_mask, build_best_first_trees, chain_tree, topk_per_depth
from vllm_bastion.core.walk import greedy_walk_reference
from vllm_bastion.kernels import pack_ancestor_bits


def node_paths(trees, b):
    """{column: tuple of tokens from the root} for request b."""
    paths = {0: ()}
    for i in range(1, int(trees.num_nodes[b]) + 1):
        p = int(trees.parents[b, i])
        assert 0 <= p < i, "parents must precede children"
        paths[i] = paths[p] + (int(trees.tokens[b, i]),)
    return paths


@pytest.mark.parametrize("seed", range(5))
def test_spine_first_is_a_reordering_with_a_causal_spine(seed):
    trees = random_trees(seed=seed)
    out, spine = spine_first(trees)
    assert torch.equal(spine, spine_length(out))
    for b in range(trees.batch_size):
        before, after = node_paths(trees, b), node_paths(out, b)
        assert sorted(before.values()) == sorted(after.values())  # same tree
        L = int(spine[b])
        for i in range(1, L + 1):  # the spine is a chain at the front
            assert int(out.parents[b, i]) == i - 1 and int(out.depths[b, i]) == i
        # the spine follows each node's best (first best-first) child
        node = 0
        for d in range(1, L + 1):
            kids = [i for i in range(1, int(trees.num_nodes[b]) + 1) if int(trees.parents[b, i]) == node]
            node = min(kids)
            assert before[node] == after[d]
        # a spine node's best child, if any, is on the spine
        kids_of_tip = [i for i in range(1, int(out.num_nodes[b]) + 1)
                       if int(out.parents[b, i]) == L]
        assert not kids_of_tip or L + 1 in kids_of_tip


@pytest.mark.parametrize("seed", range(5))
def test_any_prefix_of_the_layout_is_a_tree(seed):
    trees, _ = spine_first(random_trees(seed=seed))
    for m in range(int(trees.num_nodes.max()) + 1):
        t = trees.truncate(torch.full((trees.batch_size,), m))
        for b in range(t.batch_size):
            node_paths(t, b)  # asserts every kept node's parent is kept and earlier


def test_topk1_trees_are_chains_with_nothing_for_tree_attention():
    logp, tok = topk_per_depth(torch.randn(3, 8, 50), 1)
    trees, spine = spine_first(build_best_first_trees(logp, tok, max_nodes=8))
    assert torch.equal(spine, trees.num_nodes)
    plan = plan_step(trees, torch.tensor([0, 9, 18]), 1 + trees.num_nodes,
                     torch.tensor([5, 7, 9]), pack_bits=pack_ancestor_bits)
    assert plan.num_branch_rows == 0 and plan.tree_reqs.numel() == 0
    assert torch.equal(plan.backend_rows, torch.arange(27))


def test_plan_rows_positions_and_masks():
    trees, spine = spine_first(random_trees(B=4, seed=3))
    trees = trees.truncate(torch.tensor([12, 0, 7, 20]))
    n = trees.num_nodes
    # a prefill chunk of 5 rows between requests 0 and 2 (request 1: no tree)
    num_rows = torch.where(n > 0, 1 + n, torch.tensor(5))
    row_start = torch.cumsum(num_rows, 0) - num_rows
    root_pos = torch.tensor([40, 3, 17, 100])
    plan = plan_step(trees, row_start, num_rows, root_pos, pack_bits=pack_ancestor_bits)
    total = int(num_rows.sum())
    both = torch.cat([plan.backend_rows, plan.branch_rows]).sort().values
    assert torch.equal(both, torch.arange(total))  # a partition of the rows
    assert torch.equal(plan.backend_query_lens, num_rows - (n - plan.spine_len))
    for b in range(4):
        L, nb = int(plan.spine_len[b]), int(n[b])
        rows = [int(row_start[b]) + c for c in range(1 + L + 0, 1 + nb)]
        sel = [i for i, r in enumerate(plan.branch_rows.tolist()) if r in rows]
        assert len(sel) == nb - L
        for i in sel:
            col = int(plan.branch_rows[i]) - int(row_start[b])
            assert int(plan.branch_pos[i]) == int(root_pos[b]) + int(trees.depths[b, col])
    # masks of the requests with branch rows
    want = pack_ancestor_bits(ancestor_mask(trees.select(plan.tree_reqs)))
    assert torch.equal(plan.anc_bits, want)


@pytest.mark.parametrize("seed", range(6))
def test_finish_step_walks_like_the_reference_and_compacts(seed):
    g = torch.Generator().manual_seed(100 + seed)
    trees, _ = spine_first(random_trees(B=5, seed=seed, K=3, sharp=1.0))
    n = trees.num_nodes
    num_rows = 1 + n
    row_start = torch.cumsum(num_rows, 0) - num_rows
    plan = plan_step(trees, row_start, num_rows, torch.zeros(5, dtype=torch.long))
    # the target's token at every sampled row: follow a random tree path, then random
    rows_tok = []
    for b in range(5):
        cols = list(range(int(n[b]) + 1))
        tgt = torch.randint(0, 64, (len(cols),), generator=g)
        # make the target agree with a random root-to-node path
        leaf = int(torch.randint(0, len(cols), (1,), generator=g))
        node, chain = leaf, []
        while node > 0:
            chain.append(node)
            node = int(trees.parents[b, node])
        for child in reversed(chain):
            tgt[int(trees.parents[b, child])] = int(trees.tokens[b, child])
        rows_tok.append(tgt)
    res = finish_step(plan, torch.cat(rows_tok))
    for b in range(5):
        ref = greedy_walk_reference(trees.tokens[b].tolist(), trees.parents[b].tolist(),
                                    rows_tok[b].tolist())
        k = int(res.walk.num_accepted[b])
        assert res.walk.output_tokens[b, : k + 1].tolist() == ref
    # compaction: afterwards rows start+1..start+k hold the accepted path's tokens
    flat = torch.cat([trees.tokens[b, : int(n[b]) + 1] for b in range(5)]).clone()
    permute_rows_(flat, res.src_rows, res.dst_rows)
    for b in range(5):
        k = int(res.walk.num_accepted[b])
        s = int(row_start[b])
        assert flat[s + 1 : s + 1 + k].tolist() == res.walk.output_tokens[b, :k].tolist()
    # a path accepted along the spine moves nothing
    spine_only = res.walk.path_nodes.clamp(min=0)
    for b in range(5):
        k = int(res.walk.num_accepted[b])
        if k and spine_only[b, :k].tolist() == list(range(1, k + 1)):
            s = int(row_start[b])
            assert not ((res.dst_rows > s) & (res.dst_rows <= s + k)).any()


def test_sampled_row_depths_and_replace_rows():
    trees, _ = spine_first(random_trees(B=3, seed=1))
    plan = plan_step(trees, torch.zeros(3, dtype=torch.long), 1 + trees.num_nodes,
                     torch.zeros(3, dtype=torch.long))
    d = sampled_row_depths(plan)
    assert d.numel() == int((1 + trees.num_nodes).sum())
    chains = chain_tree([[7, 8, 9], [], [1]])
    mixed = replace_rows(trees, torch.tensor([True, False, True]), chains)
    assert mixed.tokens[0, 1:4].tolist() == [7, 8, 9] and int(mixed.num_nodes[0]) == 3
    assert torch.equal(mixed.tokens[1, : trees.width], trees.tokens[1])


# ----------------------------------------------------------------- noise


def test_seeded_noise_is_keyed_by_seed_and_position_only():
    a = seeded_uniform(torch.tensor([1, 1, 2, 2**62 + 5]), torch.tensor([10, 11, 10, 10]), 300)
    b = seeded_uniform(torch.tensor([2**62 + 5, 1]), torch.tensor([10, 10]), 300)
    assert torch.equal(a[3], b[0]) and torch.equal(a[0], b[1])
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(a[i], a[j])
    assert float(a.min()) > 0 and float(a.max()) < 1


def test_seeded_noise_is_uniform_and_independent():
    u = seeded_uniform(torch.arange(64), torch.arange(64) * 7, 4096).flatten()
    n = u.numel()
    # Kolmogorov-Smirnov distance to U(0, 1): critical value ~1.63/sqrt(n) at 1%
    s = u.sort().values
    ks = (s - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()
    assert float(ks) < 1.63 / math.sqrt(n)
    # neighbouring token ids and positions are uncorrelated
    grid = u.view(64, 4096)
    c_tok = torch.corrcoef(torch.stack([grid[:, :-1].flatten(), grid[:, 1:].flatten()]))[0, 1]
    c_pos = torch.corrcoef(torch.stack([grid[:-1].flatten(), grid[1:].flatten()]))[0, 1]
    assert abs(float(c_tok)) < 0.01 and abs(float(c_pos)) < 0.01
    e = seeded_exponential(torch.arange(64), torch.arange(64), 4096)
    assert abs(float(e.mean()) - 1.0) < 0.02


def test_path_classes_survive_layout_and_row_edits():
    """The builder's per-node path classes ride along through spine-first
    layout, padding, kept-column restriction and row replacement, and stay
    what tree.path_classes computes from the tree itself (the runner feeds
    them to the acceptance calibrator instead of recomputing them)."""
    from vllm_bastion.core.paths import keep_columns
    from vllm_bastion.core.tree import path_classes

    logp, tok = topk_per_depth(torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(4)) * 2, 3)
    trees, _ = spine_first(build_best_first_trees(logp, tok, max_nodes=12))
    raw = torch.rand(trees.tokens.shape, generator=torch.Generator().manual_seed(5)) < 0.7
    keep = ~(ancestor_mask(trees) & ~raw[:, None, :]).any(dim=2)  # every ancestor kept
    edited = [trees, pad_trees(trees, trees.width + 3), keep_columns(trees, keep),
              replace_rows(trees, torch.tensor([False, True, False]), chain_tree([[1, 2], [3], []]))]
    for t in edited:
        assert t.classes is not None
        assert torch.equal(t.classes, path_classes(t, 2))
