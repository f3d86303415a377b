"""The replay lab (core.replay) and the tree policies (core.policy). Pure torch, fast."""

import math

import pytest
import torch

from vllm_bastion.core.acceptance import AcceptanceCalibrator
from vllm_bastion.core.policy import BestFirstPolicy, CalibratedPolicy, ChainPolicy
from vllm_bastion.core.replay import (
    ReplayRecord,
    SampledExtension,
    StaticShapePolicy,
    auto_budget,
    fit_static_shape,
    simulate,
    targets_from_record,
    true_rank_paths,
)
from vllm_bastion.core.tree import build_best_first_trees
from vllm_bastion.core.walk import accept_walk, greedy_walk_reference


def crafted_record(patterns: dict[int, str], D=3, K=2, max_tokens=8) -> ReplayRecord:
    """Continuation c_i = 100 + i. At root i, depth d holds the truth c_{i+d}
    at rank 0 ('A'), rank 1 ('B') or nowhere ('X'); other slots hold wrong
    tokens. Roots without a pattern are all 'X'."""
    T = max_tokens + D + 1
    tokens = torch.arange(100, 100 + T)[None]
    R = max_tokens
    tk = torch.empty(1, R, D, K, dtype=torch.long)
    lp = torch.log(torch.tensor([0.6, 0.3]))[None, None, None, :].expand(1, R, D, K).clone()
    for i in range(R):
        pat = patterns.get(i, "X" * D)
        for d in range(D):
            wrong = [900 + 10 * i + 3 * d + j for j in range(K)]
            row = wrong
            if pat[d] == "A":
                row = [100 + i + d + 1] + wrong[1:]
            elif pat[d] == "B":
                row = [wrong[0], 100 + i + d + 1] + wrong[2:]
            tk[0, i, d] = torch.tensor(row[:K])
    return ReplayRecord(tokens=tokens, topk_logprobs=lp, topk_tokens=tk, max_tokens=max_tokens)


def full_tree_shape(D, K):
    shape, frontier = [], [()]
    for _ in range(D):
        frontier = [p + (r,) for p in frontier for r in range(K)]
        shape += frontier
    return shape


def test_replay_reproduces_a_crafted_trajectory():
    rec = crafted_record({0: "AAX", 3: "BAA", 4: "AXA", 6: "AAA"})
    chain = simulate(rec, ChainPolicy(3), 3, concurrency=1)
    # root 0: accepts 2 (3 tokens) -> root 3: 0 -> root 4: 1 -> root 6: 3 (11 >= 8 tokens emitted)
    assert chain.root.tolist() == [0, 3, 4, 6]
    assert chain.accepted.tolist() == [2, 0, 1, 3]
    assert chain.mean_accepted_length == pytest.approx(1 + 6 / 4)
    # the full binary tree also takes the rank-1 branch at root 3
    tree = simulate(rec, StaticShapePolicy(full_tree_shape(3, 2)), 14, concurrency=1)
    assert tree.root.tolist() == [0, 3]
    assert tree.accepted.tolist() == [2, 3]
    assert tree.nodes.tolist() == [14, 14]
    # a 4-node best-first tree (q = .6/.3): 0, 00, 1, 000 -> misses the rank-1 branch's depth 2
    bf = simulate(rec, BestFirstPolicy(), 4, concurrency=1)
    assert bf.root.tolist() == [0, 3, 5, 6]
    assert bf.accepted.tolist() == [2, 1, 0, 3]


def _reference_trajectory(rec: ReplayRecord, policy_factory, max_nodes: int, p: int):
    """Per-node Python reference: one prompt, one step at a time."""
    pol = policy_factory()
    state = pol.new_state(1)
    roots, acc = [], []
    i, emitted = 0, 1
    cont = rec.tokens[p].tolist()
    while emitted < rec.max_tokens:
        trees = pol.build(rec.topk_logprobs[p, i][None], rec.topk_tokens[p, i][None], max_nodes, state)
        n = int(trees.num_nodes[0])
        toks = trees.tokens[0, : n + 1].tolist()
        par = trees.parents[0, : n + 1].tolist()
        dep = trees.depths[0, : n + 1].tolist()
        target = [cont[i + d + 1] for d in dep]
        out = greedy_walk_reference(toks, par, target)
        k = len(out) - 1
        roots.append(i)
        acc.append(k)
        pol.observe(trees, accept_walk(trees, torch.tensor([target + [-1] * (trees.width - n - 1)])), state)
        i += k + 1
        emitted += k + 1
    return roots, acc


def random_record(P=5, D=6, K=4, max_tokens=40, V=12, seed=0) -> ReplayRecord:
    """A drafter that is right often (small vocabulary, truth boosted)."""
    g = torch.Generator().manual_seed(seed)
    T = max_tokens + D + 1
    tokens = torch.randint(0, V, (P, T), generator=g)
    logits = torch.randn(P, max_tokens, D, V, generator=g)
    idx = torch.arange(max_tokens)[:, None] + torch.arange(1, D + 1)[None, :]
    truth = tokens[:, idx]  # [P, R, D]
    logits.scatter_add_(-1, truth[..., None], 2.5 * torch.ones(P, max_tokens, D, 1))
    lp = torch.log_softmax(logits, -1)
    vals, ids = lp.topk(K, -1)
    return ReplayRecord(tokens=tokens, topk_logprobs=vals, topk_tokens=ids, max_tokens=max_tokens)


@pytest.mark.parametrize("name", ["chain", "raw", "calibrated", "new"])
def test_replay_matches_a_per_node_reference(name):
    rec = random_record()
    factories = {
        "chain": lambda: ChainPolicy(),
        "raw": lambda: BestFirstPolicy(),
        "calibrated": lambda: BestFirstPolicy(AcceptanceCalibrator(6, refresh_every=2)),
        "new": lambda: CalibratedPolicy(6),
    }
    for N in (3, 9):
        res = simulate(rec, factories[name](), N, concurrency=1)
        roots, acc = [], []
        pol_seq = factories[name]  # one policy object across prompts, as in the engine
        shared = pol_seq()

        def same():
            return shared

        for p in range(rec.num_prompts):
            r, a = _reference_trajectory(rec, same, N, p)
            roots += r
            acc += a
        assert res.root.tolist() == roots
        assert res.accepted.tolist() == acc
    if name in ("chain", "raw"):  # stateless: batching the prompts changes nothing
        a = simulate(rec, factories[name](), 9, concurrency=1)
        b = simulate(rec, factories[name](), 9, concurrency=3)
        key = lambda r: sorted(zip(r.prompt.tolist(), r.root.tolist(), r.accepted.tolist()))  # noqa: E731
        assert key(a) == key(b)


def _check_tree(trees):
    B, W = trees.tokens.shape
    for b in range(B):
        n = int(trees.num_nodes[b])
        sc = trees.scores[b, : n + 1]
        assert torch.all(sc[1:] <= sc[:-1] + 1e-6), "not best-first"
        for i in range(1, n + 1):
            p = int(trees.parents[b, i])
            assert 0 <= p < i, "parent after child: a prefix would not be a tree"
            assert int(trees.depths[b, i]) == int(trees.depths[b, p]) + 1
            assert float(trees.scores[b, i]) <= float(trees.scores[b, p]) + 1e-6
        # siblings carry distinct tokens
        kids = {}
        for i in range(1, n + 1):
            key = (int(trees.parents[b, i]), int(trees.tokens[b, i]))
            assert key not in kids
            kids[key] = i


def test_policy_trees_are_ancestor_closed_best_first_and_truncatable():
    rec = random_record(P=4, D=6, K=4)
    pol = CalibratedPolicy(6)
    simulate(rec, pol, 12, concurrency=2)  # trained on some walks
    state = pol.new_state(4)
    state["prev_accepted"] = torch.tensor([-1, 0, 3, 9])
    lp, tk = rec.topk_logprobs[:, 5], rec.topk_tokens[:, 5]
    for N in (1, 7, 30):
        trees = pol.build(lp, tk, N, state)
        _check_tree(trees)
        for n in (0, 1, 3, N):
            _check_tree(trees.truncate(torch.full((4,), n)))
    _check_tree(ChainPolicy().build(lp, tk, 6))


def test_calibrated_policy_learns_the_deep_spine_from_walks():
    """The drafter's top-1 is always right though its marginal is only .4 and
    the second choice .35: raw path confidence grows a wide shallow tree; the
    learned policy grows the chain, and accepts all of it."""
    D, K, R, P = 6, 3, 60, 4
    T = R + D + 1
    tokens = torch.arange(T).repeat(P, 1) + 1000 * torch.arange(P)[:, None]
    idx = torch.arange(R)[:, None] + torch.arange(1, D + 1)[None, :]
    truth = tokens[:, idx]
    tk = torch.stack([truth, truth + 500, truth + 700], -1)
    lp = torch.log(torch.tensor([0.4, 0.35, 0.2])).expand(P, R, D, K).clone()
    rec = ReplayRecord(tokens=tokens, topk_logprobs=lp, topk_tokens=tk, max_tokens=R)
    raw = simulate(rec, BestFirstPolicy(), D, concurrency=1)
    pol = CalibratedPolicy(D, prior_strength=1.0)
    new = simulate(rec, pol, D, concurrency=1)
    assert raw.mean_accepted_length <= 3.0  # (0), (0,0), (1), (0,1), (1,0)... : depth 2
    assert new.mean_accepted_length > 5.0
    trees = pol.build(lp[:1, 0], tk[:1, 0], D, {"prev_accepted": torch.tensor([D])})
    assert trees.ranks[0, 1:].tolist() == [0] * D  # the chain


def test_static_shape_fit_and_true_rank_paths():
    rec = crafted_record({0: "AAX", 3: "BAA", 4: "AXA", 6: "AAA"})
    paths = true_rank_paths(rec)[0]
    assert paths[0].tolist() == [0, 0, -1]
    assert paths[3].tolist() == [1, 0, 0]
    assert paths[4].tolist() == [0, -1, -1]
    assert paths[1].tolist() == [-1, -1, -1]
    shape = fit_static_shape(paths[[0, 3, 4, 6]], 3, 2)
    # (0,) occurs 3 times, (0, 0) twice, then (0, 0, 0) / (1,) once each (shallower first)
    assert shape == [(0,), (0, 0), (1,)]


def test_expected_accepted_length_from_the_union_tree():
    rec = crafted_record({0: "AAA"}, max_tokens=2)
    P, R = 1, rec.topk_tokens.shape[1]
    # union: root, (0), (0,0), (1) with edge probabilities .5, .4, .3
    par = torch.tensor([-1, 0, 1, 0]).expand(P, R, 4).clone()
    dep = torch.tensor([0, 1, 2, 1]).expand(P, R, 4).clone()
    rk = torch.tensor([0, 0, 0, 1]).expand(P, R, 4).clone()
    prob = torch.tensor([1.0, 0.5, 0.4, 0.3]).expand(P, R, 4).clone()
    rec.sampled = SampledExtension(par, dep, rk, torch.zeros_like(par), prob)
    res = simulate(rec, ChainPolicy(3), 3, concurrency=1)
    # chain (0), (0,0), (0,0,0): .5 + .5*.4 + (outside the union: 0)
    assert res.expected[0].item() == pytest.approx(0.5 + 0.2)
    assert res.union_miss[0].item() == 1
    res = simulate(rec, StaticShapePolicy([(0,), (1,), (0, 0)]), 3, concurrency=1)
    assert res.expected[0].item() == pytest.approx(0.5 + 0.3 + 0.2)
    assert res.union_miss[0].item() == 0


def test_auto_budget_picks_the_tokens_per_cost_argmax():
    rec = random_record(P=2)
    plan = auto_budget(lambda n: torch.clamp(n.double() / 4, min=1.0))
    trees = BestFirstPolicy().build(rec.topk_logprobs[:, 0], rec.topk_tokens[:, 0], 12)
    n, cost = plan(trees)
    p = trees.scores.exp()
    for b in range(2):
        theta = [float(1 + p[b, 1 : k + 1].sum()) / max(1.0, (1 + k) / 4) for k in range(13)]
        assert int(n[b]) == max(range(13), key=lambda k: theta[k])
        assert float(cost[b]) == pytest.approx(max(1.0, (1 + int(n[b])) / 4))


def test_replay_is_fast():
    rec = random_record(P=96, D=15, K=8, max_tokens=64)
    res = simulate(rec, BestFirstPolicy(), 32)
    assert res.steps > 1000
    # no timing assertion (shared CI machines); the lab prints steps/s
    assert math.isfinite(res.mean_accepted_length)


def test_policy_state_flows_through_select_and_truncate_as_in_the_runner():
    """The runner proposes trees for its batch rows, later selects / truncates
    them for the rows the scheduler verifies, walks them, and passes the
    walk to observe: the draft top-k and group ride on the TreeBatch, and
    observe writes each row's accepted count (or -1 without a tree)."""
    rec = random_record(P=3, D=6, K=4)
    pol = CalibratedPolicy(6)
    lp, tk = rec.topk_logprobs[:, 0], rec.topk_tokens[:, 0]
    state = pol.new_state(3)
    state["prev_accepted"] = torch.tensor([0, 4, 9])
    trees = pol.build(lp, tk, 10, state)
    assert trees.group.tolist() == [0, 2, 3]
    verified = trees.select([2, 0, 1]).truncate(torch.tensor([5, 0, 10]))
    assert verified.draft_tokens.shape == (3, 6, 4) and verified.group.tolist() == [3, 0, 2]
    target = torch.stack([
        targets_from_record(
            rec.tokens[[2, 0, 1]][i : i + 1], torch.zeros(1, dtype=torch.long), verified.depths[i : i + 1])[0]
        for i in range(3)])
    res = accept_walk(verified, target)
    before = pol.tested.sum().item()
    new_state = pol.new_state(3)
    pol.observe(verified, res, new_state)
    assert new_state["prev_accepted"].tolist() == [int(res.num_accepted[0]), -1, int(res.num_accepted[2])]
    assert pol.tested.sum().item() > before


def test_install_policy_hooks_what_the_runner_calls():
    """`tools.replay_record.install_policy` replaces the module globals the
    runner really calls (runner.build_best_first_trees in
    propose_draft_token_ids, core.step.accept_walk in finish_step), and the
    policy still learns from trees that went through `spine_first` (which
    drops the draft top-k and group)."""
    import inspect
    import types

    pytest.importorskip("vllm")
    import numpy as np

    import vllm_bastion.core.step as S
    import vllm_bastion.runner as R
    from vllm_bastion.tools.replay_record import install_policy

    assert "build_best_first_trees(" in inspect.getsource(R.BastionRunnerMixin.propose_draft_token_ids)
    assert "accept_walk(" in inspect.getsource(S.finish_step)
    rec = random_record(P=2, D=6, K=4)
    runner = types.SimpleNamespace(
        bastion_config=types.SimpleNamespace(draft_depth=6),
        input_batch=types.SimpleNamespace(req_ids=["a", "b"], num_reqs=2),
        _bastion_draft_rows=np.array([1]))  # only request "b" drafts
    saved = (R.build_best_first_trees, S.accept_walk)
    try:
        assert install_policy(types.SimpleNamespace(model_runner=runner), {})
        pol = runner._replay_policy
        lp, tk = rec.topk_logprobs[1:2, 0], rec.topk_tokens[1:2, 0]
        trees = R.build_best_first_trees(lp, tk, max_nodes=10, class_values=None)
        assert trees.group.tolist() == [0]  # no walk yet: a new request
        full, _ = S.spine_first(R._scatter_trees(trees, np.array([1]), 2))
        assert full.draft_tokens is None
        target = targets_from_record(rec.tokens[:2], torch.zeros(2, dtype=torch.long), full.depths)
        res = S.accept_walk(full, target)
        assert pol.tested.sum() > 0  # learned through the restored top-k
        k = int(res.num_accepted[1])
        trees = R.build_best_first_trees(lp, tk, max_nodes=10, class_values=None)
        assert trees.group.tolist() == pol.groups({"prev_accepted": torch.tensor([k])}, 1, "cpu").tolist()
    finally:
        R.build_best_first_trees, S.accept_walk = saved
