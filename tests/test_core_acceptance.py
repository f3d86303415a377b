"""Online acceptance calibration and class-aware tree building. Pure torch."""

import itertools
import math

import numpy as np
import torch

from vllm_bastion.core.acceptance import NUM_CLASSES, AcceptanceCalibrator, _isotonic
from vllm_bastion.core.tree import build_best_first_trees, path_classes, topk_per_depth


def test_untrained_calibrator_is_the_raw_surrogate():
    cal = AcceptanceCalibrator(5)
    logq = topk_per_depth(torch.randn(3, 5, 300) * 2, 6)[0]
    vals = cal.class_values(logq)
    assert vals.shape == (3, 5, NUM_CLASSES, 6)
    torch.testing.assert_close(vals, logq[:, :, None, :].expand_as(vals))


def test_calibrator_learns_conditional_acceptance_by_path_class():
    """Top-1-path nodes are accepted 90% of the time whatever the drafter says,
    second choices 10%: the calibrated values follow the data, not q."""
    rng = np.random.default_rng(0)
    cal = AcceptanceCalibrator(4, refresh_every=1, forgetting=1.0)
    for _ in range(300):
        d = rng.integers(1, 5, size=64)
        cls = rng.integers(0, 2, size=64)
        lq = np.log(rng.uniform(0.05, 0.6, size=64))
        acc = rng.uniform(size=64) < np.where(cls == 0, 0.9, 0.1)
        cal.update(d, lq, acc, cls)
    grid = torch.log(torch.tensor([0.1, 0.2, 0.4])).view(1, 1, 3).expand(1, 4, 3).contiguous()
    p = cal.class_values(grid).exp()  # [1, 4, classes, 3]
    assert (p[0, :, 0] > 0.8).all() and (p[0, :, 0] < 1.0).all()
    assert (p[0, :, 1] < 0.2).all()
    # monotone in q within a class (keeps each depth's top-k order)
    assert (p[0, :, :2, 1:] >= p[0, :, :2, :-1] - 1e-6).all()
    s = cal.summary()
    assert s["acceptance_by_depth_and_class"][0][0] > 0.8


def test_calibrator_forgets_old_workloads():
    cal = AcceptanceCalibrator(1, refresh_every=1, forgetting=0.9)
    for acc in (True,) * 200 + (False,) * 200:
        cal.update([1] * 8, [math.log(0.5)] * 8, [acc] * 8)
    p = cal.class_values(torch.full((1, 1, 1), math.log(0.5))).exp()[0, 0, 0, 0]
    assert p < 0.1


def test_isotonic_pools_violators():
    out = _isotonic(np.array([0.1, 0.5, 0.3, 0.2, 0.9]), np.ones(5))
    assert np.all(np.diff(out) >= 0)
    np.testing.assert_allclose(out, [0.1, 1 / 3, 1 / 3, 1 / 3, 0.9])


def _brute_force(values, M):
    """All rank paths scored by class-dependent values; the M best (ties:
    shallower first), as (path, score)."""
    D, C, K = values.shape
    nodes = []
    for d in range(1, D + 1):
        for path in itertools.product(range(K), repeat=d):
            cls, score = 0, 0.0
            for depth, r in enumerate(path):
                cls = min(cls + (r > 0), C - 1)
                score += float(values[depth, cls, r])
            nodes.append((score, d, path))
    nodes.sort(key=lambda x: (-x[0], x[1]))
    return {p: s for s, _, p in nodes[:M]}


def test_class_aware_builder_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    for M in (5, 12, 30):
        raw = torch.log_softmax(torch.randn(2, 4, 10, generator=g), -1).sort(-1, descending=True).values[:, :, :3]
        toks = torch.arange(3).view(1, 1, 3).expand(2, 4, 3) + 10 * torch.arange(4).view(1, 4, 1)
        values = raw[:, :, None, :].repeat(1, 1, NUM_CLASSES, 1)
        values[:, :, 1] -= 1.0  # second choices cost more
        values[:, :, 2] -= 3.0
        trees = build_best_first_trees(raw, toks, max_nodes=M, class_values=values)
        cls = path_classes(trees, NUM_CLASSES - 1)
        for b in range(2):
            want = _brute_force(values[b], M)
            paths = {0: ()}
            got = {}
            for i in range(1, int(trees.num_nodes[b]) + 1):
                p = int(trees.parents[b, i])
                paths[i] = paths[p] + (int(trees.ranks[b, i]),)
                got[paths[i]] = float(trees.scores[b, i])
                assert int(cls[b, i]) == min(sum(r > 0 for r in paths[i]), NUM_CLASSES - 1)
                assert float(trees.node_logq[b, i]) == float(raw[b, len(paths[i]) - 1, paths[i][-1]])
            assert set(got) == set(want)
            for path, score in got.items():
                assert math.isclose(score, want[path], abs_tol=1e-5)
