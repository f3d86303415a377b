"""Whether to draft (core/gating.py), the per-request table and the drafter backlog.

Pure torch / numpy: no engine.
"""

import itertools

import numpy as np
import pytest
import torch

from vllm_bastion.core.latency import DevicePrior, LatencyModel, RooflineCoeffs

from vllm_bastion.core.model_shape import ModelShape
from vllm_bastion.core.gating import LinearCost, plan_drafting, probes_due
from vllm_bastion.drafting import Backlog, ragged_concat, ragged_rows
from vllm_bastion.request_table import RequestTable

SHAPE = ModelShape.from_hf_config(dict(
    hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=64, intermediate_size=3072, vocab_size=4096), dtype="bfloat16")


def latency(peak=1e12, bw=1e10):
    """A device whose verify forward is flat (memory-bound) up to its ridge."""
    prior = DevicePrior(name="test", match=("test",), peak_flops={"bf16": peak}, memory_bandwidth=bw)
    return LatencyModel.from_prior(SHAPE, prior, RooflineCoeffs(a_c=1, b_c=0, a_m=1, b_m=0))


def theta(S, gain, nodes, ctx, lat, t_base, fixed, per):
    B = len(gain)
    s = np.ones(B) + np.where(S, nodes, 0)
    t = t_base + (fixed + per * S.sum() if S.any() else 0.0) + lat.step_time(s, ctx)
    return (B + gain[S].sum()) / t


def test_cheap_verification_makes_everyone_draft():
    lat = latency(peak=1e15, bw=1e10)  # memory-bound: 30 extra tokens cost nothing
    B = 4
    d = plan_drafting(torch.full((B,), 2.0), torch.full((B,), 8.0), torch.full((B,), 100.0),
                      torch.ones(B, dtype=torch.bool), lat, t_base=1e-3, draft_fixed=1e-3,
                      draft_per_req=1e-4)
    assert d.drafts.all() and d.speedup_estimate > 1.5


def test_expensive_drafting_switches_speculation_off():
    lat = latency(peak=1e9, bw=1e12)  # compute-bound: every token costs
    B = 16
    d = plan_drafting(torch.full((B,), 0.3), torch.full((B,), 4.0), torch.full((B,), 100.0),
                      torch.ones(B, dtype=torch.bool), lat, t_base=1e-3, draft_fixed=0.05,
                      draft_per_req=0.01)
    assert not d.drafts.any()
    assert d.round_time == pytest.approx(d.no_draft_round_time)


def test_forced_probes_always_draft_and_ineligible_never():
    lat = latency(peak=1e9, bw=1e12)
    B = 6
    force = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    elig = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    d = plan_drafting(torch.full((B,), 0.1), torch.full((B,), 4.0), torch.full((B,), 50.0),
                      elig, lat, t_base=1e-3, draft_fixed=0.05, draft_per_req=0.01, force=force)
    assert d.drafts.tolist() == [True, False, False, True, False, False]
    elig0 = torch.zeros(B, dtype=torch.bool)
    d0 = plan_drafting(torch.full((B,), 9.0), torch.full((B,), 4.0), torch.full((B,), 50.0),
                       elig0, latency(peak=1e15), t_base=1e-3, draft_fixed=0.0, draft_per_req=0.0,
                       force=force)
    assert not d0.drafts.any()


@pytest.mark.parametrize("seed", range(8))
def test_plan_is_the_best_ranked_prefix_and_near_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    B = 7
    gain = torch.rand(B, generator=g, dtype=torch.float64) * 3
    nodes = 1 + torch.rand(B, generator=g, dtype=torch.float64) * 30
    ctx = torch.randint(10, 2000, (B,), generator=g).double()
    lat = latency(peak=float(10 ** (10 + 3 * torch.rand(1, generator=g))), bw=1e10)
    kw = dict(t_base=2e-3, draft_fixed=float(torch.rand(1, generator=g)) * 0.05, draft_per_req=1e-3)
    d = plan_drafting(gain, nodes, ctx, torch.ones(B, dtype=torch.bool), lat, **kw)
    args = (gain.numpy(), nodes.numpy(), ctx.numpy(), lat, kw["t_base"], kw["draft_fixed"], kw["draft_per_req"])
    got = theta(d.drafts.numpy(), *args)
    assert got == pytest.approx(d.expected_tokens / d.round_time, rel=1e-6)
    best = max(theta(np.array(m, dtype=bool), *args) for m in itertools.product([0, 1], repeat=B))
    assert got >= theta(np.zeros(B, dtype=bool), *args) - 1e-12  # never worse than no drafting
    assert got >= 0.97 * best  # a ranked prefix is near the subset optimum


def test_linear_cost_learns_the_drafter_cost():
    c = LinearCost(0.05, 0.0)
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = int(rng.integers(1, 33))
        c.update(m, 0.01 + 0.002 * m + rng.normal(0, 1e-4))
    assert c.fixed == pytest.approx(0.01, abs=1e-3) and c.per_item == pytest.approx(0.002, rel=0.05)
    assert c(0) == 0.0


class Req:
    def __init__(self, seed=None):
        self.sampling_params = type("SP", (), {"seed": seed})()


def test_request_table_follows_rows_and_keeps_state_of_absent_requests():
    reqs = {"a": Req(), "b": Req(seed=-5), "c": Req(seed=2**64 - 1), "d": Req()}
    new_slots = []
    t = RequestTable(4, on_new_slot=new_slots.append)
    assert t.sync(["a", "b", "c"], reqs)
    t["gain"][:] = [1.5, 2.5, 3.5]
    assert t["has_seed"].tolist() == [False, True, True]
    assert t["seed"].tolist()[1:] == [-5, -1]  # as int64
    slots = dict(zip(t.req_ids, t["slot"].tolist()))
    assert not t.sync(["a", "b", "c"], reqs)
    t.sync(["c", "a"], reqs)  # b is not scheduled this step: kept aside
    assert t["gain"].tolist() == [3.5, 1.5]
    t.finish(["a"])  # a finishes while laid out
    t.sync(["b", "c", "d"], reqs)
    assert t["gain"].tolist() == [2.5, 3.5, 1.0]
    assert dict(zip(t.req_ids, t["slot"].tolist()))["b"] == slots["b"]
    assert t["slot"][2] == slots["a"]  # a's slot went to the new request d
    assert new_slots[-1] == slots["a"]


def test_backlog_and_ragged_helpers():
    bl = Backlog(slots=3, capacity=8, feat_dim=2, dtype=torch.float32, device="cpu")
    f = torch.arange(10, dtype=torch.float32).view(5, 2)
    bl.append(np.array([2, 0]), np.array([2, 3]), f, torch.tensor([10, 11, 20, 21, 22]))
    bl.append(np.array([2]), np.array([1]), torch.tensor([[9.0, 9.0]]), torch.tensor([12]))
    counts, feats, pos = bl.take(np.array([0, 2]))
    assert counts.tolist() == [3, 3]
    assert pos.tolist() == [20, 21, 22, 10, 11, 12]
    assert feats[3:].tolist() == [[0, 1], [2, 3], [9, 9]]
    assert bl.count.tolist() == [0, 0, 0]
    cur = torch.tensor([[100.0, 100], [200, 200]])
    both = ragged_concat(counts, feats, np.array([1, 1]), cur)
    assert both[:, 0].tolist() == [4, 6, 8, 100, 0, 2, 9, 200]
    none = np.zeros(2, np.int64)  # one side empty: the other side, no copy
    assert ragged_concat(none, feats[:0], np.array([1, 1]), cur) is cur
    assert ragged_concat(counts, feats, none, cur[:0]) is feats
    assert ragged_rows(np.array([5, 20]), np.array([2, 3])).tolist() == [5, 6, 20, 21, 22]


def test_drafting_estimates_learn_and_relax_toward_the_engine_mean():
    from vllm_bastion.core.gating import DraftingEstimates

    est = DraftingEstimates(prior_gain=1.0, w=0.5, w_engine=0.5, tau=2.0)
    gain, nodes_est, idle = np.array([1.0, 1.0, 1.0]), np.array([8.0, 8.0, 8.0]), np.zeros(3, np.int64)
    drafted = np.array([True, True, False])
    decoding = np.array([True, True, True])
    est.update(gain, nodes_est, idle, drafted, np.array([10, 0, 0]), np.array([5, 0, 0]), decoding)
    assert gain[0] == pytest.approx(3.0) and gain[1] == pytest.approx(0.5)
    assert nodes_est.tolist() == [9.0, 8.0, 8.0]  # no tree verified: size estimate kept
    assert idle.tolist() == [0, 0, 1]
    engine = est.engine_gain
    assert engine == pytest.approx(1.0 + 0.5 * (2.5 - 1.0))
    # request 1 stops drafting: its estimate relaxes toward the engine mean, step by step
    off = np.array([True, False, True])
    before = gain[1]
    for _ in range(6):
        est.update(gain, nodes_est, idle, off, np.array([10, 0, 10]), np.array([5, 0, 5]), decoding)
    assert before < gain[1] < est.engine_gain
    assert idle[1] == 6 and idle[0] == 0


def test_engine_budget_charges_speculation_overhead_to_drafting():
    """Steps with speculation pay measured outside time that plain steps do
    not (walk, compaction, back-filled drafter context, the scheduler's
    drafts); the drafting decision charges it to a step in which anyone
    drafts, so a drafter that only looks cheap stops drafting."""
    from types import SimpleNamespace

    from vllm_bastion.engine_budget import EngineBudget

    lat = latency(peak=1e15, bw=1e10)  # verification itself costs nothing extra
    b = EngineBudget(SimpleNamespace(online_refit=False, max_nodes=16, min_nodes=0))
    b.set_model(lat, "test", None)
    b.draft_cost = LinearCost(0.001, 0.0)
    B = 4
    # 0.3 tokens per request: pays against a ~85 ms plain step, not with 50 ms more
    args = (np.full(B, 0.3), np.full(B, 6.0), np.full(B, 100.0), np.ones(B, bool), np.zeros(B, bool))
    t = 0.0
    for spec in [False, True] * 20:  # plain steps 10 ms outside, speculating ones 60 ms
        b.observe_verify(np.ones(B, np.int64), np.full(B, 100), 0.02, t)
        t += 0.02
        if spec:
            b.observe_draft(B, 0.001)
        t += 0.06 if spec else 0.01
        b.observe_outside(0.06 if spec else 0.01, t, spec=spec)
        t += 0.001
    assert b.spec_overhead() == pytest.approx(0.05, abs=0.005)
    assert not b.plan_drafting(*args).any()
    b.t_base_spec = b.t_base_plain  # no overhead: the same gains pay
    assert b.plan_drafting(*args).all()


def test_one_slow_step_does_not_switch_drafting_off():
    """A compilation on a new shape makes one drafter run and one step
    seconds long; the drafting costs BASTION learns must shrug it off (an
    engine that believed it would stop drafting where drafting pays), yet
    follow a real change of cost within a few steps."""
    from types import SimpleNamespace

    from vllm_bastion.engine_budget import EngineBudget

    c = LinearCost(0.005, 0.001)
    c.update(1, 2.0)  # a 2-second compile
    assert c(1) < 0.01
    for _ in range(3):  # the drafter really got 4x slower
        c.update(1, 0.024)
    assert c(1) == pytest.approx(0.024, rel=0.25)

    lat = latency(peak=1e15, bw=1e10)
    b = EngineBudget(SimpleNamespace(online_refit=False, max_nodes=16, min_nodes=0))
    b.set_model(lat, "test", None)
    b.draft_cost = LinearCost(0.003, 0.0)
    t = 0.0
    for i in range(12):  # alternating plain and speculating steps, the first ones compile
        spec = bool(i % 2)
        b.observe_verify(np.ones(1, np.int64), np.full(1, 100), 0.02, t)
        t += 0.02
        if spec:
            b.observe_draft(1, 3.0 if i == 1 else 0.003)
        outside = (3.0 if i in (0, 1) else 0.0) + 0.005
        b.observe_outside(outside, t + outside, spec=spec)
        t += outside + 0.001
    assert b.spec_overhead() < 0.01 and b.draft_cost(1) < 0.01
    args = (np.full(1, 2.0), np.full(1, 6.0), np.full(1, 100.0), np.ones(1, bool), np.zeros(1, bool))
    assert b.plan_drafting(*args).all()


def test_probes_are_batched():
    """One due request brings every request idle for 3/4 of the interval with
    it, so a large batch pays the drafter for probes about once per interval."""
    eligible = np.array([True, True, True, True, False])
    idle = np.array([32, 24, 23, 0, 40])
    pb = np.zeros(5, dtype=np.int64)
    assert probes_due(eligible, idle, pb, 32).tolist() == [True, True, False, False, False]
    assert not probes_due(eligible, np.array([31, 24, 23, 0, 40]), pb, 32).any()
    # the batch halved since request 3 last drafted: it is due, and brings request 1
    shrunk = probes_due(eligible, np.array([0, 30, 0, 0, 0]), np.array([0, 0, 0, 10, 0]), 32)
    assert shrunk.tolist() == [False, True, False, True, False]
    # at a batch of 64 with staggered idle counters, the drafter runs for
    # probes in few steps of an interval, not in nearly every one
    rng = np.random.default_rng(0)
    idle = rng.integers(0, 32, 64)
    runs = 0
    for _ in range(64):
        f = probes_due(np.ones(64, bool), idle, np.zeros(64, np.int64), 32)
        runs += bool(f.any())
        idle = np.where(f, 0, idle + 1)
    assert runs <= 8


def test_probes_that_do_not_pay_back_off():
    """A probe after which the rule still leaves the request off doubles its
    interval (up to the cap); drafting on its own resets it; the intervals
    are per request."""
    from vllm_bastion.core.gating import back_off_probes

    backoff = np.zeros(4, np.int64)
    probed = np.array([True, True, True, False])
    eligible = np.array([True, True, False, True])
    drafts = np.array([False, True, False, True])
    forced = np.array([False, False, False, False])
    back_off_probes(backoff, probed, eligible, drafts, forced, cap=2)
    # 0: probed, now off -> backs off; 1: drafts on its own; 2: not eligible (finished
    # or near max_model_len): no verdict; 3: was not probed
    assert backoff.tolist() == [1, 0, 0, 0]
    for _ in range(3):
        back_off_probes(backoff, probed, eligible, drafts, forced, cap=2)
    assert backoff.tolist() == [2, 0, 0, 0]  # capped
    # a forced draft is a probe, not a verdict; an unforced one starts over
    back_off_probes(backoff, probed, eligible, np.ones(4, bool), np.array([True, 0, 0, 0], bool), 2)
    assert backoff.tolist() == [2, 0, 0, 0]
    back_off_probes(backoff, probed, eligible, np.ones(4, bool), forced, 2)
    assert backoff.tolist() == [0, 0, 0, 0]
    # per-request intervals: 32 << backoff
    idle = np.array([40, 40, 0, 0])
    due = probes_due(np.ones(4, bool), idle, np.zeros(4, np.int64), 32 << np.array([0, 1, 0, 0]))
    assert due.tolist() == [True, False, False, False]
    idle[1] = 64
    assert probes_due(np.ones(4, bool), idle, np.zeros(4, np.int64),
                      32 << np.array([0, 1, 0, 0])).tolist() == [True, True, False, False]


def test_one_requests_bad_patch_does_not_switch_off_the_next_request():
    """At batch 1 the engine-wide mean is fed by one request at a time; it is
    the prior a new request starts from, so it must be a long-run average: a
    stretch of text that defeats the drafter near the end of one request must
    not make the next request start below what drafting needs to pay."""
    from vllm_bastion.core.gating import DraftingEstimates

    est = DraftingEstimates(prior_gain=1.0)
    one = np.ones(1, bool)
    gain, nodes_est, idle = np.array([1.0]), np.array([4.0]), np.zeros(1, np.int64)
    for _ in range(300):  # requests that gain 1.4 drafts per step on average
        est.update(gain, nodes_est, idle, one, np.array([4]), np.array([1.4]), one)
    for _ in range(30):  # then a patch where almost nothing is accepted
        est.update(gain, nodes_est, idle, one, np.array([4]), np.array([0.3]), one)
    assert gain[0] < 0.5  # this request's own estimate follows the patch
    assert est.engine_gain > 1.0  # the prior for the next request does not


def test_the_engine_mean_starts_as_a_running_mean():
    """A fresh engine learns its mean gain from the first steps (a running
    mean, the prior counting as one step), not over a hundred steps."""
    from vllm_bastion.core.gating import DraftingEstimates

    est = DraftingEstimates(prior_gain=1.0)
    one = np.ones(1, bool)
    gain, nodes_est, idle = np.array([1.0]), np.array([4.0]), np.zeros(1, np.int64)
    for acc in (3.0, 2.0, 2.0):
        est.update(gain, nodes_est, idle, one, np.array([4]), np.array([acc]), one)
    assert est.engine_gain == pytest.approx((1.0 + 3.0 + 2.0 + 2.0) / 4)
