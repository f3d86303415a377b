"""BASTION at the edges: KV-cache pressure (preemption + recompute) and prompts
near max_model_len. Outputs stay identical to vLLM without speculation."""

import pytest
from conftest import bastion_spec, make_llm, shutdown, spec_metrics, token_ids
from prompts import mixed_prompts

from vllm import SamplingParams

MAX_LEN = 384


@pytest.fixture(scope="module")
def tight_llm(tiny_pair):
    """A KV cache of a few blocks and a short max_model_len."""
    llm = make_llm(
        tiny_pair[0],
        speculative_config=bastion_spec(tiny_pair[1], max_nodes=16, topk=4, budget="fixed"),
        max_model_len=MAX_LEN,
        num_gpu_blocks_override=12,
        max_num_seqs=16,
    )
    yield llm
    shutdown(llm)


def test_preemption_keeps_outputs_identical(tight_llm, reference_llm):
    bs = tight_llm.llm_engine.vllm_config.cache_config.block_size
    # 12 prompts of ~1-2 blocks each + 96 new tokens cannot all fit in 12 blocks
    prompts = mixed_prompts(12, seed=31, min_words=60, max_words=120)
    sp = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    tok = tight_llm.get_tokenizer()
    need = sum(-(-(len(tok.encode(p)) + 96 + 17) // bs) for p in prompts)
    assert need > 12, "the test must overcommit the KV cache"
    got = token_ids(tight_llm.generate(prompts, sp, use_tqdm=False))
    assert got == token_ids(reference_llm.generate(prompts, sp, use_tqdm=False))
    preempted = [m for m in tight_llm.get_metrics() if m.name == "vllm:num_preemptions"]
    assert preempted and preempted[0].value > 0, "vLLM did not preempt; make the cache smaller"


def test_prompts_near_max_model_len(tight_llm, reference_llm):
    """Trees are clipped to the room left before max_model_len: no crash, and the
    generations run right up to the limit with identical tokens."""
    tok = tight_llm.get_tokenizer()
    prompts, params = [], []
    for i, p in enumerate(mixed_prompts(12, seed=5, min_words=40, max_words=200)):
        ids = tok.encode(p)[: MAX_LEN - 2 - i]  # 2..13 tokens of room left
        prompts.append(tok.decode(ids))
        n = len(tok.encode(prompts[-1]))
        params.append(SamplingParams(temperature=0.0, max_tokens=MAX_LEN - n, ignore_eos=True))
    before = spec_metrics(tight_llm)
    outs = tight_llm.generate(prompts, params, use_tqdm=False)
    ref = reference_llm.generate(prompts, params, use_tqdm=False)
    assert token_ids(outs) == token_ids(ref)
    for o in outs:  # every request ran to the very end of the context
        assert len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == MAX_LEN
    after = spec_metrics(tight_llm)
    # trees were still verified where there was room for them (the check above
    # shows none ran past max_model_len)
    assert after.get("vllm:spec_decode_num_drafts", 0) > before.get("vllm:spec_decode_num_drafts", 0)
