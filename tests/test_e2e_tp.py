"""Tensor parallelism: BASTION at TP=2 on vLLM's CPU backend gives the same
tokens as vLLM without speculation at TP=1.

Each TP rank runs the drafter, the tree builder and the walk on identical
(all-gathered) logits; only the auto budget differs per rank (it is timed per
rank), and every rank truncates its best-first tree to the scheduler's node
count, so this test also catches ranks that disagree on tree shapes.

vLLM's CPU backend binds each TP rank's OpenMP threads to a NUMA node; our
machines have one, so the ranks are bound to cores by hand
(VLLM_CPU_OMP_THREADS_BIND="0|1"), which needs two cores.
"""

import os

import pytest
from conftest import bastion_spec, make_llm, shutdown, spec_metrics, token_ids
from prompts import mixed_prompts

from vllm import SamplingParams

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="TP=2 on CPU binds one rank per core: needs 2 cores")


@pytest.fixture(scope="module")
def tp2_llm(tiny_pair):
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    cores = sorted(os.sched_getaffinity(0))[:2]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[1]}"
    try:  # the workers read the binding when they start, inside LLM()
        llm = make_llm(tiny_pair[0], tensor_parallel_size=2, max_num_seqs=8,
                       speculative_config=bastion_spec(tiny_pair[1], max_nodes=12))
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    yield llm
    shutdown(llm)


def test_tp2_greedy_equals_tp1_without_speculation(tp2_llm, reference_llm):
    assert tp2_llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    prompts = mixed_prompts(8, seed=5, max_words=40)
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    got = token_ids(tp2_llm.generate(prompts, sp, use_tqdm=False))
    assert got == token_ids(reference_llm.generate(prompts, sp, use_tqdm=False))
    m = spec_metrics(tp2_llm)
    assert m.get("vllm:spec_decode_num_draft_tokens", 0) > 0  # trees were verified
    # both ranks ran BASTION and verified trees of the same sizes
    stats = tp2_llm.collective_rpc("bastion_stats")
    assert len(stats) == 2
    assert stats[0]["trees"] > 0
    assert (stats[0]["trees"], stats[0]["nodes"], stats[0]["accepted"]) == (
        stats[1]["trees"], stats[1]["nodes"], stats[1]["accepted"])
