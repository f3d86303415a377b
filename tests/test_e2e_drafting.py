"""Speculation that switches itself off, per request, inside real engines.

* A pause in drafting is invisible to the drafter: while a request does not
  draft, its context features wait in the backlog; when it drafts again they
  are written first, so its draft at the resume position equals the draft an
  engine that never paused made at that position (the drafter's whole
  context is restored). Outputs equal vLLM without speculation throughout.
* 'never' never runs the drafter; on a compute-starved (fake) device the
  'auto' rule stops drafting by itself, re-probing every reprobe_interval steps.
"""

import pytest
import torch
from conftest import bastion_spec, make_llm, shutdown, token_ids
from prompts import mixed_prompts

from vllm import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def record_drafts(worker, pause=None):
    """Worker side: record every drafted step's top-k by (request, query
    position); optionally pause every request's drafting for steps in
    [pause[0], pause[1]) and until its context end is one of `pause[2]`."""
    runner = worker.model_runner
    state = {"step": 0, "log": {}, "paused": set()}
    orig_gate = runner._bastion_gate
    orig_take = runner.drafter.take_topk

    def gate(eligible, contexts):
        out = orig_gate(eligible, contexts)
        state["ctx"] = contexts.copy()
        if pause is not None:
            lo, hi, resume_at = pause
            for i, c in enumerate(contexts.tolist()):
                if lo <= state["step"] < hi or (state["step"] >= hi and i in state["paused"]
                                               and c not in resume_at):
                    if out[i]:
                        state["paused"].add(i)
                    out[i] = False
                elif c in resume_at:
                    state["paused"].discard(i)
        state["step"] += 1
        return out

    def take():
        res = orig_take()
        if res is not None:
            logp, tok = res
            for j, i in enumerate(runner._bastion_draft_rows.tolist()):
                rid = runner.input_batch.req_ids[i]
                state["log"][(rid, int(state["ctx"][i]))] = (logp[j].clone(), tok[j].clone())
        return res

    runner._bastion_gate = gate
    runner.drafter.take_topk = take
    worker._bastion_test_state = state
    return True


def take_log(worker):
    state = worker._bastion_test_state
    runner = worker.model_runner
    runner.__dict__.pop("_bastion_gate", None)
    runner.drafter.__dict__.pop("take_topk", None)
    stats = runner.bastion_stats.snapshot()
    return {"log": {(k[1]): (v[0].tolist(), v[1].tolist()) for k, v in state["log"].items()},
            "stats": stats}


@pytest.fixture(scope="module")
def llm(tiny_pair):
    target, drafter = tiny_pair
    engine = make_llm(target, max_num_seqs=4, speculative_config=bastion_spec(
        drafter, max_nodes=12, budget="fixed"))
    yield engine
    shutdown(engine)


def test_pause_and_backfill_restores_the_drafter_context(llm, reference_llm):
    prompt = mixed_prompts(1, seed=5)
    ref = token_ids(reference_llm.generate(prompt, GREEDY, use_tqdm=False))
    llm.collective_rpc(record_drafts)
    out = token_ids(llm.generate(prompt, GREEDY, use_tqdm=False))
    base = llm.collective_rpc(take_log)[0]["log"]
    assert out == ref
    positions = sorted(base)
    assert len(positions) > 6
    # pause from step 3 until the context end is a position the first run drafted at
    resume_at = [p for p in positions if p > positions[4]]
    llm.collective_rpc(record_drafts, args=((3, 6, resume_at),))
    out2 = token_ids(llm.generate(prompt, GREEDY, use_tqdm=False))
    paused = llm.collective_rpc(take_log)[0]
    assert out2 == ref
    log = paused["log"]
    after = [p for p in sorted(log) if p in resume_at]
    assert after, "the paused run never resumed at a position the first run drafted at"
    for p in after:
        lp, tk = log[p]
        lp0, tk0 = base[p]
        assert tk == tk0, f"draft at position {p} differs after the pause"
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(lp0), rtol=1e-4, atol=1e-4)
    # the pause was real: steps without any drafter run, with tokens in the backlog
    assert paused["stats"]["steps_without_drafter"] >= 3


def test_drafts_reach_the_scheduler_without_a_third_rpc(llm, reference_llm):
    """_patches.py, patch 9: the engine core gets each step's drafts from the
    runner's sample_tokens output, not from a take_draft_token_ids RPC, and
    they are the drafts (trees are verified; output equals the reference)."""
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    calls = []
    rpc = executor.collective_rpc

    def spy(method, *args, **kwargs):
        calls.append(method if isinstance(method, str) else getattr(method, "__name__", "?"))
        return rpc(method, *args, **kwargs)

    prompts = mixed_prompts(3, seed=11)
    ref = token_ids(reference_llm.generate(prompts, GREEDY, use_tqdm=False))
    llm.collective_rpc("bastion_reset_stats")
    executor.collective_rpc = spy
    try:
        out = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    finally:
        del executor.collective_rpc
    stats = llm.collective_rpc("bastion_stats")[0]
    assert out == ref
    assert calls.count("sample_tokens") > 10
    assert "take_draft_token_ids" not in calls
    assert stats["mean_nodes"] > 1  # drafts were scheduled and verified


def test_never_and_auto_switch_the_drafter_off(tiny_pair, reference_llm, tmp_path):
    import json

    target, drafter = tiny_pair
    slow = tmp_path / "slow.json"  # compute-starved: every verified token costs seconds
    json.dump({"name": "Fake compute-starved accelerator", "match": ["Fake compute-starved"],
               "peak_flops": {"fp32": 1e6, "bf16": 1e6}, "memory_bandwidth": 1e19,
               "source": "test"}, open(slow, "w"))
    prompts = mixed_prompts(3, seed=8)
    ref = token_ids(reference_llm.generate(prompts, GREEDY, use_tqdm=False))
    auto = dict(device_profile=str(slow), calibrate=False, online_refit=False, reprobe_interval=8)
    probes = {}
    for spec, check in (
        (dict(drafting="never"), lambda s: s["drafting"] == 0 and s["trees"] == 0),
        (auto, lambda s: 0 < s["drafting"] < 0.3 * s["draft_eligible"] and s["steps_without_drafter"] > 0),
        (auto | dict(reprobe_backoff=0), lambda s: 0 < s["drafting"]),
    ):
        engine = make_llm(target, speculative_config=bastion_spec(drafter, max_nodes=12, **spec))
        try:
            out = token_ids(engine.generate(prompts, GREEDY, use_tqdm=False))
            stats = engine.collective_rpc("bastion_stats")[0]
        finally:
            shutdown(engine)
        assert out == ref
        assert check(stats), (spec, {k: stats[k] for k in ("drafting", "draft_eligible", "trees",
                                                            "steps_without_drafter")})
        probes[spec.get("reprobe_backoff")] = stats["drafting"]
    # probes that do not switch drafting back on back off: fewer of them than at
    # a fixed interval (here every drafting request-step is a probe)
    assert probes[None] < probes[0], probes


def test_resuming_with_full_backlogs_under_a_small_token_budget(tiny_pair, reference_llm):
    """Requests paused long enough to fill their backlog (64 tokens each)
    resume drafting together, in an engine whose step budget
    (max_num_batched_tokens) is smaller than their backlogs: the backlog is
    written straight into the drafter's cache, never through the drafter
    forward's per-step context buffers (which it used to overrun, corrupting
    memory). Outputs stay equal to vLLM without speculation."""
    from vllm_bastion.tools.random_budget import install_random_budget

    target, drafter = tiny_pair
    engine = make_llm(target, max_num_seqs=8, max_num_batched_tokens=64,
                      enable_chunked_prefill=True,
                      speculative_config=bastion_spec(drafter, max_nodes=8, calibrate=False))
    try:
        engine.collective_rpc(install_random_budget, args=(7, 0.03))  # rare drafting: full backlogs
        prompts = mixed_prompts(8, seed=11)
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        got = token_ids(engine.generate(prompts, params, use_tqdm=False))
        stats = engine.collective_rpc("bastion_stats")[0]
    finally:
        shutdown(engine)
    ref = token_ids(reference_llm.generate(prompts, params, use_tqdm=False))
    assert got == ref
    assert stats["trees"] > 0 and stats["drafting"] < stats["draft_eligible"]
