"""Per-node path data of a verify step (core/paths.py), against per-node
references: every node's history is the committed tokens plus its own path.

Pure torch for the core; vLLM's own per-row bad-words rule is the reference
for the vectorized bans.
"""

import random

import pytest
import torch

from random_trees import random_trees as random_best_first
from vllm_bastion.core.paths import (
    bad_word_bans,
    below_min_tokens,
    history_tails,
    keep_columns,
    output_columns,
    path_tokens,
    ragged_pairs,
    row_layout,
    row_path_tokens,
)
from vllm_bastion.core.step import spine_first
from vllm_bastion.core.walk import accept_walk


def random_trees(seed=0, vocab=40):
    """Spine-first random trees (5 requests, up to 16 nodes)."""
    return spine_first(random_best_first(B=5, max_nodes=16, seed=seed, vocab=vocab, sharp=2.0))[0]


def node_paths(trees, b):
    paths = {0: []}
    for i in range(1, int(trees.num_nodes[b]) + 1):
        paths[i] = paths[int(trees.parents[b, i])] + [int(trees.tokens[b, i])]
    return paths


def rows_of(trees):
    """[(b, column)] of every sampled row, request-major, root first."""
    return [(b, i) for b in range(trees.batch_size) for i in range(int(trees.num_nodes[b]) + 1)]


@pytest.mark.parametrize("seed", range(4))
def test_path_tokens_and_row_layout_match_per_node_paths(seed):
    trees = random_trees(seed=seed)
    layout = row_layout(trees)
    rows = rows_of(trees)
    assert list(zip(layout.req.tolist(), layout.col.tolist())) == rows
    pt = path_tokens(trees)
    rp = row_path_tokens(trees, layout)
    for r, (b, i) in enumerate(rows):
        p = node_paths(trees, b)[i]
        assert int(layout.depth[r]) == len(p)
        assert pt[b, i, : len(p)].tolist() == p and (pt[b, i, len(p):] == -1).all()
        assert rp[r, : len(p)].tolist() == p


@pytest.mark.parametrize("seed", range(4))
def test_history_tails_are_committed_plus_own_path(seed):
    trees = random_trees(seed=seed)
    rng = random.Random(seed)
    B, V, K = trees.batch_size, 40, 5
    committed = [[rng.randrange(V) for _ in range(rng.randrange(0, 8))] for _ in range(B)]
    tail = torch.full((B, K), -1, dtype=torch.long)
    for b, c in enumerate(committed):
        if c:
            tail[b, K - min(K, len(c)):] = torch.tensor(c[-K:])
    layout = row_layout(trees)
    paths = row_path_tokens(trees, layout)
    tails = history_tails(tail, layout, paths)
    for r, (b, i) in enumerate(rows_of(trees)):
        hist = committed[b] + node_paths(trees, b)[i]
        want = [-1] * max(0, K - len(hist)) + hist[-K:]
        assert tails[r].tolist() == want


def test_ragged_pairs():
    rows, items = ragged_pairs(torch.tensor([0, 2, 2, 1]), torch.tensor([0, 3, 3]),
                               torch.tensor([3, 0, 2]))
    assert rows.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert items.tolist() == [0, 1, 2, 3, 4, 3, 4]


@pytest.mark.parametrize("seed", range(4))
def test_bad_word_bans_equal_vllms_rule_on_every_nodes_history(seed):
    from vllm.v1.sample.ops.bad_words import _apply_bad_words_single_batch

    trees = random_trees(seed=seed, vocab=12)  # small vocabulary: many matches
    rng = random.Random(seed)
    B, V = trees.batch_size, 12
    committed = [[rng.randrange(V) for _ in range(rng.randrange(0, 6))] for _ in range(B)]
    words = {b: [[rng.randrange(V) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(0, 4))]
             for b in range(B)}
    flat = [(b, w) for b in range(B) for w in words[b]]
    K = max([len(w) - 1 for _, w in flat], default=0)
    prefixes = torch.full((len(flat), K), -2, dtype=torch.long)
    for j, (_, w) in enumerate(flat):
        if len(w) > 1:
            prefixes[j, K - len(w) + 1:] = torch.tensor(w[:-1])
    last = torch.tensor([w[-1] for _, w in flat], dtype=torch.long)
    count = torch.tensor([len(words[b]) for b in range(B)])
    start = torch.cumsum(count, 0) - count
    tail = torch.full((B, K), -1, dtype=torch.long)
    for b, c in enumerate(committed):
        if c and K:
            tail[b, K - min(K, len(c)):] = torch.tensor(c[-K:])
    layout = row_layout(trees)
    tails = history_tails(tail, layout, row_path_tokens(trees, layout))
    rows, toks = bad_word_bans(tails, layout.req, prefixes, last, start, count)
    got = torch.zeros((layout.num_rows, V), dtype=torch.bool)
    got[rows, toks] = True
    for r, (b, i) in enumerate(rows_of(trees)):
        want = torch.zeros(V)
        _apply_bad_words_single_batch(want, words[b], committed[b] + node_paths(trees, b)[i])
        assert torch.equal(got[r], torch.isneginf(want)), (b, i)


def test_below_min_tokens_counts_each_nodes_depth():
    trees = random_trees(seed=1)
    layout = row_layout(trees)
    n = torch.arange(trees.batch_size)
    m = torch.full((trees.batch_size,), 4)
    got = below_min_tokens(n, m, layout)
    for r, (b, i) in enumerate(rows_of(trees)):
        assert bool(got[r]) == (b + len(node_paths(trees, b)[i]) < 4)


@pytest.mark.parametrize("seed", range(4))
def test_output_columns_point_at_the_rows_that_predicted_each_token(seed):
    trees = random_trees(seed=seed)
    g = torch.Generator().manual_seed(seed)
    # target: follow a random child where one exists
    target = torch.randint(0, 40, trees.tokens.shape, generator=g)
    for b in range(trees.batch_size):
        for i in range(int(trees.num_nodes[b]) + 1):
            kids = [j for j in range(1, int(trees.num_nodes[b]) + 1) if int(trees.parents[b, j]) == i]
            if kids and torch.rand(1, generator=g) < 0.7:
                target[b, i] = trees.tokens[b, kids[int(torch.randint(len(kids), (1,), generator=g))]]
    walk = accept_walk(trees, target)
    cols = output_columns(walk.path_nodes, walk.num_accepted, walk.output_tokens.shape[1])
    for b in range(trees.batch_size):
        for j in range(int(walk.num_accepted[b]) + 1):
            c = int(cols[b, j])
            # the row at column c predicted output token j: the target's choice there
            assert int(target[b, c]) == int(walk.output_tokens[b, j])
            assert len(node_paths(trees, b)[c]) == j


@pytest.mark.parametrize("seed", range(4))
def test_keep_columns_keeps_an_ancestor_closed_subtree_in_order(seed):
    trees = random_trees(seed=seed)
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(trees.tokens.shape, dtype=torch.bool)
    keep[:, 0] = True
    for b in range(trees.batch_size):
        for i in range(1, int(trees.num_nodes[b]) + 1):
            keep[b, i] = bool(keep[b, int(trees.parents[b, i])]) and bool(torch.rand(1, generator=g) < 0.75)
    out = keep_columns(trees, keep)
    for b in range(trees.batch_size):
        before = node_paths(trees, b)
        want = [before[i] for i in range(1, int(trees.num_nodes[b]) + 1) if keep[b, i]]
        after = node_paths(out, b)
        assert [after[i] for i in range(1, int(out.num_nodes[b]) + 1)] == want
        for i in range(1, int(out.num_nodes[b]) + 1):
            assert int(out.depths[b, i]) == len(after[i])
