"""BASTION inside a real vLLM engine: greedy output is token-identical to vLLM
without speculation, and trees are really used.

One BASTION engine for the module, with prefix caching on and a small
max_num_batched_tokens, so long prompts are prefilled in chunks while other
requests decode with trees (mixed batches), and trees get truncated by the
token budget.
"""

import pytest
from conftest import bastion_spec, make_llm, shutdown, spec_metrics, token_ids
from prompts import mixed_prompts

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm_bastion.tools.benchmark import generate_concurrent, request_lengths
from vllm_bastion.tools.oracle import generate_with_oracle

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def bastion_llm(tiny_pair):
    # vLLM's default multiprocess engine (engine core and worker processes), as
    # users run it offline; the other modules' engines run in the test process
    llm = make_llm(
        tiny_pair[0],
        multiprocess=True,
        speculative_config=bastion_spec(tiny_pair[1], max_nodes=12, topk=4, budget="fixed"),
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=128,
    )
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def references(reference_llm):
    cache = {}

    def get(prompts, params=GREEDY):
        key = (tuple(prompts), params.max_tokens)
        if key not in cache:
            cache[key] = token_ids(reference_llm.generate(prompts, params, use_tqdm=False))
        return cache[key]

    return get


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_greedy_equals_no_speculation(bastion_llm, references, batch):
    prompts = mixed_prompts(batch, seed=batch)
    got = token_ids(bastion_llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == references(prompts)


def test_staggered_arrivals_and_finishes(bastion_llm, references):
    """Requests join a running batch at different steps and stop at different
    lengths; every output still equals the no-speculation reference."""
    prompts = mixed_prompts(10, seed=42)
    lengths = [5, 40, 17, 33, 8, 40, 25, 12, 40, 3]
    engine = bastion_llm.llm_engine
    done = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:  # one new request every other step
            i, p = pending.pop(0)
            engine.add_request(
                f"stagger-{i}", p,
                SamplingParams(temperature=0.0, max_tokens=lengths[i], ignore_eos=True),
            )
        for out in engine.step():
            if out.finished:
                done[int(out.request_id.split("-")[1])] = list(out.outputs[0].token_ids)
        step += 1
    ref = references(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for i in range(len(prompts)):
        assert done[i] == ref[i][: lengths[i]], f"request {i}"


def test_benchmark_keeps_a_fixed_number_of_requests_in_flight(bastion_llm, references):
    """scripts/bench.py's offline protocol (tools.benchmark.generate_concurrent):
    at most `concurrency` requests in flight, the batch refilled as requests
    finish, outputs in prompt order and equal to the reference."""
    prompts = mixed_prompts(7, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    lengths = request_lengths(7, 26, 0.5)  # 13-39 tokens, all different
    assert len(set(lengths)) == 7 and max(lengths) <= 40
    run = generate_concurrent(bastion_llm, prompts, params, 3, lengths=lengths)
    assert run.most_in_flight == 3
    ref = references(prompts, params)
    assert run.token_ids == [r[:n] for r, n in zip(ref, lengths)]
    # the steady-state window: from the first request's end until the 7th joined
    assert 0 < run.window_tokens < sum(map(len, run.token_ids)) - min(lengths)
    assert 0 < run.window_seconds < run.seconds
    with pytest.raises(ValueError, match="concurrency"):
        generate_concurrent(bastion_llm, prompts, params, 0)
    with pytest.raises(ValueError, match="lengths"):
        generate_concurrent(bastion_llm, prompts, params, 3, lengths=[5])


def test_prefix_cache_hits_keep_outputs(bastion_llm, references):
    base = mixed_prompts(1, seed=7, min_words=150, max_words=150)[0]
    prompts = [base + tail for tail in ("x = 1", "y = 2", "def z():", "")]
    first = token_ids(bastion_llm.generate(prompts, GREEDY, use_tqdm=False))
    again = token_ids(bastion_llm.generate(prompts, GREEDY, use_tqdm=False))  # cached prefixes
    assert first == again == references(prompts)


def test_trees_beat_the_top1_chain(bastion_llm, references):
    """Engine level: with the target's token at rank 2 of the drafter's top-k,
    a chain of top-1 drafts accepts nothing; BASTION's trees accept through the
    sibling branches, and the output is still exactly the greedy reference."""
    prompts = mixed_prompts(6, seed=3)
    ref = references(prompts)
    prompt_ids = [o.prompt_token_ids for o in bastion_llm.generate(
        prompts, SamplingParams(max_tokens=1), use_tqdm=False)]
    refs = {tuple(p): r for p, r in zip(prompt_ids, ref)}
    before = spec_metrics(bastion_llm)
    outs, stats = generate_with_oracle(bastion_llm, prompts, GREEDY, refs)
    got = token_ids(outs)
    after = spec_metrics(bastion_llm)
    assert got == ref
    assert stats["chain_accepted"] == 0
    assert stats["mean_accepted"] >= 1.5, stats
    assert stats["accepted_by_depth"][1] > 0  # accepted at depth 2, through rank-2 nodes
    # vLLM's own spec-decode metrics see it: acceptance by depth
    per_pos = [a - b for a, b in zip(
        after["vllm:spec_decode_num_accepted_tokens_per_pos"],
        before.get("vllm:spec_decode_num_accepted_tokens_per_pos") or [0] * 64)]
    assert per_pos[0] > 0 and per_pos[1] > 0
    drafted = after["vllm:spec_decode_num_draft_tokens"] - before.get("vllm:spec_decode_num_draft_tokens", 0)
    drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0)
    assert drafted / drafts > 4  # trees of many nodes, not chains of one


@pytest.mark.parametrize(
    "params,needle",
    [
        (dict(thinking_token_budget=8), "BASTION.*thinking_token_budget"),
        (dict(min_p=0.2), "min_p"),  # vLLM's own refusal with speculative decoding
        (dict(logit_bias={5: 2.0}), "logit_bias"),
    ],
)
def test_refused_sampling_features(bastion_llm, params, needle):
    with pytest.raises(VLLMValidationError, match=needle):
        bastion_llm.generate(["def f():"], SamplingParams(max_tokens=4, **params), use_tqdm=False)
    # the engine still serves after refusing
    assert len(bastion_llm.generate(["x"], SamplingParams(max_tokens=2), use_tqdm=False)) == 1
